"""``openmm-cgnn train`` command line: a short real run and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_cgnn.cli import main
from openmm_cgnn.frames import FrameWriter, read_frames
from openmm_cgnn.testing.known_potential import SyntheticSystem


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return SyntheticSystem().simulate(tmp_path_factory.mktemp("cli") / "run", n_frames=30, steps_per_frame=20)


def copy_run(source, target, kind="cg", with_forces=True, edit=None):
    """Rewrite a run's frames (optionally edited) as a new run directory."""
    frames = read_frames(source, require_forces=True)
    positions, forces = frames.positions.copy(), frames.forces.copy()
    if edit is not None:
        edit(positions, forces)
    metadata = dict(frames.metadata, kind=kind)
    target.mkdir(parents=True)
    with FrameWriter(target / "frames.h5", frames.topology, metadata, with_forces=with_forces) as writer:
        for k in range(frames.n_frames):
            writer.append(positions[k], frames.box[k], frames.time[k], forces[k] if with_forces else None)
    return target


def train_cli(capsys, *args):
    code = main(["train", "--quick", "--no-progress", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_trains_and_refuses_to_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--data", str(run_dir), "--mapping", str(run_dir / "mapping.json"), "--out", str(out),
                 "--quick", "--epochs", "1", "--no-progress", "--device", "cpu",
                 "--model-option", "features=12", "inter_cutoff_nm=0.65"])
    assert code == 0
    assert "validation force RMSE" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 1 and metrics["train_config"]["quick"]
    hparams = json.loads((out / "hparams.json").read_text())
    assert (hparams["features"], hparams["inter_cutoff_nm"], hparams["filters"]) == (12, 0.65, 32)  # rest: --quick
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code, err = train_cli(capsys, "--data", run_dir, "--mapping", run_dir / "mapping.json", "--out", out, "--epochs", "1")
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    code, err = train_cli(capsys, "--data", run_dir, "--mapping", run_dir / "mapping.json", "--out", out,
                          "--epochs", "2", "--resume", "--lr", "5e-4", "--model-option", "features=12", "inter_cutoff_nm=0.65")
    assert code == 2 and "lr" in err  # resuming with other settings is refused


def test_cli_mapping_mismatch(run_dir, tmp_path, capsys):
    mapping = json.loads((run_dir / "mapping.json").read_text())
    mapping["residues"]["MON"]["beads"][0]["name"] = "Y"
    mapping["residues"]["MON"]["atoms"] = ["Y"]
    mapping["residues"]["MON"]["beads"][0]["atoms"] = ["Y"]
    bad = tmp_path / "renamed.json"
    bad.write_text(json.dumps(mapping))
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", bad, "--out", tmp_path / "m1")
    assert code == 2 and "MON" in err and str(run_dir) in err
    assert not (tmp_path / "m1" / "checkpoint.pt").exists()

    del mapping["residues"]["MON"]
    bad.write_text(json.dumps(mapping))
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", bad, "--out", tmp_path / "m2")
    assert code == 2 and "'MON'" in err and "not in the mapping" in err

    # The same frames as an all-atom run whose atom names do not match the mapping's.
    aa = copy_run(run_dir, tmp_path / "aa", kind="aa")
    mapping = json.loads((run_dir / "mapping.json").read_text())
    mapping["residues"]["DIM"]["atoms"] = ["A", "C"]
    mapping["residues"]["DIM"]["beads"][1]["atoms"] = ["C"]
    bad.write_text(json.dumps(mapping))
    code, err = train_cli(capsys, "--data", aa, "--mapping", bad, "--out", tmp_path / "m3")
    assert code == 2 and "DIM" in err and "atoms" in err


def test_cli_bad_data(run_dir, tmp_path, capsys):
    mapping = run_dir / "mapping.json"

    def nan_positions(positions, forces):
        positions[3, 5, 0] = np.nan

    def nan_forces(positions, forces):
        forces[7, 2, 1] = np.inf

    bad = copy_run(run_dir, tmp_path / "nanpos", edit=nan_positions)
    code, err = train_cli(capsys, "--data", bad, "--mapping", mapping, "--out", tmp_path / "m")
    assert code == 2 and "positions" in err and "nanpos" in err

    bad = copy_run(run_dir, tmp_path / "nanforce", edit=nan_forces)
    code, err = train_cli(capsys, "--data", bad, "--mapping", mapping, "--out", tmp_path / "m")
    assert code == 2 and "forces" in err and "frame 7" in err and "nanforce" in err

    bad = copy_run(run_dir, tmp_path / "noforces", with_forces=False)
    code, err = train_cli(capsys, "--data", bad, "--mapping", mapping, "--out", tmp_path / "m")
    assert code == 2 and "forces" in err and "noforces" in err

    code, err = train_cli(capsys, "--data", tmp_path / "missing", "--mapping", mapping, "--out", tmp_path / "m")
    assert code == 2 and "--data" in err and "missing" in err
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", tmp_path / "none.json", "--out", tmp_path / "m")
    assert code == 2 and "--mapping" in err
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", mapping, "--out", tmp_path / "m", "--resume")
    assert code == 2 and "nothing to resume" in err
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", mapping, "--out", tmp_path / "m", "--epochs", "0")
    assert code == 2 and "--epochs" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cli_cuda_without_device(run_dir, tmp_path, capsys):
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", run_dir / "mapping.json", "--out", tmp_path / "m",
                          "--device", "cuda")
    assert code == 2 and "cuda" in err.lower()


@pytest.mark.parametrize("option, message", [
    ("width=3", "NAME=VALUE with NAME one of"),
    ("features", "NAME=VALUE"),
    ("features=many", "'many' is not a valid int"),
    ("features=0", "HybridGraphConfig.features"),
    ("architecture=transformer", "HybridGraphConfig.architecture: must be one of ('hybridgraph', 'painn')"),
    ("energy_scale=2", "NAME one of"),  # set from the data, not by hand
])
def test_cli_model_option_errors(run_dir, tmp_path, capsys, option, message):
    code, err = train_cli(capsys, "--data", run_dir, "--mapping", run_dir / "mapping.json", "--out", tmp_path / "m",
                          "--epochs", "1", "--model-option", option)
    assert code == 2 and "--model-option" in err and message in err
    assert not (tmp_path / "m").exists()
