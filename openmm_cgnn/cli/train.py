"""``openmm-cgnn train``: force-match the CG force field (Hybridgraph by default) to mapped runs.

Reads every ``--data`` run (AA runs are mapped with ``--mapping``; CG runs are read as beads),
holds out the last ``--validation-fraction`` of each run (contiguous time blocks) for validation,
fits the priors to the training frames, trains the network on the remainder of the force and
writes MODELDIR (docs/contracts.md §3): checkpoint.pt, hparams.json, prior.json, metrics.json,
loss_curve.png, mapping.json and model.pt.

Runs unchanged under ``torchrun --nproc_per_node N`` (data-parallel, see README "More than one GPU"):
``--batch-size`` is then the global batch, shared out over the processes, and rank 0 alone writes
MODELDIR and prints the summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError, torch_device

QUICK_EPOCHS = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.data import DEFAULT_VALIDATION_FRACTION
    from ..training.trainer import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR",
                        help="run directories (AA or CG frames.h5 with forces); several temperatures may be mixed")
    parser.add_argument("--mapping", required=True, metavar="MAPDIR/mapping.json", help="the CG mapping")
    parser.add_argument("--out", required=True, metavar="MODELDIR", help="output model directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny network (tests, smoke runs); --epochs then defaults to {QUICK_EPOCHS}")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"maximum epochs (default {defaults.epochs}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"frames per optimiser step, over all processes under torchrun (default {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"Adam learning rate (default {defaults.lr}; 1e-3 with --quick)")
    parser.add_argument("--device", type=torch_device, default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of initialisation and shuffling (default {defaults.seed})")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in MODELDIR exactly")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files in an existing MODELDIR")
    parser.add_argument("--temperature-input", action="store_true",
                        help="give the network 1/T (per frame); needs data at several temperatures")
    parser.add_argument("--max-frames", type=int, default=None, metavar="M", help="use at most M evenly spaced frames of each run")
    parser.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                        help=f"tail fraction of each run used for validation (default {DEFAULT_VALIDATION_FRACTION})")
    parser.add_argument("--patience", type=int, default=defaults.early_stopping_patience,
                        help=f"stop after this many epochs without validation improvement (default {defaults.early_stopping_patience})")
    parser.add_argument("--model-option", nargs="+", default=[], metavar="NAME=VALUE",
                        help="override a network hyper-parameter of the --quick or reference size, e.g. "
                             "features=64 filters=64 inter_cutoff_nm=0.9 or architecture=painn (names as in "
                             "hparams.json; architectures in model/registry.py, default hybridgraph)")
    parser.add_argument("--force-map", choices=["optimal", "sum"], default=defaults.force_map,
                        help="how all-atom forces become bead forces: the mapping's statistically optimal force map "
                             "(fitted on --data when mapping.json has none) or each bead's atoms summed "
                             f"(default {defaults.force_map})")
    parser.add_argument("--prior-form", choices=["tabulated", "harmonic"], default=defaults.prior_form,
                        help="bond and angle priors: tabulated Boltzmann inversions (can hold several wells) or "
                             f"harmonic wells (default {defaults.prior_form})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# Set from the data or the other options, never by hand.
_DERIVED_FIELDS = ("n_bead_types", "bead_type_names", "use_temperature", "energy_scale", "extra")


def model_options(pairs: list[str]) -> dict[str, object]:
    """``NAME=VALUE`` strings as HybridGraphConfig overrides, each value of its field's type."""
    import dataclasses

    from ..model import HybridGraphConfig

    fields = {f.name: f for f in dataclasses.fields(HybridGraphConfig) if f.name not in _DERIVED_FIELDS}
    options: dict[str, object] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields:
            raise CLIError(f"--model-option {pair!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(fields))}")
        kind = type(fields[name].default)
        try:
            options[name] = int(text) if kind is int else float(text) if kind is float else text
        except ValueError:
            raise CLIError(f"--model-option {name}: {text!r} is not a valid {kind.__name__}") from None
    return options


def _check_arguments(args: argparse.Namespace) -> None:
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--max-frames", args.max_frames),
                        ("--patience", args.patience)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise CLIError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.validation_fraction < 1:
        raise CLIError(f"--validation-fraction must be between 0 and 1, got {args.validation_fraction}")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other")
    if not Path(args.mapping).exists():
        raise CLIError(f"--mapping {args.mapping}: file not found")
    for directory in args.data:
        if not Path(directory).exists():
            raise CLIError(f"--data {directory}: no such run directory")


def run(args: argparse.Namespace) -> int:
    from ..frames import FramesError
    from ..mapping.spec import MappingError
    from ..training import TrainConfig, TrainingDataError, TrainingError, train
    from ..training.distributed import DistributedSetupError, World

    _check_arguments(args)
    overrides = model_options(args.model_option)
    defaults = TrainConfig()
    config = TrainConfig(
        epochs=args.epochs or (QUICK_EPOCHS if args.quick else defaults.epochs),
        batch_size=args.batch_size,
        lr=args.lr or (1e-3 if args.quick else defaults.lr),
        seed=args.seed,
        device=args.device or "auto",
        validation_fraction=args.validation_fraction,
        max_frames=args.max_frames,
        use_temperature=args.temperature_input,
        early_stopping_patience=args.patience,
        quick=args.quick,
        force_map=args.force_map,
        prior_form=args.prior_form,
    )
    try:
        metrics = train(args.data, args.mapping, args.out, config, model_overrides=overrides, resume=args.resume,
                        overwrite=args.overwrite, show_progress=not args.no_progress)
    except (TrainingDataError, TrainingError, MappingError, FramesError, DistributedSetupError) as exc:
        raise CLIError(str(exc)) from exc
    except ValueError as exc:
        if "HybridGraphConfig." in str(exc):  # a --model-option value the network rejects
            raise CLIError(f"--model-option: {exc}") from exc
        raise
    if not World.from_env().is_main:  # under torchrun one summary, from rank 0
        return 0
    validation = metrics["validation"]["overall"]
    constant = metrics["baselines"]["constant_per_type"]["validation"]["overall"]
    prior = metrics["baselines"]["prior_only"]["validation"]["overall"]
    print(
        f"validation force RMSE {validation['rmse']:.4g} kJ/mol/nm (prior only {prior['rmse']:.4g}, "
        f"constant per type {constant['rmse']:.4g}) after {metrics['epochs_completed']} epochs "
        f"(best {metrics['best_epoch']}); wrote {args.out}"
    )
    return 0
