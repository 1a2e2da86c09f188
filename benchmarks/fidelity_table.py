"""Fidelity table: what each ingredient of the CG model is worth, measured on one finished chain.

Takes a chain that ``openmm-cgnn run`` finished (all-atom runs, mapping, model, CG and prior-only
runs, report) and adds variants that change one ingredient each, on the same all-atom data and
mapping, at the trained model's time step, length and seed:

- ``sum_map``: force labels from each bead's atoms summed, instead of the optimal force map;
- ``harmonic``: harmonic bond and angle priors, instead of tabulated Boltzmann inversions.

Each variant is trained, simulated at every temperature of the chain and evaluated against the same
all-atom runs (``OUT/variants/<name>/``; done stages are skipped, so an interrupted table resumes).
The rows (the chain's trained model, its prior-only ablation, and each variant) give the
validation force RMSE, the worst centre-of-mass and bead RDF errors (trained and held-out
temperatures apart), the worst bonded total-variation difference, the range of D_CG/D_AA and E_a
against all-atom. They are written to ``--json`` and printed as a markdown table.

    python benchmarks/fidelity_table.py --run runs/bmim_bf4_cpu --size cpu --jobs 2
    python benchmarks/fidelity_table.py --run runs/bmim_bf4_cpu --size cpu --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from openmm_cgnn.analysis.evaluate import model_summary, temperature_key
from openmm_cgnn.driver import SETTINGS, Stage, plan, run_plan
from openmm_cgnn.layout import REFINE_JSON
from openmm_cgnn.liquids import load_liquid

VARIANTS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "sum_map": ("summed force map", {"--force-map": ["sum"]}),
    "harmonic": ("harmonic bonded priors", {"--prior-form": ["harmonic"]}),
}


def option_span(args: Sequence[str], name: str) -> tuple[int, int]:
    """Indices of option ``name`` and one past its last value (values run up to the next ``--option``)."""
    start = list(args).index(name)
    end = start + 1
    while end < len(args) and not args[end].startswith("--"):
        end += 1
    return start, end


def option_values(args: Sequence[str], name: str) -> list[str]:
    """The values of option ``name`` (none when it is absent)."""
    if name not in args:
        return []
    start, end = option_span(args, name)
    return list(args[start + 1:end])


def set_option(args: Sequence[str], name: str, values: Sequence[str]) -> list[str]:
    """``args`` with option ``name``'s values replaced."""
    start, end = option_span(args, name)
    return [*args[:start + 1], *values, *args[end:]]


def drop_option(args: Sequence[str], name: str) -> list[str]:
    """``args`` without option ``name`` and its values."""
    if name not in args:
        return list(args)
    start, end = option_span(args, name)
    return [*args[:start], *args[end:]]


def variant_stages(chain: list[Stage], root: Path, name: str, train_options: dict[str, list[str]],
                   cg_steps: int | None = None, temperatures: set[str] | None = None) -> list[Stage]:
    """The train, simulate and evaluate stages of one variant in ``root``, derived from the chain's own.

    ``train_options``: options of the chain's ``train`` to set (or add), e.g. ``{"--force-map": ["sum"]}``.
    ``cg_steps``: a shorter CG run than the chain's (the same step and save interval).
    ``temperatures``: CG runs at these of the chain's temperatures only (``"550"``; None: all).
    """
    model = root / "model"
    by_group: dict[str, list[Stage]] = {}
    for stage in chain:
        by_group.setdefault(stage.group, []).append(stage)
    (train,) = by_group["train"]
    args = drop_option(set_option(train.args, "--out", [str(model)]), "--resume")
    for option, values in train_options.items():
        args = set_option(args, option, values) if option in args else [*args, option, *values]
    if (model / "checkpoint.pt").exists():
        args.append("--resume")
    stages = [Stage(f"{name}: train", "train", args, model / "model.pt", [], train.device)]
    # Refined like the chain's model where the chain refines (refine needs tabulated priors: a
    # harmonic variant runs as trained, and its row says so)
    cg_model = model
    if "refine" in by_group and option_values(args, "--prior-form") != ["harmonic"]:
        (refine,) = by_group["refine"]
        cg_model = root / "model_refined"
        stages.append(Stage(f"{name}: refine", "refine",
                            set_option(set_option(refine.args, "--model", [str(model)]), "--out", [str(cg_model)]),
                            cg_model / REFINE_JSON, ["train"], refine.device))
    cg_dirs = []
    for stage in by_group["simulate"]:
        if temperatures is not None and option_values(stage.args, "--temperature")[0] not in temperatures:
            continue
        trained_run = Path(stage.args[stage.args.index("--out") + 1])
        cg_dir = root / "cg" / trained_run.name
        cg_dirs.append(str(cg_dir))
        args = set_option(set_option(stage.args, "--forcefield", [str(cg_model)]), "--out", [str(cg_dir)])
        if cg_steps is not None:  # in place of the chain's --steps or --length-ps
            args = [*drop_option(drop_option(args, "--steps"), "--length-ps"), "--steps", str(cg_steps)]
        # the same step as the chain's trained run: the variants differ in the model only
        args = [*drop_option(args, "--dt-candidates-fs"), "--dt-from", str(trained_run)]
        stages.append(Stage(f"{name}: {stage.name}", "simulate", args, cg_dir / "summary.json", ["train", "refine"],
                            stage.device))
    (evaluate,) = by_group["evaluate"]
    args = drop_option(set_option(evaluate.args, "--cg", cg_dirs), "--cg-prior-only")
    args = set_option(args, "--out", [str(root / "report")])
    stages.append(Stage(f"{name}: evaluate", "evaluate", args, root / "report" / "report.md", ["simulate"]))
    return stages


