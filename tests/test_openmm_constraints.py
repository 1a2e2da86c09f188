"""Bond constraints (``--constrain-bonds``): the choice from the prior, the System, a run, the export."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm)

import openmm
from models.make_models import PRIOR, TYPES, make_model_dir, write_aa_run
from openmm_cgnn.cli import main as cli_main
from openmm_cgnn.frames import read_frames
from openmm_cgnn.model import PriorSet
from openmm_cgnn.model.priors import TabulatedBondPrior
from openmm_cgnn.openmm.constraints import bond_curvature, choose_bond_constraints
from openmm_cgnn.openmm.export import export_forcefield
from openmm_cgnn.openmm.force import CGNNForce, ModelMismatchError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def energy(system, positions) -> float:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    return context.getState(getEnergy=True).getPotentialEnergy()._value


def system_with(model_dir, cg, mode, prior):
    force = CGNNForce(model_dir, cg, prior=prior, constrain_bonds=mode, engine="torch")
    system = cg.system()
    force.add_to(system)
    return force, system


def test_stiff_means_a_short_vibrational_period(cg):
    """The period is 2 pi sqrt(mu/k) with the beads' reduced mass; only bonds under 100 fs are "stiff"."""
    data = copy.deepcopy(PRIOR)
    data["bonds"][0]["k_kj_mol_nm2"] *= 100.0  # the toy's 444 fs bond becomes a 44 fs one
    prior = PriorSet.from_dict(data, TYPES)
    stiff = choose_bond_constraints(prior, cg.bead_type, cg.molecule_index, cg.masses, "stiff")
    assert [c.entry for c in stiff] == [0]
    residue, (a, b) = data["bonds"][0]["residue"], data["bonds"][0]["beads"]
    first = np.flatnonzero(np.array(cg.residue_names) == residue)[0]
    mu = cg.masses[first + a] * cg.masses[first + b] / (cg.masses[first + a] + cg.masses[first + b])
    assert stiff[0].period_fs == pytest.approx(2e3 * math.pi * math.sqrt(mu / data["bonds"][0]["k_kj_mol_nm2"]))
    assert stiff[0].length_nm == data["bonds"][0]["r0_nm"] and 40 < stiff[0].period_fs < 50
    assert len(choose_bond_constraints(prior, cg.bead_type, cg.molecule_index, cg.masses, "all")) == len(data["bonds"])
    assert choose_bond_constraints(prior, cg.bead_type, cg.molecule_index, cg.masses, "none") == []


def test_tabulated_bond_curvature_is_the_tables():
    """A table of a skewed well: the stiffness is the spline's curvature at its minimum, not the
    softer harmonic fit stored beside it; the length is the entry's r0."""
    r0, k = 0.2731, 80000.0
    grid = np.linspace(0.22, 0.33, 61)
    table = {"min_nm": 0.22, "max_nm": 0.33, "energy_kj_mol": (0.5 * k * (grid - r0) ** 2 + 900 * (grid - r0) ** 3).tolist(),
             "wall_k_kj_mol_nm2": 1e4}
    prior = PriorSet(["A:B0", "A:B1"], bonds=TabulatedBondPrior(["A"], [[0, 1]], [0.27], [10000.0], [table]))
    assert bond_curvature(prior, 0) == pytest.approx(k, rel=0.05)
    [only] = choose_bond_constraints(prior, np.array([0, 1]), np.array([0, 0]), [30.0, 15.0], "all")
    assert only.length_nm == 0.27 and only.curvature_kj_mol_nm2 == pytest.approx(k, rel=0.05)


@pytest.mark.parametrize("prior", ["model", "openmm"])
def test_constrained_bonds_become_constraints_and_lose_their_prior_terms(cg, model_dir, prior):
    """Every molecule's copy of each bond is a constraint at r0, and the energy drops by exactly
    those bonds' harmonic terms, whether the prior runs inside the module or as native forces."""
    _, plain = system_with(model_dir, cg, "none", prior)
    force, constrained = system_with(model_dir, cg, "all", prior)
    assert plain.getNumConstraints() == 0
    lengths = {(b["residue"], *b["beads"]): (b["r0_nm"], b["k_kj_mol_nm2"]) for b in PRIOR["bonds"]}
    expected, bond_energy = {}, 0.0
    for i, j in cg.bonds:
        first = np.flatnonzero(cg.molecule_index == cg.molecule_index[i])[0]
        r0, k = lengths[(cg.residue_names[i], i - first, j - first)]
        expected[(int(i), int(j))] = r0
        bond_energy += 0.5 * k * (np.linalg.norm(cg.positions[i] - cg.positions[j]) - r0) ** 2
    found = {}
    for n in range(constrained.getNumConstraints()):
        i, j, length = constrained.getConstraintParameters(n)
        found[(i, j)] = length._value
    assert found == pytest.approx(expected) and len(found) == len(cg.bonds)
    assert bond_energy > 1.0  # the test positions do stretch the bonds
    assert energy(plain, cg.positions) - energy(constrained, cg.positions) == pytest.approx(bond_energy, rel=1e-6, abs=1e-6)
    assert force.constraint_report()["n_constraints"] == len(cg.bonds)


def test_constrained_run_is_stable_and_keeps_the_lengths(cg, model_dir, tmp_path):
    """simulate --constrain-bonds all: the NVE check and the Langevin run finish, every frame keeps
    the constrained distances, and summary.json records them."""
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=300.0)
    out = tmp_path / "run"
    assert cli_main(["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa), "--temperature", "300",
                     "--steps", "60", "--save-every-steps", "20", "--platform", "Reference", "--quiet",
                     "--dt-candidates-fs", "10", "5", "--constrain-bonds", "all", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["constrain_bonds"] == "all"
    assert summary["n_constraints"] == len(cg.bonds) and len(summary["constrained_bonds"]) == len(PRIOR["bonds"])
    frames = read_frames(out)
    assert frames.n_frames == 4
    lengths = {(b["residue"], *b["beads"]): b["r0_nm"] for b in PRIOR["bonds"]}
    for i, j in cg.bonds:
        first = np.flatnonzero(cg.molecule_index == cg.molecule_index[i])[0]
        r = np.linalg.norm(frames.positions[:, i] - frames.positions[:, j], axis=-1)
        np.testing.assert_allclose(r, lengths[(cg.residue_names[i], i - first, j - first)], rtol=1e-4)


def test_export_carries_the_constraints(cg, model_dir, tmp_path):
    """system.xml holds the constraints; model.pt's metadata brings them back when it is simulated,
    and a model.pt with the prior inside refuses another choice."""
    out = export_forcefield(model_dir, cg, tmp_path / "ff", prior="model", constrain_bonds="all", log=lambda m: None)
    system = openmm.XmlSerializer.deserialize((out / "system.xml").read_text())
    assert system.getNumConstraints() == len(cg.bonds)
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["constrain_bonds"] == "all" and metadata["n_constraints"] == len(cg.bonds)
    again = CGNNForce(out / "model.pt", cg)
    assert again.constrain_bonds == "all" and again.constraint_pairs() == [
        tuple(system.getConstraintParameters(n)[:2]) + (system.getConstraintParameters(n)[2]._value,)
        for n in range(system.getNumConstraints())]
    with pytest.raises(ModelMismatchError, match="constrain-bonds"):
        CGNNForce(out / "model.pt", cg, constrain_bonds="none")
