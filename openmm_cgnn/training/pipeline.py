"""The training stage end to end: data -> fitted priors -> force matching -> MODELDIR (contracts §3).

``MODELDIR`` gets ``checkpoint.pt`` (after every epoch; its ``state_dict`` is always the best model
so far, its ``train_state`` the latest weights and everything needed to resume exactly),
``hparams.json`` and ``prior.json`` (via the model's ``save_checkpoint``), ``metrics.json``,
``loss_curve.png``, a copy of ``mapping.json`` and ``model.pt`` (TorchScript for the training system).

Under ``torchrun`` every process runs this same function (see ``distributed.py``): all read the
data and build the same model, train on their shares of each batch, and only rank 0 writes MODELDIR.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..frames import evenly_spaced
from .. import io
from ..io import write_json_atomic
from ..layout import CHECKPOINT_PT, LOSS_CURVE_PNG, MAPPING_JSON, METRICS_JSON, MODEL_PT
from .data import TrainingData, TrainingDataError, load_training_data, with_force_map
from .distributed import World, process_group
from .metrics import constant_model_errors, mean_force_per_type, plot_loss_curve
from .trainer import OUTPUT_FILES, TrainConfig, Trainer, TrainingError, resolve_device

METRICS_FORMAT = "openmm_cgnn.metrics/1"
# Frames used for data-derived model settings (pair capacity, output scale): enough to see the
# densest configurations without a full pass over large data sets.
SIZING_FRAMES = 200


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber an existing model unless asked (checked before any data are read).

    True when an old model is to be replaced: the new one is then trained beside it (io.output_dir).
    """
    if resume and overwrite:
        raise TrainingError("choose either resume or overwrite, not both")
    if resume and not (out_dir / CHECKPOINT_PT).is_file():
        raise TrainingError(f"{out_dir}: nothing to resume (no {CHECKPOINT_PT})")
    return io.check_output_dir(out_dir, "model", overwrite=overwrite, resume=resume)


def prepare_output_dir(out_dir: Path, resume: bool) -> None:
    """Create MODELDIR; a fresh run removes this stage's old files there (and nothing else)."""
    if not resume:
        for name in OUTPUT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _sizing_sample(data: TrainingData, use_temperature: bool) -> dict[str, torch.Tensor | None]:
    """Evenly spaced training and validation frames (float64) for data-derived model settings."""
    def both(field: str) -> np.ndarray:
        return np.concatenate([getattr(data.train, field), getattr(data.validation, field)])

    n = len(data.train.positions) + len(data.validation.positions)
    pick = evenly_spaced(n, SIZING_FRAMES)

    def tensor(field: str) -> torch.Tensor:
        return torch.as_tensor(both(field)[pick], dtype=torch.float64)

    return {
        "positions": tensor("positions"),
        "box": tensor("box"),
        "forces": tensor("forces"),
        "inverse_temperature": 1.0 / tensor("temperature_K") if use_temperature else None,
    }


def check_box_fits_cutoffs(data: TrainingData, config: Any) -> None:
    """The network's cutoffs must be under half the smallest box edge; say which options fix it, and how."""
    smallest_edge = min(float(np.diagonal(cg.box, axis1=1, axis2=2).min()) for cg in (data.train, data.validation))
    cutoffs = {"inter_cutoff_nm": config.inter_cutoff_nm, "intra_cutoff_nm": config.intra_cutoff_nm}
    too_long = {name: value for name, value in cutoffs.items() if smallest_edge < 2 * value}
    if not too_long:
        return
    largest = max(cutoffs.values())
    # The box edge grows as the cube root of the number of molecules at a fixed density.
    molecules = int(np.max(data.train.molecule_index)) + 1
    needed = math.ceil(molecules * (2 * largest / smallest_edge) ** 3)
    names = sorted(set(data.train.residue_name))
    per_type = f" ({math.ceil(needed / len(names))} of each of {', '.join(names)})" if len(names) > 1 else ""
    limit = math.floor(smallest_edge / 2 * 100) / 100
    settings = " ".join(f"{name}={min(value, limit):g}" for name, value in too_long.items())
    raise TrainingDataError(
        f"the data's smallest box edge {smallest_edge:.3f} nm is below twice the model's "
        + ", ".join(f"{name} ({value:g} nm)" for name, value in too_long.items())
        + f": pass --model-option {settings} (at most half the edge, {limit:g} nm), or train on a box of at least "
        f"{2 * largest:.2f} nm: about {needed} molecules{per_type} instead of {molecules}"
    )


