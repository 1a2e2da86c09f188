"""Data-parallel training: ``openmm-cgnn train`` under torchrun with 2 gloo processes on CPU.

The 2-process run must end with the weights and validation errors of a 1-process run with the same
global batch (to float rounding), and write one set of files. The data are cut so that the last
batch of each epoch has one frame, which leaves rank 1 without a share of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmm_cgnn.cli import main
from openmm_cgnn.training.distributed import DistributedSetupError, World
from openmm_cgnn.testing.known_potential import SyntheticSystem

HERE = Path(__file__).resolve().parent
# 30 frames, 5 for validation: 25 training frames in batches of 4, the last one of a single frame.
# Must match distributed_resume.SETTINGS.
CLI_SETTINGS = ["--quick", "--epochs", "2", "--batch-size", "4", "--validation-fraction", "0.17",
                "--model-option", "features=12", "--device", "cpu", "--no-progress"]
# Float32 sums in another order: the weights after 14 Adam steps differ by ~5e-7 here.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone picks a free rendezvous port."""
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
               *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-process and two 2-process trainings of the same data (see the module docstring)."""
    root = tmp_path_factory.mktemp("ddp")
    data = SyntheticSystem().simulate(root / "data", n_frames=30, steps_per_frame=20)
    data_args = ["--data", str(data), "--mapping", str(data / "mapping.json")]
    assert main(["train", *data_args, *CLI_SETTINGS, "--out", str(root / "one")]) == 0
    two = root / "two"
    two.mkdir()
    cli = torchrun("-m", "openmm_cgnn", "train", *data_args, *CLI_SETTINGS, "--out", str(two / "model"))
    torchrun(str(HERE / "distributed_resume.py"), str(data), str(root / "resumed"))
    return {"root": root, "data": data, "one": root / "one", "two": two, "cli_stdout": cli.stdout}


def checkpoint(model_dir: Path) -> dict:
    return torch.load(model_dir / "checkpoint.pt", weights_only=False)


def assert_weights_close(a: dict, b: dict, exact: bool = False) -> None:
    for part in ("state_dict", "last_state_dict"):
        first = a["state_dict"] if part == "state_dict" else a["train_state"][part]
        second = b["state_dict"] if part == "state_dict" else b["train_state"][part]
        assert first.keys() == second.keys()
        for key, value in first.items():
            if exact:
                assert torch.equal(value, second[key]), (part, key)
            else:
                torch.testing.assert_close(value, second[key], **TOLERANCE, msg=f"{part} {key}")


def test_two_processes_train_as_one(runs):
    one, two = runs["one"], runs["two"] / "model"
    # Only rank 0 writes: the same files as the 1-process run, nothing else anywhere, one summary.
    assert sorted(p.name for p in runs["two"].iterdir()) == ["model"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert runs["cli_stdout"].count("validation force RMSE") == 1

    a, b = checkpoint(one), checkpoint(two)
    assert (a["train_state"]["world_size"], b["train_state"]["world_size"]) == (1, 2)
    assert_weights_close(a, b)
    # Adam's state follows the same gradients (and has none for the energy-only read-out bias).
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["timing"]["processes"] == 2 and m2["data"]["n_train_frames"] == 25
    for split in ("train", "validation"):
        for name, stats in m1[split]["per_type"].items():
            assert m2[split]["per_type"][name]["n_components"] == stats["n_components"]
            assert m2[split]["per_type"][name]["mse"] == pytest.approx(stats["mse"], rel=1e-5)
        assert m2[split]["overall"]["mse"] == pytest.approx(m1[split]["overall"]["mse"], rel=1e-5)
    prior_1, prior_2 = (m["baselines"]["prior_only"]["validation"]["overall"] for m in (m1, m2))
    assert prior_2["mse"] == pytest.approx(prior_1["mse"], rel=1e-6)
    for h1, h2 in zip(m1["history"], m2["history"], strict=True):
        assert h2["train_mse"] == pytest.approx(h1["train_mse"], rel=1e-5)
        assert h2["validation_mse"] == pytest.approx(h1["validation_mse"], rel=1e-5)


def test_resume_on_two_processes_is_exact(runs):
    # Cut after one epoch and resumed on 2 processes: bit for bit the uninterrupted 2-process run.
    assert not (runs["root"] / "resumed" / "cut_after_1_epoch" / "metrics.json").exists()
    assert_weights_close(checkpoint(runs["two"] / "model"), checkpoint(runs["root"] / "resumed" / "cut"), exact=True)


def test_resume_on_another_number_of_processes(runs, tmp_path):
    # The interrupted 2-process run finished by one process: the 1-process trajectory, to float rounding.
    import shutil

    from openmm_cgnn.training import TrainConfig, train

    from distributed_resume import MODEL_OPTIONS, SETTINGS

    model = shutil.copytree(runs["root"] / "resumed" / "cut_after_1_epoch", tmp_path / "model")
    data = runs["data"]
    with pytest.warns(UserWarning, match="2 process"):
        train([data], data / "mapping.json", model, TrainConfig(**SETTINGS), MODEL_OPTIONS, resume=True,
              show_progress=False)
    assert_weights_close(checkpoint(runs["one"]), checkpoint(model))


def test_global_batch_must_divide(runs, tmp_path, monkeypatch, capsys):
    # As rank 0 of 3 (no process group is joined before the check): refused, naming the option.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    data = runs["data"]
    out = tmp_path / "model"
    code = main(["train", "--data", str(data), "--mapping", str(data / "mapping.json"), "--out", str(out),
                 "--quick", "--batch-size", "4", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 4" in err and "(3)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_world_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0) and World.from_env().is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DistributedSetupError, match="RANK=5 WORLD_SIZE=4"):
        World.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedSetupError, match="RANK='x'"):
        World.from_env()


@pytest.mark.parametrize("n", [0, 1, 3, 8, 25])
def test_shares_cover_every_item_once(n):
    shares = [World(rank, 3, rank).share(n) for rank in range(3)]
    items = [i for share in shares for i in range(n)[share]]
    assert items == list(range(n))
    assert max(len(range(n)[s]) for s in shares) - min(len(range(n)[s]) for s in shares) <= 1
