"""The force-field export: plain OpenMM (Python, no openmm_cgnn; and the C++ loader) reproduces the energies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm)

import openmm
import openmm.app as app
from models.make_models import make_model_dir, write_aa_run
from openmm_cgnn.cli import main as cli_main
from openmm_cgnn.openmm.export import ExportError, export_forcefield
from openmm_cgnn.openmm.force import DEFAULT_PRIOR_CARRIER, CGNNForce

REPO = Path(__file__).resolve().parents[1]

PLAIN_OPENMM = """
import sys, json
import torch  # before openmm: the TorchForce plugin needs PyTorch's libraries
import openmm, openmm.app as app
import openmmtorch
assert "openmm_cgnn" not in sys.modules
folder = sys.argv[1]
system = openmm.XmlSerializer.deserialize(open(folder + "/system.xml").read())
pdb = app.PDBFile(folder + "/cg.pdb")
integrator = openmm.VerletIntegrator(0.002)
context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
context.setPositions(pdb.positions)
energies = [context.getState(getEnergy=True).getPotentialEnergy()._value]
for _ in range(2):
    integrator.step(10)
    energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
print(json.dumps({"energies": energies, "n": system.getNumParticles(), "modules": "openmm_cgnn" in sys.modules}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), use_temperature=True)


@pytest.fixture(scope="module")
def exported(cg, model_dir, tmp_path_factory):
    # native prior forces, so system.xml carries every kind of force the export can hold
    return export_forcefield(model_dir, cg, tmp_path_factory.mktemp("exports") / "ff", temperature=350.0, prior="openmm",
                             log=lambda m: None)


def reference_energies(folder: Path, steps=(10, 10)) -> list[float]:
    """Same protocol as PLAIN_OPENMM, in this process."""
    system = openmm.XmlSerializer.deserialize((folder / "system.xml").read_text())
    pdb = app.PDBFile(str(folder / "cg.pdb"))
    integrator = openmm.VerletIntegrator(0.002)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    energies = [context.getState(getEnergy=True).getPotentialEnergy()._value]
    for n in steps:
        integrator.step(n)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    return energies


def test_export_directory_contents(exported, cg):
    names = {p.name for p in exported.iterdir()}
    assert {"model.pt", "system.xml", "cg.pdb", "mapping.json", "metadata.json", "prior.json", "README.md",
            "cg.psf", "cg.gro", "cg.top"} <= names
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["prior_carrier"] == "openmm" and meta["model"]["temperature_K"] == 350.0
    assert [f["name"] for f in meta["forces"]] == ["CGNNForce", "CGPriorExcludedVolume", "CGPriorBonds", "CGPriorAngles"]
    readme = (exported / "README.md").read_text()
    assert "import torch  # first" in readme and "XmlSerializer.deserialize" in readme
    import parmed

    psf = parmed.load_file(str(exported / "cg.psf"))
    assert len(psf.atoms) == cg.n_beads and len(psf.bonds) == len(cg.bonds)
    assert [a.mass for a in psf.atoms] == pytest.approx(list(cg.masses))
    pdb = app.PDBFile(str(exported / "cg.pdb"))
    assert pdb.topology.getNumAtoms() == cg.n_beads
    np.testing.assert_allclose(pdb.topology.getPeriodicBoxVectors().value_in_unit(openmm.unit.nanometer), cg.box, atol=1e-6)


