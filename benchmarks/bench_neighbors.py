"""Neighbour-search speed: our static-shape dense and cell searches vs torchani's neighbour lists.

Time per call (median of repeats, after warm-up) vs number of beads, on synthetic CG liquids at
about 16 beads/nm^3 ([BMIM][BF4] density with ~5 beads per ion pair), cutoff 0.8 nm.
Writes benchmarks/results/neighbors_<device>.json.

    python benchmarks/bench_neighbors.py [--sizes 256 512 1024 2048] [--device cpu|cuda] [--threads 1]

torchani (pip install torchani==2.9.0) is only a comparison; it is skipped if missing.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from common import RESULTS, pin_threads, timed, torch_result, write_json
from openmm_cgnn.model.neighbors import CellNeighborSearch, DenseNeighborSearch, cell_grid_for_box
from openmm_cgnn.testing.cg_models import ionic_liquid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cutoff", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per measurement at most")
    parser.add_argument("--torchani-max", type=int, default=1024, help="largest N for torchani's all-pairs list")
    parser.add_argument("--dense-max", type=int, default=4096, help="largest N for our dense search (O(N^2) memory)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pin_threads(args.threads)
    device = torch.device(args.device)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")
            import torchani.neighbors as ani
    except ImportError:
        ani = None

    rows = []
    for beads in args.sizes:
        cg = ionic_liquid(n_pairs=max(beads // 4, 1), box_nm=None, frames=1, jitter_nm=0.05)
        positions = torch.as_tensor(cg.positions, device=device)
        box = torch.as_tensor(cg.box, device=device)
        molecules = torch.as_tensor(cg.molecule_index, device=device)
        n = positions.shape[1]
        row = {"n_beads": n, "box_nm": float(cg.box[0, 0, 0])}
        dense = torch.jit.script(DenseNeighborSearch(args.cutoff, 64.0).to(device))
        grid = cell_grid_for_box(box, args.cutoff)
        cell = torch.jit.script(CellNeighborSearch(args.cutoff, 64.0, grid).to(device)) if min(grid) >= 3 else None
        counts = {}
        if n <= args.dense_max:
            counts["dense"] = int(dense(positions, box, molecules)[3][0])
            row["dense"] = timed(lambda: dense(positions, box, molecules), args.repeats, device, args.budget)
        if cell is not None:
            counts["cell"] = int(cell(positions, box, molecules)[3][0])
            row["cell"] = timed(lambda: cell(positions, box, molecules), args.repeats, device, args.budget)
            row["cell_grid"] = grid
        if len(set(counts.values())) != 1:
            raise SystemExit(f"N={n}: the searches disagree on the pair count: {counts}")
        row["pairs"] = next(iter(counts.values()))
        if ani is not None:
            species = torch.zeros(1, n, dtype=torch.long, device=device)
            pbc = torch.ones(3, dtype=torch.bool, device=device)
            cell_matrix = box[0]
            candidates = {"torchani_cell_list": ani.CellList()}
            if n <= args.torchani_max:
                candidates["torchani_all_pairs"] = ani.AllPairs()
            for name, module in candidates.items():
                try:
                    scripted = torch.jit.script(module)
                    row[name] = timed(lambda: scripted(args.cutoff, species, positions, cell_matrix, pbc),
                                      args.repeats, device, args.budget)
                except Exception as exc:  # a comparison only: record why it did not run
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        summary = {k: v["min_ms"] for k, v in row.items() if isinstance(v, dict) and "median_ms" in v}
        print(f"N={n:6d} pairs={row['pairs']:7d} min " + " ".join(f"{k}={v:.2f}ms" for k, v in summary.items()), flush=True)

    result = torch_result("neighbour search, time per call (ms)", device, args.threads, rows, cutoff_nm=args.cutoff)
    write_json(args.out or RESULTS / f"neighbors_{device.type}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
