"""The CUDA suite: everything the CUDA issue measures on a lent GPU, in one command, each step in its own process.

    python benchmarks/gpu_suite.py prepare                      # here (CPU, pinned stack): benchmarks/gpu_reference/
    python benchmarks/gpu_suite.py run --results DIR            # on the GPU machine, after `source .whl/env.sh`
    python benchmarks/gpu_suite.py run --dry-run --results DIR  # CPU, tiny sizes: every step's code path
    python benchmarks/gpu_suite.py table --results DIR          # the README table from the step files

Steps (``run`` starts ``gpu_suite.py step NAME`` for each, under its own time limit and the
suite's overall budget; a step writes ``gpu_<step>_<tag>.json`` (tag ``cuda``, or ``dry``) as soon
as it has something, with ``status`` "partial" until it finishes, so a slow step loses nothing
the others measured):

- ``agreement``: CGNNForce energies and forces on the platform (mixed and double precision, CUDA
  graphs on and off, prior inside the model and as native forces) against the Reference-platform
  values in ``gpu_reference/reference.npz``. Those are computed here by ``prepare``: on the GPU
  machine openmm-torch's Reference and CPU kernels do not load (its torch is another build).
- ``cg_step``: ms per CG step at 300 ion pairs (1500 beads): graphs off/on x prior in the model /
  native OpenMM forces x quick / reference network.
- ``scaling``: the CG step from 1.5k to 15k to 150k beads, split into neighbour search, model
  forward+backward and OpenMM overhead (``bench_md.scaling_point``).
- ``aa_vs_cg``: all-atom against CG ns/day at 300 ion pairs in one process, the CG time step
  picked by the runner's NVE check (``bench_md.md_row``).
- ``training``: force-matching training frames/s at 1500 beads (``bench_training.measure``).
- ``chain``: every ``openmm-cgnn`` stage on the platform at 16 ion pairs (aa, map, train, export,
  simulate, evaluate); a stage that fails is recorded and the stages that do not need it still run.

The model is the committed ``gpu_reference/model`` (the [BMIM][BF4] residues of the package's
CL&P data, 4+1 beads, a prior from the residue geometry, a seeded untrained quick network): weights
do not change the cost, and the timed steps use it with the read-out zeroed (``bench_md.fresh_model_dir``)
so that the dynamics are the prior's and stay sane.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, best_of_blocks, machine_info, pin_threads, step_block  # noqa: E402

REFERENCE = HERE / "gpu_reference"
MIN_STEP_S = 10.0  # a step is not started with less of the suite's budget left
STEPS = ("agreement", "cg_step", "aa_vs_cg", "training", "chain", "scaling")
TEMPERATURE_K = 400.0
# The 400 K all-atom density of the quick example (results/md_cpu.json), for the AA and CG boxes alike.
DENSITY_KG_M3 = 1081.4
BEADS = {"BMIM": 4, "BF4": 1}  # beads per residue of the suite's mapping
AGREEMENT_CASES = {"pairs16": 16, "pairs300": 300}
# What is compared: (prior carrier, force groups). "network": the TorchForce alone (prior as native
# forces in another group), so that the prior's larger forces cannot hide an error of the network's.
AGREEMENT_TERMS = {"model": ("model", -1), "openmm": ("openmm", -1), "network": ("openmm", {0})}
# The untrained read-out is scaled up so that the network's forces are of the prior's size
# (about 0.5% of them at initialisation) and an error in them shows in the comparison.
READOUT_SCALE = 100.0
# What the agreement step calls agreeing: relative RMS force and relative energy differences
# (float32 network arithmetic lands near 1e-6; NaN never agrees).
FORCE_RTOL, ENERGY_RTOL = 1e-4, 1e-5

# Sizes and time limits (seconds) per mode. "gpu": the lent H200 (9 minutes in all); "dry": CPU,
# tiny, for the test that keeps the GPU minutes from finding bugs.
MODES: dict[str, dict[str, Any]] = {
    "gpu": {
        "platform": "CUDA", "device": "cuda", "tag": "cuda", "budget_s": 530.0, "threads": 4,
        "limits_s": {"agreement": 70, "cg_step": 100, "aa_vs_cg": 100, "training": 60, "chain": 150, "scaling": 160},
        "agreement": {"precisions": ["mixed", "double"]},
        "cg_step": {"pairs": 300, "sizes": ["quick", "reference"], "dt_fs": 4.0, "thermalize_steps": 200,
                    "block_seconds": 1.0, "blocks": 3, "warmup_steps": 20},
        "scaling": {"base_pairs": 300, "beads": [1500, 15000, 150000], "size": "quick", "dt_fs": 4.0,
                    "thermalize_steps": 200, "block_seconds": 1.0, "blocks": 2, "warmup_steps": 10, "replay_steps": 10,
                    "calls": 5, "budget_s": 10.0},
        "aa_vs_cg": {"pairs": 300, "sizes": ["quick", "reference"], "thermalize_steps": 300, "stability_steps": 300,
                     "block_seconds": 2.0, "blocks": 3, "warmup_steps": 20, "aa_minimize_iterations": 200},
        "training": {"beads": 1500, "configs": ["quick", "reference"], "batch_size": 8, "steps": 20, "budget_s": 12.0},
        "chain": {"pairs": 16, "temperatures": [400, 500], "equilibrate_ps": 4, "production_ps": 6, "save_every_ps": 0.1,
                  "cutoff_nm": 0.75, "map_epochs": 40, "map_restarts": 1, "train_epochs": 2, "max_frames": 60,
                  "cg_steps": 1000, "cg_save_every_steps": 20, "cg_dt_fs": None, "cg_minimize": True},
    },
}


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested dictionaries merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


# The dry mode: the GPU settings with tiny sizes and short blocks on the CPU platform.
MODES["dry"] = _merged(MODES["gpu"], {
    "platform": "CPU", "device": "cpu", "tag": "dry", "budget_s": 1200.0, "threads": 1,
    "limits_s": {"agreement": 200, "cg_step": 200, "aa_vs_cg": 200, "training": 100, "chain": 400, "scaling": 200},
    "cg_step": {"pairs": 16, "thermalize_steps": 10, "block_seconds": 0.05, "blocks": 1, "warmup_steps": 1},
    "scaling": {"base_pairs": 16, "beads": [80, 160], "thermalize_steps": 10, "block_seconds": 0.05, "blocks": 1,
                "warmup_steps": 1, "replay_steps": 2, "calls": 2, "budget_s": 2.0},
    "aa_vs_cg": {"pairs": 16, "sizes": ["quick"], "thermalize_steps": 10, "stability_steps": 20,
                 "dt_candidates_fs": (10.0, 4.0), "block_seconds": 0.05, "blocks": 1, "warmup_steps": 1,
                 "aa_minimize_iterations": 10},
    "training": {"beads": 80, "configs": ["quick"], "batch_size": 2, "steps": 1, "budget_s": 2.0},
    "chain": {"temperatures": [400], "equilibrate_ps": 0.1, "production_ps": 0.2, "save_every_ps": 0.02, "map_epochs": 5,
              "train_epochs": 1, "max_frames": 10, "cg_steps": 20, "cg_save_every_steps": 5, "cg_dt_fs": 4.0,
              "cg_minimize": False},
})


# -- the suite's model and reference values (``prepare``, here on CPU) -----------------------------


def suite_mapping() -> Any:
    """[BMIM][BF4] from the package's CL&P data: each residue's atoms, in template order, split into
    ``BEADS`` consecutive groups (a cost model, not a fitted mapping: the cost depends on the bead count)."""
    from openmm.app import PDBFile

    from openmm_cgnn.aa import load_forcefield
    from openmm_cgnn.mapping.spec import CGMapping

    ff = load_forcefield()
    residues = {}
    for name, n_beads in BEADS.items():
        res = ff.residues[name]
        pdb = PDBFile(str(res.pdb_path))
        mass = {a.name: a.element.mass._value for a in pdb.topology.atoms()}
        groups = np.array_split(np.array(res.atom_names), n_beads)
        residues[name] = {"atoms": list(res.atom_names),
                          "beads": [{"name": f"B{k}", "atoms": list(g), "mass": float(sum(mass[a] for a in g))}
                                    for k, g in enumerate(groups)],
                          "bead_bonds": [[k, k + 1] for k in range(n_beads - 1)]}
    return CGMapping.from_dict({"format": "openmm_cgnn.mapping/1", "residues": residues})


def suite_prior(mapping: Any) -> dict[str, Any]:
    """Excluded volume between all bead types, and bonds and angles at the bead centres of the residue geometry."""
    from openmm.app import PDBFile

    from openmm_cgnn.aa import load_forcefield

    ff = load_forcefield()
    types = mapping.bead_type_names
    bonds, angles = [], []
    for name, residue in mapping.residues.items():
        pdb = PDBFile(str(ff.residues[name].pdb_path))
        xyz = {a.name: np.array(pdb.positions[a.index]._value) for a in pdb.topology.atoms()}
        centres = [np.mean([xyz[a] for a in bead.atoms], axis=0) for bead in residue.beads]
        for i, j in residue.bead_bonds:
            bonds.append({"residue": name, "beads": [i, j], "r0_nm": float(np.linalg.norm(centres[j] - centres[i])),
                          "k_kj_mol_nm2": 5000.0})
        for i in range(len(residue.beads) - 2):
            a, b = centres[i] - centres[i + 1], centres[i + 2] - centres[i + 1]
            theta = float(np.arccos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))
            angles.append({"residue": name, "beads": [i, i + 1, i + 2], "theta0_rad": theta, "k_kj_mol_rad2": 80.0})
    return {"format": "openmm_cgnn.prior/1",
            "excluded_volume": {"exponent": 12, "cutoff_nm": 0.8, "epsilon_kj_mol": 2.5,
                                "sigma_nm": {"|".join(sorted((a, b))): 0.35 for a in types for b in types}},
            "bonds": bonds, "angles": angles}


def make_model(folder: Path) -> Path:
    """The suite's model directory: mapping, prior and a seeded, untrained quick network (read-out not zeroed)."""
    from openmm_cgnn.model import CGModel, HybridGraphConfig, PriorSet, save_checkpoint

    mapping = suite_mapping()
    types = mapping.bead_type_names
    torch.manual_seed(0)
    config = HybridGraphConfig.quick(len(types), bead_type_names=list(types), use_temperature=True)
    model = CGModel(config, PriorSet.from_dict(suite_prior(mapping), types)).eval()
    with torch.no_grad():
        model.net.readout[-1].weight.mul_(READOUT_SCALE)
        model.net.readout[-1].bias.mul_(READOUT_SCALE)
    save_checkpoint(folder, model, epoch=0)
    mapping.save(folder / "mapping.json")
    return folder


