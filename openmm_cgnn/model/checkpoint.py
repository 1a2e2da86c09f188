"""Model directory I/O: ``checkpoint.pt``, ``hparams.json`` and ``prior.json`` (docs/contracts.md §3).

The eager model is rebuilt from the saved hyper-parameters and prior, then the weights are loaded,
so a checkpoint never depends on pickled classes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import HybridGraphConfig
from .hybridgraph import CGModel
from .priors import PriorSet, write_text_atomic

CHECKPOINT_FILE = "checkpoint.pt"
HPARAMS_FILE = "hparams.json"
PRIOR_FILE = "prior.json"


def save_checkpoint(model_dir: str | os.PathLike, model: CGModel, optimizer_state: dict | None = None,
                    epoch: int | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint.pt`` (+ ``hparams.json``, ``prior.json``) atomically; returns the checkpoint path.

    ``extra`` entries (scheduler state, RNG states, best loss, ...) are stored at the top level of
    the checkpoint next to the contract's keys, which they may not replace.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    hparams = model.config.to_dict()
    prior = model.prior.to_dict() if model.prior is not None else None
    payload: dict[str, Any] = {
        "hparams": hparams,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "prior": prior,
        "optimizer": optimizer_state,
        "epoch": epoch,
    }
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {clash} would replace the checkpoint's own fields")
    payload.update(extra or {})
    handle, temporary = tempfile.mkstemp(dir=model_dir, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, model_dir / CHECKPOINT_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    write_text_atomic(model_dir / HPARAMS_FILE, json.dumps(hparams, indent=2) + "\n")
    if model.prior is not None:
        model.prior.to_json(model_dir / PRIOR_FILE)
    return model_dir / CHECKPOINT_FILE


def read_checkpoint(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dictionary (for resuming: optimizer state, epoch, extras)."""
    path = Path(model_dir)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (expected {CHECKPOINT_FILE} in the model directory)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: cannot read checkpoint ({exc})") from None
    for key in ("hparams", "state_dict"):
        if not isinstance(payload, dict) or key not in payload:
            raise ValueError(f"{path}: checkpoint lacks {key!r}")
    return payload


def model_from_checkpoint(payload: dict[str, Any], source: str = CHECKPOINT_FILE) -> CGModel:
    try:
        config = HybridGraphConfig.from_dict(payload["hparams"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: hparams: {exc}") from None
    prior = None
    if payload.get("prior") is not None:
        prior = PriorSet.from_dict(payload["prior"], config.bead_type_names, source=f"{source}: prior")
    model = CGModel(config, prior)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not match the hyper-parameters ({exc})") from None
    return model


def load_model(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> CGModel:
    """Rebuild the eager :class:`CGModel` (network + prior) saved by :func:`save_checkpoint`."""
    path = Path(model_dir)
    payload = read_checkpoint(path, map_location)
    model = model_from_checkpoint(payload, source=str(path / CHECKPOINT_FILE if path.is_dir() else path))
    return model.eval()
