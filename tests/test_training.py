"""Force-matching training on a small CG liquid with a known potential (simulated in OpenMM)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_cgnn.mapping.spec import CGMapping
from openmm_cgnn.training import TrainConfig, load_training_data, time_block_split, train
from openmm_cgnn.testing.known_potential import SyntheticSystem

# Validation force RMSE the quick model must reach on exact (noise-free) forces, as a fraction of
# the force RMS. Measured about 0.06 after 12 epochs; the priors alone give about 0.37.
RECOVERY_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Two runs of the same system at 300 K and 360 K (200 and 60 frames)."""
    root = tmp_path_factory.mktemp("synthetic")
    system = SyntheticSystem()
    cold = system.simulate(root / "run300", n_frames=200, seed=1)
    hot = system.simulate(root / "run360", n_frames=60, seed=2, temperature_K=360.0)
    return cold, hot


def quick_config(**changes) -> TrainConfig:
    settings = dict(epochs=12, batch_size=8, lr=1e-3, quick=True, device="cpu")
    settings.update(changes)
    return TrainConfig(**settings)


def test_time_block_split_is_contiguous():
    train_idx, val_idx = time_block_split(100, 0.2)
    assert list(val_idx) == list(range(80, 100)) and list(train_idx) == list(range(80))
    train_idx, val_idx = time_block_split(90, 0.2, n_blocks=3)
    assert list(val_idx) == list(range(24, 30)) + list(range(54, 60)) + list(range(84, 90))
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(90))
    with pytest.raises(ValueError, match="at least 6"):
        time_block_split(5, 0.2, n_blocks=3)


def test_split_per_run_keeps_time_blocks_and_temperatures(synthetic_runs):
    cold, hot = synthetic_runs
    mapping = CGMapping.load(cold / "mapping.json")
    data = load_training_data([cold, hot], mapping)
    assert len(data.train.positions) == 160 + 48 and len(data.validation.positions) == 40 + 12
    # Validation is the last 20 % of each run, in time order; training frames all come earlier.
    val_time = data.validation.time
    assert np.all(np.diff(val_time[:40]) > 0) and np.all(np.diff(val_time[40:]) > 0)
    assert val_time[0] > data.train.time[159] and val_time[40] > data.train.time[-1]
    assert set(data.train.temperature_K[:160]) == {300.0} and set(data.validation.temperature_K[40:]) == {360.0}
    assert data.describe()["temperatures_K"] == [300.0, 360.0]


def test_training_recovers_known_forces(synthetic_runs, tmp_path):
    from openmm_cgnn.model import load_model, read_metadata

    cold, _ = synthetic_runs
    out = tmp_path / "model"
    metrics = train([cold], cold / "mapping.json", out, quick_config(), show_progress=False)

    for name in ("checkpoint.pt", "hparams.json", "prior.json", "metrics.json", "mapping.json", "model.pt", "loss_curve.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation"]["overall"]["mse"] == pytest.approx(metrics["validation"]["overall"]["mse"])

    validation = saved["validation"]["overall"]
    assert validation["rmse"] < RECOVERY_TOLERANCE * validation["force_rms"]
    assert set(saved["validation"]["per_type"]) == {"DIM:A", "DIM:B", "MON:X"}
    for stats in saved["validation"]["per_type"].values():
        assert stats["rmse"] < 2 * RECOVERY_TOLERANCE * stats["force_rms"]
    constant = saved["baselines"]["constant_per_type"]
    prior = saved["baselines"]["prior_only"]
    # The best constant model predicts ~0 (mean force), its MSE is the force variance.
    assert max(abs(x) for v in constant["mean_force"].values() for x in v) < 0.1 * validation["force_rms"]
    assert constant["validation"]["overall"]["mse"] > prior["validation"]["overall"]["mse"] > 5 * validation["mse"]
    assert saved["validation_mse_relative_to"]["constant_per_type"] < RECOVERY_TOLERANCE**2
    assert len(saved["history"]) == saved["epochs_completed"] == 12
    assert saved["history"][-1]["train_mse"] < saved["history"][0]["train_mse"] / 5
    assert saved["data"]["split"]["validation_fraction"] == 0.2

    # The saved artefacts are the best model: eager reload and TorchScript agree with the metrics.
    model = load_model(out)
    mapping = CGMapping.load(out / "mapping.json")
    data = load_training_data([cold], mapping)
    frame = torch.as_tensor(data.validation.positions[:1])
    box = torch.as_tensor(data.validation.box[:1], dtype=torch.float32)
    bead_type, molecules = torch.as_tensor(data.train.bead_type), torch.as_tensor(data.train.molecule_index)
    energy, forces = model.energy_and_forces(frame, box, bead_type, molecules)
    scripted = torch.jit.load(str(out / "model.pt"))
    assert float(scripted(frame[0], box[0])) == pytest.approx(float(energy[0]), rel=1e-5)
    assert read_metadata(out / "model.pt")["mapping_sha256"] == mapping.sha256()
    error = (forces[0].double() - torch.as_tensor(data.validation.forces[0], dtype=torch.float64)).square().mean().sqrt()
    assert float(error) < RECOVERY_TOLERANCE * validation["force_rms"]


