"""Tabulated bonded priors: two wells from a bimodal angle, spline in TorchScript = native OpenMM force,
forces = -dU/dx, walls beyond the table, prior.json versions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from openmm_cgnn.model import CGModel, HybridGraphConfig, PriorSet, build_system_tensors, fit_priors
from openmm_cgnn.model.priors import (
    ANGLE_GRID_POINTS,
    TabulatedAnglePrior,
    TabulatedBondPrior,
    natural_spline_second_derivatives,
)
from openmm_cgnn.testing.cg_models import SyntheticCG
from openmm_cgnn.openmm.prior_forces import prior_forces
from openmm_cgnn.units import kT_kj_mol

TEMPERATURE = 400.0
NAMES = ["TRI:A", "TRI:B", "TRI:C", "ION:X"]


def bimodal_triatomics(frames: int = 150, molecules: int = 27, seed: int = 0) -> SyntheticCG:
    """A-B-C molecules whose A-B-C angle is a mixture of two Gaussians at 105 and 135 degrees, plus ions."""
    rng = np.random.default_rng(seed)
    count = frames * molecules
    wells = rng.random(count) < 0.5
    theta = np.radians(np.where(wells, rng.normal(105.0, 6.0, count), rng.normal(135.0, 6.0, count)))
    r1, r2 = rng.normal(0.30, 0.012, count), rng.normal(0.36, 0.015, count)
    u = rng.normal(size=(count, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = np.cross(u, rng.normal(size=(count, 3)))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    second = np.cos(theta)[:, None] * u + np.sin(theta)[:, None] * w
    per_side, box_nm = 3, 3.6
    sites = (np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * box_nm / per_side
    centre = np.broadcast_to(sites, (frames, molecules, 3)).reshape(count, 3)
    a, c = centre + r1[:, None] * u, centre + r2[:, None] * second
    ion = centre + np.array([0.6, 0.6, 0.6])
    positions = np.stack([a, centre, c, ion], axis=1).reshape(frames, molecules * 4, 3)
    n = 4 * molecules
    return SyntheticCG(
        positions=positions, forces=None, box=np.repeat(np.eye(3)[None] * box_nm, frames, 0),
        time=np.arange(frames, dtype=float), temperature_K=np.full(frames, TEMPERATURE),
        bead_type=np.tile([0, 1, 2, 3], molecules), bead_type_names=NAMES, bead_name=["A", "B", "C", "X"] * molecules,
        molecule_index=np.repeat(np.arange(2 * molecules), [3, 1] * molecules), residue_name=(["TRI"] * 3 + ["ION"]) * molecules,
        masses=np.full(n, 20.0), bonds=np.array([(4 * m + i, 4 * m + i + 1) for m in range(molecules) for i in (0, 1)]),
    )


@pytest.fixture(scope="module")
def tabulated():
    return fit_priors(bimodal_triatomics(), max_frames=10)


def local_minima(energy: np.ndarray) -> np.ndarray:
    return np.flatnonzero((energy[1:-1] < energy[:-2]) & (energy[1:-1] < energy[2:])) + 1


def test_bimodal_angle_gives_two_wells_and_harmonic_one(tabulated):
    assert tabulated.bonded_form == "tabulated"
    (entry,) = tabulated.angles.to_list()
    energy = np.array(entry["table"]["energy_kj_mol"])
    grid = np.degrees(np.linspace(0.0, math.pi, ANGLE_GRID_POINTS))
    minima = grid[local_minima(energy)]
    assert len(minima) == 2, minima
    assert minima[0] == pytest.approx(105.0, abs=4.0) and minima[1] == pytest.approx(135.0, abs=4.0)
    barrier = energy[(grid > minima[0]) & (grid < minima[1])].max() - energy[np.isin(grid, minima)].max()
    assert barrier > 0.5 * kT_kj_mol(TEMPERATURE)
    # Walls: the energy keeps rising away from the sampled range, to both ends of [0, pi].
    assert np.all(np.diff(energy[grid < 80.0]) < 0) and np.all(np.diff(energy[grid > 160.0]) > 0)
    harmonic = fit_priors(bimodal_triatomics(), max_frames=10, bonded_form="harmonic")
    assert harmonic.bonded_form == "harmonic" and "table" not in harmonic.angles.to_list()[0]
    theta0 = math.degrees(harmonic.angles.to_list()[0]["theta0_rad"])
    assert 105.0 < theta0 < 135.0  # one well between the two


def test_natural_spline_matches_scipy():
    from scipy.interpolate import CubicSpline

    x = np.linspace(0.2, 0.5, 12)
    y = np.sin(9 * x) + x**2
    second = natural_spline_second_derivatives(y, x[1] - x[0])
    assert second == pytest.approx(CubicSpline(x, y, bc_type="natural")(x, 2), abs=1e-9)


def configurations(count: int, seed: int) -> np.ndarray:
    """Molecules (A, B, C) with bond lengths from inside the tables to far beyond them, angles all over [0, pi]."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 4, 3))
    for k in range(count):
        r1, r2 = rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.7)
        theta = rng.uniform(0.2, math.pi - 0.05)
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        w = np.cross(u, rng.normal(size=3))
        w /= np.linalg.norm(w)
        centre = np.array([1.0, 1.2, 1.1])
        out[k] = [centre + r1 * u, centre, centre + r2 * (math.cos(theta) * u + math.sin(theta) * w), [2.2, 2.0, 2.1]]
    return out


