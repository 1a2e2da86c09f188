"""MD speed: all-atom vs CG (CGNNForce) in ms/step and simulated ns/day, and where the CG step's time goes.

For each number of ion pairs (formula units of the mapping's residues), in one process on one
OpenMM platform:
- AA: the CL&P System of ``openmm_cgnn.aa`` with its production settings (PME, X-H constraints,
  LangevinMiddle 2 fs, 1/ps, the cutoff ``run_aa`` picks for that box size), box compressed to
  ``--density`` and minimised;
- CG: the model through ``CGNNForce`` at the largest stable CG time step (``largest_stable_dt_fs``
  of a CG run's summary.json given with ``--cg-summary``, else measured by ``stability_check``,
  the runner's NVE energy-conservation test, at the smallest size), from a packed start that
  ``CGRun`` minimised and thermalised.
Blocks of AA and CG steps alternate; the fastest block counts. Reported: ms/step, ns/day and the
CG/AA ns/day ratio; with ``--evaluation REPORTDIR/metrics.json`` also the effective sampling
speed-up (ns/day ratio x D_CG/D_AA at the same temperature).

Scaling (``--scaling-beads``): the thermalised CG start replicated periodically to each bead count;
per size the neighbour search alone, the bare PyTorch forward+backward of the same scripted module
that the TorchForce holds, and the OpenMM step; OpenMM overhead = step - bare call.

``--size quick|reference`` swaps in a freshly initialised network of that size (same mapping,
prior, cutoffs and pair capacity; its read-out is zeroed so the dynamics stay sane): weights do not
change the cost. Writes benchmarks/results/md_<platform>.json.

    python benchmarks/bench_md.py --model runs/bmim_quick/model [--pairs 32 100 300] [--platform CPU]
    python benchmarks/bench_md.py --model MODELDIR --platform CUDA --pairs 300 1000 3000 \
        --scaling-beads 1500 5000 15000 50000 150000 --size reference
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import RESULTS, best_of_blocks, machine_info, pin_threads, step_block, synchronize, timed, write_json

FS_PER_NS = 1e6
MS_PER_DAY = 86_400_000.0


def ns_per_day(dt_fs: float, ms_per_step: float) -> float:
    return dt_fs / FS_PER_NS * MS_PER_DAY / ms_per_step


# -- the model under test -------------------------------------------------------------------------


def fresh_model_dir(model_dir: Path, size: str, out: Path) -> Path:
    """A model directory with the saved model's mapping, prior and settings but a new network of ``size``.

    The last read-out layer is zeroed: the arithmetic (and so the cost) is that of the full
    network, while the forces are the prior's, which keeps a random network from blowing the
    timed dynamics up.
    """
    from openmm_cgnn.model import CGModel, HybridGraphConfig, load_model, save_checkpoint

    saved = load_model(model_dir)
    keep = {k: v for k, v in saved.config.to_dict().items()
            if k not in ("features", "filters", "n_gaussians", "intra_blocks", "inter_blocks", "n_bead_types")}
    make = HybridGraphConfig.quick if size == "quick" else HybridGraphConfig.reference
    torch.manual_seed(0)
    model = CGModel(make(saved.config.n_bead_types, **keep), saved.prior)
    with torch.no_grad():
        model.net.readout[-1].weight.zero_()
        model.net.readout[-1].bias.zero_()
    save_checkpoint(out, model.eval(), epoch=0)
    shutil.copy(model_dir / "mapping.json", out / "mapping.json")
    return out


# -- all-atom -------------------------------------------------------------------------------------


def compress_to_density(topology: Any, positions: np.ndarray, edge: float, density: float) -> tuple[np.ndarray, float]:
    """Move whole molecules (by their centres) into the cube of ``density``; returns positions and edge."""
    from openmm_cgnn.units import cube_edge_nm

    masses = np.array([a.element.mass._value for a in topology.atoms()])
    new_edge = cube_edge_nm(masses.sum(), density)
    positions = positions.copy()
    for residue in topology.residues():
        atoms = [a.index for a in residue.atoms()]
        centre = masses[atoms] @ positions[atoms] / masses[atoms].sum()
        positions[atoms] += centre * (new_edge / edge - 1.0)
    return positions, new_edge


def aa_context(composition: dict[str, int], density: float, temperature: float, platform: Any, properties: dict,
               seed: int, cutoff_nm: float | None, minimize_iterations: int,
               forcefield_dir: Path | None = None) -> tuple[Any, dict]:
    """A ready-to-step AA Context for ``composition`` at ``density`` (production settings of ``run_aa``).

    ``forcefield_dir``: converted CL&P data (default: the package's, [BMIM][BF4])."""
    import openmm

    from openmm_cgnn.aa import build_system, load_forcefield
    from openmm_cgnn.aa.builder import build_box_auto
    from openmm_cgnn.units import cube_edge_nm
    from openmm_cgnn.aa.run import auto_cutoff_nm

    ff = load_forcefield(forcefield_dir)
    missing = [r for r in composition if r not in ff.residues]
    if missing:
        raise SystemExit(f"the mapping's residues {missing} are not in the all-atom force field ({list(ff.residues)})")
    topology, positions, start_density = build_box_auto(ff, composition, seed=seed)
    total_mass = sum(a.element.mass._value for a in topology.atoms())
    start_edge = cube_edge_nm(total_mass, start_density)
    cutoff = cutoff_nm if cutoff_nm is not None else auto_cutoff_nm(start_edge)  # what run_aa picks
    positions, edge = compress_to_density(topology, positions, start_edge, density)
    if cutoff > edge / 2:
        raise SystemExit(f"AA cutoff {cutoff} nm exceeds half the box ({edge:.3f} nm) at {sum(composition.values())} molecules")
    topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in np.eye(3) * edge] * openmm.unit.nanometer)
    system = build_system(topology, ff, cutoff_nm=cutoff)
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, 0.002)  # run_aa: 1/ps, 2 fs
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, platform, properties)
    context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * edge))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, minimize_iterations)
    context.setVelocitiesToTemperature(temperature, seed + 1)
    info = {"atoms": system.getNumParticles(), "constraints": system.getNumConstraints(), "box_nm": edge,
            "cutoff_nm": cutoff, "cutoff_rule": "given" if cutoff_nm is not None else "run_aa auto_cutoff_nm(start box)",
            "nonbonded": "PME (ewald tolerance 5e-4) + LJ geometric CustomNonbondedForce with LRC",
            "integrator": "LangevinMiddleIntegrator 1/ps", "dt_fs": 2.0, "start_density_kg_m3": start_density}
    return context, info