def test_resume_equals_uninterrupted(synthetic_runs, tmp_path):
    cold, _ = synthetic_runs
    config = dict(epochs=4, lr_patience=0, max_frames=60)  # patience 0: the LR schedule changes too
    full = train([cold], cold / "mapping.json", tmp_path / "full", quick_config(**config), show_progress=False)
    partial = train([cold], cold / "mapping.json", tmp_path / "cut", quick_config(**config), show_progress=False,
                    stop_after_epochs=2)
    assert partial == {} and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = train([cold], cold / "mapping.json", tmp_path / "cut", quick_config(**config), resume=True,
                    show_progress=False)
    assert [h["validation_mse"] for h in resumed["history"]] == [h["validation_mse"] for h in full["history"]]
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in full["history"]]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["train_state"]["last_state_dict"].items():
        assert torch.equal(value, b["train_state"]["last_state_dict"][key]), key


def test_early_stopping_keeps_best_epoch(synthetic_runs, tmp_path):
    cold, _ = synthetic_runs
    # A learning rate far below float32 resolution leaves the weights unchanged: no epoch after the
    # first improves, so training stops after `patience` more epochs and keeps epoch 1.
    metrics = train([cold], cold / "mapping.json", tmp_path / "model",
                    quick_config(epochs=10, lr=1e-20, early_stopping_patience=2, max_frames=40), show_progress=False)
    assert metrics["stopped_early"] and metrics["epochs_completed"] == 3 and metrics["best_epoch"] == 1


def test_temperature_input_with_two_temperatures(synthetic_runs, tmp_path):
    from openmm_cgnn.model import load_model

    cold, hot = synthetic_runs
    metrics = train([cold, hot], cold / "mapping.json", tmp_path / "model",
                    quick_config(epochs=1, use_temperature=True, max_frames=40), show_progress=False)
    assert metrics["data"]["temperatures_K"] == [300.0, 360.0]
    model = load_model(tmp_path / "model")
    assert model.config.use_temperature
    data = load_training_data([cold], CGMapping.load(cold / "mapping.json"), max_frames=40)
    args = (torch.as_tensor(data.validation.positions[:1]), torch.as_tensor(data.validation.box[:1], dtype=torch.float32),
            torch.as_tensor(data.train.bead_type), torch.as_tensor(data.train.molecule_index))
    at_300 = model(*args, inverse_temperature=torch.tensor([1 / 300.0]))
    at_360 = model(*args, inverse_temperature=torch.tensor([1 / 360.0]))
    assert float(at_300.detach()) != float(at_360.detach())


@pytest.mark.gpu
def test_training_on_cuda_matches_cpu_start(synthetic_runs, tmp_path):
    cold, _ = synthetic_runs
    config = dict(epochs=2, max_frames=60)
    on_gpu = train([cold], cold / "mapping.json", tmp_path / "gpu", quick_config(device="cuda", **config), show_progress=False)
    on_cpu = train([cold], cold / "mapping.json", tmp_path / "cpu", quick_config(**config), show_progress=False)
    assert on_gpu["train_config"]["device"].startswith("cuda")
    assert (tmp_path / "gpu" / "model.pt").is_file()
    # Same initial weights and batches: the first epoch's losses agree to float32 round-off.
    first_gpu, first_cpu = on_gpu["history"][0], on_cpu["history"][0]
    assert first_gpu["train_mse"] == pytest.approx(first_cpu["train_mse"], rel=1e-3)
