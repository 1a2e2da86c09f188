"""``openmm-cgnn aa``: all-atom ground truth (CL&P ionic liquid) with forces saved per frame.

Example (quick, CPU)::

    openmm-cgnn aa --liquid emim_bf4 --pairs 16 --temperature 450 500 --equilibrate-ps 20 \
        --production-ps 20 --save-every-ps 0.5 --out runs/aa --platform CPU

``--liquid`` names a shipped liquid (``bmim_bf4``, ``emim_bf4``, ``bmim_pf6``) or a liquid file
(docs/contracts.md section 6); without it the box is one molecule of each residue of the force
field data per unit ([BMIM][BF4] for the package's data). The size is ``--pairs N`` (1:1 liquids),
``--units N`` (formula units, any stoichiometry) or ``--molecules RES=N ...``.

The NVT box is the NPT second-half mean density by default. ``--density-fit`` takes it from a
straight rho(T) line over the NPT runs of all temperatures instead (less noise between
temperatures, so less noise in D(T)); with one job per temperature, run each with ``--npt-only``
first, then each with ``--resume --density-fit DIR ...`` naming all of them.
``--max-equilibrate-ps`` lets NPT run on, in steps of half ``--equilibrate-ps``, while the
density still drifts.

CPU threads follow ``OPENMM_CPU_THREADS``. The cutoff defaults to 1.0 nm, less for small boxes
(half the start box edge after the largest compression NPT is allowed: see ``aa/run.py``).
"""

from __future__ import annotations

import argparse

from . import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    count = parser.add_mutually_exclusive_group(required=True)
    count.add_argument("--pairs", type=int, help="ion pairs, for 1:1 liquids (the same as --units)")
    count.add_argument("--units", type=int, help="formula units (the liquid's stoichiometry, e.g. 1 cation + 2 anions)")
    count.add_argument("--molecules", nargs="+", metavar="RES=N", help="molecules of each residue, e.g. EMIM=16 BF4=16")
    parser.add_argument("--liquid", default=None, metavar="NAME_OR_FILE",
                        help="liquid: a shipped name (bmim_bf4, emim_bf4, bmim_pf6) or a liquid file (default: one "
                             "molecule of each residue of --forcefield-dir per unit)")
    parser.add_argument("--temperature", type=float, nargs="+", required=True, metavar="T",
                        help="temperature(s) in K; several give DIR/T<T>K/ sub-directories")
    parser.add_argument("--equilibrate-ps", type=float, required=True, help="NPT length (ps); density from its 2nd half")
    parser.add_argument("--max-equilibrate-ps", type=float, default=None, metavar="PS",
                        help="extend NPT while its density drifts, up to this length (default: no extension)")
    npt = parser.add_mutually_exclusive_group()
    npt.add_argument("--npt-only", action="store_true",
                     help="stop after NPT (npt.json); continue later with --resume (and --density-fit)")
    npt.add_argument("--density-fit", nargs="*", default=None, metavar="DIR",
                     help="NVT box from a linear rho(T) fit over the NPT runs of this call's temperatures and "
                          "of these aa directories (default: each run's own NPT mean)")
    parser.add_argument("--production-ps", type=float, required=True, help="NVT production length (ps)")
    parser.add_argument("--save-every-ps", type=float, required=True, help="frame interval (ps)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--charge-scale", type=float, default=1.0, help="scale all charges (default 1.0; 0.8 common)")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default: the fastest available)")
    parser.add_argument("--device-index", type=int, default=None, metavar="N",
                        help="GPU to run on (OpenMM's DeviceIndex; GPU platforms only; default: OpenMM's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (placement, velocities, thermostat)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--cutoff-nm", type=float, default=None, help="nonbonded cutoff (default 1.0, less for small boxes)")
    parser.add_argument("--dt-fs", type=float, default=2.0, help="time step in fs (X-H bonds constrained)")
    parser.add_argument("--start-density", type=float, default=None,
                        help="density (kg/m3) of the inserted start box before NPT (default: the densest of "
                             "1000, 950, ... that random insertion fills)")
    parser.add_argument("--residues", nargs="+", default=None,
                        help="without --liquid: residues, one molecule of each per unit (default: all in the force-field data)")
    parser.add_argument("--forcefield-dir", default=None,
                        help="converted force-field data (default: the liquid's, else the package's; "
                             "see python -m openmm_cgnn.aa.convert)")


def run(args: argparse.Namespace) -> int:
    from openmm_cgnn.aa.run import AAInputError, run_aa
    from openmm_cgnn.aa.stages import AARunError
    from openmm_cgnn.liquids import LiquidError, parse_counts

    option, count = next((f"--{name}", value) for name, value in
                         (("pairs", args.pairs), ("units", args.units), ("molecules", args.molecules)) if value is not None)
    try:
        if option == "--molecules":
            count = parse_counts(count)
        summary = run_aa(
            args.out, count, args.temperature, args.equilibrate_ps, args.production_ps, args.save_every_ps,
            charge_scale=args.charge_scale, platform=args.platform, seed=args.seed, cutoff_nm=args.cutoff_nm,
            dt_fs=args.dt_fs, resume=args.resume, overwrite=args.overwrite,
            start_density_kg_m3=args.start_density, forcefield_dir=args.forcefield_dir,
            residues=args.residues, liquid=args.liquid, count_option=option, device_index=args.device_index,
            max_equilibrate_ps=args.max_equilibrate_ps, npt_only=args.npt_only, density_fit=args.density_fit)
    except (AAInputError, AARunError, LiquidError) as exc:
        raise CLIError(str(exc)) from None
    density = summary["density_kg_m3"]
    densities = density if isinstance(density, list) else [density]
    what = "NPT of " if args.npt_only else ""
    print(f"aa: wrote {what}{args.out} (density {', '.join(f'{d:.1f}' for d in densities)} kg/m3)")
    return 0
