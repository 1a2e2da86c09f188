"""``openmm-cgnn run``: the whole chain for one liquid, stage after stage (or the commands, printed).

    openmm-cgnn run --liquid emim_bf4 --quick              # 2-core CPU, about 10 minutes, tiny sizes
    openmm-cgnn run --liquid bmim_bf4 --size cpu --jobs 2  # CPU-sized verdict, 550-700 K
    openmm-cgnn run --liquid bmim_pf6 --gpus 0,1           # full size, temperatures spread over two GPUs
    openmm-cgnn run --liquid my_liquid.json --print-commands > chain.sh

The liquid (molecules, ratio, beads per molecule, temperatures and box size per size) is a
liquid file: a shipped name or a path (docs/contracts.md section 6). See ``openmm_cgnn/driver.py``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from . import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..driver import SETTINGS

    parser.add_argument("--liquid", default="bmim_bf4", metavar="NAME_OR_FILE",
                        help="a shipped liquid (bmim_bf4, emim_bf4, bmim_pf6) or a liquid file (default bmim_bf4)")
    parser.add_argument("--quick", action="store_true", help="small CPU run (about 10 minutes on 2 cores); --size quick")
    parser.add_argument("--size", choices=list(SETTINGS), default=None,
                        help="tiny: seconds per stage (tests); quick: smoke run; cpu: the CPU-sized verdict; "
                             "full: GPU scale (default)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="per-temperature stages (AA and CG runs) at a time (default 1, or one per --gpus entry)")
    parser.add_argument("--gpus", default=None, metavar="0,1,...",
                        help="GPU indices for the per-temperature stages, round-robin, several jobs may share one "
                             "(default: the devices of CUDA_VISIBLE_DEVICES when the platform is a GPU one)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default runs/<liquid>_<size>, "
                                                               "runs/<liquid> for full)")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CPU for tiny, quick and cpu, "
                                                         "CUDA for full or with --gpus)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print the stage commands in dependency order (for a scheduler's job arrays); run nothing")
    parser.add_argument("--restart", action="store_true", help="delete the results directory first")


def run(args: argparse.Namespace) -> int:
    from ..driver import DriverError, default_out, plan, print_commands, print_results, resolve_devices, run_plan
    from ..liquids import LiquidError, load_liquid

    if args.quick and args.size not in (None, "quick"):
        raise CLIError("--quick is --size quick; give one of them")
    if args.jobs is not None and args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
    size = "quick" if args.quick else args.size or "full"
    try:
        liquid = load_liquid(args.liquid)
        platform, gpus = resolve_devices(size, args.platform, args.gpus)
        out = args.out or default_out(liquid, size)
        stages = plan(liquid, size, out, platform, gpus)
    except (LiquidError, DriverError) as exc:
        raise CLIError(str(exc)) from None
    if args.print_commands:
        print_commands(stages, f"openmm-cgnn run --liquid {args.liquid} --size {size}: {liquid.title}, "
                               f"{liquid.sizes[size].units} formula units, out {out}")
        return 0
    if args.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_plan(stages, args.jobs or max(1, len(gpus)), out / "logs")
    print_results(out, time.perf_counter() - started)
    return 0
