"""Which carrier of the prior is faster in OpenMM: native forces beside the TorchForce, or inside the model?

    python benchmarks/prior_carrier.py [--pairs 64 300] [--sizes quick reference] [--platform CPU] [--steps 10]

Builds an ionic-liquid-like CG system (a 4-bead chain cation and a 1-bead anion per pair, at
1200 kg/m3), an untrained CGModel of each size with a prior (excluded volume, bonds, angles), and
times MD steps (VerletIntegrator, after warm-up) with the prior as native OpenMM forces and inside
the TorchScript module. Untrained weights cost the same time as trained ones. Writes
benchmarks/results/prior_carrier_<platform>.json (DEFAULT_PRIOR_CARRIER follows the CPU times of
bench_simulate.py on a trained model, see force.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch  # noqa: F401  (torch before openmm)

import openmm
from common import RESULTS, best_of_blocks, machine_info, pin_threads, step_block, write_json
from openmm_cgnn.mapping.spec import CGMapping
from openmm_cgnn.model import CGModel, HybridGraphConfig, PriorSet, save_checkpoint
from openmm_cgnn.openmm.force import CGNNForce
from openmm_cgnn.openmm.topology import CGConfiguration, composition_for_pairs
from openmm_cgnn.platforms import versions

TYPES = ["CAT:B0", "CAT:B1", "CAT:B2", "CAT:B3", "ANI:B0"]
MAPPING = {
    "format": "openmm_cgnn.mapping/1",
    "residues": {
        "CAT": {"atoms": ["a", "b", "c", "d"],
                "beads": [{"name": f"B{k}", "atoms": [x], "mass": 34.8} for k, x in enumerate("abcd")],
                "bead_bonds": [[0, 1], [1, 2], [2, 3]]},
        "ANI": {"atoms": ["x"], "beads": [{"name": "B0", "atoms": ["x"], "mass": 86.8}], "bead_bonds": []},
    },
}
PRIOR = {
    "format": "openmm_cgnn.prior/1",
    "excluded_volume": {"exponent": 12, "cutoff_nm": 0.8, "epsilon_kj_mol": 2.5,
                        "sigma_nm": {"|".join(sorted((a, b))): 0.35 for a in TYPES for b in TYPES}},
    "bonds": [{"residue": "CAT", "beads": [k, k + 1], "r0_nm": 0.3, "k_kj_mol_nm2": 5000.0} for k in range(3)],
    "angles": [{"residue": "CAT", "beads": [k, k + 1, k + 2], "theta0_rad": 2.1, "k_kj_mol_rad2": 80.0} for k in range(2)],
}


def model_dir(folder: Path, size: str) -> Path:
    make = HybridGraphConfig.quick if size == "quick" else HybridGraphConfig.reference
    config = make(len(TYPES), bead_type_names=list(TYPES), use_temperature=True)
    save_checkpoint(folder, CGModel(config, PriorSet.from_dict(PRIOR, TYPES)), epoch=0)
    CGMapping.from_dict(MAPPING).save(folder / "mapping.json")
    return folder


def make_context(cg: CGConfiguration, source: Path, carrier: str, platform: str) -> tuple:
    force = CGNNForce(source, cg, 400.0, prior=carrier)
    system = cg.system()
    force.add_to(system)
    integrator = openmm.VerletIntegrator(0.002)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(cg.positions)
    context.setVelocitiesToTemperature(400.0, 1)
    integrator.step(3)  # warm-up: TorchScript profiling runs, allocations
    context.getState(getEnergy=True)
    return context, integrator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[64, 300])
    parser.add_argument("--sizes", nargs="+", default=["quick", "reference"], choices=["quick", "reference"])
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per carrier (the fastest counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fair on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/prior_carrier_<platform>.json")
    args = parser.parse_args()
    pin_threads(args.threads)

    mapping = CGMapping.from_dict(MAPPING)
    prior = PriorSet.from_dict(PRIOR, TYPES)
    bonds = {(r, min(b), max(b)): r0 for r, b, r0 in zip(prior.bonds.residues, prior.bonds.beads, prior.bonds.r0)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {size: model_dir(Path(tmp) / size, size) for size in args.sizes}
        for pairs, size in [(p, s) for p in args.pairs for s in args.sizes]:
            source = sources[size]
            cg = CGConfiguration.packed(mapping, composition_for_pairs(mapping, pairs), 1200.0, seed=1, bond_lengths=bonds)
            # relax the packed start once, so both carriers are timed on the same sane configuration
            force = CGNNForce(source, cg, 400.0, prior="openmm")
            system = cg.system()
            force.add_to(system)
            context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(args.platform))
            context.setPositions(cg.positions)
            openmm.LocalEnergyMinimizer.minimize(context, 50.0, 200)
            relaxed = cg.with_positions(context.getState(getPositions=True).getPositions(asNumpy=True)._value)
            del context
            # blocks of the two carriers alternate, and the fastest block counts, so load from other
            # processes on a shared machine biases neither
            contexts = {carrier: make_context(relaxed, source, carrier, args.platform) for carrier in ("openmm", "model")}
            blocks = best_of_blocks({carrier: (lambda c=context: step_block(c, args.steps))
                                     for carrier, (context, _) in contexts.items()}, args.repeats)
            for carrier, times in blocks.items():
                row = {"pairs": pairs, "n_beads": cg.n_beads, "box_nm": float(cg.box[0, 0]), "size": size, "carrier": carrier,
                       **times}
                print(json.dumps(row))
                results.append(row)
            del contexts
    faster = {}
    for pairs, size in [(p, s) for p in args.pairs for s in args.sizes]:
        rows = {r["carrier"]: r["ms_per_step"] for r in results if r["size"] == size and r["pairs"] == pairs}
        faster[f"{pairs} pairs, {size}"] = min(rows, key=rows.get)
    report = {
        "benchmark": "prior carrier: native OpenMM forces vs inside the TorchScript model",
        "platform": args.platform,
        "torch_threads": args.threads,
        "steps_per_block": args.steps,
        "blocks": args.repeats,
        "results": results,
        "faster": faster,
        "machine": machine_info(),
        "versions": versions(),
    }
    write_json(args.out or RESULTS / f"prior_carrier_{args.platform.lower()}.json", report)
    print(f"faster carrier per size {faster}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
