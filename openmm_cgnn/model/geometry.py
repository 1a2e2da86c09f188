"""Periodic geometry and smooth cutoffs shared by the network, the priors and the neighbour search.

Boxes follow OpenMM: rows are the box vectors a, b, c in *reduced* (lower-triangular) form,
a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz). Orthorhombic boxes are the special case
bx = cx = cy = 0. The minimum image is taken by subtracting c, then b, then a, which is exact
for separations below half of min(ax, by, cz), the same rule OpenMM imposes on its cutoffs.
Everything here is TorchScript-compatible and free of host synchronisation.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor


class Flag(enum.Enum):
    """Bit flags reported per frame by the neighbour searches and the energy (CGEnergy.forward).

    The one definition of the bits: TorchScript reads ``Flag.X.value`` as a constant (it cannot
    read module-level ints), Python code uses the FLAG_* aliases below.
    """

    PAIR_OVERFLOW = 1  # more intermolecular pairs than the pair list holds
    BOX_TOO_SMALL = 2  # box under twice the cutoff (or narrower than the cell grid it was built for)
    CELL_OVERFLOW = 4  # a cell of the cell list holds more beads than its slots
    NONFINITE = 8  # positions or box vectors contain NaN/inf


FLAG_PAIR_OVERFLOW = Flag.PAIR_OVERFLOW.value
FLAG_BOX_TOO_SMALL = Flag.BOX_TOO_SMALL.value
FLAG_CELL_OVERFLOW = Flag.CELL_OVERFLOW.value
FLAG_NONFINITE = Flag.NONFINITE.value


def minimum_image(delta: Tensor, box: Tensor) -> Tensor:
    """Wrap displacement vectors ``delta[B, ..., 3]`` into the minimum image of ``box[B, 3, 3]``."""
    shape = [box.shape[0]] + [1] * (delta.dim() - 2) + [3]
    a = box[:, 0].reshape(shape)
    b = box[:, 1].reshape(shape)
    c = box[:, 2].reshape(shape)
    with torch.no_grad():
        # The lattice vector to subtract is piecewise constant in delta: found without autograd, the
        # wrap costs the backward one identity instead of a round, a division and a slice per box
        # vector. (Not `wrapped + (delta - delta.detach())`: openmm-torch's TorchForce gets zero
        # forces through that detach.) Orthorhombic boxes: bit for bit the sequential wrap.
        shift_c = c * torch.round(delta[..., 2:3] / c[..., 2:3])
        wrapped = delta - shift_c
        shift_b = b * torch.round(wrapped[..., 1:2] / b[..., 1:2])
        wrapped = wrapped - shift_b
        shift = shift_c + shift_b + a * torch.round(wrapped[..., 0:1] / a[..., 0:1])
    return delta - shift


def minimum_image_distance2(dx: Tensor, dy: Tensor, dz: Tensor, box: Tensor) -> Tensor:
    """Squared minimum-image length of displacements given per component, each (B, M, K).

    One Cartesian component at a time: contiguous planes are several times faster than
    (..., 3)-shaped arrays for the large candidate sets of the neighbour searches.
    """
    a_x = box[:, 0, 0].reshape(-1, 1, 1)
    b_x = box[:, 1, 0].reshape(-1, 1, 1)
    b_y = box[:, 1, 1].reshape(-1, 1, 1)
    c_x = box[:, 2, 0].reshape(-1, 1, 1)
    c_y = box[:, 2, 1].reshape(-1, 1, 1)
    c_z = box[:, 2, 2].reshape(-1, 1, 1)
    shift = torch.round(dz / c_z)
    dx = dx - shift * c_x
    dy = dy - shift * c_y
    dz = dz - shift * c_z
    shift = torch.round(dy / b_y)
    dx = dx - shift * b_x
    dy = dy - shift * b_y
    dx = dx - torch.round(dx / a_x) * a_x
    return dx * dx + dy * dy + dz * dz


def all_pair_distance2(positions: Tensor, box: Tensor) -> Tensor:
    """Squared minimum-image distances (B, N, N) between all beads."""
    x = positions[..., 0]
    y = positions[..., 1]
    z = positions[..., 2]
    return minimum_image_distance2(x.unsqueeze(1) - x.unsqueeze(2), y.unsqueeze(1) - y.unsqueeze(2),
                                   z.unsqueeze(1) - z.unsqueeze(2), box)


def pair_vectors(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor) -> Tensor:
    """Minimum-image vectors r_j - r_i for pair indices of shape (P,) or (B, P); returns (B, P, 3)."""
    batch = positions.shape[0]
    if index_i.dim() == 1:
        index_i = index_i.unsqueeze(0).expand(batch, -1)
        index_j = index_j.unsqueeze(0).expand(batch, -1)
    # gather, not index_select along dim 1: the latter's backward is 2-3x slower on CPU
    gather_i = index_i.unsqueeze(-1).expand(-1, -1, 3)
    gather_j = index_j.unsqueeze(-1).expand(-1, -1, 3)
    delta = torch.gather(positions, 1, gather_j) - torch.gather(positions, 1, gather_i)
    return minimum_image(delta, box)


def safe_norm(vectors: Tensor, valid: Tensor, fill: float) -> Tensor:
    """|v| where ``valid``, ``fill`` elsewhere, with finite gradients for padded (zero) vectors."""
    # the fill as a scalar: no full_like tensor per call
    return torch.sqrt(torch.where(valid, (vectors * vectors).sum(-1), fill * fill))


def box_widths(box: Tensor) -> Tensor:
    """Perpendicular widths (B, 3) of a reduced box: the distances between opposite faces."""
    a = box[:, 0]
    b = box[:, 1]
    c = box[:, 2]
    volume = torch.abs((a * torch.linalg.cross(b, c)).sum(-1))
    widths = [
        volume / torch.linalg.norm(torch.linalg.cross(b, c), dim=-1),
        volume / torch.linalg.norm(torch.linalg.cross(c, a), dim=-1),
        volume / torch.linalg.norm(torch.linalg.cross(a, b), dim=-1),
    ]
    return torch.stack(widths, dim=-1)


def box_too_small(box: Tensor, cutoff: float) -> Tensor:
    """Per-frame flag: the minimum-image rule needs 2*cutoff <= min(ax, by, cz)."""
    diagonal = torch.diagonal(box, dim1=-2, dim2=-1)
    return diagonal.min(dim=-1).values < 2.0 * cutoff


def fractional_coordinates(positions: Tensor, box: Tensor) -> Tensor:
    """Fractional coordinates in [0, 1) of positions (B, N, 3) in a reduced box (B, 3, 3)."""
    a = box[:, 0].unsqueeze(1)
    b = box[:, 1].unsqueeze(1)
    c = box[:, 2].unsqueeze(1)
    # Back-substitution for the lower-triangular box (no matrix inverse: that may sync on CUDA).
    s_c = positions[..., 2:3] / c[..., 2:3]
    s_b = (positions[..., 1:2] - s_c * c[..., 1:2]) / b[..., 1:2]
    s_a = (positions[..., 0:1] - s_c * c[..., 0:1] - s_b * b[..., 0:1]) / a[..., 0:1]
    frac = torch.cat([s_a, s_b, s_c], dim=-1)
    return frac - torch.floor(frac)


def smooth_envelope(distance: Tensor, cutoff: float) -> Tensor:
    """1 - 28x^6 + 48x^7 - 21x^8 for x = r/rc < 1, else 0.

    Equals 1 with zero slope at r = 0 and vanishes with zero first *and* second derivative at the
    cutoff, so energies and forces are continuous there (what NVE needs); the published model
    used a hard cutoff.
    """
    x = torch.clamp(distance / cutoff, 0.0, 1.0)
    # Kept expanded: the Horner form has fewer ops, but the engines' equality tests compare the
    # TorchScript and eager modules bit for bit, and its gradient does not round the same in both.
    x6 = x ** 6
    return 1.0 - 28.0 * x6 + 48.0 * x6 * x - 21.0 * x6 * x * x


def gaussian_centers(cutoff: float, count: int) -> tuple[Tensor, float]:
    """Evenly spaced Gaussian centres on [0, cutoff] and the matching exponent 1/(2 width^2)."""
    centers = torch.linspace(0.0, cutoff, count)
    width = cutoff / max(count - 1, 1)
    return centers, 0.5 / (width * width)


def shifted_softplus(x: Tensor) -> Tensor:
    return torch.nn.functional.softplus(x) - math.log(2.0)
