"""OpenMM platforms in one place: choosing one by name, its properties, and the versions report.

Every stage that runs OpenMM (``aa``, ``simulate``, the export checks, the benchmarks) gets its
platform from :func:`get_platform`, so a missing or broken platform reads the same everywhere:
one line naming the option that asked for it, what is there instead, the install command, and
the plugin load failures that explain it (``openmm.Platform.getPluginLoadFailures()``: a CUDA
plugin that is installed but cannot find its libraries registers no platform, silently).
``openmm-cgnn info`` prints :func:`info_report`.
"""

from __future__ import annotations

import platform as _python_platform
from pathlib import Path
from typing import Any, Sequence

import torch  # noqa: F401  (before openmm: see openmm_cgnn/__init__.py)

from . import __version__

# The GPU platforms compute in mixed precision by default (single-precision forces, double-precision
# integration): the precision OpenMM recommends for MD; "double" only for checks.
GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")
DEFAULT_GPU_PRECISION = "mixed"
# The CUDA kernels of OpenMM and openmm-torch ship as separate packages (setup.py extras). The
# pinned torch wheel is a CUDA 12 build, so cuda12 is the extra that matches it.
INSTALL_HINTS = {
    "CUDA": 'pip install -e ".[cuda12]" (or ".[cuda13]" with a CUDA 13 build of torch)',
    "HIP": 'pip install "openmm[hip6]==8.5.2" "openmmtorch[hip6]==1.5"',
    "OpenCL": "an OpenCL driver (libOpenCL.so.1) for the GPU",
}


class PlatformError(ValueError):
    """The OpenMM platform asked for is missing or cannot start here; the message is one line."""


def _openmm() -> Any:
    import openmm

    return openmm


def available_platforms() -> list[str]:
    """Names of the platforms OpenMM registered, in its order."""
    openmm = _openmm()
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def plugin_load_failures(name: str | None = None) -> list[str]:
    """OpenMM's plugin load failures; with ``name``, only those whose message names that platform."""
    failures = [str(f) for f in _openmm().Platform.getPluginLoadFailures()]
    if name is None:
        return failures
    return [f for f in failures if name.lower() in f.lower()]


def start_error(name: str) -> str | None:
    """None if a Context can be created on platform ``name``, else the first line of OpenMM's error.

    A registered platform may still be unusable: the CUDA plugin loads on a machine without a GPU.
    """
    openmm = _openmm()
    system = openmm.System()
    system.addParticle(1.0)
    try:
        openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(name))
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def default_platform(candidates: Sequence[str] | None = None) -> str:
    """The fastest registered platform (among ``candidates``, if given) that can create a Context."""
    openmm = _openmm()
    names = [n for n in available_platforms() if candidates is None or n in candidates]
    for name in sorted(names, key=lambda n: -openmm.Platform.getPlatformByName(n).getSpeed()):
        if start_error(name) is None:
            return name
    return "Reference"


def install_hint(name: str) -> str:
    """What to install for platform ``name`` (the CUDA extras for any name OpenMM does not know)."""
    return INSTALL_HINTS.get(name, f"for CUDA: {INSTALL_HINTS['CUDA']}")


def missing_message(name: str, option: str = "--platform") -> str:
    """One line: platform ``name`` (asked for by ``option``) is not registered, what is, how to get it."""
    message = (f"{option} {name}: OpenMM has no platform '{name}' here (available: {', '.join(available_platforms())}); "
               f"install: {install_hint(name)}")
    failures = plugin_load_failures(name)
    if failures:
        message += f"; plugin load failures: {' | '.join(failures)}"
    return message


def get_platform(name: str | None = None, option: str = "--platform", *, candidates: Sequence[str] | None = None,
                 check: bool = True) -> Any:
    """The ``openmm.Platform`` called ``name`` (None: :func:`default_platform` among ``candidates``).

    Raises :class:`PlatformError` (one line, naming ``option``) when it is not registered or, with
    ``check``, when it cannot create a Context here.
    """
    openmm = _openmm()
    if name is None:
        name = default_platform(candidates)
    if name not in available_platforms():
        raise PlatformError(missing_message(name, option))
    if check:
        error = start_error(name)
        if error is not None:
            raise PlatformError(f"{option} {name}: the platform is installed but cannot start here ({error}); "
                                f"available: {', '.join(available_platforms())}")
    return openmm.Platform.getPlatformByName(name)