def packed(model_dir: Path, pairs: int, seed: int = 1) -> Any:
    """``pairs`` ion pairs packed at the suite density, molecules grown at the prior's bond lengths."""
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.openmm import CGConfiguration, composition_for_pairs
    from openmm_cgnn.openmm.prior_forces import bond_lengths, load_prior

    mapping = CGMapping.load(model_dir / "mapping.json")
    bonds = bond_lengths(load_prior(model_dir / "prior.json", mapping.bead_type_names))
    return CGConfiguration.packed(mapping, composition_for_pairs(mapping, pairs), DENSITY_KG_M3, seed=seed, bond_lengths=bonds)


def packed_minimized(model_dir: Path, pairs: int, seed: int = 1) -> Any:
    """A packed box of ``pairs`` ion pairs at the suite density, minimised with the model on the CPU platform."""
    import openmm

    from openmm_cgnn.openmm import CGNNForce

    cg = packed(model_dir, pairs, seed)
    system = cg.system()
    CGNNForce(model_dir, cg, TEMPERATURE_K, prior="openmm").add_to(system)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(cg.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    return cg.with_positions(context.getState(getPositions=True).getPositions(asNumpy=True)._value)


def suite_force(source: Path, cg: Any, prior: str, graphs: bool) -> Any:
    """CGNNForce for ``cg``; for CUDA graphs the module is scripted without host checks (graph
    capture cannot hold host reads)."""
    from openmm_cgnn.openmm import CGNNForce

    return CGNNForce(source, cg, TEMPERATURE_K, prior=prior, host_checks=not graphs)


def graph_system(cgnn: Any, cg: Any, graphs: bool) -> Any:
    """A System of ``cg`` with new forces of ``cgnn``, openmm-torch's ``useCUDAGraphs`` set as asked."""
    system = cg.system()
    cgnn.check_system(system)
    forces = cgnn.make_forces()
    forces[0].setProperty("useCUDAGraphs", "true" if graphs else "false")
    for force in forces:
        system.addForce(force)
    return system


def evaluate_forces(cgnn: Any, cg: Any, platform: Any, properties: dict[str, str], graphs: bool = False,
                    groups: Any = -1) -> tuple[float, np.ndarray]:
    """Potential energy (kJ/mol) and forces (kJ/mol/nm) of the force groups ``groups`` on ``platform``."""
    import openmm

    context = openmm.Context(graph_system(cgnn, cg, graphs), openmm.VerletIntegrator(0.001), platform, properties)
    context.setPositions(cg.positions)
    if graphs:
        context.getState(getForces=True, groups=groups)  # the first call captures the graph; the next one replays it
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return state.getPotentialEnergy()._value, np.asarray(state.getForces(asNumpy=True)._value)


def prepare(out: Path, model: Path | None, new_model: bool, cases: dict[str, int] = AGREEMENT_CASES) -> Path:
    """Reference energies and forces (Reference platform, pinned stack) for the agreement step."""
    import openmm

    from openmm_cgnn.platforms import versions

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if new_model or model is None and not (model_dir / "checkpoint.pt").is_file():
        make_model(model_dir)
    elif model is not None and model.resolve() != model_dir.resolve():
        shutil.copytree(model, model_dir, dirs_exist_ok=True)
    reference = openmm.Platform.getPlatformByName("Reference")
    arrays: dict[str, np.ndarray] = {}
    written: dict[str, Any] = {}
    for case, pairs in cases.items():
        cg = packed_minimized(model_dir, pairs)
        arrays[f"{case}/positions"], arrays[f"{case}/box"] = cg.positions, cg.box
        written[case] = {"pairs": pairs, "beads": cg.n_beads, "box_nm": float(cg.box[0, 0]), "energy_kj_mol": {},
                       "molecule_residues": cg.molecule_residues}
        for term, (carrier, groups) in AGREEMENT_TERMS.items():
            energy, forces = evaluate_forces(suite_force(model_dir, cg, carrier, False), cg, reference, {}, groups=groups)
            arrays[f"{case}/{term}/energy"], arrays[f"{case}/{term}/forces"] = np.array(energy), forces
            written[case]["energy_kj_mol"][term] = energy
            rms = float(np.sqrt(np.mean(forces ** 2)))
            print(f"reference {case} ({cg.n_beads} beads) {term}: {energy:.6f} kJ/mol, RMS force {rms:.4g} kJ/mol/nm",
                  flush=True)
    np.savez_compressed(out / "reference.npz", **arrays)
    meta = {"what": "CGNNForce energies and forces of gpu_reference/model on the Reference platform (host checks on): "
                    "model = prior inside the module, openmm = prior as native forces, network = the TorchForce alone",
            "temperature_K": TEMPERATURE_K, "density_kg_m3": DENSITY_KG_M3, "cases": written, "versions": versions(),
            "positions": "CGConfiguration.packed (seed 1), minimised on the CPU platform (200 iterations, prior as native forces)",
            "command": "python benchmarks/gpu_suite.py prepare"}
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'reference.npz'} and {out / 'reference.json'}", flush=True)
    return out


