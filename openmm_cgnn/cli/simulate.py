"""``openmm-cgnn simulate``: CG molecular dynamics in OpenMM with a trained force field (CGNNForce)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import CLIError
from ..layout import CHECKPOINT_CHK, CHECKPOINT_JSON, CHECKPOINT_PT, MAPPING_JSON, MODEL_PT, PRIOR_JSON, SUMMARY_JSON

# Errors that mean "the inputs are wrong" and print as one line.
def user_errors() -> tuple[type[BaseException], ...]:
    from ..frames import FramesError
    from ..mapping.spec import MappingError
    from ..openmm.export import ExportError
    from ..openmm.force import ModelMismatchError
    from ..openmm.prior_forces import PriorError
    from ..openmm.simulation import SimulationError

    return (FramesError, MappingError, ModelMismatchError, PriorError, SimulationError, ExportError, ValueError)


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the CG starting structure comes from (shared with ``export``)."""
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--pairs", type=int, metavar="N",
                       help="pack N ion pairs of a 1:1 liquid (one molecule of each residue type in the mapping)")
    start.add_argument("--molecules", nargs="+", metavar="RES=N",
                       help="pack these molecule counts (any stoichiometry), e.g. BMIM=100 BF4=100")
    start.add_argument("--from-aa", type=Path, metavar="DIR", help="start from a frame of this run (AA runs are mapped; CG runs also work)")
    parser.add_argument("--frame", type=int, default=-1, help="frame of --from-aa to start from (default -1, the last)")
    parser.add_argument("--density", type=float, metavar="KG_M3",
                        help="target density for --pairs/--molecules, kg/m3 (e.g. the all-atom density)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: packing, velocities, Langevin noise (default 0)")
    parser.add_argument(
        "--prior", choices=["auto", "openmm", "model", "none"], default="auto",
        help="where the prior runs: native OpenMM forces, inside the TorchScript model, or not at all (default auto: the faster one measured)",
    )
    parser.add_argument(
        "--constrain-bonds", choices=["none", "stiff", "all"], default=None,
        help="hold CG bonds at the prior's r0 with OpenMM distance constraints (their prior terms go): "
             "stiff = bonds vibrating with a period under 100 fs, all = every bond (default none; an export "
             "directory or model.pt keeps what it was made with)",
    )
    parser.add_argument(
        "--carrier", choices=["auto", "torch", "python"], default="auto",
        help="what runs the network in OpenMM: torch = openmm-torch TorchForce (TorchScript; the exportable one), "
             "python = OpenMM PythonForce with torch.compile (compiled once, cached in TORCHINDUCTOR_CACHE_DIR); "
             "default auto: the one measured faster on the platform (on CPU: python for runs of at least "
             "50000 steps, where the compilation pays for itself; torch for shorter ones)",
    )


def resolve_forcefield(path: Path) -> tuple[Path, Path]:
    """(model source for CGNNForce, mapping.json): a model directory, an export directory or a model.pt."""
    if path.is_dir() and (path / CHECKPOINT_PT).exists():
        return path, path / MAPPING_JSON
    if path.is_dir() and (path / MODEL_PT).exists():
        return path / MODEL_PT, path / MAPPING_JSON
    if path.is_file() and path.suffix == ".pt":
        return path, path.with_name(MAPPING_JSON)
    raise CLIError(f"{path}: not a model directory (checkpoint.pt), an export directory (model.pt) or a model.pt file")


def cg_system_from_args(args: argparse.Namespace, mapping: Any, source: Path) -> Any:
    from ..openmm.topology import build_cg_system

    from ..liquids import LiquidError, parse_counts

    bond_lengths, molecules = None, None
    if args.pairs is not None or args.molecules is not None:
        option = "--pairs" if args.pairs is not None else "--molecules"
        if args.density is None:
            raise CLIError(f"{option} needs --density KG_M3 (the target density; e.g. the all-atom run's)")
        try:
            molecules = parse_counts(args.molecules) if args.molecules is not None else None
        except LiquidError as exc:
            raise CLIError(str(exc)) from None
        bond_lengths = _prior_bond_lengths(source, mapping)
    return build_cg_system(mapping, from_run=args.from_aa, frame=args.frame, pairs=args.pairs, density_kg_m3=args.density,
                           seed=args.seed, bond_lengths=bond_lengths, molecules=molecules)


def _start_description(args: argparse.Namespace) -> str:
    if args.from_aa:
        return str(args.from_aa)
    return f"packed {args.pairs} pairs" if args.pairs is not None else f"packed {' '.join(args.molecules)}"


