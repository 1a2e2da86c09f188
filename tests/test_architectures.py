"""Every registered architecture (model/registry.py), one parametrised suite: forward, TorchScript,
forces = -dE/dx, invariances, export and the OpenMM carriers; plus the registry's own contract.

After torchmd-net's tests/test_model.py: each test runs once per registry entry, on tiny models,
so a new architecture is tested by adding its registry line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import openmm
import openmm.app as app
from models.make_models import make_model_dir
from openmm_cgnn.model import (
    ARCHITECTURES,
    CGModel,
    HybridGraphConfig,
    fit_priors,
    load_model,
    save_checkpoint,
    script_for_system,
)
from openmm_cgnn.layout import CHECKPOINT_PT
from openmm_cgnn.model.checkpoint import model_from_checkpoint, read_checkpoint
from openmm_cgnn.testing.cg_models import BEAD_TYPE_NAMES, ionic_liquid, tensors
from openmm_cgnn.openmm.export import export_forcefield
from openmm_cgnn.openmm.force import CGNNForce

NAMES = sorted(ARCHITECTURES)
SIZES = dict(features=12, filters=12, n_gaussians=8, intra_blocks=1, inter_blocks=1)
TEMPERATURE_K = 350.0


def make_model(architecture: str, dtype: str = "float64", prior=None, seed: int = 0, weight_scale: float = 2.0) -> CGModel:
    """A tiny untrained model taking 1/T, with weights scaled up so every term visibly contributes."""
    torch.manual_seed(seed)
    config = HybridGraphConfig.quick(len(BEAD_TYPE_NAMES), bead_type_names=list(BEAD_TYPE_NAMES), dtype=dtype,
                                     architecture=architecture, use_temperature=True, **SIZES)
    model = CGModel(config, prior)
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.mul_(weight_scale)
    model.set_temperature(TEMPERATURE_K)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def liquid():
    return ionic_liquid(n_pairs=8, box_nm=1.9, frames=2, seed=1)


@pytest.fixture(scope="module", params=NAMES)
def architecture(request):
    return request.param


@pytest.fixture(scope="module")
def model(architecture):
    return make_model(architecture)


def test_registry_builds_each_architecture(architecture, model):
    assert model.config.architecture == architecture
    assert isinstance(model.net, ARCHITECTURES[architecture])


def test_forward(liquid, model):
    """Energies per frame in float64; batched equals frame by frame; forces on every bead (1-bead
    anions are moved by intermolecular pairs alone, cation beads also by intramolecular ones)."""
    positions, box, bead_type, molecules = tensors(liquid)
    energy, forces = model.energy_and_forces(positions, box, bead_type, molecules)
    assert energy.shape == (2,) and energy.dtype == torch.float64 and torch.isfinite(energy).all()
    for frame in range(2):
        single, _ = model.energy_and_forces(positions[frame:frame + 1], box[frame:frame + 1], bead_type, molecules)
        torch.testing.assert_close(single, energy[frame:frame + 1], rtol=1e-12, atol=1e-10)
    assert (forces.abs().sum(-1) > 0).all()
    # the 1/T input changes the energy
    hotter = model(positions, box, bead_type, molecules, torch.full((2,), 1 / 500.0, dtype=torch.float64))
    assert not torch.allclose(hotter, energy)


def test_scripted_energy_equals_eager(liquid, model):
    positions, box, bead_type, molecules = tensors(liquid)
    system = model.system_tensors(bead_type, molecules)
    feature = model.temperature_feature(None, 2, positions.device)
    scripted = torch.jit.script(model.energy)
    expected, _, _ = model.energy(positions, box, system, feature, True, False)
    got, flags, _ = scripted(positions, box, system, feature, True, False)
    assert (flags == 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("host_checks", [True, False], ids=["host-reading", "graph-safe"])
def test_system_modules_equal_eager(liquid, architecture, host_checks):
    prior = fit_priors(liquid)
    model = make_model(architecture, prior=prior)
    positions, box, bead_type, molecules = tensors(liquid)
    energy, forces = model.energy_and_forces(positions[:1], box[:1], bead_type, molecules)
    module = script_for_system(model, liquid.bead_type, liquid.molecule_index, TEMPERATURE_K, box=liquid.box[0],
                               host_checks=host_checks)
    x = positions[0].clone().requires_grad_(True)
    e = module(x, box[0])
    (gradient,) = torch.autograd.grad(e, x)
    assert float(e.detach()) == pytest.approx(float(energy[0]), rel=1e-10)
    torch.testing.assert_close(-gradient, forces[0], rtol=1e-9, atol=1e-9)


def test_forces_are_minus_finite_difference_gradient(liquid, model):
    positions, box, bead_type, molecules = tensors(liquid)
    positions, box = positions[:1], box[:1]
    _, forces = model.energy_and_forces(positions, box, bead_type, molecules)
    step = 1e-5
    for bead in (0, 1, 3, 10):  # cation beads and an anion
        for axis in range(3):
            plus, minus = positions.clone(), positions.clone()
            plus[0, bead, axis] += step
            minus[0, bead, axis] -= step
            numeric = -(model(plus, box, bead_type, molecules) - model(minus, box, bead_type, molecules)) / (2 * step)
            assert float(forces[0, bead, axis]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-6)


def _random_rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return torch.tensor(q)


def test_rotation_translation_permutation_invariance(liquid, model):
    """A cluster in a box more than twice its size (no periodic image within the cutoffs): energies
    invariant and forces equivariant under a rotation about its centre; any translation under
    periodic wrapping; any relabelling of the beads."""
    positions, _, bead_type, molecules = tensors(liquid)
    positions = positions[:1]
    box = torch.eye(3, dtype=torch.float64).unsqueeze(0) * 6.0
    centre = positions.mean(1, keepdim=True)
    energy, forces = model.energy_and_forces(positions, box, bead_type, molecules)

    rotation = _random_rotation(7)
    rotated = (positions - centre) @ rotation.T + centre
    e_rot, f_rot = model.energy_and_forces(rotated, box, bead_type, molecules)
    torch.testing.assert_close(e_rot, energy, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(f_rot, forces @ rotation.T, rtol=1e-8, atol=1e-8)

    shifted = torch.remainder(positions + torch.tensor([1.37, -2.21, 4.9], dtype=torch.float64), 6.0)
    e_shift, f_shift = model.energy_and_forces(shifted, box, bead_type, molecules)
    torch.testing.assert_close(e_shift, energy, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(f_shift, forces, rtol=1e-8, atol=1e-8)

    order = torch.as_tensor(np.random.default_rng(3).permutation(positions.shape[1]))
    e_perm, f_perm = model.energy_and_forces(positions[:, order], box, bead_type[order], molecules[order])
    torch.testing.assert_close(e_perm, energy, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(f_perm, forces[:, order], rtol=1e-8, atol=1e-8)


def test_force_matching_steps_lower_the_loss(liquid, architecture):
    """Training differentiates the forces again (create_graph): a few Adam steps on another model's
    forces lower the force error."""
    positions, box, bead_type, molecules = tensors(liquid)
    _, target = make_model(architecture, seed=5, weight_scale=1.0).energy_and_forces(positions, box, bead_type, molecules)
    model = make_model(architecture, weight_scale=1.0).requires_grad_(True)
    model.net.temperature_shift.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in model.net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        _, forces = model.energy_and_forces(positions, box, bead_type, molecules, create_graph=True)
        loss = (forces - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def model_dir(architecture, tmp_path_factory):
    """A model directory with the toy prior (tests/models), float64 so carriers agree exactly."""
    return make_model_dir(tmp_path_factory.mktemp(f"model-{architecture}"), use_temperature=True, dtype="float64",
                          architecture=architecture)


def _context_energy_forces(system, positions, platform: str = "Reference"):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole),
            np.asarray(state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)))


def _eager(model_dir, cg):
    model = load_model(model_dir)
    model.set_temperature(TEMPERATURE_K)
    energy, forces = model.energy_and_forces(torch.tensor(cg.positions[None]), torch.tensor(cg.box[None]),
                                             torch.as_tensor(cg.bead_type), torch.as_tensor(cg.molecule_index))
    return float(energy[0]), forces[0].numpy()


@pytest.mark.parametrize("engine", ["torch", "python"])
def test_openmm_carriers_equal_eager(cg, model_dir, engine):
    """TorchForce and the PythonForce carrier (its first call is the eager graph-safe module)."""
    force = CGNNForce(model_dir, cg, TEMPERATURE_K, engine=engine)
    system = cg.system()
    force.add_to(system)
    energy, forces = _context_energy_forces(system, cg.positions)
    e_ref, f_ref = _eager(model_dir, cg)
    assert energy == pytest.approx(e_ref, rel=1e-9)
    np.testing.assert_allclose(forces, f_ref, rtol=1e-7, atol=1e-8 * np.abs(f_ref).max())


@pytest.mark.parametrize("prior", ["openmm", "model"])
def test_export_round_trip(cg, model_dir, tmp_path, prior):
    """system.xml (graph-safe TorchForce) reproduces the eager model after a reload, with the prior as
    native forces (the default) or inside the module; model.pt alone does when it carries the prior."""
    out = export_forcefield(model_dir, cg, tmp_path / "ff", temperature=TEMPERATURE_K, prior=prior,
                            log=lambda message: None)
    system = openmm.XmlSerializer.deserialize((out / "system.xml").read_text())
    pdb = app.PDBFile(str(out / "cg.pdb"))
    energy, forces = _context_energy_forces(system, pdb.positions)
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer))
    model = load_model(model_dir)
    model.set_temperature(TEMPERATURE_K)
    e_ref, f_ref = model.energy_and_forces(torch.tensor(positions[None]), torch.tensor(cg.box[None]),
                                           torch.as_tensor(cg.bead_type), torch.as_tensor(cg.molecule_index))
    # cg.pdb holds positions to 1e-4 nm; compared at those positions, so only the carrier's rounding remains
    assert energy == pytest.approx(float(e_ref[0]), rel=1e-8)
    np.testing.assert_allclose(forces, f_ref[0].numpy(), rtol=1e-6, atol=1e-7 * float(f_ref.abs().max()))
    assert json.loads((out / "metadata.json").read_text())["system_xml_module"]["graph_safe"]
    if prior == "model":  # with native prior forces model.pt is the network alone
        module = torch.jit.load(str(out / "model.pt"))
        e = module(torch.tensor(positions, requires_grad=True), torch.tensor(cg.box))
        assert float(e.detach()) == pytest.approx(float(e_ref[0]), rel=1e-9)


def test_checkpoint_round_trip_keeps_architecture(model, tmp_path, liquid):
    save_checkpoint(tmp_path, model, epoch=0)
    assert json.loads((tmp_path / "hparams.json").read_text())["architecture"] == model.config.architecture
    again = load_model(tmp_path)
    assert type(again.net) is type(model.net)
    positions, box, bead_type, molecules = tensors(liquid)
    again.set_temperature(TEMPERATURE_K)
    torch.testing.assert_close(again(positions, box, bead_type, molecules), model(positions, box, bead_type, molecules),
                               rtol=0, atol=0)


# ---- the registry's contract (not per architecture) ------------------------------------------

def test_checkpoint_without_architecture_key_loads_as_hybridgraph(tmp_path, liquid):
    """Checkpoints written before the key existed: hparams without "architecture" are a Hybridgraph,
    with the same energies."""
    model = make_model("hybridgraph", dtype="float32")
    save_checkpoint(tmp_path, model, epoch=0)
    payload = read_checkpoint(tmp_path)
    del payload["hparams"]["architecture"]
    old = model_from_checkpoint(payload).eval()
    assert old.config.architecture == "hybridgraph" and type(old.net).__name__ == "HybridGraphNet"
    positions, box, bead_type, molecules = tensors(liquid)
    old.set_temperature(TEMPERATURE_K)
    torch.testing.assert_close(old(positions, box, bead_type, molecules), model(positions, box, bead_type, molecules),
                               rtol=0, atol=0)


def test_unknown_architecture_is_refused_with_the_file_named(tmp_path):
    model = make_model("hybridgraph")
    save_checkpoint(tmp_path, model, epoch=0)
    payload = read_checkpoint(tmp_path)
    payload["hparams"]["architecture"] = "transformer"
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_PT}: hparams: .*architecture.*hybridgraph"):
        model_from_checkpoint(payload, source=str(tmp_path / CHECKPOINT_PT))
    with pytest.raises(ValueError, match="architecture"):
        HybridGraphConfig.quick(4, architecture="transformer")
    assert HybridGraphConfig.quick(4).architecture == "hybridgraph"  # the default


def test_weights_of_another_architecture_are_refused(tmp_path):
    model = make_model("hybridgraph")
    save_checkpoint(tmp_path, model, epoch=0)
    payload = read_checkpoint(tmp_path)
    payload["hparams"]["architecture"] = next(name for name in NAMES if name != "hybridgraph")
    with pytest.raises(ValueError, match="weights do not match the hyper-parameters"):
        model_from_checkpoint(payload)
