"""Force matching: fit the Hybridgraph network (on top of fixed, fitted priors) to mapped CG forces.

The loss is the mean squared difference between the model's forces (prior + network, the negative
gradient of the energy) and the mapped forces, over all Cartesian components. Adam with plateau
learning-rate decay and early stopping on the validation loss; the model kept is the one with the
lowest validation loss.

Resuming is exact: the checkpoint written after every epoch holds the latest weights, the optimizer,
scheduler and early-stopping state, the loss history and the RNG states, and each epoch's shuffling
comes from a generator seeded by (seed, epoch). An interrupted run resumed with ``resume=True``
therefore ends with the same weights as one that was never interrupted.

Under ``torchrun`` (see ``distributed.py``) ``batch_size`` is the global batch: each rank computes
its share of every batch, the loss is weighted so that DistributedDataParallel's average of the
ranks' gradients is the gradient of the whole batch's mean squared error, and the loss and
validation sums are all-reduced, so W processes follow the trajectory of one process to float
rounding. The batch order depends only on (seed, epoch), so a run can resume on another number of
processes: bit for bit on the same number, to float rounding on another.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..layout import CHECKPOINT_PT, HPARAMS_JSON, LOSS_CURVE_PNG, MAPPING_JSON, METRICS_JSON, MODEL_PT, PRIOR_JSON
from .data import FrameTensors, TrainingData
from .distributed import World
from .metrics import ForceErrorAccumulator

# Files this stage writes into MODELDIR (--overwrite replaces the whole directory: see openmm_cgnn.io).
OUTPUT_FILES = (CHECKPOINT_PT, HPARAMS_JSON, PRIOR_JSON, METRICS_JSON, MAPPING_JSON, MODEL_PT, LOSS_CURVE_PNG)


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad resume state, wrong device, diverged loss)."""


@dataclass
class TrainConfig:
    """Optimisation and data settings; saved in metrics.json and the checkpoint."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_decay_factor: float = 0.5
    lr_patience: int = 5  # epochs without validation improvement before the LR is cut
    min_lr: float = 1e-6
    early_stopping_patience: int = 15
    # Clip on the loss normalised by the force variance (see Trainer.loss_scale): a rare close contact
    # in a batch can otherwise throw the weights far off in one step.
    grad_clip_norm: float | None = 10.0
    seed: int = 0
    device: str = "cpu"
    validation_fraction: float = 0.2
    n_blocks: int = 1
    max_frames: int | None = None
    use_temperature: bool = False
    quick: bool = False
    force_map: str = "optimal"  # how AA forces become labels: "optimal" (mapping/forcemap.py) or "sum"
    prior_form: str = "tabulated"  # bonded priors: "tabulated" (Boltzmann inversion splines) or "harmonic"

    # Fields that may differ between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("epochs", "device", "early_stopping_patience")

    def comparable(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; asking for CUDA without one is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' requested but no CUDA device is available")
    return device


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A fresh generator per epoch makes the batch order independent of everything before it,
    # which is what lets a resumed run shuffle exactly as the uninterrupted one.
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


@dataclass
class TrainState:
    """Everything beyond the weights needed to continue training exactly."""

    epoch: int = 0  # completed epochs
    best_validation_mse: float = math.inf
    best_epoch: int = 0
    epochs_since_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


class _Forces(torch.nn.Module):
    """The model's forces as ``forward``: DistributedDataParallel hooks into a module's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, positions: torch.Tensor, box: torch.Tensor, bead_type: torch.Tensor,
                molecule_index: torch.Tensor, inverse_temperature: torch.Tensor | None,
                create_graph: bool, terms: str) -> torch.Tensor:
        _, forces = self.model.energy_and_forces(positions, box, bead_type, molecule_index, inverse_temperature,
                                                 create_graph=create_graph, terms=terms)
        return forces


