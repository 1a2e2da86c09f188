"""The whole chain for one liquid (``openmm-cgnn run``): plan the stage commands, then run or print them.

Stages: all-atom NPT at every temperature -> all-atom NVT production at each temperature, in the
box of a straight rho(T) line fitted over all the NPT runs -> learned mapping (CGAE) -> Hybridgraph
force field (force matching) -> bonded refinement (iterative Boltzmann inversion of the bonded
tables with the network on, in sizes whose settings have "refine") -> export for plain OpenMM -> CG
simulations -> prior-only CG
simulations (the ablation: the same model with its network switched off, the same time step and
length) -> evaluation report. A size's held-out temperatures (liquid file) get an AA run and CG
runs but are left out of mapping and training, so the report shows the model at a temperature it
never saw.
Each stage is the ``openmm-cgnn`` command a user would type. :func:`plan` lists them in
dependency order; :func:`run_plan` runs them (per-temperature stages ``jobs`` at a time, each
skipped when its output already exists, so an interrupted run picks up where it stopped);
``--print-commands`` prints them instead, one group per job array.

The liquid (molecules, stoichiometry, beads, temperatures and box size per size) comes from its
liquid file (:mod:`openmm_cgnn.liquids`); the run lengths and network sizes per size are here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .layout import (CHECKPOINT_PT, MAPPING_JSON, METRICS_JSON, MODEL_PT, NPT_JSON, REFINE_JSON, REPORT_MD, SUMMARY_JSON,
                     SYSTEM_XML)
from .platforms import GPU_PLATFORMS
from .liquids import LIQUIDS_DIR, Liquid, LiquidError

# Run lengths and network sizes per size: not liquid-specific. The quick size keeps the chain
# honest on a laptop-class CPU; cpu is hot enough that centre-of-mass motion turns diffusive
# within a few hundred ps of a 32-pair box on a CPU; full is the published-scale run (350-500 K,
# nanoseconds of all-atom dynamics, a GPU). tiny exists for the tests: every stage, seconds each.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "aa": {"--equilibrate-ps": 2, "--production-ps": 4, "--save-every-ps": 0.2},
        "map": {"--epochs": 30, "--restarts": 1},
        # Boxes of a few ion pairs are ~1.3 nm wide: the model cutoffs must stay under half of that.
        # The untrained network starts at the scale of the residual force (~1000 kJ/mol/nm), a random
        # force field that breaks CG dynamics; 6 epochs at a higher rate make it stable (2 did not).
        "train": {"--quick": None, "--epochs": 6, "--lr": 0.005, "--max-frames": 20, "--patience": 6,
                  "--model-option": "features=8 filters=8 n_gaussians=8 intra_cutoff_nm=0.5 inter_cutoff_nm=0.5"},
        # a few epochs leave the tiny model borderline at 5 fs (NVE drift 0.08-0.11 against 0.1): 2.5 fs backs it up
        "simulate": {"--dt-candidates-fs": "10 5 2.5"},
        # bonded refinement (`refine`): table updates and CG steps per training temperature and round
        "refine": {"--iterations": 1, "--steps": 200, "--save-every-steps": 5},
        "cg_steps": 200,
        "cg_save_every_steps": 20,
        "platform": "CPU",
    },
    "quick": {
        "aa": {"--equilibrate-ps": 10, "--production-ps": 30, "--save-every-ps": 0.2, "--cutoff-nm": 0.75},
        "map": {"--epochs": 150, "--restarts": 2},
        "train": {"--quick": None, "--epochs": 15, "--max-frames": 60},
        "refine": {"--iterations": 2, "--steps": 1000},
        "cg_steps": 2000,
        "cg_save_every_steps": 10,
        "platform": "CPU",
    },
    "cpu": {
        # 40 ps of NPT left the 32-pair densities drifting at every temperature: extend up to 200 ps.
        "aa": {"--equilibrate-ps": 40, "--max-equilibrate-ps": 200, "--production-ps": 300, "--save-every-ps": 0.5,
               "--cutoff-nm": 0.9},
        "map": {"--epochs": 300, "--restarts": 3, "--max-frames": 200},
        # the smallest network measured within the noise of the best on this size's data: 16 features,
        # filters and Gaussians (validation force RMSE 556.1 against 556.3 for 32 and 555.8 for 64
        # features, CG RDF and bonded errors within noise) at 4.1 against 6.6 and 12.2 ms per CG step
        # (benchmarks/network_sweep.py, docs/model.md)
        "train": {"--quick": None, "--epochs": 25, "--max-frames": 300, "--patience": 8,
                  "--model-option": "features=16 filters=16 n_gaussians=16"},
        # 3 updates of 2000-step runs took the worst bonded TV from 26 % to 7 %, the counting noise of
        # those runs (docs/model.md): twice as long runs resolve more of it
        "refine": {"--iterations": 3, "--steps": 4000, "--save-every-steps": 20},
        # as long as the AA production (not a step count): the MSD needs the same lags at whatever
        # step the NVE check picks; 40 000 steps of 3-4 fs left every CG D unconverged
        "cg_length_ps": 300,
        "cg_save_every_steps": 50,
        "platform": "CPU",
    },
    "full": {
        "aa": {"--equilibrate-ps": 1000, "--max-equilibrate-ps": 3000, "--production-ps": 5000, "--save-every-ps": 1.0, "--cutoff-nm": 1.2},
        "map": {"--epochs": 1000, "--restarts": 5},
        "train": {"--epochs": 200},
        "refine": {"--iterations": 3, "--steps": 20_000, "--save-every-steps": 100},
        "cg_steps": 2_000_000,
        "cg_save_every_steps": 500,
        "platform": "CUDA",
    },
}
class DriverError(ValueError):
    """Bad driver input; one line naming the option."""


@dataclass
class Stage:
    """One ``openmm-cgnn`` command of the chain."""

    name: str  # e.g. "aa 450 K"
    group: str  # aa_npt, aa, map, ..., evaluate: stages of a group are independent
    args: list[str]  # arguments of ``openmm-cgnn``
    done: Path  # exists (and, for run directories, says it finished) once the stage is done
    needs: list[str] = field(default_factory=list)  # groups that must finish first
    device: str | None = None  # the GPU it runs on (cuda:N), None on CPU or when OpenMM picks

    def command(self) -> str:
        return shlex.join(["openmm-cgnn", *self.args])


def resolve_devices(size: str, platform: str | None, gpus: str | None,
                    environ: dict[str, str] | None = None) -> tuple[str, list[int]]:
    """The OpenMM platform and the GPU indices for the per-temperature stages.

    ``--gpus 0,1,...`` gives the indices (and implies CUDA); without it, a GPU platform uses one
    index per device in ``CUDA_VISIBLE_DEVICES``, if set. Indices are as the processes see them:
    with ``CUDA_VISIBLE_DEVICES=2,3`` they are 0 and 1.
    """
    if size not in SETTINGS:
        raise DriverError(f"--size {size!r}: one of {', '.join(SETTINGS)}")
    if gpus is not None:
        try:
            indices = [int(v) for v in gpus.split(",")]
        except ValueError:
            raise DriverError(f"--gpus {gpus!r}: expected device indices such as 0,1") from None
        if not indices or min(indices) < 0:
            raise DriverError(f"--gpus {gpus!r}: device indices must be >= 0")
        platform = platform or "CUDA"
        if platform not in GPU_PLATFORMS:
            raise DriverError(f"--gpus needs a GPU platform ({', '.join(GPU_PLATFORMS)}), not --platform {platform}")
        return platform, indices
    platform = platform or SETTINGS[size]["platform"]
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    names = [v.strip() for v in visible.split(",") if v.strip()]
    # A negative entry ("-1") hides every device from CUDA.
    if platform not in GPU_PLATFORMS or not names or any(v.startswith("-") for v in names):
        return platform, []
    return platform, list(range(len(names)))


def options(table: dict[str, Any]) -> list[str]:
    """CLI options from a settings table; a value with spaces is several arguments (``nargs='+'``)."""
    out: list[str] = []
    for key, value in table.items():
        out.append(key)
        if value is not None:
            out.extend(str(value).split())
    return out


def run_length(cfg: dict[str, Any]) -> list[str]:
    """A size's CG run length as ``simulate`` options: ``cg_length_ps`` of simulated time or ``cg_steps``."""
    if "cg_length_ps" in cfg:
        return ["--length-ps", f"{cfg['cg_length_ps']:g}"]
    return ["--steps", str(cfg["cg_steps"])]