def _worst(by_temperature: dict[str, Any], key: str, temps: set[str], inside: bool) -> float | None:
    values = [row[key]["error"] for t, row in by_temperature.items()
              if (t in temps) == inside and row.get(key, {}).get("error") is not None]
    return max(values) if values else None


def model_row(label: str, part: dict[str, Any], held_out: set[str], validation_rmse: float | None,
              temperatures: set[str] | None = None) -> dict[str, Any]:
    """One row: a report's model summary (``ablation.trained`` or ``model_summary``) in a few numbers,
    over ``temperatures`` only when given (rows of one table compare the same temperatures)."""
    rows = {t: row for t, row in part["by_temperature"].items() if temperatures is None or t in temperatures}
    tv = [v for row in rows.values() for v in row.get("bonded_tv", {}).values() if v is not None]
    ratios = [r["ratio"] for row in rows.values() for r in row.get("d_ratio_cg_aa", {}).values()
              if r.get("ratio") is not None]
    return {
        "model": label,
        "validation_force_rmse": validation_rmse,
        "worst_com_rdf_error": _worst(rows, "worst_com_rdf_error", held_out, False),
        "worst_com_rdf_error_held_out": _worst(rows, "worst_com_rdf_error", held_out, True),
        "worst_bead_rdf_error": _worst(rows, "worst_bead_rdf_error", held_out, False),
        "worst_bonded_tv": max(tv) if tv else None,
        "bonded_tv_by_term": {term: max(row["bonded_tv"].get(term) or 0.0 for row in rows.values())
                              for term in next(iter(rows.values()), {}).get("bonded_tv", {})},
        "d_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "Ea": part.get("Ea"),
    }


def ran_refined_model(metrics: dict[str, Any]) -> bool:
    """Whether an evaluation's CG runs ran a model whose bonded tables ``refine`` corrected (as evaluate records it)."""
    return any(run.get("refined") for run in metrics["runs"] if run["kind"] == "cg")


def validation_rmse(model_dir: Path) -> float | None:
    """The trained model's validation force RMSE (kJ/mol/nm), None before training ends."""
    path = model_dir / "metrics.json"
    return json.loads(path.read_text())["validation"]["overall"]["rmse"] if path.exists() else None


