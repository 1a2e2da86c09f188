"""The CG force field: networks (model/registry.py), priors, neighbour search, checkpoints and export."""

from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .config import HybridGraphConfig
from .export import (
    Diagnosis,
    build_system_module,
    diagnose,
    export_for_frames,
    read_metadata,
    save_scripted,
    script_for_system,
    system_metadata,
)
from .graph import BeadGraph, Pairs
from .hybridgraph import CGEnergy, CGModel, HybridGraphNet
from .painn import PaiNNNet
from .registry import ARCHITECTURES, build_network
from .neighbors import CellNeighborSearch, DenseNeighborSearch, make_neighbor_search, suggest_max_pairs_per_bead
from .priors import ExcludedVolumePrior, HarmonicAnglePrior, HarmonicBondPrior, PriorSet, fit_priors
from .system import SystemTensors, build_system_tensors

__all__ = [
    "ARCHITECTURES", "BeadGraph", "Pairs", "PaiNNNet", "build_network",
    "CGEnergy", "CGModel", "Diagnosis", "build_system_module", "diagnose", "CellNeighborSearch", "DenseNeighborSearch", "ExcludedVolumePrior", "HarmonicAnglePrior",
    "HarmonicBondPrior", "HybridGraphConfig", "HybridGraphNet", "PriorSet", "SystemTensors", "build_system_tensors",
    "export_for_frames", "fit_priors", "load_model", "make_neighbor_search", "read_checkpoint", "read_metadata",
    "save_checkpoint", "save_scripted", "script_for_system", "suggest_max_pairs_per_bead", "system_metadata",
]