# -- helpers shared by the steps -------------------------------------------------------------------


class StepWriter:
    """Writes one step's JSON (atomically) every time a part of it is measured."""

    def __init__(self, path: Path, step: str, mode: str, settings: dict[str, Any], platform: str) -> None:
        from openmm_cgnn.platforms import versions

        self.path = path
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"step": step, "mode": mode, "status": "partial", "platform": platform,
                                     "settings": settings, "versions": versions(), "machine": machine_info(),
                                     "command": " ".join(sys.argv)}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["wall_seconds"] = time.perf_counter() - self.started
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def finish(self, **fields: Any) -> None:
        self.update(status="ok", **fields)
        print(f"wrote {self.path}", flush=True)


def timing_args(settings: dict[str, Any], **extra: Any) -> SimpleNamespace:
    """The namespace bench_md's helpers read their timing settings from."""
    fields = {"block_seconds": 1.0, "blocks": 2, "warmup_steps": 5, "seed": 1, "skin": None, "prior": "auto",
              "aa_cutoff_nm": None, "aa_minimize_iterations": 100, "replay_steps": 10, "calls": 5, "budget_s": 10.0,
              "aa_run": None, "forcefield_dir": None}  # bench_md.resolve_forcefield_dir: the package's CL&P data
    fields.update({k: v for k, v in settings.items() if k in fields})
    fields.update(extra)
    return SimpleNamespace(**fields)


