"""Hybridgraph: a dual-graph SchNet CG force field (intramolecular + intermolecular stacks).

- A bead-type embedding (plus, optionally, a learned shift proportional to T_ref/T - 1) starts
  two SchNet interaction stacks: one over pairs *inside* a molecule (cutoff ``intra_cutoff_nm``),
  one over pairs in *different* molecules within ``inter_cutoff_nm`` under periodic boundaries.
- Each stack uses continuous filters on Gaussian radial features, multiplied by a C2 polynomial
  envelope so energies and forces go to zero smoothly at both cutoffs.
- The two stacks' features are summed and a per-bead MLP reads out energies, summed per frame.

``CGEnergy`` (search, graph, network, priors; TorchScript) and ``CGModel`` (the eager entry point)
live here too and run whichever network ``config.architecture`` names (model/registry.py); the
network reads the pairs as a :class:`~openmm_cgnn.model.graph.BeadGraph`.

All pair lists are fixed-size with masks so the scripted model can run in a CUDA graph.
Intramolecular pairs also use the minimum image: OpenMM may hand over beads wrapped one by one
(a CG System without bonded forces has one-bead "molecules"), and the minimum image is exact for
any molecule smaller than half the box, which the box-size check guarantees for the cutoffs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .config import HybridGraphConfig
from .geometry import (
    FLAG_BOX_TOO_SMALL,
    FLAG_CELL_OVERFLOW,
    FLAG_NONFINITE,
    FLAG_PAIR_OVERFLOW,
    gaussian_centers,
)
from .graph import BeadGraph, Pairs, make_pairs, pair_weight
from .layers import BeadNetwork, ShiftedSoftplus, gaussian_basis, readout_mlp
from .neighbors import (
    CellNeighborSearch,
    DenseNeighborSearch,
    cell_grid_for_box,
    choose_backend,
    make_neighbor_search,
    pair_capacity,
)
from .priors import ExcludedVolumePrior, HarmonicAnglePrior, HarmonicBondPrior, PriorSet
from .system import SystemTensors, build_system_tensors, check_topology


class InteractionBlock(nn.Module):
    """SchNet continuous-filter convolution with a residual update."""

    def __init__(self, features: int, filters: int, n_gaussians: int):
        super().__init__()
        self.filter_net = nn.Sequential(nn.Linear(n_gaussians, filters), ShiftedSoftplus(), nn.Linear(filters, filters))
        self.to_filters = nn.Linear(features, filters, bias=False)
        self.to_features = nn.Sequential(nn.Linear(filters, features), ShiftedSoftplus(), nn.Linear(features, features))

    def forward(self, x: Tensor, radial: Tensor, weight: Tensor, index_i: Tensor, index_j: Tensor) -> Tensor:
        """x (M, F) node features of all frames; radial (P, G), weight (P,) and the flat pair indices
        (P,) hold every unordered pair once, so messages go both ways."""
        return self.update(x, self.filters(radial, weight), index_i, index_j)

    def filters(self, radial: Tensor, weight: Tensor) -> Tensor:
        """The continuous filter (P, filters) of each pair: a function of its distance alone."""
        return self.filter_net(radial) * weight.unsqueeze(-1)

    def update(self, x: Tensor, filters: Tensor, index_i: Tensor, index_j: Tensor) -> Tensor:
        """The residual update given each pair's filter (exact or tabulated: model/filter_table.py)."""
        h = self.to_filters(x)
        messages = torch.zeros_like(h)
        # index_select, not h[index]: its backward (index_add) is faster than index_put's
        messages = messages.index_add(0, index_i, h.index_select(0, index_j) * filters)
        messages = messages.index_add(0, index_j, h.index_select(0, index_i) * filters)
        return x + self.to_features(messages)


class InteractionStack(nn.Module):
    def __init__(self, blocks: int, features: int, filters: int, n_gaussians: int, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)
        centers, gamma = gaussian_centers(cutoff, n_gaussians)
        self.register_buffer("centers", centers, persistent=False)
        self.gamma = float(gamma)
        self.blocks = nn.ModuleList([InteractionBlock(features, filters, n_gaussians) for _ in range(blocks)])

    def forward(self, x: Tensor, pairs: Pairs) -> Tensor:
        radial = gaussian_basis(pairs.distance, self.centers, self.gamma)
        weight = pair_weight(pairs, self.cutoff)
        for block in self.blocks:
            x = block(x, radial, weight, pairs.index_i, pairs.index_j)
        return x