def build_model(data: TrainingData, quick: bool, use_temperature: bool, seed: int,
                overrides: dict[str, Any] | None = None, prior_form: str = "tabulated"):
    """Fit the priors on the training frames and build a CGModel sized for this data.

    Two settings come from the data: the pair capacity (densest frame plus head-room) and the
    network's ``energy_scale``, chosen so that the untrained network's forces have the RMS of the
    force the priors leave unexplained. Without it the network would start orders of magnitude off
    the target scale and spend its first epochs only growing its weights.
    """
    from openmm_cgnn.model import CGModel, HybridGraphConfig, PriorSet, fit_priors, suggest_max_pairs_per_bead

    train = data.train
    names = list(train.bead_type_names)
    factory = HybridGraphConfig.quick if quick else HybridGraphConfig.reference
    settings: dict[str, Any] = {"bead_type_names": names, "use_temperature": use_temperature}
    settings.update(overrides or {})
    config = factory(len(names), **settings)
    if use_temperature and len(np.unique(np.concatenate([train.temperature_K, data.validation.temperature_K]))) < 2:
        warnings.warn("the 1/T input is enabled but all frames share one temperature: it cannot be learned from them")

    check_box_fits_cutoffs(data, config)
    try:
        prior = fit_priors(train, cutoff_nm=config.inter_cutoff_nm, bonded_form=prior_form)
    except ValueError as exc:
        raise TrainingDataError(f"fitting the priors to the training data failed: {exc}") from exc
    # prior.json rounds the parameters; train with exactly what is saved, so a resumed or reloaded
    # model is the same function as the one trained.
    prior = PriorSet.from_dict(prior.to_dict(), names)
    sample = _sizing_sample(data, use_temperature)
    molecule_index = torch.as_tensor(train.molecule_index)
    bead_type = torch.as_tensor(train.bead_type)
    if "max_pairs_per_bead" not in (overrides or {}):
        search_cutoff = max(config.inter_cutoff_nm, prior.cutoff_nm)
        config.max_pairs_per_bead = max(1.0, suggest_max_pairs_per_bead(sample["positions"], sample["box"],
                                                                         molecule_index, search_cutoff))
    if "energy_scale" not in (overrides or {}):
        torch.manual_seed(seed)
        probe = CGModel(config, prior)
        few = slice(0, 4)  # a rough scale is enough; reference-size graphs are large
        args = (sample["positions"][few], sample["box"][few], bead_type, molecule_index,
                None if sample["inverse_temperature"] is None else sample["inverse_temperature"][few])
        try:
            _, prior_forces = probe.energy_and_forces(*args, terms="prior")
            _, network_forces = probe.energy_and_forces(*args, terms="network")
        except (ValueError, RuntimeError) as exc:
            raise TrainingDataError(f"the model cannot evaluate the training frames: {exc}") from exc
        residual_rms = float((sample["forces"][few] - prior_forces.double()).square().mean().sqrt())
        network_rms = float(network_forces.double().square().mean().sqrt())
        if network_rms > 0 and math.isfinite(residual_rms) and residual_rms > 0:
            config.energy_scale = float(f"{residual_rms / network_rms:.3g}")

    torch.manual_seed(seed)
    return CGModel(config, prior)


# Hyper-parameters the data set (pair capacity, output scale) or the other options fill in.
_DATA_DERIVED_HPARAMS = ("max_pairs_per_bead", "energy_scale")


def check_resume_provenance(saved: dict, mapping, config: TrainConfig, overrides: dict[str, Any] | None,
                            source: Path) -> None:
    """A resumed run must be the interrupted one: same mapping, same network options as on its command line.

    The optimisation options are compared by the trainer (``TrainConfig.comparable``); here the
    network is rebuilt from the checkpoint, so the --quick/--model-option hyper-parameters this
    command line would give are compared with the saved ones, every option alike.
    """
    from openmm_cgnn.model import HybridGraphConfig
    from openmm_cgnn.model.config import DEFAULT_ARCHITECTURE

    recorded = saved.get("mapping_sha256")
    if recorded and recorded != mapping.sha256():
        raise TrainingError(f"cannot resume: --mapping differs from the one the run in {source.parent} was trained with "
                            f"(sha256 {recorded[:12]} there, {mapping.sha256()[:12]} now)")
    overrides = dict(overrides or {})
    hparams = dict(saved["hparams"])
    hparams.setdefault("architecture", DEFAULT_ARCHITECTURE)  # checkpoints older than the key
    factory = HybridGraphConfig.quick if config.quick else HybridGraphConfig.reference
    names = hparams.get("bead_type_names") or []
    expected = factory(len(names), bead_type_names=names, use_temperature=config.use_temperature,
                       **overrides).to_dict()
    changed = [f"{k}: {hparams.get(k)!r} there, {v!r} now" for k, v in expected.items()
               if k in hparams and hparams[k] != v and (k not in _DATA_DERIVED_HPARAMS or k in overrides)]
    if changed:
        raise TrainingError(f"cannot resume {source}: the network options differ from the interrupted run's "
                            f"({'; '.join(changed)}); pass the same --quick/--model-option, or --overwrite to start again")


