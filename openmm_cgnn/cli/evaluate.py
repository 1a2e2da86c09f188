"""``openmm-cgnn evaluate``: compare CG runs with AA runs (RDFs, diffusion, Arrhenius, density)."""

from __future__ import annotations

import argparse
import sys

from . import CLIError


def _viscosity(values: list[str] | None, option: str) -> float | dict[float, float] | None:
    """One value for every temperature, or T=value pairs."""
    if not values:
        return None
    try:
        if len(values) == 1 and "=" not in values[0]:
            eta = float(values[0])
            if eta <= 0:
                raise ValueError
            return eta
        table = {}
        for item in values:
            t, eta = item.split("=")
            table[float(t)] = float(eta)
            if table[float(t)] <= 0:
                raise ValueError
        return table
    except ValueError:
        raise CLIError(f"{option}: expected a positive viscosity in Pa s, or T=VALUE pairs; got {' '.join(values)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aa", nargs="+", required=True, metavar="DIR", help="all-atom run directories (frames.h5)")
    parser.add_argument("--cg", nargs="*", default=[], metavar="DIR", help="CG run directories (frames.h5)")
    parser.add_argument("--cg-prior-only", nargs="+", default=[], metavar="DIR",
                        help="prior-only CG runs (simulate --network off): the ablation, reported beside the trained model")
    parser.add_argument("--held-out-temperature", nargs="+", type=float, default=[], metavar="K",
                        help="temperatures whose AA run was left out of training: marked in the report, and E_a "
                             "is fitted with and without them")
    parser.add_argument("--mapping", required=True, help="mapping.json (or the directory holding it)")
    parser.add_argument("--out", required=True, metavar="REPORTDIR", help="where metrics.json, plots and report.md go")
    parser.add_argument("--viscosity-pa-s", nargs="+", metavar="ETA",
                        help="viscosity of the AA fluid for the Yeh-Hummer correction: one value or T=VALUE pairs")
    parser.add_argument("--cg-viscosity-pa-s", nargs="+", metavar="ETA",
                        help="the same for the CG fluid (its viscosity differs from AA's)")
    parser.add_argument("--start-ps", type=float, default=0.0, help="skip this much time at the start of every run")
    parser.add_argument("--stride", type=int, default=1, help="read every n-th frame")
    parser.add_argument("--rdf-bin-nm", type=float, default=0.01, metavar="NM",
                        help="RDF bin width in nm (default 0.01)")
    parser.add_argument("--rdf-r-max-nm", type=float, default=None, help="default: half the shortest box edge")
    parser.add_argument("--rdf-max-frames", type=int, default=250, help="frames per run used for RDFs (evenly spaced)")
    parser.add_argument("--slope-tolerance", type=float, default=0.15,
                        help="diffusive regime: log-log MSD slope within 1 +/- this")
    parser.add_argument("--target-ea", type=float, default=0.15, metavar="FRACTION",
                        help="verdict: CG activation energy within this fraction of AA's (default 0.15)")
    parser.add_argument("--target-rdf-error", type=float, default=0.05, metavar="FRACTION",
                        help="verdict: worst RDF error under this (default 0.05)")
    parser.add_argument("--target-bonded-tv", type=float, default=0.05, metavar="FRACTION",
                        help="verdict: total-variation difference of each bond and angle distribution under this "
                             "(default 0.05)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines and no closing summary line")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a report directory that evaluate wrote before (never any other directory)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.evaluate import EvaluationError, EvaluationSettings, evaluate
    from ..frames import FramesError
    from ..mapping.spec import MappingError

    if args.stride < 1:
        raise CLIError(f"--stride must be >= 1, got {args.stride}")
    if args.start_ps < 0:
        raise CLIError(f"--start-ps must be >= 0, got {args.start_ps}")
    if args.rdf_max_frames < 1 or args.rdf_bin_nm <= 0:
        raise CLIError("--rdf-max-frames and --rdf-bin-nm must be positive")
    for flag, value in (("--target-ea", args.target_ea), ("--target-rdf-error", args.target_rdf_error),
                        ("--target-bonded-tv", args.target_bonded_tv)):
        if not value > 0:
            raise CLIError(f"{flag} must be a positive fraction, got {value}")
    settings = EvaluationSettings(
        start_ps=args.start_ps, stride=args.stride, rdf_bin_nm=args.rdf_bin_nm, rdf_r_max_nm=args.rdf_r_max_nm,
        rdf_max_frames=args.rdf_max_frames, slope_tolerance=args.slope_tolerance,
        viscosity_pa_s=_viscosity(args.viscosity_pa_s, "--viscosity-pa-s"),
        cg_viscosity_pa_s=_viscosity(args.cg_viscosity_pa_s, "--cg-viscosity-pa-s"),
        target_ea_relative=args.target_ea, target_rdf_error=args.target_rdf_error,
        target_bonded_tv=args.target_bonded_tv, held_out_temperatures_K=tuple(args.held_out_temperature),
    )
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        metrics = evaluate(args.aa, args.cg, args.mapping, args.out, settings=settings, log=log, overwrite=args.overwrite,
                           cg_prior_dirs=args.cg_prior_only)
    except (EvaluationError, FramesError, MappingError) as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet:
        print(f"{args.out}/report.md: {len(metrics['plots'])} plots")
    return 0
