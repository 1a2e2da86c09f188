"""Periodic boxes in numpy: minimum image and box checks, the one home of these for every stage.

Boxes are OpenMM's: rows are the box vectors a, b, c in reduced form (a along x, b in the xy
plane). The model's TorchScript twin of :func:`minimum_image` is
``openmm_cgnn.model.geometry.minimum_image`` (same convention: subtract c, then b, then a).
The analyses accept orthorhombic boxes only (:func:`orthorhombic_lengths`) and image with the
edge lengths (:func:`minimum_image_orthorhombic`), in the caller's dtype and without copies of
the box.
"""

from __future__ import annotations

from typing import Any

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


def minimum_image_orthorhombic(delta: np.ndarray, lengths: Any) -> np.ndarray:
    """Shortest periodic image of displacement vectors; ``lengths`` (edge lengths, or one edge of a
    cube) broadcasts against ``delta``. Same result as :func:`minimum_image` for orthorhombic boxes."""
    return delta - lengths * np.round(delta / lengths)


def minimum_image(delta: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Shortest periodic image of displacement vectors, as float64.

    ``delta`` is (F, ..., 3) and ``box`` (F, 3, 3) with rows a, b, c in OpenMM's reduced form
    (a along x, b in the xy plane), so subtracting c, then b, then a is exact for orthorhombic boxes
    and OpenMM's own convention for triclinic ones.
    """
    d = np.array(delta, dtype=np.float64, copy=True)
    b = np.asarray(box, dtype=np.float64).reshape((box.shape[0],) + (1,) * (d.ndim - 2) + (3, 3))
    for axis in (2, 1, 0):
        vec = b[..., axis, :]
        shift = np.round(d[..., axis] / vec[..., axis])
        d -= shift[..., None] * vec
    return d