def save_progress(trainer: Trainer, out_dir: Path, mapping_sha256: str | None = None) -> None:
    """Checkpoint after an epoch: the best model as the contract's state_dict, the rest to resume."""
    from openmm_cgnn.model import save_checkpoint

    model = trainer.model
    resume = trainer.resume_state()
    model.load_state_dict(trainer.best_state_dict)
    try:
        save_checkpoint(out_dir, model, trainer.optimizer.state_dict(), trainer.state.epoch,
                        extra={"train_state": resume, "mapping_sha256": mapping_sha256})
    finally:
        model.load_state_dict(resume["last_state_dict"])


def evaluate_metrics(trainer: Trainer, data: TrainingData) -> dict:
    """Errors of the (best) model, the priors alone and the constant-per-type model, train and validation."""
    names = list(data.train.bead_type_names)
    bead_type = np.asarray(data.train.bead_type)
    means = mean_force_per_type(data.train.forces, bead_type, len(names))
    trained = {split: trainer.evaluate(frames).result(names)
               for split, frames in (("train", trainer.train_frames), ("validation", trainer.validation_frames))}
    prior_only = {split: trainer.evaluate(frames, terms="prior").result(names)
                  for split, frames in (("train", trainer.train_frames), ("validation", trainer.validation_frames))}
    constant = {split: constant_model_errors(cg.forces, bead_type, means, names)
                for split, cg in (("train", data.train), ("validation", data.validation))}

    def ratio(a: dict, b: dict) -> float | None:
        top, bottom = a["overall"]["mse"], b["overall"]["mse"]
        return None if bottom in (None, 0) else top / bottom

    return {
        "train": trained["train"],
        "validation": trained["validation"],
        "baselines": {
            "constant_per_type": {
                "description": "mean training force of each bead type as the prediction (the best constant model)",
                "mean_force": {name: [float(x) for x in means[i]] for i, name in enumerate(names)},
                **constant,
            },
            "prior_only": {"description": "fitted priors without the network", **prior_only},
        },
        "validation_mse_relative_to": {
            "constant_per_type": ratio(trained["validation"], constant["validation"]),
            "prior_only": ratio(trained["validation"], prior_only["validation"]),
        },
    }