def platform_properties(platform: Any, device_index: int | None = None, *, threads: int | None = None,
                        precision: str | None = None, option: str = "--device-index") -> dict[str, str]:
    """Context properties for ``platform`` (an ``openmm.Platform`` or its name).

    GPUs: ``Precision`` (default mixed) and ``DeviceIndex`` when ``device_index`` is given (OpenMM
    picks a device otherwise). CPU: ``Threads`` when ``threads`` is given; otherwise OpenMM reads
    ``OPENMM_CPU_THREADS`` itself. A device index for a platform without devices is an error naming
    ``option``.
    """
    name = platform if isinstance(platform, str) else platform.getName()
    if device_index is not None and (isinstance(device_index, bool) or not isinstance(device_index, int)
                                     or device_index < 0):
        raise PlatformError(f"{option} must be a non-negative integer, got {device_index!r}")
    if name in GPU_PLATFORMS:
        properties = {"Precision": precision or DEFAULT_GPU_PRECISION}
        if device_index is not None:
            properties["DeviceIndex"] = str(device_index)
        return properties
    if device_index is not None:
        raise PlatformError(f"{option} needs a GPU platform ({', '.join(GPU_PLATFORMS)}), not {name}")
    if name == "CPU" and threads is not None:
        return {"Threads": str(int(threads))}
    return {}


# Measured on 2 shared cores (CG step, quick network, 160 beads, both engines; benchmarks/README.md):
# 2 torch threads made a step 5-13x slower than 1, whatever OpenMM's thread count, because torch's
# OpenMP pool collapses when the cores are busy. So one thread unless the user asks for more.
DEFAULT_TORCH_THREADS = 1


def pin_torch_threads(platform: Any, properties: dict[str, str] | None = None) -> int | None:
    """On the host platforms (CPU, and Reference, where the network runs on the CPU too), set torch's
    intra-op pool to the OpenMM CPU thread count the user asked for (the ``Threads`` property, else
    ``OPENMM_CPU_THREADS``), else to ``DEFAULT_TORCH_THREADS``. The one place the CG runner sets
    torch's threads: ``OPENMM_CPU_THREADS=N`` sets both. Returns the count, or None where nothing was
    changed (GPU platforms)."""
    import os

    name = platform if isinstance(platform, str) else platform.getName()
    if name not in ("CPU", "Reference"):
        return None
    value = (properties or {}).get("Threads") or os.environ.get("OPENMM_CPU_THREADS")
    try:
        threads = int(value) if value else DEFAULT_TORCH_THREADS
    except ValueError:
        threads = DEFAULT_TORCH_THREADS
    torch.set_num_threads(max(threads, 1))
    return torch.get_num_threads()


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """The versions recorded in run, export and benchmark metadata."""
    import numpy

    openmm = _openmm()
    return {"openmm_cgnn": __version__, "python": _python_platform.python_version(), "numpy": numpy.__version__,
            "torch": torch.__version__, "torch_cuda": str(torch.version.cuda), "openmm": openmm.__version__,
            "openmm_git": str(openmm.version.git_revision), "openmmtorch": _distribution_version("openmmtorch")}


def info() -> dict[str, Any]:
    """Versions, the platforms (registered, and whether each starts) and the plugin load failures."""
    openmm = _openmm()
    platforms = {}
    for name in available_platforms():
        error = start_error(name)
        platforms[name] = {"speed": openmm.Platform.getPlatformByName(name).getSpeed(), "usable": error is None,
                           **({"error": error} if error else {})}
    cuda_packages = {p: _distribution_version(p) for p in ("OpenMM-CUDA-12", "OpenMM-CUDA-13", "OpenMM-Torch-CUDA-12",
                                                           "OpenMM-Torch-CUDA-13")}
    return {"versions": versions(), "platforms": platforms, "plugin_load_failures": plugin_load_failures(),
            "plugins_directory": str(Path(openmm.version.openmm_library_path) / "plugins"), "cuda_packages": cuda_packages,
            "torch_cuda_available": bool(torch.cuda.is_available()),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def info_report(data: dict[str, Any] | None = None) -> str:
    """:func:`info` as text for ``openmm-cgnn info``."""
    data = info() if data is None else data
    v = data["versions"]
    lines = [f"openmm-cgnn {v['openmm_cgnn']}",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "openmm_cgnn"),
             f"torch sees a CUDA device: {data['gpu'] or 'no'}",
             "platforms:"]
    for name, p in data["platforms"].items():
        lines.append(f"  {name} (speed {p['speed']:g}): " + ("usable" if p["usable"] else f"cannot start ({p['error']})"))
    if "CUDA" not in data["platforms"]:
        lines.append(f"  CUDA: not installed; install: {INSTALL_HINTS['CUDA']}")
    installed = [f"{name} {ver}" for name, ver in data["cuda_packages"].items() if ver != "not installed"]
    lines.append(f"CUDA packages: {', '.join(installed) or 'none'}")
    failures = data["plugin_load_failures"]
    lines.append(f"plugin load failures ({len(failures)}), plugins in {data['plugins_directory']}:" if failures
                 else "plugin load failures: none")
    lines += [f"  {f}" for f in failures]
    return "\n".join(lines)
