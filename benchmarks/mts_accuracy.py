"""Multiple time stepping against single stepping on a finished chain: structure, bonded terms and dynamics.

    python benchmarks/mts_accuracy.py --run runs/bmim_bf4_quick --temperatures 400 500 --seeds 1 2 3 \
        --length-ps 100 --jobs 2

Not a speed benchmark (the speed is `bench_simulate.py`'s): it decides whether MTS may be `simulate`'s
default (issue 17 item 2). For each temperature and seed, one run of each integrator with the chain's
trained model from the chain's AA run (`simulate --mts-inner-steps 1` and `--mts-inner-steps K`, each
time step from its own NVE check, the same `--length-ps`, TorchForce for both). Each run is compared
with the AA run (`evaluate`'s RDF, bonded and MSD functions); per metric the table gives the mean and
seed-to-seed standard deviation of each integrator and their difference in standard errors (Welch).
D seldom converges in such runs, so the MSD at fixed lags stands for the dynamics. Every pair of CG
runs is also compared directly: across integrators against within one. Finished runs are kept
(`OUT/T<T>K/{single,mts}_s<seed>`), so a second call only analyses. Writes OUT/mts_accuracy.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from openmm_cgnn.driver import Stage, run_stages
from openmm_cgnn.layout import MAPPING_JSON, SUMMARY_JSON

MSD_LAGS_PS = (1.0, 5.0, 20.0)
INTEGRATORS = ("single", "mts")


def run_stages_for(args: argparse.Namespace) -> list[Stage]:
    """One ``simulate`` per temperature, seed and integrator (done when its summary says finished)."""
    stages = []
    for t, seed, name in itertools.product(args.temperatures, args.seeds, INTEGRATORS):
        inner, save = (1, args.save_every_steps[0]) if name == "single" else (args.inner_steps, args.save_every_steps[1])
        out = args.out / f"T{t:g}K" / f"{name}_s{seed}"
        stages.append(Stage(f"{name} {t:g} K seed {seed}", "simulate", [
            "simulate", "--forcefield", str(args.run / "model"), "--from-aa", str(args.run / "aa" / f"T{t:g}K"),
            "--temperature", f"{t:g}", "--length-ps", f"{args.length_ps:g}", "--mts-inner-steps", str(inner),
            "--save-every-steps", str(save), "--platform", "CPU", "--carrier", "torch", "--seed", str(seed),
            "--quiet", "--resume", "--out", str(out)], out / SUMMARY_JSON))
    return stages


def run_metrics(aa: Any, cg: Any, settings: Any) -> dict[str, float]:
    """One CG run against the AA run: COM and worst bead RDF errors, bonded TVs, MSD at fixed lags, D."""
    from openmm_cgnn.analysis.evaluate import compare_bonded, compare_rdfs, run_diffusion

    rdf, _, _ = compare_rdfs(aa, cg, settings)
    bonded, _, _ = compare_bonded(aa, cg)
    out = {f"COM RDF {k[4:]}": v["error"] for k, v in rdf.items() if k.startswith("com:")}
    out["worst bead RDF"] = max(v["error"] for k, v in rdf.items() if k.startswith("bead:"))
    out.update({f"TV bond {k}": v["error"] for k, v in bonded["bonds"].items()})
    out.update({f"TV angle {k}": v["error"] for k, v in bonded["angles"].items()})
    for species, (curve, fit) in run_diffusion(cg, settings).items():
        out.update({f"MSD {species} {lag:g} ps": float(np.interp(lag, curve.lag_ps, curve.msd_nm2)) for lag in MSD_LAGS_PS})
        if fit.status == "ok":
            out[f"D {species}"] = fit.D_m2_s
    return out


def cg_distances(a: Any, b: Any, settings: Any) -> dict[str, float]:
    """Two CG runs against each other: RDF errors (``a`` as the reference) and bonded TVs."""
    from openmm_cgnn.analysis.evaluate import compare_bonded, compare_rdfs

    rdf, _, _ = compare_rdfs(dataclasses.replace(a, kind="aa"), b, settings)  # compare_rdfs keys the runs by kind
    bonded, _, _ = compare_bonded(a, b)
    return {"COM RDF": float(np.mean([v["error"] for k, v in rdf.items() if k.startswith("com:")])),
            "bead RDF": float(np.mean([v["error"] for k, v in rdf.items() if k.startswith("bead:")])),
            "bonded TV": float(np.mean([v["error"] for part in bonded.values() for v in part.values()]))}


def compare_integrators(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per metric: each integrator's mean and sd over seeds, MTS - single, and that in Welch standard errors."""
    out = {}
    for key in runs["single"][0]:
        a = np.array([r[key] for r in runs["single"] if key in r])
        b = np.array([r[key] for r in runs["mts"] if key in r])
        if len(a) < 2 or len(b) < 2:
            continue
        se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
        diff = float(b.mean() - a.mean())
        out[key] = {"single": [float(a.mean()), float(a.std(ddof=1))], "mts": [float(b.mean()), float(b.std(ddof=1))],
                    "difference": diff, "difference_in_se": diff / se if se > 0 else None}
    return out


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    from openmm_cgnn.analysis.evaluate import EvaluationSettings, load_run
    from openmm_cgnn.mapping.spec import Mapping

    mapping = Mapping.load(args.run / "mapping" / MAPPING_JSON)
    settings = EvaluationSettings()
    result: dict[str, Any] = {"format": "openmm_cgnn.mts_accuracy/1", "run": str(args.run), "inner_steps": args.inner_steps,
                              "length_ps": args.length_ps, "seeds": args.seeds, "by_temperature": {}}
    for t in args.temperatures:
        aa = load_run(args.run / "aa" / f"T{t:g}K", mapping, "aa", settings)
        loaded, per_run, metrics = {}, {}, {name: [] for name in INTEGRATORS}
        for name, seed in itertools.product(INTEGRATORS, args.seeds):
            path = args.out / f"T{t:g}K" / f"{name}_s{seed}"
            summary = json.loads((path / SUMMARY_JSON).read_text())
            loaded[path.name] = load_run(path, mapping, "cg", settings)
            row = run_metrics(aa, loaded[path.name], settings)
            metrics[name].append(row)
            per_run[path.name] = {**{k: summary.get(k) for k in ("dt_fs", "mts_inner_steps", "integrator", "ms_per_step",
                                                                 "ns_per_day", "simulated_ps")}, "metrics": row}
        pairs: dict[str, list[dict[str, float]]] = {}
        for a, b in itertools.combinations(sorted(loaded), 2):
            kind = f"within {a.split('_')[0]}" if a.split("_")[0] == b.split("_")[0] else "across"
            pairs.setdefault(kind, []).append(cg_distances(loaded[a], loaded[b], settings))
        result["by_temperature"][f"{t:g}"] = {
            "runs": per_run, "comparison": compare_integrators(metrics),
            "cg_vs_cg": {kind: {k: float(np.mean([p[k] for p in rows])) for k in rows[0]} | {"pairs": len(rows)}
                         for kind, rows in pairs.items()}}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for t, part in result["by_temperature"].items():
        lines += [f"\n{t} K, {len(result['seeds'])} seeds, {result['length_ps']:g} ps, MTS K={result['inner_steps']}",
                  "| metric | single (mean ± sd) | MTS (mean ± sd) | MTS − single (standard errors) |", "|---|---|---|---|"]
        for key, c in part["comparison"].items():
            z = "–" if c["difference_in_se"] is None else f"{c['difference_in_se']:+.1f}"
            lines.append(f"| {key} | {c['single'][0]:.4g} ± {c['single'][1]:.2g} | {c['mts'][0]:.4g} ± {c['mts'][1]:.2g} | "
                         f"{c['difference']:+.3g} ({z}) |")
        for name, run in part["runs"].items():
            lines.append(f"| {name} | dt {run['dt_fs']:g} fs, K {run['mts_inner_steps']} | {run['ms_per_step']:.3g} ms/step | "
                         f"{run['ns_per_day']:.3g} ns/day |")
        for kind, d in part["cg_vs_cg"].items():
            lines.append(f"| CG vs CG, {kind} ({d['pairs']} pairs) | COM RDF {d['COM RDF']:.3f} | bead RDF {d['bead RDF']:.3f} | "
                         f"bonded TV {d['bonded TV']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a chain that `openmm-cgnn run` finished (model, mapping, aa)")
    parser.add_argument("--out", type=Path, default=None, help="where the CG runs and the JSON go (default RUN/mts_accuracy)")
    parser.add_argument("--temperatures", type=float, nargs="+", required=True, metavar="K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--length-ps", type=float, default=100.0, help="every run's simulated time (default 100)")
    parser.add_argument("--inner-steps", type=int, default=4, help="MTS inner steps K (default 4)")
    parser.add_argument("--save-every-steps", type=int, nargs=2, default=[25, 10], metavar=("SINGLE", "MTS"),
                        help="frame intervals (default 25 10: 0.2 and 0.15 ps at the 8 and 15 fs the checks pick)")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at a time (default 2: the two of a seed side by side)")
    args = parser.parse_args(argv)
    args.out = args.out or args.run / "mts_accuracy"
    if not (args.run / "model").is_dir() or len(args.seeds) < 2:
        print(f"--run {args.run}: needs a trained model there and at least two --seeds", file=sys.stderr)
        return 2
    run_stages(run_stages_for(args), args.jobs, args.out / "logs")
    result = analyse(args)
    path = args.out / "mts_accuracy.json"
    path.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