# -- CG -------------------------------------------------------------------------------------------


def cg_thermal_start(model_dir: Path, mapping: Any, pairs: int, density: float, temperature: float, platform: str,
                     dt_fs: float | None, thermalize_steps: int, seed: int, work: Path, **run_options: Any) -> tuple[Any, dict]:
    """Packed start minimised and thermalised by ``CGRun`` (0 production steps); with ``dt_fs=None`` the
    runner's stability check picks the time step (``run_options``: more ``RunConfig`` fields, e.g.
    ``stability_steps``). Returns the CGConfiguration at frame 0 and the run summary."""
    from openmm_cgnn.openmm import CGNNForce, CGConfiguration, composition_for_pairs
    from openmm_cgnn.openmm.prior_forces import bond_lengths, load_prior
    from openmm_cgnn.openmm.simulation import CGRun, RunConfig

    prior_path = model_dir / "prior.json"
    bonds = bond_lengths(load_prior(prior_path, mapping.bead_type_names)) if prior_path.exists() else None
    cg = CGConfiguration.packed(mapping, composition_for_pairs(mapping, pairs), density, seed=seed, bond_lengths=bonds)
    out = work / f"cg_{pairs}"
    config = RunConfig(temperature_K=temperature, steps=0, dt_fs=dt_fs, platform=platform, seed=seed,
                       thermalize_steps=thermalize_steps, progress=False, **run_options)
    result = CGRun(CGNNForce(model_dir, cg, temperature), cg, out, config, overwrite=True,
                   log=lambda message: print(f"  [cg {pairs} pairs] {message}", flush=True)).run()
    return CGConfiguration.from_run(mapping, out, frame=0), result.summary


def contender(value: str) -> str:
    """A ``--carrier`` value: ENGINE[/PRIOR][@PLATFORM] (the CG side's own OpenMM platform)."""
    engine, _, prior = value.partition("@")[0].partition("/")
    if engine not in ("auto", "torch", "python") or prior not in ("", "auto", "openmm", "model"):
        raise argparse.ArgumentTypeError(f"{value!r}: want ENGINE[/PRIOR][@PLATFORM], ENGINE auto|torch|python, "
                                         "PRIOR auto|openmm|model")
    return value


