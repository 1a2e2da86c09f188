"""CGNNForce in real OpenMM contexts: energies and forces against the eager models, priors both ways, checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import openmm
from models.make_models import (
    HERE as MODELS,
    MAPPING,
    PRIOR,
    TYPES,
    make_model_dir,
    save_model,
    scripted_model,
    toy_cg_system,
)
from openmm_cgnn.mapping.spec import CGMapping
from openmm_cgnn.openmm.engines import ENGINES, PythonForceEngine
from openmm_cgnn.openmm.force import CGNNForce, ModelMismatchError
from openmm_cgnn.openmm.prior_forces import prior_forces
from openmm_cgnn.openmm.topology import CGConfiguration
from openmm_cgnn.model import PriorSet, load_model

PLATFORMS = ["Reference", "CPU"]


def energy_forces(system, positions, platform, groups=-1):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return state.getPotentialEnergy()._value, np.asarray(state.getForces(asNumpy=True)._value)


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """Real CGModel, float64 (exact comparisons), 1/T input."""
    return make_model_dir(tmp_path_factory.mktemp("model64"), use_temperature=True, dtype="float64")


def test_committed_toy_models_are_current(cg, tmp_path):
    """tests/models/*.pt come from make_models.py; a regenerated one must give the same energy."""
    pos, box = torch.tensor(cg.positions), torch.tensor(cg.box)
    for name, with_prior in (("pair_model.pt", False), ("pair_model_with_prior.pt", True)):
        committed = torch.jit.load(str(MODELS / name))
        fresh = save_model(cg, with_prior, tmp_path / name)
        assert float(committed(pos, box)) == pytest.approx(float(torch.jit.load(str(fresh))(pos, box)), rel=1e-12)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_toy_model_in_openmm_equals_eager(cg, platform):
    force = CGNNForce(MODELS / "pair_model_with_prior.pt", cg)
    assert force.prior_carrier == "model"
    system = cg.system()
    force.add_to(system)
    energy, forces = energy_forces(system, cg.positions, platform)
    module = scripted_model(cg, include_prior=True)
    positions = torch.tensor(cg.positions, requires_grad=True)
    reference = module(positions, torch.tensor(cg.box))
    reference.backward()
    assert energy == pytest.approx(reference.item(), rel=1e-10)
    np.testing.assert_allclose(forces, -positions.grad.numpy(), rtol=1e-8, atol=1e-8)
    # openmm-torch hands float32 positions to single/mixed precision platforms: the module takes both
    e32 = module(positions.detach().float(), torch.tensor(cg.box).float())
    assert e32.dtype == torch.float32 and e32.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_native_prior_forces_equal_torch_prior(cg, toy_dir, platform):
    """Two independent implementations of the contract's prior: OpenMM forces vs the torch module."""
    native = CGNNForce(toy_dir / "model.pt", cg)
    inside = CGNNForce(MODELS / "pair_model_with_prior.pt", cg)
    assert native.prior_carrier == "openmm"
    results = []
    for force in (native, inside):
        system = cg.system()
        force.add_to(system)
        results.append(energy_forces(system, cg.positions, platform))
    (e_native, f_native), (e_inside, f_inside) = results
    rtol = 1e-9 if platform == "Reference" else 1e-5  # the CPU platform's nonbonded kernels are single precision
    assert e_native == pytest.approx(e_inside, rel=rtol)
    np.testing.assert_allclose(f_native, f_inside, rtol=rtol * 10, atol=rtol * np.abs(f_inside).max())
    assert abs(e_native) > 100  # the prior is really active in this configuration


def test_native_prior_forces_equal_model_priorset(cg):
    """Native prior forces against the model's own PriorSet evaluator, with a sigma that switches a pair off."""
    prior = PriorSet.from_dict(PRIOR, TYPES)
    system = cg.system()
    for f in prior_forces(prior, cg.bead_type, cg.molecule_index, cg.bead_type_names):
        system.addForce(f)
    energy, forces = energy_forces(system, cg.positions, "Reference")
    positions = torch.tensor(cg.positions[None], requires_grad=True)
    reference = prior.energy(positions, torch.tensor(cg.box[None]), torch.tensor(cg.bead_type), torch.tensor(cg.molecule_index))
    reference.sum().backward()
    assert energy == pytest.approx(reference.item(), rel=1e-9)
    np.testing.assert_allclose(forces, -positions.grad[0].numpy(), rtol=1e-6, atol=1e-6 * np.abs(forces).max())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("carrier", ["openmm", "model"])
def test_real_model_in_openmm_equals_eager(cg, model64, carrier, engine):
    """Both engines (TorchForce; PythonForce, whose first call is eager) give the eager model's numbers."""
    model = load_model(model64)
    force = CGNNForce.from_model_dir(model64, cg, temperature=350.0, prior=carrier, engine=engine)
    assert force.prior_carrier == carrier
    system = cg.system()
    force.add_to(system)
    assert force.engine.name == engine and system.getForce(force.force_index) is not None
    args = (torch.tensor(cg.bead_type), torch.tensor(cg.molecule_index), torch.tensor([1 / 350.0], dtype=torch.float64))
    e_ref, f_ref = model.energy_and_forces(torch.tensor(cg.positions[None]), torch.tensor(cg.box[None]), *args)
    for platform in PLATFORMS:
        energy, forces = energy_forces(system, cg.positions, platform)
        rtol = 1e-9 if platform == "Reference" or carrier == "model" else 1e-5
        assert energy == pytest.approx(float(e_ref[0]), rel=rtol)
        np.testing.assert_allclose(forces, f_ref[0].numpy(), rtol=rtol * 10, atol=rtol * float(f_ref.abs().max()))
    # the network alone (force group 0) against the eager network terms
    e_net, f_net = model.energy_and_forces(torch.tensor(cg.positions[None]), torch.tensor(cg.box[None]), *args, terms="network")
    if carrier == "openmm":
        energy, forces = energy_forces(system, cg.positions, "Reference", groups={0})
        assert energy == pytest.approx(float(e_net[0]), rel=1e-9)
        np.testing.assert_allclose(forces, f_net[0].numpy(), rtol=1e-8, atol=1e-8 * float(f_net.abs().max()))


def test_float32_model_agrees_within_single_precision(cg, tmp_path):
    folder = make_model_dir(tmp_path / "m32", use_temperature=False)
    model = load_model(folder).double()  # the float64 evaluation of the same weights
    force = CGNNForce(folder, cg, prior="model")
    system = cg.system()
    force.add_to(system)
    energy, forces = energy_forces(system, cg.positions, "Reference")
    e_ref, f_ref = model.energy_and_forces(torch.tensor(cg.positions[None]), torch.tensor(cg.box[None]),
                                           torch.tensor(cg.bead_type), torch.tensor(cg.molecule_index))
    assert energy == pytest.approx(float(e_ref[0]), rel=1e-5)
    np.testing.assert_allclose(forces, f_ref[0].numpy(), atol=1e-5 * float(f_ref.abs().max()))


def test_temperature_input_comes_from_the_simulation(cg, model64):
    energies = {}
    for temperature in (300.0, 450.0):
        system = cg.system()
        CGNNForce(model64, cg, temperature, prior="openmm").add_to(system)
        energies[temperature] = energy_forces(system, cg.positions, "Reference", groups={0})[0]
        model = load_model(model64)
        expected = model(torch.tensor(cg.positions[None]), torch.tensor(cg.box[None]), torch.tensor(cg.bead_type),
                         torch.tensor(cg.molecule_index), torch.tensor([1 / temperature], dtype=torch.float64), terms="network")
        assert energies[temperature] == pytest.approx(expected[0].item(), rel=1e-9)
    assert energies[300.0] != pytest.approx(energies[450.0], rel=1e-6)
    with pytest.raises(ModelMismatchError, match="temperature"):
        CGNNForce(model64, cg)


def test_topology_without_cg_system_and_save_model(cg, model64, tmp_path):
    """An openmm.app.Topology is enough; the saved model.pt reloads with the same energy."""
    force = CGNNForce(model64, cg.topology(), 350.0, prior="openmm")
    system = cg.system()
    force.add_to(system)
    path = force.save_model(tmp_path / "model.pt")
    shutil.copy(model64 / "prior.json", tmp_path / "prior.json")
    again = CGNNForce(path, cg.topology(), 350.0)
    assert again.prior_carrier == "openmm"
    system2 = cg.system()
    again.add_to(system2)
    assert energy_forces(system2, cg.positions, "Reference")[0] == pytest.approx(energy_forces(system, cg.positions, "Reference")[0], rel=1e-12)


# -- mismatches -----------------------------------------------------------------------------------


def test_rejects_wrong_bead_count(toy_dir):
    small = toy_cg_system(n_pairs=4)
    with pytest.raises(ModelMismatchError, match="32 beads, the topology has 16"):
        CGNNForce(toy_dir / "model.pt", small)


def test_rejects_wrong_bead_order(cg, toy_dir):
    mapping = CGMapping.from_dict(MAPPING)
    anions_first = CGConfiguration.from_molecules(mapping, ["ANI"] * 8 + ["CAT"] * 8, cg.positions, cg.box)
    with pytest.raises(ModelMismatchError, match="bead 0 is 'X' in the topology but 'A' in the model"):
        CGNNForce(toy_dir / "model.pt", anions_first)


def test_rejects_wrong_masses_and_small_box(cg, toy_dir):
    force = CGNNForce(toy_dir / "model.pt", cg)
    system = cg.system()
    system.setParticleMass(5, 99.0)
    with pytest.raises(ModelMismatchError, match="particle 5 has mass 99"):
        force.add_to(system)
    system = cg.system()
    system.setDefaultPeriodicBoxVectors(openmm.Vec3(1.5, 0, 0), openmm.Vec3(0, 1.5, 0), openmm.Vec3(0, 0, 1.5))
    with pytest.raises(ModelMismatchError, match="less than twice the model cutoff"):
        force.add_to(system)
    assert system.getNumForces() == 0  # refused before anything was added


def test_rejects_model_pt_at_another_temperature_and_missing_prior(cg, model64, tmp_path):
    path = CGNNForce(model64, cg, 350.0, prior="model").save_model(tmp_path / "model.pt")
    assert json.loads(json.dumps(CGNNForce(path, cg, 350.0).metadata))["temperature_K"] == 350.0
    with pytest.raises(ModelMismatchError, match="scripted for 350.0 K but the simulation runs at 400.0 K"):
        CGNNForce(path, cg, 400.0)
    bare = CGNNForce(model64, cg, 350.0, prior="openmm").save_model(tmp_path / "bare" / "model.pt")
    with pytest.raises(ModelMismatchError, match="no prior.json beside it"):
        CGNNForce(bare, cg, 350.0)
    with pytest.raises(ModelMismatchError, match="no model directory or model.pt"):
        CGNNForce(tmp_path / "nothing", cg, 350.0)


def test_rejects_other_mapping(cg, model64):
    other = json.loads(json.dumps(MAPPING))
    other["residues"]["CAT"]["beads"][0]["mass"] = 31.0
    moved = CGConfiguration.from_molecules(CGMapping.from_dict(other), ["CAT"] * 8 + ["ANI"] * 8, cg.positions, cg.box)
    with pytest.raises(ModelMismatchError, match="mapping.json differs"):
        CGNNForce(model64, moved, 350.0)


def test_metadata_contract_keys(cg, model64, tmp_path):
    from openmm_cgnn.model import read_metadata

    path = CGNNForce(model64, cg, 350.0).save_model(tmp_path / "model.pt")
    meta = read_metadata(path)
    for key in ("units", "cutoff_intra_nm", "cutoff_inter_nm", "bead_type_names", "bead_type", "bead_names", "masses",
                "n_beads", "mapping_sha256", "uses_temperature", "temperature_K", "includes_prior", "package_version", "periodic"):
        assert key in meta, key
    assert meta["mapping_sha256"] == cg.mapping.sha256()
    assert meta["masses"] == pytest.approx(list(cg.masses))
    assert meta["n_beads"] == cg.n_beads and meta["bead_names"] == cg.bead_names


@pytest.mark.gpu
def test_cuda_matches_reference_and_cuda_graphs(cg, model64):
    force = CGNNForce(model64, cg, 350.0)
    system = cg.system()
    force.add_to(system)
    reference = energy_forces(system, cg.positions, "Reference")
    platform = openmm.Platform.getPlatformByName("CUDA")
    report = force.tune_cuda_graphs(system, cg.positions, platform, {"Precision": "mixed"})
    assert report["agree"], report
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, {"Precision": "mixed"})
    context.setPositions(cg.positions)
    state = context.getState(getEnergy=True, getForces=True)
    assert state.getPotentialEnergy()._value == pytest.approx(reference[0], rel=1e-4)
    np.testing.assert_allclose(state.getForces(asNumpy=True)._value, reference[1], atol=1e-3 * np.abs(reference[1]).max())


def test_rejects_periodicity_mismatch(cg, tmp_path):
    from models.make_models import metadata_for

    meta = metadata_for(cg, include_prior=True)
    meta["periodic"] = False
    path = tmp_path / "model.pt"
    torch.jit.save(scripted_model(cg, include_prior=True), str(path), _extra_files={"metadata.json": json.dumps(meta)})
    force = CGNNForce(path, cg)
    system = cg.system()
    other = openmm.CustomNonbondedForce("0")
    other.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    for _ in range(cg.n_beads):
        other.addParticle([])
    system.addForce(other)
    with pytest.raises(ModelMismatchError, match="not periodic but the System has periodic forces"):
        force.add_to(system)
    system = cg.system()
    force.add_to(system)
    assert not system.getForce(0).usesPeriodicBoundaryConditions()


def _repeated_energy_forces(force, cg, calls):
    system = cg.system()
    force.add_to(system, "CPU")
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    results = []
    for _ in range(calls):
        context.setPositions(cg.positions)
        state = context.getState(getEnergy=True, getForces=True)
        results.append((state.getPotentialEnergy()._value, np.asarray(state.getForces(asNumpy=True)._value)))
    return results


def test_compiled_python_engine_agrees_with_torchforce(cg, tmp_path, monkeypatch):
    """PythonForce + torch.compile (float32 model): the first call eager and equal to TorchForce, the
    compiled calls within float32 rounding; the compile is reported and its artifacts cached on disk."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = make_model_dir(tmp_path / "m32", use_temperature=True)
    (e_ref, f_ref), = _repeated_energy_forces(CGNNForce(folder, cg, 300.0, engine="torch"), cg, 1)
    force = CGNNForce(folder, cg, 300.0, engine="python", prior="openmm")  # the same prior carrier as TorchForce's
    results = _repeated_energy_forces(force, cg, 3)
    assert results[0][0] == e_ref
    np.testing.assert_array_equal(results[0][1], f_ref)
    report = force.engine_report()
    assert report["engine"] == "python" and report["compiled"] is True and report["compile_s"] > 0
    assert any((tmp_path / "inductor").rglob("*")), "nothing cached on disk"
    eps = float(np.finfo(np.float32).eps)
    for energy, forces in results[1:]:
        assert energy == pytest.approx(e_ref, rel=20 * eps)
        np.testing.assert_allclose(forces, f_ref, atol=50 * eps * float(np.abs(f_ref).max()))
    # "auto" puts the prior inside the compiled graph for this engine: the same forces, in float32
    inside = CGNNForce(folder, cg, 300.0, engine="python")
    assert inside.prior_carrier == "model" and CGNNForce(folder, cg, 300.0, engine="torch").prior_carrier == "openmm"
    for energy, forces in _repeated_energy_forces(inside, cg, 2):
        assert energy == pytest.approx(e_ref, rel=20 * eps)
        np.testing.assert_allclose(forces, f_ref, atol=50 * eps * float(np.abs(f_ref).max()))


def test_ahead_of_time_backend_agrees_with_torch_compile(cg, tmp_path, monkeypatch):
    """OPENMM_CGNN_COMPILE_BACKEND=aoti: the same energy and forces through AOTInductor's package as
    through torch.compile (the same traced graph), and an unknown backend is refused by name."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = make_model_dir(tmp_path / "m32", use_temperature=True)
    compiled = _repeated_energy_forces(CGNNForce(folder, cg, 300.0, engine="python"), cg, 2)[1]
    monkeypatch.setenv("OPENMM_CGNN_COMPILE_BACKEND", "aoti")
    force = CGNNForce(folder, cg, 300.0, engine="python")
    ahead = _repeated_energy_forces(force, cg, 3)
    report = force.engine_report()
    assert report["compile_backend"] == "aoti" and report["compiled"] is True
    eps = float(np.finfo(np.float32).eps)
    for energy, forces in ahead[1:]:
        assert energy == pytest.approx(compiled[0], rel=20 * eps)
        np.testing.assert_allclose(forces, compiled[1], atol=50 * eps * float(np.abs(compiled[1]).max()))
    monkeypatch.setenv("OPENMM_CGNN_COMPILE_BACKEND", "triton")
    with pytest.raises(ValueError, match="OPENMM_CGNN_COMPILE_BACKEND.*inductor"):
        PythonForceEngine()


def test_python_engine_falls_back_to_eager_when_compiling_fails(cg, model64, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    messages = []
    force = CGNNForce(model64, cg, 350.0, engine=PythonForceEngine(log=messages.append))
    (e0, f0), (e1, f1), (e2, f2) = _repeated_energy_forces(force, cg, 3)
    assert e0 == e1 == e2
    np.testing.assert_array_equal(f0, f2)
    assert force.engine_report()["compiled"] is False and "no compiler here" in force.engine_report()["reason"]
    assert len(messages) == 1 and "runs it eager" in messages[0]


def test_python_engine_runs_a_model_pt_eager(cg, toy_dir):
    force = CGNNForce(toy_dir / "model.pt", cg, engine="python")
    (e_py, f_py), = _repeated_energy_forces(force, cg, 1)
    (e_t, f_t), = _repeated_energy_forces(CGNNForce(toy_dir / "model.pt", cg, engine="torch"), cg, 1)
    assert e_py == pytest.approx(e_t, rel=1e-12)
    np.testing.assert_allclose(f_py, f_t, rtol=1e-12, atol=1e-12 * np.abs(f_t).max())
    assert "cannot be compiled" in force.engine_report()["reason"]
