"""Evaluation of CG runs against all-atom runs: RDFs, diffusion, Arrhenius fits, density, report.

``evaluate`` (in :mod:`.evaluate`) is the stage's entry point; the other modules are the analyses
it uses, each usable on its own with plain numpy arrays.
"""

from .arrhenius import ArrheniusFit, fit_arrhenius  # noqa: F401
from .msd import DiffusionResult, MSDCurve, fit_diffusion, msd_curve, remove_drift, unwrap  # noqa: F401
from .rdf import RDF, first_peak, radial_distribution, rdf_error  # noqa: F401


def __getattr__(name: str):
    # The orchestration pulls in the mapping and frames modules; load it on first use.
    if name in ("evaluate", "EvaluationError", "EvaluationSettings"):
        from . import evaluate as module

        return getattr(module, name)
    raise AttributeError(f"module 'openmm_cgnn.analysis' has no attribute {name!r}")