def fresh(size: str, work: Path) -> Path:
    """The suite model with a fresh network of ``size`` and its read-out zeroed (``bench_md.fresh_model_dir``)."""
    from bench_md import fresh_model_dir

    return fresh_model_dir(REFERENCE_DIR / "model", size, work / f"model_{size}")


def thermal_start(model_dir: Path, pairs: int, platform: str, dt_fs: float | None, settings: dict[str, Any],
                  work: Path) -> tuple[Any, dict]:
    """The runner's start (``bench_md.cg_thermal_start``: CGRun minimises, thermalises and, with
    ``dt_fs=None``, picks the time step by its NVE check). Should the runner fail on this platform,
    a plain start instead, so that the timings still come: the failure goes into the summary."""
    import bench_md

    from openmm_cgnn.mapping.spec import CGMapping

    options = {k: settings[k] for k in ("stability_steps", "dt_candidates_fs") if k in settings}
    try:
        return bench_md.cg_thermal_start(model_dir, CGMapping.load(model_dir / "mapping.json"), pairs, DENSITY_KG_M3,
                                         TEMPERATURE_K, platform, dt_fs, settings["thermalize_steps"], 1, work, **options)
    except Exception as exc:  # noqa: BLE001 - reported, and the plain start below takes over
        error = _error(exc)
    print(f"  CGRun failed on {platform} ({error}); a plain start instead", flush=True)
    return plain_start(model_dir, pairs, platform, dt_fs, settings, error)


def plain_start(model_dir: Path, pairs: int, platform_name: str, dt_fs: float | None, settings: dict[str, Any],
                runner_error: str) -> tuple[Any, dict]:
    """Packed, minimised and thermalised in one Context; the time step from the runner's ``stability_check``."""
    import openmm

    from openmm_cgnn.openmm.simulation import DT_CANDIDATES_FS, stability_check
    from openmm_cgnn.platforms import get_platform, platform_properties

    platform = get_platform(platform_name)
    properties = platform_properties(platform, threads=torch.get_num_threads())
    cg = packed(model_dir, pairs)
    cgnn = suite_force(model_dir, cg, "auto", False)
    context = step_context(cgnn, cg, 1.0, platform, properties, False)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.getIntegrator().step(settings["thermalize_steps"])
    state = context.getState(getPositions=True, getVelocities=True)
    cg = cg.with_positions(state.getPositions(asNumpy=True)._value)
    summary: dict[str, Any] = {"runner_error": runner_error, "largest_stable_dt_fs": dt_fs}
    if dt_fs is None:
        dt, results = stability_check(graph_system(cgnn, cg, False), cg.positions, state.getVelocities(), platform,
                                      properties, tuple(settings.get("dt_candidates_fs", DT_CANDIDATES_FS)),
                                      settings.get("stability_steps", 300))
        summary.update(largest_stable_dt_fs=dt, dt_stability=[vars(r) for r in results])
    return cg, summary


def step_context(cgnn: Any, cg: Any, dt_fs: float, platform: Any, properties: dict[str, str], graphs: bool) -> Any:
    """A Langevin CG Context at ``dt_fs`` with CUDA graphs on or off."""
    import openmm

    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K, 1.0, dt_fs * 1e-3)
    integrator.setRandomNumberSeed(2)
    context = openmm.Context(graph_system(cgnn, cg, graphs), integrator, platform, properties)
    context.setPositions(cg.positions)
    context.setVelocitiesToTemperature(TEMPERATURE_K, 2)
    return context


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


# -- the steps -------------------------------------------------------------------------------------


