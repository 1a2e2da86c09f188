"""Static-shape neighbour search between beads of different molecules under periodic boundaries.

Both searches return a *half* pair list (each unordered pair once) of fixed capacity
``ceil(N * max_pairs_per_bead / 2)`` with a validity mask: the output shapes depend only on the
number of beads, and no step reads a device value on the host, so the whole search can be
captured in a CUDA graph (openmm-torch ``useCUDAGraphs``). Selected pairs are packed into the
list with a prefix sum and a scatter instead of ``nonzero``; padding slots point at distinct beads
(:func:`spread_padding`). Overflow is reported per frame in ``count > capacity`` and in the
returned flags (bits of :class:`~openmm_cgnn.model.geometry.Flag`); the eager model turns them into
an error, the exported module into NaN energy and forces (model/export.py).

- ``dense``: minimum image over all N^2 bead pairs. Fewest kernels; best below a few thousand beads.
- ``cell``: a fixed grid of >= 3 cells per box vector (cell widths >= cutoff), each cell holding at
  most a fixed number of beads; candidates come from the 27 surrounding cells. The grid is fixed
  when the module is built (from a box), so a shrinking box is flagged, never silently wrong.

Both are plain TorchScript (no custom operators), so a saved model needs nothing at load time.

- ``VerletNeighborSearch`` wraps either for single-system use where a host read is allowed (the
  exported host-reading module): it keeps a list built with ``cutoff + skin`` and reuses it
  while no bead has moved more than half the skin, which finds exactly the pairs a fresh search
  would (Verlet's argument), at a fraction of the cost.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Tuple

import torch
from torch import Tensor, nn

from .geometry import (
    Flag,
    all_pair_distance2,
    minimum_image,
    pair_vectors,
    box_too_small,
    box_widths,
    fractional_coordinates,
    minimum_image_distance2,
)

# index_i, index_j, valid (all (B, C)), count (B,), flags (B,)
PairList = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def pair_capacity(n_beads: int, max_pairs_per_bead: float) -> int:
    return max(1, int(math.ceil(n_beads * max_pairs_per_bead / 2.0)))


def spread_padding(index_i: Tensor, index_j: Tensor, valid: Tensor, n_beads: int) -> Tuple[Tensor, Tensor]:
    """Point the invalid (padding) slots of a pair list at distinct beads: slot k gets the pair
    (k mod N, (k + 1) mod N).

    Padding carries zero weight, but the ``index_add``s of the network and the backwards of its
    ``index_select``s and ``gather``s still touch its rows; all on one row, as ``compact`` leaves
    them, that is one atomic add per padding slot to a single address on a GPU. Valid slots are
    unchanged, so results for the pairs found are the same bit for bit.
    """
    slot = torch.arange(index_i.shape[1], device=index_i.device).unsqueeze(0)
    pad_i = torch.remainder(slot, n_beads)
    pad_j = torch.remainder(slot + 1, n_beads)
    return torch.where(valid, index_i, pad_i), torch.where(valid, index_j, pad_j)


def compact(selected: Tensor, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Positions of the True entries of ``selected[B, M]`` packed into ``capacity`` slots per row.

    Returns (source[B, C] long, valid[B, C] bool, count[B] long). Slots past ``count`` point at
    entry 0 and are invalid (:func:`spread_padding` moves them off it). Entries beyond the capacity
    are dropped (``count`` still counts them).
    """
    batch = selected.shape[0]
    size = selected.shape[1]
    rank = torch.cumsum(selected, dim=1)  # 1-based rank of each selected entry
    count = rank[:, -1] if size > 0 else torch.zeros(batch, dtype=torch.long, device=selected.device)
    # Kept entries go to column `rank`; unselected ones to the throw-away column 0, those past the
    # capacity to the throw-away column capacity + 1. Few passes over the (large) candidate set.
    target = torch.clamp(torch.where(selected, rank, 0), max=capacity + 1)
    source = torch.arange(size, device=selected.device).unsqueeze(0).expand(batch, size)
    packed = torch.zeros(batch, capacity + 2, dtype=torch.long, device=selected.device)
    # Columns past `count` are never written, so they keep pointing at entry 0.
    packed = packed.scatter(1, target, source)[:, 1:capacity + 1]
    valid = torch.arange(capacity, device=selected.device).unsqueeze(0) < count.unsqueeze(1)
    return packed, valid, count


