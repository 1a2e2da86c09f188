"""``openmm-cgnn export``: a trained force field as a self-contained directory for plain OpenMM."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError
from ..layout import CHECKPOINT_PT, MAPPING_JSON, README_MD
from .simulate import add_system_arguments, cg_system_from_args, user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="MODELDIR", help="trained model directory")
    add_system_arguments(parser)
    parser.add_argument("--temperature", type=float, default=None, metavar="K",
                        help="temperature baked into models that take 1/T (default: the temperature of --from-aa)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    parser.add_argument("--platform", default="Reference",
                        help="OpenMM platform of the round-trip check and of any minimisation (default Reference; "
                             "CUDA where openmm-torch has no Reference kernels)")
    parser.add_argument("--out", type=Path, required=True, metavar="EXPORTDIR", help="export directory")


def run(args: argparse.Namespace) -> int:
    from ..frames import read_frames
    from ..io import check_output_dir
    from ..mapping.spec import CGMapping
    from ..model.checkpoint import check_model_mapping
    from ..openmm.export import export_forcefield

    if not (args.model.is_dir() and (args.model / CHECKPOINT_PT).exists()):
        raise CLIError(f"{args.model}: not a model directory (no checkpoint.pt)")
    check_output_dir(args.out, "export", overwrite=args.overwrite)  # before any compute
    try:
        mapping = CGMapping.load(args.model / MAPPING_JSON)
        check_model_mapping(args.model, mapping.sha256(), args.model / MAPPING_JSON)
        cg = cg_system_from_args(args, mapping, args.model)
        temperature = args.temperature
        if temperature is None and args.from_aa is not None:
            temperature = read_frames(args.from_aa, start=-1).temperature_K
        out = export_forcefield(args.model, cg, args.out, temperature=temperature, prior=args.prior, overwrite=args.overwrite,
                                minimize=args.from_aa is None, platform=args.platform,
                                constrain_bonds=args.constrain_bonds)
    except user_errors() as exc:
        raise CLIError(str(exc)) from None
    print(f"exported the force field for {cg.n_beads} beads to {out} (see {out / README_MD})")
    return 0
