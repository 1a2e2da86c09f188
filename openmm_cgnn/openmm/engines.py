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
  as openmm-ml >= 1.6 runs its models: its energy and forces as one function
  (``torch.func.grad_and_value``), on a pair list this engine keeps outside the graph
  (:class:`~openmm_cgnn.model.neighbors.SkinPairList`, see :class:`CompiledEnergy`). The first call
  runs eager (it checks that the module runs at all), later calls run compiled; a failed
  compilation falls back to eager with a message.
  Inductor's on-disk caches (FX graph and AOTAutograd) live in ``TORCHINDUCTOR_CACHE_DIR``
  (default ``~/.cache/openmm_cgnn/torchinductor``), so a second run with the same model and
  system size does not pay the compile again. A TorchScript ``model.pt`` cannot be compiled: it
  runs eager in the PythonForce.

``DEFAULT_ENGINE`` per platform is the one measured faster (benchmarks/bench_md.py ``--carrier``).
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..model.neighbors import SkinPairList
from ..units import in_nm

ENGINES = ("torch", "python")
# benchmarks/results/md_cpu.json (quick network, 8 fs, 1 thread, idle, engines side by side with AA in
# one run): PythonForce + torch.compile (its own pair list, prior inside its graph) took 1.6 / 2.4 /
# 6.0 / 19.4 ms per CG step against TorchForce's 3.1 / 6.0 / 13.3 / 38.6 at 80 / 160 / 500 / 1500
# beads, so the CPU platform takes it at every size measured. CUDA stays on TorchForce: its CUDA
# graphs keep the whole step on the device, which a Python callback per step cannot. Reference (the
# checking platform) and an unknown platform (export) take TorchForce, the exportable one.
DEFAULT_ENGINE = {"CPU": "python"}
DEFAULT_ENGINE_OTHER = "torch"
# The compilation is paid once per process: 26 s with an empty inductor cache, 10 s from a filled one
# (160 beads, idle; benchmarks/results/compile_cpu.json), against a saving of 1.5-3.6 ms per step at
# 80-160 beads (more on larger systems). A run shorter than this many steps would not earn a cold
# compilation back (26 s / 1.5 ms, rounded down), so it takes TorchForce, which starts at once (the
# quick example's 2000-step runs, the tests).
COMPILE_PAYBACK_STEPS = 15_000
# Where a run whose forces all live in the compiled graph (PythonForce, prior inside) integrates when
# no platform is asked for and the CPU is the device: OpenMM's CPU platform costs 0.24 ms of fixed
# work per step even for an empty 160-particle System, its Reference platform 0.007 ms; with native
# forces left (the excluded-volume CustomNonbondedForce: 0.67 ms on Reference) the CPU platform stays.
# bench_md.py (above): 1.1 / 1.9 / 5.5 / 19.1 ms against 1.6 / 2.4 / 6.0 / 19.4 ms per step.
COMPILED_ENGINE_PLATFORM = "Reference"
# Skin of the PythonForce engine's pair list (SkinPairList): the compiled graph computes every pair
# in the list, so a thinner skin than the TorchScript module's (model/neighbors.DEFAULT_SKIN_NM)
# pays: the list holds ((rc + skin) / rc)^3 of the pairs and is rebuilt after a bead moved skin / 2.
COMPILED_SKIN_NM = 0.05
# How the PythonForce engine compiles: "inductor" (torch.compile) or "aoti" (AheadOfTimeForces);
# OPENMM_CGNN_COMPILE_BACKEND overrides the default.
COMPILE_BACKENDS = ("inductor", "aoti")
DEFAULT_COMPILE_BACKEND = "inductor"
BACKEND_ENV = "OPENMM_CGNN_COMPILE_BACKEND"
FORCE_NAME = "CGNNForce"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_engine(platform_name: str | None, steps: int | None = None) -> str:
    """The engine ``simulate`` uses on this platform when none is asked for; ``steps`` (the run's
    length, None: unknown) keeps short runs off the compiled engine (``COMPILE_PAYBACK_STEPS``)."""
    engine = DEFAULT_ENGINE.get(platform_name or "", DEFAULT_ENGINE_OTHER)
    if engine == "python" and steps is not None and steps < COMPILE_PAYBACK_STEPS:
        return DEFAULT_ENGINE_OTHER
    return engine


