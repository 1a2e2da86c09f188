"""The whole openmm_cgnn chain for [BMIM][BF4], one stage after another.

    python examples/run_bmim.py --quick      # 2-core CPU, about 10 minutes, tiny sizes
    python examples/run_bmim.py              # full size, meant for a CUDA GPU

Stages: all-atom ground truth at several temperatures -> learned mapping (CGAE) -> Hybridgraph
force field (force matching) -> export for plain OpenMM -> CG simulations -> evaluation report.
Each stage runs the ``openmm-cgnn`` command a user would type, and is skipped when its output
already exists, so an interrupted run picks up where it stopped (``--restart`` starts afresh).
"""

from __future__ import annotations

import argparse
import json
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


def run_stage(name: str, args: list[str], done_marker: Path) -> None:
    if stage_done(done_marker):
        print(f"[{name}] already done ({done_marker}), skipping")
        return
    command = [sys.executable, "-m", "openmm_cgnn", *args]
    print(f"\n[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"[{name}] failed with exit status {result.returncode}; outputs so far are kept")
    print(f"[{name}] finished in {time.perf_counter() - start:.0f} s", flush=True)


def options(table: dict) -> list[str]:
    out: list[str] = []
    for key, value in table.items():
        out.append(key)
        if value is not None:
            out.append(str(value))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (about 10 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default runs/bmim_quick or runs/bmim)")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CPU for --quick, CUDA otherwise)")
    parser.add_argument("--restart", action="store_true", help="delete the results directory first")
    args = parser.parse_args()

    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    platform = args.platform or cfg["platform"]
    device = "cuda" if platform == "CUDA" else "cpu"
    out = args.out or Path("runs") / ("bmim_quick" if args.quick else "bmim")
    if args.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    aa_dirs = [out / "aa" / f"T{t}K" for t in cfg["temperatures"]]
    for temperature, aa_dir in zip(cfg["temperatures"], aa_dirs):
        run_stage(
            f"aa {temperature} K",
            ["aa", "--pairs", str(cfg["pairs"]), "--temperature", str(temperature), *options(cfg["aa"]),
             "--platform", platform, "--seed", "1", "--out", str(aa_dir), "--resume"],
            aa_dir / "summary.json",
        )

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
    for temperature, aa_dir, cg_dir in zip(cfg["temperatures"], aa_dirs, cg_dirs):
        run_stage(
            f"simulate {temperature} K",
            ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa_dir), "--temperature", str(temperature),
             "--steps", str(cfg["cg_steps"]), "--save-every-steps", str(cfg["cg_save_every_steps"]),
             "--platform", platform, "--seed", "1", "--out", str(cg_dir), "--resume"],
            cg_dir / "summary.json",
        )

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
        summary = json.loads(metrics.read_text()).get("arrhenius", {})
        print("  Arrhenius:", json.dumps(summary, default=str)[:400])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
