"""The ``openmm-cgnn aa`` stage: CLI contract, saved forces, resume, and bad input (8 ion pairs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)

openmm = pytest.importorskip("openmm")

from openmm_cgnn.aa import forcefield, stages  # noqa: E402
from openmm_cgnn.aa.builder import build_box  # noqa: E402
from openmm_cgnn.aa.run import run_aa  # noqa: E402
from openmm_cgnn.cli import main  # noqa: E402
from openmm_cgnn.frames import read_frames  # noqa: E402

PAIRS = 8
BASE = ["aa", "--pairs", str(PAIRS), "--equilibrate-ps", "1", "--production-ps", "0.4", "--save-every-ps", "0.1",
        "--platform", "CPU", "--seed", "5"]


@pytest.fixture(scope="module")
def two_temperatures(tmp_path_factory):
    out = tmp_path_factory.mktemp("aa") / "run"
    assert main(BASE + ["--temperature", "450", "500", "--charge-scale", "0.8", "--out", str(out)]) == 0
    return out


def test_cli_contract(two_temperatures):
    out = two_temperatures
    parent = json.loads((out / "summary.json").read_text())
    assert parent["temperature_K"] == [450.0, 500.0] and [r["dir"] for r in parent["runs"]] == ["T450K", "T500K"]
    for run in parent["runs"]:
        run_dir = out / run["dir"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert {"n_pairs", "temperature_K", "density_kg_m3", "n_frames", "platform"} <= set(summary)
        assert summary["n_pairs"] == PAIRS and summary["n_frames"] == 4 and summary["platform"] == "CPU"
        assert summary["temperature_K"] == run["temperature_K"]
        assert 500 < summary["density_kg_m3"] < 2000
        for name in ("frames.h5", "topology.pdb", "trajectory.dcd", "checkpoint.chk", "run.json"):
            assert (run_dir / name).exists(), name
        frames = read_frames(run_dir, require_forces=True)
        meta = frames.metadata
        assert meta["kind"] == "aa" and meta["temperature_K"] == run["temperature_K"]
        assert meta["charge_scale"] == 0.8 and meta["seed"] == 5 and meta["n_pairs"] == PAIRS
        assert {"forcefield", "versions", "platform"} <= set(meta)
        assert frames.positions.shape == (4, PAIRS * 30, 3)
        assert np.allclose(frames.time, [0.1, 0.2, 0.3, 0.4])
        assert frames.topology.residue_name[0] == "BMIM" and frames.topology.residue_name[-1] == "BF4"
        # Molecules are whole (unwrapped): no bond longer than 0.2 nm.
        bonds = frames.topology.bonds
        lengths = np.linalg.norm(frames.positions[:, bonds[:, 0]] - frames.positions[:, bonds[:, 1]], axis=2)
        assert lengths.max() < 0.2
    import mdtraj

    traj = mdtraj.load(str(out / "T450K" / "trajectory.dcd"), top=str(out / "T450K" / "topology.pdb"))
    assert traj.n_frames == 4 and traj.n_atoms == PAIRS * 30
    assert np.allclose(traj.xyz, read_frames(out / "T450K").positions, atol=1e-3)


def _system_for(run_dir: Path, platform: str):
    summary = json.loads((run_dir / "summary.json").read_text())
    ff = forcefield.load_forcefield()
    topology, _ = build_box(ff, summary["composition"], 1000.0)  # same residue order as the run
    system = forcefield.build_system(topology, ff, cutoff_nm=summary["cutoff_nm"],
                                     charge_scale=summary["charge_scale"])
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))


def test_saved_forces_are_minus_energy_gradient(two_temperatures):
    run_dir = two_temperatures / "T500K"
    frames = read_frames(run_dir, start=2, stop=3, require_forces=True)
    positions = frames.positions[0].astype(np.float64)
    saved = frames.forces[0].astype(np.float64)
    ctx = _system_for(run_dir, "CPU")
    ctx.setPeriodicBoxVectors(*frames.box[0].astype(np.float64))
    ctx.setPositions(positions)
    fresh = ctx.getState(getForces=True).getForces(asNumpy=True)._value
    scale = np.abs(saved).max()
    # Positions were stored as float32, which moves stiff bond forces by a little.
    assert np.abs(fresh - saved).max() < 2e-3 * scale
    assert frames.potential_energy[0] == pytest.approx(
        ctx.getState(getEnergy=True).getPotentialEnergy()._value, rel=1e-4)
    # -dE/dx by central differences (double precision Reference platform) for a few atoms.
    ref = _system_for(run_dir, "Reference")
    ref.setPeriodicBoxVectors(*frames.box[0].astype(np.float64))
    # A tiny step: LJ is truncated (CL&P convention), so a pair crossing the cutoff would jump the
    # energy; with h = 1e-6 nm that is unlikely, and double precision keeps the difference exact.
    h = 1e-6
    for atom in (0, 6, PAIRS * 25 + 1):  # ring N1, H7 (constrained C-H), a BF4 fluorine
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                moved = positions.copy()
                moved[atom, axis] += sign * h
                ref.setPositions(moved)
                energies.append(ref.getState(getEnergy=True).getPotentialEnergy()._value)
            numeric = -(energies[0] - energies[1]) / (2 * h)
            assert numeric == pytest.approx(saved[atom, axis], abs=1.0)  # |F| up to ~3000


def test_resume_keeps_frames_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_append = stages.SingleRun._append_frame

    def crash_at_third_frame(self, writer, context, frame_number):
        if frame_number == 3:  # checkpoint of frame 3 written, frame itself not yet appended
            raise KeyboardInterrupt
        real_append(self, writer, context, frame_number)

    monkeypatch.setattr(stages.SingleRun, "_append_frame", crash_at_third_frame)
    kwargs = dict(platform="CPU", seed=2, log=lambda message: None)
    with pytest.raises(KeyboardInterrupt):
        run_aa(out, PAIRS, 450.0, 0.4, 0.4, 0.1, **kwargs)
    monkeypatch.setattr(stages.SingleRun, "_append_frame", real_append)
    first = read_frames(out)
    assert first.n_frames == 2
    summary = run_aa(out, PAIRS, 450.0, 0.4, 0.6, 0.1, resume=True, **kwargs)  # and extend production
    frames = read_frames(out, require_forces=True)
    assert summary["n_frames"] == frames.n_frames == 6
    assert np.allclose(frames.time, np.arange(1, 7) * 0.1)
    assert np.array_equal(frames.positions[:2], first.positions)  # written frames kept as they were
    assert len({f.tobytes() for f in frames.positions}) == 6  # no frame repeated
    # Resuming a finished run adds nothing.
    assert run_aa(out, PAIRS, 450.0, 0.4, 0.6, 0.1, resume=True, **kwargs)["n_frames"] == 6
    assert read_frames(out).n_frames == 6


def test_resume_during_npt(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(stages, "CHECKPOINT_EVERY_S", 0.0)  # checkpoint at every volume sample
    real_step = stages.SingleRun._step
    calls = []

    def crash_in_npt(self, context, n):
        calls.append(n)
        if len(calls) == 12:
            raise KeyboardInterrupt
        real_step(self, context, n)

    monkeypatch.setattr(stages.SingleRun, "_step", crash_in_npt)
    kwargs = dict(platform="CPU", seed=3, log=lambda message: None)
    with pytest.raises(KeyboardInterrupt):
        run_aa(out, PAIRS, 450.0, 1.0, 0.2, 0.1, **kwargs)
    assert not (out / "frames.h5").exists()
    monkeypatch.setattr(stages.SingleRun, "_step", real_step)
    summary = run_aa(out, PAIRS, 450.0, 1.0, 0.2, 0.1, resume=True, **kwargs)
    assert summary["n_frames"] == 2 and summary["density_samples"] == 10
    steps = np.loadtxt(out / "npt_density.csv", delimiter=",", skiprows=1)[:, 0]
    assert np.allclose(steps, np.arange(1, 21) * 0.05)  # every sample once, none lost or repeated


def test_resume_with_different_settings_is_refused(two_temperatures, capsys):
    args = BASE + ["--temperature", "450", "500", "--charge-scale", "1.0", "--out", str(two_temperatures), "--resume"]
    assert main(args) == 2
    assert "--charge-scale" in capsys.readouterr().err


@pytest.mark.parametrize("change, needle", [
    (["--pairs", "0"], "--pairs"),
    (["--pairs", "-3"], "--pairs"),
    (["--platform", "NoSuchPlatform"], "available: "),
    (["--save-every-ps", "0.003"], "--save-every-ps"),
    (["--temperature", "-5"], "--temperature"),
    (["--cutoff-nm", "3.0"], "--cutoff-nm"),
    (["--charge-scale", "0"], "--charge-scale"),
])
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, capsys, change, needle):
    out = tmp_path / "never"
    args = BASE + ["--temperature", "450", "--out", str(out)]
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    if needle == "available: ":
        assert "CPU" in err and "Reference" in err
    assert not out.exists()


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(BASE + ["--temperature", "450", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # --overwrite only deletes directories that hold an aa run.
    assert main(BASE + ["--temperature", "450", "--out", str(out), "--overwrite"]) == 2
    assert "refuses" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_corrupt_forcefield_data_is_reported(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(forcefield.DATA_DIR, data)
    xml = data / "forcefield.xml"
    xml.write_text(xml.read_text().replace('<Atom name="N1" type="NA" />', '<Atom name="N1" type="NA" '))
    out = tmp_path / "out"
    assert main(BASE + ["--temperature", "450", "--out", str(out), "--forcefield-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "--forcefield-dir" in err and "forcefield.xml" in err
    assert not out.exists()


def test_density_convergence_tells_noise_from_drift():
    from openmm_cgnn.aa.stages import density_convergence

    rng = np.random.default_rng(3)
    noise = 1000.0 + rng.normal(0.0, 20.0, 400)
    flat = density_convergence(noise)
    assert flat["density_converged"] and flat["density_kg_m3"] == pytest.approx(1000.0, abs=5.0)
    assert 0.3 < flat["density_sem_kg_m3"] < 3.0  # about 20 / sqrt(400) for uncorrelated samples
    ramp = density_convergence(noise + np.linspace(0.0, 60.0, 400))  # still compressing
    assert ramp["density_converged"] is False and ramp["density_drift_kg_m3"] == pytest.approx(30.0, abs=5.0)
    assert density_convergence(noise[:5])["density_sem_kg_m3"] is None  # too few samples to judge