def liquid_option(liquid: Liquid) -> str:
    """How stages name the liquid: a shipped one by name, a user's file by its absolute path."""
    shipped = liquid.path.resolve().parent == LIQUIDS_DIR and liquid.path.stem == liquid.name
    return liquid.name if shipped else str(liquid.path.resolve())


def plan(liquid: Liquid, size: str, out: Path, platform: str | None = None, gpus: Sequence[int] = ()) -> list[Stage]:
    """The stages of the chain in dependency order (``platform`` and ``gpus``: see :func:`resolve_devices`).

    Per-temperature stages (all-atom and CG runs) take the GPUs round-robin: temperature k runs on
    ``gpus[k % len(gpus)]`` (OpenMM's ``DeviceIndex``), so several may share one. The single
    mapping and training jobs use the first GPU as their torch device.
    """
    if size not in SETTINGS:
        raise DriverError(f"--size {size!r}: one of {', '.join(SETTINGS)}")
    if size not in liquid.sizes:
        raise DriverError(f"{liquid.path}: sizes.{size}: missing (this liquid gives {', '.join(liquid.sizes)})")
    cfg = SETTINGS[size]
    platform = platform or cfg["platform"]
    if gpus and platform not in GPU_PLATFORMS:
        raise DriverError(f"--gpus needs a GPU platform ({', '.join(GPU_PLATFORMS)}), not --platform {platform}")
    on_gpu = platform in GPU_PLATFORMS
    torch_device = f"cuda:{gpus[0]}" if gpus else "cuda" if on_gpu else "cpu"

    def device_of(k: int) -> tuple[list[str], str | None]:
        if not gpus:
            return [], None
        index = gpus[k % len(gpus)]
        return ["--device-index", str(index)], f"cuda:{index}"

    units = liquid.sizes[size].units
    temperatures = liquid.sizes[size].temperatures_K
    held_out = liquid.sizes[size].held_out_K
    aa_dirs = [out / "aa" / f"T{t:g}K" for t in temperatures]
    cg_dirs = [out / "cg" / f"T{t:g}K" for t in temperatures]
    prior_dirs = [out / "cg_prior" / f"T{t:g}K" for t in temperatures]
    # Nothing of a held-out temperature reaches the model: neither the mapping nor the force labels.
    train_dirs = [d for t, d in zip(temperatures, aa_dirs) if t not in held_out]
    map_dir, model_dir, export_dir, report_dir = out / "mapping", out / "model", out / "export", out / "report"
    # The model every later stage uses: the refined one where the size refines (its CG runs, the
    # prior-only ablation with the same refined tables, and the export).
    cg_model = out / "model_refined" if "refine" in cfg else model_dir
    model_needs = ["aa", "train", "refine"] if "refine" in cfg else ["aa", "train"]
    stages = []
    # With two or more temperatures, NPT runs everywhere first and each NVT box comes from the
    # rho(T) line over all of them: one short NPT average per temperature is too noisy for D(T).
    fit = len(temperatures) > 1
    for k, (t, aa_dir) in enumerate(zip(temperatures, aa_dirs)):
        device_args, device = device_of(k)
        args = ["aa", "--liquid", liquid_option(liquid), "--units", str(units), "--temperature", f"{t:g}",
                *options(cfg["aa"]), "--platform", platform, *device_args, "--seed", "1", "--out", str(aa_dir),
                "--resume"]
        if fit:
            stages.append(Stage(f"aa NPT {t:g} K", "aa_npt", [*args, "--npt-only"], aa_dir / NPT_JSON, [], device))
        stages.append(Stage(f"aa {t:g} K", "aa", [*args, "--density-fit", *map(str, aa_dirs)] if fit else args,
                            aa_dir / SUMMARY_JSON, ["aa_npt"] if fit else [], device))
    stages.append(Stage(
        "map", "map",
        ["map", "--data", *map(str, train_dirs), "--beads", liquid.beads_option(), "--out", str(map_dir), "--seed", "1",
         "--device", torch_device, *options(cfg["map"])],
        map_dir / MAPPING_JSON, ["aa"], torch_device if gpus else None))
    stages.append(Stage(
        "train", "train",
        ["train", "--data", *map(str, train_dirs), "--mapping", str(map_dir / MAPPING_JSON), "--out", str(model_dir),
         "--device", torch_device, "--seed", "1", "--temperature-input", *options(cfg["train"]),
         *(["--resume"] if (model_dir / CHECKPOINT_PT).exists() else [])],
        model_dir / MODEL_PT, ["aa", "map"], torch_device if gpus else None))
    if "refine" in cfg:
        device_args, device = device_of(0)
        stages.append(Stage(
            "refine", "refine",
            ["refine", "--model", str(model_dir), "--aa", *map(str, train_dirs), "--out", str(cg_model),
             "--platform", platform, *device_args, "--seed", "1", *options(cfg["refine"]),
             # the CG runs' time-step candidates, so refinement steps as the chain's runs will
             *options({k: v for k, v in cfg.get("simulate", {}).items() if k == "--dt-candidates-fs"})],
            cg_model / REFINE_JSON, ["aa", "train"], device))
    stages.append(Stage(
        "export", "export",
        ["export", "--model", str(cg_model), "--from-aa", str(train_dirs[-1]), "--out", str(export_dir)],
        export_dir / SYSTEM_XML, model_needs))
    def cg_run(k: int, t: float, aa_dir: Path, out_dir: Path, *special: str) -> tuple[list[str], str | None]:
        """A CG run's arguments: the trained one and its prior-only twin differ only in ``special``."""
        device_args, device = device_of(k)
        return (["simulate", "--forcefield", str(cg_model), *special, "--from-aa", str(aa_dir), "--temperature", f"{t:g}",
                 *run_length(cfg), "--save-every-steps", str(cfg["cg_save_every_steps"]),
                 "--platform", platform, *device_args, "--seed", "1", "--out", str(out_dir), "--resume"], device)

    for k, (t, aa_dir, cg_dir) in enumerate(zip(temperatures, aa_dirs, cg_dirs)):
        args, device = cg_run(k, t, aa_dir, cg_dir, *options(cfg.get("simulate", {})))
        stages.append(Stage(f"simulate {t:g} K", "simulate", args, cg_dir / SUMMARY_JSON, model_needs, device))
    for k, (t, aa_dir, cg_dir, prior_dir) in enumerate(zip(temperatures, aa_dirs, cg_dirs, prior_dirs)):
        # the ablation: the network off, at the trained run's time step (--dt-from: also its MTS inner
        # steps, so the prior alone is integrated at the step it had there), length and seed
        args, device = cg_run(k, t, aa_dir, prior_dir, "--network", "off", "--dt-from", str(cg_dir))
        stages.append(Stage(f"prior-only {t:g} K", "simulate_prior", args, prior_dir / SUMMARY_JSON,
                            ["aa", "train", "simulate"], device))
    held_out_args = ["--held-out-temperature", *(f"{t:g}" for t in held_out)] if held_out else []
    stages.append(Stage(
        "evaluate", "evaluate",
        ["evaluate", "--aa", *map(str, aa_dirs), "--cg", *map(str, cg_dirs), "--cg-prior-only", *map(str, prior_dirs),
         *held_out_args, "--mapping", str(map_dir / MAPPING_JSON), "--out", str(report_dir)],
        report_dir / REPORT_MD, ["aa", "map", "simulate", "simulate_prior"]))
    return stages


