"""The CGAE learns known groupings from real frames files, independently of atom order, and its force term acts."""

from __future__ import annotations

import numpy as np
import pytest
from mapping_toys import dimer, rectangle, trimer, write_toy_run

from openmm_cgnn.frames import read_frames
from openmm_cgnn.mapping import load_cg_frames
from openmm_cgnn.mapping.cgae import DEFAULT_RHO, CGAEConfig, LossScales, evaluate_assignment, train_cgae
from openmm_cgnn.mapping.learn import learn_mapping

FAST = dict(epochs=60, restarts=2)


def partition(mapping, residue):
    return {frozenset(bead.atoms) for bead in mapping.residues[residue].beads}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    # Atoms are wrapped into a 2 nm box one by one, so molecules must be made whole before learning.
    return write_toy_run(tmp_path_factory.mktemp("toy"), [(trimer(), 6), (dimer(), 6)], n_frames=30, seed=1)


@pytest.fixture(scope="module")
def learned(toy_run):
    return learn_mapping([read_frames(toy_run, require_forces=True)], {"TRI": 3, "DIM": 2}, seed=0, **FAST)


def test_known_clusters_are_recovered(learned, toy_run):
    mapping, report = learned
    assert partition(mapping, "TRI") == {
        frozenset({"A1", "A2", "A3", "HA"}), frozenset({"B1", "B2", "B3"}), frozenset({"C1", "C2", "C3", "HC"})
    }
    assert partition(mapping, "DIM") == {frozenset({"X1", "X2"}), frozenset({"Y1", "Y2"})}
    assert list(mapping.residues) == ["TRI", "DIM"]  # order of first appearance in the data
    assert mapping.residues["TRI"].beads[0].atoms[0] == "A1"  # beads numbered by their first atom
    assert sorted(map(tuple, mapping.residues["TRI"].bead_bonds)) == [(0, 1), (1, 2)]
    tri = report["residues"]["TRI"]
    assert tri["n_samples"] == 6 * 30 and len(tri["restarts"]) == 2
    # The clusters are rigid: a 3-bead map explains most of the atomic spread, a poor one does not.
    assert tri["final"]["rec"] < 0.2
    # The learned map plugs into apply_mapping: bead COMs sit at the cluster centres.
    cg = load_cg_frames(toy_run, mapping)
    assert cg.positions.shape == (30, 6 * 3 + 6 * 2, 3) and np.isfinite(cg.positions).all()
    bead_bond = np.linalg.norm(cg.positions[:, 1] - cg.positions[:, 0], axis=-1)
    assert np.allclose(bead_bond, 0.45, atol=0.1)


def test_same_seed_same_result_other_seed_other_run(toy_run, learned):
    frames = read_frames(toy_run, require_forces=True)
    again = learn_mapping([frames], {"TRI": 3, "DIM": 2}, seed=0, **FAST)
    assert again[0].to_dict() == learned[0].to_dict()
    history = learned[1]["residues"]["TRI"]["restarts"][0]["history"]
    assert again[1]["residues"]["TRI"]["restarts"][0]["history"] == history
    other = learn_mapping([frames], {"TRI": 3, "DIM": 2}, seed=7, **FAST)
    assert other[1]["residues"]["TRI"]["restarts"][0]["history"]["loss"] != history["loss"]
    assert other[1]["residues"]["TRI"]["chosen_seed"] in (7, 8)


def test_permuting_atoms_permutes_the_mapping_and_nothing_else(tmp_path, learned):
    order_tri = [7, 10, 2, 0, 9, 5, 3, 8, 1, 6, 4]
    order_dim = [3, 1, 0, 2]
    run = write_toy_run(tmp_path, [(trimer(), 6), (dimer(), 6)], n_frames=30, seed=1,
                        atom_order={"TRI": order_tri, "DIM": order_dim})
    mapping, report = learn_mapping([read_frames(run, require_forces=True)], {"TRI": 3, "DIM": 2}, seed=0, **FAST)
    base_mapping, base_report = learned
    for name, order in (("TRI", order_tri), ("DIM", order_dim)):
        assert mapping.residues[name].atoms == [base_mapping.residues[name].atoms[i] for i in order]
        assert partition(mapping, name) == partition(base_mapping, name)
        masses = sorted(b.mass for b in mapping.residues[name].beads)
        assert masses == pytest.approx(sorted(b.mass for b in base_mapping.residues[name].beads))
        for key in ("loss", "rec", "inst"):
            assert report["residues"][name]["final"][key] == pytest.approx(base_report["residues"][name]["final"][key], rel=1e-4)


def test_force_term_changes_the_learned_map(tmp_path):
    # Geometry alone groups the close pairs P+S and Q+R; strong opposite forces on P-Q and S-R
    # cancel only in beads P+Q and S+R. With rho = 0 forces are ignored; with the default rho they win.
    run = write_toy_run(tmp_path, [(rectangle(), 6)], n_frames=40, seed=3)
    frames = read_frames(run, require_forces=True)
    geometric = learn_mapping([frames], {"SQR": 2}, rho=0.0, epochs=60, restarts=3)
    forced = learn_mapping([frames], {"SQR": 2}, rho=DEFAULT_RHO, epochs=60, restarts=3)
    assert partition(geometric[0], "SQR") == {frozenset("PS"), frozenset("QR")}
    assert partition(forced[0], "SQR") == {frozenset("PQ"), frozenset("RS")}
    assert forced[1]["residues"]["SQR"]["final"]["inst"] < 0.1 < geometric[1]["residues"]["SQR"]["final"]["inst"]


def test_force_term_is_active_during_training():
    # Same data and seed: only rho differs, so any change in the trajectory is the force term's.
    rng = np.random.default_rng(0)
    positions = rng.normal(scale=0.2, size=(64, 5, 3)).astype(np.float32)
    forces = rng.normal(scale=400.0, size=(64, 5, 3)).astype(np.float32)
    masses = np.full(5, 12.0)
    one_step = dict(n_beads=2, epochs=5, batch_size=64, min_steps_per_epoch=1)
    off = train_cgae(positions, forces, masses, CGAEConfig(rho=0.0, **one_step))
    on = train_cgae(positions, forces, masses, CGAEConfig(rho=1.0, **one_step))
    assert off.history["rec"][0] == pytest.approx(on.history["rec"][0])  # same start, same first batch
    assert not np.allclose(off.probabilities, on.probabilities)
    assert on.history["loss"][-1] == pytest.approx(on.history["rec"][-1] + on.history["inst"][-1], rel=0.05)


def test_normalisation_makes_losses_dimensionless():
    # Scaling lengths or forces by any factor leaves the losses of a map unchanged.
    rng = np.random.default_rng(2)
    positions = rng.normal(scale=0.2, size=(50, 6, 3))
    forces = rng.normal(scale=300.0, size=(50, 6, 3))
    masses = np.array([12.0, 1.0, 14.0, 12.0, 16.0, 1.0])
    assignment = np.array([0, 0, 1, 1, 2, 2])
    base = evaluate_assignment(positions, forces, masses, assignment, rho=1.0)
    scaled = evaluate_assignment(positions * 10.0, forces * 0.01, masses, assignment, rho=1.0)
    assert scaled == pytest.approx(base)
    # Uncorrelated forces give L_inst close to 1: the normaliser is the no-cancellation baseline.
    assert base["inst"] == pytest.approx(1.0, abs=0.15)
    assert LossScales.from_samples(positions, forces, 3).force_sq == pytest.approx(np.mean(np.sum(forces**2, -1)) * 6 / 3)
