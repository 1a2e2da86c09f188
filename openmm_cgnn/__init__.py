"""openmm_cgnn: learned coarse-graining of molecular liquids, run inside OpenMM.

Importing this package imports ``torch`` before ``openmm``. The order matters: OpenMM's
openmm-torch plugins link against PyTorch's CUDA libraries, and if ``openmm`` is imported first
they fail to load and ``TorchForce`` has no kernels. Scripts that load exported force fields with
plain OpenMM must do the same (``import torch`` first).
"""

from __future__ import annotations

__version__ = "0.1.0"

try:  # noqa: SIM105 - the import itself is the point
    import torch  # noqa: F401  (must precede any ``import openmm``)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "openmm_cgnn needs PyTorch; install the pinned stack with `pip install -e .` "
        "(torch==2.9.1, openmm==8.5.2, openmmtorch==1.5)"
    ) from exc


def __getattr__(name: str):
    # Heavy sub-modules load on first use so `import openmm_cgnn` stays cheap.
    if name == "CGNNForce":
        from .openmm.force import CGNNForce

        return CGNNForce
    raise AttributeError(f"module 'openmm_cgnn' has no attribute {name!r}")