class DenseNeighborSearch(nn.Module):
    """Minimum-image all-pairs search with a static-capacity output."""

    def __init__(self, cutoff: float, max_pairs_per_bead: float):
        super().__init__()
        self.cutoff = float(cutoff)
        self.max_pairs_per_bead = float(max_pairs_per_bead)

    def forward(self, positions: Tensor, box: Tensor, molecule_index: Tensor) -> PairList:
        batch, n_beads = positions.shape[0], positions.shape[1]
        capacity = pair_capacity(n_beads, self.max_pairs_per_bead)
        with torch.no_grad():
            distance2 = all_pair_distance2(positions, box)
            beads = torch.arange(n_beads, device=positions.device)
            candidate = (beads.unsqueeze(1) < beads.unsqueeze(0)) & (
                molecule_index.unsqueeze(1) != molecule_index.unsqueeze(0)
            )
            selected = (distance2 < self.cutoff * self.cutoff) & candidate.unsqueeze(0)
            source, valid, count = compact(selected.reshape(batch, n_beads * n_beads), capacity)
            index_i = torch.div(source, n_beads, rounding_mode="floor")
            index_j = source - index_i * n_beads
            index_i, index_j = spread_padding(index_i, index_j, valid, n_beads)
            flags = torch.where(count > capacity, Flag.PAIR_OVERFLOW.value, 0)
            flags = flags | torch.where(box_too_small(box, self.cutoff), Flag.BOX_TOO_SMALL.value, 0)
        return index_i, index_j, valid, count, flags


def _half_stencil() -> Tensor:
    """The cell itself and the 13 lexicographically positive neighbour offsets: with >= 3 cells per
    axis, of any two adjacent cells exactly one sees the other through this stencil."""
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(27, 3)
    forward = [o for o in offsets.tolist() if o > [0, 0, 0]]
    return torch.tensor([[0, 0, 0]] + forward, dtype=torch.long)


def _candidate_difference(values: Tensor, candidates: Tensor) -> Tensor:
    """values (B, N) of one coordinate; candidates (B, N * K) -> differences (B, N, K) to each owner."""
    batch, n_beads = values.shape[0], values.shape[1]
    return torch.gather(values, 1, candidates).reshape(batch, n_beads, -1) - values.unsqueeze(-1)


