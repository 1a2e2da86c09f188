"""Priors: Boltzmann-inversion fits, the fitted minimum, excluded volume shape, prior.json I/O."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from openmm_cgnn.model import ExcludedVolumePrior, HarmonicBondPrior, PriorSet, fit_priors
from openmm_cgnn.units import kT_kj_mol
from openmm_cgnn.testing.cg_models import SyntheticCG, ionic_liquid


def harmonic_dimers(r0: float, k: float, temperature: float, molecules: int = 27, frames: int = 400, seed: int = 0):
    """Two-bead molecules whose bond length follows P(r) ~ r^2 exp(-k (r - r0)^2 / 2kT)."""
    rng = np.random.default_rng(seed)
    kT = kT_kj_mol(temperature)
    width = math.sqrt(kT / k)
    count = frames * molecules
    lengths = np.empty(0)
    while len(lengths) < count:  # rejection sampling of the r^2 Jacobian
        trial = rng.normal(r0, width, size=2 * count)
        keep = rng.random(2 * count) < (trial / (r0 + 5 * width)) ** 2
        lengths = np.concatenate([lengths, trial[keep & (trial > 0)]])
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    per_side = 3
    box_nm = 3.0
    sites = (np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * box_nm / per_side
    first = np.broadcast_to(sites, (frames, molecules, 3))
    second = first + (lengths[:count] * directions.T).T.reshape(frames, molecules, 3)
    positions = np.stack([first, second], axis=2).reshape(frames, 2 * molecules, 3)
    names = ["DI:A", "DI:B"]
    n = 2 * molecules
    return SyntheticCG(
        positions=positions.astype(np.float64), forces=None, box=np.repeat(np.eye(3)[None] * box_nm, frames, 0),
        time=np.arange(frames, dtype=float), temperature_K=np.full(frames, temperature),
        bead_type=np.tile([0, 1], molecules), bead_type_names=names, bead_name=["A", "B"] * molecules,
        molecule_index=np.repeat(np.arange(molecules), 2), residue_name=["DI"] * n, masses=np.full(n, 20.0),
        bonds=np.stack([np.arange(0, n, 2), np.arange(1, n, 2)], 1),
    )


def test_boltzmann_inversion_recovers_a_known_bond():
    prior = fit_priors(harmonic_dimers(r0=0.32, k=2500.0, temperature=350.0), angles=False, max_frames=10)
    (bond,) = prior.bonds.to_list()
    assert bond["residue"] == "DI" and bond["beads"] == [0, 1]
    assert bond["r0_nm"] == pytest.approx(0.32, abs=1e-3)
    assert bond["k_kj_mol_nm2"] == pytest.approx(2500.0, rel=0.08)


def test_priors_alone_give_the_fitted_geometry():
    cg = ionic_liquid(n_pairs=8, frames=40, seed=2, jitter_nm=0.015)
    prior = fit_priors(cg, bonded_form="harmonic")
    bonds = {tuple(b["beads"]): b["r0_nm"] for b in prior.bonds.to_list()}
    assert set(bonds) == {(0, 1), (1, 2)}
    for r0 in bonds.values():
        assert r0 == pytest.approx(0.3, abs=0.01)
    (angle,) = prior.angles.to_list()
    assert angle["beads"] == [0, 1, 2]
    # One cation alone in a large box, started far from the fitted geometry, minimised with the priors only.
    bead_type = torch.tensor([0, 1, 2])
    molecule = torch.tensor([0, 0, 0])
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 5.0
    start = np.array([[1.0, 1.0, 1.0], [1.45, 1.1, 1.0], [1.5, 1.3, 1.2]])

    def energy_and_gradient(flat):
        positions = torch.tensor(flat.reshape(1, 3, 3), requires_grad=True)
        energy = prior.energy(positions, box, bead_type, molecule).sum()
        (gradient,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), gradient.numpy().ravel()

    result = minimize(energy_and_gradient, start.ravel(), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    final = result.x.reshape(3, 3)
    assert np.linalg.norm(final[1] - final[0]) == pytest.approx(bonds[(0, 1)], abs=1e-4)
    assert np.linalg.norm(final[2] - final[1]) == pytest.approx(bonds[(1, 2)], abs=1e-4)
    u, v = final[0] - final[1], final[2] - final[1]
    theta = math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    assert theta == pytest.approx(angle["theta0_rad"], abs=1e-3)
    assert result.fun == pytest.approx(0.0, abs=1e-8)


def test_bond_and_angle_conventions_match_openmm():
    import openmm

    prior = PriorSet.from_dict({
        "format": "openmm_cgnn.prior/1", "bead_type_names": ["M:A", "M:B", "M:C"],
        "bonds": [{"residue": "M", "beads": [0, 1], "r0_nm": 0.3, "k_kj_mol_nm2": 1200.0}],
        "angles": [{"residue": "M", "beads": [0, 1, 2], "theta0_rad": 2.0, "k_kj_mol_rad2": 80.0}],
    })
    positions = np.array([[0.0, 0.0, 0.0], [0.35, 0.02, 0.0], [0.45, 0.31, 0.05]])
    system = openmm.System()
    for _ in range(3):
        system.addParticle(10.0)
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 1, 0.3, 1200.0)
    angles = openmm.HarmonicAngleForce()
    angles.addAngle(0, 1, 2, 2.0, 80.0)
    system.addForce(bonds)
    system.addForce(angles)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    expected = context.getState(getEnergy=True).getPotentialEnergy()._value
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 4.0
    ours = prior.energy(torch.tensor(positions).unsqueeze(0), box, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    assert float(ours) == pytest.approx(expected, rel=1e-10)


def test_excluded_volume_is_shifted_force_and_intermolecular_only():
    sigma = torch.tensor([[0.4]], dtype=torch.float64)
    prior = PriorSet(["X:A"], ExcludedVolumePrior(["X:A"], sigma, exponent=12, cutoff_nm=0.8, epsilon_kj_mol=2.0))
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 3.0

    def energy_force(r: float, molecules=(0, 1)):
        positions = torch.tensor([[[1.0, 1.0, 1.0], [1.0 + r, 1.0, 1.0]]], dtype=torch.float64, requires_grad=True)
        energy = prior.energy(positions, box, torch.tensor([0, 0]), torch.tensor(molecules))
        (gradient,) = torch.autograd.grad(energy.sum(), positions, allow_unused=True)
        force = 0.0 if gradient is None else float(-gradient[0, 1, 0])
        return float(energy.detach()), force

    s, rc, p = 0.4, 0.8, 12
    expected = 2.0 * ((s / 0.5) ** p - (s / rc) ** p + p * (s / rc) ** p * (0.5 - rc) / rc)
    assert energy_force(0.5)[0] == pytest.approx(expected, rel=1e-12)
    energy, force = energy_force(rc - 1e-6)
    assert abs(energy) < 1e-9 and abs(force) < 1e-4
    assert energy_force(rc + 1e-3) == (0.0, 0.0)
    assert energy_force(0.3, molecules=(0, 0))[0] == 0.0  # same molecule: no excluded volume
    assert energy_force(0.35)[1] > 0  # repulsive


def test_fitted_sigma_follows_closest_approach():
    cg = ionic_liquid(n_pairs=8, frames=10, seed=5)
    prior = fit_priors(cg, sigma_percentile=0.0)
    names = cg.bead_type_names
    sigma = prior.to_dict()["excluded_volume"]["sigma_nm"]
    positions = torch.as_tensor(cg.positions, dtype=torch.float64)
    anions = np.flatnonzero(cg.bead_type == 3)
    delta = positions[:, anions, None, :] - positions[:, None, anions, :]
    delta -= torch.round(delta / 1.9) * 1.9
    distance = delta.norm(dim=-1)
    distance[:, torch.arange(len(anions)), torch.arange(len(anions))] = 10.0
    closest = float(distance[distance < 0.8].min())
    assert sigma[f"{names[3]}|{names[3]}"] == pytest.approx(closest, abs=1e-5)
    assert prior.to_dict()["excluded_volume"]["epsilon_kj_mol"] == pytest.approx(kT_kj_mol(300.0))


def test_prior_json_round_trip_and_errors(tmp_path):
    prior = fit_priors(ionic_liquid(frames=4))
    path = tmp_path / "prior.json"
    prior.to_json(path)
    loaded = PriorSet.from_json(path)
    assert loaded.to_dict() == json.loads(path.read_text()) == prior.to_dict()
    data = json.loads(path.read_text())

    def fails(change, match):
        broken = json.loads(json.dumps(data))
        change(broken)
        with pytest.raises(ValueError, match=match):
            PriorSet.from_dict(broken, source="prior.json")

    fails(lambda d: d.update(format="other"), "format")
    fails(lambda d: d["excluded_volume"]["sigma_nm"].update({"CAT:B0|NOPE:B0": 0.3}), "sigma_nm: key")
    fails(lambda d: d["bonds"][0].update(beads=[0, 7]), "out of range")
    fails(lambda d: d["bonds"][0].pop("r0_nm"), "missing field 'r0_nm'")
    fails(lambda d: d["angles"][0].update(residue="XYZ"), "residue 'XYZ'")
    fails(lambda d: d["excluded_volume"]["sigma_nm"].update({"AN:B0|AN:B0": 0.9}), "below the cutoff")
    with pytest.raises(ValueError, match="differ from the model"):
        PriorSet.from_dict(data, bead_type_names=["A:B"])
    with pytest.raises(FileNotFoundError, match="prior file not found"):
        PriorSet.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PriorSet.from_json(tmp_path / "bad.json")


def test_fit_priors_rejects_bad_data():
    cg = ionic_liquid(frames=2)
    cg.positions = cg.positions.copy()
    cg.positions[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_priors(cg)
    cg = ionic_liquid(frames=2)
    cg.bonds = np.array([[0, 3]])
    with pytest.raises(ValueError, match="joins different molecules"):
        fit_priors(cg)
    cg = ionic_liquid(frames=2)
    cg.box = cg.box * 0.7
    with pytest.raises(ValueError, match="twice the cutoff"):
        fit_priors(cg)
    with pytest.raises(ValueError, match="bonds: bad entry"):
        HarmonicBondPrior(["CAT"], [[0, 0]], [0.3], [100.0])
