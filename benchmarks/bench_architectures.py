"""Architectures side by side (model/registry.py): validation force error at the same training budget,
and CPU cost per CG step, all in one process.

For each architecture and seed: ``openmm-cgnn train`` on the same AA runs with the same settings
(by default the driver's quick-size training settings, ``--model-option architecture=NAME``
added), then the validation force RMSE of its metrics.json. Then, for one trained model per
architecture, on the same CG configuration (the last frame of the first AA run, mapped): the
scripted system module's forward + backward, and MD steps through TorchForce on OpenMM's CPU
platform (LangevinMiddle at the CG run's time step), the architectures taking turns block by
block. Writes benchmarks/results/architectures_cpu.json.

    python benchmarks/bench_architectures.py --run runs/bmim_bf4_quick --data T400K T500K --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_md import block_steps, cg_context
from bench_model import time_calls
from common import RESULTS, best_of_blocks, machine_info, pin_threads, step_block, write_json


def train_architecture(run: Path, data: list[str], architecture: str, seed: int, out: Path,
                       settings: dict[str, Any], temperature_input: bool) -> dict[str, Any]:
    """Train one model with the driver's settings; the numbers of its metrics.json."""
    from openmm_cgnn.cli import main as cli

    argv = ["train", "--data", *[str(run / "aa" / d) for d in data], "--mapping", str(run / "mapping" / "mapping.json"),
            "--out", str(out), "--seed", str(seed), "--device", "cpu", "--no-progress"]
    options = [f"architecture={architecture}"]
    for flag, value in settings.items():
        if flag == "--model-option":
            options += shlex.split(str(value))
        else:
            argv += [flag] + ([] if value is None else [str(value)])
    argv += ["--model-option", *options] + (["--temperature-input"] if temperature_input else [])
    if cli(argv) != 0:
        raise SystemExit(f"training {architecture} (seed {seed}) failed: {' '.join(argv)}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "architecture": architecture, "seed": seed, "command": "openmm-cgnn " + shlex.join(argv), "model_dir": str(out),
        "validation_force_rmse": metrics["validation"]["overall"]["rmse"],
        "validation_force_rms": metrics["validation"]["overall"]["force_rms"],
        "validation_rmse_prior_only": metrics["baselines"]["prior_only"]["validation"]["overall"]["rmse"],
        "validation_mse_relative_to_prior_only": metrics["validation_mse_relative_to"]["prior_only"],
        "best_epoch": metrics["best_epoch"], "epochs_completed": metrics["epochs_completed"],
        "n_trainable_parameters": metrics["model"]["n_trainable_parameters"],
        "training_seconds": metrics["timing"]["seconds_training_total"],
    }


def step_costs(model_dirs: dict[str, Path], cg: Any, temperature: float, dt_fs: float, args: argparse.Namespace) -> dict[str, Any]:
    """Per architecture: forward+backward of the scripted module and ms per MD step, taking turns."""
    import openmm

    from openmm_cgnn.model import load_model, script_for_system

    modules = {}
    for name, folder in model_dirs.items():
        modules[name] = script_for_system(load_model(folder), cg.bead_type, cg.molecule_index, temperature, box=cg.box)
    calls = time_calls(modules, torch.as_tensor(cg.positions), torch.as_tensor(cg.box), args.repeats, args.budget)
    platform = openmm.Platform.getPlatformByName("CPU")
    properties = {"Threads": str(args.threads)}
    contexts, blocks, rows = {}, {}, {}
    for name, folder in model_dirs.items():
        context, _, info = cg_context(folder, cg, temperature, dt_fs, platform, properties, "auto", args.seed, None, "torch")
        steps = block_steps(context, args.block_seconds, args.warmup_steps)
        contexts[name] = context
        blocks[name] = lambda c=context, n=steps: step_block(c, n)
        rows[name] = {**info, "steps_per_block": steps}
    times = best_of_blocks(blocks, args.blocks)
    for name, context in contexts.items():
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        rows[name].update(times[name], forward_backward=calls[name], finite_after_timing=bool(np.isfinite(energy)))
    return rows


