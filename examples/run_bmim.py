"""The whole openmm_cgnn chain for [BMIM][BF4], one stage after another.

    python examples/run_bmim.py --quick              # 2-core CPU, about 10 minutes, tiny sizes
    python examples/run_bmim.py --size cpu --jobs 2  # CPU-sized verdict, 550-700 K, about 1.5 hours on 2 cores
    python examples/run_bmim.py                      # full size, meant for a CUDA GPU

Stages: all-atom ground truth at several temperatures -> learned mapping (CGAE) -> Hybridgraph
force field (force matching) -> export for plain OpenMM -> CG simulations -> evaluation report.
Each stage runs the ``openmm-cgnn`` command a user would type, and is skipped when its output
already exists, so an interrupted run picks up where it stopped (``--restart`` starts afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Sizes are data: the quick mode keeps the chain honest on a laptop-class CPU, the full mode is the
# published-scale run (about 300 ion pairs, 350-500 K, nanoseconds of all-atom dynamics).
SETTINGS = {
    "quick": {
        "pairs": 16,
        "temperatures": [400, 450, 500],
        "aa": {"--equilibrate-ps": 10, "--production-ps": 30, "--save-every-ps": 0.2, "--cutoff-nm": 0.75},
        "map": {"--epochs": 150, "--restarts": 2},
        "train": {"--quick": None, "--epochs": 15, "--max-frames": 60},
        "cg_steps": 2000,
        "cg_save_every_steps": 10,
        "platform": "CPU",
        "device": "cpu",
    },
    # Hot enough that centre-of-mass motion turns diffusive within a few hundred ps of a 32-pair
    # box on a CPU; the 350-500 K range of the full run needs nanoseconds and a GPU.
    "cpu": {
        "pairs": 32,
        "temperatures": [550, 600, 650, 700],
        "aa": {"--equilibrate-ps": 40, "--production-ps": 300, "--save-every-ps": 0.5, "--cutoff-nm": 0.9},
        "map": {"--epochs": 300, "--restarts": 3, "--max-frames": 200},
        "train": {"--quick": None, "--epochs": 25, "--max-frames": 300, "--patience": 8,
                  "--model-option": "features=64 filters=64 n_gaussians=32"},
        "cg_steps": 40_000,
        "cg_save_every_steps": 50,
        "platform": "CPU",
        "device": "cpu",
    },
    "full": {
        "pairs": 300,
        "temperatures": [350, 400, 450, 500],
        "aa": {"--equilibrate-ps": 1000, "--production-ps": 5000, "--save-every-ps": 1.0, "--cutoff-nm": 1.2},
        "map": {"--epochs": 1000, "--restarts": 5},
        "train": {"--epochs": 200},
        "cg_steps": 2_000_000,
        "cg_save_every_steps": 500,
        "platform": "CUDA",
        "device": "cuda",
    },
}


def stage_done(done_marker: Path) -> bool:
    """A stage is done when its marker exists and, for run directories, its summary says it finished."""
    if not done_marker.exists():
        return False
    if done_marker.name == "summary.json":
        status = json.loads(done_marker.read_text()).get("status", "ok")
        return not str(status).startswith("failed")
    return True


def run_stages(stages: list[tuple[str, list[str], Path]], jobs: int = 1, log_dir: Path | None = None) -> None:
    """Run independent stages (one per temperature), at most ``jobs`` at a time.

    With several jobs each process gets an equal share of the cores (OpenMM and torch threads) and
    writes its output to ``log_dir/<name>.log``: oversubscribed threads made parallel runs slower
    than sequential ones on a 2-core machine.
    """
    pending = [stage for stage in stages if not _skip(*stage)]
    if jobs <= 1 or len(pending) <= 1:
        for name, args, _ in pending:
            _wait(name, _start(name, args), time.perf_counter())
        return
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OPENMM_CPU_THREADS=threads, OMP_NUM_THREADS=threads)
    assert log_dir is not None
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, subprocess.Popen, float, Path]] = []
    failures = []
    while pending or running:
        while pending and len(running) < jobs:
            name, args, _ = pending.pop(0)
            log = log_dir / (name.replace(" ", "_") + ".log")
            print(f"[{name}] running, output in {log}", flush=True)
            running.append((name, _start(name, args, env, log), time.perf_counter(), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            try:
                _wait(*item[:3])
            except SystemExit as exc:
                failures.append(f"{exc} (its output: {item[3]})")
    if failures:
        raise SystemExit("; ".join(failures))


def run_stage(name: str, args: list[str], done_marker: Path) -> None:
    run_stages([(name, args, done_marker)])


def _skip(name: str, args: list[str], done_marker: Path) -> bool:
    if stage_done(done_marker):
        print(f"[{name}] already done ({done_marker}), skipping")
        return True
    return False


def _start(name: str, args: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "openmm_cgnn", *args]
    print(f"\n[{name}] {' '.join(command[1:])}", flush=True)
    if log is None:
        return subprocess.Popen(command, env=env)
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _wait(name: str, process: subprocess.Popen, start: float) -> None:
    if process.wait() != 0:
        raise SystemExit(f"[{name}] failed with exit status {process.returncode}; outputs so far are kept")
    print(f"[{name}] finished in {time.perf_counter() - start:.0f} s", flush=True)


def options(table: dict) -> list[str]:
    """CLI options from a settings table; a value with spaces is several arguments (``nargs='+'``)."""
    out: list[str] = []
    for key, value in table.items():
        out.append(key)
        if value is not None:
            out.extend(str(value).split())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (about 10 minutes on 2 cores); --size quick")
    parser.add_argument("--size", choices=sorted(SETTINGS), default=None,
                        help="quick: smoke run; cpu: the CPU-sized verdict (32 pairs, 550-700 K); full: GPU scale")
    parser.add_argument("--jobs", type=int, default=1,
                        help="per-temperature stages (AA and CG runs) at a time, sharing the CPU cores (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default runs/bmim_quick, runs/bmim_cpu or runs/bmim)")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CPU for the quick and cpu sizes, CUDA for full)")
    parser.add_argument("--restart", action="store_true", help="delete the results directory first")
    args = parser.parse_args()

    if args.quick and args.size not in (None, "quick"):
        parser.error("--quick is --size quick; give one of them")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    mode = "quick" if args.quick else args.size or "full"
    cfg = SETTINGS[mode]
    platform = args.platform or cfg["platform"]
    device = "cuda" if platform == "CUDA" else "cpu"
    out = args.out or Path("runs") / {"quick": "bmim_quick", "cpu": "bmim_cpu", "full": "bmim"}[mode]
    if args.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    aa_dirs = [out / "aa" / f"T{t}K" for t in cfg["temperatures"]]
    run_stages([
        (f"aa {temperature} K",
         ["aa", "--pairs", str(cfg["pairs"]), "--temperature", str(temperature), *options(cfg["aa"]),
          "--platform", platform, "--seed", "1", "--out", str(aa_dir), "--resume"],
         aa_dir / "summary.json")
        for temperature, aa_dir in zip(cfg["temperatures"], aa_dirs)
    ], args.jobs, out / "logs")

    map_dir = out / "mapping"
    run_stage(
        "map",
        ["map", "--data", *map(str, aa_dirs), "--beads", "BMIM=4,BF4=1", "--out", str(map_dir), "--seed", "1",
         "--device", device, *options(cfg["map"])],
        map_dir / "mapping.json",
    )

    model_dir = out / "model"
    run_stage(
        "train",
        ["train", "--data", *map(str, aa_dirs), "--mapping", str(map_dir / "mapping.json"), "--out", str(model_dir),
         "--device", device, "--seed", "1", "--temperature-input", *options(cfg["train"]),
         *(["--resume"] if (model_dir / "checkpoint.pt").exists() else [])],
        model_dir / "model.pt",
    )

    export_dir = out / "export"
    run_stage(
        "export",
        ["export", "--model", str(model_dir), "--from-aa", str(aa_dirs[-1]), "--out", str(export_dir)],
        export_dir / "system.xml",
    )

    cg_dirs = [out / "cg" / f"T{t}K" for t in cfg["temperatures"]]
    run_stages([
        (f"simulate {temperature} K",
         ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa_dir), "--temperature", str(temperature),
          "--steps", str(cfg["cg_steps"]), "--save-every-steps", str(cfg["cg_save_every_steps"]),
          "--platform", platform, "--seed", "1", "--out", str(cg_dir), "--resume"],
         cg_dir / "summary.json")
        for temperature, aa_dir, cg_dir in zip(cfg["temperatures"], aa_dirs, cg_dirs)
    ], args.jobs, out / "logs")

    report_dir = out / "report"
    run_stage(
        "evaluate",
        ["evaluate", "--aa", *map(str, aa_dirs), "--cg", *map(str, cg_dirs), "--mapping", str(map_dir / "mapping.json"),
         "--out", str(report_dir)],
        report_dir / "report.md",
    )

    elapsed = time.perf_counter() - started
    print(f"\nDone in {elapsed / 60:.1f} min. Results in {out.resolve()}:")
    for label, path in [("all-atom runs", out / "aa"), ("mapping", map_dir / "mapping.json"), ("model", model_dir),
                        ("OpenMM export", export_dir), ("CG runs", out / "cg"), ("report", report_dir / "report.md")]:
        print(f"  {label:14s} {path}")
    metrics = report_dir / "metrics.json"
    if metrics.exists():
        verdict = json.loads(metrics.read_text()).get("verdict", {})
        for species, judged in verdict.get("Ea", {}).items():
            difference = judged.get("relative_difference")
            print(f"  E_a {species}: {judged['status']}"
                  + (f" (CG {100 * difference:+.1f}% from AA)" if difference is not None else f" ({judged.get('detail')})"))
        for group, judged in verdict.get("rdf", {}).items():
            print(f"  worst {group} RDF error {100 * judged['worst_error']:.1f}% ({judged['pair']}): {judged['status']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