def step_agreement(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    from openmm_cgnn.openmm import CGConfiguration
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.platforms import platform_properties

    model_dir = REFERENCE_DIR / "model"
    mapping = CGMapping.load(model_dir / "mapping.json")
    data = np.load(REFERENCE_DIR / "reference.npz")
    meta = json.loads((REFERENCE_DIR / "reference.json").read_text())
    precisions = cfg["precisions"] if "Precision" in platform.getPropertyNames() else ["platform default"]
    rows = []
    for case, info in meta["cases"].items():
        cg = CGConfiguration.from_molecules(mapping, info["molecule_residues"], data[f"{case}/positions"], data[f"{case}/box"])
        scripted: dict[tuple[str, bool], Any] = {}  # scripting costs seconds: once per carrier and graphs setting
        for term, (carrier, groups) in AGREEMENT_TERMS.items():
            e_ref, f_ref = float(data[f"{case}/{term}/energy"]), data[f"{case}/{term}/forces"]
            for precision in precisions:
                for graphs in (False, True):
                    properties = platform_properties(platform, precision=precision if precision in ("mixed", "double",
                                                                                                     "single") else None)
                    row: dict[str, Any] = {"case": case, "beads": cg.n_beads, "term": term, "prior_carrier": carrier,
                                           "precision": precision, "cuda_graphs": graphs}
                    try:
                        if (carrier, graphs) not in scripted:
                            scripted[carrier, graphs] = suite_force(model_dir, cg, carrier, graphs)
                        energy, forces = evaluate_forces(scripted[carrier, graphs], cg, platform, properties, graphs, groups)
                    except Exception as exc:  # noqa: BLE001 - recorded, the other variants still run
                        row["error"] = _error(exc)
                    else:
                        rms_ref = float(np.sqrt(np.mean(f_ref ** 2)))
                        force_rel = float(np.sqrt(np.mean((forces - f_ref) ** 2)) / rms_ref)
                        energy_rel = abs(energy - e_ref) / max(abs(e_ref), 1.0)
                        row.update(energy_kj_mol=energy, reference_energy_kj_mol=e_ref, energy_difference_kj_mol=energy - e_ref,
                                   energy_relative_difference=energy_rel,
                                   max_force_difference_kj_mol_nm=float(np.abs(forces - f_ref).max()),
                                   rms_reference_force_kj_mol_nm=rms_ref, force_relative_rms_difference=force_rel,
                                   finite=bool(np.isfinite(energy) and np.isfinite(forces).all()),
                                   agrees=bool(force_rel <= FORCE_RTOL and energy_rel <= ENERGY_RTOL))
                    rows.append(row)
                    print(f"agreement {case} {term} {precision} graphs {'on' if graphs else 'off'}: "
                          + (row["error"] if "error" in row else
                             f"dE/E {row['energy_relative_difference']:.2e}, rms dF/F {row['force_relative_rms_difference']:.2e}"),
                          flush=True)
                    writer.update(rows=rows)
    writer.finish(rows=rows, tolerances={"force_relative_rms": FORCE_RTOL, "energy_relative": ENERGY_RTOL},
                  reference={"file": "benchmarks/gpu_reference/reference.npz", "versions": meta["versions"]},
                  all_agree=all(r.get("agrees", False) for r in rows))


def step_cg_step(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    from openmm_cgnn.platforms import platform_properties

    from bench_md import block_steps, ns_per_day

    properties = platform_properties(platform, threads=torch.get_num_threads())
    args = timing_args(cfg)
    quick = fresh("quick", work)
    cg, start = thermal_start(quick, cfg["pairs"], platform.getName(), cfg["dt_fs"], cfg, work)
    writer.update(runner_error=start.get("runner_error"))
    contexts: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {}
    for size in cfg["sizes"]:
        source = quick if size == "quick" else fresh(size, work)
        for prior in ("model", "openmm"):
            for graphs in (False, True):
                key = f"{size}/prior-{prior}/graphs-{'on' if graphs else 'off'}"
                variants[key] = {"size": size, "prior_carrier": prior, "cuda_graphs": graphs, "beads": cg.n_beads}
                try:
                    context = step_context(suite_force(source, cg, prior, graphs), cg, cfg["dt_fs"], platform, properties,
                                           graphs)
                    variants[key]["steps_per_block"] = block_steps(context, args.block_seconds, args.warmup_steps)
                    contexts[key] = context
                except Exception as exc:  # noqa: BLE001 - recorded, the other variants still run
                    variants[key]["error"] = _error(exc)
                    print(f"cg_step {key}: {variants[key]['error']}", flush=True)

    def block(key: str) -> float:
        """One timed block; a variant that fails mid-run (NaN, a kernel error) is recorded and timed no more."""
        if "error" in variants[key]:
            return float("inf")
        try:
            return step_block(contexts[key], variants[key]["steps_per_block"])
        except Exception as exc:  # noqa: BLE001
            variants[key]["error"] = _error(exc)
            return float("inf")

    times = best_of_blocks({k: (lambda k=k: block(k)) for k in contexts}, args.blocks)
    rows = []
    for key, row in variants.items():
        if key in times and "error" not in row:
            row.update(times[key], ns_per_day_at_dt=ns_per_day(cfg["dt_fs"], times[key]["ms_per_step"]))
            print(f"cg_step {key}: {row['ms_per_step']:.3f} ms/step", flush=True)
        rows.append(row)
    writer.finish(rows=rows, properties=properties, target_ms_per_step_with_graphs=0.5)


def step_scaling(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    from openmm_cgnn.platforms import platform_properties

    from bench_md import near_cubic_factors, replicate, scaling_point

    properties = platform_properties(platform, threads=torch.get_num_threads())
    args = timing_args(cfg)
    source = fresh(cfg["size"], work)
    base, start = thermal_start(source, cfg["base_pairs"], platform.getName(), cfg["dt_fs"], cfg, work)
    writer.update(runner_error=start.get("runner_error"))
    rows = []
    for target in cfg["beads"]:
        factors = near_cubic_factors(max(1, round(target / base.n_beads)))
        cg = replicate(base, factors)
        row = {"target_beads": target, "replicas": list(factors), "beads": cg.n_beads}
        try:
            row.update(scaling_point(source, cg, TEMPERATURE_K, cfg["dt_fs"], platform, properties, "auto", args, 1))
        except Exception as exc:  # noqa: BLE001 - out of memory at the largest size, say: the smaller ones stay
            row["error"] = _error(exc)
            print(f"scaling {cg.n_beads} beads: {row['error']}", flush=True)
            rows.append(row)
            writer.update(rows=rows)
            continue
        rows.append(row)
        print(f"scaling {row['beads']} beads: step {row['openmm_step_ms']:.3f} ms = search {row['neighbor_search_ms']:.3f} "
              f"+ model {row['model_forward_backward_ms']:.3f} + OpenMM {row['openmm_overhead_ms']:.3f}", flush=True)
        writer.update(rows=rows)
    per_bead = [r["openmm_step_ms"] / r["beads"] for r in rows if "error" not in r]
    writer.finish(rows=rows, properties=properties, ms_per_step_per_1000_beads=[1e3 * x for x in per_bead])


def step_aa_vs_cg(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    from openmm_cgnn.platforms import platform_properties

    from bench_md import md_row

    properties = platform_properties(platform, threads=torch.get_num_threads())
    args = timing_args(cfg)
    quick = fresh("quick", work)
    cg, summary = thermal_start(quick, cfg["pairs"], platform.getName(), None, cfg, work)
    dt_fs = float(summary["largest_stable_dt_fs"])
    stability = {"dt_fs": dt_fs, "dt_stability": summary.get("dt_stability"), "candidates_fs": summary.get("dt_candidates_fs"),
                 "runner_error": summary.get("runner_error"),
                 "model": "the suite model, quick network with its read-out zeroed: the prior's dynamics"}
    writer.update(cg_dt_stability=stability)
    rows = []
    for size in cfg["sizes"]:
        source = quick if size == "quick" else fresh(size, work)
        row = {"size": size, **md_row(source, cg, TEMPERATURE_K, dt_fs, DENSITY_KG_M3, platform, properties, args)}
        rows.append(row)
        print(f"aa_vs_cg {size}: AA {row['aa']['ms_per_step']:.3f} ms/step {row['aa']['ns_per_day']:.3g} ns/day, CG "
              f"{row['cg']['ms_per_step']:.3f} ms/step at {dt_fs:g} fs {row['cg']['ns_per_day']:.3g} ns/day: "
              f"{row['ratio_ns_per_day_cg_over_aa']:.2f}x", flush=True)
        writer.update(rows=rows)
    writer.finish(rows=rows, properties=properties, target_ratio_ns_per_day=10.0)


def step_training(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    from bench_training import measure

    device = torch.device(MODES[writer.data["mode"]]["device"])
    rows = []
    for config in cfg["configs"]:
        row = measure(cfg["beads"], config, device, cfg["batch_size"], cfg["steps"], cfg["budget_s"])
        rows.append(row)
        print(f"training {config} {row['n_beads']} beads: {row['train_step']['frames_per_s']:.1f} frames/s "
              f"(validation {row['validation']['frames_per_s']:.1f})", flush=True)
        writer.update(rows=rows)
    writer.finish(rows=rows, device=str(device))


def chain_stages(cfg: dict[str, Any], platform: str, device: str, out: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, openmm-cgnn arguments, stages it needs) for the whole chain at ``cfg['pairs']`` ion pairs."""
    temps = [str(t) for t in cfg["temperatures"]]
    aa = [out / "aa" / f"T{t}K" for t in temps] if len(temps) > 1 else [out / "aa"]  # run_aa's layout
    cg = [out / "cg" / f"T{t}K" for t in temps]
    beads = ",".join(f"{r}={n}" for r, n in BEADS.items())
    dt = ["--dt-fs", str(cfg["cg_dt_fs"])] if cfg["cg_dt_fs"] else []
    if not cfg["cg_minimize"]:
        dt.append("--no-minimize")
    stages = [
        ("aa", ["aa", "--pairs", str(cfg["pairs"]), "--temperature", *temps, "--equilibrate-ps", str(cfg["equilibrate_ps"]),
                "--production-ps", str(cfg["production_ps"]), "--save-every-ps", str(cfg["save_every_ps"]),
                "--cutoff-nm", str(cfg["cutoff_nm"]), "--platform", platform, "--seed", "1", "--out", str(out / "aa")], []),
        ("map", ["map", "--data", *map(str, aa), "--beads", beads, "--out", str(out / "mapping"), "--seed", "1",
                 "--device", device, "--epochs", str(cfg["map_epochs"]), "--restarts", str(cfg["map_restarts"]),
                 "--max-frames", str(cfg["max_frames"])], ["aa"]),
        ("train", ["train", "--data", *map(str, aa), "--mapping", str(out / "mapping" / "mapping.json"),
                   "--out", str(out / "model"), "--device", device, "--seed", "1", "--temperature-input", "--quick",
                   "--epochs", str(cfg["train_epochs"]), "--max-frames", str(cfg["max_frames"]), "--no-progress"],
         ["aa", "map"]),
        ("export", ["export", "--model", str(out / "model"), "--from-aa", str(aa[-1]), "--out", str(out / "export"),
                    "--platform", platform],
         ["train"]),
    ]
    for t, aa_dir, cg_dir in zip(temps, aa, cg):
        stages.append((f"simulate {t} K", ["simulate", "--forcefield", str(out / "model"), "--from-aa", str(aa_dir),
                                           "--temperature", t, "--steps", str(cfg["cg_steps"]), "--save-every-steps",
                                           str(cfg["cg_save_every_steps"]), "--platform", platform, "--seed", "1",
                                           "--out", str(cg_dir), *dt], ["train"]))
    stages.append(("evaluate", ["evaluate", "--aa", *map(str, aa), "--cg", *map(str, cg), "--mapping",
                                str(out / "mapping" / "mapping.json"), "--out", str(out / "report")],
                   [f"simulate {t} K" for t in temps]))
    return stages


def step_chain(cfg: dict[str, Any], platform: Any, writer: StepWriter, work: Path) -> None:
    device = MODES[writer.data["mode"]]["device"]
    stages = chain_stages(cfg, platform.getName(), device, work / "chain")
    done: dict[str, str] = {}
    rows = []
    for name, arguments, needs in stages:
        row: dict[str, Any] = {"stage": name, "command": "openmm-cgnn " + " ".join(arguments)}
        missing = [n for n in needs if done.get(n) != "ok"]
        if missing:
            row["status"] = f"skipped: needs {', '.join(missing)}"
        else:
            start = time.perf_counter()
            # torch and OpenMM in the stage use the suite's thread count, as in the other steps
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            proc = subprocess.run([sys.executable, "-m", "openmm_cgnn", *arguments], capture_output=True, text=True, env=env)
            row["wall_seconds"] = time.perf_counter() - start
            row["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            if proc.returncode != 0:
                row["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
        done[name] = row["status"]
        rows.append(row)
        print(f"chain {name}: {row['status']}" + (f" in {row['wall_seconds']:.1f} s" if "wall_seconds" in row else ""),
              flush=True)
        for line in row.get("stderr_tail", []):
            print(f"    {line}", flush=True)
        writer.update(stages=rows)
    writer.finish(stages=rows, all_ok=all(r["status"] == "ok" for r in rows))


STEP_FUNCTIONS: dict[str, Callable[[dict[str, Any], Any, StepWriter, Path], None]] = {
    "agreement": step_agreement, "cg_step": step_cg_step, "scaling": step_scaling, "aa_vs_cg": step_aa_vs_cg,
    "training": step_training, "chain": step_chain,
}
REFERENCE_DIR = REFERENCE


def result_path(results: Path, step: str, tag: str) -> Path:
    return results / f"gpu_{step}_{tag}.json"


def run_step(name: str, mode: str, results: Path) -> int:
    """One step in this process (``gpu_suite.py step NAME``)."""
    from openmm_cgnn.platforms import get_platform

    spec = MODES[mode]
    pin_threads(spec["threads"])
    platform = get_platform(spec["platform"], f"gpu_suite {name}")
    cfg = spec[name]
    writer = StepWriter(result_path(results, name, spec["tag"]), name, mode, cfg, platform.getName())
    writer.update()
    with tempfile.TemporaryDirectory(prefix=f"gpu_suite_{name}_") as tmp:
        STEP_FUNCTIONS[name](cfg, platform, writer, Path(tmp))
    return 0


# -- the driver ------------------------------------------------------------------------------------


def _mark(path: Path, status: str, step: str, extra: dict[str, Any]) -> None:
    """Record how a step ended in its JSON (written by the step so far, or new)."""
    try:
        data = json.loads(path.read_text())
        if data.get("status") == "ok":
            return
        data["status"] = f"{status} ({data.get('status')} results kept)"
    except (OSError, ValueError):
        data = {"step": step, "status": status}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def run_suite(mode: str, results: Path, only: list[str] | None, budget_s: float | None, reference: Path) -> int:
    spec = MODES[mode]
    budget = budget_s if budget_s is not None else spec["budget_s"]
    results.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    summary_path = results / f"gpu_suite_{spec['tag']}.json"
    summary: dict[str, Any] = {"mode": mode, "budget_s": budget, "steps": {}, "command": " ".join(sys.argv),
                               "machine": machine_info()}
    failed = 0
    for name in only or STEPS:
        left = deadline - time.monotonic()
        limit = min(float(spec["limits_s"][name]), left)
        path = result_path(results, name, spec["tag"])
        path.unlink(missing_ok=True)  # never report an older run's numbers as this run's
        entry: dict[str, Any] = {"file": path.name, "limit_s": limit}
        if limit < MIN_STEP_S:
            entry["status"] = "skipped: the suite's time budget is spent"
            failed += 1
            _mark(path, entry["status"], name, {})
        else:
            print(f"\n=== {name} (at most {limit:.0f} s)", flush=True)
            start = time.monotonic()
            process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "step", name, "--mode", mode,
                                        "--results", str(results), "--reference", str(reference)],
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
                entry["status"] = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the step and anything it started (the chain's stages)
                process.wait()
                entry["status"] = "timeout"
            entry["wall_s"] = time.monotonic() - start
            if entry["status"] != "ok":
                failed += 1
                _mark(path, entry["status"], name, {"limit_s": limit, "wall_s": entry["wall_s"]})
        summary["steps"][name] = entry
        summary["wall_s"] = budget - (deadline - time.monotonic())
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"=== {name}: {entry['status']}", flush=True)
    print("\n" + tables(results, spec["tag"]))
    return 1 if failed else 0


# -- the README table ------------------------------------------------------------------------------


def _load(results: Path, step: str, tag: str) -> dict[str, Any] | None:
    try:
        return json.loads(result_path(results, step, tag).read_text())
    except (OSError, ValueError):
        return None


def tables(results: Path, tag: str = "cuda") -> str:
    """Markdown tables of whatever the step files hold."""
    lines = []
    summary = results / f"gpu_suite_{tag}.json"
    if summary.exists():
        steps = json.loads(summary.read_text())["steps"]
        lines += ["| step | status | wall s |", "|---|---|---|"]
        lines += [f"| {k} | {v['status']} | {v.get('wall_s', 0):.0f} |" for k, v in steps.items()]
    data = _load(results, "agreement", tag)
    if data:
        lines += ["", "| case | compared | precision | graphs | rel. energy diff | rel. RMS force diff | agrees |",
                  "|---|---|---|---|---|---|---|"]
        for r in data.get("rows", []):
            cells = ([f"{r['energy_relative_difference']:.1e}", f"{r['force_relative_rms_difference']:.1e}", str(r["agrees"])]
                     if "error" not in r else [r["error"], "", "no"])
            lines.append(f"| {r['case']} | {r['term']} | {r['precision']} | {'on' if r['cuda_graphs'] else 'off'} | "
                         + " | ".join(cells) + " |")
    data = _load(results, "cg_step", tag)
    if data:
        lines += ["", "| network | prior | graphs | beads | ms/CG step |", "|---|---|---|---|---|"]
        for r in data.get("rows", []):
            ms = f"{r['ms_per_step']:.3f}" if "ms_per_step" in r else r.get("error", "not measured")
            lines.append(f"| {r['size']} | {r['prior_carrier']} | {'on' if r['cuda_graphs'] else 'off'} | {r['beads']} | {ms} |")
    data = _load(results, "scaling", tag)
    if data:
        lines += ["", "| beads | step ms | neighbour search ms | model ms | OpenMM overhead ms | graphs |", "|---|---|---|---|---|---|"]
        for r in data.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['beads']} | {r['error']} | | | | |")
                continue
            graphs = (r.get("cuda_graphs") or {}).get("use_cuda_graphs")
            lines.append(f"| {r['beads']} | {r['openmm_step_ms']:.3f} | {r['neighbor_search_ms']:.3f} | "
                         f"{r['model_forward_backward_ms']:.3f} | {r['openmm_overhead_ms']:.3f} | {graphs} |")
    data = _load(results, "aa_vs_cg", tag)
    if data:
        lines += ["", "| network | pairs | AA ms/step (2 fs) | AA ns/day | CG ms/step | CG dt fs | CG ns/day | CG/AA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data.get("rows", []):
            lines.append(f"| {r['size']} | {r['pairs']} | {r['aa']['ms_per_step']:.3f} | {r['aa']['ns_per_day']:.3g} | "
                         f"{r['cg']['ms_per_step']:.3f} | {r['cg']['dt_fs']:g} | {r['cg']['ns_per_day']:.3g} | "
                         f"{r['ratio_ns_per_day_cg_over_aa']:.1f}x |")
    data = _load(results, "training", tag)
    if data:
        lines += ["", "| network | beads | train frames/s | validation frames/s |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['n_beads']} | {r['train_step']['frames_per_s']:.1f} | "
                  f"{r['validation']['frames_per_s']:.1f} |" for r in data.get("rows", [])]
    data = _load(results, "chain", tag)
    if data:
        lines += ["", "| chain stage | status | s |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {r['status']} | {r.get('wall_seconds', 0):.1f} |" for r in data.get("stages", [])]
    return "\n".join(lines)


def main() -> int:
    global REFERENCE_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here, CPU: the suite model and its Reference-platform energies and forces")
    p.add_argument("--out", type=Path, default=REFERENCE, help=f"default {REFERENCE.relative_to(HERE.parent)}")
    p.add_argument("--model", type=Path, default=None, help="model directory to use (default: the one in --out, else a new one)")
    p.add_argument("--new-model", action="store_true", help="make a new suite model even if --out has one")
    for name in ("run", "step"):
        p = sub.add_parser(name, help="the whole suite" if name == "run" else "one step, in this process")
        if name == "step":
            p.add_argument("name", choices=STEPS)
            p.add_argument("--mode", choices=sorted(MODES), default="gpu")
        else:
            p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every step's code path")
            p.add_argument("--only", nargs="+", choices=STEPS, default=None, help="these steps only")
            p.add_argument("--budget-s", type=float, default=None, help="the whole suite's time budget (s)")
        p.add_argument("--results", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
        p.add_argument("--reference", type=Path, default=REFERENCE, help="prepare's output (default gpu_reference)")
    p = sub.add_parser("table", help="Markdown tables from the step files")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--tag", default="cuda")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.model, args.new_model)
        return 0
    if args.command == "table":
        print(tables(args.results, args.tag))
        return 0
    REFERENCE_DIR = args.reference.resolve()
    if args.command == "step":
        return run_step(args.name, args.mode, args.results or RESULTS)
    mode = "dry" if args.dry_run else "gpu"
    return run_suite(mode, args.results or RESULTS, args.only, args.budget_s, REFERENCE_DIR)


if __name__ == "__main__":
    raise SystemExit(main())
