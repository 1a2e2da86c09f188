"""The OpenMM stage: CG topology and system, ``CGNNForce``, prior forces, the CG runner and the export.

Modules import ``openmm`` lazily (inside functions), after ``torch`` (imported by ``openmm_cgnn``).
"""

from .force import CGNNForce, ModelMismatchError  # noqa: F401
from .topology import CGConfiguration, CGSystem, build_cg_system, composition_for_counts, composition_for_pairs  # noqa: F401

__all__ = ["CGNNForce", "CGConfiguration", "CGSystem", "ModelMismatchError", "build_cg_system", "composition_for_counts",
           "composition_for_pairs"]