class CellNeighborSearch(nn.Module):
    """Cell-list search on a grid fixed at construction (see :func:`cell_grid_for_box`).

    Each bead looks at its own cell (partners with a larger index) and at 13 of the 26 adjacent
    cells (all partners), so each pair is found once. Cells hold at most
    ``ceil(capacity_factor * N / cells) + 4`` beads; more is flagged as a cell overflow.
    """

    def __init__(self, cutoff: float, max_pairs_per_bead: float, grid: List[int], capacity_factor: float = 2.0):
        super().__init__()
        self.cutoff = float(cutoff)
        self.max_pairs_per_bead = float(max_pairs_per_bead)
        self.capacity_factor = float(capacity_factor)
        self.grid: List[int] = [1, 1, 1]
        self.register_buffer("grid_sizes", torch.ones(3, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", _half_stencil(), persistent=False)
        self.set_grid(grid)

    @torch.jit.ignore
    def set_grid(self, grid: List[int]) -> None:
        grid = [int(g) for g in grid]
        if len(grid) != 3 or min(grid) < 3:
            raise ValueError(
                f"cell neighbour search: grid {grid} needs at least 3 cells per box vector; the box is "
                f"too small for a cell list with cutoff {self.cutoff} nm (use neighbor_backend='dense')"
            )
        self.grid = grid
        self.grid_sizes.copy_(torch.tensor(grid, dtype=torch.long))

    def cell_capacity(self, n_beads: int) -> int:
        n_cells = self.grid[0] * self.grid[1] * self.grid[2]
        return int(math.ceil(self.capacity_factor * n_beads / n_cells)) + 4

    def forward(self, positions: Tensor, box: Tensor, molecule_index: Tensor) -> PairList:
        batch, n_beads = positions.shape[0], positions.shape[1]
        capacity = pair_capacity(n_beads, self.max_pairs_per_bead)
        n_b, n_c = self.grid[1], self.grid[2]
        n_cells = self.grid[0] * n_b * n_c
        per_cell = self.cell_capacity(n_beads)
        n_offsets = self.offsets.shape[0]
        device = positions.device
        with torch.no_grad():
            cell3 = (fractional_coordinates(positions, box) * self.grid_sizes).long()
            cell3 = torch.minimum(cell3, self.grid_sizes - 1)
            cell = (cell3[..., 0] * n_b + cell3[..., 1]) * n_c + cell3[..., 2]
            # Rank of each bead inside its cell: sort by cell, subtract the start of the cell's run.
            order = torch.argsort(cell, dim=1, stable=True)
            sorted_cell = torch.gather(cell, 1, order)
            run_start = torch.searchsorted(sorted_cell, sorted_cell)
            beads = torch.arange(n_beads, device=device)
            rank = torch.empty_like(order).scatter(1, order, beads.unsqueeze(0) - run_start)
            cell_overflow = (rank >= per_cell).any(dim=1)
            slot = torch.where(rank < per_cell, cell * per_cell + rank, torch.full_like(rank, n_cells * per_cell))
            table = torch.full((batch, n_cells * per_cell + 1), n_beads, dtype=torch.long, device=device)
            table = table.scatter(1, slot, beads.unsqueeze(0).expand(batch, n_beads))
            # Candidates (B, N, 14 * per_cell): every slot of the stencil cells around each bead.
            around3 = (cell3.unsqueeze(2) + self.offsets) % self.grid_sizes
            around = (around3[..., 0] * n_b + around3[..., 1]) * n_c + around3[..., 2]
            slots = around.unsqueeze(-1) * per_cell + torch.arange(per_cell, device=device)
            per_bead = n_offsets * per_cell
            candidate = torch.gather(table, 1, slots.reshape(batch, n_beads * per_bead)).reshape(batch, n_beads, per_bead)
            owner = beads.reshape(1, n_beads, 1)
            own_cell = (torch.arange(per_bead, device=device) < per_cell).reshape(1, 1, per_bead)
            usable = (candidate < n_beads) & ((candidate > owner) | ~own_cell)
            candidate_safe = torch.clamp(candidate, max=n_beads - 1)
            flat = candidate_safe.reshape(batch, n_beads * per_bead)
            # gather, not advanced indexing: several times faster on CPU for this many candidates
            candidate_molecule = torch.gather(molecule_index.unsqueeze(0).expand(batch, n_beads), 1, flat)
            usable = usable & (candidate_molecule.reshape(batch, n_beads, per_bead) != molecule_index.reshape(1, n_beads, 1))
            distance2 = minimum_image_distance2(_candidate_difference(positions[..., 0], flat),
                                                _candidate_difference(positions[..., 1], flat),
                                                _candidate_difference(positions[..., 2], flat), box)
            selected = usable & (distance2 < self.cutoff * self.cutoff)
            source, valid, count = compact(selected.reshape(batch, n_beads * per_bead), capacity)
            index_i = torch.div(source, per_bead, rounding_mode="floor")
            index_j = torch.gather(flat, 1, source)
            index_i, index_j = spread_padding(index_i, index_j, valid, n_beads)
            flags = torch.where(count > capacity, Flag.PAIR_OVERFLOW.value, 0)
            flags = flags | torch.where(cell_overflow, Flag.CELL_OVERFLOW.value, 0)
            # The grid is only valid while every cell is at least one cutoff wide.
            narrow = (box_widths(box) < self.cutoff * self.grid_sizes.to(box.dtype)).any(dim=1)
            flags = flags | torch.where(narrow | box_too_small(box, self.cutoff), Flag.BOX_TOO_SMALL.value, 0)
        return index_i, index_j, valid, count, flags


def all_within(positions: Tensor, reference: Tensor, box: Tensor, limit: float) -> Tensor:
    """Whether no bead moved more than ``limit`` (minimum image) from ``reference``; NaN compares false,
    so non-finite positions count as moved."""
    moved = minimum_image(positions - reference, box)
    return ((moved * moved).sum(-1) <= limit * limit).all()


class VerletNeighborSearch(nn.Module):
    """A pair list with a skin, rebuilt only when a bead has moved more than half the skin.

    ``inner`` searches with ``cutoff + skin`` (its own capacity); each call keeps the listed pairs
    that are within ``cutoff`` now, packed into the capacity of ``fallback`` (a search with
    ``cutoff``), so the output is the pair set of a fresh search, possibly in another order. The
    list is rebuilt when any bead moved more than ``skin / 2`` (minimum image) since it was built,
    when the box changed, or when the positions are not finite. If the skin search overflows or
    flags the box, ``fallback`` answers that call. One frame per call; the decision to rebuild is
    read on the host, so this is for the exported host-reading module (never the graph-safe one).
    The module changes its own buffers: one instance serves one trajectory at a time.
    """

    def __init__(self, inner: nn.Module, fallback: nn.Module, cutoff: float, skin: float, n_beads: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not skin > 0:
            raise ValueError(f"VerletNeighborSearch: skin must be positive, got {skin}")
        self.inner = inner
        self.fallback = fallback
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.max_pairs_per_bead = float(fallback.max_pairs_per_bead)
        self.n_beads = int(n_beads)
        # Filled at the first call (empty until then, so a saved model stays small). In the model's
        # dtype: the positions compared are exactly those the list was built from.
        self.register_buffer("reference_positions", torch.zeros(1, 0, 3, dtype=dtype))
        self.register_buffer("reference_box", torch.zeros(1, 3, 3, dtype=dtype))
        self.register_buffer("list_i", torch.zeros(1, 0, dtype=torch.long))
        self.register_buffer("list_j", torch.zeros(1, 0, dtype=torch.long))
        self.register_buffer("list_valid", torch.zeros(1, 0, dtype=torch.bool))
        self.register_buffer("has_list", torch.zeros(1, dtype=torch.bool))
        # Calls and rebuilds so far (benchmarks report the reuse rate).
        self.register_buffer("calls", torch.zeros(1, dtype=torch.long))
        self.register_buffer("rebuilds", torch.zeros(1, dtype=torch.long))

    def forward(self, positions: Tensor, box: Tensor, molecule_index: Tensor) -> PairList:
        if positions.shape[0] != 1 or positions.shape[1] != self.n_beads:
            return self.fallback(positions, box, molecule_index)
        positions = positions.detach()  # indices only: no graph needed
        self.calls.add_(1)
        rebuild = not bool(self.has_list[0]) or not torch.equal(box, self.reference_box.to(box.dtype))
        if not rebuild:  # non-finite positions count as moved and force a fresh search
            rebuild = not bool(all_within(positions, self.reference_positions.to(positions.dtype), box, 0.5 * self.skin))
        use_list = True
        if rebuild:
            self.rebuilds.add_(1)
            index_i, index_j, valid, count, flags = self.inner(positions, box, molecule_index)
            use_list = int(flags[0]) == 0  # else the skin search overflowed or the box is too small for it
            if use_list:
                self.reference_positions = positions.to(self.reference_box.dtype).clone()
                self.reference_box = box.to(self.reference_box.dtype).clone()
                self.list_i = index_i
                self.list_j = index_j
                self.list_valid = valid
            self.has_list.fill_(use_list)
        if not use_list:
            return self.fallback(positions, box, molecule_index)
        vectors = pair_vectors(positions, box, self.list_i, self.list_j)
        within = self.list_valid & ((vectors * vectors).sum(-1) < self.cutoff * self.cutoff)
        capacity = pair_capacity(self.n_beads, self.max_pairs_per_bead)
        source, valid, count = compact(within, capacity)
        index_i, index_j = spread_padding(torch.gather(self.list_i, 1, source), torch.gather(self.list_j, 1, source),
                                          valid, self.n_beads)
        # No box check: the box is the one the skin search accepted (torch.equal above), wider still.
        flags = torch.where(count > capacity, Flag.PAIR_OVERFLOW.value, 0)
        return index_i, index_j, valid, count, flags


# A host-side finder: positions (1, N, 3), box (1, 3, 3) -> (index_i (P,), index_j (P,), flags) of exactly
# the intermolecular pairs within its reach; ``compile()`` puts its static-shape part under torch.compile.
PairFinder = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor, int]]
# function -> the same function compiled (static shapes), e.g. openmm/engines.compiled_or_eager
Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]