def default_integration_platform(platform_name: str, engine: str, prior_inside: bool) -> str:
    """The platform a CG run integrates on when none was asked for and ``platform_name`` is the
    default: ``COMPILED_ENGINE_PLATFORM`` for the PythonForce engine with every force in its graph
    on the CPU, else ``platform_name``."""
    if platform_name == "CPU" and engine == "python" and prior_inside:
        return COMPILED_ENGINE_PLATFORM
    return platform_name


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


# Graphs dynamo keeps per compiled function (its default is 8). Every CG system size and pair-list
# length is one graph of the same few functions, and past the limit dynamo runs them eager without
# an error: a process that simulates several systems (benchmarks, a temperature series, tests)
# would silently lose the compiled speed.
COMPILED_GRAPHS_PER_FUNCTION = 256


def allow_recompiles() -> None:
    """Raise dynamo's per-function graph limit to ``COMPILED_GRAPHS_PER_FUNCTION`` (never lower it)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (("recompile_limit", COMPILED_GRAPHS_PER_FUNCTION),
                        ("accumulated_recompile_limit", 4 * COMPILED_GRAPHS_PER_FUNCTION)):
        setattr(config, name, max(getattr(config, name), value))


def compiled_or_eager(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` under ``torch.compile(fullgraph=True, dynamic=False)``, compiled at its first call;
    if that fails, ``function`` itself from then on (a helper is never worth an error)."""
    chosen: list[Callable[..., Any]] = []

    def run(*args: Any) -> Any:
        if chosen:
            return chosen[0](*args)
        allow_recompiles()
        try:
            compiled = torch.compile(function, fullgraph=True, dynamic=False)
            result = compiled(*args)
            chosen.append(compiled)
        except Exception:  # noqa: BLE001  (any compiler failure: run eager)
            chosen.append(function)
            result = function(*args)
        return result

    return run


def autograd_forces(energy: Callable[..., torch.Tensor], positions: torch.Tensor,
                    *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy, -dE/dpositions) by autograd."""
    positions = positions.detach().requires_grad_(True)
    value = energy(positions, *rest)
    (gradient,) = torch.autograd.grad(value, positions)
    return value, -gradient


def functional_forces(grad_and_value: Callable[..., Any], positions: torch.Tensor,
                      *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy, -dE/dpositions) from ``torch.func.grad_and_value(energy)``."""
    gradient, value = grad_and_value(positions, *rest)
    return value, -gradient


class AheadOfTimeForces:
    """``function`` (positions, box, *pairs) -> (energy, forces) compiled ahead of time by AOTInductor,
    once per set of input shapes (a longer pair list is one more compilation).

    The function (``torch.func.grad_and_value`` of a frozen module) is traced to one graph of
    forward and backward ops (``make_fx``), exported and compiled into a package whose C++ runner is
    called without dynamo's guards or inductor's Python wrapper: measured 18-24 % less time per call
    than the same function under ``torch.compile`` at 160 beads. Its compiled kernels come from
    inductor's on-disk cache like ``torch.compile``'s.
    """

    def __init__(self, function: Callable[..., tuple[torch.Tensor, torch.Tensor]], folder: Path):
        self.function = function
        self.folder = folder
        self.runners: dict[tuple, Callable[..., Any]] = {}

    def compile(self, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        import tempfile

        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(self.function)(*inputs)
        program = torch.export.export(graph, inputs, strict=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix="aoti_") as folder:
            package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "forces.pt2"))
            return torch._inductor.aoti_load_package(package)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self.compile(inputs)
        return runner(*inputs)


