"""CG molecular dynamics in OpenMM: Langevin (LangevinMiddle) with a CG force field from ``CGNNForce``.

The run directory is the one of docs/contracts.md section 4: ``frames.h5`` (kind "cg"),
``trajectory.dcd``, ``topology.pdb``, ``state.csv``, ``summary.json`` and ``checkpoint.chk``
(with ``checkpoint.json``: the run's settings and progress while it runs). Frames, DCD models and
checkpoints are written together at every save, so a resumed run rewinds both trajectory files to
its checkpoint and continues them without gaps or duplicates. ``summary.json`` appears only when
the run ends: finished, or failed. A run that turns NaN stops with a message, keeps every frame
written before, and records the failure (``status``) in ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .force import CGNNForce, versions
from .topology import CGSystem

RUN_FILES = ("frames.h5", "trajectory.dcd", "topology.pdb", "state.csv", "summary.json", "checkpoint.chk", "checkpoint.json")
DT_CANDIDATES_FS = (20.0, 15.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)
# Velocity-Verlet energy fluctuations grow as dt^2; std(E_total)/std(E_kinetic) below this is the
# usual "energy is conserved well enough" rule for choosing MD time steps.
STABILITY_RATIO = 0.1


class SimulationError(RuntimeError):
    """A CG run cannot start or continue (bad directory state, settings that do not match a resume)."""


class SimulationUnstable(SimulationError):
    """Positions or energies became NaN/infinite; everything written before is kept."""


@dataclass
class RunConfig:
    temperature_K: float
    steps: int
    dt_fs: float | None = None  # None: the largest step that passes the stability check
    friction_per_ps: float = 1.0
    platform: str | None = None  # None: CUDA if present, else CPU
    device_index: int | None = None  # GPU platforms: OpenMM's DeviceIndex (None: OpenMM picks)
    save_every_steps: int = 1000
    report_every_steps: int | None = None  # state.csv and progress; default save_every_steps
    seed: int = 0
    minimize: bool = True
    dt_candidates_fs: tuple[float, ...] = DT_CANDIDATES_FS
    stability_steps: int = 300
    thermalize_steps: int = 500
    progress: bool = True

    def validate(self) -> None:
        if self.temperature_K <= 0:
            raise SimulationError(f"temperature must be positive, got {self.temperature_K} K")
        if self.steps < 0:
            raise SimulationError(f"steps must be >= 0, got {self.steps}")
        if self.dt_fs is not None and not self.dt_fs > 0:
            raise SimulationError(f"time step must be positive, got {self.dt_fs} fs")
        if self.save_every_steps < 1:
            raise SimulationError(f"save interval must be >= 1 step, got {self.save_every_steps}")
        if self.friction_per_ps < 0:
            raise SimulationError(f"friction must be >= 0, got {self.friction_per_ps} /ps")
        if self.device_index is not None and self.device_index < 0:
            raise SimulationError(f"--device-index must be >= 0, got {self.device_index}")


@dataclass
class StabilityResult:
    dt_fs: float
    stable: bool
    ratio: float | None = None  # std(E_total) / std(E_kinetic) over the NVE test
    reason: str = ""


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def openmm_seed(seed: int) -> int:
    """OpenMM reads a seed of 0 as "pick one at random"; shift so every user seed is reproducible."""
    return int(seed) + 1


def choose_platform(name: str | None) -> Any:
    import openmm

    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name is None:
        name = "CUDA" if "CUDA" in available else "CPU"
    if name not in available:
        raise SimulationError(f"OpenMM platform '{name}' is not available here (available: {', '.join(available)})")
    return openmm.Platform.getPlatformByName(name)


def platform_properties(platform: Any, device_index: int | None = None) -> dict[str, str]:
    if platform.getName() in ("CUDA", "OpenCL"):
        return {"Precision": "mixed", **({"DeviceIndex": str(device_index)} if device_index is not None else {})}
    if device_index is not None:
        raise SimulationError(f"--device-index needs a GPU platform (CUDA, OpenCL), not {platform.getName()}")
    return {}


def _finite_state(state: Any) -> bool:
    energy = state.getPotentialEnergy()._value
    positions = state.getPositions(asNumpy=True)._value
    return bool(math.isfinite(energy) and np.isfinite(positions).all())


def stability_check(
    system: Any,
    positions: np.ndarray,
    velocities: Any,
    platform: Any,
    properties: dict[str, str],
    candidates_fs: tuple[float, ...] = DT_CANDIDATES_FS,
    steps: int = 300,
    sample_every: int = 5,
    log: Callable[[str], None] = print,
) -> tuple[float, list[StabilityResult]]:
    """Largest time step whose NVE run from a thermal state conserves energy (ratio test) and stays finite.

    Candidates are tried from the largest down; the first that passes is returned.
    """
    import openmm

    results: list[StabilityResult] = []
    for dt in sorted(candidates_fs, reverse=True):
        integrator = openmm.VerletIntegrator(dt * 1e-3)
        context = openmm.Context(system, integrator, platform, properties)
        context.setPositions(positions)
        context.setVelocities(velocities)
        total, kinetic = [], []
        reason = ""
        try:
            for _ in range(max(steps // sample_every, 2)):
                integrator.step(sample_every)
                state = context.getState(getEnergy=True, getPositions=True)
                if not _finite_state(state):
                    reason = "NaN/inf"
                    break
                ke = state.getKineticEnergy()._value
                total.append(state.getPotentialEnergy()._value + ke)
                kinetic.append(ke)
        except (openmm.OpenMMException, ValueError) as exc:
            reason = f"OpenMM error: {str(exc).splitlines()[0]}"
        del context, integrator
        if reason:
            results.append(StabilityResult(dt, False, None, reason))
            log(f"  dt = {dt:g} fs: unstable ({reason})")
            continue
        ratio = float(np.std(total) / max(np.std(kinetic), 1e-12))
        stable = ratio < STABILITY_RATIO
        results.append(StabilityResult(dt, stable, ratio, "" if stable else f"energy ratio {ratio:.3f} >= {STABILITY_RATIO}"))
        log(f"  dt = {dt:g} fs: std(E_total)/std(E_kin) = {ratio:.4f} -> {'stable' if stable else 'not conserved'}")
        if stable:
            return dt, results
    raise SimulationUnstable(
        f"no stable time step among {sorted(candidates_fs)} fs (energy not conserved or NaN even at the smallest); "
        "the force field or the starting structure is broken"
    )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _truncate_dcd(path: Path, n_atoms: int, n_frames: int, has_box: bool = True) -> None:
    """Cut a DCD written by OpenMM's DCDFile back to its first ``n_frames`` models."""
    frame_bytes = (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)
    with open(path, "r+b") as handle:
        handle.seek(8)
        count = struct.unpack("<i", handle.read(4))[0]
        size = handle.seek(0, os.SEEK_END)
        header = size - count * frame_bytes
        if header <= 0 or count < n_frames:
            raise SimulationError(f"{path}: has {count} frames, the checkpoint needs {n_frames}; cannot resume it")
        handle.truncate(header + n_frames * frame_bytes)
        handle.seek(8)
        handle.write(struct.pack("<i", n_frames))


