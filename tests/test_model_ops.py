"""The system modules' arithmetic stays what it was while their op count goes down (issue 17, "fewer ops").

``benchmarks/gpu_reference/reference.npz`` holds energies and forces of ``gpu_reference/model`` at
fixed positions (80 and 1500 beads), computed through OpenMM's Reference platform before the op
reductions; both module variants must reproduce them to float32 rounding. The pieces rewritten
for fewer ops are checked against their direct forms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_cgnn.model import load_model
from openmm_cgnn.model.export import build_system_module
from openmm_cgnn.model.geometry import minimum_image
from openmm_cgnn.model.priors import ExcludedVolumePrior, _Tables, spline_energy

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_reference"
TERMS = {"model": True, "network": False}  # reference term -> prior inside the module


def sequential_wrap(delta: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The minimum image as it was written before: subtract c, then b, then a, each with autograd."""
    for axis in (2, 1, 0):
        row = box[:, axis].reshape([box.shape[0]] + [1] * (delta.dim() - 2) + [3])
        delta = delta - row * torch.round(delta[..., axis:axis + 1] / row[..., axis:axis + 1])
    return delta


@pytest.mark.parametrize("case", ["pairs16", "pairs300"])
@pytest.mark.parametrize("host_checks", [True, False])
def test_modules_reproduce_the_reference_values(case, host_checks):
    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.openmm import CGSystem

    data = np.load(REFERENCE / "reference.npz")
    meta = json.loads((REFERENCE / "reference.json").read_text())
    mapping = Mapping.load(REFERENCE / "model" / "mapping.json")
    cg = CGSystem.from_molecules(mapping, meta["cases"][case]["molecule_residues"], data[f"{case}/positions"],
                                 data[f"{case}/box"])
    model = load_model(REFERENCE / "model")
    for term, include_prior in TERMS.items():
        module = build_system_module(model, cg.bead_type, cg.molecule_index, meta["temperature_K"],
                                     include_prior=include_prior, box=cg.box, host_checks=host_checks)
        if host_checks:
            module = torch.jit.script(module)  # as TorchForce runs it
        for _ in range(3):  # TorchScript optimises after its profiling runs: check the optimised graph too
            positions = torch.as_tensor(cg.positions, dtype=torch.float64).requires_grad_(True)
            energy = module(positions, torch.as_tensor(cg.box, dtype=torch.float64))
            (gradient,) = torch.autograd.grad(energy, positions)
        reference_forces = data[f"{case}/{term}/forces"]
        rms = float(np.sqrt(np.mean(reference_forces ** 2)))
        assert float(energy.detach()) == pytest.approx(float(data[f"{case}/{term}/energy"]), rel=2e-6)
        # Measured: energies within 1e-7, forces within 8.5e-6 RMS (relative; 1.5e-6 before the
        # changes): float32 rounding, largest in the stiff bonds, where k (r - r0) magnifies it.
        assert float(np.sqrt(np.mean((-gradient.numpy() - reference_forces) ** 2))) <= 2e-5 * rms


def test_minimum_image_equals_the_sequential_wrap_and_passes_gradients_through():
    generator = torch.Generator().manual_seed(3)
    box = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, 3.0]],
                        [[2.0, 0.0, 0.0], [0.6, 2.2, 0.0], [-0.5, 0.7, 2.4]]])
    delta = (torch.rand(2, 50, 3, generator=generator) - 0.5) * 12.0
    wrapped = minimum_image(delta, box)
    expected = sequential_wrap(delta, box)
    assert torch.equal(wrapped[0], expected[0])  # orthorhombic: bit for bit
    torch.testing.assert_close(wrapped[1], expected[1], rtol=0.0, atol=4e-6)  # triclinic: float32 rounding
    delta.requires_grad_(True)
    (gradient,) = torch.autograd.grad((minimum_image(delta, box) * torch.arange(3.0)).sum(), delta)
    assert torch.equal(gradient, torch.arange(3.0).expand(2, 50, 3))


def test_excluded_volume_coefficients_give_the_shifted_force_formula():
    sigma = torch.tensor([[0.3, 0.35], [0.35, 0.0]], dtype=torch.float64)
    prior = ExcludedVolumePrior(["A:X", "B:Y"], sigma, exponent=12.0, cutoff_nm=0.8, epsilon_kj_mol=2.5)
    distance = torch.linspace(0.2, 0.9, 57, dtype=torch.float64).reshape(1, -1)
    type_i = torch.randint(0, 2, (1, 57), generator=torch.Generator().manual_seed(0))
    type_j = torch.randint(0, 2, (1, 57), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(1, 57, dtype=torch.bool)
    valid[0, 5] = False
    s = sigma[type_i, type_j]
    direct = 2.5 * ((s / distance) ** 12 - (s / 0.8) ** 12 + 12 * (s / 0.8) ** 12 * (distance - 0.8) / 0.8)
    direct = torch.where(valid & (distance < 0.8) & (s > 0), direct, 0.0).sum(-1)
    torch.testing.assert_close(prior(distance, type_i, type_j, valid), direct, rtol=1e-12, atol=1e-12)


def test_packed_spline_tables_give_the_spline_through_the_values():
    energies = [[math.sin(0.3 * k) for k in range(12)], [0.1 * (k - 5) ** 2 for k in range(12)]]
    tables = _Tables([0.1, 0.2], [0.9, 0.75], energies, [50.0, 10.0], "bonds")
    entry = torch.tensor([0, 1, 1, 0])
    grid = [torch.linspace(0.1, 0.9, 12, dtype=torch.float64), torch.linspace(0.2, 0.75, 12, dtype=torch.float64)]
    # on the grid points the spline is the table; beyond, the edge value plus slope and wall
    x = torch.stack([grid[0][3], grid[1][7], grid[1][11] + 0.1, grid[0][0] - 0.05]).reshape(1, 4)
    values = spline_energy(x, entry, tables.table_parameters, tables.knots, tables.points)
    beyond_high = energies[1][11] + float(tables.slope_high[1]) * 0.1 + 0.5 * 10.0 * 0.1 ** 2
    beyond_low = energies[0][0] - float(tables.slope_low[0]) * 0.05 + 0.5 * 50.0 * 0.05 ** 2
    expected = torch.tensor([[energies[0][3], energies[1][7], beyond_high, beyond_low]], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=0.0, atol=1e-12)
