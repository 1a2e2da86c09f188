"""Speed paths of the exported model must give the same energies and forces as the plain ones:
the pair list reused with a skin (VerletNeighborSearch) and the pair list cut to the pairs found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_cgnn.model import export_for_frames, read_metadata, script_for_system
from openmm_cgnn.model.export import build_system_module
from openmm_cgnn.model.filter_table import DEFAULT_FILTER_INTERVALS
from openmm_cgnn.model.geometry import FLAG_BOX_TOO_SMALL, FLAG_NONFINITE
from openmm_cgnn.model.neighbors import DenseNeighborSearch, SkinPairList, VerletNeighborSearch
from openmm_cgnn.testing.cg_models import ionic_liquid, synthetic_model


@pytest.fixture(scope="module")
def liquid():
    # 256 beads in a 2.5 nm box: wide enough for a search with cutoff + skin (0.9 nm)
    return ionic_liquid(n_pairs=64, box_nm=None, frames=2, seed=3, jitter_nm=0.05)


@pytest.fixture(scope="module")
def model(liquid):
    return synthetic_model(liquid, seed=0, weight_scale=2.0, max_pairs_per_bead=48.0)


def energy_and_forces(module, positions: torch.Tensor, box: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = positions.clone().requires_grad_(True)
    energy = module(leaf, box)
    energy.backward()
    return float(energy.detach()), -leaf.grad


def assert_same(first, second) -> None:
    assert first[0] == pytest.approx(second[0], rel=1e-5)
    scale = float(second[1].abs().max())
    torch.testing.assert_close(first[1], second[1], rtol=1e-5, atol=1e-5 * scale)


def test_reused_pair_list_equals_fresh_search_along_a_walk(liquid, model):
    box = torch.as_tensor(liquid.box[0], dtype=torch.float64)
    reused = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], neighbor_skin_nm=0.1)
    fresh = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], neighbor_skin_nm=0.0)
    assert reused.neighbor_skin_nm == pytest.approx(0.1) and fresh.neighbor_skin_nm == 0.0
    generator = torch.Generator().manual_seed(0)
    positions = torch.as_tensor(liquid.positions[0], dtype=torch.float64)
    for _ in range(12):  # small moves: the list is reused between rebuilds
        positions = positions + 0.006 * torch.randn(positions.shape, generator=generator, dtype=torch.float64)
        assert_same(energy_and_forces(reused, positions, box), energy_and_forces(fresh, positions, box))
    search = reused.energy.neighbors
    calls, rebuilds = int(search.calls), int(search.rebuilds)
    assert calls == 12 and 1 <= rebuilds < calls
    # one bead jumps by more than half the skin: the list must be rebuilt, and stay exact
    positions[5] += torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    assert_same(energy_and_forces(reused, positions, box), energy_and_forces(fresh, positions, box))
    assert int(search.rebuilds) == rebuilds + 1
    # a bead wrapped into the box by a lattice vector has not moved: no rebuild
    positions[7] += box[0]
    assert_same(energy_and_forces(reused, positions, box), energy_and_forces(fresh, positions, box))
    assert int(search.rebuilds) == rebuilds + 1


def test_skin_search_overflow_falls_back_to_the_plain_search(liquid):
    positions = torch.as_tensor(liquid.positions[:1], dtype=torch.float32)
    box = torch.as_tensor(liquid.box[:1], dtype=torch.float32)
    molecules = torch.as_tensor(liquid.molecule_index)
    plain = DenseNeighborSearch(0.8, 48.0)
    starved = VerletNeighborSearch(DenseNeighborSearch(0.9, 1.0), plain, 0.8, 0.1, positions.shape[1])
    expected = plain(positions, box, molecules)
    got = starved(positions, box, molecules)
    assert not bool(starved.has_list[0])
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_nonfinite_positions_never_leave_a_stale_list(liquid):
    positions = torch.as_tensor(liquid.positions[:1], dtype=torch.float32)
    box = torch.as_tensor(liquid.box[:1], dtype=torch.float32)
    molecules = torch.as_tensor(liquid.molecule_index)
    plain = DenseNeighborSearch(0.8, 48.0)
    search = VerletNeighborSearch(DenseNeighborSearch(0.9, 48.0 * (0.9 / 0.8) ** 3), plain, 0.8, 0.1, positions.shape[1])
    search(positions, box, molecules)
    broken = positions.clone()
    broken[0, 3] = float("nan")
    search(broken, box, molecules)
    rebuilds = int(search.rebuilds)
    index_i, index_j, valid, count, flags = search(positions, box, molecules)
    assert int(search.rebuilds) == rebuilds + 1
    expected = plain(positions, box, molecules)
    assert int(count[0]) == int(expected[3][0])
    found = {tuple(p) for p in torch.stack([index_i[valid], index_j[valid]], 1).tolist()}
    wanted = {tuple(p) for p in torch.stack([expected[0][expected[2]], expected[1][expected[2]]], 1).tolist()}
    assert found == wanted


def test_cut_pair_list_equals_full_capacity(liquid, model):
    """host_checks=True cuts the pair tensors to the pairs found; host_checks=False keeps the padding."""
    box = torch.as_tensor(liquid.box[0], dtype=torch.float64)
    positions = torch.as_tensor(liquid.positions[0], dtype=torch.float64)
    checked = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], neighbor_skin_nm=0.0)
    graph_safe = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], host_checks=False)
    assert graph_safe.neighbor_skin_nm == 0.0  # CUDA graphs: nothing read on the host, no reuse
    assert_same(energy_and_forces(checked, positions, box), energy_and_forces(graph_safe, positions, box))


def test_export_metadata_names_the_skin(liquid, model, tmp_path):
    path = export_for_frames(model, liquid, tmp_path / "model.pt")
    assert read_metadata(path)["neighbor_skin_nm"] == pytest.approx(0.1)
    # and the filters' table (model/filter_table.py): the model's dtype decides whether there is one
    tabulated = model.dtype == torch.float32 and model.config.architecture == "hybridgraph"
    assert read_metadata(path)["filter_intervals"] == (DEFAULT_FILTER_INTERVALS if tabulated else 0)
    loaded = torch.jit.load(str(path))
    positions = torch.as_tensor(liquid.positions[0], dtype=torch.float64)
    box = torch.as_tensor(liquid.box[0], dtype=torch.float64)
    fresh = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], neighbor_skin_nm=0.0)
    assert_same(energy_and_forces(loaded, positions, box), energy_and_forces(fresh, positions, box))


def test_openmm_trajectory_is_the_same_with_a_reused_list(cg, tmp_path):
    """Inside OpenMM (openmm-torch keeps the module's state between steps) the dynamics do not change."""
    import openmm

    from models.make_models import make_model_dir
    from openmm_cgnn.openmm import CGNNForce

    model_dir = make_model_dir(tmp_path / "model")
    final = {}
    for skin in (0.1, 0.0):
        force = CGNNForce(model_dir, cg, neighbor_skin_nm=skin)
        assert force.module.neighbor_skin_nm == pytest.approx(skin)
        system = cg.system()
        force.add_to(system)
        integrator = openmm.VerletIntegrator(0.002)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(cg.positions)
        context.setVelocitiesToTemperature(300.0, 1)
        integrator.step(60)
        state = context.getState(getPositions=True, getEnergy=True)
        final[skin] = (state.getPotentialEnergy()._value, state.getPositions(asNumpy=True)._value)
    assert final[0.1][0] == pytest.approx(final[0.0][0], rel=1e-4, abs=1e-3)
    assert np.abs(final[0.1][1] - final[0.0][1]).max() < 1e-4



@pytest.mark.parametrize("backend,skin,finder", [("dense", 0.1, "CandidateFinder"), ("cell", 0.02, "SearchFinder")])
def test_skin_pair_list_outside_the_module_equals_fresh_search(liquid, model, backend, skin, finder):
    """The PythonForce engine's list (SkinPairList, host side) fed to ``energy_of_pairs`` gives the
    fresh search's energies and forces along a walk, for the candidate finder (dense) and the cell
    search; its length only grows, and a bead jumping by more than half the skin rebuilds it."""
    box = torch.as_tensor(liquid.box[0], dtype=torch.float64)
    module = build_system_module(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], host_checks=False,
                                 neighbor_backend=backend)
    fresh = script_for_system(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], neighbor_skin_nm=0.0)
    # the cell search starts far too small: it must grow, not overflow
    per_bead = module.max_pairs_per_bead if backend == "dense" else 2.0
    pairs = SkinPairList.create(backend, module.search_cutoff_nm, per_bead, skin,
                                box.float().unsqueeze(0), module.molecule_index, granularity=64)
    assert pairs is not None and type(pairs.finder).__name__ == finder  # the cell list: 3 cells of cutoff + skin

    def listed(positions: torch.Tensor):
        index_i, index_j, valid, flags = pairs(positions.float().unsqueeze(0), box.float().unsqueeze(0))
        assert flags == 0 and index_i.shape[1] % 64 == 0
        return energy_and_forces(lambda x, b: module.energy_of_pairs(x, b, index_i, index_j, valid), positions, box)

    generator = torch.Generator().manual_seed(1)
    positions = torch.as_tensor(liquid.positions[0], dtype=torch.float64)
    capacities = []
    for _ in range(10):
        positions = positions + skin / 16 * torch.randn(positions.shape, generator=generator, dtype=torch.float64)
        assert_same(listed(positions), energy_and_forces(fresh, positions, box))
        capacities.append(pairs.capacity)
    assert capacities == sorted(capacities) and 1 <= pairs.rebuilds < pairs.calls == 10
    if backend == "cell":
        assert pairs.finder.max_pairs_per_bead >= 16.0
    rebuilds = pairs.rebuilds
    positions[5] += torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    assert_same(listed(positions), energy_and_forces(fresh, positions, box))
    assert pairs.rebuilds == rebuilds + 1


