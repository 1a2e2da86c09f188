"""Real-run speed: ``CGRun`` (what ``openmm-cgnn simulate`` runs) against all-atom, before and after a change.

``bench_md.py`` times bare integrator steps. A real CG run also saves frames, DCD models and
checkpoints, reports state.csv and progress, and runs the model as ``simulate`` builds it (the
prior where ``--prior auto`` puts it, the engine ``--carrier auto`` picks for the run's length), at
the time step the NVE check chose. This script times that, in one process:

- each contender is a real ``CGRun`` in its own directory (minimised and thermalised as usual, the
  time step given: by default the finished CG run's, i.e. the NVE check's pick), extended round by
  round with ``resume`` by ``--steps`` production steps; the run's own ``summary.json``
  ``ms_per_step`` (production wall time) and the process CPU time of the whole resumed call are
  recorded per round;
- ``before`` contenders run the package as it was at ``--before REV`` (``git archive`` of
  ``openmm_cgnn/`` into a temporary directory, imported under another name), ``after`` ones the
  working tree; so old and new code are timed side by side, in turn, in one process;
- between rounds the all-atom System of ``run_aa`` (the AA run's composition and density, PME,
  LangevinMiddle 2 fs; ``bench_md.aa_context``) steps a block of about ``--aa-block-seconds``;
- a ``bare`` contender steps the "after" run's forces with no reporting at all (the bench_md number).

The fastest round counts. CPU time per step is the steadier measure on a shared machine (other jobs
slow the wall clock, barely the CPU time of a single-threaded process); both are reported, with
ns/day and the CG/AA ns/day ratio for each. The trajectories of contenders that differ only in the
code's version are compared frame by frame (the change must not change the run).

    python benchmarks/bench_simulate.py --run runs/bmim_bf4_quick [--temperature 400] [--steps 2000] \
        [--save-every-steps 10] [--rounds 3] [--before REV] [--mts-inner-steps 4 --mts-dt-fs 10]

Writes benchmarks/results/simulate_cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: F401  (torch before openmm)
from bench_md import aa_context, ns_per_day
from common import RESULTS, machine_info, pin_threads, write_json

REPO = Path(__file__).resolve().parent.parent
BEFORE_PACKAGE = "openmm_cgnn_before"


def import_revision(rev: str, into: Path) -> str:
    """``openmm_cgnn/`` at git revision ``rev`` as the importable package ``BEFORE_PACKAGE``."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "openmm_cgnn"], check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--before {rev}: git archive failed ({exc.stderr.decode().strip()})") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "openmm_cgnn").rename(into / BEFORE_PACKAGE)
    sys.path.insert(0, str(into))
    importlib.import_module(BEFORE_PACKAGE)
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


class Contender:
    """One real CG run, extended by ``steps`` per round (``resume``), in the package ``package``."""

    def __init__(self, name: str, package: str, out: Path, model: Path, start: Path, temperature: float, dt_fs: float,
                 save_every: int, prior: str, mts_inner_steps: int = 1) -> None:
        self.name, self.package, self.out = name, package, out
        self.model, self.start, self.temperature, self.dt_fs = model, start, temperature, dt_fs
        self.save_every, self.prior, self.mts_inner_steps = save_every, prior, mts_inner_steps
        self.steps_done = 0
        self.rounds: list[dict[str, float]] = []
        self.setup: dict[str, Any] = {}

    def _module(self, name: str) -> Any:
        return importlib.import_module(f"{self.package}.{name}")

    def run(self, steps: int) -> dict[str, Any]:
        """Run (or resume) to ``steps`` in total; (wall s, CPU s, summary) of the call."""
        mapping = self._module("mapping.spec").Mapping.load(self.model / "mapping.json")
        om = self._module("openmm")
        sim = self._module("openmm.simulation")
        cg = om.CGSystem.from_run(mapping, self.start, frame=-1)
        config = sim.RunConfig(temperature_K=self.temperature, steps=steps, dt_fs=self.dt_fs, platform="CPU",
                               save_every_steps=self.save_every, seed=1, progress=True,
                               mts_inner_steps=self.mts_inner_steps)
        force = om.CGNNForce(self.model, cg, self.temperature, prior=self.prior)
        resume = self.out.exists()
        wall, cpu = time.perf_counter(), time.process_time()
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the progress lines
            result = sim.CGRun(force, cg, self.out, config, resume=resume, log=lambda message: None).run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done = steps - self.steps_done
        self.steps_done = steps
        return {"steps": done, "wall_s": wall, "cpu_s": cpu, "summary": result.summary}


