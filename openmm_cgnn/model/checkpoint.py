"""Model directory I/O: ``checkpoint.pt``, ``hparams.json`` and ``prior.json`` (docs/contracts.md §3).

The eager model is rebuilt from the saved hyper-parameters and prior, then the weights are loaded,
so a checkpoint never depends on pickled classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..layout import CHECKPOINT_PT, HPARAMS_JSON, MODEL_PT, PRIOR_JSON
from .config import HybridGraphConfig
from .hybridgraph import CGModel
from ..io import atomic_checkpoint, file_sha256, verify_checksum, write_text_atomic
from .priors import PriorSet


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
    with atomic_checkpoint(model_dir / CHECKPOINT_PT) as temporary:
        torch.save(payload, temporary)
    write_text_atomic(model_dir / HPARAMS_JSON, json.dumps(hparams, indent=2) + "\n")
    if model.prior is not None:
        model.prior.to_json(model_dir / PRIOR_JSON)
    return model_dir / CHECKPOINT_PT


def read_checkpoint(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dictionary (for resuming: optimizer state, epoch, extras)."""
    path = Path(model_dir)
    path = path / CHECKPOINT_PT if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (expected {CHECKPOINT_PT} in the model directory)")
    verify_checksum(path, required=False)  # models of older versions have no checksum file
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: cannot read checkpoint ({exc})") from None
    for key in ("hparams", "state_dict"):
        if not isinstance(payload, dict) or key not in payload:
            raise ValueError(f"{path}: checkpoint lacks {key!r}")
    return payload


def model_from_checkpoint(payload: dict[str, Any], source: str = CHECKPOINT_PT) -> CGModel:
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
    model = model_from_checkpoint(payload, source=str(path / CHECKPOINT_PT if path.is_dir() else path))
    return model.eval()


def model_mapping_sha256(source: str | os.PathLike) -> str | None:
    """The ``mapping_sha256`` a model was trained with: from ``checkpoint.pt``, else from ``model.pt``'s metadata.

    ``source`` is a model directory, an export directory or a ``model.pt``; None when neither records it.
    """
    from .export import read_metadata

    source = Path(source)
    folder = source if source.is_dir() else source.parent
    if source.is_dir() and (folder / CHECKPOINT_PT).is_file():
        recorded = read_checkpoint(folder).get("mapping_sha256")
        if recorded:
            return str(recorded)
    model_pt = source if source.is_file() else folder / MODEL_PT
    if model_pt.is_file():
        try:
            return read_metadata(model_pt).get("mapping_sha256") or None
        except (OSError, ValueError):
            return None
    return None


def check_model_mapping(source: str | os.PathLike, mapping_sha256: str, mapping_path: str | os.PathLike) -> None:
    """Refuse a mapping other than the one the model was trained with (a model is a function of its beads)."""
    from ..mapping.spec import MappingError

    recorded = model_mapping_sha256(source)
    if recorded is not None and recorded != mapping_sha256:
        raise MappingError(f"{mapping_path}: this mapping (sha256 {mapping_sha256[:12]}) is not the one the model in "
                         f"{source} was trained with (sha256 {recorded[:12]}); use the model's own mapping.json")


def model_fingerprint(source: str | os.PathLike) -> str:
    """SHA-256 of the file that defines a model: ``checkpoint.pt`` of a model directory, else the ``model.pt``."""
    source = Path(source)
    if source.is_dir():
        source = source / CHECKPOINT_PT if (source / CHECKPOINT_PT).is_file() else source / MODEL_PT
    return file_sha256(source)