def main() -> int:
    from openmm_cgnn.driver import SETTINGS
    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.model import ARCHITECTURES
    from openmm_cgnn.openmm.topology import CGSystem

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a driver run directory (aa/, mapping/, cg/)")
    parser.add_argument("--data", nargs="+", default=["T400K", "T500K"], help="AA runs under RUN/aa to train on")
    parser.add_argument("--architectures", nargs="+", default=sorted(ARCHITECTURES), choices=sorted(ARCHITECTURES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--size", default="quick", choices=sorted(SETTINGS), help="the driver size whose training settings to use")
    parser.add_argument("--epochs", type=int, default=None, help="override the size's --epochs (the same for all)")
    parser.add_argument("--no-temperature-input", action="store_true")
    parser.add_argument("--temperature", type=float, default=400.0, help="K, for the CG step timing")
    parser.add_argument("--dt-fs", type=float, default=None, help="CG time step (default: RUN/cg/T<temperature>K's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds for the forward+backward timing at most")
    parser.add_argument("--seed", type=int, default=1, help="seed of the MD timing")
    parser.add_argument("--reuse-training", type=Path, default=None, metavar="JSON",
                        help="an earlier result: take its training rows and models, time only")
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures_cpu.json")
    args = parser.parse_args()
    threads = pin_threads(args.threads)

    settings = dict(SETTINGS[args.size]["train"])
    if args.epochs is not None:
        settings["--epochs"] = args.epochs
    training, trained = [], {}
    if args.reuse_training is not None:
        training = json.loads(args.reuse_training.read_text())["training"]
        for row in training:
            command = shlex.split(row["command"])
            trained.setdefault(row["architecture"], Path(row.get("model_dir") or command[command.index("--out") + 1]))
    for architecture in args.architectures if args.reuse_training is None else []:
        work = Path(tempfile.mkdtemp(prefix=f"bench_architectures_{architecture}_"))
        for seed in args.seeds:
            out = work / f"{architecture}_seed{seed}"
            row = train_architecture(args.run, args.data, architecture, seed, out, settings, not args.no_temperature_input)
            print(f"{architecture:12s} seed {seed}: validation force RMSE {row['validation_force_rmse']:.1f} kJ/mol/nm "
                  f"(prior only {row['validation_rmse_prior_only']:.1f}), {row['training_seconds']:.0f} s", flush=True)
            training.append(row)
            trained.setdefault(architecture, out)

    mapping = Mapping.load(args.run / "mapping" / "mapping.json")
    cg = CGSystem.from_run(mapping, args.run / "aa" / args.data[0], frame=-1)
    summary = args.run / "cg" / f"T{args.temperature:g}K" / "summary.json"
    dt_fs = args.dt_fs or float(json.loads(summary.read_text())["dt_fs"])
    steps = step_costs(trained, cg, args.temperature, dt_fs, args)
    for name, row in steps.items():
        print(f"{name:12s} {row['ms_per_step']:.2f} ms/step, forward+backward {row['forward_backward']['min_ms']:.2f} ms",
              flush=True)
    reference = steps[args.architectures[0]]
    result = {
        "benchmark": "architectures: validation force RMSE at one training budget; CPU cost per CG step",
        "run": str(args.run), "data": args.data, "size": args.size, "train_settings": settings,
        "temperature_input": not args.no_temperature_input, "threads": threads,
        "cg_step": {"n_beads": cg.n_beads, "temperature_K": args.temperature, "dt_fs": dt_fs, "carrier": "TorchForce",
                    "platform": "CPU", "start": f"{args.data[0]} last frame, mapped"},
        "training": training,
        "training_from": str(args.reuse_training) if args.reuse_training else "this run",
        "step_costs": steps,
        "ratios_to_" + args.architectures[0]: {name: {"ms_per_step": row["ms_per_step"] / reference["ms_per_step"],
                                                      "forward_backward": row["forward_backward"]["min_ms"]
                                                      / reference["forward_backward"]["min_ms"]}
                                               for name, row in steps.items()},
        "machine": machine_info(),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