def step_block(context: Any, steps: int) -> dict[str, float]:
    """Wall and CPU ms per step of ``steps`` bare integrator steps (no reporting, no energy)."""
    wall, cpu = time.perf_counter(), time.process_time()
    context.getIntegrator().step(steps)
    context.getState(getPositions=True)
    return {"wall_ms_per_step": 1e3 * (time.perf_counter() - wall) / steps,
            "cpu_ms_per_step": 1e3 * (time.process_time() - cpu) / steps}


def bare_context(model: Path, start: Path, temperature: float, dt_fs: float, prior: str) -> tuple[Any, dict[str, Any]]:
    """The "after" forces on a LangevinMiddle integrator, no reporters (what bench_md times)."""
    import openmm

    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.openmm import CGNNForce, CGSystem

    cg = CGSystem.from_run(Mapping.load(model / "mapping.json"), start, frame=-1)
    force = CGNNForce(model, cg, temperature, prior=prior, engine="torch")
    system = cg.system()
    platform = openmm.Platform.getPlatformByName("CPU")
    force.add_to(system, platform)
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, dt_fs * 1e-3)
    integrator.setRandomNumberSeed(2)
    context = openmm.Context(system, integrator, platform, {"Threads": "1"})
    context.setPositions(cg.positions)
    context.setVelocitiesToTemperature(temperature, 2)
    integrator.step(20)  # warm-up: TorchScript profiling runs
    return context, {"prior_carrier": force.prior_carrier, "engine": force.engine_report()}


def same_trajectory(a: Path, b: Path) -> dict[str, Any]:
    """Whether two runs wrote the same frames (positions, energies) and the same DCD bytes."""
    from openmm_cgnn.frames import read_frames

    fa, fb = read_frames(a), read_frames(b)
    same = fa.n_frames == fb.n_frames and np.array_equal(fa.positions, fb.positions) and \
        np.array_equal(fa.potential_energy, fb.potential_energy)
    # the DCD header holds its creation time: compare the models (the last n_frames records)
    frame_bytes = 56 + 3 * (8 + 4 * fa.positions.shape[1])
    models = [(run / "trajectory.dcd").read_bytes()[-fa.n_frames * frame_bytes:] for run in (a, b)]
    return {"frames": int(fa.n_frames), "frames_h5_equal": bool(same), "dcd_models_equal": models[0] == models[1]}