def cg_context(source: Path, cg: Any, temperature: float, dt_fs: float, platform: Any, properties: dict, prior: str,
               seed: int, skin: float | None, carrier: str = "auto") -> tuple[Any, Any, dict]:
    import openmm

    from openmm_cgnn.openmm import CGNNForce

    options = {} if skin is None else {"neighbor_skin_nm": skin}
    cgnn = CGNNForce(source, cg, temperature, prior=prior, engine=carrier, **options)
    system = cg.system()
    cgnn.add_to(system, platform)
    if platform.getName() == "CUDA":
        cgnn.tune_cuda_graphs(system, cg.positions, platform, properties)
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, dt_fs * 1e-3)  # RunConfig default friction
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, platform, properties)
    context.setPositions(cg.positions)
    context.setVelocitiesToTemperature(temperature, seed + 1)
    info = {"beads": cg.n_beads, "box_nm": np.diag(cg.box).tolist(), "dt_fs": dt_fs, "prior_carrier": cgnn.prior_carrier,
            "neighbor_backend": getattr(cgnn.module, "neighbor_backend", None),
            "neighbor_skin_nm": getattr(cgnn.module, "neighbor_skin_nm", None),
            "pair_capacity": getattr(cgnn.module, "capacity", None), "cuda_graphs": cgnn.cuda_graphs_report,
            "carrier_requested": carrier}
    return context, cgnn, info


def block_steps(context: Any, block_s: float, warmup: int) -> int:
    """Warm up, then the number of steps that fills about ``block_s`` seconds."""
    step_block(context, warmup)  # TorchScript profiling runs, allocations, CUDA graph capture
    ms = step_block(context, 2)
    return max(3, int(block_s * 1e3 / ms))


def md_row(source: Path, cg: Any, temperature: float, dt_fs: float, density: float, platform: Any, properties: dict,
           args: argparse.Namespace) -> dict[str, Any]:
    """AA and CG of the same composition in one process: alternating timed blocks, ms/step, ns/day, ratio.

    ``args`` carries the timing settings (``block_seconds``, ``warmup_steps``, ``blocks``) and
    ``seed``, ``aa_cutoff_nm``, ``aa_minimize_iterations``, ``prior``, ``skin`` and optionally ``carrier``
    (a list of CGNNForce engines, each timed side by side with AA; the first is the row's "cg").
    """
    composition = cg.composition()
    aa, aa_info = aa_context(composition, density, temperature, platform, properties, args.seed,
                             args.aa_cutoff_nm, args.aa_minimize_iterations, resolve_forcefield_dir(args))
    aa_steps = block_steps(aa, args.block_seconds, args.warmup_steps)
    blocks, cg_rows = {"aa": lambda c=aa: step_block(c, aa_steps)}, {}
    carriers = list(getattr(args, "carrier", None) or ["auto"])  # gpu_suite's namespace has none: the default
    for carrier in carriers:  # every carrier asked for, timed side by side with AA
        # "torch/model": the engine and, optionally, its own prior carrier; "@Reference": its own platform
        choice, _, platform_name = carrier.partition("@")
        engine, _, prior = choice.partition("/")
        cg_platform, cg_properties = platform, properties
        if platform_name:
            from openmm_cgnn.openmm.simulation import choose_platform
            from openmm_cgnn.platforms import platform_properties

            cg_platform = choose_platform(platform_name)
            cg_properties = platform_properties(cg_platform, threads=args.threads)
        context, cgnn, cg_info = cg_context(source, cg, temperature, dt_fs, cg_platform, cg_properties,
                                            prior or args.prior, args.seed, args.skin, engine)
        cg_info["platform"] = cg_platform.getName()
        started = time.perf_counter()
        cg_steps = block_steps(context, args.block_seconds, args.warmup_steps)  # a compiling carrier compiles here
        cg_rows[carrier] = {**cg_info, "steps_per_block": cg_steps, "carrier": cgnn.engine_report(),
                            "warmup_and_compile_s": time.perf_counter() - started}
        blocks[f"cg:{carrier}"] = lambda c=context, n=cg_steps: step_block(c, n)
    times = best_of_blocks(blocks, args.blocks)
    aa_row = {**aa_info, **times["aa"], "steps_per_block": aa_steps, "ns_per_day": ns_per_day(2.0, times["aa"]["ms_per_step"])}
    for carrier, row in cg_rows.items():
        row.update(times[f"cg:{carrier}"], ns_per_day=ns_per_day(dt_fs, times[f"cg:{carrier}"]["ms_per_step"]))
        row["ratio_ns_per_day_cg_over_aa"] = row["ns_per_day"] / aa_row["ns_per_day"]
    cg_row = cg_rows[carriers[0]]
    return {"pairs": sum(composition.values()) // len(composition), "composition": composition, "aa": aa_row, "cg": cg_row,
            "cg_by_carrier": cg_rows,
            "ratio_ns_per_day_cg_over_aa": cg_row["ns_per_day"] / aa_row["ns_per_day"],
            "ratio_ms_per_step_aa_over_cg": aa_row["ms_per_step"] / cg_row["ms_per_step"],
            "load_average_1min": machine_info()["load_average_1_5_15min"][0]}


