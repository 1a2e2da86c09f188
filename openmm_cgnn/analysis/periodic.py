"""Periodic-box helpers shared by the analyses (orthorhombic boxes only)."""

from __future__ import annotations

import numpy as np


def orthorhombic_lengths(box: np.ndarray, source: str = "box") -> np.ndarray:
    """Edge lengths (F, 3) in nm of a (F, 3, 3) box array whose rows are the box vectors.

    Triclinic boxes are refused rather than treated approximately: the minimum-image
    convention used here would give wrong distances for them.
    """
    box = np.asarray(box, dtype=np.float64)
    if box.ndim != 3 or box.shape[1:] != (3, 3):
        raise ValueError(f"{source}: expected box of shape (F, 3, 3), got {box.shape}")
    if box.shape[0] == 0:
        raise ValueError(f"{source}: no frames")
    lengths = np.diagonal(box, axis1=1, axis2=2).copy()
    off_diagonal = box - lengths[:, :, None] * np.eye(3)[None]
    if np.any(np.abs(off_diagonal) > 1e-6 * np.max(lengths)):
        raise ValueError(
            f"{source}: triclinic box vectors are not supported by the analysis "
            "(only orthorhombic boxes)"
        )
    if not np.all(np.isfinite(lengths)) or np.any(lengths <= 0):
        raise ValueError(f"{source}: box edge lengths must be positive and finite")
    return lengths


def minimum_image(delta: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Shortest periodic image of displacement vectors; ``lengths`` broadcasts against ``delta``."""
    return delta - lengths * np.round(delta / lengths)
