"""Op counts and time per forward+backward of the CG system modules, optionally against an older tree.

The two modules the force engines run, for one CG system of the model's mapping (a packed start):
- ``torch``: the production module as TorchForce holds it (host-reading, reused pair list, TorchScript);
- ``python``: the graph-safe module as the PythonForce engine calls it eager (its first call, and
  every call when compilation is off); ``--compile`` adds it under ``torch.compile``.
Each is called as the engines call it: float64 positions with ``requires_grad``, energy, then the
gradient. ``torch.profiler`` counts the ``aten::`` calls of one forward+backward (nested calls
included, so ``aten::to`` and the ``aten::_to_copy``/``aten::copy_`` under it all count).

``--baseline REF`` also imports the package as it was at git commit REF (``git archive`` into a
temporary folder, imported under another name), builds the same modules from the same model
directory and positions, and reports energies and forces of both, their difference, and the
times of both measured call by call in turns in this one process (load hits both alike).

    python benchmarks/profile_ops.py [--model benchmarks/gpu_reference/model] [--pairs 32] [--baseline HEAD~3]

Writes benchmarks/results/profile_ops_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import RESULTS, machine_info, pin_threads, write_json

REPO = Path(__file__).resolve().parent.parent
BASELINE_PACKAGE = "openmm_cgnn_baseline"


def import_baseline(ref: str, folder: Path) -> Any:
    """``openmm_cgnn`` as it was at commit ``ref``, imported as ``openmm_cgnn_baseline`` (its imports
    are relative, so a renamed copy is a separate package)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "openmm_cgnn"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "openmm_cgnn").rename(folder / BASELINE_PACKAGE)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{BASELINE_PACKAGE}.model")


def engine_modules(model_package: Any, model_dir: Path, cg: Any, temperature: float, compile: bool) -> dict[str, Any]:
    """The engines' modules for ``cg``, built by ``model_package`` (``openmm_cgnn.model`` or a baseline's)."""
    model = model_package.load_model(model_dir)
    build = model_package.export.build_system_module
    box = np.asarray(cg.box)
    modules = {
        "torch": torch.jit.script(build(model, cg.bead_type, cg.molecule_index, temperature, box=box, host_checks=True)),
        "python": build(model, cg.bead_type, cg.molecule_index, temperature, box=box, host_checks=False),
    }
    if compile:
        modules["python_compiled"] = torch.compile(modules["python"], fullgraph=True, dynamic=False)
    return modules


def energy_and_forces(module: Callable, positions: torch.Tensor, box: torch.Tensor) -> tuple[float, np.ndarray]:
    x = positions.detach().clone().requires_grad_(True)
    energy = module(x, box)
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), (-gradient).numpy()


def op_counts(module: Callable, positions: torch.Tensor, box: torch.Tensor, calls: int) -> dict[str, Any]:
    """aten:: calls per forward+backward (mean over ``calls``): all, those not inside another aten:: op
    (what the dispatcher is asked for), aten::to, and the 15 most frequent."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # TorchScript's profiling runs, allocator warm-up
        energy_and_forces(module, positions, box)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            energy_and_forces(module, positions, box)
    counts: collections.Counter = collections.Counter()
    top_level = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            counts[event.name] += 1
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            top_level += parent is None
    total = sum(counts.values())
    return {"aten_calls": total / calls, "aten_top_level_calls": top_level / calls,
            "aten_to": counts.get("aten::to", 0) / calls,
            "aten_to_copy": counts.get("aten::_to_copy", 0) / calls,
            "top": {name: n / calls for name, n in counts.most_common(15)}}


def time_in_turns(modules: dict[str, Callable], positions: torch.Tensor, box: torch.Tensor, repeats: int,
                  budget_s: float) -> dict[str, dict[str, float]]:
    """ms per forward+backward of each module, the modules taking turns call by call."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, module in modules.items():
            t0 = time.perf_counter()
            energy_and_forces(module, positions, box)
            times[name].append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() - start > budget_s:
            break
    return {name: {"min_ms": min(t), "median_ms": statistics.median(t), "calls": len(t)} for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "benchmarks" / "gpu_reference" / "model",
                        help="model directory (its saved network is profiled)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--density", type=float, default=1140.0)
    parser.add_argument("--temperature", type=float, default=400.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=None, help="git commit to compare with (e.g. the one before a change)")
    parser.add_argument("--compile", action="store_true", help="also the graph-safe module under torch.compile")
    parser.add_argument("--profile-calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timing at most")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_ops_cpu.json")
    args = parser.parse_args()
    threads = pin_threads(args.threads)

    import openmm_cgnn.model as current
    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.openmm import CGSystem, composition_for_pairs

    mapping = Mapping.load(args.model / "mapping.json")
    cg = CGSystem.packed(mapping, composition_for_pairs(mapping, args.pairs), args.density, seed=1)
    positions = torch.as_tensor(np.asarray(cg.positions), dtype=torch.float64)
    box = torch.as_tensor(np.asarray(cg.box), dtype=torch.float64)

    trees = {"current": current}
    with tempfile.TemporaryDirectory(prefix="baseline_") as folder:
        if args.baseline:
            trees["baseline"] = import_baseline(args.baseline, Path(folder))
        modules = {f"{tree}/{engine}": module for tree, package in trees.items()
                   for engine, module in engine_modules(package, args.model, cg, args.temperature, args.compile).items()}
        values = {name: energy_and_forces(module, positions, box) for name, module in modules.items()}
        ops = {name: op_counts(module, positions, box, args.profile_calls) for name, module in modules.items()
               if not name.endswith("_compiled")}
        timing = time_in_turns(modules, positions, box, args.repeats, args.budget)

    rows = []
    for name, module in modules.items():
        tree, engine = name.split("/")
        energy, forces = values[name]
        row = {"tree": tree, "engine": engine, "energy_kj_mol": energy, **timing[name], **ops.get(name, {})}
        if tree == "current" and "baseline" in trees:
            base_energy, base_forces = values[f"baseline/{engine}"]
            row["vs_baseline"] = {
                "energy_difference_kj_mol": energy - base_energy,
                "max_force_difference_kj_mol_nm": float(np.abs(forces - base_forces).max()),
                "rms_force_kj_mol_nm": float(np.sqrt(np.mean(base_forces ** 2))),
                "time_ratio_min": timing[f"baseline/{engine}"]["min_ms"] / timing[name]["min_ms"],
                "time_ratio_median": timing[f"baseline/{engine}"]["median_ms"] / timing[name]["median_ms"],
            }
        rows.append(row)
        print(f"{name:24s} E={energy:14.6f}  {row.get('aten_calls', float('nan')):7.0f} aten calls "
              f"({row.get('aten_top_level_calls', float('nan')):5.0f} top level, {row.get('aten_to', float('nan')):4.0f} "
              f"aten::to)  min {row['min_ms']:.2f} ms  median "
              f"{row['median_ms']:.2f} ms", flush=True)
        if "vs_baseline" in row:
            print(f"{'':24s} vs baseline: {row['vs_baseline']}", flush=True)
    write_json(args.out, {
        "benchmark": "CG system modules: aten calls and ms per forward+backward (positions float64, 1 frame)",
        "settings": {"model": str(args.model.resolve().relative_to(REPO) if args.model.resolve().is_relative_to(REPO)
                                  else args.model), "pairs": args.pairs, "beads": cg.n_beads, "density_kg_m3": args.density,
                     "temperature_K": args.temperature, "baseline": args.baseline, "threads": threads,
                     "command": " ".join(sys.argv)},
        "machine": machine_info(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