def _truncate_state_csv(path: Path, last_step: int) -> None:
    """Drop state.csv rows after the checkpoint's step (they will be reported again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.startswith("#") or not line.strip() or int(float(line.split(",")[0])) <= last_step]
    _atomic_write_text(path, "".join(kept))


class CGRun:
    """One CG run directory; :meth:`run` simulates until ``config.steps`` steps in total are done."""

    def __init__(
        self,
        cgnn: CGNNForce,
        cg: CGSystem,
        out_dir: str | Path,
        config: RunConfig,
        resume: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        config.validate()
        if resume and overwrite:
            raise SimulationError("choose either resume or overwrite, not both")
        self.cgnn = cgnn
        self.cg = cg
        self.out = Path(out_dir)
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.extra_metadata = dict(metadata or {})
        self.log = log
        self._prepare_directory()

    def _prepare_directory(self) -> None:
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if self.resume and "checkpoint.chk" in existing:
            missing = [n for n in ("checkpoint.json", "frames.h5", "trajectory.dcd") if n not in existing]
            if missing:
                raise SimulationError(f"{self.out}: cannot resume, missing {missing}")
            return
        if self.resume and existing:
            raise SimulationError(f"{self.out}: has run files ({', '.join(existing)}) but no checkpoint.chk to resume from; use --overwrite")
        self.resume = False  # --resume of a directory with nothing in it starts the run
        if existing and not self.overwrite:
            raise SimulationError(f"{self.out}: already holds a run ({', '.join(existing)}); use --resume or --overwrite")
        for name in existing:
            (self.out / name).unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    # -- pieces ---------------------------------------------------------------------------------

    def _build(self, dt_fs: float, platform: Any, properties: dict[str, str]) -> Any:
        import openmm
        import openmm.app as app
        import openmm.unit as unit

        integrator = openmm.LangevinMiddleIntegrator(
            self.config.temperature_K * unit.kelvin, self.config.friction_per_ps / unit.picosecond, dt_fs * unit.femtosecond
        )
        integrator.setRandomNumberSeed(openmm_seed(self.config.seed))
        return app.Simulation(self.topology, self.system, integrator, platform, properties)

    def _summary_base(self, dt_fs: float, platform: Any, stability: list[StabilityResult] | None) -> dict[str, Any]:
        return {
            "kind": "cg",
            "status": "running",
            "model": str(self.cgnn.source),
            "prior_carrier": self.cgnn.prior_carrier,
            "temperature_K": self.config.temperature_K,
            "dt_fs": dt_fs,
            "dt_chosen_by": "user" if self.config.dt_fs is not None else "stability check",
            "largest_stable_dt_fs": None if stability is None else dt_fs,
            "dt_stability": None if stability is None else [asdict(r) for r in stability],
            # the check starts at the largest candidate: a stable result equal to it is a lower bound
            "dt_candidates_fs": None if stability is None else sorted(self.config.dt_candidates_fs, reverse=True),
            "friction_per_ps": self.config.friction_per_ps,
            "save_every_steps": self.config.save_every_steps,
            "seed": self.config.seed,
            "platform": platform.getName(),
            "n_beads": self.cg.n_beads,
            "composition": self.cg.composition(),
            "box_nm": np.asarray(self.cg.box).tolist(),
            "density_kg_m3": self.cg.density_kg_m3(),
            "mapping_sha256": self.cg.mapping.sha256(),
            "versions": versions(),
            "cuda_graphs": self.cgnn.cuda_graphs_report,
            **self.extra_metadata,
        }

    def _write_json(self, name: str, summary: dict[str, Any]) -> None:
        _atomic_write_text(self.out / name, json.dumps(summary, indent=2, default=str) + "\n")

    def _checkpoint(self, simulation: Any, progress: dict[str, Any]) -> None:
        tmp = self.out / "checkpoint.chk.tmp"
        simulation.saveCheckpoint(str(tmp))
        tmp.replace(self.out / "checkpoint.chk")
        progress.update(steps_done=int(simulation.currentStep))
        self._write_json("checkpoint.json", progress)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        import openmm
        import openmm.app as app
        import openmm.unit as unit

        from ..frames import FrameWriter, TopologyInfo

        cfg = self.config
        self.topology = self.cg.topology()
        self.system = self.cg.system()
        self.cgnn.add_to(self.system)
        platform = choose_platform(cfg.platform)
        properties = platform_properties(platform, cfg.device_index)
        previous = json.loads((self.out / "checkpoint.json").read_text()) if self.resume else None
        if previous is not None:
            self._check_resume_settings(previous, platform)
            (self.out / "summary.json").unlink(missing_ok=True)  # it marks a run that has ended

        positions = self.cg.positions
        velocities = None
        stability = None
        if previous is not None:
            dt_fs = float(previous["dt_fs"])
            stability = previous.get("dt_stability")
        else:
            # Set-up makes several Contexts; see CGNNForce.without_host_checks for why they must not raise.
            with self.cgnn.without_host_checks(self.system):
                if cfg.minimize:
                    positions = self._minimize(platform, properties)
                positions, velocities = self._thermalize(positions, platform, properties)
            if platform.getName() == "CUDA":
                self.cgnn.tune_cuda_graphs(self.system, positions, platform, properties)
            if cfg.dt_fs is None:
                self.log(f"choosing the CG time step (NVE energy conservation, {cfg.stability_steps} steps each):")
                with self.cgnn.without_host_checks(self.system):
                    dt_fs, results = stability_check(
                        self.system, positions, velocities, platform, properties, cfg.dt_candidates_fs, cfg.stability_steps,
                        log=self.log,
                    )
                stability = results
                self.log(f"largest stable time step: {dt_fs:g} fs")
            else:
                dt_fs = float(cfg.dt_fs)

        simulation = self._build(dt_fs, platform, properties)
        save_every = cfg.save_every_steps
        start_positions = self.cg.with_positions(positions).positions_quantity()
        topology_info = TopologyInfo.from_openmm(self.topology, self.system, start_positions)
        metadata = {
            "kind": "cg",
            "temperature_K": cfg.temperature_K,
            "forcefield": str(self.cgnn.source),
            "prior_carrier": self.cgnn.prior_carrier,
            "seed": cfg.seed,
            "platform": platform.getName(),
            "dt_fs": dt_fs,
            "friction_per_ps": cfg.friction_per_ps,
            "mapping_sha256": self.cg.mapping.sha256(),
            "versions": versions(),
            **self.extra_metadata,
        }
        if previous is None:
            summary = self._summary_base(dt_fs, platform, stability)
            simulation.context.setPositions(positions)
            simulation.context.setVelocities(velocities)
            simulation.context.setTime(0.0)
            simulation.currentStep = 0
            with open(self.out / "topology.pdb", "w") as handle:
                app.PDBFile.writeFile(self.topology, start_positions, handle)
        else:
            summary = previous
            summary["status"] = "running"
            try:
                simulation.loadCheckpoint(str(self.out / "checkpoint.chk"))
            except openmm.OpenMMException as exc:
                raise SimulationError(
                    f"{self.out / 'checkpoint.chk'}: cannot be loaded on platform {platform.getName()} "
                    f"({str(exc).splitlines()[0]}); resume on the platform that wrote it ({previous.get('platform')})"
                ) from exc

        start_step = int(simulation.currentStep)
        n_expected = start_step // save_every + 1  # frames at steps 0, k, 2k, ... up to the checkpoint
        writer = FrameWriter(self.out / "frames.h5", topology_info, metadata, with_forces=False, resume=previous is not None)
        dcd_path = self.out / "trajectory.dcd"
        if previous is not None:
            if writer.n_frames < n_expected:
                writer.close()
                raise SimulationError(f"{self.out / 'frames.h5'}: has {writer.n_frames} frames, the checkpoint implies {n_expected}")
            writer.truncate(n_expected)
            _truncate_dcd(dcd_path, self.cg.n_beads, n_expected)
            _truncate_state_csv(self.out / "state.csv", start_step)
        dcd_handle = open(dcd_path, "r+b" if previous is not None else "wb")
        dcd = app.DCDFile(dcd_handle, self.topology, dt_fs * unit.femtosecond, 0, save_every, append=previous is not None)
        report_every = cfg.report_every_steps or save_every
        simulation.reporters.append(
            app.StateDataReporter(
                str(self.out / "state.csv"), report_every, step=True, time=True, potentialEnergy=True, kineticEnergy=True,
                totalEnergy=True, temperature=True, speed=True, append=previous is not None,
            )
        )
        if cfg.progress:
            simulation.reporters.append(
                app.StateDataReporter(
                    sys.stdout, report_every, step=True, time=True, potentialEnergy=True, temperature=True, progress=True,
                    remainingTime=True, speed=True, totalSteps=max(cfg.steps, 1), separator="  ",
                )
            )

        def save_frame() -> None:
            state = simulation.context.getState(getPositions=True, getEnergy=True, enforcePeriodicBox=False)
            if not _finite_state(state):
                raise SimulationUnstable(f"NaN/inf positions or energy at step {simulation.currentStep}")
            pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            box = np.array(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
            writer.append(pos, box, state.getTime().value_in_unit(unit.picosecond),
                          potential_energy=state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
            dcd.writeModel(state.getPositions(), periodicBoxVectors=state.getPeriodicBoxVectors())
            dcd_handle.flush()
            summary["n_frames"] = writer.n_frames
            self._checkpoint(simulation, summary)

        wall_start = time.perf_counter()
        try:
            if previous is None:
                save_frame()
            while simulation.currentStep < cfg.steps:
                chunk = min(save_every - simulation.currentStep % save_every, cfg.steps - simulation.currentStep)
                try:
                    simulation.step(chunk)
                except (openmm.OpenMMException, ValueError) as exc:
                    raise SimulationUnstable(f"{str(exc).splitlines()[0]} (near step {simulation.currentStep})") from exc
                if simulation.currentStep % save_every == 0:
                    save_frame()
            if simulation.currentStep % save_every:
                self._checkpoint(simulation, summary)  # the steps after the last frame are not lost on resume
        except SimulationUnstable as exc:
            message = (
                f"CG run became unstable: {exc}. Kept {writer.n_frames} frames (last at step "
                f"{(writer.n_frames - 1) * save_every}) in {self.out}; try a smaller --dt-fs, more friction, or check the model"
            )
            summary.update(status="failed: unstable", error=message, n_frames=writer.n_frames)
            self._write_json("summary.json", summary)
            raise SimulationUnstable(message) from exc
        finally:
            writer_frames = writer.n_frames
            writer.close()
            dcd_handle.close()
            for reporter in simulation.reporters:
                handle = getattr(reporter, "_out", None)
                if handle is not None and handle is not sys.stdout and hasattr(handle, "close"):
                    handle.close()
        wall = time.perf_counter() - wall_start
        done = int(simulation.currentStep) - start_step
        summary.update(
            status="finished",
            steps_done=int(simulation.currentStep),
            n_frames=writer_frames,
            simulated_ps=float(simulation.currentStep * dt_fs * 1e-3),
            wall_seconds_this_session=wall,
            ns_per_day=(done * dt_fs * 1e-6) / (wall / 86400.0) if wall > 0 and done else None,
            ms_per_step=1e3 * wall / done if done else None,
        )
        if simulation.currentStep % save_every:
            summary["note"] = f"the last {simulation.currentStep % save_every} steps end between saves and are not in frames.h5"
        self._write_json("summary.json", summary)
        return RunResult(self.out, summary)

    def _check_resume_settings(self, previous: dict[str, Any], platform: Any) -> None:
        cfg = self.config
        checks = {
            "temperature_K": cfg.temperature_K,
            "save_every_steps": cfg.save_every_steps,
            "n_beads": self.cg.n_beads,
        }
        for key, value in checks.items():
            if key in previous and previous[key] != value:
                raise SimulationError(f"{self.out / 'checkpoint.json'}: the run used {key}={previous[key]}, now {value}; cannot resume")
        if cfg.dt_fs is not None and abs(float(previous["dt_fs"]) - cfg.dt_fs) > 1e-9:
            raise SimulationError(f"{self.out / 'checkpoint.json'}: the run used dt_fs={previous['dt_fs']}, now {cfg.dt_fs}; cannot resume")

    def _minimize(self, platform: Any, properties: dict[str, str]) -> np.ndarray:
        import openmm
        import openmm.unit as unit

        context = openmm.Context(self.system, openmm.VerletIntegrator(0.001), platform, properties)
        context.setPositions(self.cg.positions)
        before = context.getState(getEnergy=True).getPotentialEnergy()._value
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
        state = context.getState(getEnergy=True, getPositions=True)
        if not _finite_state(state):
            raise SimulationUnstable("energy minimisation of the starting structure gave NaN/inf")
        self.log(f"minimised: {before:.1f} -> {state.getPotentialEnergy()._value:.1f} kJ/mol")
        return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)

    def _thermalize(self, positions: np.ndarray, platform: Any, properties: dict[str, str]) -> tuple[np.ndarray, Any]:
        """A short Langevin run at a small step so the stability check starts from a thermal state."""
        import openmm
        import openmm.unit as unit

        cfg = self.config
        dt = min(cfg.dt_fs or min(cfg.dt_candidates_fs), min(cfg.dt_candidates_fs))
        integrator = openmm.LangevinMiddleIntegrator(cfg.temperature_K, max(cfg.friction_per_ps, 5.0), dt * 1e-3)
        integrator.setRandomNumberSeed(openmm_seed(cfg.seed))
        context = openmm.Context(self.system, integrator, platform, properties)
        context.setPositions(positions)
        context.setVelocitiesToTemperature(cfg.temperature_K, openmm_seed(cfg.seed))
        if cfg.thermalize_steps:
            try:
                integrator.step(cfg.thermalize_steps)
            except (openmm.OpenMMException, ValueError) as exc:
                raise SimulationUnstable(f"thermalisation at {dt:g} fs failed: {str(exc).splitlines()[0]}") from exc
        state = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        if not _finite_state(state):
            raise SimulationUnstable(f"thermalisation at {dt:g} fs gave NaN/inf; the force field or the start is broken")
        return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), state.getVelocities()