def table(out: Path, temperatures: set[str] | None = None, chain_report: Path | None = None) -> dict[str, Any]:
    """The rows, from the chain's report (``chain_report``, default ``out/report``) and each finished
    variant's report (over ``temperatures``)."""
    chain_report = chain_report or out / "report"
    metrics = json.loads((chain_report / "metrics.json").read_text())
    held_out = {str(t) for t in metrics.get("held_out_temperatures_K", [])}
    ablation = metrics["ablation"]
    model_metrics = json.loads((out / "model" / "metrics.json").read_text())
    prior_rmse = model_metrics["validation"]["overall"]["rmse"] * model_metrics[
        "validation_mse_relative_to"]["prior_only"] ** -0.5
    chain_refined = ran_refined_model(metrics)
    rows = [model_row("trained (optimal map, tabulated priors" + (", refined)" if chain_refined else ")"),
                      ablation["trained"], held_out,
                      validation_rmse(out / "model"), temperatures)]
    if "prior_only" in ablation:
        rows.append(model_row("prior only (network off)", ablation["prior_only"], held_out, prior_rmse, temperatures))
    for name, (label, _) in VARIANTS.items():
        report = out / "variants" / name / "report" / "metrics.json"
        if report.exists():
            variant_metrics = json.loads(report.read_text())
            variant = model_summary(variant_metrics)  # no prior-only runs: no ablation section
            if chain_refined and not ran_refined_model(variant_metrics):
                label = f"{label}, not refined"
            rows.append(model_row(f"trained, {label}", variant, held_out, validation_rmse(report.parent.parent / "model"),
                                  temperatures))
    return {"format": "openmm_cgnn.fidelity_table/1", "run": str(out), "chain_report": str(chain_report),
            "held_out_temperatures_K": sorted(held_out),
            "temperatures_K": None if temperatures is None else sorted(temperatures),
            "targets": metrics["verdict"]["targets"], "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f} %"

    def ea(row: dict[str, Any]) -> str:
        parts = []
        for species, e in (row["Ea"] or {}).items():
            if e.get("Ea_kJ_mol") is not None:
                rel = e.get("relative_difference")
                parts.append(f"{species} {e['Ea_kJ_mol']:.0f} ± {e['Ea_err_kJ_mol']:.0f}"
                             + ("" if rel is None else f" ({100 * rel:+.0f} %)"))
        return "; ".join(parts) or "not resolved"

    lines = ["| model | val. force RMSE | COM RDF (trained T) | COM RDF (held out) | bead RDF | worst bonded TV "
             "| D_CG/D_AA | E_a CG kJ/mol (vs AA) |", "|---" * 8 + "|"]
    for row in result["rows"]:
        rmse = "–" if row["validation_force_rmse"] is None else f"{row['validation_force_rmse']:.0f}"
        d = "–" if row["d_ratio_range"] is None else "{:.2f}–{:.2f}".format(*row["d_ratio_range"])
        lines.append(f"| {row['model']} | {rmse} | {pct(row['worst_com_rdf_error'])} | "
                     f"{pct(row['worst_com_rdf_error_held_out'])} | {pct(row['worst_bead_rdf_error'])} | "
                     f"{pct(row['worst_bonded_tv'])} | {d} | {ea(row)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a chain that `openmm-cgnn run` finished")
    parser.add_argument("--liquid", default="bmim_bf4", help="the chain's liquid (default bmim_bf4)")
    parser.add_argument("--size", default="cpu", choices=list(SETTINGS), help="the chain's size (default cpu)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="simulations at a time (default 1)")
    parser.add_argument("--table-only", action="store_true", help="collect the rows of what has finished")
    parser.add_argument("--cg-steps", type=int, default=None,
                        help="CG steps per variant run (default: the chain's run length); compare with a chain report "
                             "of runs as long (--chain-report)")
    parser.add_argument("--chain-report", type=Path, default=None,
                        help="the chain's evaluation to compare with (default RUN/report)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=None, metavar="K",
                        help="run the variants at these of the chain's temperatures only, and compare every row there "
                             "(default: all; e.g. one training temperature and the held-out one)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the rows (default RUN/fidelity_table.json)")
    args = parser.parse_args(argv)
    if not (args.run / "report" / "metrics.json").exists():
        print(f"--run {args.run}: no finished chain there (report/metrics.json missing)", file=sys.stderr)
        return 2
    if args.chain_report is not None and not (args.chain_report / "metrics.json").exists():
        print(f"--chain-report {args.chain_report}: no metrics.json there", file=sys.stderr)
        return 2
    if args.cg_steps is not None and args.cg_steps <= 0:
        print(f"--cg-steps {args.cg_steps}: must be a positive number of steps", file=sys.stderr)
        return 2
    temperatures = None if args.temperatures is None else {temperature_key(t) for t in args.temperatures}
    if not args.table_only:
        chain = plan(load_liquid(args.liquid), args.size, args.run)
        have = {option_values(s.args, "--temperature")[0] for s in chain if s.group == "simulate"}
        if temperatures is not None and not temperatures <= have:
            print(f"--temperatures: {', '.join(sorted(temperatures - have))} K not among the chain's CG runs "
                  f"({', '.join(sorted(have))} K)", file=sys.stderr)
            return 2
        stages = [s for name in args.variants
                  for s in variant_stages(chain, args.run / "variants" / name, name, VARIANTS[name][1],
                                          args.cg_steps, temperatures)]
        run_plan(stages, jobs=args.jobs, log_dir=args.run / "variants" / "logs")
    result = table(args.run, temperatures, args.chain_report)
    path = args.json or args.run / "fidelity_table.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