def test_torchscript_spline_and_native_openmm_force_agree(tabulated):
    import openmm

    bead_type, molecule = np.array([0, 1, 2, 3]), np.array([0, 0, 0, 1])
    system_tensors = build_system_tensors(torch.as_tensor(bead_type), torch.as_tensor(molecule), tabulated,
                                          dtype=torch.float64)
    bonds = torch.jit.script(tabulated.bonds)
    angles = torch.jit.script(tabulated.angles)
    system = openmm.System()
    for _ in range(4):
        system.addParticle(20.0)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * 4.0))
    forces = prior_forces(tabulated, bead_type, molecule, NAMES, force_group=1)
    assert [f.getName() for f in forces if "Bonds" in f.getName() or "Angles" in f.getName()] == \
        ["CGPriorBonds", "CGPriorBonds", "CGPriorAngles"]
    for force in forces:
        system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 4.0
    tables = tabulated.bonds.tables
    outside = 0
    for frame in configurations(40, seed=1):
        positions = torch.tensor(frame[None], requires_grad=True)
        energy = (bonds(positions, box, system_tensors) + angles(positions, box, system_tensors)).sum()
        (gradient,) = torch.autograd.grad(energy, positions)
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True, groups={1})
        reference = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        native = np.array(state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))
        # Excluded volume is off between these far-apart molecules; bonds + angles are the whole group.
        assert float(energy.detach()) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        assert -gradient[0].numpy() == pytest.approx(native, rel=1e-5, abs=1e-4)
        r = np.linalg.norm(frame[0] - frame[1])
        outside += not (tables.x_min[0] <= r <= tables.x_max[0])
    assert outside > 3  # the walls beyond the tables were exercised too


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_nan_or_huge_positions_give_nan_or_finite_energy_never_an_error(tabulated, bad):
    """A blown-up configuration reaches the scripted priors as NaN, inf or huge coordinates: the
    energy is NaN (or the walls' finite value), never an out-of-range table lookup that throws
    inside openmm-torch (seen at 20 fs in the cpu-size time-step search)."""
    bead_type, molecule = np.array([0, 1, 2, 3]), np.array([0, 0, 0, 1])
    system_tensors = build_system_tensors(torch.as_tensor(bead_type), torch.as_tensor(molecule), tabulated,
                                          dtype=torch.float64)
    bonds, angles = torch.jit.script(tabulated.bonds), torch.jit.script(tabulated.angles)
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 4.0
    positions = torch.tensor(next(iter(configurations(1, seed=2)))[None])
    positions[0, 1, 0] = bad  # the shared bead of both bonds and the angle
    energy = bonds(positions, box, system_tensors) + angles(positions, box, system_tensors)
    assert energy.shape == (1,) and (torch.isnan(energy).all() or torch.isfinite(energy).all())
    positions = torch.tensor(next(iter(configurations(1, seed=2)))[None])
    positions[0, 0] = positions[0, 1]  # a zero-length arm: the angle itself is NaN
    assert torch.isnan(angles(positions, box, system_tensors)).all()


