"""All-atom ground truth: CL&P force field conversion, box building and OpenMM runs.

Public API (loaded on first use, so importing this package does not import OpenMM):

* ``run_aa(out, count, temperatures, equilibrate_ps, production_ps, save_every_ps, liquid=..., ...)``
* ``build_system(topology, ff=None, cutoff_nm=1.0, charge_scale=1.0)``
* ``load_forcefield(directory=None)``, ``build_box(ff, composition, density, seed)``
* ``convert(clandp_dir, out_dir, molecules)`` (regenerates ``aa/data``)
"""

from __future__ import annotations

_EXPORTS = {
    "run_aa": "run", "AAInputError": "run", "available_platforms": "run",
    "build_system": "forcefield", "load_forcefield": "forcefield", "energy_components": "forcefield",
    "AAForceField": "forcefield", "ForceFieldDataError": "forcefield", "DATA_DIR": "forcefield",
    "build_box": "builder", "convert": "convert", "ClandpError": "clandp", "AARunError": "stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
