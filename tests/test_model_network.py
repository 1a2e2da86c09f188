"""Hybridgraph network: gradients, symmetries, smooth cutoffs, neighbour search, input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_cgnn.model import (
    CellNeighborSearch,
    CGModel,
    DenseNeighborSearch,
    HybridGraphConfig,
    diagnose,
    fit_priors,
    script_for_system,
)
from openmm_cgnn.testing.cg_models import BEAD_TYPE_NAMES, ionic_liquid, tensors

# A `raise` inside TorchScript surfaces as torch.jit.Error (not a RuntimeError subclass).
SCRIPT_ERRORS = (RuntimeError, torch.jit.Error)


def make_model(dtype: str = "float64", prior=None, seed: int = 0, **overrides) -> CGModel:
    torch.manual_seed(seed)
    config = HybridGraphConfig.quick(len(BEAD_TYPE_NAMES), bead_type_names=list(BEAD_TYPE_NAMES), dtype=dtype,
                                     **overrides)
    model = CGModel(config, prior)
    # Larger random weights than the default init so every term visibly contributes.
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.mul_(3.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def liquid():
    return ionic_liquid(n_pairs=8, box_nm=1.9, frames=3, seed=1)


@pytest.fixture(scope="module")
def model_with_prior(liquid):
    return make_model(prior=fit_priors(liquid))


def test_forces_are_minus_finite_difference_gradient(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    positions = positions[:1]
    box = box[:1]
    _, forces = model_with_prior.energy_and_forces(positions, box, bead_type, molecules)
    rng = np.random.default_rng(0)
    step = 1e-5
    for bead in rng.choice(positions.shape[1], size=4, replace=False):
        for axis in range(3):
            plus, minus = positions.clone(), positions.clone()
            plus[0, bead, axis] += step
            minus[0, bead, axis] -= step
            numeric = -(model_with_prior(plus, box, bead_type, molecules) -
                        model_with_prior(minus, box, bead_type, molecules)) / (2 * step)
            assert float(forces[0, bead, axis]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-5)


def test_batched_equals_single_frames(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    energy, forces = model_with_prior.energy_and_forces(positions, box, bead_type, molecules)
    for frame in range(len(positions)):
        e1, f1 = model_with_prior.energy_and_forces(positions[frame:frame + 1], box[frame:frame + 1], bead_type, molecules)
        torch.testing.assert_close(energy[frame:frame + 1], e1)
        torch.testing.assert_close(forces[frame:frame + 1], f1)


def test_translation_and_periodic_wrapping_invariance(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    reference = model_with_prior(positions, box, bead_type, molecules)
    shifted = positions + torch.tensor([0.37, -1.21, 2.9], dtype=positions.dtype)
    torch.testing.assert_close(model_with_prior(shifted, box, bead_type, molecules), reference)
    # Each bead moved by its own whole box vectors: molecules end up split across images,
    # as OpenMM's GPU platforms may hand them over.
    rng = np.random.default_rng(3)
    images = torch.as_tensor(rng.integers(-2, 3, size=(positions.shape[1], 3)), dtype=positions.dtype)
    wrapped = positions + torch.einsum("nk,bkd->bnd", images, box)
    torch.testing.assert_close(model_with_prior(wrapped, box, bead_type, molecules), reference)


def test_wrapping_invariance_triclinic():
    cg = ionic_liquid(n_pairs=8, box_nm=2.0, frames=2, seed=4, triclinic=True)
    model = make_model(prior=fit_priors(cg))
    positions, box, bead_type, molecules = tensors(cg)
    reference = model(positions, box, bead_type, molecules)
    images = torch.as_tensor(np.random.default_rng(5).integers(-1, 2, size=(positions.shape[1], 3)), dtype=positions.dtype)
    wrapped = positions + torch.einsum("nk,bkd->bnd", images, box)
    torch.testing.assert_close(model(wrapped, box, bead_type, molecules), reference)


def test_rotation_invariance(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    reference = model_with_prior(positions, box, bead_type, molecules)
    # A cubic box is mapped onto itself by 90-degree rotations: the periodic system is the same.
    quarter_turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=positions.dtype)
    torch.testing.assert_close(model_with_prior(positions @ quarter_turn.T, box, bead_type, molecules), reference)
    # Any rotation, for a cluster far from its periodic images.
    cluster = positions[:, :12]
    big_box = torch.eye(3, dtype=positions.dtype).expand(len(positions), 3, 3) * 10.0
    rotation, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))
    rotation = torch.as_tensor(rotation, dtype=positions.dtype)
    before = model_with_prior(cluster, big_box, bead_type[:12], molecules[:12])
    after = model_with_prior(cluster @ rotation.T, big_box, bead_type[:12], molecules[:12])
    torch.testing.assert_close(after, before)


def _two_beads(distance: float, same_molecule: bool):
    positions = torch.tensor([[[1.0, 1.0, 1.0], [1.0 + distance, 1.0, 1.0]]], dtype=torch.float64)
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 3.0
    return positions, box, torch.tensor([0, 3]), torch.tensor([0, 0] if same_molecule else [0, 1])


@pytest.mark.parametrize("same_molecule,cutoff", [(True, 0.7), (False, 0.8)])
def test_energy_and_force_continuous_at_cutoff(same_molecule, cutoff):
    model = make_model(seed=2)
    beyond = model(*_two_beads(cutoff + 1e-3, same_molecule))
    far = model(*_two_beads(cutoff + 0.3, same_molecule))
    assert float(beyond) == pytest.approx(float(far), abs=1e-12)  # nothing acts past the cutoff
    inside, inside_force = model.energy_and_forces(*_two_beads(cutoff - 0.2, same_molecule))
    energy_scale, force_scale = abs(float(inside - far)), float(inside_force.abs().max())
    assert energy_scale > 1e-4  # the pair does interact inside
    jumps, forces = [], []
    for gap in (1e-3, 5e-4, 2.5e-4):
        jumps.append(abs(float(model(*_two_beads(cutoff - gap, same_molecule)) - far)))
        _, force = model.energy_and_forces(*_two_beads(cutoff - gap, same_molecule))
        forces.append(float(force.abs().max()))
    # C2 envelope: energy gap ~ gap^3 and force ~ gap^2 as the pair reaches the cutoff
    # (the asymptotic orders only show for gaps well below 1e-2 nm).
    assert jumps[-1] < 1e-5 * energy_scale and forces[-1] < 1e-3 * force_scale
    assert jumps[0] / jumps[2] > 30 and forces[0] / forces[2] > 8


def test_nve_like_continuity_along_a_path(liquid):
    """Energy along a straight path through many cutoff crossings matches the integrated force."""
    model = make_model(prior=fit_priors(liquid), max_pairs_per_bead=16.0)
    positions, box, bead_type, molecules = tensors(liquid)
    start = positions[:1]
    direction = torch.zeros_like(start)
    direction[0, 5] = torch.tensor([1.0, 0.4, -0.2], dtype=start.dtype)  # one anion travels 0.6 nm
    steps = 300
    length = 0.6 / float(direction.norm())
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=start.dtype).reshape(-1, 1, 1)
    path = start + direction * length * fractions  # every point of the path as one batch
    energy, force = model.energy_and_forces(path, box[:1].expand(steps + 1, 3, 3), bead_type, molecules)
    projected = (force * direction).sum(dim=(1, 2)) * length / steps
    work = float((0.5 * (projected[1:] + projected[:-1])).sum())
    assert float(energy[-1] - energy[0]) == pytest.approx(-work, abs=2e-3 * (1 + abs(work)))
    assert float((energy[1:] - energy[:-1]).abs().max()) < 0.05 * float(energy.max() - energy.min())


@pytest.mark.parametrize("triclinic", [False, True])
def test_dense_and_cell_searches_find_the_same_pairs(triclinic):
    cg = ionic_liquid(n_pairs=40, box_nm=2.9, frames=2, seed=8, jitter_nm=0.08, triclinic=triclinic)
    positions, box, _, molecules = tensors(cg, dtype=torch.float32)
    dense = torch.jit.script(DenseNeighborSearch(0.8, 64.0))
    from openmm_cgnn.model.neighbors import cell_grid_for_box

    grid = cell_grid_for_box(box, 0.8)
    assert min(grid) >= 3
    cell = torch.jit.script(CellNeighborSearch(0.8, 64.0, grid))
    found = []
    for search in (dense, cell):
        index_i, index_j, valid, count, flags = search(positions, box, molecules)
        assert not bool(flags.any())
        found.append([sorted((min(i, j), max(i, j)) for i, j in zip(index_i[b][valid[b]].tolist(),
                                                                     index_j[b][valid[b]].tolist()))
                      for b in range(len(positions))])
    assert found[0] == found[1] and len(found[0][0]) > 100
    # Brute force check of one frame.
    delta = positions[0, None, :, :] - positions[0, :, None, :]
    delta -= torch.round(delta[..., 2:3] / box[0, 2, 2]) * box[0, 2]
    delta -= torch.round(delta[..., 1:2] / box[0, 1, 1]) * box[0, 1]
    delta -= torch.round(delta[..., 0:1] / box[0, 0, 0]) * box[0, 0]
    close = (delta.norm(dim=-1) < 0.8) & (molecules[:, None] != molecules[None, :])
    expected = [(i, j) for i, j in torch.nonzero(close).tolist() if i < j]
    assert found[0][0] == expected


def test_dense_and_cell_models_give_identical_energies():
    cg = ionic_liquid(n_pairs=40, box_nm=2.9, frames=2, seed=9, jitter_nm=0.05)
    prior = fit_priors(cg)
    dense = make_model(prior=prior, seed=3)
    cell = make_model(prior=prior, seed=3, neighbor_backend="cell")
    positions, box, bead_type, molecules = tensors(cg)
    e_dense, f_dense = dense.energy_and_forces(positions, box, bead_type, molecules)
    e_cell, f_cell = cell.energy_and_forces(positions, box, bead_type, molecules)
    torch.testing.assert_close(e_cell, e_dense)
    torch.testing.assert_close(f_cell, f_dense)


def test_pair_capacity_overflow_is_detected(liquid):
    model = make_model(max_pairs_per_bead=2.0)
    positions, box, bead_type, molecules = tensors(liquid)
    with pytest.raises(RuntimeError, match="exceed the pair capacity"):
        model(positions, box, bead_type, molecules)
    # the exported modules never raise on bad data: NaN, and diagnose() names the cause
    for host_checks in (True, False):
        scripted = script_for_system(model, bead_type, molecules, host_checks=host_checks)
        assert math.isnan(float(scripted(positions[0], box[0])))
        assert "exceed the pair capacity" in diagnose(scripted, positions[0], box[0]).message()


def test_cell_overflow_is_detected():
    cg = ionic_liquid(n_pairs=40, box_nm=2.9, frames=1, seed=9)
    positions, box, _, molecules = tensors(cg, dtype=torch.float32)
    search = CellNeighborSearch(0.8, 64.0, [3, 3, 3], capacity_factor=0.1)
    flags = search(positions, box, molecules)[4]
    assert int(flags[0]) & 4
    with pytest.raises(ValueError, match="at least 3 cells"):
        CellNeighborSearch(0.8, 64.0, [2, 3, 3])


def test_bad_inputs_get_clear_errors(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    model = model_with_prior
    bad = positions.clone()
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="positions contain NaN"):
        model(bad, box, bead_type, molecules)
    with pytest.raises(ValueError, match="smaller than twice the model cutoff"):
        model(positions * 0.7, box * 0.7, bead_type, molecules)
    skewed = box.clone()
    skewed[:, 0, 1] = 0.1
    with pytest.raises(ValueError, match="reduced"):
        model(positions, skewed, bead_type, molecules)
    with pytest.raises(ValueError, match="positions must have shape"):
        model(positions[:, :-1], box, bead_type, molecules)
    with pytest.raises(ValueError, match="bead_type has"):
        model(positions, box, bead_type[:-1], molecules)
    with pytest.raises(ValueError, match="bead_type values"):
        model(positions, box, bead_type + 4, molecules)
    with pytest.raises(ValueError, match="mixes beads of residues"):
        model(positions, box, bead_type, torch.zeros_like(molecules))
    with pytest.raises(ValueError, match="terms must be"):
        model(positions, box, bead_type, molecules, terms="everything")
    scripted = script_for_system(model, bead_type, molecules)
    assert math.isnan(float(scripted(bad[0], box[0])))
    assert "NaN" in diagnose(scripted, bad[0], box[0]).message()
    assert math.isnan(float(scripted(positions[0] * 0.7, box[0] * 0.7)))
    assert "twice the cutoff" in diagnose(scripted, positions[0] * 0.7, box[0] * 0.7).message()
    # a wrong shape is a wrong set-up, not bad data: it still raises
    with pytest.raises(SCRIPT_ERRORS, match="positions must have shape"):
        scripted(positions[0, :-1], box[0])


def test_temperature_input_changes_energy_and_is_settable(liquid):
    model = make_model(use_temperature=True)
    with torch.no_grad():
        model.net.temperature_shift.weight.normal_()
    positions, box, bead_type, molecules = tensors(liquid)
    with pytest.raises(ValueError, match="takes 1/T"):
        model(positions, box, bead_type, molecules)
    cold = model(positions, box, bead_type, molecules, torch.full((3,), 1 / 300.0, dtype=torch.float64))
    hot = model(positions, box, bead_type, molecules, torch.full((3,), 1 / 450.0, dtype=torch.float64))
    assert not torch.allclose(cold, hot)
    model.set_temperature(450.0)
    torch.testing.assert_close(model(positions, box, bead_type, molecules), hot)
    with pytest.raises(ValueError, match="temperature_K"):
        script_for_system(model, bead_type, molecules)
    scripted = script_for_system(model, bead_type, molecules, temperature_K=300.0)
    assert float(scripted(positions[0], box[0])) == pytest.approx(float(cold[0]), rel=1e-10)
    scripted.set_temperature(450.0)
    assert float(scripted(positions[0], box[0])) == pytest.approx(float(hot[0]), rel=1e-10)
    with_parameter = script_for_system(model, bead_type, molecules, temperature_parameter=True)
    value = with_parameter(positions[0], box[0], torch.tensor([450.0], dtype=torch.float64))
    assert float(value) == pytest.approx(float(hot[0]), rel=1e-10)


def test_network_only_and_prior_only_terms_add_up(liquid, model_with_prior):
    positions, box, bead_type, molecules = tensors(liquid)
    total = model_with_prior(positions, box, bead_type, molecules)
    network = model_with_prior(positions, box, bead_type, molecules, terms="network")
    prior = model_with_prior(positions, box, bead_type, molecules, terms="prior")
    torch.testing.assert_close(network + prior, total)
    standalone = model_with_prior.prior.energy(positions, box, bead_type, molecules)
    torch.testing.assert_close(standalone, prior)


def test_force_matching_gradients_reach_every_parameter(liquid):
    torch.manual_seed(4)
    prior = fit_priors(liquid)
    config = HybridGraphConfig.quick(4, bead_type_names=list(BEAD_TYPE_NAMES), max_pairs_per_bead=32.0,
                                     use_temperature=True)
    model = CGModel(config, prior)
    positions, box, bead_type, molecules = tensors(liquid, dtype=torch.float32)
    target = torch.randn_like(positions) * 50.0
    inverse_temperature = 1.0 / torch.tensor([300.0, 350.0, 400.0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, forces = model.energy_and_forces(positions, box, bead_type, molecules, inverse_temperature,
                                            create_graph=True)
        loss = ((forces - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            silent = [name for name, p in model.named_parameters()
                      if p.requires_grad and (p.grad is None or float(p.grad.abs().max()) == 0.0)
                      and not name.endswith("embedding.weight")]
            # The last bias of the readout only shifts the energy, so it gets no force gradient.
            assert silent == ["energy.net.readout.2.bias"], silent
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