class CandidateFinder:
    """All intermolecular pairs i < j as fixed candidates, kept by distance with ``nonzero`` (a host
    read): no N^2 mask to pack into a static capacity, as the graph-safe dense search must."""

    def __init__(self, molecule_index: Tensor, reach: float):
        n_beads = int(molecule_index.shape[0])
        index_i, index_j = torch.triu_indices(n_beads, n_beads, 1, device=molecule_index.device)
        other = molecule_index[index_i] != molecule_index[index_j]
        self.index_i, self.index_j = index_i[other], index_j[other]
        self.reach = float(reach)
        self.mask: Callable[..., Tensor] = candidates_within

    def compile(self, compiler: Compiler) -> None:
        self.mask = compiler(candidates_within)

    def __call__(self, positions: Tensor, box: Tensor) -> Tuple[Tensor, Tensor, int]:
        if bool(box_too_small(box, self.reach).any()):
            return self.index_i[:0], self.index_j[:0], Flag.BOX_TOO_SMALL.value
        keep = torch.nonzero(self.mask(positions, box, self.index_i, self.index_j, self.reach)).reshape(-1)
        return self.index_i[keep], self.index_j[keep], 0


def candidates_within(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor, reach: float) -> Tensor:
    """Which candidate pairs (P,) of one frame are closer than ``reach``."""
    vectors = pair_vectors(positions, box, index_i, index_j)[0]
    return (vectors * vectors).sum(-1) < reach * reach


