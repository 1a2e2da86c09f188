"""Compile time of the PythonForce engine (torch.compile of the graph-safe module), with and without
inductor's on-disk cache, each in a fresh process (dynamo's in-process caches play no part).

    python benchmarks/bench_compile.py --model MODELDIR [--pairs 32] [--size quick]

Writes benchmarks/results/compile_<platform>.json: per process the first (eager) call, the
compiling call and a later call, with the cache directory empty ("cold") and then filled ("warm").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine_info, write_json


def one_process(args: argparse.Namespace) -> dict:
    """In this process: build the CG system, the python-engine force, and time its calls."""
    import torch

    torch.set_num_threads(1)
    import openmm

    from bench_md import fresh_model_dir
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.openmm import CGNNForce, CGConfiguration, composition_for_pairs

    mapping = CGMapping.load(args.model / "mapping.json")
    cg = CGConfiguration.packed(mapping, composition_for_pairs(mapping, args.pairs), args.density, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model if args.size == "saved" else fresh_model_dir(args.model, args.size, Path(tmp) / "m")
        force = CGNNForce(source, cg, 400.0, engine="python")
        system = cg.system()
        force.add_to(system, "CPU")
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                                 {"Threads": "1"})
        context.setPositions(cg.positions)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            context.getState(getForces=True)
            times.append(time.perf_counter() - start)
        report = force.engine_report()
    return {"beads": cg.n_beads, "first_call_s": times[0], "compiling_call_s": times[1], "later_call_s": times[2],
            **{k: report.get(k) for k in ("compiled", "compile_s", "fx_graph_cache_hits", "cache_dir")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--size", choices=["saved", "quick", "reference"], default="quick")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--density", type=float, default=1140.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args)))
        return 0
    rows = {}
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("cold", "warm"):
            command = [sys.executable, __file__, "--child", "--model", str(args.model), "--size", args.size,
                       "--pairs", str(args.pairs), "--density", str(args.density)]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            rows[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}
            print(name, rows[name], flush=True)
    write_json(args.out or RESULTS / "compile_cpu.json",
               {"benchmark": "PythonForce engine: torch.compile time without (cold) and with (warm) the inductor cache",
                "machine": machine_info(), "settings": {"model": str(args.model), "size": args.size, "pairs": args.pairs,
                                                        "threads": 1, "command": " ".join(sys.argv)}, **rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
