"""The system modules' arithmetic stays what it was while their op count goes down (issue 17, "fewer ops").

``benchmarks/gpu_reference/reference.npz`` holds energies and forces of ``gpu_reference/model`` at
fixed positions (80 and 1500 beads), computed through OpenMM's Reference platform before the op
reductions; both module variants must reproduce them to float32 rounding (the op reductions of
commits 22bfa1b/5c94854, since reverted, passed with forces within 8.5e-6 RMS).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_cgnn.model import load_model
from openmm_cgnn.model.export import build_system_module
from openmm_cgnn.model.geometry import minimum_image

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
        # Measured: energies within 1e-7, forces within 1.5e-6 RMS (relative; 8.5e-6 with the op
        # reductions): float32 rounding, largest in the stiff bonds, where k (r - r0) magnifies it.
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
