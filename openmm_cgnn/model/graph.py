"""The bead graph every architecture reads: built once per call by ``CGEnergy`` from the pair lists.

Two pair lists, both half lists (each unordered pair once, so a network sends messages both ways):

- ``intra``: all pairs inside a molecule (``SystemTensors.intra_i/j``), valid within the
  intramolecular cutoff;
- ``inter``: the neighbour search's pairs of beads in different molecules, valid where found
  (padding slots are invalid).

Frames are flattened: node ``b * n_beads + i`` is bead ``i`` of frame ``b``, and pair ``p`` of a list
joins nodes ``index_i[p]`` and ``index_j[p]``. ``vectors`` are minimum-image ``r_j - r_i`` (nm);
``distance`` is their length where valid and the list's cutoff elsewhere, with finite (zero)
gradients there, so a network may divide by it. Invalid pairs carry real bead indices and finite
values; an architecture must weight them by zero (``valid``, or the smooth envelope, which is 0
at and past the cutoff). The structures are NamedTuples, so they script with TorchScript and
trace under torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .geometry import pair_vectors, safe_norm, smooth_envelope


class Pairs(NamedTuple):
    """One pair list, flattened over the frames of a batch (B frames, P pairs per frame)."""

    vectors: Tensor   # (B*P, 3) minimum-image r_j - r_i, nm
    distance: Tensor  # (B*P,) |vectors| where valid, the cutoff elsewhere
    valid: Tensor     # (B*P,) bool
    index_i: Tensor   # (B*P,) long, flat node index (b * n_beads + i)
    index_j: Tensor   # (B*P,) long


class BeadGraph(NamedTuple):
    """The intramolecular and intermolecular pairs of B frames of N beads (module docstring)."""

    batch: int
    n_beads: int
    intra: Pairs
    inter: Pairs


def make_pairs(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor, valid: Optional[Tensor],
               cutoff: float, within_cutoff: bool = False) -> Pairs:
    """Pairs of frame-local indices (B, P) of positions (B, N, 3); ``valid`` None: within ``cutoff``.
    ``within_cutoff``: keep only the ``valid`` pairs within ``cutoff`` (a list built with a skin)."""
    vectors = pair_vectors(positions, box, index_i, index_j)
    if valid is None or within_cutoff:
        within = (vectors * vectors).sum(-1) < cutoff * cutoff
        valid = within if valid is None else valid & within
    distance = safe_norm(vectors, valid, cutoff)
    offset = (torch.arange(positions.shape[0], device=positions.device) * positions.shape[1]).unsqueeze(1)
    return Pairs(vectors.reshape(-1, 3), distance.reshape(-1), valid.reshape(-1),
                 (index_i + offset).reshape(-1), (index_j + offset).reshape(-1))


def pair_weight(pairs: Pairs, cutoff: float) -> Tensor:
    """The smooth envelope of each pair (B*P,), 0 for invalid pairs: every architecture's cutoff."""
    return torch.where(pairs.valid, smooth_envelope(pairs.distance, cutoff), torch.zeros_like(pairs.distance))