class HybridGraphNet(BeadNetwork):
    """The learned part: bead energies from intra- and intermolecular pair distances."""

    def __init__(self, config: HybridGraphConfig):
        super().__init__(config)
        self.intra = InteractionStack(config.intra_blocks, config.features, config.filters, config.n_gaussians,
                                      config.intra_cutoff_nm)
        self.inter = InteractionStack(config.inter_blocks, config.features, config.filters, config.n_gaussians,
                                      config.inter_cutoff_nm)
        self.readout = readout_mlp(config.features)

    def forward(self, bead_type: Tensor, temperature_feature: Optional[Tensor], graph: BeadGraph) -> Tensor:
        """Energy per frame (B,) float64 of the graph's B frames."""
        x = self.initial_features(bead_type, temperature_feature, graph.batch)
        return self.frame_energy(self.intra(x, graph.intra) + self.inter(x, graph.inter), graph.batch)


class CGEnergy(nn.Module):
    """Network + priors on one neighbour list; TorchScript-able, shared by eager and exported models."""

    def __init__(self, net: BeadNetwork, neighbors: nn.Module, excluded_volume: ExcludedVolumePrior,
                 bonds: HarmonicBondPrior, angles: HarmonicAnglePrior, intra_cutoff: float, inter_cutoff: float):
        super().__init__()
        self.net = net
        self.neighbors = neighbors
        self.excluded_volume = excluded_volume
        self.bonds = bonds
        self.angles = angles
        self.intra_cutoff = float(intra_cutoff)
        self.inter_cutoff = float(inter_cutoff)
        # Where a host read is allowed (CPU, or exported with host checks), cut the pair list to the
        # pairs actually found: the padding up to the static capacity costs as much as real pairs.
        self.trim_pairs = False

    def forward(self, positions: Tensor, box: Tensor, system: SystemTensors, temperature_feature: Optional[Tensor],
                use_network: bool, use_prior: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(energy (B,) float64, flags (B,) int bit mask, pair count (B,)) for positions (B, N, 3)."""
        index_i, index_j, valid, count, flags = self.neighbors(positions, box, system.molecule_index)
        if self.trim_pairs:
            # Valid pairs come first (the search packs them), so a prefix holds them all.
            used = max(1, min(int(count.max()), index_i.shape[1]))
            index_i, index_j, valid = index_i[:, :used], index_j[:, :used], valid[:, :used]
        energy = self.energy_of_pairs(positions, box, system, temperature_feature, use_network, use_prior,
                                      index_i, index_j, valid, False)
        return energy, flags, count

    def energy_of_pairs(self, positions: Tensor, box: Tensor, system: SystemTensors,
                        temperature_feature: Optional[Tensor], use_network: bool, use_prior: bool, index_i: Tensor,
                        index_j: Tensor, valid: Tensor, skin_list: bool) -> Tensor:
        """Energy (B,) float64 on a given intermolecular pair list (B, P) (``forward`` without the search).
        ``skin_list``: the list may hold pairs beyond the cutoff (built with a skin); they are dropped."""
        batch = positions.shape[0]
        inter = make_pairs(positions, box, index_i, index_j, valid, self.inter_cutoff, skin_list)
        energy = torch.zeros(batch, dtype=torch.float64, device=positions.device)
        if use_network:
            intra = make_pairs(positions, box, system.intra_i.unsqueeze(0).expand(batch, -1),
                               system.intra_j.unsqueeze(0).expand(batch, -1), None, self.intra_cutoff)
            graph = BeadGraph(batch, positions.shape[1], intra, inter)
            energy = energy + self.net(system.bead_type, temperature_feature, graph)
        if use_prior:
            energy = energy + self.bonds(positions, box, system) + self.angles(positions, box, system)
            energy = energy + self.excluded_volume(inter.distance.reshape(batch, -1), system.bead_type[index_i],
                                                   system.bead_type[index_j], inter.valid.reshape(batch, -1))
        return energy


def describe_flags(flags: int, capacity: int, count: int, cutoff: float) -> str:
    """Human-readable reasons behind a non-zero flag mask from :meth:`CGEnergy.forward`."""
    reasons = []
    if flags & FLAG_NONFINITE:
        reasons.append("positions or box contain NaN/inf")
    if flags & FLAG_BOX_TOO_SMALL:
        reasons.append(f"box smaller than twice the cutoff {cutoff} nm (or than the cell grid it was built for)")
    if flags & FLAG_PAIR_OVERFLOW:
        # in a box under twice the cutoff the minimum image crowds the list: a larger one is no cure
        cure = "a consequence of the small box" if flags & FLAG_BOX_TOO_SMALL else "raise max_pairs_per_bead"
        reasons.append(f"{count} intermolecular pairs exceed the pair capacity {capacity}: {cure}")
    if flags & FLAG_CELL_OVERFLOW:
        reasons.append("a cell-list cell overflowed: raise cell_capacity_factor or use neighbor_backend='dense'")
    return "; ".join(reasons)


class CGModel(nn.Module):
    """Eager CG force field (network + optional priors) for training and evaluation.

    ``forward(positions[B,N,3], box[B,3,3], bead_type[N], molecule_index[N], inverse_temperature[B]|None)``
    returns the energy per frame (B,) in kJ/mol as float64. ``terms`` picks "all", "network" or
    "prior". ``inverse_temperature`` is in 1/K; when omitted, the model's buffer (``set_temperature``)
    is used. Inputs are checked (NaN, box shape and size, capacity overflow) unless
    ``check_inputs`` is False.
    """

    def __init__(self, config: HybridGraphConfig, prior: PriorSet | None = None):
        super().__init__()
        if prior is not None and config.bead_type_names is not None and prior.bead_type_names != config.bead_type_names:
            raise ValueError(f"prior bead types {prior.bead_type_names} differ from the model's {config.bead_type_names}")
        if prior is not None and len(prior.bead_type_names) != config.n_bead_types:
            raise ValueError(f"prior has {len(prior.bead_type_names)} bead types, the model {config.n_bead_types}")
        self.config = config
        self.prior = prior
        self.check_inputs = True
        from .registry import build_network  # the registry imports this module

        search_cutoff = max(config.inter_cutoff_nm, prior.cutoff_nm if prior is not None and prior.excluded_volume.enabled else 0.0)
        self.search_cutoff = search_cutoff
        # The search is (re)built for each system size and box in forward(); dense until then.
        neighbors = make_neighbor_search("dense", search_cutoff, config.max_pairs_per_bead)
        names = prior.bead_type_names if prior is not None else [f"T{i}:B" for i in range(config.n_bead_types)]
        self.energy = CGEnergy(
            build_network(config), neighbors,
            prior.excluded_volume if prior is not None else ExcludedVolumePrior(names),
            prior.bonds if prior is not None else HarmonicBondPrior(),
            prior.angles if prior is not None else HarmonicAnglePrior(),
            config.intra_cutoff_nm, search_cutoff,
        )
        self.register_buffer("inverse_temperature", torch.zeros(1, dtype=torch.float64))
        self._system_cache: tuple | None = None
        self.to(getattr(torch, config.dtype))

    # ---- conveniences -------------------------------------------------------------------------
    @property
    def net(self) -> BeadNetwork:
        """The architecture's network (``config.architecture``)."""
        return self.energy.net

    @property
    def dtype(self) -> torch.dtype:
        return self.energy.net.embedding.weight.dtype

    @property
    def cutoff_nm(self) -> float:
        """The largest interaction range (network or excluded volume)."""
        return max(self.search_cutoff, self.config.intra_cutoff_nm)

    def set_temperature(self, temperature_K: float | None) -> None:
        """Default temperature for the 1/T input (ignored by models without it)."""
        if temperature_K is None:
            self.inverse_temperature.zero_()
            return
        if not (math.isfinite(temperature_K) and temperature_K > 0):
            raise ValueError(f"temperature_K must be a positive number, got {temperature_K!r}")
        self.inverse_temperature.fill_(1.0 / float(temperature_K))

    def temperature_feature(self, inverse_temperature: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.config.use_temperature:
            return None
        if inverse_temperature is None:
            if float(self.inverse_temperature) == 0.0:
                raise ValueError("this model takes 1/T: pass inverse_temperature (1/K) or call set_temperature(T)")
            inverse_temperature = self.inverse_temperature.expand(batch)
        inverse_temperature = torch.as_tensor(inverse_temperature, device=device).reshape(-1)
        if inverse_temperature.numel() == 1:
            inverse_temperature = inverse_temperature.expand(batch)
        if inverse_temperature.shape[0] != batch:
            raise ValueError(f"inverse_temperature must have one value per frame ({batch}), got {inverse_temperature.shape[0]}")
        if self.check_inputs and not bool(torch.all(inverse_temperature > 0)):
            raise ValueError("inverse_temperature must be positive (1/K)")
        return (inverse_temperature * self.config.reference_temperature_K - 1.0).to(self.dtype)

    def system_tensors(self, bead_type: Tensor, molecule_index: Tensor) -> SystemTensors:
        """Topology tensors of a system, cached for the last (bead_type, molecule_index) seen."""
        cache = self._system_cache
        if cache is not None:
            # The same, unmodified tensor objects as last time: no comparison (a device sync) needed.
            if cache[3] is bead_type and cache[4] is molecule_index and cache[5] == (bead_type._version,
                                                                                     molecule_index._version):
                return cache[2]
            if (cache[0].shape == bead_type.shape and cache[0].device == bead_type.device
                    and cache[1].shape == molecule_index.shape
                    and torch.equal(cache[0], bead_type) and torch.equal(cache[1], molecule_index)):
                return cache[2]
        check_topology(bead_type, molecule_index, self.config.n_bead_types)
        system = build_system_tensors(bead_type, molecule_index, self.prior, device=bead_type.device, dtype=self.dtype)
        self._system_cache = (bead_type.detach().clone(), molecule_index.detach().clone(), system, bead_type,
                              molecule_index, (bead_type._version, molecule_index._version))
        return system

    def _check_geometry(self, positions: Tensor, box: Tensor, n_beads: int) -> None:
        if positions.dim() != 3 or positions.shape[1] != n_beads or positions.shape[2] != 3:
            raise ValueError(f"positions must have shape (frames, {n_beads}, 3), got {tuple(positions.shape)}")
        if box.dim() != 3 or box.shape[1:] != (3, 3) or box.shape[0] != positions.shape[0]:
            raise ValueError(f"box must have shape ({positions.shape[0]}, 3, 3), got {tuple(box.shape)}")
        if not self.check_inputs:
            return
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("positions contain NaN or infinite values")
        if not bool(torch.isfinite(box).all()):
            raise ValueError("box contains NaN or infinite values")
        upper = torch.stack([box[:, 0, 1], box[:, 0, 2], box[:, 1, 2]], dim=-1)
        if bool((upper != 0).any()):
            raise ValueError("box must be in OpenMM's reduced (lower-triangular) form: a=(ax,0,0), b=(bx,by,0)")
        diagonal = torch.diagonal(box, dim1=-2, dim2=-1)
        if bool((diagonal.min(dim=-1).values < 2.0 * self.cutoff_nm).any()):
            raise ValueError(
                f"box is smaller than twice the model cutoff ({self.cutoff_nm} nm): smallest edge "
                f"{float(diagonal.min()):.4g} nm, need >= {2 * self.cutoff_nm:.4g} nm"
            )

    def _prepare_neighbor_search(self, box: Tensor, n_beads: int) -> None:
        """Pick the search for this system (reads the box on the host unless the backend is dense)."""
        config = self.config
        if config.neighbor_backend == "dense":
            return
        backend = choose_backend(config.neighbor_backend, n_beads, box, self.search_cutoff)
        current = self.energy.neighbors
        if backend == "dense":
            if not isinstance(current, DenseNeighborSearch):
                self.energy.neighbors = DenseNeighborSearch(self.search_cutoff, config.max_pairs_per_bead)
            return
        grid = cell_grid_for_box(box, self.search_cutoff)
        if isinstance(current, CellNeighborSearch):
            if grid != current.grid:
                current.set_grid(grid)
        else:
            self.energy.neighbors = CellNeighborSearch(self.search_cutoff, config.max_pairs_per_bead, grid,
                                                       config.cell_capacity_factor).to(box.device)

    # ---- energies -----------------------------------------------------------------------------
    def forward(self, positions: Tensor, box: Tensor, bead_type: Tensor, molecule_index: Tensor,
                inverse_temperature: Tensor | None = None, terms: str = "all") -> Tensor:
        if terms not in ("all", "network", "prior"):
            raise ValueError(f"terms must be 'all', 'network' or 'prior', got {terms!r}")
        if terms == "prior" and self.prior is None:
            raise ValueError("terms='prior' but this model has no prior")
        use_network = terms in ("all", "network")
        use_prior = terms in ("all", "prior") and self.prior is not None
        system = self.system_tensors(bead_type, molecule_index)
        if positions.dim() == 2:
            positions, box = positions.unsqueeze(0), box.reshape(1, 3, 3)
        self._check_geometry(positions, box, bead_type.shape[0])
        positions = positions.to(self.dtype)
        box = box.to(device=positions.device, dtype=self.dtype)
        self._prepare_neighbor_search(box, positions.shape[1])
        feature = self.temperature_feature(inverse_temperature, positions.shape[0], positions.device)
        self.energy.trim_pairs = self.check_inputs  # the checks read the device anyway
        energy, flags, count = self.energy(positions, box, system, feature, use_network, use_prior)
        if self.check_inputs:
            bad = flags != 0
            if bool(bad.any()):
                frame = int(torch.nonzero(bad)[0])
                capacity = pair_capacity(positions.shape[1], self.config.max_pairs_per_bead)
                raise RuntimeError(f"frame {frame}: " + describe_flags(int(flags[frame]), capacity, int(count[frame]),
                                                                       self.search_cutoff))
        return energy

    def energy_and_forces(self, positions: Tensor, box: Tensor, bead_type: Tensor, molecule_index: Tensor,
                          inverse_temperature: Tensor | None = None, create_graph: bool = False,
                          terms: str = "all") -> tuple[Tensor, Tensor]:
        """(energy (B,) float64 kJ/mol, forces (B, N, 3) kJ/mol/nm in the positions' dtype)."""
        if not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy = self(positions, box, bead_type, molecule_index, inverse_temperature, terms)
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
        return energy if create_graph else energy.detach(), -gradient
