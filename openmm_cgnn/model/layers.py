"""Pieces every architecture shares: the bead embedding with its 1/T input, radial basis, readout.

An architecture (model/registry.py) subclasses :class:`BeadNetwork`: it gets the bead-type
embedding, the optional temperature shift and the per-frame energy sum, and implements
``forward(bead_type, temperature_feature, graph) -> energy (B,) float64`` on a
:class:`~openmm_cgnn.model.graph.BeadGraph`. Attribute names are part of the checkpoint format
(state-dict keys), so they stay as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .config import HybridGraphConfig
from .geometry import shifted_softplus


class ShiftedSoftplus(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return shifted_softplus(x)


def gaussian_basis(distance: Tensor, centers: Tensor, gamma: float) -> Tensor:
    """Gaussian radial features (P, G) of distances (P,) on ``centers`` (G,) (geometry.gaussian_centers)."""
    return torch.exp(-gamma * (distance.unsqueeze(-1) - centers.to(distance.dtype)) ** 2)


def readout_mlp(features: int) -> nn.Sequential:
    """Per-bead energy from its features: features -> features/2 -> 1."""
    half = max(features // 2, 1)
    return nn.Sequential(nn.Linear(features, half), ShiftedSoftplus(), nn.Linear(half, 1))


class BeadNetwork(nn.Module):
    """Base of the learned part: bead-type embedding (+ 1/T shift) in, energy per frame out.

    Subclasses create their layers after calling ``super().__init__(config)`` and a ``readout``
    (e.g. :func:`readout_mlp`) that :meth:`frame_energy` applies to the final scalar features.
    """

    def __init__(self, config: HybridGraphConfig):
        super().__init__()
        self.features = config.features
        self.uses_temperature = bool(config.use_temperature)
        self.energy_scale = float(config.energy_scale)
        self.embedding = nn.Embedding(config.n_bead_types, config.features)
        # 1/T enters as a learned shift of every bead's features, proportional to T_ref/T - 1.
        self.temperature_shift = nn.Linear(1, config.features, bias=False)
        if not self.uses_temperature:
            self.temperature_shift.requires_grad_(False)
            nn.init.zeros_(self.temperature_shift.weight)

    def initial_features(self, bead_type: Tensor, temperature_feature: Optional[Tensor], batch: int) -> Tensor:
        """Scalar features (B*N, F) of the flat nodes of B frames."""
        n_beads = bead_type.shape[0]
        x = self.embedding(bead_type).unsqueeze(0).expand(batch, n_beads, self.features)
        if self.uses_temperature and temperature_feature is not None:
            x = x + self.temperature_shift(temperature_feature.reshape(batch, 1, 1).to(x.dtype))
        return x.reshape(batch * n_beads, self.features)

    def frame_energy(self, x: Tensor, batch: int) -> Tensor:
        """Readout of the final scalar features (B*N, F): energy per frame (B,) float64."""
        bead_energy = self.readout(x).reshape(batch, -1) * self.energy_scale
        return bead_energy.to(torch.float64).sum(-1)
