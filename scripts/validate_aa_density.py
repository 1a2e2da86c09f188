"""Validate the all-atom force field: NPT density of [BMIM][BF4] against experiment.

Not a test (it takes 15-60 min on one CPU core). Runs ``run_aa`` with a long NPT stage and a
token production stage, then writes a JSON verdict::

    OPENMM_CPU_THREADS=1 python scripts/validate_aa_density.py \
        --out results/validation/aa_density_298K --json results/validation/density_298K.json

Reference: the experimental table of openmm_cgnn.analysis.density (1200 kg/m3 at 298 K, as in
shared/reference/bmim_bf4.md), the same the evaluation report uses.
The goal is agreement within 3 %. The error bar is a block average over the second half of NPT.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

BMIM_BF4 = {"C8H15N2": 1, "BF4": 1}  # molecule formulae, as the experimental density table lists them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=298.0)
    parser.add_argument("--equilibrate-ps", type=float, default=150.0)
    parser.add_argument("--charge-scale", type=float, default=1.0)
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="results/validation/aa_density_298K")
    parser.add_argument("--json", default="results/validation/density_298K.json")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--tolerance", type=float, default=0.03, help="relative agreement goal")
    args = parser.parse_args()

    import openmm_cgnn  # noqa: F401  (torch before openmm)
    from openmm_cgnn.aa import run_aa
    from openmm_cgnn.analysis.density import block_standard_error, find_experimental_density

    t0 = time.time()
    summary = run_aa(args.out, args.pairs, args.temperature, args.equilibrate_ps, production_ps=1.0,
                     save_every_ps=1.0, charge_scale=args.charge_scale, platform=args.platform, seed=args.seed,
                     resume=args.resume, overwrite=not args.resume)
    with open(Path(args.out) / "npt_density.csv") as fh:
        rows = [(float(r["time_ps"]), float(r["density_kg_m3"])) for r in csv.DictReader(fh)]
    second_half = np.array([rho for t, rho in rows if t > args.equilibrate_ps / 2])
    reference, _ = find_experimental_density(BMIM_BF4).at(args.temperature)
    density = summary["density_kg_m3"]
    result = {
        "temperature_K": args.temperature,
        "n_pairs": args.pairs,
        "charge_scale": args.charge_scale,
        "npt_ps": args.equilibrate_ps,
        "density_kg_m3": density,
        "density_block_error_kg_m3": block_standard_error(second_half, 5),
        "density_drift_kg_m3": summary["density_drift_kg_m3"],
        "experimental_kg_m3": reference,
        "relative_deviation": density / reference - 1.0,
        "within_tolerance": abs(density / reference - 1.0) <= args.tolerance,
        "tolerance": args.tolerance,
        "cutoff_nm": summary["cutoff_nm"],
        "platform": summary["platform"],
        "ms_per_step_production": summary["ms_per_step"],
        "wall_s": time.time() - t0,
        "run_dir": str(args.out),
        "forcefield": summary["forcefield"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
