"""Model evaluation speed: time per energy+forces call of the exported (TorchScript) model.

For each size: the scripted system module as openmm-torch calls it (forward, then backward to
the positions), with the prior inside the model and without it (the prior-carrier question: the
difference is what moving the prior to native OpenMM forces could save), for the quick and the
reference network sizes. Synthetic CG liquids at about 16 beads/nm^3.
Writes benchmarks/results/model_<device>.json.

    python benchmarks/bench_model.py [--sizes 128 512 1024] [--configs quick reference] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import RESULTS, pin_threads, synchronize, torch_result, write_json
from openmm_cgnn.model import CGModel, HybridGraphConfig, fit_priors, script_for_system, suggest_max_pairs_per_bead
from openmm_cgnn.testing.cg_models import ionic_liquid


def time_calls(modules: dict, positions: torch.Tensor, box: torch.Tensor, repeats: int, budget_s: float) -> dict:
    """Per module: median and min wall time of forward + backward. The modules take turns call by
    call, so load from other jobs on the machine hits them alike."""
    def call(module):
        position = positions.detach().requires_grad_(True)
        module(position, box).backward()
        return position.grad

    for module in modules.values():
        for _ in range(3):  # TorchScript profiling runs and allocator warm-up
            call(module)
    times: dict = {name: [] for name in modules}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, module in modules.items():
            synchronize(positions.device)
            t0 = time.perf_counter()
            call(module)
            synchronize(positions.device)
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "calls": len(t)}
            for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--configs", nargs="+", default=["quick", "reference"], choices=["quick", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["auto", "dense", "cell"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per measurement at most")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pin_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for beads in args.sizes:
        cg = ionic_liquid(n_pairs=max(beads // 4, 1), box_nm=None, frames=2, jitter_nm=0.05)
        prior = fit_priors(cg, max_frames=2)
        positions = torch.as_tensor(cg.positions[0], device=device)
        box = torch.as_tensor(cg.box[0], device=device)
        capacity = suggest_max_pairs_per_bead(torch.as_tensor(cg.positions), torch.as_tensor(cg.box),
                                              torch.as_tensor(cg.molecule_index), 0.8)
        for name in args.configs:
            make = HybridGraphConfig.quick if name == "quick" else HybridGraphConfig.reference
            config = make(len(cg.bead_type_names), bead_type_names=cg.bead_type_names, max_pairs_per_bead=capacity,
                          neighbor_backend=args.backend)
            model = CGModel(config, prior)
            row = {"n_beads": positions.shape[0], "config": name, "max_pairs_per_bead": capacity}
            modules = {}
            for label, include_prior in (("with_prior", True), ("network_only", False)):
                modules[label] = script_for_system(model, cg.bead_type, cg.molecule_index, include_prior=include_prior,
                                                   box=cg.box[0]).to(device)
            row["backend"] = modules["with_prior"].neighbor_backend
            row.update(time_calls(modules, positions, box, args.repeats, args.budget))
            row["prior_overhead_ms"] = row["with_prior"]["min_ms"] - row["network_only"]["min_ms"]
            rows.append(row)
            print(f"N={row['n_beads']:6d} {name:9s} {row['backend']:5s} with_prior={row['with_prior']['min_ms']:.2f}ms "
                  f"network_only={row['network_only']['min_ms']:.2f}ms (min over calls)", flush=True)

    result = torch_result("scripted CG model, forward + backward per call (ms)", device, args.threads, rows)
    write_json(args.out or RESULTS / f"model_{device.type}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
