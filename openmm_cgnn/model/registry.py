"""The architectures a model can have: ``hparams.json``'s ``architecture`` names one of them.

The one place that maps the name to its network class. Model construction (``CGModel``), the
checkpoint reader (``load_model``: hyper-parameters are validated against this table) and
``train --model-option architecture=NAME`` all go through it. Adding an architecture is one file
(a :class:`~openmm_cgnn.model.layers.BeadNetwork` subclass taking a ``HybridGraphConfig`` and
reading a :class:`~openmm_cgnn.model.graph.BeadGraph`) and one line here.
"""

from __future__ import annotations

from .config import DEFAULT_ARCHITECTURE, HybridGraphConfig
from .hybridgraph import HybridGraphNet
from .layers import BeadNetwork
from .painn import PaiNNNet

ARCHITECTURES: dict[str, type[BeadNetwork]] = {
    DEFAULT_ARCHITECTURE: HybridGraphNet,  # "hybridgraph": SchNet stacks on intra and inter pairs
    "painn": PaiNNNet,  # equivariant scalar + vector message passing
}


def build_network(config: HybridGraphConfig) -> BeadNetwork:
    """The network of ``config.architecture`` (validated by the config against this table)."""
    return ARCHITECTURES[config.architecture](config)
