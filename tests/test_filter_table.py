"""Tabulated continuous filters (model/filter_table.py): accuracy, smoothness, cutoff, export paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_cgnn.model import HybridGraphConfig, load_model
from openmm_cgnn.model.export import build_system_module
from openmm_cgnn.model.filter_table import (
    DEFAULT_FILTER_INTERVALS,
    TabulatedInteractionStack,
    tabulate_filters,
)
from openmm_cgnn.model.graph import Pairs
from openmm_cgnn.model.hybridgraph import CGModel, InteractionStack
from openmm_cgnn.testing.cg_models import BEAD_TYPE_NAMES, ionic_liquid, tensors

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_reference"


@pytest.fixture(scope="module")
def reference_system():
    """The trained quick model of gpu_reference and its minimised 16-ion-pair configuration."""
    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.openmm import CGSystem

    data = np.load(REFERENCE / "reference.npz")
    meta = json.loads((REFERENCE / "reference.json").read_text())
    mapping = Mapping.load(REFERENCE / "model" / "mapping.json")
    cg = CGSystem.from_molecules(mapping, meta["cases"]["pairs16"]["molecule_residues"], data["pairs16/positions"],
                                 data["pairs16/box"])
    return load_model(REFERENCE / "model"), cg, meta["temperature_K"]


def network_energy_forces(model: CGModel, cg, temperature: float, filter_intervals: int | None,
                          script: bool = False) -> tuple[float, np.ndarray]:
    module = build_system_module(model, cg.bead_type, cg.molecule_index, temperature, include_prior=False, box=cg.box,
                                 filter_intervals=filter_intervals)
    if script:
        module = torch.jit.script(module)
    positions = torch.as_tensor(cg.positions, dtype=torch.float64).requires_grad_(True)
    energy = module(positions, torch.as_tensor(cg.box, dtype=torch.float64))
    (gradient,) = torch.autograd.grad(energy, positions)
    return float(energy.detach()), -gradient.numpy()


def test_tabulated_network_within_float32_rounding(reference_system):
    """Against the same weights in float64, the tabulated float32 module errs at most twice as much
    as the exact float32 module does (its rounding alone); a coarse table does not."""
    model, cg, temperature = reference_system
    e64, f64 = network_energy_forces(copy.deepcopy(model).double(), cg, temperature, 0)
    e32, f32 = network_energy_forces(model, cg, temperature, 0)
    energy_rounding, force_rounding = abs(e32 - e64), float(np.abs(f32 - f64).max())
    energy, forces = network_energy_forces(model, cg, temperature, DEFAULT_FILTER_INTERVALS, script=True)
    assert abs(energy - e64) <= 2 * energy_rounding
    assert float(np.abs(forces - f64).max()) <= 2 * force_rounding
    # the check can fail: 128 intervals interpolate the trained filters to ~4e-4 only (10x the rounding)
    _, coarse = network_energy_forces(model, cg, temperature, 128)
    assert float(np.abs(coarse - f64).max()) > 2 * force_rounding


def stack_energy(stack: torch.nn.Module, distance: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A stand-in energy of one pair of two beads at ``distance`` (the sum of the updated features)."""
    pairs = Pairs(torch.zeros(1, 3, dtype=distance.dtype), distance.reshape(1), torch.ones(1, dtype=torch.bool),
                  torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    return stack(features, pairs).sum()


@pytest.fixture(scope="module")
def float64_stack():
    torch.manual_seed(2)
    stack = InteractionStack(blocks=2, features=6, filters=5, n_gaussians=8, cutoff=0.8).double()
    for parameter in stack.parameters():
        parameter.requires_grad_(False).mul_(2.0)
    return stack


def test_forces_continuous_across_grid_nodes(float64_stack):
    """A coarse float64 table (16 intervals, so the interpolation error is large and visible): at a
    node, the force is the exact one and the same from both sides, and a central finite difference
    of the energy across the node agrees with it."""
    table = TabulatedInteractionStack(float64_stack, 16)
    features = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    node = 7 * 0.8 / 16

    def force(stack, r: float) -> float:
        distance = torch.tensor(r, dtype=torch.float64, requires_grad=True)
        (gradient,) = torch.autograd.grad(stack_energy(stack, distance, features), distance)
        return float(gradient)

    step = 1e-9
    left, right = force(table, node - step), force(table, node + step)
    assert left == pytest.approx(right, rel=1e-6, abs=1e-9)
    assert force(table, node) == pytest.approx(force(float64_stack, node), rel=1e-10)
    h = 1e-7  # the second derivative jumps at the node: the difference errs by O(h) there
    difference = (float(stack_energy(table, torch.tensor(node + h, dtype=torch.float64), features))
                  - float(stack_energy(table, torch.tensor(node - h, dtype=torch.float64), features))) / (2 * h)
    assert difference == pytest.approx(force(table, node), rel=1e-6)
    # between nodes it interpolates: off the exact force, which is what makes the checks above bite
    middle = node + 0.5 * 0.8 / 16
    assert abs(force(table, middle) - force(float64_stack, middle)) > 1e-8 * abs(force(float64_stack, middle))


def test_filters_zero_at_and_beyond_the_cutoff_and_for_invalid_pairs(float64_stack):
    table = TabulatedInteractionStack(float64_stack, 64)
    distance = torch.tensor([0.8, 0.8 + 1e-12, 1.3, 0.3, 0.3, 0.8 - 1e-3], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, True, True, False, True, True])
    index = torch.zeros(6, dtype=torch.long)
    filters = table.filters(Pairs(torch.zeros(6, 3, dtype=torch.float64), distance, valid, index, index))
    assert torch.equal(filters[:4], torch.zeros_like(filters[:4]))
    assert bool((filters[4] != 0).any())
    (gradient,) = torch.autograd.grad(filters.sum(), distance)
    assert torch.equal(gradient[:4], torch.zeros(4, dtype=torch.float64))
    # and just inside it goes to zero as the exact (C2 envelope) filters do
    assert float(filters[5].detach().abs().max()) < 1e-4 * float(filters[4].detach().abs().max())


