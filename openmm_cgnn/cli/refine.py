"""``openmm-cgnn refine``: correct a trained model's tabulated bond and angle tables by iterative
Boltzmann inversion against the all-atom runs, with the network on (openmm_cgnn/training/refine.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError
from .simulate import time_stepping_of_run, user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.refine import RefineSettings

    defaults = RefineSettings()
    parser.add_argument("--model", type=Path, required=True, metavar="MODELDIR",
                        help="trained model directory with tabulated bonded priors (never modified)")
    parser.add_argument("--aa", type=Path, nargs="+", required=True, metavar="RUN",
                        help="all-atom runs at the training temperatures (the targets; a CG run per run and round "
                             "starts from its last frame at its temperature)")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, metavar="K",
                        help=f"table updates, each measured by a round of CG runs (default {defaults.iterations})")
    parser.add_argument("--steps", type=int, default=defaults.steps, metavar="N",
                        help=f"production steps of each CG run (default {defaults.steps})")
    parser.add_argument("--alpha", type=float, default=defaults.alpha,
                        help=f"damping of each update, U += alpha kT ln(P_CG/P_AA) (default {defaults.alpha:g})")
    parser.add_argument("--min-counts", type=int, default=defaults.min_counts, metavar="N",
                        help=f"samples a table bin needs in either histogram to be corrected (default {defaults.min_counts})")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--dt-fs", type=float, default=None,
                      help="time step in fs (default: the NVE stability check of the first CG run)")
    step.add_argument("--dt-from", type=Path, default=None, metavar="CGRUN", help="use the time step of this finished CG run")
    parser.add_argument("--dt-candidates-fs", type=float, nargs="+", default=None, metavar="FS",
                        help="time steps the stability check tries, largest first (default: simulate's)")
    parser.add_argument("--save-every-steps", type=int, default=defaults.save_every_steps, metavar="K",
                        help=f"sample interval of the CG runs (default {defaults.save_every_steps})")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CUDA if available, else CPU)")
    parser.add_argument("--device-index", type=int, default=None, metavar="N",
                        help="GPU to run on (OpenMM's DeviceIndex; GPU platforms only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the CG runs (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a refined model directory already in --out")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the refined model directory (new)")


def run(args: argparse.Namespace) -> int:
    from ..training.refine import RefineError, RefineSettings, check_refine_output, refine_model

    dt_fs = args.dt_fs
    if args.dt_from is not None:
        dt_fs, inner = time_stepping_of_run(args.dt_from)
        if inner > 1:  # its step is an MTS outer step; refinement single-steps
            raise CLIError(f"--dt-from {args.dt_from}: a multiple-time-stepping run ({inner} inner steps); "
                           "refine steps singly: give --dt-fs")
    settings = RefineSettings(iterations=args.iterations, steps=args.steps, alpha=args.alpha, dt_fs=dt_fs,
                              dt_candidates_fs=tuple(args.dt_candidates_fs) if args.dt_candidates_fs else None,
                              save_every_steps=args.save_every_steps, min_counts=args.min_counts,
                              platform=args.platform, device_index=args.device_index, seed=args.seed)
    try:
        settings.validate()
        check_refine_output(args.model, args.out, args.overwrite)  # before any compute
        refine_model(args.model, args.aa, args.out, settings, overwrite=args.overwrite)  # prints its verdict
    except (RefineError, *user_errors()) as exc:
        raise CLIError(str(exc)) from None
    return 0
