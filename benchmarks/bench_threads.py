"""Threads: AA and CG ms/step with 1 and 2 threads, on an otherwise idle machine and beside one busy process.

Issue 17 item 4. Each configuration is one ``bench_md.py`` run (AA and CG side by side in one
process, ``--threads N`` pinning torch's intra-op pool and OpenMM's CPU threads alike); "busy" starts
one competing process (a pure-Python spin loop, one core) before the run and stops it after. The
ratios within a run are what to compare; the rows together show what a competing process does to
each thread count (torch's pool collapses when it cannot get its cores).

    python benchmarks/bench_threads.py --model benchmarks/gpu_reference/model -- \
        --size quick --pairs 32 --cg-dt-fs 8 --density 1140 --scaling-beads --platform CPU \
        --thermalize-steps 100 --block-seconds 1.5 --blocks 4 --carrier python/openmm torch/openmm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from common import machine_info

HERE = Path(__file__).resolve().parent
SPIN = "while True: pass"


def run_config(model: Path, threads: int, busy: bool, bench_args: Sequence[str], work: Path) -> dict[str, Any]:
    """One bench_md.py run; its rows reduced to AA and per-carrier CG ms/step, ns/day and ratio."""
    out = work / f"md_{threads}_{'busy' if busy else 'idle'}.json"
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        subprocess.run([sys.executable, str(HERE / "bench_md.py"), "--model", str(model), "--threads", str(threads),
                        *bench_args, "--out", str(out)], check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    result = json.loads(out.read_text())
    rows = []
    for row in result["md"]:
        rows.append({"pairs": row["pairs"], "aa_ms_per_step": row["aa"]["ms_per_step"],
                     "cg": {name: {"ms_per_step": cg["ms_per_step"], "ns_per_day": cg["ns_per_day"],
                                   "ratio_ns_per_day_cg_over_aa": cg["ratio_ns_per_day_cg_over_aa"],
                                   "engine": cg["carrier"]}
                            for name, cg in row["cg_by_carrier"].items()},
                     "load_average_1min": row["load_average_1min"]})
    return {"threads": threads, "competing_process": busy, "rows": rows, "settings": result["settings"]}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (bench_md.py --model)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "threads_cpu.json")
    args = parser.parse_args(own)
    if any(t < 1 for t in args.threads):
        parser.error("--threads: each must be >= 1")
    configs = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        for busy in (False, True):
            for threads in args.threads:
                configs.append(run_config(args.model, threads, busy, bench_args, Path(tmp)))
    result = {"benchmark": "AA and CG ms/step at 1 and 2 threads, idle and beside one competing process",
              "machine": machine_info(), "bench_md_args": bench_args, "configs": configs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| threads | competing process | pairs | AA ms/step | " + " | ".join(
        f"CG {name} ms/step (CG/AA)" for name in configs[0]["rows"][0]["cg"]) + " |")
    for config in configs:
        for row in config["rows"]:
            cells = " | ".join(f"{cg['ms_per_step']:.2f} ({cg['ratio_ns_per_day_cg_over_aa']:.1f}x)"
                               for cg in row["cg"].values())
            print(f"| {config['threads']} | {'yes' if config['competing_process'] else 'no'} | {row['pairs']} | "
                  f"{row['aa_ms_per_step']:.2f} | {cells} |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