def best(rows: list[dict[str, float]], key: str) -> float:
    return min(row[key] for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished chain: model/, aa/T<T>K, cg/T<T>K")
    parser.add_argument("--temperature", type=float, default=400.0)
    parser.add_argument("--steps", type=int, default=2000, help="production steps per round and contender (quick: 2000)")
    parser.add_argument("--save-every-steps", type=int, default=10, help="frame/checkpoint interval (quick: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the fastest counts")
    parser.add_argument("--dt-fs", type=float, default=None, help="CG step (default: the cg run's summary.json dt_fs)")
    parser.add_argument("--before", default=None, help="git revision of the old code (none: only the working tree)")
    parser.add_argument("--mts-inner-steps", type=int, default=1, help="> 1: also an MTS contender (after, prior openmm)")
    parser.add_argument("--mts-dt-fs", type=float, default=None, help="outer step of the MTS contender")
    parser.add_argument("--aa-block-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/simulate_cpu.json")
    args = parser.parse_args()
    threads = pin_threads(1)
    load_before = list(os.getloadavg())

    from openmm_cgnn.mapping.spec import Mapping
    from openmm_cgnn.openmm import CGSystem
    from openmm_cgnn.platforms import versions

    t = args.temperature
    model, aa_dir, cg_dir = args.run / "model", args.run / "aa" / f"T{t:g}K", args.run / "cg" / f"T{t:g}K"
    for path in (model / "checkpoint.pt", aa_dir / "summary.json", cg_dir / "summary.json"):
        if not path.is_file():
            raise SystemExit(f"--run {args.run}: {path} is missing (needs a finished chain at {t:g} K)")
    cg_summary = json.loads((cg_dir / "summary.json").read_text())
    aa_summary = json.loads((aa_dir / "summary.json").read_text())
    dt_fs = float(args.dt_fs or cg_summary["dt_fs"])
    cg = CGSystem.from_run(Mapping.load(model / "mapping.json"), aa_dir, frame=-1)
    density = float(aa_summary["density_kg_m3"])

    import openmm

    platform = openmm.Platform.getPlatformByName("CPU")
    aa, aa_info = aa_context(cg.composition(), density, t, platform, {"Threads": "1"}, seed=1,
                             cutoff_nm=aa_summary.get("cutoff_nm"), minimize_iterations=200)
    aa.getIntegrator().step(20)
    aa_steps = max(20, int(args.aa_block_seconds * 1e3 / step_block(aa, 20)["wall_ms_per_step"]))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_simulate_") as tmp:
        work = Path(tmp)
        revision = import_revision(args.before, work / "src") if args.before else None
        contenders = []
        if revision:
            contenders.append(Contender("before", BEFORE_PACKAGE, work / "before", model, aa_dir, t, dt_fs,
                                        args.save_every_steps, "auto"))
        contenders += [
            Contender("after", "openmm_cgnn", work / "after", model, aa_dir, t, dt_fs, args.save_every_steps, "auto"),
            Contender("after, prior in the model", "openmm_cgnn", work / "after_model", model, aa_dir, t, dt_fs,
                      args.save_every_steps, "model"),
        ]
        if args.mts_inner_steps > 1:
            contenders.append(Contender(f"after, MTS {args.mts_inner_steps} inner", "openmm_cgnn", work / "mts", model,
                                        aa_dir, t, float(args.mts_dt_fs or dt_fs), args.save_every_steps, "openmm",
                                        args.mts_inner_steps))
        for c in contenders:  # set-up (minimise, thermalise) and the first frame: not timed
            first = c.run(0)
            c.setup = {"wall_s": first["wall_s"], "cpu_s": first["cpu_s"], "prior_carrier": first["summary"]["prior_carrier"],
                       "force_engine": first["summary"]["force_engine"], "integrator": first["summary"]["integrator"]}
            print(f"{c.name}: set up in {first['wall_s']:.1f} s ({first['cpu_s']:.1f} s CPU), prior "
                  f"{c.setup['prior_carrier']}", flush=True)
        bare, bare_info = bare_context(model, aa_dir, t, dt_fs, "auto")
        bare_steps = max(20, args.steps // 4)
        aa_rows, bare_rows = [], []
        for r in range(1, args.rounds + 1):
            aa_rows.append(step_block(aa, aa_steps))
            for c in contenders:
                row = c.run(r * args.steps)
                c.rounds.append({"wall_ms_per_step": float(row["summary"]["ms_per_step"]),
                                 "call_wall_ms_per_step": 1e3 * row["wall_s"] / row["steps"],
                                 "cpu_ms_per_step": 1e3 * row["cpu_s"] / row["steps"]})
                print(f"round {r} {c.name}: {c.rounds[-1]}", flush=True)
            bare_rows.append(step_block(bare, bare_steps))
            print(f"round {r} AA {aa_rows[-1]} bare CG {bare_rows[-1]}", flush=True)
        identical = None
        if revision:
            identical = {"before vs after, prior in the model": same_trajectory(work / "before", work / "after_model")}

    aa_row = {**aa_info, "steps_per_block": aa_steps, "rounds": aa_rows,
              "wall_ms_per_step": best(aa_rows, "wall_ms_per_step"), "cpu_ms_per_step": best(aa_rows, "cpu_ms_per_step")}
    aa_row["ns_per_day_wall"] = ns_per_day(2.0, aa_row["wall_ms_per_step"])
    aa_row["ns_per_day_cpu"] = ns_per_day(2.0, aa_row["cpu_ms_per_step"])

    def cg_row(rows: list[dict[str, float]], dt: float, **extra: Any) -> dict[str, Any]:
        row = {**extra, "dt_fs": dt, "rounds": rows, "wall_ms_per_step": best(rows, "wall_ms_per_step"),
               "cpu_ms_per_step": best(rows, "cpu_ms_per_step")}
        for kind in ("wall", "cpu"):
            row[f"ns_per_day_{kind}"] = ns_per_day(dt, row[f"{kind}_ms_per_step"])
            row[f"ratio_cg_over_aa_{kind}"] = row[f"ns_per_day_{kind}"] / aa_row[f"ns_per_day_{kind}"]
        return row

    cg_rows = {c.name: cg_row(c.rounds, c.dt_fs, package=c.package, prior=c.prior, setup=c.setup,
                              mts_inner_steps=c.mts_inner_steps) for c in contenders}
    cg_rows["bare steps (after's forces, no reporting)"] = cg_row(bare_rows, dt_fs, **bare_info, steps_per_block=bare_steps)
    result = {
        "benchmark": "real CG run (CGRun: frames, DCD, checkpoints, state.csv, progress) vs all-atom, ms/step and ns/day",
        "platform": "CPU",
        "threads": threads,
        "machine": machine_info(),
        "load_average_at_start": load_before,
        "versions": versions(),
        "settings": {
            "run": str(args.run), "temperature_K": t, "cg_dt_fs": dt_fs,
            "cg_dt_source": "--dt-fs" if args.dt_fs else f"{cg_dir / 'summary.json'} dt_fs (the NVE check's pick)",
            "steps_per_round": args.steps, "save_every_steps": args.save_every_steps, "rounds": args.rounds,
            "before_revision": revision, "density_kg_m3": density, "start": f"{aa_dir} last frame, mapped",
            "timing": "each round: an AA block, then every contender resumed by steps_per_round production steps; "
                      "wall_ms_per_step = the run's summary.json ms_per_step, cpu_ms_per_step = process CPU time of "
                      "the whole resumed call (its Context set-up included) per step; the fastest round counts",
            "aa": "bench_md.aa_context: run_aa's System (PME, HBonds, LangevinMiddle 2 fs) of the AA run's "
                  "composition at its density, bare steps (a real AA run also reports and saves)",
            "command": " ".join(sys.argv),
        },
        "aa": aa_row,
        "cg": cg_rows,
        "same_trajectory": identical,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(args.out or RESULTS / "simulate_cpu.json", result)
    print(markdown_table(result))
    return 0


def markdown_table(result: dict[str, Any]) -> str:
    aa = result["aa"]
    lines = [f"AA {aa['atoms']} atoms, 2 fs: {aa['wall_ms_per_step']:.2f} ms/step wall, {aa['cpu_ms_per_step']:.2f} CPU",
             "", "| contender | prior | dt (fs) | ms/step wall | ms/step CPU | ns/day (CPU) | CG/AA wall | CG/AA CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["cg"].items():
        prior = row.get("setup", {}).get("prior_carrier") or row.get("prior_carrier")
        lines.append(f"| {name} | {prior} | {row['dt_fs']:g} | {row['wall_ms_per_step']:.2f} | {row['cpu_ms_per_step']:.2f} "
                     f"| {row['ns_per_day_cpu']:.0f} | {row['ratio_cg_over_aa_wall']:.2f}x | {row['ratio_cg_over_aa_cpu']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
