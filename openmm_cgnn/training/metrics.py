"""Force-error statistics per bead type, reference baselines, and the loss-curve plot.

Errors are over Cartesian force components (kJ/mol/nm): MSE in (kJ/mol/nm)^2, MAE in kJ/mol/nm.
The mapped instantaneous CG force contains the fluctuating force of the removed atoms, which no
function of bead positions can predict, so the absolute MSE alone says little. Two references give
it scale: the best constant-per-type model (the mean training force per bead type, ~0; its error
is the force variance) and the fitted priors alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..io import save_figure

if TYPE_CHECKING:
    from .distributed import World


class ForceErrorAccumulator:
    """Streams batches of predicted and reference forces; sums squared/absolute errors per type."""

    def __init__(self, n_types: int) -> None:
        self.n_types = n_types
        self.sum_sq = torch.zeros(n_types, dtype=torch.float64)
        self.sum_abs = torch.zeros(n_types, dtype=torch.float64)
        self.sum_ref_sq = torch.zeros(n_types, dtype=torch.float64)
        self.count = torch.zeros(n_types, dtype=torch.float64)

    @torch.no_grad()
    def add(self, predicted: torch.Tensor, reference: torch.Tensor, bead_type: torch.Tensor) -> None:
        """``predicted``/``reference``: (B, N, 3); ``bead_type``: (N,)."""
        error = (predicted.detach() - reference.detach()).double()
        per_bead_sq = error.square().sum(dim=(0, 2)).cpu()  # (N,)
        per_bead_abs = error.abs().sum(dim=(0, 2)).cpu()
        per_bead_ref = reference.detach().double().square().sum(dim=(0, 2)).cpu()
        types = bead_type.cpu()
        self.sum_sq.index_add_(0, types, per_bead_sq)
        self.sum_abs.index_add_(0, types, per_bead_abs)
        self.sum_ref_sq.index_add_(0, types, per_bead_ref)
        per_type_beads = torch.bincount(types, minlength=self.n_types).double()
        self.count += per_type_beads * error.shape[0] * error.shape[2]

    def all_reduce(self, world: "World", device: torch.device) -> None:
        """Sum the accumulated errors over all ranks (nothing to do in a world of one)."""
        if not world.distributed:
            return
        stacked = torch.stack([self.sum_sq, self.sum_abs, self.sum_ref_sq, self.count])
        self.sum_sq, self.sum_abs, self.sum_ref_sq, self.count = world.all_reduce_sum(stacked, device).unbind(0)

    def mse(self) -> float:
        return float(self.sum_sq.sum() / self.count.sum().clamp(min=1))

    def result(self, type_names: Sequence[str]) -> dict:
        """``{"overall": stats, "per_type": {name: stats}}``; stats: mse, rmse, mae, reference rms, n."""

        def stats(sq, ab, ref, n) -> dict:
            n = float(n)
            if n == 0:
                return {"mse": None, "rmse": None, "mae": None, "force_rms": None, "n_components": 0}
            return {
                "mse": float(sq / n),
                "rmse": float(np.sqrt(sq / n)),
                "mae": float(ab / n),
                "force_rms": float(np.sqrt(ref / n)),
                "n_components": int(n),
            }

        return {
            "overall": stats(self.sum_sq.sum(), self.sum_abs.sum(), self.sum_ref_sq.sum(), self.count.sum()),
            "per_type": {
                name: stats(self.sum_sq[i], self.sum_abs[i], self.sum_ref_sq[i], self.count[i])
                for i, name in enumerate(type_names)
            },
        }


def mean_force_per_type(forces: np.ndarray, bead_type: np.ndarray, n_types: int) -> np.ndarray:
    """(n_types, 3) mean force of each bead type over frames and beads: the best constant model."""
    forces = np.asarray(forces, dtype=np.float64)
    sums = np.zeros((n_types, 3))
    np.add.at(sums, bead_type, forces.sum(axis=0))
    counts = np.bincount(bead_type, minlength=n_types).astype(np.float64) * len(forces)
    return sums / np.maximum(counts, 1.0)[:, None]


def constant_model_errors(
    reference: np.ndarray, bead_type: np.ndarray, means: np.ndarray, type_names: Sequence[str]
) -> dict:
    """Error stats of predicting ``means[bead_type]`` for every frame of ``reference`` (F, N, 3)."""
    accumulator = ForceErrorAccumulator(len(type_names))
    reference_t = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    predicted = torch.as_tensor(means[bead_type]).expand_as(reference_t)
    accumulator.add(predicted, reference_t, torch.as_tensor(bead_type, dtype=torch.int64))
    return accumulator.result(type_names)


def plot_loss_curve(history: Sequence[dict], path: str | Path, baselines: dict | None = None) -> None:
    """Train/validation force MSE per epoch (log scale), with the reference errors as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_mse"] for h in history], label="train")
    ax.plot(epochs, [h["validation_mse"] for h in history], label="validation")
    for (label, value), style in zip((baselines or {}).items(), ("--", ":", "-.")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="grey", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("force MSE [(kJ/mol/nm)$^2$]")
    ax.set_yscale("log")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