class CompiledEnergy:
    """``PythonForce`` callback: energy and -dE/dx of ``module`` for one OpenMM State.

    Positions go in as float64, as TorchForce hands them over on CPU (the module computes in the
    model's dtype), so the eager call is the TorchScript module's arithmetic.

    With ``skin_nm`` > 0 and a module that takes a pair list (``SystemForce.energy_of_pairs``) the
    intermolecular pairs come from a :class:`~openmm_cgnn.model.neighbors.SkinPairList` kept here,
    outside the compiled graph, and the graph computes only those pairs: the graph-safe module on
    its own searches all N^2 bead pairs at every call and computes its full pair capacity (about
    twice the pairs found). A longer list compiles once more (shapes are static).
    """

    def __init__(self, module: torch.nn.Module, compile: bool, log: Callable[[str], None], report: dict[str, Any],
                 skin_nm: float = 0.0, backend: str = "inductor"):
        self.module = module
        self.backend = backend  # "inductor": torch.compile; "aoti": AheadOfTimeForces
        scripted = isinstance(module, torch.jit.ScriptModule)
        self.compile = compile and not scripted
        self.log = log
        self.info = report
        self.compiled: Any = None
        self.eager: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # function(), once built
        self.calls = 0
        self.skin_nm = float(skin_nm)
        self.uses_pair_list = self.skin_nm > 0 and not scripted and hasattr(module, "energy_of_pairs")
        self.pair_list: SkinPairList | None = None
        self.list_compiled = False
        self.capacities: list[int] = []  # pair-list lengths compiled so far
        if compile and not self.compile:
            report["compiled"] = False
            report["reason"] = "a TorchScript model.pt cannot be compiled: it runs eager"

    def function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """(positions, box, *pairs) -> (energy, forces): one function, so that ``torch.compile`` makes
        forward and backward one graph (``torch.func.grad_and_value``), without autograd's runtime
        (measured 24 % less time per call than compiling the energy and calling autograd.grad).
        A TorchScript module cannot go through torch.func: it takes autograd. Built at the first
        evaluation, after the first ``pairs`` call has settled whether there is a pair list."""
        if self.eager is None:
            energy = self.module.energy_of_pairs if self.uses_pair_list else self.module
            if isinstance(self.module, torch.jit.ScriptModule):
                self.eager = partial(autograd_forces, energy)
            else:
                self.eager = partial(functional_forces, torch.func.grad_and_value(energy))
        return self.eager

    def evaluate(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eager = self.function()
        if self.calls == 0 or not self.compile:
            return eager(*inputs)  # first call eager: a module that cannot run fails plainly here
        if self.compiled is None:
            cache = inductor_cache_dir()
            from torch._dynamo.utils import counters

            hits_before = counters["inductor"].get("fxgraph_cache_hit", 0)
            start = time.perf_counter()
            allow_recompiles()
            try:
                if self.backend == "aoti":  # never a TorchScript module: self.compile is off for those
                    compiled = AheadOfTimeForces(eager, cache / "aoti")
                else:
                    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
                result = compiled(*inputs)
            except Exception as exc:  # noqa: BLE001  (any compiler failure: run on eager)
                return self.fall_back(exc, eager, inputs)
            self.compiled = compiled
            self.info.update(compiled=True, compile_s=time.perf_counter() - start, cache_dir=str(cache),
                             fx_graph_cache_hits=counters["inductor"].get("fxgraph_cache_hit", 0) - hits_before)
            return result
        try:
            return self.compiled(*inputs)
        except Exception as exc:  # noqa: BLE001  (a recompilation for a longer pair list failed)
            return self.fall_back(exc, eager, inputs)

    def fall_back(self, exc: Exception, eager: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Any:
        """Run eager from now on, with a message: a compiler failure is never a failed run."""
        self.compile = False
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.info.update(compiled=False, reason=f"torch.compile failed: {first[:300]}")
        self.log(f"torch.compile of the model failed ({first[:200]}); the PythonForce runs it eager")
        return eager(*inputs)

    def pairs(self, positions: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The pair list's (index_i, index_j, valid), () without one, None when the search flags the
        configuration (the caller answers NaN, as the module itself would)."""
        if not self.uses_pair_list:
            return ()
        module = self.module
        dtype = module.inverse_temperature.dtype
        positions, box = positions.detach().to(dtype).unsqueeze(0), box.to(dtype).unsqueeze(0)
        if self.pair_list is None:
            search = module.energy.neighbors
            self.pair_list = SkinPairList.create(module.neighbor_backend, module.search_cutoff_nm,
                                                 module.max_pairs_per_bead, self.skin_nm, box, module.molecule_index,
                                                 getattr(search, "capacity_factor", 2.0))
            if self.pair_list is None:  # a box too small for the skin: the module searches itself
                self.uses_pair_list = False
                self.info["pair_list"] = f"none: the box is narrower than twice cutoff + skin ({self.skin_nm} nm)"
                return ()
        if self.compiled is not None and not self.list_compiled:  # the energy compiled: so will the list's helpers
            self.list_compiled = True
            self.pair_list.compile(compiled_or_eager)
        index_i, index_j, valid, flags = self.pair_list(positions, box)
        if flags:
            return None
        capacity = int(index_i.shape[1])
        if capacity not in self.capacities:
            if self.capacities and self.compile:
                self.log(f"the CG pair list grew to {capacity} pairs: compiling the model for that length")
            self.capacities.append(capacity)
            self.info["pair_list_capacities"] = list(self.capacities)
        return index_i, index_j, valid

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        positions = torch.from_numpy(np.array(in_nm(state.getPositions(asNumpy=True)), dtype=np.float64))
        box = torch.from_numpy(np.array(in_nm(state.getPeriodicBoxVectors(asNumpy=True)), dtype=np.float64))
        pairs = self.pairs(positions, box)
        if pairs is None:  # bad configuration: NaN energy and forces (model/export.py)
            return math.nan, np.full(tuple(positions.shape), math.nan)
        energy, forces = self.evaluate(positions, box, *pairs)
        self.calls += 1
        return float(energy.detach()), forces.detach().numpy()

    def report(self) -> dict[str, Any]:
        return {} if self.pair_list is None else self.pair_list.report()


class PythonForceEngine:
    """OpenMM ``PythonForce`` with the graph-safe module under ``torch.compile`` (module docstring)."""

    name = "python"
    exportable = False
    host_checks = False

    def __init__(self, compile: bool = True, log: Callable[[str], None] | None = None,
                 skin_nm: float | None = None, backend: str | None = None) -> None:
        self.compile = compile
        self.backend = backend or os.environ.get(BACKEND_ENV) or DEFAULT_COMPILE_BACKEND
        if self.backend not in COMPILE_BACKENDS:
            raise ValueError(f"{BACKEND_ENV}: the compile backend must be one of {COMPILE_BACKENDS}, got {self.backend!r}")
        self.skin_nm = COMPILED_SKIN_NM if skin_nm is None else float(skin_nm)
        if not (math.isfinite(self.skin_nm) and self.skin_nm >= 0):
            raise ValueError(f"neighbor_skin_nm must be >= 0, got {skin_nm!r}")
        self.log = log or (lambda message: print(message, flush=True))
        self.info: dict[str, Any] = {}
        self._callbacks: dict[int, CompiledEnergy] = {}  # one per module: Contexts share its compilation

    def prepare(self, module: torch.nn.Module) -> Any:
        return module

    def build(self, module: Any, periodic: bool, group: int, cuda_graphs: bool) -> Any:
        import openmm

        callback = self._callbacks.get(id(module))
        if callback is None or callback.module is not module:
            callback = self._callbacks[id(module)] = CompiledEnergy(module, self.compile, self.log, self.info,
                                                                    self.skin_nm, self.backend)
        force = openmm.PythonForce(callback)
        force.setName(FORCE_NAME)
        force.setUsesPeriodicBoundaryConditions(periodic)
        force.setForceGroup(group)
        return force

    def report(self) -> dict[str, Any]:
        lists = [callback.report() for callback in self._callbacks.values()]
        return {"engine": self.name, "force": "PythonForce (OpenMM) + torch.compile", "compile_backend": self.backend,
                **self.info,
                **({"pair_list": lists[-1]} if lists and lists[-1] else {})}


def make_engine(name: str, **options: Any) -> ForceEngine:
    """The engine called ``name`` (one of ``ENGINES``)."""
    if name == "torch":
        return TorchForceEngine()
    if name == "python":
        return PythonForceEngine(**options)
    raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