def test_forces_are_minus_the_energy_gradient(tabulated):
    bead_type, molecule = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 1])
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 4.0
    frame = torch.tensor(configurations(1, seed=3), dtype=torch.float64)
    positions = frame.clone().requires_grad_(True)
    energy = tabulated.energy(positions, box, bead_type, molecule).sum()
    (gradient,) = torch.autograd.grad(energy, positions)
    step = 1e-6
    for bead in range(3):
        for axis in range(3):
            plus, minus = frame.clone(), frame.clone()
            plus[0, bead, axis] += step
            minus[0, bead, axis] -= step
            numeric = (tabulated.energy(plus, box, bead_type, molecule) - tabulated.energy(minus, box, bead_type, molecule)) / (2 * step)
            assert float(gradient[0, bead, axis]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-5)


def test_prior_json_round_trip_and_old_format(tabulated, tmp_path):
    tabulated.to_json(tmp_path / "prior.json")
    data = json.loads((tmp_path / "prior.json").read_text())
    assert data["format"] == "openmm_cgnn.prior/2" and data["bonded_form"] == "tabulated"
    assert len(data["angles"][0]["table"]["energy_kj_mol"]) == ANGLE_GRID_POINTS
    loaded = PriorSet.from_json(tmp_path / "prior.json")
    assert isinstance(loaded.bonds, TabulatedBondPrior) and isinstance(loaded.angles, TabulatedAnglePrior)
    positions = torch.tensor(configurations(3, seed=5))
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0).expand(3, 3, 3) * 4.0
    args = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(loaded.energy(positions, box, *args), tabulated.energy(positions, box, *args))

    from models.make_models import HERE

    from openmm_cgnn.mapping import CGMapping

    names = CGMapping.load(HERE / "toy_mapping.json").bead_type_names
    old = PriorSet.from_json(HERE / "toy_prior.json", names)  # format openmm_cgnn.prior/1
    assert json.loads((HERE / "toy_prior.json").read_text())["format"] == "openmm_cgnn.prior/1"
    assert old.bonded_form == "harmonic" and old.to_dict()["format"] == "openmm_cgnn.prior/2"

    data["angles"][0]["table"]["max_rad"] = 3.0
    with pytest.raises(ValueError, match=r"prior.json: angles: a table must span \[0, pi\]"):
        PriorSet.from_dict(data, source="prior.json")
    del data["bonds"][0]["table"]
    with pytest.raises(ValueError, match="prior.json: missing field 'table'"):
        PriorSet.from_dict(data, source="prior.json")
    data["bonded_form"] = "splines"
    with pytest.raises(ValueError, match="'bonded_form' must be one of"):
        PriorSet.from_dict(data, source="prior.json")


def test_exported_module_with_tabulated_prior_scripts_and_matches_eager(tabulated):
    from openmm_cgnn.model.export import script_for_system

    cg = bimodal_triatomics(frames=2, molecules=27)
    config = HybridGraphConfig.quick(len(NAMES), bead_type_names=NAMES, features=8, inter_cutoff_nm=0.6)
    torch.manual_seed(0)
    model = CGModel(config, tabulated).double()
    bead_type, molecule = torch.as_tensor(cg.bead_type), torch.as_tensor(cg.molecule_index)
    module = script_for_system(model, bead_type, molecule, include_prior=True)
    positions, box = torch.as_tensor(cg.positions[0]), torch.as_tensor(cg.box[0])
    eager = model(positions[None], box[None], bead_type, molecule)
    assert float(module(positions, box).detach()) == pytest.approx(float(eager[0].detach()), rel=1e-6)
