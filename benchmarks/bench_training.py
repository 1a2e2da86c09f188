"""Force-matching training throughput: training frames per second (forward, force, backward, Adam step).

For each system size and network size, one Trainer (the code ``openmm-cgnn train`` runs) does
timed optimiser steps on a synthetic CG liquid of about 16 beads/nm^3 (a 5-bead-per-ion-pair map
of [BMIM][BF4]); the targets are random, which does not change the cost. Also times the
validation pass (forces without the second-order graph). Writes
benchmarks/results/training_<device>.json.

    python benchmarks/bench_training.py [--sizes 80 320] [--configs quick reference] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, pin_threads, synchronize, torch_result, write_json
from openmm_cgnn.mapping.spec import CGFrames
from openmm_cgnn.model.synthetic import ionic_liquid
from openmm_cgnn.training.data import split_runs
from openmm_cgnn.training.pipeline import build_model
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
    args = parser.parse_args()
    pin_threads(args.threads)
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