def train(
    data_paths: Sequence[str | Path],
    mapping_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    stop_after_epochs: int | None = None,
) -> dict:
    """Train a model from run directories; returns the metrics written to ``MODELDIR/metrics.json``.

    ``stop_after_epochs`` ends the call after that many epochs *of this call* without finishing the
    model directory, as an interruption would (used to test exact resumption).

    Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), this process trains as one
    rank of a data-parallel run, and only rank 0 writes files; every rank returns the metrics.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    world = World.from_env()
    world.check_batch_size(config.batch_size)
    device = world.device(resolve_device(config.device))
    config.device = str(device)
    replace = check_output_dir(out_dir, resume, overwrite)
    with process_group(world, device):
        return _train(data_paths, mapping_path, out_dir, config, model_overrides, resume, replace, show_progress,
                      stop_after_epochs, world, device)


def _train(data_paths: Sequence[str | Path], mapping_path: str | Path, out_dir: Path, config: TrainConfig,
           model_overrides: dict[str, Any] | None, resume: bool, replace: bool, show_progress: bool,
           stop_after_epochs: int | None, world: World, device: torch.device) -> dict:
    from openmm_cgnn.mapping.spec import CGMapping, MappingError
    from openmm_cgnn.model import read_checkpoint
    from openmm_cgnn.model.checkpoint import model_from_checkpoint

    try:
        mapping = CGMapping.load(mapping_path)
    except MappingError as exc:
        raise TrainingDataError(str(exc)) from exc
    if config.force_map == "optimal":
        mapping, force_report = with_force_map(data_paths, mapping, max_frames=config.max_frames)
        for name, entry in force_report.items():
            print(f"{mapping_path} has no force map: fitted the optimal one on the --data runs; {name}: mean squared "
                  f"mapped force {entry['mean_squared_force_optimal']:.4g} (summed map "
                  f"{entry['mean_squared_force_sum']:.4g}) (kJ/mol/nm)^2", flush=True)
    data = load_training_data(data_paths, mapping, max_frames=config.max_frames,
                              validation_fraction=config.validation_fraction, n_blocks=config.n_blocks,
                              force_map=config.force_map)
    if list(data.train.bead_type_names) != mapping.bead_type_names:
        raise TrainingDataError(f"{mapping_path}: bead types differ from those of the data")

    started = time.perf_counter()
    if resume:
        try:
            saved = read_checkpoint(out_dir)
            model = model_from_checkpoint(saved, source=str(out_dir / CHECKPOINT_PT))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot resume: {exc}") from exc
        if "train_state" not in saved:
            raise TrainingError(f"{out_dir / CHECKPOINT_PT}: holds no training state (finished model from elsewhere?)")
        check_resume_provenance(saved, mapping, config, model_overrides, out_dir / CHECKPOINT_PT)
        trainer = Trainer(model, data, config, device, world)
        trainer.load_resume_state(saved["train_state"], saved["optimizer"], saved["state_dict"])
    else:
        model = build_model(data, config.quick, config.use_temperature, config.seed, model_overrides, config.prior_form)
        trainer = Trainer(model, data, config, device, world)
    # Only now, with data and model known to be usable, is anything written, and by rank 0 alone (the
    # other ranks have read all they need: building the Trainer waited for all of them). An old model
    # that is replaced stays in place until the new one is finished.
    epochs_this_call = 0
    target = io.output_dir(out_dir, "model", replace) if world.is_main else contextlib.nullcontext(out_dir)
    try:
        with target as work:
            if world.is_main:
                prepare_output_dir(work, resume)
                mapping.save(work / MAPPING_JSON)

            def after_epoch(t: Trainer) -> None:
                nonlocal epochs_this_call
                if world.is_main:
                    save_progress(t, work, mapping.sha256())
                epochs_this_call += 1
                if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                    raise _Interrupt

            trainer.fit(on_epoch_end=after_epoch, show_progress=show_progress)
            if trainer.state.epoch == 0:
                raise TrainingError("no epoch was run (epochs must be >= 1)")
            if world.is_main:
                save_progress(trainer, work, mapping.sha256())  # also covers a resumed run that had nothing left to do
            return finish(trainer, data, mapping, work, time.perf_counter() - started)
    except _Interrupt:
        return {}


class _Interrupt(Exception):
    pass


def finish(trainer: Trainer, data: TrainingData, mapping, out_dir: Path, seconds: float) -> dict:
    """Best weights, metrics, loss curve and the TorchScript export (evaluated by all ranks, written by rank 0)."""
    from openmm_cgnn.model import export_for_frames

    model = trainer.model
    model.load_state_dict(trainer.best_state_dict)
    state = trainer.state
    metrics = {
        "format": METRICS_FORMAT,
        "units": {"mse": "(kJ/mol/nm)^2", "rmse": "kJ/mol/nm", "mae": "kJ/mol/nm", "force_rms": "kJ/mol/nm"},
        "note": "errors over Cartesian force components of the model with the lowest validation MSE",
        **evaluate_metrics(trainer, data),
        "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch,
        "stopped_early": state.stopped_early,
        "history": state.history,
        "data": data.describe(),
        "train_config": asdict(trainer.config),
        "model": {
            "hparams": model.config.to_dict(),
            "n_trainable_parameters": int(sum(p.numel() for p in trainer.trainable)),
        },
        "timing": {
            "seconds_this_call": seconds,
            "seconds_training_total": float(sum(h["seconds"] for h in state.history)),
            "train_frames_per_second": _frames_per_second(state.history, len(trainer.train_frames)),
            "processes": trainer.world.size,
        },
    }
    if not trainer.world.is_main:
        return metrics
    write_json_atomic(out_dir / METRICS_JSON, metrics)
    plot_loss_curve(state.history, out_dir / LOSS_CURVE_PNG, {
        "constant per type (validation)": metrics["baselines"]["constant_per_type"]["validation"]["overall"]["mse"],
        "prior only (validation)": metrics["baselines"]["prior_only"]["validation"]["overall"]["mse"],
    })
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    export_for_frames(cpu_model, data.train, out_dir / MODEL_PT, mapping_sha256=mapping.sha256())
    return metrics


def _frames_per_second(history: list[dict], n_frames: int) -> float | None:
    seconds = sum(h["seconds"] for h in history)
    return None if seconds <= 0 else n_frames * len(history) / seconds