def test_plain_openmm_python_reproduces_cgnnforce(exported, cg, model_dir):
    """A separate interpreter that imports only torch, openmm and openmmtorch gets the same energies."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PLAIN_OPENMM, str(exported)], capture_output=True, text=True, env=env,
                            cwd=exported, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["n"] == cg.n_beads and plain["modules"] is False
    # the same System built directly with CGNNForce, at the PDB's positions
    system = cg.system()
    CGNNForce(model_dir, cg, 350.0, prior="openmm").add_to(system)
    pdb = app.PDBFile(str(exported / "cg.pdb"))
    context = openmm.Context(system, openmm.VerletIntegrator(0.002), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    direct = context.getState(getEnergy=True).getPotentialEnergy()._value
    assert plain["energies"][0] == pytest.approx(direct, rel=1e-12)
    assert plain["energies"] == pytest.approx(reference_energies(exported), rel=1e-12)
    assert len(set(plain["energies"])) == 3  # the particles moved


def test_serialized_system_round_trips(exported):
    system = openmm.XmlSerializer.deserialize((exported / "system.xml").read_text())
    again = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    pdb = app.PDBFile(str(exported / "cg.pdb"))
    energies = []
    for candidate in (system, again):
        context = openmm.Context(candidate, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
        context.setPositions(pdb.positions)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert energies[0] == energies[1]
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["round_trip_check"]["reloaded_potential_energy_kj_mol"] == meta["round_trip_check"]["potential_energy_kj_mol"]


def test_system_xml_carries_the_graph_safe_module_and_gives_the_model_forces(exported, cg, model_dir):
    """system.xml runs with useCUDAGraphs=true (a module without host reads); deserialized on the CPU
    platform it gives the eager model's energy and forces, and NaN (not a crash) in a second Context
    whose box is too small."""
    from openmm_cgnn.model import load_model

    xml = (exported / "system.xml").read_text()
    assert '<Property name="useCUDAGraphs" value="true"' in xml
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["system_xml_module"]["graph_safe"] and meta["system_xml_module"]["useCUDAGraphs"]
    system = openmm.XmlSerializer.deserialize(xml)
    pdb = app.PDBFile(str(exported / "cg.pdb"))
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(pdb.positions)
    state = context.getState(getEnergy=True, getForces=True)
    model = load_model(model_dir)
    model.set_temperature(350.0)
    energy, forces = model.energy_and_forces(torch.tensor(positions)[None], torch.tensor(cg.box)[None],
                                             torch.as_tensor(cg.bead_type), torch.as_tensor(cg.molecule_index))
    # the prior runs as native OpenMM forces (float64 there); the model in float32
    assert state.getPotentialEnergy()._value == pytest.approx(float(energy[0]), rel=1e-5)
    np.testing.assert_allclose(state.getForces(asNumpy=True)._value, forces[0].numpy(), rtol=1e-4,
                               atol=1e-4 * float(forces.abs().max()))
    second = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    second.setPeriodicBoxVectors(*(np.asarray(cg.box) * 0.6))  # under twice the cutoff
    second.setPositions(positions * 0.6)
    state = second.getState(getEnergy=True, getForces=True)
    assert np.isnan(state.getPotentialEnergy()._value) and np.isnan(state.getForces(asNumpy=True)._value).all()


def test_export_refuses_to_replace_without_overwrite(exported, cg, model_dir):
    before = (exported / "system.xml").read_text()
    with pytest.raises(ExportError, match="use --overwrite"):
        export_forcefield(model_dir, cg, exported, temperature=350.0)
    assert (exported / "system.xml").read_text() == before
    assert not any(p.name.startswith(".") for p in exported.parent.iterdir())


def test_cli_export_from_aa_takes_its_temperature(cg, model_dir, tmp_path, capsys):
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=420.0)
    out = tmp_path / "export"
    assert cli_main(["export", "--model", str(model_dir), "--from-aa", str(aa), "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"]["temperature_K"] == 420.0
    assert meta["prior_carrier"] == DEFAULT_PRIOR_CARRIER
    assert meta["model"]["includes_prior"] == (DEFAULT_PRIOR_CARRIER == "model")
    assert cli_main(["simulate", "--forcefield", str(out), "--from-aa", str(aa), "--temperature", "400", "--steps", "1",
                     "--out", str(tmp_path / "cg")]) == 2
    assert "scripted for 420.0 K" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(model_dir), "--from-aa", str(aa), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert meta["round_trip_check"]["platform"] == "Reference"


def test_cli_export_checks_its_round_trip_on_the_platform_asked_for(cg, model_dir, tmp_path, capsys):
    """--platform: where openmm-torch has no Reference kernels (a GPU machine with another torch), the
    round trip runs on the run's platform; a platform that is not there is one line, nothing written."""
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=420.0)
    args = ["export", "--model", str(model_dir), "--from-aa", str(aa), "--out"]
    assert cli_main(args + [str(tmp_path / "bad"), "--platform", "NoSuchPlatform"]) == 2
    err = capsys.readouterr().err
    assert "--platform" in err and "NoSuchPlatform" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert cli_main(args + [str(tmp_path / "cpu"), "--platform", "CPU"]) == 0
    check = json.loads((tmp_path / "cpu" / "metadata.json").read_text())["round_trip_check"]
    assert check["platform"] == "CPU"
    assert check["reloaded_potential_energy_kj_mol"] == pytest.approx(check["potential_energy_kj_mol"], rel=1e-6)
    assert "on the CPU platform" in (tmp_path / "cpu" / "README.md").read_text()


@pytest.fixture(scope="module")
def cpp_loader(tmp_path_factory):
    if shutil.which("cmake") is None or (shutil.which("c++") is None and shutil.which("g++") is None):
        pytest.skip("no cmake or C++ compiler on this machine")
    build = tmp_path_factory.mktemp("cpp")
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    compiled = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    return build / "cgnn_run"


def test_cpp_loader_agrees_with_python(cpp_loader, exported):
    result = subprocess.run([str(cpp_loader), str(exported / "system.xml"), str(exported / "cg.pdb"), "--steps", "20",
                             "--dt-fs", "2", "--report-every", "10", "--platform", "Reference"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    values = dict(line.split(" ", 1) for line in lines if line.startswith(("platform", "particles", "initial_")))
    assert values["platform"] == "Reference"
    rows = [list(map(float, line.split())) for line in lines if line[:1].isdigit()]
    cpp = [float(values["initial_potential_energy_kj_mol"])] + [row[1] for row in rows]
    assert [row[0] for row in rows] == [10, 20]
    assert cpp == pytest.approx(reference_energies(exported), rel=1e-10)


def test_cpp_loader_reports_bad_input(cpp_loader, exported, tmp_path):
    short = tmp_path / "short.pdb"
    lines = (exported / "cg.pdb").read_text().splitlines()
    short.write_text("\n".join(line for k, line in enumerate(lines) if not (line.startswith("HETATM") and k % 2)) + "\n")
    result = subprocess.run([str(cpp_loader), str(exported / "system.xml"), str(short)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "particles" in result.stderr


@pytest.mark.parametrize("option, value", [("--steps", "-5"), ("--steps", "abc"), ("--steps", "12abc"),
                                           ("--dt-fs", "0"), ("--report-every", "0"), ("--temperature", "-1")])
def test_cpp_loader_rejects_bad_numbers_up_front(cpp_loader, tmp_path, option, value):
    # The files do not exist: a number is refused before anything is read or computed.
    result = subprocess.run([str(cpp_loader), str(tmp_path / "none.xml"), str(tmp_path / "none.pdb"), option, value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == next(line for line in result.stderr.splitlines() if option in line)
    assert f"{option} {value}: expected" in result.stderr