class SearchFinder:
    """A static-capacity search (the cell list of large systems) cut to the pairs it found; its
    capacity doubles when it overflows."""

    def __init__(self, make_search: Callable[[float], nn.Module], max_pairs_per_bead: float, molecule_index: Tensor,
                 search: nn.Module):
        self.make_search = make_search  # max_pairs_per_bead (at the cutoff) -> the search with the reach
        self.max_pairs_per_bead = float(max_pairs_per_bead)
        self.search = search  # make_search(max_pairs_per_bead), already built
        self.run: Callable[..., PairList] = self.search
        self.molecule_index = molecule_index
        self.compiler: Compiler | None = None

    def compile(self, compiler: Compiler) -> None:
        self.compiler = compiler
        self.run = compiler(self.search)

    def __call__(self, positions: Tensor, box: Tensor) -> Tuple[Tensor, Tensor, int]:
        index_i, index_j, valid, count, flags = self.run(positions, box, self.molecule_index)
        while int(flags[0]) == Flag.PAIR_OVERFLOW.value:
            self.max_pairs_per_bead *= 2.0
            self.search = self.run = self.make_search(self.max_pairs_per_bead)
            if self.compiler is not None:
                self.compile(self.compiler)
            index_i, index_j, valid, count, flags = self.run(positions, box, self.molecule_index)
        found = int(count[0])  # valid pairs come first: the search packs them
        return index_i[0, :found], index_j[0, :found], int(flags[0])


