"""``openmm-cgnn`` command line: one sub-command per pipeline stage.

Each stage lives in ``openmm_cgnn/cli/<stage>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> int``. Stages are imported only when chosen so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "aa": ("aa", "all-atom ground truth: build, equilibrate (NPT) and run NVT production, saving forces"),
    "import": ("import_", "bring your own all-atom data: a GROMACS or LAMMPS trajectory with forces into frames.h5"),
    "map": ("map", "learn the CG mapping (auto-encoder) from all-atom frames"),
    "train": ("train", "train the Hybridgraph CG force field by force matching"),
    "refine": ("refine", "refine a trained model's bonded tables so that its CG bond and angle distributions match all-atom"),
    "export": ("export", "export a trained model as a self-contained OpenMM force-field directory"),
    "simulate": ("simulate", "run CG molecular dynamics in OpenMM with CGNNForce"),
    "evaluate": ("evaluate", "compare CG and AA structure and dynamics: RDFs, diffusion, Arrhenius"),
    "info": ("info", "versions, OpenMM platforms and plugin load failures (is CUDA there?)"),
    "run": ("run", "the whole chain for one liquid (aa, map, train, export, simulate, evaluate), or its commands"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def torch_device(text: str) -> str:
    """``--device`` values: ``cpu``, ``cuda`` or ``cuda:N`` (one GPU of several)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmm-cgnn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the versions and platforms (as `info`) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"{__name__}.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from ..platforms import info_report

        print(info_report())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"{__name__}.{SUBCOMMANDS[args.command][0]}")
    from ..io import CorruptFileError, OutputDirError, describe_os_error

    try:
        return int(module.run(args) or 0)
    except (CLIError, OutputDirError, CorruptFileError) as exc:
        print(f"openmm-cgnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only folder, found while writing: name the path
        print(f"openmm-cgnn {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
