"""Tabulated continuous filters: the Hybridgraph stacks of a frozen model, interpolated in r.

Each ``InteractionBlock``'s filter ``filter_net(gaussian_basis(r)) * envelope(r)`` depends on the
pair distance alone. Once the weights are frozen (an exported module), it can be tabulated on a
grid over [0, cutoff] and interpolated: one row lookup and a cubic per pair replace the Gaussian
basis, two linear layers, a softplus and the envelope of every block.

Per interval the table holds a cubic Hermite polynomial in t = (r - r_k) / h built from the exact
values *and* exact derivatives (float64, forward-mode autograd) at both nodes, so the filters and
their r-derivatives (the forces) are continuous across the nodes, and both go to zero at the cutoff
as the C2 envelope does. All blocks of a stack share one table ``(intervals + 1, 4 * blocks *
filters)``; its last row is zero and is what pairs at or beyond the cutoff and invalid pairs read,
so their filters are exactly zero. The message passing itself stays the blocks' own
(:meth:`InteractionBlock.update`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .geometry import smooth_envelope
from .graph import Pairs
from .hybridgraph import CGEnergy, InteractionStack
from .layers import gaussian_basis

# 2048 intervals: the interpolation error is then at or below the float32 rounding of the exact
# module for every Gaussian basis in use. The filters vary on the Gaussians' spacing cutoff/(G-1)
# and the cubic's error goes as (interval / spacing)^4, so the finest basis decides: max |F_tab -
# F_exact| / rms network force (bench_filter_table.py; float32 floor = exact float32 vs float64):
#   16 Gaussians (quick, trained, real CG frame): 128: 4.3e-4, 256: 6.4e-5, 512: 1.9e-5 (floor 1.7e-5)
#   32 Gaussians (cpu chain's 64-feature model, trained): 256: 3.1e-4, 512: 1.6e-4 (floor 1.6e-4)
#   80 Gaussians (published basis, untrained): 512: 3.6e-4, 1024: 5.2e-5, 2048: 1.2e-5 (floor 2.0e-5)
# A larger table costs no measurable time (TorchScript host-reading module, 32 and 100 ion pairs:
# 512, 2048 and 4096 within noise). It holds (intervals + 1) x 4 x blocks x filters values: 2 MB per
# stack of the quick network, 25 MB for the published intramolecular stack.
DEFAULT_FILTER_INTERVALS = 2048


def exact_filters(stack: InteractionStack, distance: Tensor) -> Tensor:
    """The filters of all blocks of ``stack`` (P, blocks * filters) at distances (P,), all valid."""
    radial = gaussian_basis(distance, stack.centers, stack.gamma)
    weight = smooth_envelope(distance, stack.cutoff)
    return torch.cat([block.filters(radial, weight) for block in stack.blocks], dim=-1)


def hermite_table(stack: InteractionStack, intervals: int) -> Tensor:
    """Cubic coefficients (intervals + 1, 4 * blocks * filters) in the stack's dtype; last row zero."""
    exact = copy.deepcopy(stack).double()
    nodes = torch.linspace(0.0, exact.cutoff, intervals + 1, dtype=torch.float64)
    spacing = exact.cutoff / intervals
    with torch.no_grad():  # forward mode only: d/dr of every filter in one pass
        values, slopes = torch.func.jvp(lambda r: exact_filters(exact, r), (nodes,), (torch.ones_like(nodes),))
    slopes = slopes * spacing  # d/dt
    y0, y1, d0, d1 = values[:-1], values[1:], slopes[:-1], slopes[1:]
    coefficients = torch.stack([y0, d0, 3.0 * (y1 - y0) - 2.0 * d0 - d1, 2.0 * (y0 - y1) + d0 + d1], dim=1)
    rows = coefficients.reshape(intervals, -1)
    return torch.cat([rows, torch.zeros_like(rows[:1])]).to(stack.centers.dtype)


class TabulatedInteractionStack(nn.Module):
    """An :class:`InteractionStack` with its filters read from a cubic table (module docstring).

    Same ``forward(x, pairs) -> x`` as the exact stack, to interpolation accuracy; it shares the
    blocks (their ``to_filters``/``to_features`` layers do the message passing). The table is a
    snapshot of the filter weights: for frozen (exported) models only.
    """

    def __init__(self, stack: InteractionStack, intervals: int = DEFAULT_FILTER_INTERVALS):
        super().__init__()
        if intervals < 1:
            raise ValueError(f"filter table intervals must be positive, got {intervals!r}")
        self.cutoff = float(stack.cutoff)
        self.intervals = int(intervals)
        self.inverse_spacing = self.intervals / self.cutoff
        self.blocks = stack.blocks
        self.width = int(stack.blocks[0].to_filters.out_features)  # filters per block
        self.register_buffer("table", hermite_table(stack, self.intervals))

    def filters(self, pairs: Pairs) -> Tensor:
        """The filters of all blocks (P, blocks * filters); exactly 0 for invalid pairs and r >= cutoff."""
        u = pairs.distance * self.inverse_spacing
        inside = pairs.valid & (pairs.distance < self.cutoff)
        # clamped after the cast, so that a NaN distance (cast to any integer) still indexes inside
        # the table; pairs outside read the zero row
        row = torch.clamp(u.detach().floor().to(torch.long), 0, self.intervals - 1)
        row = torch.where(inside, row, torch.full_like(row, self.intervals))
        t = (u - row.to(u.dtype)).unsqueeze(-1)
        c = self.table.index_select(0, row).reshape(row.shape[0], 4, -1)
        return c[:, 0] + t * (c[:, 1] + t * (c[:, 2] + t * c[:, 3]))

    def forward(self, x: Tensor, pairs: Pairs) -> Tensor:
        filters = self.filters(pairs)
        for index, block in enumerate(self.blocks):
            x = block.update(x, filters[:, index * self.width:(index + 1) * self.width], pairs.index_i, pairs.index_j)
        return x


def tabulate_filters(energy: CGEnergy, intervals: int = DEFAULT_FILTER_INTERVALS) -> CGEnergy:
    """Replace every float32 ``InteractionStack`` of a frozen ``energy`` (an exported copy) by its
    tabulated form, in place. Returns ``energy``.

    Architectures without them (PaiNN) are left as they are, and so are float64 models: the table's
    error is at float32 rounding, far above float64's, and a float64 model is chosen for precision.
    """
    if any(parameter.requires_grad for parameter in energy.parameters()):
        raise ValueError("tabulate_filters: freeze the module first (the table is a snapshot of the weights)")
    for parent in list(energy.modules()):
        for name, child in list(parent.named_children()):
            # a stack without blocks has no filters to tabulate
            if isinstance(child, InteractionStack) and child.centers.dtype == torch.float32 and len(child.blocks):
                setattr(parent, name, TabulatedInteractionStack(child, intervals))
    return energy
