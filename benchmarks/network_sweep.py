"""Network-size sweep: force error, CG fidelity and CPU cost of several Hybridgraph sizes on one chain.

On a chain that ``openmm-cgnn run`` finished, each size is trained on the chain's data and mapping
(``--model-option`` set to the size, every other training option as the chain's), run at every
temperature at the chain's time step (optionally shorter, ``--cg-steps``), evaluated against the
all-atom runs, and timed with ``bench_md.py`` (AA and CG side by side in one process, 1 thread, at
the chain's ion-pair count). The result says which is the smallest network within the noise of the
best one: the force loss is noise-dominated, so a small network may lose nothing.

    python benchmarks/network_sweep.py --run runs/bmim_bf4_cpu --size cpu --jobs 2 --cg-steps 10000
    python benchmarks/network_sweep.py --run runs/bmim_bf4_tiny --size tiny --networks n8 n16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from fidelity_table import model_row, option_values, validation_rmse, variant_stages
from openmm_cgnn.analysis.evaluate import model_summary
from openmm_cgnn.driver import SETTINGS, plan, run_plan
from openmm_cgnn.liquids import load_liquid

# name -> network hyper-parameters (train --model-option); cutoffs and the rest stay the chain's.
NETWORKS: dict[str, dict[str, int]] = {
    "n8": {"features": 8, "filters": 8, "n_gaussians": 8, "intra_blocks": 1, "inter_blocks": 1},
    "n16": {"features": 16, "filters": 16, "n_gaussians": 16, "intra_blocks": 2, "inter_blocks": 2},
    "n32": {"features": 32, "filters": 32, "n_gaussians": 16, "intra_blocks": 2, "inter_blocks": 2},
    "n64": {"features": 64, "filters": 64, "n_gaussians": 32, "intra_blocks": 2, "inter_blocks": 2},
    "n128": {"features": 128, "filters": 128, "n_gaussians": 50, "intra_blocks": 3, "inter_blocks": 2},
    # the published size (JCP 153, 164501): 240 features, 256 filters, 80 Gaussians, 3 + 2 blocks
    "reference": {"features": 240, "filters": 256, "n_gaussians": 80, "intra_blocks": 3, "inter_blocks": 2},
}


def model_options(chain_options: Sequence[str], network: dict[str, int]) -> list[str]:
    """The chain's ``--model-option`` values with the network's keys replaced or added."""
    merged = dict(v.split("=", 1) for v in chain_options)
    merged.update({k: str(v) for k, v in network.items()})
    return [f"{k}={v}" for k, v in merged.items()]


def chain_model_options(chain: list[Any]) -> list[str]:
    (train,) = [s for s in chain if s.group == "train"]
    return option_values(train.args, "--model-option")


def reuse_chain_model(chain_out: Path, root: Path, network: dict[str, int]) -> bool:
    """Link ``root/model`` to the chain's own model when the chain trained exactly this network (its
    hparams.json has these values; data, seed and every other option are the chain's, so retraining
    would reproduce it); True if linked."""
    hparams = chain_out / "model" / "hparams.json"
    if (root / "model").exists() or not hparams.exists():
        return False
    saved = json.loads(hparams.read_text())
    if any(saved.get(key) != value for key, value in network.items()):
        return False
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").symlink_to((chain_out / "model").resolve(), target_is_directory=True)
    return True


def timing(model_dir: Path, chain_out: Path, pairs: int, out: Path) -> dict[str, Any]:
    """bench_md.py on the trained model: AA and CG ms/step side by side at the chain's size and step."""
    cg = sorted((chain_out / "cg").glob("T*K/summary.json"))[0]
    aa = chain_out / "aa" / cg.parent.name
    if not out.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_md.py")), "--model", str(model_dir),
                        "--pairs", str(pairs), "--cg-summary", str(cg), "--aa-run", str(aa), "--scaling-beads",
                        "--platform", "CPU", "--out", str(out)], check=True)
    rows = json.loads(out.read_text())["md"]
    row = rows[0]
    return {"aa_ms_per_step": row["aa"]["ms_per_step"], "cg_ms_per_step": row["cg"]["ms_per_step"],
            "cg_dt_fs": row["cg"]["dt_fs"], "cg_aa_ns_per_day": row["cg"]["ratio_ns_per_day_cg_over_aa"]}