def print_commands(stages: list[Stage], header: str, stream=None) -> None:
    """The commands as a shell script, one commented group per job array, groups in dependency order."""
    stream = stream or sys.stdout
    groups: dict[str, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    print(f"# {header}", file=stream)
    print("# Groups run in this order; the commands inside a group are independent (one job-array task each).",
          file=stream)
    for n, (group, members) in enumerate(groups.items(), start=1):
        needs = sorted({g for s in members for g in s.needs}, key=list(groups).index)
        print(f"\n# group {n}/{len(groups)}: {group} ({len(members)} job{'s' if len(members) > 1 else ''}; "
              f"after: {', '.join(needs) or 'nothing'})", file=stream)
        for stage in members:
            print(stage.command(), file=stream)


def stage_done(done_marker: Path) -> bool:
    """A stage is done when its marker exists and, for run directories, its summary says it finished."""
    if not done_marker.exists():
        return False
    if done_marker.name == SUMMARY_JSON:
        status = json.loads(done_marker.read_text()).get("status", "ok")
        return not str(status).startswith("failed")
    return True


def run_plan(stages: list[Stage], jobs: int = 1, log_dir: Path | None = None) -> None:
    """Run the stages group by group; the stages of a group at most ``jobs`` at a time."""
    groups: dict[str, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    for members in groups.values():
        run_stages(members, jobs, log_dir)


def run_stages(stages: list[Stage], jobs: int = 1, log_dir: Path | None = None) -> None:
    """Run independent stages, at most ``jobs`` at a time.

    With several jobs each process gets an equal share of the cores (OpenMM and torch threads) and
    writes its output to ``log_dir/<name>.log``: oversubscribed threads made parallel runs slower
    than sequential ones on a 2-core machine.
    """
    pending = [stage for stage in stages if not _skip(stage)]
    if jobs <= 1 or len(pending) <= 1:
        for stage in pending:
            _wait(stage.name, _start(stage), time.perf_counter())
        return
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OPENMM_CPU_THREADS=threads, OMP_NUM_THREADS=threads)
    assert log_dir is not None
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, subprocess.Popen, float, Path]] = []
    failures = []
    while pending or running:
        while pending and len(running) < jobs:
            stage = pending.pop(0)
            log = log_dir / (stage.name.replace(" ", "_") + ".log")
            print(f"[{stage.name}] running, output in {log}", flush=True)
            running.append((stage.name, _start(stage, env, log), time.perf_counter(), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            try:
                _wait(*item[:3])
            except SystemExit as exc:
                failures.append(f"{exc} (its output: {item[3]})")
    if failures:
        raise SystemExit("; ".join(failures))


def _skip(stage: Stage) -> bool:
    if stage_done(stage.done):
        print(f"[{stage.name}] already done ({stage.done}), skipping")
        return True
    return False


def _start(stage: Stage, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "openmm_cgnn", *stage.args]
    print(f"\n[{stage.name}] {shlex.join(command[1:])}", flush=True)
    if log is None:
        return subprocess.Popen(command, env=env)
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def _wait(name: str, process: subprocess.Popen, start: float) -> None:
    if process.wait() != 0:
        raise SystemExit(f"[{name}] failed with exit status {process.returncode}; outputs so far are kept")
    print(f"[{name}] finished in {time.perf_counter() - start:.0f} s", flush=True)


def default_out(liquid: Liquid, size: str) -> Path:
    return Path("runs") / (liquid.name if size == "full" else f"{liquid.name}_{size}")


def print_results(out: Path, elapsed_s: float) -> None:
    """Where the outputs are, and the report's verdict lines."""
    print(f"\nDone in {elapsed_s / 60:.1f} min. Results in {out.resolve()}:")
    for label, path in [("all-atom runs", out / "aa"), ("mapping", out / "mapping" / MAPPING_JSON),
                        ("model", out / "model"), ("refined model", out / "model_refined"),
                        ("OpenMM export", out / "export"), ("CG runs", out / "cg"),
                        ("prior-only CG", out / "cg_prior"),
                        ("report", out / "report" / REPORT_MD)]:
        if label == "refined model" and not path.exists():
            continue
        print(f"  {label:14s} {path}")
    metrics = out / "report" / METRICS_JSON
    if metrics.exists():
        verdict = json.loads(metrics.read_text()).get("verdict", {})
        for species, judged in verdict.get("Ea", {}).items():
            difference = judged.get("relative_difference")
            print(f"  E_a {species}: {judged['status']}"
                  + (f" (CG {100 * difference:+.1f}% from AA)" if difference is not None else f" ({judged.get('detail')})"))
        for group, judged in verdict.get("rdf", {}).items():
            print(f"  worst {group} RDF error {100 * judged['worst_error']:.1f}% ({judged['pair']}): {judged['status']}")


__all__ = ["DriverError", "LiquidError", "SETTINGS", "Stage", "plan", "print_commands", "resolve_devices", "run_plan"]
