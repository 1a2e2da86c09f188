"""``openmm-cgnn map``: learn the CG mapping (CGAE) from all-atom runs.

Writes ``MAPDIR/mapping.json``, ``loss_<RES>.png``, ``assignment_<RES>.png`` and
``mapping_report.json`` (final losses per residue, chosen seed, repairs, loss histories). The
mapping carries each residue's statistically optimal force map (``mapping/forcemap.py``), fitted on
every molecule of every frame; the mean squared mapped force of the summed and the optimal map is
printed and kept in the report under ``force_map``.
Every residue type in the data needs a bead count in ``--beads``: a silent default could give a
molecule one bead nobody asked for.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from pathlib import Path

from ..io import check_output_dir, output_dir, write_json_atomic
from . import CLIError, torch_device
from ..layout import MAPPING_JSON, MAPPING_REPORT_JSON

_BEAD_ITEM = re.compile(r"^\s*([A-Za-z0-9_+\-]+)\s*=\s*(\d+)\s*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..mapping.cgae import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_RHO
    from ..mapping.learn import DEFAULT_MAX_SAMPLES, DEFAULT_RESTARTS

    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="all-atom run directories (frames.h5 with forces)")
    parser.add_argument(
        "--beads", required=True, metavar="RES=N,...",
        help="beads per residue type, for every residue in the data, e.g. BMIM=4,BF4=1",
    )
    parser.add_argument("--out", required=True, metavar="MAPDIR", help="output directory")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs per restart (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first restart; restart k uses seed+k (default 0)")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS, help=f"restarts per residue type, best loss kept (default {DEFAULT_RESTARTS})")
    parser.add_argument(
        "--rho", type=float, default=DEFAULT_RHO,
        help=f"weight of the normalised instantaneous-force term against the normalised reconstruction term (default {DEFAULT_RHO})",
    )
    parser.add_argument("--max-frames", type=int, default=None, metavar="M", help="use at most M evenly spaced frames of each run")
    parser.add_argument(
        "--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
        help=f"at most this many molecules x frames per residue type, drawn at random under --seed (default {DEFAULT_MAX_SAMPLES}; 0 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"samples per optimiser step (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device for training (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no per-restart progress (bar or log lines)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a mapping directory that map wrote before (never any other directory)")


def parse_beads(text: str) -> "OrderedDict[str, int]":
    """``"BMIM=4,BF4=1"`` -> ordered {residue: count}; errors name ``--beads`` and the bad item."""
    counts: "OrderedDict[str, int]" = OrderedDict()
    items = [item for item in text.split(",")]
    if not text.strip():
        raise CLIError("--beads is empty; expected RES=N[,RES=N...], e.g. BMIM=4,BF4=1")
    for item in items:
        match = _BEAD_ITEM.match(item)
        if not match:
            raise CLIError(f"--beads: malformed item {item!r}; expected RES=N with N a positive integer, e.g. BMIM=4,BF4=1")
        name, count = match.group(1), int(match.group(2))
        if count < 1:
            raise CLIError(f"--beads: {name}={count}; a residue needs at least 1 bead")
        if name in counts:
            raise CLIError(f"--beads: residue {name} is given twice")
        counts[name] = count
    return counts


def run(args: argparse.Namespace) -> int:
    import torch

    from ..frames import FramesError, read_frames
    from ..mapping.forcemap import fit_force_map
    from ..mapping.learn import BeadCountError, learn_mapping
    from ..mapping.plots import plot_assignment, plot_losses
    from ..mapping.spec import MappingError

    beads = parse_beads(args.beads)
    for flag, value in (("--epochs", args.epochs), ("--restarts", args.restarts), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.max_frames is not None and args.max_frames < 1:
        raise CLIError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.max_samples < 0:
        raise CLIError(f"--max-samples must be >= 0, got {args.max_samples}")
    if args.rho < 0:
        raise CLIError(f"--rho must be >= 0, got {args.rho}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: no CUDA device is available here")
    out = Path(args.out)
    replace = check_output_dir(out, "mapping", overwrite=args.overwrite)  # before the compute

    frames_list = []
    for directory in args.data:
        try:
            frames_list.append(read_frames(directory, require_forces=True, max_frames=args.max_frames))
        except FramesError as exc:
            raise CLIError(f"--data: {exc}") from exc

    try:
        mapping, report = learn_mapping(
            frames_list, beads, epochs=args.epochs, seed=args.seed, restarts=args.restarts, device=args.device,
            rho=args.rho, batch_size=args.batch_size, max_samples=args.max_samples or None,
            log=lambda message: print(message, flush=True), progress=not args.no_progress,
        )
        mapping, force_report = fit_force_map(mapping, frames_list)
    except BeadCountError as exc:
        raise CLIError(f"--beads: {exc}") from exc
    except MappingError as exc:
        raise CLIError(str(exc)) from exc

    with output_dir(out, "mapping", replace) as work:
        mapping.save(work / MAPPING_JSON)
        for name, residue_report in report["residues"].items():
            plot_losses(name, residue_report, work / f"loss_{name}.png", rho=args.rho)
            plot_assignment(name, residue_report, work / f"assignment_{name}.png")
        report["max_frames"] = args.max_frames
        report["force_map"] = force_report
        write_json_atomic(work / MAPPING_REPORT_JSON, report)
    for name, rm in mapping.residues.items():
        final = report["residues"][name]["final"]
        print(f"{name}: loss {final['loss']:.4f} (rec {final['rec']:.4f}, inst {final['inst']:.4f})")
        for bead in rm.beads:
            print(f"  {bead.name} ({bead.mass:.2f} amu): {' '.join(bead.atoms)}")
        fm = force_report[name]
        ratio = fm["ratio_optimal_to_sum"]  # None when the runs' mapped forces are all zero
        print(f"  mean squared mapped force: summed map {fm['mean_squared_force_sum']:.4g}, optimal map "
              f"{fm['mean_squared_force_optimal']:.4g} (kJ/mol/nm)^2 per bead, ratio "
              f"{'n/a' if ratio is None else format(ratio, '.3f')} over {fm['n_samples']} molecules x frames")
    print(f"wrote {out / MAPPING_JSON} and {MAPPING_REPORT_JSON}, loss_*.png, assignment_*.png in {report['seconds']:.1f} s")
    return 0
