"""Training data: mapped CG frames from one or more runs, split by contiguous time blocks.

Every run directory is read through ``openmm_cgnn.mapping.spec.load_cg_frames`` (contracts §2), so
AA runs are mapped and CG runs are read as beads by the same code the evaluation stage uses. Runs at
different temperatures concatenate; each frame keeps its own temperature for the 1/T input.

Validation frames are whole contiguous blocks of each run, never random frames: consecutive MD
frames are strongly correlated, so a random split would score the model on near-copies of its
training frames. By default the last ``validation_fraction`` (20 %) of every run is validation.
With ``n_blocks > 1`` each run is cut into that many equal blocks and the tail of every block is
validation (interleaved blocks), which keeps a slowly drifting run represented in both sets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # the mapping module imports heavy readers; only needed for types here
    from openmm_cgnn.mapping.spec import CGFrames, CGMapping


DEFAULT_VALIDATION_FRACTION = 0.2


class TrainingDataError(ValueError):
    """Training data that cannot be used; the message names the run directory or file."""


def time_block_split(
    n_frames: int, validation_fraction: float = DEFAULT_VALIDATION_FRACTION, n_blocks: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices ``(train, validation)`` of one run, validation = the tail of each time block.

    Each of the ``n_blocks`` equal contiguous blocks contributes its last
    ``round(block_length * validation_fraction)`` frames (at least one) to validation, and the rest
    to training (at least one as well). A run too short for that raises ``TrainingDataError``.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise TrainingDataError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if n_blocks < 1:
        raise TrainingDataError(f"n_blocks must be >= 1, got {n_blocks}")
    if n_frames < 2 * n_blocks:
        raise TrainingDataError(
            f"{n_frames} frames cannot be split into {n_blocks} train/validation block(s): "
            f"need at least {2 * n_blocks}"
        )
    edges = np.linspace(0, n_frames, n_blocks + 1).round().astype(int)
    train, validation = [], []
    for start, stop in zip(edges[:-1], edges[1:]):
        length = stop - start
        n_val = min(max(1, round(length * validation_fraction)), length - 1)
        train.append(np.arange(start, stop - n_val))
        validation.append(np.arange(stop - n_val, stop))
    return np.concatenate(train), np.concatenate(validation)


def check_finite(cg: "CGFrames", source: str) -> None:
    """Raise naming ``source`` and the first bad frame when positions, forces or box are not finite."""
    for field in ("positions", "forces", "box"):
        values = getattr(cg, field)
        if values is None:
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            frame = int(np.argmax(bad))
            raise TrainingDataError(
                f"{source}: {field} contain NaN or inf in {int(bad.sum())} frame(s), first at frame {frame}"
            )
    if len(cg.box) and not (np.linalg.det(cg.box.astype(np.float64)) > 0).all():
        raise TrainingDataError(f"{source}: box vectors are degenerate (non-positive volume)")


def load_run(path: str | Path, mapping: "CGMapping", max_frames: int | None = None, force_map: str | None = None) -> "CGFrames":
    """One run directory (AA or CG) as ``CGFrames`` with forces, checked for mapping mismatch and NaN.

    ``max_frames`` keeps that many evenly spaced frames rather than the first ones, so the time-block
    split still sees the whole trajectory. ``force_map`` ("optimal", "sum") picks how AA forces are mapped.
    """
    from openmm_cgnn.mapping.spec import load_cg_frames

    path = Path(path)
    if not path.exists():
        raise TrainingDataError(f"{path}: data directory or file does not exist")
    try:
        cg = load_cg_frames(path, mapping, force_map=force_map, require_forces=True, max_frames=max_frames)
    except (KeyError, ValueError, OSError) as exc:
        # The readers name the bad field; prefix the run so several --data dirs stay distinguishable.
        message = str(exc)
        raise TrainingDataError(message if str(path) in message else f"{path}: {message}") from exc
    if cg.forces is None:
        raise TrainingDataError(f"{path}: the frames have no forces; force matching needs them")
    check_finite(cg, str(path))
    return cg


def topology_difference(a: "CGFrames", b: "CGFrames") -> str | None:
    """None when two runs have the same CG topology, else what differs (for the error message)."""
    if a.n_beads != b.n_beads:
        return f"{a.n_beads} vs {b.n_beads} beads"
    if not a.same_topology(b):
        return "bead types or molecule assignment differ"
    return None


@dataclass
class TrainingData:
    """Train and validation frames (one CG topology) plus where they came from."""

    train: "CGFrames"
    validation: "CGFrames"
    sources: list[str]
    frames_per_source: list[int]
    validation_fraction: float
    n_blocks: int

    def describe(self) -> dict:
        """JSON-ready summary for hparams.json and metrics.json."""
        temperatures = sorted({float(t) for t in np.concatenate([self.train.temperature_K, self.validation.temperature_K])})
        return {
            "sources": self.sources,
            "frames_per_source": self.frames_per_source,
            "n_train_frames": int(len(self.train.positions)),
            "n_validation_frames": int(len(self.validation.positions)),
            "n_beads": int(len(self.train.bead_type)),
            "bead_type_names": list(self.train.bead_type_names),
            "temperatures_K": temperatures,
            "force_map": self.train.force_map,
            "split": {
                "method": "contiguous time blocks per run; the tail of each block is validation",
                "validation_fraction": self.validation_fraction,
                "n_blocks": self.n_blocks,
            },
        }

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the frames used, so a resumed run can refuse different data."""
        digest = hashlib.sha256()
        for part in (self.train, self.validation):
            for array in (part.positions, part.forces, part.box, part.temperature_K, part.bead_type):
                digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps(list(self.train.bead_type_names)).encode())
        return digest.hexdigest()


