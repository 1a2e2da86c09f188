"""CG molecular dynamics in OpenMM: Langevin (LangevinMiddle) with a CG force field from ``CGNNForce``.

The run directory is the one of docs/contracts.md section 4: ``frames.h5`` (kind "cg"),
``trajectory.dcd``, ``topology.pdb``, ``state.csv``, ``summary.json`` and ``checkpoint.chk``
(with ``checkpoint.json``: the run's settings and progress while it runs). Frames, DCD models and
checkpoints are written together at every save, so a resumed run rewinds both trajectory files to
its checkpoint and continues them without gaps or duplicates. ``summary.json`` appears only when
the run ends: finished, or failed (also in set-up: minimisation, thermalisation, the time-step
search). A run that turns NaN stops with a message, keeps every frame written before, and records
the failure (``status``, ``error`` and ``cause``) in ``summary.json``.

The model never raises inside OpenMM; bad input gives NaN energy and forces (model/export.py).
When a stage sees NaN, :func:`find_cause` replays it from its last good state one step at a time
and asks the model why (``CGNNForce.diagnose``) before each step. A pair-list overflow is not an
instability: the runner regrows the pair list (``CGNNForce.regrow``, model directories) and
repeats the stage from its last good state (the production run from its checkpoint). Any other
cause ends the run with one line naming it and the way out.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..io import (OutputDirError, atomic_checkpoint, check_output_dir, describe_os_error, is_empty_dir, read_marker,
                  staging_dir, swap_in, verify_checksum, write_json_atomic, write_marker, write_text_atomic)
from ..layout import CHECKPOINT_CHK, CHECKPOINT_JSON, FRAMES_H5, STATE_CSV, SUMMARY_JSON, TOPOLOGY_PDB, TRAJECTORY_DCD
from ..model.checkpoint import model_fingerprint
from ..platforms import PlatformError, get_platform, pin_torch_threads, platform_properties, versions
from ..units import in_kj_mol, in_nm
from .force import CGNNForce
from .topology import CGConfiguration

RUN_FILES = (FRAMES_H5, TRAJECTORY_DCD, TOPOLOGY_PDB, STATE_CSV, SUMMARY_JSON, CHECKPOINT_CHK, CHECKPOINT_JSON)
DT_CANDIDATES_FS = (20.0, 15.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)
# Velocity-Verlet energy fluctuations grow as dt^2; std(E_total)/std(E_kinetic) below this is the
# usual "energy is conserved well enough" rule for choosing MD time steps.
STABILITY_RATIO = 0.1
# Regrows of the pair list in one run: each gives 30% head-room over the count seen, so more than
# a few means the liquid is collapsing, which a bigger list does not cure.
MAX_REGROWS = 4


class SimulationError(RuntimeError):
    """A CG run cannot start or continue (bad directory state, settings that do not match a resume)."""


class SimulationUnstable(SimulationError):
    """Positions or energies became NaN/infinite; everything written before is kept.

    ``cause``: what the model said about the last good positions (``Diagnosis.as_dict``), if known.
    """

    def __init__(self, message: str, cause: dict[str, Any] | None = None, where: str = "", explanation: str = ""):
        super().__init__(message)
        self.cause = cause
        self.where = where  # the stage (and step) that failed
        self.explanation = explanation  # the cause and the way out


class PairListOverflow(SimulationUnstable):
    """A stage stopped on a full pair list; the runner regrows it and repeats the stage."""

    def __init__(self, message: str, diagnosis: Any, where: str = "", explanation: str = "", results: list[StabilityResult] | None = None,
                 dt_fs: float | None = None):
        super().__init__(message, diagnosis.as_dict(), where, explanation)
        self.diagnosis = diagnosis
        self.results = results or []  # time-step candidates tested before (stability_check)
        self.dt_fs = dt_fs  # the candidate it stopped at


@dataclass
class RunConfig:
    temperature_K: float
    steps: int  # total steps; with length_ps set, derived from it once the time step is known
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
    # Multiple time stepping: > 1 runs MTSLangevinIntegrator with the network once per (outer) step
    # and the native prior forces (prior="openmm", their own force group) this many times inside it;
    # dt_fs and the NVE check's candidates are then the outer step. 1: single stepping. None: "auto",
    # the K a resumed run was made with (its checkpoint holds that integrator's state), else 1:
    # single stepping stays the default (README, "Multiple time stepping": measured against it).
    mts_inner_steps: int | None = 1
    # Simulated time in ps instead of a step count: the NVE check picks the step, and a dynamics
    # verdict needs the same time span whatever step it picked (steps = ceil(length / dt)).
    length_ps: float | None = None

    def steps_at(self, dt_fs: float) -> int:
        """Total steps at time step ``dt_fs``: ``steps``, or ``length_ps`` worth of them."""
        if self.length_ps is None:
            return self.steps
        return max(1, math.ceil(self.length_ps * 1000.0 / dt_fs - 1e-9))

    def steps_estimate(self) -> int:
        """The run's steps before its time step is known (the engine choice needs it): with
        ``length_ps``, at the given step or else at the smallest candidate, an upper bound."""
        return self.steps_at(self.dt_fs or min(self.dt_candidates_fs))

    def validate(self) -> None:
        if self.temperature_K <= 0:
            raise SimulationError(f"temperature must be positive, got {self.temperature_K} K")
        if self.steps < 0:
            raise SimulationError(f"steps must be >= 0, got {self.steps}")
        if self.length_ps is not None and not (math.isfinite(self.length_ps) and self.length_ps > 0):
            raise SimulationError(f"--length-ps {self.length_ps:g}: must be a positive number of ps")
        if self.dt_fs is not None and not self.dt_fs > 0:
            raise SimulationError(f"time step must be positive, got {self.dt_fs} fs")
        if self.save_every_steps < 1:
            raise SimulationError(f"save interval must be >= 1 step, got {self.save_every_steps}")
        if self.friction_per_ps < 0:
            raise SimulationError(f"friction must be >= 0, got {self.friction_per_ps} /ps")
        if self.device_index is not None and self.device_index < 0:
            raise SimulationError(f"--device-index must be >= 0, got {self.device_index}")
        if self.mts_inner_steps is not None and (int(self.mts_inner_steps) != self.mts_inner_steps
                                                 or self.mts_inner_steps < 1):
            raise SimulationError(f"mts_inner_steps must be a whole number >= 1, got {self.mts_inner_steps}")


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


def load_checkpoint(simulation: Any, path: Path, positions: Any) -> None:
    """``simulation.loadCheckpoint(path)``, after one force evaluation at ``positions``: OpenMM 8.5.2's
    PythonForce crashes (a segmentation fault in its first step) when a checkpoint is loaded into a
    Context that has never computed its forces, as a resumed run's fresh process does
    (tests/test_openmm_simulation.py reproduces it with a System holding only a PythonForce)."""
    simulation.context.setPositions(positions)
    simulation.context.getState(getEnergy=True)
    simulation.loadCheckpoint(str(path))


def choose_platform(name: str | None) -> Any:
    """``--platform`` of a CG run: the one named, else the fastest of CUDA and CPU that starts here."""
    try:
        return get_platform(name, "--platform", candidates=("CUDA", "CPU"))
    except PlatformError as exc:
        raise SimulationError(str(exc)) from None


def _finite_state(state: Any) -> bool:
    energy = in_kj_mol(state.getPotentialEnergy())
    positions = in_nm(state.getPositions(asNumpy=True))
    return bool(math.isfinite(energy) and np.isfinite(positions).all())


def find_cause(cgnn: CGNNForce, start: Callable[[], tuple[Any, Any]], steps: int) -> tuple[Any, int]:
    """Replay a failed stage and ask the model why it gave NaN: (Diagnosis or None, step).

    ``start`` makes the stage's Context again at its last good state (same seeds: the replay
    follows the same path) and returns (context, integrator); up to ``steps`` steps are taken one
    at a time, and the model's ``diagnose`` is asked about the positions before each. The first
    flagged configuration is the cause. Non-finite positions count only at the start: reached
    from unflagged ones, they mean the dynamics blew up, reported as a Diagnosis without flags.
    """
    import openmm

    context, integrator = start()
    last = None
    for step in range(steps + 1):
        state = context.getState(getPositions=True, enforcePeriodicBox=False)
        positions = in_nm(state.getPositions(asNumpy=True))
        if step > 0 and not np.isfinite(positions).all():
            break
        diagnosis = cgnn.diagnose(positions, in_nm(state.getPeriodicBoxVectors(asNumpy=True)))
        if diagnosis is None or diagnosis.flags:
            return diagnosis, step
        last = diagnosis
        if step < steps:
            try:
                integrator.step(1)
            except (openmm.OpenMMException, ValueError):
                break
    return last, step


def _failure(cgnn: CGNNForce, what: str, diagnosis: Any, step: int | None = None,
             results: list[StabilityResult] | None = None, dt_fs: float | None = None) -> SimulationUnstable:
    """The exception for a stage that gave NaN: PairListOverflow (to regrow) or SimulationUnstable."""
    where = what if step is None else f"{what}, step {step}"
    explanation = cgnn.explain(diagnosis)
    message = f"{where}: {explanation}"
    if diagnosis is not None and diagnosis.pair_overflow:
        return PairListOverflow(message, diagnosis, where, explanation, results, dt_fs)
    return SimulationUnstable(message, None if diagnosis is None else diagnosis.as_dict(), where, explanation)


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
    cgnn: CGNNForce | None = None,
    mts_groups: list[tuple[int, int]] | None = None,
) -> tuple[float, list[StabilityResult]]:
    """Largest time step whose NVE run from a thermal state conserves energy (ratio test) and stays finite.

    Candidates are tried from the largest down; the first that passes is returned. With ``cgnn``
    (the model in ``system``), a candidate that turns NaN is replayed to find out why: a pair-list
    overflow is no verdict on the time step and raises :class:`PairListOverflow` (the caller
    regrows the list and tests again from that candidate); other causes are named in its reason.
    ``mts_groups`` ((force group, substeps) pairs): the NVE test runs ``MTSIntegrator`` with them,
    and the candidates are outer steps.
    """
    import openmm

    def start(dt: float) -> tuple[Any, Any]:
        integrator = openmm.MTSIntegrator(dt * 1e-3, mts_groups) if mts_groups else openmm.VerletIntegrator(dt * 1e-3)
        context = openmm.Context(system, integrator, platform, properties)
        context.setPositions(positions)
        context.setVelocities(velocities)
        return context, integrator

    results: list[StabilityResult] = []
    for dt in sorted(candidates_fs, reverse=True):
        context, integrator = start(dt)
        total, kinetic = [], []
        reason = ""
        try:
            for _ in range(max(steps // sample_every, 2)):
                integrator.step(sample_every)
                state = context.getState(getEnergy=True, getPositions=True)
                if not _finite_state(state):
                    reason = "NaN/inf"
                    break
                ke = in_kj_mol(state.getKineticEnergy())
                total.append(in_kj_mol(state.getPotentialEnergy()) + ke)
                kinetic.append(ke)
        except (openmm.OpenMMException, ValueError) as exc:
            reason = f"OpenMM error: {str(exc).splitlines()[0]}"
        del context, integrator
        if reason and cgnn is not None:
            diagnosis, step = find_cause(cgnn, lambda: start(dt), steps)
            if diagnosis is not None and diagnosis.flags:  # the model's input, not the time step, is at fault
                raise _failure(cgnn, f"time-step test at {dt:g} fs", diagnosis, step, results, dt)
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


class SaveStepState:
    """A reporter that keeps the State ``Simulation`` fetches at each save step (positions, energy).

    OpenMM computes the energy again for every ``getState(getEnergy=True)`` (a full network
    evaluation), and ``Simulation`` merges the requests of all reporters due at a step into one
    call. Registered beside the state.csv and progress reporters, this one makes the frame saved
    at that step share their State instead of asking for its own: one evaluation per save, not two.
    """

    def __init__(self, interval: int) -> None:
        self.interval = int(interval)
        self.state: Any = None
        self.step = -1

    def describeNextReport(self, simulation: Any) -> dict[str, Any]:
        return {"steps": self.interval - simulation.currentStep % self.interval, "periodic": False,
                "include": ["positions", "energy"]}

    def report(self, simulation: Any, state: Any) -> None:
        self.state, self.step = state, int(simulation.currentStep)

    def take(self, step: int) -> Any:
        """The State fetched at ``step``, or None (then the caller asks the Context itself)."""
        state = self.state if self.step == step else None
        self.state = None
        return state


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
    write_text_atomic(path, "".join(kept))


@dataclass
class _Prepared:
    """What the production run starts from: a fresh run's set-up, or a resumed run's checkpoint."""

    properties: dict[str, str]  # the platform's
    dt_fs: float
    previous: dict[str, Any] | None = None  # checkpoint.json of the run being resumed
    positions: np.ndarray | None = None  # fresh runs: the thermalised state
    velocities: Any = None
    stability: Any = None  # the time-step search's results, if it ran


class _RunFiles:
    """frames.h5 and trajectory.dcd, appended to together at every save."""

    def __init__(self, writer: Any, dcd_handle: Any, dcd: Any, shared: SaveStepState | None = None) -> None:
        self.writer, self.dcd_handle, self.dcd, self.shared = writer, dcd_handle, dcd, shared
        self.n_frames = writer.n_frames

    def append(self, simulation: Any) -> None:
        import openmm.unit as unit

        state = None if self.shared is None else self.shared.take(simulation.currentStep)
        if state is None:  # the first frame, or a step no reporter was due at
            state = simulation.context.getState(getPositions=True, getEnergy=True, enforcePeriodicBox=False)
        if not _finite_state(state):
            raise SimulationUnstable(f"NaN/inf positions or energy at step {simulation.currentStep}")
        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box = np.array(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
        self.writer.append(pos, box, state.getTime().value_in_unit(unit.picosecond),
                           potential_energy=state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        # plain nm array: the same float32 values as a list of Vec3, without a unit conversion per bead
        self.dcd.writeModel(pos, periodicBoxVectors=state.getPeriodicBoxVectors())
        self.dcd_handle.flush()
        self.n_frames = self.writer.n_frames

    def close(self) -> None:
        self.writer.close()
        self.dcd_handle.close()


class CGRun:
    """One CG run directory; :meth:`run` simulates until ``config.steps`` steps in total are done."""

    def __init__(
        self,
        cgnn: CGNNForce,
        cg: CGConfiguration,
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
        self._check_mts(config.mts_inner_steps)
        self.cg = cg
        self.out = Path(out_dir)
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.extra_metadata = dict(metadata or {})
        self.log = log
        self.regrows: list[dict[str, Any]] = []  # pair-list regrows of this session
        self._prepare_directory()

    def _prepare_directory(self) -> None:
        """Check --out before anything is computed; nothing is deleted here (see ``io.output_dir``)."""
        self.final_out = self.out
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if self.resume and CHECKPOINT_CHK in existing:
            check_output_dir(self.out, "cg", resume=True)
            missing = [n for n in (CHECKPOINT_JSON, FRAMES_H5, TRAJECTORY_DCD) if n not in existing]
            if missing:
                raise SimulationError(f"{self.out}: cannot resume, missing {missing}")
            verify_checksum(self.out / CHECKPOINT_CHK, required=False)  # older runs have no checksum file
            self.replace = False
            return
        if self.resume and existing:
            raise SimulationError(f"{self.out}: has run files ({', '.join(existing)}) but no checkpoint.chk to resume from; use --overwrite")
        if self.resume and not is_empty_dir(self.out):
            raise OutputDirError(f"--out {self.out}: holds no CG run to resume (no checkpoint.chk); choose another --out")
        self.resume = False  # --resume of a directory with nothing in it starts the run
        try:
            self.replace = check_output_dir(self.out, "cg", overwrite=self.overwrite)
        except OutputDirError as exc:
            raise SimulationError(str(exc)) from None

    def _open_output(self) -> None:
        """Start writing: in --out itself, or (replacing a run) in a sibling swapped in when the run is finished."""
        self._started = not self.resume  # a resumed run starts once its settings are found to match
        if self.resume:
            return
        self.out = staging_dir(self.final_out) if self.replace else self.final_out
        self.out.mkdir(parents=True, exist_ok=True)
        write_marker(self.out, "cg")

    # -- pieces ---------------------------------------------------------------------------------

    def _build(self, dt_fs: float, platform: Any, properties: dict[str, str]) -> Any:
        import openmm
        import openmm.app as app
        import openmm.unit as unit

        args = (self.config.temperature_K * unit.kelvin, self.config.friction_per_ps / unit.picosecond,
                dt_fs * unit.femtosecond)
        groups = self.mts_groups()
        integrator = openmm.MTSLangevinIntegrator(*args, groups) if groups else openmm.LangevinMiddleIntegrator(*args)
        integrator.setRandomNumberSeed(openmm_seed(self.config.seed))
        return app.Simulation(self.topology, self.system, integrator, platform, properties)

    def _check_mts(self, inner: int | None) -> None:
        cgnn = self.cgnn
        if inner is not None and inner > 1 and (cgnn.prior_carrier != "openmm"
                                                or cgnn.prior_force_group == cgnn.model_force_group):
            raise SimulationError(
                f"multiple time stepping needs the prior as native OpenMM forces in its own force group "
                f"(prior='openmm'); this force field has the prior carried as {cgnn.prior_carrier!r}")

    def _resolve_mts(self, previous: dict[str, Any] | None) -> None:
        """Fix ``config.mts_inner_steps``: "auto" (None) takes a resumed run's K (its checkpoint holds
        that integrator's state; runs of versions before MTS stepped singly), else 1; an explicit K
        must match a resumed run's."""
        inner = self.config.mts_inner_steps
        if previous is not None:
            used = int(previous.get("mts_inner_steps") or 1)
            if inner is not None and inner != used:
                raise SimulationError(f"{self.out / CHECKPOINT_JSON}: the run used mts_inner_steps={used}, now {inner}; "
                                      "cannot resume (leave --mts-inner-steps at auto to keep the run's)")
            inner = used
        elif inner is None:
            inner = 1
        self._check_mts(inner)
        self.config = replace(self.config, mts_inner_steps=inner)

    def mts_groups(self) -> list[tuple[int, int]] | None:
        """(force group, evaluations per outer step) for MTS: the network once, the native prior
        ``mts_inner_steps`` times; None for single stepping."""
        inner = int(self.config.mts_inner_steps or 1)
        if inner == 1:
            return None
        return [(self.cgnn.model_force_group, 1), (self.cgnn.prior_force_group, inner)]

    def stepping(self) -> dict[str, Any]:
        """summary.json's ``integrator`` and ``mts_inner_steps`` (a resumed run of an older version,
        which recorded neither, gets them too)."""
        return {"integrator": "MTSLangevinIntegrator" if self.mts_groups() else "LangevinMiddleIntegrator",
                "mts_inner_steps": int(self.config.mts_inner_steps or 1)}

    def _metadata(self, dt_fs: float | None, platform: Any) -> dict[str, Any]:
        """The run's settings and provenance, computed once: frames.h5 carries them and summary.json
        derives from them (there the force field is named ``model``)."""
        return {
            "kind": "cg",
            "temperature_K": self.config.temperature_K,
            "forcefield": str(self.cgnn.source),
            "prior_carrier": self.cgnn.prior_carrier,
            "network": self.cgnn.network,  # False: the prior-only ablation
            "seed": self.config.seed,
            "platform": platform.getName(),
            "dt_fs": dt_fs,
            "friction_per_ps": self.config.friction_per_ps,
            "mapping_sha256": self.cg.mapping.sha256(),
            "versions": versions(),
            **self.extra_metadata,
        }

    def _summary_base(self, metadata: dict[str, Any], stability: list[StabilityResult] | None) -> dict[str, Any]:
        """summary.json of a fresh run: ``metadata`` and what the set-up chose and found."""
        m = metadata
        return {
            "kind": m["kind"],
            "status": "running",
            "model": m["forcefield"],
            "model_sha256": model_fingerprint(self.cgnn.source),
            "prior_carrier": m["prior_carrier"],
            "network": m["network"],
            "temperature_K": m["temperature_K"],
            "dt_fs": m["dt_fs"],
            "dt_chosen_by": "user" if self.config.dt_fs is not None else "stability check",
            "largest_stable_dt_fs": None if stability is None else m["dt_fs"],
            "dt_stability": None if stability is None else [asdict(r) for r in stability],
            # the check starts at the largest candidate: a stable result equal to it is a lower bound
            "dt_candidates_fs": None if stability is None else sorted(self.config.dt_candidates_fs, reverse=True),
            "friction_per_ps": m["friction_per_ps"],
            **self.stepping(),
            **self.cgnn.constraint_report(),  # constrain_bonds, constrained_bonds, n_constraints
            "save_every_steps": self.config.save_every_steps,
            "seed": m["seed"],
            "platform": m["platform"],
            "n_beads": self.cg.n_beads,
            "composition": self.cg.composition(),
            "box_nm": np.asarray(self.cg.box).tolist(),
            "density_kg_m3": self.cg.density_kg_m3(),
            "mapping_sha256": m["mapping_sha256"],
            "versions": m["versions"],
            "cuda_graphs": self.cgnn.cuda_graphs_report or self.cgnn.cuda_graphs,
            "force_engine": self.cgnn.engine_report(),  # TorchForce or PythonForce (+ compile time, cache)
            "torch_threads": getattr(self, "torch_threads", None),  # CPU: pinned to OpenMM's thread count
            "max_pairs_per_bead": self._max_pairs_per_bead(),
            "pair_list_regrown": self.regrows,
            **{key: m[key] for key in self.extra_metadata},
        }

    def _write_json(self, name: str, summary: dict[str, Any]) -> None:
        write_json_atomic(self.out / name, summary, default=str)

    def _checkpoint(self, simulation: Any, progress: dict[str, Any]) -> None:
        with atomic_checkpoint(self.out / CHECKPOINT_CHK) as tmp:
            simulation.saveCheckpoint(str(tmp))
        progress.update(steps_done=int(simulation.currentStep))
        self._write_json(CHECKPOINT_JSON, progress)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run, and swap a replacement run into --out only when it has finished.

        Any failure after the run directory was opened leaves a ``summary.json`` with the status
        and its cause there (when the disk still takes one); the old run of --overwrite stays put.
        """
        platform = choose_platform(self.config.platform)  # a bad --platform fails before anything is written
        try:
            platform_properties(platform, self.config.device_index)  # and so does --device-index without a GPU
        except PlatformError as exc:
            raise SimulationError(str(exc)) from None
        self._open_output()
        try:
            result = self._run(platform)
        except Exception as exc:
            if self._started:
                self._record_failure(exc)
            if self.out != self.final_out:
                note = f" (the failed run is in {self.out}; {self.final_out} is unchanged)"
                if isinstance(exc, SimulationError):
                    raise type(exc)(f"{exc}{note}") from exc
            raise
        if self.out != self.final_out:
            swap_in(self.out, self.final_out)
            self.out = self.final_out
            result.out_dir = self.final_out
        return result

    def _record_failure(self, exc: BaseException) -> None:
        summary_path = self.out / SUMMARY_JSON
        try:
            if summary_path.exists() and json.loads(summary_path.read_text()).get("status", "").startswith("failed"):
                return  # the run recorded its own failure
            previous = self.out / CHECKPOINT_JSON
            summary = json.loads(previous.read_text()) if previous.exists() else {"kind": "cg"}
            cause = describe_os_error(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0] if str(exc) else ""
            summary.update(status=f"failed: {type(exc).__name__}", error=cause)
            self._write_json(SUMMARY_JSON, summary)
        except (OSError, ValueError):
            pass  # a full disk may refuse even this; the exception itself still says what failed

    def _run(self, platform: Any) -> RunResult:
        prepared = self._prepare(platform)
        self.config = replace(self.config, steps=self.config.steps_at(prepared.dt_fs))
        metadata = self._metadata(prepared.dt_fs, platform)
        simulation = self._build(prepared.dt_fs, platform, prepared.properties)
        summary = self._start(simulation, prepared, metadata)
        start_step = int(simulation.currentStep)
        with self._outputs(simulation, prepared, metadata) as files:
            wall_start = time.perf_counter()
            regrow_from_checkpoint = self._production(simulation, files, summary, fresh=prepared.previous is None)
        if regrow_from_checkpoint is not None:
            # a full pair list is no instability: regrow it and go on from the last checkpoint
            self._regrow(regrow_from_checkpoint)
            del simulation
            self.resume = True
            return self.run()
        return self._finish(simulation, summary, files.n_frames, start_step, prepared.dt_fs,
                            time.perf_counter() - wall_start)

    def _prepare(self, platform: Any) -> _Prepared:
        """The system with the force field, and the state production starts from: a resumed run's
        checkpoint (its settings checked against this run's), or a fresh run's set-up."""
        cfg = self.config
        self.topology = self.cg.topology()
        self.system = self.cg.system()
        properties = platform_properties(platform, cfg.device_index)
        self.torch_threads = pin_torch_threads(platform, properties)  # torch's pool = OpenMM's CPU threads
        # On CUDA: the graph-safe module with CUDA graphs; on CPU the compiled engine for long runs.
        self.cgnn.add_to(self.system, platform, steps=cfg.steps_estimate())
        if self.resume:
            previous = json.loads((self.out / CHECKPOINT_JSON).read_text())
            self._check_resume_settings(previous, platform)
            self._resolve_mts(previous)
            self._started = True
            if read_marker(self.out) is None:  # a run of an older version: it is a CG run
                write_marker(self.out, "cg")
            (self.out / SUMMARY_JSON).unlink(missing_ok=True)  # it marks a run that has ended
            grown, current = previous.get("max_pairs_per_bead"), self._max_pairs_per_bead()
            if grown is not None and current is not None and float(grown) > current:
                self.cgnn.resize_pair_list(self.system, float(grown))  # the list this run had regrown to
            return _Prepared(properties, float(previous["dt_fs"]), previous, stability=previous.get("dt_stability"))
        self._resolve_mts(None)
        try:
            positions, velocities, dt_fs, stability = self._set_up(platform, properties)
        except SimulationUnstable as exc:
            # the run had started: say how it ended, and why
            summary = self._summary_base(self._metadata(cfg.dt_fs, platform), None)
            summary.update(status="failed: set-up", error=str(exc), cause=exc.cause)
            self._write_json(SUMMARY_JSON, summary)
            raise
        return _Prepared(properties, dt_fs, None, positions, velocities, stability)

    def _start(self, simulation: Any, prepared: _Prepared, metadata: dict[str, Any]) -> dict[str, Any]:
        """Put the prepared state into ``simulation``; returns the summary the run keeps up to date."""
        import openmm

        previous = prepared.previous
        if previous is None:
            simulation.context.setPositions(prepared.positions)
            simulation.context.setVelocities(prepared.velocities)
            simulation.context.setTime(0.0)
            simulation.currentStep = 0
            return self._summary_base(metadata, prepared.stability)
        summary = previous
        summary.update(status="running", **self.stepping())
        summary["pair_list_regrown"] = list(previous.get("pair_list_regrown") or []) + [
            r for r in self.regrows if r not in (previous.get("pair_list_regrown") or [])]
        summary["max_pairs_per_bead"] = self._max_pairs_per_bead()
        try:
            load_checkpoint(simulation, self.out / CHECKPOINT_CHK, self.cg.positions)
        except openmm.OpenMMException as exc:
            raise SimulationError(
                f"{self.out / CHECKPOINT_CHK}: cannot be loaded on platform {simulation.context.getPlatform().getName()} "
                f"({str(exc).splitlines()[0]}); resume on the platform that wrote it ({previous.get('platform')})"
            ) from exc
        return summary

    @contextmanager
    def _outputs(self, simulation: Any, prepared: _Prepared, metadata: dict[str, Any]) -> Iterator[_RunFiles]:
        """The production run's files, open while it runs: frames.h5 and trajectory.dcd (a resumed
        run's rewound to its checkpoint), state.csv and the progress on stdout (reporters), and a
        fresh run's topology.pdb. Closed however the run ends."""
        import openmm.app as app
        import openmm.unit as unit

        from ..frames import FrameWriter, TopologyInfo

        cfg, previous = self.config, prepared.previous
        save_every = cfg.save_every_steps
        start_positions = self.cg.with_positions(
            prepared.positions if previous is None else self.cg.positions).positions_quantity()
        if previous is None:
            with open(self.out / TOPOLOGY_PDB, "w") as handle:
                app.PDBFile.writeFile(self.topology, start_positions, handle)
        start_step = int(simulation.currentStep)
        n_expected = start_step // save_every + 1  # frames at steps 0, k, 2k, ... up to the checkpoint
        topology_info = TopologyInfo.from_openmm(self.topology, self.system, start_positions)
        writer = FrameWriter(self.out / FRAMES_H5, topology_info, metadata, with_forces=False, resume=previous is not None)
        dcd_path = self.out / TRAJECTORY_DCD
        if previous is not None:
            if writer.n_frames < n_expected:
                writer.close()
                raise SimulationError(f"{self.out / FRAMES_H5}: has {writer.n_frames} frames, the checkpoint implies {n_expected}")
            writer.truncate(n_expected)
            _truncate_dcd(dcd_path, self.cg.n_beads, n_expected)
            _truncate_state_csv(self.out / STATE_CSV, start_step)
        dcd_handle = open(dcd_path, "r+b" if previous is not None else "wb")
        dcd = app.DCDFile(dcd_handle, self.topology, prepared.dt_fs * unit.femtosecond, 0, save_every,
                          append=previous is not None)
        report_every = cfg.report_every_steps or save_every
        simulation.reporters.append(
            app.StateDataReporter(
                str(self.out / STATE_CSV), report_every, step=True, time=True, potentialEnergy=True, kineticEnergy=True,
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
        shared = SaveStepState(cfg.save_every_steps)  # the frame shares the reporters' State at a save step
        simulation.reporters.append(shared)
        files = _RunFiles(writer, dcd_handle, dcd, shared)
        try:
            yield files
        finally:
            files.close()
            for reporter in simulation.reporters:
                handle = getattr(reporter, "_out", None)
                if handle is not None and handle is not sys.stdout and hasattr(handle, "close"):
                    handle.close()

    def _production(self, simulation: Any, files: _RunFiles, summary: dict[str, Any], fresh: bool) -> PairListOverflow | None:
        """Step to ``config.steps``: a frame and a checkpoint every ``save_every_steps``.

        Returns the pair-list overflow that stopped it when the runner can regrow the list and go on
        from the checkpoint; any other instability ends the run, recorded in summary.json.
        """
        import openmm

        cfg = self.config
        save_every = cfg.save_every_steps
        try:
            if fresh:
                self._save_frame(simulation, files, summary)
            while simulation.currentStep < cfg.steps:
                chunk = min(save_every - simulation.currentStep % save_every, cfg.steps - simulation.currentStep)
                try:
                    simulation.step(chunk)
                except (openmm.OpenMMException, ValueError) as exc:
                    raise SimulationUnstable(f"{str(exc).splitlines()[0]} (near step {simulation.currentStep})") from exc
                if simulation.currentStep % save_every == 0:
                    self._save_frame(simulation, files, summary)
            if simulation.currentStep % save_every:
                self._checkpoint(simulation, summary)  # the steps after the last frame are not lost on resume
        except SimulationUnstable as exc:
            failure = self._production_failure(simulation, exc, save_every)
            if (isinstance(failure, PairListOverflow) and (self.out / CHECKPOINT_CHK).exists()
                    and self.cgnn.can_regrow and len(self.regrows) < MAX_REGROWS):
                return failure
            message = (
                f"CG run became unstable: {failure.where}. Kept {files.n_frames} frames (last at step "
                f"{(files.n_frames - 1) * save_every}) in {self.out}; {failure.explanation}"
            )
            summary.update(status="failed: unstable", error=message, n_frames=files.n_frames, cause=failure.cause)
            self._write_json(SUMMARY_JSON, summary)
            raise SimulationUnstable(message, failure.cause) from exc
        return None

    def _save_frame(self, simulation: Any, files: _RunFiles, summary: dict[str, Any]) -> None:
        files.append(simulation)
        summary["n_frames"] = files.n_frames
        self._checkpoint(simulation, summary)

    def _finish(self, simulation: Any, summary: dict[str, Any], n_frames: int, start_step: int, dt_fs: float,
                wall: float) -> RunResult:
        """The finished run's summary.json: progress and speed of this session."""
        save_every = self.config.save_every_steps
        done = int(simulation.currentStep) - start_step
        summary.update(
            status="finished",
            steps_done=int(simulation.currentStep),
            n_frames=n_frames,
            simulated_ps=float(simulation.currentStep * dt_fs * 1e-3),
            wall_seconds_this_session=wall,
            ns_per_day=(done * dt_fs * 1e-6) / (wall / 86400.0) if wall > 0 and done else None,
            ms_per_step=1e3 * wall / done if done else None,
            force_engine=self.cgnn.engine_report(),  # again at the end: its pair list's calls and rebuilds
        )
        if simulation.currentStep % save_every:
            summary["note"] = f"the last {simulation.currentStep % save_every} steps end between saves and are not in frames.h5"
        self._write_json(SUMMARY_JSON, summary)
        return RunResult(self.out, summary)

    def _check_resume_settings(self, previous: dict[str, Any], platform: Any) -> None:
        cfg = self.config
        checks = {
            "temperature_K": cfg.temperature_K,
            "save_every_steps": cfg.save_every_steps,
            "n_beads": self.cg.n_beads,
            "network": self.cgnn.network,
            "constrain_bonds": self.cgnn.constrain_bonds,
        }
        for key, value in checks.items():
            if key in previous and previous[key] != value:
                raise SimulationError(f"{self.out / CHECKPOINT_JSON}: the run used {key}={previous[key]}, now {value}; cannot resume")
        # The same model and mapping: a run continued with another force field is not one run.
        identity = {"mapping_sha256": self.cg.mapping.sha256(), "model_sha256": model_fingerprint(self.cgnn.source)}
        if "model_sha256" not in previous:  # runs of older versions recorded only the model's path
            identity = {"mapping_sha256": identity["mapping_sha256"], "model": str(self.cgnn.source)}
        for key, value in identity.items():
            if key in previous and previous[key] != value:
                what = "mapping" if key == "mapping_sha256" else "model (--forcefield)"
                raise SimulationError(f"{self.out / CHECKPOINT_JSON}: the run was made with another {what} "
                                      f"({str(previous[key])[:40]} there, {str(value)[:40]} now); cannot resume it with this one")
        if cfg.dt_fs is not None and abs(float(previous["dt_fs"]) - cfg.dt_fs) > 1e-9:
            raise SimulationError(f"{self.out / CHECKPOINT_JSON}: the run used dt_fs={previous['dt_fs']}, now {cfg.dt_fs}; cannot resume")

    # -- set-up and failures ---------------------------------------------------------------------

    def _max_pairs_per_bead(self) -> float | None:
        value = getattr(self.cgnn.module, "max_pairs_per_bead", None)
        return None if value is None else float(value)

    def _regrow(self, failure: PairListOverflow) -> None:
        """Give the pair list room for the count seen, or end the run with the one-line cause."""
        diagnosis = failure.diagnosis
        if len(self.regrows) >= MAX_REGROWS:
            raise SimulationUnstable(f"{failure} (after {len(self.regrows)} regrows of the pair list: the liquid is "
                                     "collapsing; check the model and the starting structure)", failure.cause)
        grown = self.cgnn.regrow(self.system, diagnosis)
        if grown is None:
            raise SimulationUnstable(str(failure), failure.cause)
        self.regrows.append({"where": failure.where, "pair_count": diagnosis.count, "pair_capacity": diagnosis.capacity,
                             "max_pairs_per_bead_before": diagnosis.max_pairs_per_bead, "max_pairs_per_bead": grown})
        self.log(f"{failure.where}: {diagnosis.count} intermolecular pairs over the pair list's capacity "
                 f"{diagnosis.capacity}; regrown to max_pairs_per_bead {grown:g}, repeating from the last good state")

    def _set_up(self, platform: Any, properties: dict[str, str]) -> tuple[np.ndarray, Any, float, Any]:
        """Minimise, thermalise and (unless given) choose the time step; each stage is repeated
        after a pair-list regrow. Returns (positions, velocities, dt_fs, stability results)."""
        cfg = self.config
        positions = self.cg.positions
        while True:
            try:
                if cfg.minimize:
                    positions = self._minimize(platform, properties)
                break
            except PairListOverflow as failure:
                self._regrow(failure)
        while True:
            try:
                positions, velocities = self._thermalize(positions, platform, properties)
                break
            except PairListOverflow as failure:
                self._regrow(failure)
        if platform.getName() == "CUDA" and self.cgnn.cuda_graphs_report is None:
            self.cgnn.cuda_graphs_report = {"platform": "CUDA", "use_cuda_graphs": self.cgnn.cuda_graphs}
        if cfg.dt_fs is not None:
            return positions, velocities, float(cfg.dt_fs), None
        self.log(f"choosing the CG time step (NVE energy conservation, {cfg.stability_steps} steps each):")
        candidates, tested, regrown_at = tuple(cfg.dt_candidates_fs), [], set()
        while True:
            try:
                dt_fs, results = stability_check(self.system, positions, velocities, platform, properties, candidates,
                                                 cfg.stability_steps, log=self.log, cgnn=self.cgnn,
                                                 mts_groups=self.mts_groups())
                break
            except PairListOverflow as failure:
                tested += failure.results  # the larger candidates failed for other reasons: not again
                dt = failure.dt_fs
                if dt in regrown_at or len(self.regrows) >= MAX_REGROWS:
                    # Overflowing again after a regrow: a step this long throws beads together. That
                    # is a verdict on the step, with the cause named.
                    reason = f"the pair list overflowed again after a regrow ({failure.explanation})"
                    tested.append(StabilityResult(dt, False, None, reason))
                    self.log(f"  dt = {dt:g} fs: unstable ({reason})")
                    candidates = tuple(c for c in candidates if c < dt)
                    if not candidates:
                        raise SimulationUnstable(f"no stable time step: {failure}", failure.cause, failure.where,
                                                 failure.explanation) from None
                    continue
                self._regrow(failure)  # a model.pt cannot grow: the set-up ends with the cause
                regrown_at.add(dt)
                candidates = tuple(c for c in candidates if c <= dt)
        self.log(f"largest stable time step: {dt_fs:g} fs")
        return positions, velocities, dt_fs, tested + results

    def _production_failure(self, simulation: Any, exc: SimulationUnstable, save_every: int) -> SimulationUnstable:
        """Why the production run gave NaN: replayed from its checkpoint (same random numbers)."""
        checkpoint = self.out / CHECKPOINT_CHK
        step = int(simulation.currentStep)

        def start() -> tuple[Any, Any]:
            if checkpoint.exists():
                load_checkpoint(simulation, checkpoint, self.cg.positions)
            return simulation.context, simulation.integrator

        begin = int(json.loads((self.out / CHECKPOINT_JSON).read_text())["steps_done"]) if checkpoint.exists() else step
        diagnosis, offset = find_cause(self.cgnn, start, max(step - begin, save_every) if checkpoint.exists() else 0)
        if diagnosis is not None and diagnosis.flags:
            return _failure(self.cgnn, "production run", diagnosis, begin + offset)
        return _failure(self.cgnn, str(exc), diagnosis)

    def _minimize(self, platform: Any, properties: dict[str, str]) -> np.ndarray:
        import openmm
        import openmm.unit as unit

        context = openmm.Context(self.system, openmm.VerletIntegrator(0.001), platform, properties)
        context.setPositions(self.cg.positions)
        before = in_kj_mol(context.getState(getEnergy=True).getPotentialEnergy())
        if not math.isfinite(before):
            diagnosis = self.cgnn.diagnose(self.cg.positions, self.cg.box)
            raise _failure(self.cgnn, "the starting structure", diagnosis)
        try:
            openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
        except (openmm.OpenMMException, ValueError) as exc:
            raise SimulationUnstable(f"energy minimisation failed: {str(exc).splitlines()[0]}") from exc
        state = context.getState(getEnergy=True, getPositions=True)
        if not _finite_state(state):
            positions = in_nm(state.getPositions(asNumpy=True))
            diagnosis = self.cgnn.diagnose(positions, self.cg.box) if np.isfinite(positions).all() else None
            if diagnosis is not None and diagnosis.flags:
                raise _failure(self.cgnn, "energy minimisation", diagnosis)
            raise SimulationUnstable("energy minimisation of the starting structure gave NaN/inf; "
                                     "the force field or the starting structure is broken")
        self.log(f"minimised: {before:.1f} -> {in_kj_mol(state.getPotentialEnergy()):.1f} kJ/mol")
        return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)

    def _thermalize(self, positions: np.ndarray, platform: Any, properties: dict[str, str]) -> tuple[np.ndarray, Any]:
        """A short Langevin run at a small step so the stability check starts from a thermal state."""
        import openmm
        import openmm.unit as unit

        cfg = self.config
        dt = min(cfg.dt_fs or min(cfg.dt_candidates_fs), min(cfg.dt_candidates_fs))

        def start() -> tuple[Any, Any]:
            integrator = openmm.LangevinMiddleIntegrator(cfg.temperature_K, max(cfg.friction_per_ps, 5.0), dt * 1e-3)
            integrator.setRandomNumberSeed(openmm_seed(cfg.seed))
            context = openmm.Context(self.system, integrator, platform, properties)
            context.setPositions(positions)
            context.setVelocitiesToTemperature(cfg.temperature_K, openmm_seed(cfg.seed))
            return context, integrator

        context, integrator = start()
        failed, state = "", None
        try:
            if cfg.thermalize_steps:
                integrator.step(cfg.thermalize_steps)
            # The CPU platform's getState raises on NaN coordinates itself.
            state = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        except (openmm.OpenMMException, ValueError) as exc:
            failed = str(exc).splitlines()[0]
        if failed or not _finite_state(state):
            del context, integrator
            diagnosis, step = find_cause(self.cgnn, start, cfg.thermalize_steps)
            raise _failure(self.cgnn, f"thermalisation at {dt:g} fs" + (f" ({failed})" if failed else ""), diagnosis, step)
        return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), state.getVelocities()