# -- effective speed-up ---------------------------------------------------------------------------


def effective_speedup(metrics_path: Path, temperature: float, ratios: dict[int, float]) -> dict[str, Any]:
    """ns/day ratio x D_CG/D_AA per species at the benchmark temperature (from an evaluation report)."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--evaluation {metrics_path}: cannot read ({exc})") from None
    d_ratio = metrics.get("d_ratio_cg_aa")
    if not isinstance(d_ratio, dict):
        raise SystemExit(f"--evaluation {metrics_path}: no 'd_ratio_cg_aa' (is it an openmm-cgnn evaluate metrics.json?)")
    out: dict[str, Any] = {"source": str(metrics_path), "temperature_K": temperature, "species": {}}
    for species, by_t in d_ratio.items():
        match = next((t for t in by_t if abs(float(t) - temperature) <= 0.5), None)
        if match is None:
            out["species"][species] = {"status": f"no evaluation at {temperature:g} K (has {sorted(by_t)})"}
            continue
        d = by_t[match].get("ratio")
        if d is None:
            out["species"][species] = {"status": "D ratio not available (diffusion not converged)", "evaluation": by_t[match]}
            continue
        out["species"][species] = {"d_ratio_cg_aa": d, "d_ratio_error": by_t[match].get("error"),
                                   "speedup_by_pairs": {str(p): r * d for p, r in ratios.items()}}
    return out


# -- scaling --------------------------------------------------------------------------------------


def near_cubic_factors(k: int) -> tuple[int, int, int]:
    """(a, b, c) with a*b*c == k, as close to a cube as possible."""
    best = (k, 1, 1)
    for a in range(1, k + 1):
        for b in range(1, k // a + 1):
            if k % (a * b) == 0:
                c = k // (a * b)
                if max(a, b, c) - min(a, b, c) < max(best) - min(best):
                    best = (a, b, c)
    return best


def replicate(cg: Any, factors: tuple[int, int, int]) -> Any:
    """The CG system tiled ``factors`` times along the (orthorhombic) box vectors, molecules whole."""
    from openmm_cgnn.openmm import CGConfiguration

    copies = [cg.positions + np.array([i, j, k]) @ cg.box
              for i in range(factors[0]) for j in range(factors[1]) for k in range(factors[2])]
    box = cg.box * np.array(factors)[:, None]
    return CGConfiguration.from_molecules(cg.mapping, cg.molecule_residues * len(copies), np.concatenate(copies), box)


def record_frames(context: Any, steps: int) -> list[np.ndarray]:
    """Positions after each of ``steps`` MD steps (a short stretch of the real trajectory)."""
    frames = []
    for _ in range(steps):
        context.getIntegrator().step(1)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True)._value)
    return frames


def scaling_point(source: Path, cg: Any, temperature: float, dt_fs: float, platform: Any, properties: dict, prior: str,
                  args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """OpenMM step vs the bare PyTorch forward+backward of the same module on the same trajectory."""
    # the bare replay below needs TorchForce's module: the scaling runs on the torch carrier
    context, cgnn, info = cg_context(source, cg, temperature, dt_fs, platform, properties, prior, seed, args.skin, "torch")
    steps = block_steps(context, args.block_seconds, args.warmup_steps)
    openmm_step = best_of_blocks({"step": lambda c=context: step_block(c, steps)}, args.blocks)["step"]
    frames = record_frames(context, args.replay_steps)
    del context
    # The TorchForce holds its own copy of the module; this one can move to the torch device.
    device = torch.device("cuda" if platform.getName() in ("CUDA", "OpenCL") and torch.cuda.is_available() else "cpu")
    graphs = bool((cgnn.cuda_graphs_report or {}).get("use_cuda_graphs"))
    # With CUDA graphs the TorchForce runs the variant scripted without host checks: time that one.
    module = ((cgnn.graph_safe_module() if graphs else None) or cgnn.module).to(device)
    # openmm-torch hands float64 positions to the module on the Reference/CPU platforms, float32 on GPUs (mixed).
    position_dtype = torch.float64 if device.type == "cpu" else torch.float32
    positions = [torch.as_tensor(f, dtype=position_dtype, device=device) for f in frames]
    box = torch.as_tensor(cg.box, dtype=position_dtype, device=device)

    def replay() -> float:
        """ms per call over the recorded steps in order, so a reused pair list is rebuilt as often as in
        the MD; the order flips each time, so a replay never starts with a jump back in time."""
        synchronize(device)
        start = time.perf_counter()
        for position in positions:
            leaf = position.detach().requires_grad_(True)
            module(leaf, box).backward()
        synchronize(device)
        positions.reverse()
        return 1e3 * (time.perf_counter() - start) / len(positions)

    replay()  # warm-up (TorchScript profiling runs)
    search = module.energy.neighbors
    counters = None
    if hasattr(search, "rebuilds"):
        before = (int(search.calls), int(search.rebuilds))
    bare = [replay() for _ in range(args.blocks)]
    model_dtype = module.inverse_temperature.dtype
    batch_positions = positions[-1].to(model_dtype).unsqueeze(0)
    batch_box = box.to(model_dtype).unsqueeze(0)

    def search_ms(function: Any) -> float:
        return timed(lambda: function(batch_positions, batch_box, module.molecule_index), args.calls, device,
                     args.budget_s)["min_ms"]

    bare_ms = min(bare)
    row = {**info, "openmm_step_ms": openmm_step["ms_per_step"], "openmm_step_blocks_ms": openmm_step["ms_per_step_blocks"],
           "steps_per_block": steps, "bare_forward_backward_ms": bare_ms, "bare_replay_blocks_ms": bare,
           "bare_replay_steps": len(positions), "bare_position_dtype": str(position_dtype).replace("torch.", ""),
           "bare_module": "scripted without host checks (as under CUDA graphs)" if graphs else "the TorchForce's module",
           "openmm_overhead_ms": openmm_step["ms_per_step"] - bare_ms}
    if hasattr(search, "rebuilds"):
        calls, rebuilds = int(search.calls) - before[0], int(search.rebuilds) - before[1]
        fraction = rebuilds / max(calls, 1)
        reuse_ms = search_ms(search)  # the list exists and holds: select the pairs within the cutoff
        rebuild_ms = search_ms(search.inner)
        row["pair_list_reuse"] = {"calls": calls, "rebuilds": rebuilds, "rebuild_fraction": fraction,
                                  "select_ms": reuse_ms, "rebuild_search_ms": rebuild_ms}
        row["neighbor_search_ms"] = reuse_ms + fraction * rebuild_ms  # per call, amortised
        row["fresh_neighbor_search_ms"] = search_ms(search.fallback)
    else:
        row["pair_list_reuse"] = counters
        row["neighbor_search_ms"] = row["fresh_neighbor_search_ms"] = search_ms(search)
    row["model_forward_backward_ms"] = bare_ms - row["neighbor_search_ms"]
    return row


def markdown_tables(result: dict[str, Any]) -> str:
    """The MD and scaling results as Markdown tables (for the READMEs)."""
    lines = ["| ion pairs | AA atoms | AA ms/step | AA ns/day | CG beads | CG dt (fs) | CG ms/step | CG ns/day "
             "| CG/AA ns/day |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["md"]:
        aa = row["aa"]
        for carrier, cg in row.get("cg_by_carrier", {"": row["cg"]}).items():
            lines.append(f"| {row['pairs']} | {aa['atoms']} | {aa['ms_per_step']:.1f} | {aa['ns_per_day']:.3g} | {cg['beads']} | "
                         f"{cg['dt_fs']:g} {carrier} | {cg['ms_per_step']:.1f} | {cg['ns_per_day']:.3g} | "
                         f"{cg['ns_per_day'] / aa['ns_per_day']:.1f}x |")
    if result["scaling"]:
        lines += ["", "| CG beads | search | OpenMM step (ms) | bare fwd+bwd | neighbour search (amortised) "
                      "| model fwd+bwd | OpenMM overhead | fresh search | list rebuilt |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in result["scaling"]:
            reuse = row.get("pair_list_reuse")
            rebuilt = f"{reuse['rebuilds']}/{reuse['calls']} calls" if reuse else "every call"
            lines.append(f"| {row['beads']} | {row['neighbor_backend']} | {row['openmm_step_ms']:.1f} | "
                         f"{row['bare_forward_backward_ms']:.1f} | {row['neighbor_search_ms']:.1f} | "
                         f"{row['model_forward_backward_ms']:.1f} | {row['openmm_overhead_ms']:.1f} | "
                         f"{row['fresh_neighbor_search_ms']:.1f} | {rebuilt} |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def resolve_density(args: argparse.Namespace) -> tuple[float, str]:
    if args.density is not None:
        return args.density, "--density"
    if args.aa_run is not None:
        summary = args.aa_run / "summary.json"
        try:
            data = json.loads(summary.read_text())
            return float(data["density_kg_m3"]), f"{summary} density_kg_m3"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"--aa-run {summary}: no density_kg_m3 ({exc})") from None
    raise SystemExit("give --density KG_M3 or --aa-run DIR (an all-atom run whose summary.json has the density)")


def resolve_forcefield_dir(args: argparse.Namespace) -> Path | None:
    """--forcefield-dir, else the one --aa-run was made with (its frames' metadata), else the package's."""
    if args.forcefield_dir is not None or args.aa_run is None:
        return args.forcefield_dir
    from openmm_cgnn.frames import read_frames

    directory = read_frames(args.aa_run, stop=1).metadata.get("forcefield_dir")
    return Path(directory) if directory else None


def resolve_dt(args: argparse.Namespace) -> tuple[float | None, str]:
    if args.cg_dt_fs is not None:
        return args.cg_dt_fs, "--cg-dt-fs"
    if args.cg_summary is not None:
        try:
            summary = json.loads(args.cg_summary.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--cg-summary {args.cg_summary}: cannot read ({exc})") from None
        dt = summary.get("largest_stable_dt_fs")
        if dt is not None:
            return float(dt), f"{args.cg_summary} largest_stable_dt_fs"
        print(f"{args.cg_summary}: no largest_stable_dt_fs (the run's step was given by hand); measuring it", flush=True)
    return None, "stability_check"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="trained model directory (checkpoint.pt, mapping.json, prior.json)")
    parser.add_argument("--size", choices=["saved", "quick", "reference"], default="saved",
                        help="network timed: the saved one, or a fresh one of that size (same mapping/prior)")
    parser.add_argument("--pairs", type=int, nargs="+", default=None, help="ion pairs (default 32 100 300; on CUDA also 1000 3000)")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default CUDA when present, else CPU)")
    parser.add_argument("--temperature", type=float, default=None, help="K (default: --cg-summary's, else 400)")
    parser.add_argument("--density", type=float, default=None, help="kg/m3 for both AA and CG boxes")
    parser.add_argument("--aa-run", type=Path, default=None, help="AA run directory: its density (if --density is not given)")
    parser.add_argument("--forcefield-dir", type=Path, default=None,
                        help="converted CL&P data for the AA side (default: --aa-run's, else the package's)")
    parser.add_argument("--aa-cutoff-nm", type=float, default=None, help="AA cutoff (default: what run_aa picks per size)")
    parser.add_argument("--cg-summary", type=Path, default=None, help="summary.json of a CG run: largest_stable_dt_fs")
    parser.add_argument("--cg-dt-fs", type=float, default=None, help="CG time step (overrides --cg-summary and the check)")
    parser.add_argument("--prior", default="auto", choices=["auto", "openmm", "model"], help="prior carrier (CGNNForce)")
    parser.add_argument("--carrier", nargs="+", default=["auto"], type=contender, metavar="ENGINE[/PRIOR]",
                        help="what runs the network (CGNNForce engine: auto, torch = TorchForce or python = PythonForce "
                             "+ torch.compile), optionally with its own prior carrier (e.g. torch/model, the path before "
                             "issue 17, beside auto/openmm) and its own OpenMM platform (python/model@Reference); "
                             "several are timed side by side, the first is the row's 'cg'")
    parser.add_argument("--skin", type=float, default=None,
                        help="pair-list skin, nm (default: the package's; 0: fresh search every step)")
    parser.add_argument("--evaluation", type=Path, default=None, help="REPORTDIR/metrics.json for the D_CG/D_AA ratio")
    parser.add_argument("--scaling-beads", type=int, nargs="*", default=None,
                        help="bead counts for the scaling part (default 500 1500 5000; CUDA 1500 ... 150000; none: skip)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenMM (default 1)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per contender (fastest counts)")
    parser.add_argument("--block-seconds", type=float, default=2.0, help="target length of one timed block")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls of the fresh neighbour search per scaling point")
    parser.add_argument("--replay-steps", type=int, default=20,
                        help="MD steps recorded per scaling point and replayed through the bare module")
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds at most per bare-call measurement")
    parser.add_argument("--thermalize-steps", type=int, default=300, help="CG thermalisation steps before timing")
    parser.add_argument("--aa-minimize-iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/md_<platform>.json)")
    args = parser.parse_args()
    faulthandler.enable()  # a crash inside OpenMM or libtorch still says where

    threads = pin_threads(args.threads)
    load_before = machine_info()["load_average_1_5_15min"]
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.openmm.simulation import choose_platform
    from openmm_cgnn.platforms import platform_properties, versions

    model_dir = args.model
    if not (model_dir / "checkpoint.pt").is_file() or not (model_dir / "mapping.json").is_file():
        raise SystemExit(f"--model {model_dir}: not a model directory (needs checkpoint.pt and mapping.json)")
    mapping = CGMapping.load(model_dir / "mapping.json")
    platform = choose_platform(args.platform)
    name = platform.getName()
    properties = platform_properties(platform, threads=args.threads)
    gpu = name in ("CUDA", "OpenCL", "HIP")
    pairs_list = args.pairs or ([32, 100, 300, 1000, 3000] if gpu else [32, 100, 300])
    scaling_beads = args.scaling_beads if args.scaling_beads is not None else (
        [1500, 5000, 15000, 50000, 150000] if gpu else [500, 1500, 5000])
    density, density_source = resolve_density(args)
    dt_fs, dt_source = resolve_dt(args)
    temperature = args.temperature
    if temperature is None and args.cg_summary is not None:
        temperature = json.loads(args.cg_summary.read_text()).get("temperature_K")
    temperature = float(temperature or 400.0)
    print(f"platform {name} {properties}, {threads['torch_threads']} thread(s), T {temperature:g} K, "
          f"density {density:.1f} kg/m3, pairs {pairs_list}, model {model_dir} ({args.size})", flush=True)

    md_rows: list[dict[str, Any]] = []
    scaling_rows: list[dict[str, Any]] = []
    stability = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_md_") as tmp:
        work = Path(tmp)
        source = model_dir if args.size == "saved" else fresh_model_dir(model_dir, args.size, work / f"model_{args.size}")
        starts: dict[int, Any] = {}
        for pairs in sorted(pairs_list):
            # The saved (trained) model prepares the start and, once, the time step: a fresh
            # network's forces say nothing about stability.
            cg, summary = cg_thermal_start(model_dir, mapping, pairs, density, temperature, name, dt_fs,
                                           args.thermalize_steps, args.seed, work)
            if dt_fs is None:
                dt_fs = float(summary["largest_stable_dt_fs"])
                stability = {"pairs": pairs, "beads": cg.n_beads, "dt_stability": summary.get("dt_stability"),
                             "candidates_fs": summary.get("dt_candidates_fs")}
                dt_source = f"stability_check at {pairs} pairs (saved model)"
            starts[pairs] = cg
            row = md_row(source, cg, temperature, dt_fs, density, platform, properties, args)
            md_rows.append(row)
            aa_row, cg_row = row["aa"], row["cg"]
            print(f"{pairs:5d} pairs: AA {aa_row['atoms']} atoms {aa_row['ms_per_step']:.2f} ms/step "
                  f"{aa_row['ns_per_day']:.3g} ns/day | CG {cg_row['beads']} beads {cg_row['ms_per_step']:.2f} ms/step "
                  f"at {dt_fs:g} fs {cg_row['ns_per_day']:.3g} ns/day | CG/AA {row['ratio_ns_per_day_cg_over_aa']:.2f}x",
                  flush=True)

        for target in scaling_beads:
            base_pairs = max((p for p in starts if starts[p].n_beads <= target), default=min(starts))
            base = starts[base_pairs]
            factors = near_cubic_factors(max(1, round(target / base.n_beads)))
            cg = replicate(base, factors)
            row = {"target_beads": target, "base_pairs": base_pairs, "replicas": list(factors),
                   **scaling_point(source, cg, temperature, dt_fs, platform, properties, args.prior, args, args.seed)}
            row["load_average_1min"] = machine_info()["load_average_1_5_15min"][0]
            scaling_rows.append(row)
            reuse = row["pair_list_reuse"]
            print(f"scaling {row['beads']:7d} beads ({row['neighbor_backend']}, skin {row['neighbor_skin_nm']}): step "
                  f"{row['openmm_step_ms']:.2f} ms = bare {row['bare_forward_backward_ms']:.2f} (search "
                  f"{row['neighbor_search_ms']:.2f} + model {row['model_forward_backward_ms']:.2f}) + OpenMM "
                  f"{row['openmm_overhead_ms']:.2f} ms; a fresh search {row['fresh_neighbor_search_ms']:.2f} ms"
                  + (f", list rebuilt at {reuse['rebuilds']}/{reuse['calls']} calls" if reuse else ""), flush=True)

    ratios = {row["pairs"]: row["ratio_ns_per_day_cg_over_aa"] for row in md_rows}
    result = {
        "benchmark": "MD speed: all-atom vs CG (CGNNForce), ms/step and ns/day; CG step scaling and breakdown",
        "platform": name,
        "platform_properties": properties,
        "threads": threads,
        "machine": machine_info(),
        "load_average_at_start": load_before,
        "versions": versions(),
        "settings": {
            "model_dir": str(model_dir), "size": args.size,
            "size_note": ("the saved, trained network" if args.size == "saved" else
                          f"a freshly initialised {args.size} network (read-out zeroed) with the saved mapping, prior, "
                          "cutoffs and pair capacity: weights do not change the cost"),
            "temperature_K": temperature, "density_kg_m3": density, "density_source": density_source,
            "cg_dt_fs": dt_fs, "cg_dt_source": dt_source, "cg_friction_per_ps": 1.0,
            "cg_integrator": "LangevinMiddleIntegrator", "prior_carrier_requested": args.prior,
            "carriers": args.carrier, "torchinductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
            "cg_start": f"CGConfiguration.packed at the density, minimised and thermalised by CGRun ({args.thermalize_steps} steps)",
            "aa_start": "build_box_auto, molecules moved to the density, minimised "
                        f"({args.aa_minimize_iterations} iterations), velocities at T",
            "timing": f"{args.blocks} alternating blocks of ~{args.block_seconds:g} s each for AA and CG after "
                      f"{args.warmup_steps} warm-up steps; fastest block counts; ns/day = dt / ms per step",
            "scaling": "thermalised CG start replicated periodically; bare forward+backward: the module the TorchForce "
                       f"holds, replayed over {args.replay_steps} recorded MD steps (fastest of {args.blocks} replays, per "
                       f"call); fresh neighbour search: fastest of {args.calls} calls",
            "neighbor_skin_nm": args.skin if args.skin is not None else "package default",
            "pairs": pairs_list, "scaling_beads": scaling_beads, "seed": args.seed,
            "command": " ".join(sys.argv),
        },
        "cg_dt_stability": stability,
        "md": md_rows,
        "effective_speedup": (effective_speedup(args.evaluation, temperature, ratios) if args.evaluation else
                              {"status": "no --evaluation metrics.json given"}),
        "scaling": scaling_rows,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(args.out or RESULTS / f"md_{name.lower()}.json", result)
    print(markdown_tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
