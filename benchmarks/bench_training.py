"""Force-matching training throughput: training frames per second (forward, force, backward, Adam step).

For each system size and network size, one Trainer (the code ``openmm-cgnn train`` runs) does
timed optimiser steps on a synthetic CG liquid of about 16 beads/nm^3 (a 5-bead-per-ion-pair map
of [BMIM][BF4]); the targets are random, which does not change the cost. Also times the
validation pass (forces without the second-order graph). Writes
benchmarks/results/training_<device>.json.

With ``--nproc 1 2 ...`` it measures data-parallel scaling instead: ``openmm-cgnn train`` itself,
started by torchrun with each number of processes (``--threads`` threads each), on the same
simulated run (``SyntheticSystem`` scaled to ``--ddp-beads`` beads) with the same global batch.
frames/s = training frames / epoch seconds (training steps + validation pass), from each run's
metrics.json, the first epoch left out as warm-up; the layouts take turns for ``--rounds`` rounds.
Writes benchmarks/results/training_ddp_<device>.json.

    python benchmarks/bench_training.py [--sizes 80 320] [--configs quick reference] [--device cpu|cuda]
    python benchmarks/bench_training.py --nproc 1 2 [--device cpu|cuda] [--ddp-beads 300] [--epochs 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, pin_threads, synchronize, torch_result, write_json
from openmm_cgnn.mapping.spec import CGFrames
from openmm_cgnn.testing.cg_models import ionic_liquid
from openmm_cgnn.training.data import split_runs
from openmm_cgnn.training.pipeline import build_model
from openmm_cgnn.testing.known_potential import SyntheticSystem
from openmm_cgnn.training.trainer import TrainConfig, Trainer


def synthetic_frames(n_beads: int, frames: int, seed: int = 0) -> CGFrames:
    cg = ionic_liquid(n_pairs=max(n_beads // 4, 1), box_nm=None, frames=frames, jitter_nm=0.05, seed=seed)
    rng = np.random.default_rng(seed)
    fields = dataclasses.asdict(cg)
    fields["forces"] = rng.normal(scale=100.0, size=cg.positions.shape).astype(np.float32)
    return CGFrames(**fields)


def time_steps(trainer: Trainer, batch_size: int, steps: int, budget_s: float, create_graph: bool) -> dict:
    """Median seconds per batch of training steps (or validation evaluations), after warm-up."""
    frames = trainer.train_frames
    index = torch.arange(batch_size, device=frames.positions.device)

    def step() -> None:
        predicted = trainer.predict_forces(frames, index, create_graph=create_graph)
        if create_graph:
            loss = torch.mean((predicted - frames.forces[index]) ** 2) * trainer.loss_scale
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()

    for _ in range(2):
        step()
    times, start = [], time.perf_counter()
    for _ in range(steps):
        synchronize(trainer.device)
        t0 = time.perf_counter()
        step()
        synchronize(trainer.device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    median = statistics.median(times)
    return {"median_s_per_batch": median, "frames_per_s": batch_size / median, "batches": len(times)}


def scaled_system(n_beads: int) -> SyntheticSystem:
    """The synthetic dimer + monomer liquid with about ``n_beads`` beads at its usual density."""
    base = SyntheticSystem()
    per_kind = max(1, round(n_beads / 3))  # a dimer and a monomer: 3 beads
    n_base = 2 * base.n_dimers + base.n_monomers
    box = base.box_nm * (3 * per_kind / n_base) ** (1 / 3)
    return SyntheticSystem(n_dimers=per_kind, n_monomers=per_kind, box_nm=box)


def train_with_processes(run: Path, out: Path, processes: int, threads: int, args: argparse.Namespace) -> dict:
    """One ``openmm-cgnn train`` under torchrun; epoch timings and final errors from its metrics.json."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(processes), "-m", "openmm_cgnn", "train",
               "--data", str(run), "--mapping", str(run / "mapping.json"), "--out", str(out), "--overwrite",
               "--quick", "--epochs", str(args.epochs), "--patience", str(args.epochs), "--batch-size", str(args.batch_size),
               "--device", args.device, "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = metrics["data"]["n_train_frames"]
    timed_epochs = [h["seconds"] for h in metrics["history"][1:]]  # epoch 1: allocations, first graphs
    return {
        "processes": processes, "threads_per_process": threads, "wall_s": wall,
        "epoch_seconds": [h["seconds"] for h in metrics["history"]],
        "frames_per_s_best": n_train / min(timed_epochs),
        "frames_per_s_median": n_train / statistics.median(timed_epochs),
        "validation_mse": metrics["validation"]["overall"]["mse"],
    }


