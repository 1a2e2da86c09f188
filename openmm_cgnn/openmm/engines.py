"""Force engines: what carries the network's module into an OpenMM ``System``.

:class:`~openmm_cgnn.openmm.force.CGNNForce` is the engine-independent binding (it loads the model,
checks topology, System and metadata, and places the prior); an engine turns the module it builds
into one OpenMM force. The word "carrier" in code is taken by the prior's placement
(``PRIOR_CARRIERS``), so this axis is the *engine*; the CLI calls it ``--carrier``.

- ``"torch"``: openmm-torch's ``TorchForce`` running the TorchScript module. The only exportable
  engine: ``system.xml`` and the C++ loader need it. On CUDA it runs the graph-safe module with
  CUDA graphs.
- ``"python"``: OpenMM's ``PythonForce`` (OpenMM >= 8.4) calling the graph-safe module (no host
  reads, static shapes, NaN on bad input) under ``torch.compile(fullgraph=True, dynamic=False)``,
  as openmm-ml >= 1.6 runs its models. The first call runs eager (it checks that the module runs
  at all), later calls run compiled; a failed compilation falls back to eager with a message.
  Inductor's on-disk caches (FX graph and AOTAutograd) live in ``TORCHINDUCTOR_CACHE_DIR``
  (default ``~/.cache/openmm_cgnn/torchinductor``), so a second run with the same model and
  system size does not pay the compile again. A TorchScript ``model.pt`` cannot be compiled: it
  runs eager in the PythonForce.

``DEFAULT_ENGINE`` per platform is the one measured faster (benchmarks/bench_md.py ``--carrier``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..units import in_nm

ENGINES = ("torch", "python")
# benchmarks/results/md_cpu.json (quick network, 1 thread, both engines side by side): PythonForce +
# torch.compile took 2.5/4.1/17.9 ms per CG step against TorchForce's 4.5/6.8/19.1 at 80/160/500
# beads (benchmarks/README.md; re-measured at load 9-13 after issue 17's op reductions:
# 3.7/4.9/33.6 against 5.9/7.3/35.3), so the CPU platform takes it. CUDA stays on TorchForce: its CUDA graphs keep
# the whole step on the device, which a Python callback per step cannot. Reference (the checking
# platform) and an unknown platform (export) take TorchForce, the exportable one.
DEFAULT_ENGINE = {"CPU": "python"}
DEFAULT_ENGINE_OTHER = "torch"
# The compilation is paid once per process: 129 s with an empty inductor cache, 34 s from a filled
# one (benchmarks/results/compile_cpu.json), against a saving of about 2-2.7 ms per step at 80-160
# beads. A run shorter than this many steps would not earn a cold compilation back (129 s / 2.7 ms),
# so it takes TorchForce, which starts at once (the quick example's 2000-step runs, the tests).
COMPILE_PAYBACK_STEPS = 50_000
# Above this many beads TorchForce is the faster per step on CPU: the graph-safe module PythonForce
# compiles searches every pair at full capacity each call, where TorchForce reuses its pair list.
# bench_md.py, quick network, 1 thread, idle (results/md_cpu.json): PythonForce 3.0 / 7.7 / 21.7 ms
# against TorchForce 4.1 / 9.4 / 17.7 ms at 80 / 160 / 500 beads; the crossover lies between the last two.
COMPILE_MAX_BEADS = 300
FORCE_NAME = "CGNNForce"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_engine(platform_name: str | None, steps: int | None = None, beads: int | None = None) -> str:
    """The engine ``simulate`` uses on this platform when none is asked for; ``steps`` (the run's
    length, None: unknown) keeps short runs off the compiled engine (``COMPILE_PAYBACK_STEPS``), and
    ``beads`` (None: unknown) large systems (``COMPILE_MAX_BEADS``)."""
    engine = DEFAULT_ENGINE.get(platform_name or "", DEFAULT_ENGINE_OTHER)
    if engine == "python" and ((steps is not None and steps < COMPILE_PAYBACK_STEPS)
                               or (beads is not None and beads > COMPILE_MAX_BEADS)):
        return DEFAULT_ENGINE_OTHER
    return engine


class ForceEngine(Protocol):
    """What the binding needs from an engine."""

    name: str
    exportable: bool  # can go into system.xml
    host_checks: bool | None  # the module variant it needs (False: graph-safe); None: the binding's choice

    def prepare(self, module: torch.nn.Module) -> Any:
        """The module as this engine holds it (scripted for TorchForce, plain for PythonForce)."""

    def build(self, module: Any, periodic: bool, group: int, cuda_graphs: bool) -> Any:
        """A new OpenMM force running ``module`` (a System takes ownership of what it is given)."""

    def report(self) -> dict[str, Any]:
        """What the engine did (summary.json, benchmarks)."""


class TorchForceEngine:
    """openmm-torch ``TorchForce`` with the TorchScript module."""

    name = "torch"
    exportable = True
    host_checks = None

    def prepare(self, module: torch.nn.Module) -> Any:
        return module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)

    def build(self, module: Any, periodic: bool, group: int, cuda_graphs: bool) -> Any:
        import openmm  # noqa: F401  (after torch, see openmm_cgnn/__init__.py)
        import openmmtorch

        force = openmmtorch.TorchForce(module)
        force.setName(FORCE_NAME)
        force.setUsesPeriodicBoundaryConditions(periodic)
        force.setForceGroup(group)
        force.setProperty("useCUDAGraphs", "true" if cuda_graphs else "false")
        return force

    def report(self) -> dict[str, Any]:
        return {"engine": self.name, "force": "TorchForce (openmm-torch)"}


def inductor_cache_dir() -> Path:
    """Where inductor keeps its compiled artifacts; sets ``TORCHINDUCTOR_CACHE_DIR`` if unset."""
    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(Path.home() / ".cache" / "openmm_cgnn" / "torchinductor")
    return Path(os.environ[CACHE_ENV])


class CompiledEnergy:
    """``PythonForce`` callback: energy and -dE/dx of ``module`` for one OpenMM State.

    Positions go in as float64, as TorchForce hands them over on CPU (the module computes in the
    model's dtype), so the eager call is the TorchScript module's arithmetic.
    """

    def __init__(self, module: torch.nn.Module, compile: bool, log: Callable[[str], None], report: dict[str, Any]):
        self.module = module
        self.eager = module
        self.compile = compile and not isinstance(module, torch.jit.ScriptModule)
        self.log = log
        self.info = report
        self.compiled: Any = None
        self.calls = 0
        if compile and not self.compile:
            report["compiled"] = False
            report["reason"] = "a TorchScript model.pt cannot be compiled: it runs eager"

    def energy(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        if self.calls == 0 or not self.compile:
            return self.eager(positions, box)  # first call eager: a module that cannot run fails plainly here
        if self.compiled is None:
            cache = inductor_cache_dir()
            from torch._dynamo.utils import counters

            hits_before = counters["inductor"].get("fxgraph_cache_hit", 0)
            start = time.perf_counter()
            try:
                compiled = torch.compile(self.module, fullgraph=True, dynamic=False)
                energy = compiled(positions, box)
            except Exception as exc:  # noqa: BLE001  (any compiler failure: run on eager)
                self.compile = False
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.info.update(compiled=False, reason=f"torch.compile failed: {first[:300]}")
                self.log(f"torch.compile of the model failed ({first[:200]}); the PythonForce runs it eager")
                return self.eager(positions, box)
            self.compiled = compiled
            self.info.update(compiled=True, compile_s=time.perf_counter() - start, cache_dir=str(cache),
                             fx_graph_cache_hits=counters["inductor"].get("fxgraph_cache_hit", 0) - hits_before)
            return energy
        return self.compiled(positions, box)

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        positions = torch.from_numpy(np.array(in_nm(state.getPositions(asNumpy=True)), dtype=np.float64))
        box = torch.from_numpy(np.array(in_nm(state.getPeriodicBoxVectors(asNumpy=True)), dtype=np.float64))
        positions.requires_grad_(True)
        energy = self.energy(positions, box)
        (grad,) = torch.autograd.grad(energy, positions)
        self.calls += 1
        return float(energy.detach()), (-grad).numpy()


class PythonForceEngine:
    """OpenMM ``PythonForce`` with the graph-safe module under ``torch.compile`` (module docstring)."""

    name = "python"
    exportable = False
    host_checks = False

    def __init__(self, compile: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.compile = compile
        self.log = log or (lambda message: print(message, flush=True))
        self.info: dict[str, Any] = {}
        self._callbacks: dict[int, CompiledEnergy] = {}  # one per module: Contexts share its compilation

    def prepare(self, module: torch.nn.Module) -> Any:
        return module

    def build(self, module: Any, periodic: bool, group: int, cuda_graphs: bool) -> Any:
        import openmm

        callback = self._callbacks.get(id(module))
        if callback is None or callback.module is not module:
            callback = self._callbacks[id(module)] = CompiledEnergy(module, self.compile, self.log, self.info)
        force = openmm.PythonForce(callback)
        force.setName(FORCE_NAME)
        force.setUsesPeriodicBoundaryConditions(periodic)
        force.setForceGroup(group)
        return force

    def report(self) -> dict[str, Any]:
        return {"engine": self.name, "force": "PythonForce (OpenMM) + torch.compile", **self.info}


def make_engine(name: str, **options: Any) -> ForceEngine:
    """The engine called ``name`` (one of ``ENGINES``)."""
    if name == "torch":
        return TorchForceEngine()
    if name == "python":
        return PythonForceEngine(**options)
    raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
