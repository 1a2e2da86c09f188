"""Hyper-parameters of the CG force field, saved with every model (``hparams.json``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

NEIGHBOR_BACKENDS = ("auto", "dense", "cell")
DTYPES = ("float32", "float64")
# Checkpoints written before the key existed hold this architecture.
DEFAULT_ARCHITECTURE = "hybridgraph"


@dataclass
class HybridGraphConfig:
    """Sizes and switches of :class:`~openmm_cgnn.model.hybridgraph.CGModel`, whatever its architecture.

    Cutoffs are in nm. ``max_pairs_per_bead`` sets the static capacity of the intermolecular pair
    list: it holds ``ceil(N * max_pairs_per_bead / 2)`` unique pairs for N beads, i.e. the budget
    is the *average* number of neighbours per bead (within the search cutoff, other molecules
    only), so local fluctuations do not overflow it. Use
    :func:`~openmm_cgnn.model.neighbors.suggest_max_pairs_per_bead` to size it from data.
    """

    n_bead_types: int
    bead_type_names: list[str] | None = None
    # The network (model/registry.py ARCHITECTURES). The sizes below serve every architecture:
    # features (scalar and vector channels), n_gaussians (radial basis) and intra_/inter_blocks
    # (message-passing layers per pair list); filters is the Hybridgraph's alone.
    architecture: str = DEFAULT_ARCHITECTURE
    features: int = 240
    filters: int = 256
    n_gaussians: int = 80
    intra_blocks: int = 3
    intra_cutoff_nm: float = 0.7
    inter_blocks: int = 2
    inter_cutoff_nm: float = 0.8
    use_temperature: bool = False
    # 1/T enters as the feature T_ref/T - 1, which is O(0.1) over the usual range of T.
    reference_temperature_K: float = 300.0
    # "auto": cell list from AUTO_CELL_MIN_BEADS beads on when the box fits >= 3 cells per axis,
    # else dense (measured in benchmarks/bench_neighbors.py).
    neighbor_backend: str = "auto"
    max_pairs_per_bead: float = 64.0
    # Cell-list capacity per cell, as a multiple of the mean occupancy (plus a constant slack).
    cell_capacity_factor: float = 2.0
    # Multiplies the network's per-bead output: lets training start near the force scale.
    energy_scale: float = 1.0
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def reference(cls, n_bead_types: int, **overrides: Any) -> "HybridGraphConfig":
        """The published sizes: 240 features, 256 filters, 80 Gaussians, 3 intra / 2 inter blocks."""
        return cls(n_bead_types=n_bead_types, **overrides)

    @classmethod
    def quick(cls, n_bead_types: int, **overrides: Any) -> "HybridGraphConfig":
        """A tiny network for tests and ``--quick`` runs."""
        sizes: dict[str, Any] = dict(features=32, filters=32, n_gaussians=16, intra_blocks=2, inter_blocks=2)
        sizes.update(overrides)
        return cls(n_bead_types=n_bead_types, **sizes)

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"HybridGraphConfig.{name}: {what} (got {getattr(self, name)!r})")

        for name in ("n_bead_types", "features", "filters", "n_gaussians"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("intra_blocks", "inter_blocks"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        for name in ("intra_cutoff_nm", "inter_cutoff_nm", "reference_temperature_K", "max_pairs_per_bead",
                     "cell_capacity_factor", "energy_scale"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be a positive number")
        need(self.neighbor_backend in NEIGHBOR_BACKENDS, "neighbor_backend", f"must be one of {NEIGHBOR_BACKENDS}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        from .registry import ARCHITECTURES  # the registry imports the networks, which import this module

        need(self.architecture in ARCHITECTURES, "architecture", f"must be one of {tuple(ARCHITECTURES)}")
        if self.bead_type_names is not None:
            need(len(self.bead_type_names) == self.n_bead_types, "bead_type_names",
                 f"must list n_bead_types={self.n_bead_types} names")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HybridGraphConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hparams: unknown field(s) {unknown}; known: {sorted(known)}")
        if "n_bead_types" not in data:
            raise ValueError("hparams: missing field 'n_bead_types'")
        return cls(**data)