def ddp_scaling(args: argparse.Namespace) -> int:
    """Frames/s of ``openmm-cgnn train`` with each of ``args.nproc`` processes (see the module docstring)."""
    device = torch.device(args.device)
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        system = scaled_system(args.ddp_beads)
        run = system.simulate(Path(tmp) / "run", n_frames=args.ddp_frames, steps_per_frame=20, equilibration_steps=500)
        runs: dict[int, list[dict]] = {n: [] for n in args.nproc}
        for _ in range(args.rounds):  # layouts take turns, so load from other jobs hits them alike
            for n in args.nproc:
                runs[n].append(train_with_processes(run, Path(tmp) / f"model_{n}", n, args.threads, args))
                last = runs[n][-1]
                print(f"{n} process(es) x {args.threads} thread(s): {last['frames_per_s_best']:.1f} frames/s "
                      f"(best epoch), validation MSE {last['validation_mse']:.6g}", flush=True)
    rows = []
    for n, measured in runs.items():
        rows.append({
            "processes": n, "threads_per_process": args.threads,
            "frames_per_s_best": max(m["frames_per_s_best"] for m in measured),
            "frames_per_s_median": statistics.median(m["frames_per_s_median"] for m in measured),
            "runs": measured,
        })
    single = rows[0]["frames_per_s_best"]
    for row in rows:
        row["speedup_vs_first_best"] = row["frames_per_s_best"] / single
    n_beads = 2 * system.n_dimers + system.n_monomers
    result = torch_result(
        "data-parallel force-matching training: openmm-cgnn train under torchrun, frames/s per number of processes",
        device, args.threads, rows, n_beads=n_beads, frames=args.ddp_frames, global_batch_size=args.batch_size,
        epochs=args.epochs, rounds=args.rounds, network="quick", load_average_at_start=load_at_start,
        frames_per_s="training frames / epoch seconds (training steps + validation pass); epoch 1 left out",
    )
    write_json(args.out or RESULTS / f"training_ddp_{device.type}.json", result)
    return 0

def measure(n_beads: int, config: str, device: torch.device, batch_size: int, steps: int, budget_s: float) -> dict:
    """Training and validation frames/s of one network size (``quick``/``reference``) at ``n_beads``."""
    frames = synthetic_frames(n_beads, frames=2 * batch_size + 2)
    data = split_runs([frames], ["synthetic"], validation_fraction=0.3)
    model = build_model(data, quick=config == "quick", use_temperature=False, seed=0)
    trainer = Trainer(model, data, TrainConfig(batch_size=batch_size, device=str(device)), device)
    row = {"n_beads": int(frames.n_beads), "config": config, "batch_size": batch_size,
           "n_trainable_parameters": int(sum(p.numel() for p in trainer.trainable))}
    row["train_step"] = time_steps(trainer, batch_size, steps, budget_s, create_graph=True)
    row["validation"] = time_steps(trainer, batch_size, steps, budget_s, create_graph=False)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="beads per frame (default 80 320 on CPU, 80 320 1500 5000 on CUDA)")
    parser.add_argument("--configs", nargs="+", default=["quick", "reference"], choices=["quick", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per measurement at most")
    parser.add_argument("--out", type=Path, default=None)
    ddp = parser.add_argument_group("data-parallel scaling (--nproc)")
    ddp.add_argument("--nproc", type=int, nargs="+", default=None, metavar="N",
                     help="measure openmm-cgnn train under torchrun with each number of processes instead")
    ddp.add_argument("--ddp-beads", type=int, default=300, help="beads of the simulated liquid (default 300)")
    ddp.add_argument("--ddp-frames", type=int, default=50, help="frames simulated; 20%% are validation (default 50)")
    ddp.add_argument("--epochs", type=int, default=4, help="epochs per training run (default 4; the first is warm-up)")
    ddp.add_argument("--rounds", type=int, default=2, help="times each number of processes is run (default 2)")
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.nproc:
        return ddp_scaling(args)
    device = torch.device(args.device)
    # Reference-size training is a GPU job: on CPU it runs at a few frames/s even for 80 beads.
    sizes = args.sizes or ([80, 320] if device.type == "cpu" else [80, 320, 1500, 5000])

    rows = []
    for n_beads in sizes:
        for name in args.configs:
            row = measure(n_beads, name, device, args.batch_size, args.steps, args.budget)
            rows.append(row)
            print(f"N={row['n_beads']:6d} {name:9s} train {row['train_step']['frames_per_s']:8.1f} frames/s   "
                  f"validation {row['validation']['frames_per_s']:8.1f} frames/s", flush=True)

    result = torch_result("force-matching training throughput (frames/s; train = forward + forces + backward + Adam)", device, args.threads, rows)
    write_json(args.out or RESULTS / f"training_{device.type}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