def split_runs(
    runs: Sequence["CGFrames"],
    sources: Sequence[str],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    n_blocks: int = 1,
) -> TrainingData:
    """Split each run by time blocks and concatenate the parts of all runs."""
    from openmm_cgnn.mapping.spec import CGFrames

    if not runs:
        raise TrainingDataError("no training data given")
    for run, source in zip(runs[1:], sources[1:]):
        difference = topology_difference(runs[0], run)
        if difference is not None:
            raise TrainingDataError(
                f"{source}: CG topology differs from {sources[0]} ({difference}); "
                "all --data runs must describe the same system"
            )
    train_parts, validation_parts = [], []
    for run, source in zip(runs, sources):
        try:
            train_idx, val_idx = time_block_split(len(run.positions), validation_fraction, n_blocks)
        except TrainingDataError as exc:
            raise TrainingDataError(f"{source}: {exc}") from exc
        train_parts.append(run.select(train_idx))
        validation_parts.append(run.select(val_idx))
    return TrainingData(
        train=CGFrames.concatenate(train_parts),
        validation=CGFrames.concatenate(validation_parts),
        sources=[str(s) for s in sources],
        frames_per_source=[int(len(r.positions)) for r in runs],
        validation_fraction=validation_fraction,
        n_blocks=n_blocks,
    )


def with_force_map(data: Sequence[str | Path], mapping: "CGMapping", max_frames: int | None = None) -> tuple["CGMapping", dict]:
    """``mapping`` with the optimal force map fitted on the AA runs in ``data`` when it has none
    (a version-1 mapping.json), and the fit's report (empty when nothing was fitted)."""
    from openmm_cgnn.frames import read_frames
    from openmm_cgnn.mapping.forcemap import fit_force_map

    if mapping.has_force_map:
        return mapping, {}
    runs = []
    for path in data:
        try:
            frames = read_frames(path, require_forces=True, max_frames=max_frames)
        except (KeyError, ValueError, OSError) as exc:
            message = str(exc)
            raise TrainingDataError(message if str(path) in message else f"{path}: {message}") from exc
        if frames.kind == "aa":
            runs.append(frames)
    if not runs:  # CG runs only: their forces are already bead forces, no map is involved
        return mapping, {}
    try:
        return fit_force_map(mapping, runs)
    except ValueError as exc:
        raise TrainingDataError(f"fitting the optimal force map failed: {exc}") from exc


def load_training_data(
    data: Sequence[str | Path],
    mapping: "CGMapping",
    max_frames: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    n_blocks: int = 1,
    force_map: str | None = None,
) -> TrainingData:
    """Read every run in ``data`` through the mapping and split it (see the module docstring)."""
    runs = [load_run(path, mapping, max_frames=max_frames, force_map=force_map) for path in data]
    return split_runs(runs, [str(p) for p in data], validation_fraction, n_blocks)


@dataclass
class FrameTensors:
    """Frames as tensors on the training device; batches are index selections of these."""

    positions: torch.Tensor  # (F, N, 3)
    forces: torch.Tensor  # (F, N, 3)
    box: torch.Tensor  # (F, 3, 3)
    temperature_K: torch.Tensor  # (F,)

    @classmethod
    def from_cg(cls, cg: "CGFrames", device: torch.device | str, dtype: torch.dtype = torch.float32) -> "FrameTensors":
        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

        return cls(tensor(cg.positions), tensor(cg.forces), tensor(cg.box), tensor(cg.temperature_K))

    def __len__(self) -> int:
        return self.positions.shape[0]

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Yield index tensors of batches: shuffled with ``generator``, in order without it."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size].to(self.positions.device)