def test_exported_modules_tabulate_float32_hybridgraph_only():
    """filter_intervals=0 gives the exact module bit for bit; PaiNN and float64 models (and stacks
    without blocks) are left as they are."""
    cg = ionic_liquid(n_pairs=8, box_nm=1.9, frames=1, seed=5)
    positions, box, bead_type, molecules = tensors(cg, dtype=torch.float64)

    def make(architecture: str, dtype: str, intra_blocks: int = 1) -> CGModel:
        torch.manual_seed(0)
        config = HybridGraphConfig.quick(len(BEAD_TYPE_NAMES), bead_type_names=list(BEAD_TYPE_NAMES), dtype=dtype,
                                         architecture=architecture, features=8, filters=8, n_gaussians=8,
                                         intra_blocks=intra_blocks, inter_blocks=1, max_pairs_per_bead=32.0)
        return CGModel(config).eval().requires_grad_(False)

    def stacks(module) -> list[type]:
        return [type(m) for m in module.modules() if isinstance(m, (InteractionStack, TabulatedInteractionStack))]

    def energy(module) -> torch.Tensor:
        return module(positions[0], box[0]).detach()

    hybrid = make("hybridgraph", "float32")
    exact = build_system_module(hybrid, bead_type, molecules, filter_intervals=0, box=box[0])
    tabulated = build_system_module(hybrid, bead_type, molecules, box=box[0])
    assert stacks(exact) == [InteractionStack] * 2 and stacks(tabulated) == [TabulatedInteractionStack] * 2
    # what the module computes is written with it (model.pt metadata: filter_intervals)
    assert (exact.filter_intervals, tabulated.filter_intervals) == (0, DEFAULT_FILTER_INTERVALS)
    assert torch.jit.script(tabulated).filter_intervals == DEFAULT_FILTER_INTERVALS
    # bit for bit: the eager model's network through the same exact stacks
    assert torch.equal(energy(exact), hybrid(positions[:1], box[:1], bead_type, molecules, terms="network")[0])
    assert not torch.equal(energy(exact), energy(tabulated))
    for architecture, dtype in (("painn", "float32"), ("hybridgraph", "float64")):
        model = make(architecture, dtype)
        default = build_system_module(model, bead_type, molecules, box=box[0])
        assert not any(t is TabulatedInteractionStack for t in stacks(default))
        assert torch.equal(energy(default), energy(build_system_module(model, bead_type, molecules, box=box[0],
                                                                       filter_intervals=0)))
    no_intra = build_system_module(make("hybridgraph", "float32", intra_blocks=0), bead_type, molecules, box=box[0])
    assert stacks(no_intra) == [InteractionStack, TabulatedInteractionStack]  # nothing to tabulate in a 0-block stack
    with pytest.raises(ValueError, match="freeze"):
        tabulate_filters(copy.deepcopy(hybrid.energy).requires_grad_(True))


def test_tabulated_graph_safe_module_scripts(reference_system):
    """TorchScript of the graph-safe tabulated module (TorchForce with CUDA graphs) gives its eager
    energy and forces to float32 rounding. (Under torch.compile(fullgraph=True) it is checked where
    the PythonForce engine compiles it: test_openmm_force.py::test_compiled_python_engine_agrees_with_torchforce,
    a float32 model, so tabulated.)"""
    model, cg, temperature = reference_system
    module = build_system_module(model, cg.bead_type, cg.molecule_index, temperature, include_prior=False, box=cg.box,
                                 host_checks=False)
    box = torch.as_tensor(cg.box, dtype=torch.float64)

    def energy_forces(function) -> tuple[float, np.ndarray]:
        positions = torch.as_tensor(cg.positions, dtype=torch.float64).requires_grad_(True)
        energy = function(positions, box)
        (gradient,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -gradient.numpy()

    e_ref, f_ref = energy_forces(module)
    eps = float(np.finfo(np.float32).eps)
    scripted = torch.jit.script(module)
    for _ in range(3):  # TorchScript optimises after its profiling runs: check the optimised graph too
        energy, forces = energy_forces(scripted)
    assert energy == pytest.approx(e_ref, rel=20 * eps)
    np.testing.assert_allclose(forces, f_ref, atol=50 * eps * float(np.abs(f_ref).max()))