def parameter_count(model_dir: Path) -> int:
    from openmm_cgnn.model import load_model

    return sum(p.numel() for p in load_model(model_dir).net.parameters())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a chain that `openmm-cgnn run` finished")
    parser.add_argument("--liquid", default="bmim_bf4", help="the chain's liquid (default bmim_bf4)")
    parser.add_argument("--size", default="cpu", choices=list(SETTINGS), help="the chain's size (default cpu)")
    parser.add_argument("--networks", nargs="+", default=["n32", "n64", "n128", "reference"], choices=list(NETWORKS))
    parser.add_argument("--cg-steps", type=int, default=None, help="CG steps per temperature (default: the chain's)")
    parser.add_argument("--jobs", type=int, default=1, help="simulations at a time (default 1)")
    parser.add_argument("--no-timing", action="store_true", help="skip bench_md (ms/step)")
    parser.add_argument("--train-only", action="store_true",
                        help="train and time each size, no CG runs or evaluation: the force error and the cost only")
    parser.add_argument("--json", type=Path, default=None, help="default RUN/network_sweep.json")
    args = parser.parse_args(argv)
    metrics_path = args.run / "report" / "metrics.json"
    if not metrics_path.exists():
        print(f"--run {args.run}: no finished chain there (report/metrics.json missing)", file=sys.stderr)
        return 2
    if args.cg_steps is not None and args.cg_steps <= 0:
        print(f"--cg-steps {args.cg_steps}: must be a positive number of steps", file=sys.stderr)
        return 2
    chain = plan(load_liquid(args.liquid), args.size, args.run)
    base_options = chain_model_options(chain)
    roots = {name: args.run / "sweep" / name for name in args.networks}
    for name in args.networks:
        reuse_chain_model(args.run, roots[name], NETWORKS[name])
    stages = [s for name in args.networks
              for s in variant_stages(chain, roots[name], name,
                                      {"--model-option": model_options(base_options, NETWORKS[name])}, args.cg_steps)
              if not args.train_only or s.group == "train"]
    run_plan(stages, jobs=args.jobs, log_dir=args.run / "sweep" / "logs")

    metrics = json.loads(metrics_path.read_text())
    held_out = {str(t) for t in metrics.get("held_out_temperatures_K", [])}
    pairs = metrics["runs"][0]["n_molecules"]
    rows = []
    for name in args.networks:
        root = roots[name]
        if args.train_only:
            row = {"model": name, "validation_force_rmse": validation_rmse(root / "model"), "worst_com_rdf_error": None,
                   "worst_bonded_tv": None}
        else:
            report = json.loads((root / "report" / "metrics.json").read_text())
            row = model_row(name, model_summary(report), held_out, validation_rmse(root / "model"))
        row.update(network=NETWORKS[name], parameters=parameter_count(root / "model"))
        if not args.no_timing:
            row.update(timing(root / "model", args.run, min(pairs.values()), root / "md_cpu.json"))
        rows.append(row)
    best = min(r["validation_force_rmse"] for r in rows)
    result = {"format": "openmm_cgnn.network_sweep/1", "run": str(args.run), "cg_steps": args.cg_steps,
              "best_validation_force_rmse": best, "rows": rows}
    path = args.json or args.run / "network_sweep.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| network | parameters | val. force RMSE | worst COM RDF | worst bonded TV | CG ms/step | CG/AA ns/day |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(v: Any, spec: str) -> str:
            return "–" if v is None else format(v, spec)
        print(f"| {r['model']} | {r['parameters']} | {fmt(r['validation_force_rmse'], '.0f')} | "
              f"{fmt(r['worst_com_rdf_error'], '.3f')} | {fmt(r['worst_bonded_tv'], '.3f')} | "
              f"{fmt(r.get('cg_ms_per_step'), '.2f')} | {fmt(r.get('cg_aa_ns_per_day'), '.1f')} |")
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