def _prior_bond_lengths(source: Path, mapping: Any) -> dict | None:
    from ..openmm.prior_forces import bond_lengths, load_prior

    folder = source if source.is_dir() else source.parent
    path = folder / PRIOR_JSON
    return bond_lengths(load_prior(path, mapping.bead_type_names)) if path.exists() else None


def time_stepping_of_run(run_dir: Path) -> tuple[float, int]:
    """(time step in fs, MTS inner steps) a finished CG run used (``--dt-from``): a prior-only twin
    of an MTS run steps its prior as that run did, K times per outer step (single-stepped at the
    outer step, the stiff bonded prior alone is not what the trained run integrated)."""
    import json

    path = run_dir / SUMMARY_JSON
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CLIError(f"--dt-from {run_dir}: cannot read {path} ({exc})") from None
    if summary.get("kind") != "cg" or str(summary.get("status", "ok")).startswith("failed") or not summary.get("dt_fs"):
        raise CLIError(f"--dt-from {run_dir}: {path} is not a finished CG run with a time step")
    return float(summary["dt_fs"]), int(summary.get("mts_inner_steps") or 1)


def inner_steps(value: str) -> int | None:
    """``--mts-inner-steps``: a whole number >= 1, or auto (None)."""
    if value == "auto":
        return None
    try:
        inner = int(value)
    except ValueError:
        inner = 0
    if inner < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number >= 1, or auto")
    return inner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forcefield", type=Path, required=True, metavar="MODELDIR",
                        help="trained model directory (or an export directory / model.pt)")
    add_system_arguments(parser)
    parser.add_argument("--temperature", type=float, required=True, metavar="K", help="temperature in K")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="total number of MD steps (a resumed run continues to this)")
    length.add_argument("--length-ps", type=float, metavar="PS",
                        help="total simulated time in ps instead: steps = length / the time step, whichever step is chosen")
    parser.add_argument("--dt-fs", type=float, default=None, help="time step in fs (default: the largest stable step, found by an NVE test)")
    parser.add_argument("--dt-from", type=Path, default=None, metavar="CGRUN",
                        help="use the time step of this finished CG run (its summary.json); the prior-only "
                             "ablation takes the trained run's step")
    parser.add_argument("--network", choices=["on", "off"], default="on",
                        help="off: the ablation, the model's prior alone as native OpenMM forces, no network (default on)")
    parser.add_argument("--dt-candidates-fs", type=float, nargs="+", default=None, metavar="FS",
                        help="time steps the stability check tries, largest first (default 20 15 10 8 6 5 4 3 2 1)")
    parser.add_argument("--friction", type=float, default=1.0, metavar="PER_PS", help="Langevin friction in 1/ps (default 1)")
    parser.add_argument("--mts-inner-steps", type=inner_steps, default=None, metavar="K",
                        help="multiple time stepping: the network once per --dt-fs step, the native prior K times "
                             "inside it (MTSLangevinIntegrator; needs --prior openmm); 1: single stepping. Default "
                             "auto: 1, the K of the --dt-from run, or with --resume the run's own")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CUDA if available, else CPU)")
    parser.add_argument("--device-index", type=int, default=None, metavar="N",
                        help="GPU to run on (OpenMM's DeviceIndex; GPU platforms only; default: OpenMM's choice)")
    parser.add_argument("--save-every-steps", type=int, default=1000, metavar="K", help="frame, DCD and checkpoint interval (default 1000)")
    parser.add_argument("--report-every-steps", type=int, default=None, metavar="K", help="state.csv/progress interval (default: save interval)")
    parser.add_argument("--no-minimize", action="store_true", help="skip the energy minimisation of the starting structure")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from checkpoint.chk in --out (starts afresh if --out is empty)")
    mode.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="CG run directory")


def resuming(args: argparse.Namespace) -> bool:
    """``--resume`` of a run that has a checkpoint to resume from."""
    return bool(args.resume) and (args.out / CHECKPOINT_CHK).exists()