def test_skin_pair_list_flags_a_box_too_small_and_nan_positions(liquid, model):
    box = torch.as_tensor(liquid.box[0], dtype=torch.float32).unsqueeze(0)
    module = build_system_module(model, liquid.bead_type, liquid.molecule_index, box=liquid.box[0], host_checks=False)
    assert SkinPairList.create("dense", module.search_cutoff_nm, module.max_pairs_per_bead, 5.0, box,
                               module.molecule_index) is None  # no room for that skin
    pairs = SkinPairList.create("dense", module.search_cutoff_nm, module.max_pairs_per_bead, 0.1, box,
                                module.molecule_index)
    positions = torch.as_tensor(liquid.positions[0], dtype=torch.float32).unsqueeze(0)
    assert pairs(positions, box)[3] == 0
    assert pairs(positions, box * 0.3)[3] & FLAG_BOX_TOO_SMALL  # a shrunken box is searched again and refused
    assert pairs(positions, box)[3] == 0
    bad = positions.clone()
    bad[0, 3, 1] = float("nan")  # NaN counts as moved, and is flagged before any search (a NaN cell index)
    assert pairs(bad, box)[3] & FLAG_NONFINITE
    assert pairs(positions, box)[3] == 0 and pairs.pairs is not None  # finite again: a list again
    # the module on its own still answers NaN for NaN positions on any list
    index_i, index_j, valid, _ = pairs(positions, box)
    assert torch.isnan(module.energy_of_pairs(bad[0].double(), box[0].double(), index_i, index_j, valid))
