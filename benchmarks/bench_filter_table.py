"""Tabulated continuous filters (model/filter_table.py): accuracy against the intervals, and the time saved.

Accuracy: on one configuration (``--frames``: the first frame of a CG run or mapped AA frames of the
model's mapping; a packed start otherwise), the host-reading module without the prior (the network
alone: the prior's larger forces would hide its errors) with tabulated filters against the exact
one, for each of ``--intervals``: the energy difference relative to |E| and the largest force
difference relative to the RMS force. The float32 floor beside it: the exact float32 module
against the same model in float64.

Speed: ms per forward+backward of the engines' modules (profile_ops.py: TorchScript host-reading,
graph-safe eager, ``--compile`` also compiled), exact (``filter_intervals=0``) and tabulated at
``DEFAULT_FILTER_INTERVALS``, for a packed start of each of ``--pairs``, all of one size taking
turns call by call in this one process.

    python benchmarks/bench_filter_table.py [--model benchmarks/gpu_reference/model] [--frames RUN/cg/T400K]
        [--pairs 16 32 100] [--compile]

Writes benchmarks/results/filter_table_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import RESULTS, machine_info, pin_threads, write_json
from profile_ops import REPO, energy_and_forces, time_in_turns


def accuracy(model: Any, cg: Any, temperature: float, intervals: list[int]) -> dict[str, Any]:
    """Tabulated vs exact network forces and energy on ``cg``'s positions, and the float32 floor."""
    from openmm_cgnn.model.export import build_system_module

    positions = torch.as_tensor(np.asarray(cg.positions), dtype=torch.float64)
    box = torch.as_tensor(np.asarray(cg.box), dtype=torch.float64)

    def evaluate(source: Any, filter_intervals: int) -> tuple[float, np.ndarray]:
        module = build_system_module(source, cg.bead_type, cg.molecule_index, temperature, include_prior=False,
                                     box=np.asarray(cg.box), filter_intervals=filter_intervals)
        return energy_and_forces(torch.jit.script(module), positions, box)

    energy, forces = evaluate(model, 0)
    rms = float(np.sqrt(np.mean(forces ** 2)))

    def errors(other: tuple[float, np.ndarray]) -> dict[str, float]:
        return {"energy_relative": abs(other[0] - energy) / abs(energy),
                "max_force_over_rms": float(np.abs(other[1] - forces).max()) / rms}

    model64 = copy.deepcopy(model).to(torch.float64)
    return {"beads": int(cg.n_beads), "energy_kj_mol": energy, "rms_force_kj_mol_nm": rms,
            "float32_floor": errors(evaluate(model64, 0)),
            "intervals": {str(n): errors(evaluate(model, n)) for n in intervals}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "benchmarks" / "gpu_reference" / "model")
    parser.add_argument("--frames", type=Path, default=None, help="CG frames (file or run folder) for the accuracy")
    parser.add_argument("--intervals", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 32, 100])
    parser.add_argument("--density", type=float, default=1140.0)
    parser.add_argument("--temperature", type=float, default=400.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also the graph-safe modules under torch.compile")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of timing per size at most")
    parser.add_argument("--out", type=Path, default=RESULTS / "filter_table_cpu.json")
    args = parser.parse_args()
    threads = pin_threads(args.threads)

    from openmm_cgnn.frames import read_frames
    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.model import load_model
    from openmm_cgnn.model.export import build_system_module
    from openmm_cgnn.model.filter_table import DEFAULT_FILTER_INTERVALS
    from openmm_cgnn.openmm import CGSystem, composition_for_pairs

    model = load_model(args.model)
    mapping = Mapping.load(args.model / "mapping.json")
    if args.frames is not None:
        frames = read_frames(args.frames, stop=1)
        topology = frames.topology
        first_bead = np.unique(topology.residue_index, return_index=True)[1]
        cg = CGSystem.from_molecules(mapping, [topology.residue_name[i] for i in first_bead], frames.positions[0],
                                     frames.box[0])
    else:
        cg = CGSystem.packed(mapping, composition_for_pairs(mapping, args.pairs[0]), args.density, seed=1)
    result = accuracy(model, cg, args.temperature, args.intervals)
    print(f"accuracy ({result['beads']} beads): float32 floor {result['float32_floor']}", flush=True)
    for n, row in result["intervals"].items():
        print(f"  {n:>5s} intervals: {row}", flush=True)

    timing = []
    for pairs in args.pairs:
        cg = CGSystem.packed(mapping, composition_for_pairs(mapping, pairs), args.density, seed=1)
        positions = torch.as_tensor(np.asarray(cg.positions), dtype=torch.float64)
        box = torch.as_tensor(np.asarray(cg.box), dtype=torch.float64)
        modules: dict[str, Any] = {}
        for label, filter_intervals in (("exact", 0), ("tabulated", DEFAULT_FILTER_INTERVALS)):
            def build(host_checks: bool) -> Any:
                return build_system_module(model, cg.bead_type, cg.molecule_index, args.temperature,
                                           box=np.asarray(cg.box), host_checks=host_checks,
                                           filter_intervals=filter_intervals)
            modules[f"torch/{label}"] = torch.jit.script(build(True))
            modules[f"python/{label}"] = build(False)
            if args.compile:
                modules[f"python_compiled/{label}"] = torch.compile(modules[f"python/{label}"], fullgraph=True,
                                                                    dynamic=False)
        for module in modules.values():  # TorchScript's profiling runs, compilation
            for _ in range(3):
                energy_and_forces(module, positions, box)
        times = time_in_turns(modules, positions, box, args.repeats, args.budget)
        for engine in sorted({name.split("/")[0] for name in modules}):
            exact, tabulated = times[f"{engine}/exact"], times[f"{engine}/tabulated"]
            row = {"pairs": pairs, "beads": int(cg.n_beads), "module": engine,
                   "exact_min_ms": exact["min_ms"], "tabulated_min_ms": tabulated["min_ms"],
                   "exact_median_ms": exact["median_ms"], "tabulated_median_ms": tabulated["median_ms"],
                   "ratio_min": tabulated["min_ms"] / exact["min_ms"],
                   "ratio_median": tabulated["median_ms"] / exact["median_ms"], "calls": exact["calls"]}
            timing.append(row)
            print(f"{pairs:4d} pairs {engine:16s} exact {row['exact_min_ms']:.2f} / {row['exact_median_ms']:.2f} ms, "
                  f"tabulated {row['tabulated_min_ms']:.2f} / {row['tabulated_median_ms']:.2f} ms (min / median): "
                  f"ratio {row['ratio_min']:.2f} / {row['ratio_median']:.2f}", flush=True)

    write_json(args.out, {
        "benchmark": "tabulated vs exact continuous filters: accuracy vs intervals, ms per forward+backward",
        "settings": {"model": str(args.model), "frames": None if args.frames is None else str(args.frames),
                     "default_intervals": DEFAULT_FILTER_INTERVALS, "pairs": args.pairs,
                     "density_kg_m3": args.density, "temperature_K": args.temperature, "threads": threads,
                     "command": " ".join(sys.argv)},
        "machine": machine_info(), "accuracy": result, "timing": timing})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