class SkinPairList:
    """A pair list with a skin kept *outside* a compiled module (host side, plain Python).

    The compiled PythonForce engine cannot read the device inside its graph, so the graph-safe
    module searches afresh at every call over the full pair capacity. This holder searches outside
    the graph instead, with ``cutoff + skin`` (a :data:`PairFinder`), and hands the module the same
    list (``SystemForce.energy_of_pairs``, which drops the pairs past the cutoff) until a bead has
    moved more than half the skin (Verlet's argument: exactly the pairs of a fresh search are in
    it), the box changed, or the positions are not finite. The list's length is the pairs found
    rounded up to a ``granularity`` with ``margin`` head-room, and only ever grows: a compiled graph
    has static shapes, so each new length is one more compilation, and a liquid's pair count barely
    moves. A box too small for the reach comes back as flags, for the caller to answer.
    """

    def __init__(self, finder: PairFinder, skin: float, n_beads: int, granularity: int = 256, margin: float = 1.05):
        self.finder = finder
        self.skin = float(skin)
        self.n_beads = int(n_beads)
        self.granularity = int(granularity)
        self.margin = float(margin)
        self.within: Callable[..., Tensor] = all_within
        self.capacity = 0
        self.calls = 0
        self.rebuilds = 0
        self.reference: Tensor | None = None
        self.reference_box: Tensor | None = None
        self.pairs: Tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def create(cls, backend: str, cutoff: float, max_pairs_per_bead: float, skin: float, box: Tensor,
               molecule_index: Tensor, cell_capacity_factor: float = 2.0, **options: Any) -> "SkinPairList | None":
        """The list for one system and box (1, 3, 3); None when the box is too small for ``cutoff + skin``."""
        n_beads = int(molecule_index.shape[0])
        search = skin_search(backend, cutoff, max_pairs_per_bead, skin, box, n_beads, cell_capacity_factor)
        if search is None:
            return None
        finder: PairFinder
        if isinstance(search, DenseNeighborSearch):
            finder = CandidateFinder(molecule_index, cutoff + skin)
        else:
            finder = SearchFinder(
                lambda per_bead: skin_search(backend, cutoff, per_bead, skin, box, n_beads, cell_capacity_factor),
                max_pairs_per_bead, molecule_index, search)
        return cls(finder, skin, n_beads, **options)

    def compile(self, compiler: Compiler) -> None:
        """The finder's static part and the displacement check through ``compiler`` (torch.compile with
        a fallback): eager, their few dozen small ops cost a good part of the compiled energy."""
        self.finder.compile(compiler)
        self.within = compiler(all_within)

    def needs_rebuild(self, positions: Tensor, box: Tensor) -> bool:
        if self.pairs is None or self.reference is None or not torch.equal(box, self.reference_box):
            return True
        return not bool(self.within(positions, self.reference, box, 0.5 * self.skin))

    def __call__(self, positions: Tensor, box: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
        """(index_i, index_j, valid (1, capacity), flags) for positions (1, N, 3) and box (1, 3, 3)."""
        positions = positions.detach()
        self.calls += 1
        if not self.needs_rebuild(positions, box):
            assert self.pairs is not None
            return (*self.pairs, 0)
        self.rebuilds += 1
        if bool(torch.isfinite(positions).all()):
            with torch.no_grad():
                found_i, found_j, flags = self.finder(positions, box)
        else:  # flagged before the finder: a NaN cell index cannot be searched
            flags = Flag.NONFINITE.value
        if flags:  # no list: the caller answers the flags
            self.pairs = None
            empty = torch.zeros(1, 0, dtype=torch.long, device=positions.device)
            return empty, empty, empty > 0, flags
        found = int(found_i.shape[0])
        if found > self.capacity:
            self.capacity = max(self.granularity,
                                int(math.ceil(self.margin * found / self.granularity)) * self.granularity)
        keep = torch.arange(self.capacity, device=positions.device).unsqueeze(0) < found
        index_i = torch.zeros(1, self.capacity, dtype=torch.long, device=positions.device)
        index_j = torch.zeros_like(index_i)
        index_i[0, :found], index_j[0, :found] = found_i, found_j
        index_i, index_j = spread_padding(index_i, index_j, keep, self.n_beads)
        self.pairs = (index_i, index_j, keep)
        self.reference, self.reference_box = positions.clone(), box.clone()
        return index_i, index_j, keep, 0

    def report(self) -> dict[str, Any]:
        return {"pair_list": "skin list outside the compiled graph", "finder": type(self.finder).__name__,
                "skin_nm": self.skin, "capacity": self.capacity, "calls": self.calls, "rebuilds": self.rebuilds}


def cell_grid_for_box(box: Tensor, cutoff: float) -> List[int]:
    """Cells per box vector so each cell is at least ``cutoff`` wide (smallest box of a batch)."""
    box = box.detach().to(torch.float64).cpu().reshape(-1, 3, 3)
    widths = box_widths(box).min(dim=0).values
    return [int(math.floor(float(w) / cutoff)) for w in widths]


# From benchmarks/results/neighbors_cpu.json: the cell list overtakes the dense search between
# 512 and 1024 beads at liquid density.
AUTO_CELL_MIN_BEADS = 1024


def choose_backend(backend: str, n_beads: int | None, box: Tensor | None, cutoff: float) -> str:
    """Resolve "auto" to "dense" or "cell" for a system size and box."""
    if backend != "auto":
        return backend
    if box is None or n_beads is None or n_beads < AUTO_CELL_MIN_BEADS:
        return "dense"
    return "cell" if min(cell_grid_for_box(box, cutoff)) >= 3 else "dense"


def make_neighbor_search(
    backend: str, cutoff: float, max_pairs_per_bead: float, cell_capacity_factor: float = 2.0,
    box: Tensor | None = None, n_beads: int | None = None,
) -> nn.Module:
    """The search named ``backend`` ("auto", "dense" or "cell"); "cell" needs a box to fix its grid."""
    backend = choose_backend(backend, n_beads, box, cutoff)
    if backend == "dense":
        return DenseNeighborSearch(cutoff, max_pairs_per_bead)
    if backend == "cell":
        if box is None:
            raise ValueError("neighbor_backend='cell' needs the box (3x3 nm) to fix the cell grid")
        grid = cell_grid_for_box(box, cutoff)
        return CellNeighborSearch(cutoff, max_pairs_per_bead, grid, cell_capacity_factor)
    raise ValueError(f"neighbor_backend: unknown backend {backend!r}; choose 'auto', 'dense' or 'cell'")


# Skin of the reused pair list (nm): the list grows by ((rc + skin) / rc)^3 and is rebuilt after a
# bead moved skin / 2; measured in benchmarks/bench_md.py (CG liquids at 6-10 fs steps).
DEFAULT_SKIN_NM = 0.1


def skin_search(
    backend: str, cutoff: float, max_pairs_per_bead: float, skin: float, box: Tensor, n_beads: int,
    cell_capacity_factor: float = 2.0,
) -> nn.Module | None:
    """The search with ``cutoff + skin`` of a reused pair list (its capacity grown by the volume), or
    None when the skin is 0 or the box is too small for it."""
    reach = cutoff + skin
    if not skin > 0 or bool(box_too_small(box.reshape(-1, 3, 3).to(torch.float64), reach).any()):
        return None
    inner_backend = backend if backend != "cell" else ("cell" if min(cell_grid_for_box(box, reach)) >= 3 else "dense")
    return make_neighbor_search(inner_backend, reach, max_pairs_per_bead * (reach / cutoff) ** 3, cell_capacity_factor,
                                box, n_beads)


def make_verlet_search(
    backend: str, cutoff: float, max_pairs_per_bead: float, skin: float, box: Tensor, n_beads: int,
    cell_capacity_factor: float = 2.0, dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The search for one exported system: a :class:`VerletNeighborSearch` when the box fits a
    search with ``cutoff + skin`` (else the plain search with ``cutoff``)."""
    plain = make_neighbor_search(backend, cutoff, max_pairs_per_bead, cell_capacity_factor, box, n_beads)
    inner = skin_search(backend, cutoff, max_pairs_per_bead, skin, box, n_beads, cell_capacity_factor)
    return plain if inner is None else VerletNeighborSearch(inner, plain, cutoff, skin, n_beads, dtype)


def count_intermolecular_pairs(positions: Tensor, box: Tensor, molecule_index: Tensor, cutoff: float) -> Tensor:
    """Number of bead pairs in different molecules closer than ``cutoff``, per frame (B,)."""
    count = []
    for frame in range(positions.shape[0]):
        search = DenseNeighborSearch(cutoff, max_pairs_per_bead=1.0)
        count.append(search(positions[frame:frame + 1], box[frame:frame + 1], molecule_index)[3])
    return torch.cat(count)


def suggest_max_pairs_per_bead(
    positions: Tensor, box: Tensor, molecule_index: Tensor, cutoff: float, margin: float = 1.3
) -> float:
    """A ``max_pairs_per_bead`` with ``margin`` head-room over the densest frame given."""
    n_beads = positions.shape[1]
    most = int(count_intermolecular_pairs(positions, box, molecule_index, cutoff).max())
    return float(math.ceil(margin * 2.0 * most / n_beads))
