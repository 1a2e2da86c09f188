"""PaiNN-style equivariant message passing (Schütt, Unke & Gastegger 2021) on the bead graph.

Each bead carries scalar features ``s`` (F) and vector features ``v`` (3 x F, starting at zero).
A layer is a message over one pair list followed by an update:

- message: a filter from Gaussian radial features of the pair distance, times the smooth envelope
  of that list's cutoff (the Hybridgraph's), gates the neighbour's scalar MLP output into a scalar
  message, a copy of the neighbour's vectors, and the unit pair vector;
- update: mixes the bead's own vector channels (two linear maps U, V) and its scalars through
  the invariant ``|V v|`` and ``<U v, V v>``.

Layers alternate over the intramolecular and intermolecular pair lists
(``max(intra_blocks, inter_blocks)`` rounds, each using the lists that still have blocks left),
so a bead's vectors see both its own molecule and its neighbours. The energy reads only scalars,
so it is invariant under rotations, translations and permutations; vectors never leave the
network. Sizes come from the shared config: ``features``, ``n_gaussians`` and the block counts
(``filters`` is unused here). The 1/T input enters as in the Hybridgraph (a shift of the
embedding, :class:`~openmm_cgnn.model.layers.BeadNetwork`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .config import HybridGraphConfig
from .geometry import gaussian_centers
from .graph import BeadGraph, Pairs, pair_weight
from .layers import BeadNetwork, gaussian_basis, readout_mlp

# Inside sqrt(|V v|^2 + eps): v starts at zero, where the plain norm has no gradient.
NORM_EPS = 1e-8


class PaiNNLayer(nn.Module):
    """One message over one pair list (``inter`` picks which) and one update, both residual."""

    def __init__(self, features: int, n_gaussians: int, inter: bool):
        super().__init__()
        self.features = features
        self.inter = inter
        self.norm_eps = NORM_EPS  # TorchScript reads module attributes, not module-level floats
        self.scalar_net = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 3 * features))
        self.filter_net = nn.Linear(n_gaussians, 3 * features)
        self.mix_u = nn.Linear(features, features, bias=False)
        self.mix_v = nn.Linear(features, features, bias=False)
        self.update_net = nn.Sequential(nn.Linear(2 * features, features), nn.SiLU(),
                                        nn.Linear(features, 3 * features))

    def message(self, s: Tensor, v: Tensor, radial: Tensor, weight: Tensor, direction: Tensor,
                index_i: Tensor, index_j: Tensor) -> Tuple[Tensor, Tensor]:
        """Each unordered pair sends to both ends: i hears j along +direction, j hears i along -direction."""
        features = self.features
        filters = self.filter_net(radial) * weight.unsqueeze(-1)  # (P, 3F), 0 for invalid pairs
        phi = self.scalar_net(s)
        from_j = phi.index_select(0, index_j) * filters
        from_i = phi.index_select(0, index_i) * filters
        ds = torch.zeros_like(s)
        ds = ds.index_add(0, index_i, from_j[:, :features]).index_add(0, index_j, from_i[:, :features])
        to_i = (v.index_select(0, index_j) * from_j[:, features:2 * features].unsqueeze(1)
                + direction.unsqueeze(-1) * from_j[:, 2 * features:].unsqueeze(1))
        to_j = (v.index_select(0, index_i) * from_i[:, features:2 * features].unsqueeze(1)
                - direction.unsqueeze(-1) * from_i[:, 2 * features:].unsqueeze(1))
        dv = torch.zeros_like(v).index_add(0, index_i, to_i).index_add(0, index_j, to_j)
        return s + ds, v + dv

    def update(self, s: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        features = self.features
        u = self.mix_u(v)  # (M, 3, F): linear over channels only, so rotations commute with it
        w = self.mix_v(v)
        norm = torch.sqrt((w * w).sum(1) + self.norm_eps)
        a = self.update_net(torch.cat([s, norm], dim=-1))
        dv = a[:, :features].unsqueeze(1) * u
        ds = a[:, features:2 * features] * (u * w).sum(1) + a[:, 2 * features:]
        return s + ds, v + dv

    def forward(self, s: Tensor, v: Tensor, radial: Tensor, weight: Tensor, direction: Tensor,
                index_i: Tensor, index_j: Tensor) -> Tuple[Tensor, Tensor]:
        s, v = self.message(s, v, radial, weight, direction, index_i, index_j)
        return self.update(s, v)


class PaiNNNet(BeadNetwork):
    """The learned part as PaiNN-style layers over the intra and inter pair lists (module docstring)."""

    def __init__(self, config: HybridGraphConfig):
        super().__init__(config)
        self.intra_cutoff = float(config.intra_cutoff_nm)
        self.inter_cutoff = float(config.inter_cutoff_nm)
        intra_centers, self.intra_gamma = gaussian_centers(self.intra_cutoff, config.n_gaussians)
        inter_centers, self.inter_gamma = gaussian_centers(self.inter_cutoff, config.n_gaussians)
        self.register_buffer("intra_centers", intra_centers, persistent=False)
        self.register_buffer("inter_centers", inter_centers, persistent=False)
        layers = []
        for round_ in range(max(config.intra_blocks, config.inter_blocks)):
            if round_ < config.intra_blocks:
                layers.append(PaiNNLayer(config.features, config.n_gaussians, inter=False))
            if round_ < config.inter_blocks:
                layers.append(PaiNNLayer(config.features, config.n_gaussians, inter=True))
        self.layers = nn.ModuleList(layers)
        self.readout = readout_mlp(config.features)

    def pair_inputs(self, pairs: Pairs, centers: Tensor, gamma: float, cutoff: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(radial (P, G), envelope weight (P,), unit vector i -> j (P, 3)) of one pair list, once per call."""
        radial = gaussian_basis(pairs.distance, centers, gamma)
        # Invalid pairs have distance = cutoff > 0 (finite direction) and weight 0.
        direction = pairs.vectors / pairs.distance.unsqueeze(-1)
        return radial, pair_weight(pairs, cutoff), direction

    def forward(self, bead_type: Tensor, temperature_feature: Optional[Tensor], graph: BeadGraph) -> Tensor:
        """Energy per frame (B,) float64 of the graph's B frames."""
        s = self.initial_features(bead_type, temperature_feature, graph.batch)
        v = torch.zeros(s.shape[0], 3, s.shape[1], dtype=s.dtype, device=s.device)
        intra_radial, intra_weight, intra_direction = self.pair_inputs(graph.intra, self.intra_centers,
                                                                       self.intra_gamma, self.intra_cutoff)
        inter_radial, inter_weight, inter_direction = self.pair_inputs(graph.inter, self.inter_centers,
                                                                       self.inter_gamma, self.inter_cutoff)
        for layer in self.layers:
            if layer.inter:
                s, v = layer(s, v, inter_radial, inter_weight, inter_direction, graph.inter.index_i,
                             graph.inter.index_j)
            else:
                s, v = layer(s, v, intra_radial, intra_weight, intra_direction, graph.intra.index_i,
                             graph.intra.index_j)
        return self.frame_energy(s, graph.batch)