class Trainer:
    """Owns a model, its optimizer and scheduler, and the frames it trains on.

    ``model`` must provide ``energy_and_forces(positions, box, bead_type, molecule_index,
    inverse_temperature, create_graph)``; the prior parameters in it are not optimised. With a
    ``world`` of several processes the torch.distributed process group must already be set up.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: TrainingData,
        config: TrainConfig,
        device: torch.device,
        world: World = World(),
    ) -> None:
        self.model = model.to(device)
        self.data = data
        self.config = config
        self.device = device
        self.world = world
        self.rank_batch_size = world.check_batch_size(config.batch_size)
        self.train_frames = FrameTensors.from_cg(data.train, device)
        self.validation_frames = FrameTensors.from_cg(data.validation, device)
        self.bead_type = torch.as_tensor(data.train.bead_type, dtype=torch.int64, device=device)
        self.molecule_index = torch.as_tensor(data.train.molecule_index, dtype=torch.int64, device=device)
        self.n_types = len(data.train.bead_type_names)
        # Normalising by the mean squared training force makes the optimised loss ~1 at the start
        # whatever the system's force scale, so one clipping threshold fits all systems.
        self.loss_scale = 1.0 / max(float(np.mean(np.square(data.train.forces, dtype=np.float64))), 1e-12)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise TrainingError("the model has no trainable parameters")
        self._forces = _Forces(self.model)
        # Training steps go through DDP, which averages the gradients over the ranks during
        # backward (and makes every rank start from rank 0's weights). The buffers are fixed or
        # per-process caches, so they are not broadcast at every step. Some parameters never get
        # a gradient from a force loss (the read-out bias only shifts the energy), hence
        # find_unused_parameters; their gradients stay None, as in a single process.
        self._training_forces = self._forces if not world.distributed else torch.nn.parallel.DistributedDataParallel(
            self._forces, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=True,
        )
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_decay_factor, patience=config.lr_patience, min_lr=config.min_lr
        )
        self.state = TrainState()
        self.last_gradient_norms: dict[str, float] = {}
        self.best_state_dict = copy.deepcopy(self.model.state_dict())

    # ------------------------------------------------------------------ model calls
    def _inverse_temperature(self, frames: FrameTensors, index: torch.Tensor) -> torch.Tensor | None:
        if not self.config.use_temperature:
            return None
        return 1.0 / frames.temperature_K[index]

    def predict_forces(
        self, frames: FrameTensors, index: torch.Tensor, create_graph: bool, terms: str = "all"
    ) -> torch.Tensor:
        module = self._training_forces if create_graph else self._forces
        try:
            forces = module(
                frames.positions[index],
                frames.box[index],
                self.bead_type,
                self.molecule_index,
                self._inverse_temperature(frames, index),
                create_graph,
                terms,
            )
        except RuntimeError as exc:
            if "frame" in str(exc) and ("capacity" in str(exc) or "cell" in str(exc)):
                raise TrainingError(f"model cannot evaluate a training frame: {exc}") from exc
            raise
        return forces

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, progress: Any = None) -> float:
        """One pass over the training frames; returns the mean force MSE seen during the pass."""
        self.model.train()
        generator = _epoch_generator(self.config.seed, self.state.epoch)
        total, count = 0.0, 0
        norms: list[float] = []
        # Every rank draws the same global batches; each takes its share of every one.
        for batch in self.train_frames.batches(self.config.batch_size, generator):
            index, weight = batch[self.world.share(len(batch))], 1.0
            if len(index) == 0:
                # The epoch's last batch has fewer frames than there are ranks. This rank must still
                # join DDP's gradient all-reduce: it computes one frame that counts zero.
                index, weight = batch[:1], 0.0
            predicted = self.predict_forces(self.train_frames, index, create_graph=True)
            squared_error = torch.sum((predicted - self.train_frames.forces[index]) ** 2) * weight
            # The loss is the mean over the components of the whole global batch; DDP averages the
            # ranks' gradients, so each rank's share of the sum is scaled by the number of ranks.
            components = len(batch) * predicted[0].numel()
            batch_sum = self.world.all_reduce_sum(squared_error.detach().double(), self.device)
            if not torch.isfinite(batch_sum):  # the same verdict on every rank: all stop together
                raise TrainingError(
                    f"force loss became {float(batch_sum) / components} at epoch {self.state.epoch + 1}; "
                    "lower the learning rate (--lr) or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (squared_error * (self.world.size * self.loss_scale / components)).backward()
            limit = self.config.grad_clip_norm or math.inf
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.trainable, limit)))
            self.optimizer.step()
            total += float(batch_sum) / components * len(batch)
            count += len(batch)
            if progress is not None:
                progress.update(len(batch))
        limit = self.config.grad_clip_norm or math.inf
        self.last_gradient_norms = {
            "median": float(np.median(norms)),
            "max": float(np.max(norms)),
            "clipped_fraction": float(np.mean(np.asarray(norms) > limit)),
        }
        return total / count

    def evaluate(self, frames: FrameTensors, terms: str = "all") -> ForceErrorAccumulator:
        """Force errors of the current model (or of its ``terms``) over all ``frames``.

        Each rank evaluates its share of the frames; the sums are all-reduced, so every rank gets
        the errors over all frames.
        """
        self.model.eval()
        accumulator = ForceErrorAccumulator(self.n_types)
        share = self.world.share(len(frames))
        for start in range(share.start, share.stop, self.rank_batch_size):
            index = torch.arange(start, min(start + self.rank_batch_size, share.stop), device=self.device)
            predicted = self.predict_forces(frames, index, create_graph=False, terms=terms)
            accumulator.add(predicted, frames.forces[index], self.bead_type)
        accumulator.all_reduce(self.world, self.device)
        return accumulator

    def end_epoch(self, train_mse: float, validation_mse: float, seconds: float) -> None:
        """Book-keeping after an epoch: history, best model, LR schedule, early stopping."""
        state = self.state
        state.epoch += 1
        lr = self.optimizer.param_groups[0]["lr"]
        state.history.append({
            "epoch": state.epoch, "train_mse": train_mse, "validation_mse": validation_mse, "lr": lr,
            "seconds": seconds, "gradient_norm": dict(self.last_gradient_norms),
        })
        if validation_mse < state.best_validation_mse:
            state.best_validation_mse = validation_mse
            state.best_epoch = state.epoch
            state.epochs_since_improvement = 0
            self.best_state_dict = copy.deepcopy(self.model.state_dict())
        else:
            state.epochs_since_improvement += 1
        self.scheduler.step(validation_mse)
        if state.epochs_since_improvement >= self.config.early_stopping_patience:
            state.stopped_early = True

    def fit(self, on_epoch_end: Callable[["Trainer"], None] | None = None, show_progress: bool = True) -> TrainState:
        """Train until ``config.epochs`` epochs are done or validation stops improving."""
        from ..progress import progress_bar

        frames_per_epoch = len(self.train_frames)
        # A bar on a terminal, plain lines in a log file (see openmm_cgnn.progress).
        with progress_bar(
            total=self.config.epochs * frames_per_epoch,
            initial=min(self.state.epoch, self.config.epochs) * frames_per_epoch,
            unit="frame",
            desc="force matching",
            disable=not (show_progress and self.world.is_main),
        ) as progress:
            while self.state.epoch < self.config.epochs and not self.state.stopped_early:
                started = time.perf_counter()
                train_mse = self.train_epoch(progress)
                validation_mse = self.evaluate(self.validation_frames).mse()
                self.end_epoch(train_mse, validation_mse, time.perf_counter() - started)
                progress.set_postfix(
                    epoch=self.state.epoch,
                    train=f"{train_mse:.4g}",
                    val=f"{validation_mse:.4g}",
                    lr=f"{self.optimizer.param_groups[0]['lr']:.2g}",
                )
                if on_epoch_end is not None:
                    on_epoch_end(self)
        return self.state

    # ------------------------------------------------------------------ resume state
    def resume_state(self) -> dict:
        """What the checkpoint needs beyond the contract's keys to continue exactly."""
        return {
            "format": "openmm_cgnn.train_state/1",
            "train_config": asdict(self.config),
            "world_size": self.world.size,
            "data_fingerprint": self.data.fingerprint,
            "state": asdict(self.state),
            # A copy: the caller may load other weights into the model before this is saved.
            "last_state_dict": copy.deepcopy(self.model.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
            },
        }

    def load_resume_state(self, saved: dict, optimizer_state: dict, best_state_dict: dict) -> None:
        if saved.get("format") != "openmm_cgnn.train_state/1":
            raise TrainingError("checkpoint has no training state to resume from (was it written by training?)")
        previous = TrainConfig(**saved["train_config"]).comparable()
        changed = {k: (previous[k], v) for k, v in self.config.comparable().items() if previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise TrainingError(f"cannot resume with different settings ({details}); use --overwrite to start again")
        if saved["data_fingerprint"] != self.data.fingerprint:
            raise TrainingError("cannot resume: the training data differ from the interrupted run's")
        self.model.load_state_dict(saved["last_state_dict"])
        self.best_state_dict = best_state_dict
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState(**saved["state"])
        saved_world = saved.get("world_size", 1)
        if saved_world != self.world.size and self.world.is_main:
            warnings.warn(
                f"resuming a run of {saved_world} process(es) on {self.world.size}: the global batches are the "
                "same, so training continues as it would have, to float rounding rather than bit for bit"
            )
        # A run resumed with more epochs than it stopped early at gets its patience back only if
        # the patience was raised; otherwise it stays stopped.
        if self.state.epochs_since_improvement < self.config.early_stopping_patience:
            self.state.stopped_early = False
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