def resolve_engine_and_prior(args: argparse.Namespace, config: Any, model_dir: bool = True) -> tuple[str, str, str]:
    """(engine, prior, platform) of the run: ``--carrier`` "auto" takes the platform's engine for a run
    of this length (``engines.default_engine``), so that ``--prior`` "auto" can follow the engine
    (``CGNNForce.default_prior_carrier``); multiple time stepping and the prior-only ablation keep the
    prior as native forces, and a resumed run keeps the prior carrier and platform it started with
    (its checkpoint.json: OpenMM loads a checkpoint only on the platform that wrote it). Without
    ``--platform``, a run with every force in the compiled graph integrates on
    ``engines.default_integration_platform`` (``model_dir``: a model directory, whose "auto" prior
    follows the engine; a model.pt keeps the prior it was scripted with)."""
    from ..openmm.engines import default_engine, default_integration_platform
    from ..openmm.force import auto_prior_carrier
    from ..openmm.simulation import choose_platform

    platform = choose_platform(config.platform).getName()
    engine = args.carrier
    if engine == "auto":
        engine = default_engine(platform, config.steps_estimate())
    prior = args.prior
    if resuming(args):  # the System and platform the checkpoint was written with (OpenMM checks the platform)
        import json

        settings = args.out / CHECKPOINT_JSON  # beside the checkpoint, whatever became of summary.json
        previous = json.loads(settings.read_text()) if settings.exists() else {}
        if prior == "auto":
            prior = str(previous.get("prior_carrier") or "openmm")
        if args.platform is None and previous.get("platform"):
            return engine, prior, str(previous["platform"])
    if prior == "auto" and ((config.mts_inner_steps or 1) > 1 or args.network != "on"):
        prior = "openmm"
    auto = auto_prior_carrier(engine) if model_dir else "openmm"
    inside = (auto if prior == "auto" else prior) != "openmm"
    if args.platform is None:
        platform = default_integration_platform(platform, engine, inside and args.network == "on")
    return engine, prior, platform


def run(args: argparse.Namespace) -> int:
    import sys

    from ..mapping.spec import Mapping
    from ..openmm.force import CGNNForce
    from ..openmm.simulation import CGRun, RunConfig, SimulationError, SimulationUnstable

    from ..io import check_writable
    from ..model.checkpoint import check_model_mapping

    source, mapping_path = resolve_forcefield(args.forcefield)
    if args.dt_from is not None:
        if args.dt_fs is not None:
            raise CLIError("give --dt-fs or --dt-from, not both")
        args.dt_fs, inner = time_stepping_of_run(args.dt_from)
        if args.mts_inner_steps is None and not resuming(args):
            args.mts_inner_steps = inner  # a resumed run keeps its own (auto)
    check_writable(args.out)  # before any compute; CGRun checks what --out holds
    config = RunConfig(
        temperature_K=args.temperature, steps=args.steps or 0, length_ps=args.length_ps, dt_fs=args.dt_fs, friction_per_ps=args.friction,
        platform=args.platform, device_index=args.device_index, save_every_steps=args.save_every_steps, report_every_steps=args.report_every_steps,
        seed=args.seed, minimize=not args.no_minimize, progress=not args.quiet,
        mts_inner_steps=args.mts_inner_steps,
    )
    if args.dt_candidates_fs:
        if min(args.dt_candidates_fs) <= 0:
            raise CLIError("--dt-candidates-fs: time steps must be positive")
        config.dt_candidates_fs = tuple(args.dt_candidates_fs)
    try:
        config.validate()  # before any compute (CGRun checks it again)
    except SimulationError as exc:
        raise CLIError(str(exc)) from None
    try:
        mapping = Mapping.load(mapping_path)
        check_model_mapping(source, mapping.sha256(), mapping_path)
        cg = cg_system_from_args(args, mapping, source)
        engine, prior, config.platform = resolve_engine_and_prior(args, config, source.is_dir())
        force = CGNNForce(source, cg, args.temperature, prior=prior, network=args.network == "on",
                          engine=engine, constrain_bonds=args.constrain_bonds)
        result = CGRun(force, cg, args.out, config, resume=args.resume, overwrite=args.overwrite,
                       metadata={"start": _start_description(args),
                                 **({"dt_from": str(args.dt_from)} if args.dt_from is not None else {})}).run()
    except SimulationUnstable as exc:
        print(f"openmm-cgnn simulate: {exc}", file=sys.stderr)
        return 3
    except user_errors() as exc:
        raise CLIError(str(exc)) from None
    s = result.summary
    stepping = f" ({s['mts_inner_steps']} inner steps each)" if s.get("mts_inner_steps", 1) > 1 else ""
    print(f"CG run finished: {s['steps_done']} steps of {s['dt_fs']:g} fs{stepping}, {s['n_frames']} frames in {result.out_dir}")
    if s.get("ns_per_day"):
        print(f"speed: {s['ns_per_day']:.3g} ns/day ({s['ms_per_step']:.3g} ms/step) on {s['platform']}")
    return 0
