"""One all-atom run at one temperature: minimise, NPT, NVT production saving frames; resumable.

NPT runs at least ``equilibrate_ps`` and is extended in steps of half that, up to
``max_equilibrate_ps``, until the density no longer drifts (:func:`density_convergence`). Its
result goes to ``npt.json``. A run may stop there (``npt_only``) and continue later with an NVT
density given from outside: the linear rho(T) fit over the NPT runs of all temperatures
(``run.py``), which is less noisy than one short run's own average.

Checkpoint file (``checkpoint.chk``): one JSON line with the run's progress, then the bytes of
an OpenMM checkpoint (``Context.createCheckpoint``). Both are written to a temporary file and
renamed together, so progress and dynamics state can never disagree. A production checkpoint is
written *before* the frame taken from the same state is appended; a resumed run therefore
finds either that frame or recomputes it from the restored state: no frame is lost or repeated.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io import CorruptFileError, atomic_checkpoint, atomic_path, verify_checksum, write_text_atomic
from ..layout import CHECKPOINT_CHK, FRAMES_H5, NPT_DENSITY_CSV, NPT_JSON, SUMMARY_JSON, TOPOLOGY_PDB, TRAJECTORY_DCD
from ..platforms import get_platform, platform_properties
from ..units import density_kg_m3, in_amu, in_kj_mol, in_kj_mol_nm, in_nm, in_nm3, temperature_from_kinetic_K

SAMPLE_EVERY_STEPS = 50  # NPT volume sampling; the barostat moves every 25 steps
CHECKPOINT_EVERY_S = 60.0  # NPT checkpoints; production checkpoints at every frame
REPORT_EVERY_S = 30.0  # progress lines at every 10 % of a stage, or at least this often
MINIMIZE_TOLERANCE = 100.0  # kJ/mol/nm RMS force: enough to remove insertion clashes
MINIMIZE_MAX_ITERATIONS = 2000


class AARunError(RuntimeError):
    """The simulation itself failed (e.g. the box shrank below twice the cutoff)."""


@dataclass
class RunSettings:
    """Everything that fixes a run's trajectory (stored in run.json, compared on resume)."""

    n_units: int | None  # formula units of the liquid; None when the counts are off its ratio
    composition: dict[str, int]  # molecules of each residue, in box order
    temperature_K: float
    equilibrate_ps: float
    production_ps: float
    save_every_ps: float
    charge_scale: float
    seed: int
    cutoff_nm: float
    dt_fs: float
    start_density_kg_m3: float
    pressure_bar: float
    friction_per_ps: float
    platform: str
    forcefield: str  # description (source and hash)
    max_equilibrate_ps: float | None = None  # NPT extension limit while the density drifts; None: no extension

    def unit_counts(self) -> dict[str, int | None]:
        """``n_units``, plus ``n_pairs`` when the box is pairs (two molecule types, as many of each)."""
        counts: dict[str, int | None] = {"n_units": self.n_units}
        if len(self.composition) == 2 and len(set(self.composition.values())) == 1:
            counts["n_pairs"] = next(iter(self.composition.values()))
        return counts

    @property
    def dt_ps(self) -> float:
        return self.dt_fs / 1000.0

    @property
    def npt_steps(self) -> int:
        return round(self.equilibrate_ps / self.dt_ps)

    @property
    def max_npt_steps(self) -> int:
        return max(self.npt_steps, round((self.max_equilibrate_ps or 0.0) / self.dt_ps))

    @property
    def npt_extension_steps(self) -> int:
        return max(1, self.npt_steps // 2)

    @property
    def steps_per_frame(self) -> int:
        return round(self.save_every_ps / self.dt_ps)

    @property
    def n_frames(self) -> int:
        return int(math.floor(self.production_ps / self.save_every_ps + 1e-9))

    def openmm_seed(self, offset: int) -> int:
        # OpenMM treats seed 0 as "pick one at random"; shift so every user seed is reproducible.
        return (self.seed * 7 + offset + 1) % (2**31 - 1) or 1


@dataclass
class Progress:
    stage: str  # "npt", "npt_done" (NPT finished, waiting for its NVT density) or "nvt"
    npt_volumes: list[tuple[int, float]]  # (step, nm3) samples
    frames_done: int = 0  # production frames whose state has been checkpointed
    nvt_edge_nm: float | None = None
    ms_per_step: float | None = None  # production, including frame and checkpoint writing
    npt_ms_per_step: float | None = None
    npt_total_steps: int | None = None  # the NPT length, once extensions are decided (None: equilibrate_ps)
    nvt_density: dict[str, Any] | None = None  # where the NVT box came from (own NPT mean or a rho(T) fit)


DENSITY_BLOCKS = 4
DENSITY_DRIFT_SIGMAS = 3.0  # a half-to-half change beyond this many standard errors is a trend, not noise


def density_convergence(densities: Sequence[float]) -> dict[str, Any]:
    """Mean, block standard error and drift of NPT densities, and whether the drift is noise.

    The samples are correlated, so errors come from the spread of ``DENSITY_BLOCKS`` block means.
    Drift is the change from the first to the second half. It is judged against the block error
    of the detrended series, since a trend would otherwise inflate the error it is tested against;
    beyond ``DENSITY_DRIFT_SIGMAS`` times the error of a half-to-half difference it is a trend.
    """
    from ..analysis.density import block_standard_error

    values = np.asarray(densities, dtype=float)
    sem = block_standard_error(values, DENSITY_BLOCKS)
    if sem is None:
        return {"density_kg_m3": float(values.mean()), "density_sem_kg_m3": None,
                "density_drift_kg_m3": None, "density_converged": None}
    halves = np.array_split(values, 2)
    drift = float(halves[1].mean() - halves[0].mean())
    index = np.arange(values.size)
    detrended = values - np.polyval(np.polyfit(index, values, 1), index)
    noise = block_standard_error(detrended, DENSITY_BLOCKS) or 0.0
    # A half's mean has about sqrt(2) times the error of the whole; their difference twice it.
    converged = abs(drift) <= DENSITY_DRIFT_SIGMAS * 2.0 * max(noise, 1e-12)
    return {"density_kg_m3": float(values.mean()), "density_sem_kg_m3": sem,
            "density_drift_kg_m3": drift, "density_converged": bool(converged)}


class SingleRun:
    """Drives one run directory; ``run()`` starts or resumes it and returns its summary."""

    def __init__(self, run_dir: Path, settings: RunSettings, topology: Any, positions: np.ndarray, ff: Any,
                 metadata: dict[str, Any], log=print, device_index: int | None = None) -> None:
        self.dir = Path(run_dir)
        self.device_index = device_index  # not a setting: a run may resume on another GPU
        self.s = settings
        self.topology = topology
        self.initial_positions = positions
        self.ff = ff
        self.metadata = metadata
        self.log = log
        masses = [in_amu(a.element.mass) for a in topology.atoms()]
        self.total_mass = float(np.sum(masses))
        self.molecules = [np.array([a.index for a in r.atoms()]) for r in topology.residues()]
        self.masses = np.array(masses)

    # ------------------------------------------------------------------ systems and contexts

    def _system(self, barostat: bool):
        import openmm

        from .forcefield import build_system

        system = build_system(self.topology, self.ff, cutoff_nm=self.s.cutoff_nm, charge_scale=self.s.charge_scale)
        if barostat:
            b = openmm.MonteCarloBarostat(self.s.pressure_bar, self.s.temperature_K, 25)
            b.setRandomNumberSeed(self.s.openmm_seed(2))
            system.addForce(b)
        return system

    def _context(self, barostat: bool):
        import openmm

        integrator = openmm.LangevinMiddleIntegrator(self.s.temperature_K, self.s.friction_per_ps, self.s.dt_ps)
        integrator.setRandomNumberSeed(self.s.openmm_seed(1))
        platform = get_platform(self.s.platform, check=False)
        properties = platform_properties(self.s.platform, self.device_index)
        return openmm.Context(self._system(barostat), integrator, platform, properties)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, context, progress: Progress) -> None:
        header = json.dumps(asdict(progress)).encode() + b"\n"
        with atomic_checkpoint(self.dir / CHECKPOINT_CHK) as tmp:
            tmp.write_bytes(header + context.createCheckpoint())

    def _load_checkpoint(self) -> tuple[Progress, bytes] | None:
        path = self.dir / CHECKPOINT_CHK
        if not path.exists():
            return None
        try:
            verify_checksum(path, required=False)  # checkpoints of older versions have no checksum file
        except CorruptFileError as exc:
            raise AARunError(f"{exc}; rerun with --overwrite") from None
        data = path.read_bytes()
        header, _, chk = data.partition(b"\n")
        try:
            fields = json.loads(header)
            fields["npt_volumes"] = [tuple(v) for v in fields["npt_volumes"]]
            return Progress(**fields), chk
        except (ValueError, TypeError) as exc:
            raise AARunError(f"{path}: corrupt checkpoint ({exc}); rerun with --overwrite") from None

    # ------------------------------------------------------------------ stages

    def run(self, npt_only: bool = False, nvt_density: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start or resume; a failure once the run is under way is recorded in summary.json (status, error).

        ``npt_only``: stop when NPT ends and return ``npt.json``'s content. ``nvt_density``: the
        NVT box density (``{"source": ..., "density_kg_m3": ...}``, e.g. from a rho(T) fit)
        instead of this run's own NPT mean; ignored once the run is past NPT.
        """
        self._started = False
        try:
            return self._run(npt_only, nvt_density)
        except Exception as exc:
            if self._started:
                self._record_failure(exc)
            raise

    def _record_failure(self, exc: BaseException) -> None:
        from ..io import describe_os_error, write_json_atomic

        cause = describe_os_error(exc) if isinstance(exc, OSError) else (str(exc).splitlines() or [""])[0]
        try:
            write_json_atomic(self.dir / SUMMARY_JSON, {
                "kind": "aa", "status": f"failed: {type(exc).__name__}", "error": cause,
                **self.s.unit_counts(), "composition": self.s.composition, "temperature_K": self.s.temperature_K})
        except OSError:
            pass  # a full disk may refuse even this; the exception still says what failed

    def _run(self, npt_only: bool, nvt_density: dict[str, Any] | None) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        loaded = self._load_checkpoint()
        if loaded is None:
            context, progress = self._start()
        else:
            progress, chk = loaded
            if npt_only and progress.stage != "npt":  # NPT is over: its record needs no Context
                self._started = True
                return self._npt_record(progress)
            context = self._context(barostat=progress.stage != "nvt")
            try:
                context.loadCheckpoint(chk)
            except Exception as exc:  # noqa: BLE001 - OpenMM raises several types for bad bytes
                raise AARunError(f"{self.dir / CHECKPOINT_CHK}: corrupt checkpoint ({str(exc).splitlines()[0]}); "
                                 "rerun with --overwrite") from None
            self.log(f"{self._tag()} resumed from {self.dir / CHECKPOINT_CHK} at step {context.getStepCount()} "
                     f"({progress.stage}, {progress.frames_done} frames)")
        self._started = True
        if progress.stage == "npt":
            self._npt(context, progress)
        if npt_only:  # also for a run already in NVT: its NPT result is all that is asked for
            return self._npt_record(progress)
        if progress.stage == "npt_done":
            context = self._switch_to_nvt(context, progress, nvt_density)
        self._production(context, progress)
        return self._summary(progress)

    def _tag(self) -> str:
        return f"[aa {self.s.temperature_K:g} K]"

    def _start(self):
        import openmm

        context = self._context(barostat=True)
        context.setPositions(self.initial_positions)
        before = in_kj_mol(context.getState(getEnergy=True).getPotentialEnergy())
        openmm.LocalEnergyMinimizer.minimize(context, MINIMIZE_TOLERANCE, MINIMIZE_MAX_ITERATIONS)
        after = in_kj_mol(context.getState(getEnergy=True).getPotentialEnergy())
        if not math.isfinite(after):
            raise AARunError(f"{self._tag()} energy is {after} after minimisation; lower the start density")
        self.log(f"{self._tag()} minimised: potential energy {before:.4g} -> {after:.4g} kJ/mol")
        context.setVelocitiesToTemperature(self.s.temperature_K, self.s.openmm_seed(3))
        progress = Progress(stage="npt", npt_volumes=[])
        self._save_checkpoint(context, progress)
        return context, progress

    def _step(self, context, n: int) -> None:
        import openmm

        try:
            context.getIntegrator().step(n)
        except openmm.OpenMMException as exc:
            if "twice the nonbonded cutoff" in str(exc):
                raise AARunError(f"{self._tag()} the box shrank below twice the cutoff ({self.s.cutoff_nm} nm) "
                                 "during NPT; use a smaller --cutoff-nm or more --pairs") from None
            raise AARunError(f"{self._tag()} OpenMM failed: {exc}") from None

    def _report(self, context, stage: str, step: int, total: int, t0: float, steps0: int) -> None:
        state = context.getState(getEnergy=True)
        volume = in_nm3(state.getPeriodicBoxVolume())
        dof = 3 * self.masses.size - context.getSystem().getNumConstraints() - 3
        temperature = temperature_from_kinetic_K(in_kj_mol(state.getKineticEnergy()), dof)
        rate = (time.perf_counter() - t0) / max(step - steps0, 1) * 1000
        self.log(f"{self._tag()} {stage} {step * self.s.dt_ps:8.1f}/{total * self.s.dt_ps:.1f} ps  "
                 f"T {temperature:6.1f} K  rho {density_kg_m3(self.total_mass, volume):7.1f} kg/m3  "
                 f"PE {in_kj_mol(state.getPotentialEnergy()):11.1f} kJ/mol  {rate:6.2f} ms/step")

    def _npt(self, context, progress: Progress) -> None:
        """NPT to ``npt_steps``, extended while the density drifts (up to ``max_npt_steps``); then npt.json."""
        total = progress.npt_total_steps or self.s.npt_steps
        step = context.getStepCount()
        t0, steps0, last_ckpt = time.perf_counter(), step, time.perf_counter()
        # Short equilibrations still get ~20 volume samples for the second-half mean.
        sample_every = max(1, min(SAMPLE_EVERY_STEPS, self.s.npt_steps // 20))
        due = _Reporter(total, sample_every)
        while True:
            while step < total:
                n = min(sample_every, total - step)
                self._step(context, n)
                step += n
                progress.npt_volumes.append((step, in_nm3(context.getState().getPeriodicBoxVolume())))
                if due(step):
                    self._report(context, "NPT", step, total, t0, steps0)
                if time.perf_counter() - last_ckpt > CHECKPOINT_EVERY_S and step < total:
                    self._save_checkpoint(context, progress)
                    last_ckpt = time.perf_counter()
            check = density_convergence(self._npt_densities(progress))
            if check["density_converged"] is not False or total >= self.s.max_npt_steps:
                break
            # Still drifting: extend, and judge the longer run's second half again.
            total = min(self.s.max_npt_steps, total + self.s.npt_extension_steps)
            progress.npt_total_steps = total
            due = _Reporter(total, sample_every)
            self.log(f"{self._tag()} NPT density still drifts ({check['density_drift_kg_m3']:+.1f} kg/m3); "
                     f"extending NPT to {total * self.s.dt_ps:g} ps")
            self._save_checkpoint(context, progress)
        if step > steps0:
            progress.npt_ms_per_step = (time.perf_counter() - t0) / (step - steps0) * 1000
        progress.npt_total_steps = total
        progress.stage = "npt_done"
        self._write_npt_density(progress)
        self._save_checkpoint(context, progress)
        self._npt_record(progress)
        error = "" if check["density_sem_kg_m3"] is None else f" ± {check['density_sem_kg_m3']:.1f}"
        self.log(f"{self._tag()} NPT ({total * self.s.dt_ps:g} ps) second-half mean density "
                 f"{check['density_kg_m3']:.1f}{error} kg/m3")
        if check["density_converged"] is False:
            self.log(f"{self._tag()} WARNING: the NPT density still drifts ({check['density_drift_kg_m3']:+.1f} kg/m3 "
                     f"between the halves of the averaging window, standard error {check['density_sem_kg_m3']:.1f}); "
                     "the NVT box may be off: use a longer --equilibrate-ps or --max-equilibrate-ps")

    def _npt_record(self, progress: Progress) -> dict[str, Any]:
        """npt.json (written once NPT has ended): the NPT length, density, error and drift verdict."""
        path = self.dir / NPT_JSON
        if path.exists():
            return json.loads(path.read_text())
        record = {"temperature_K": self.s.temperature_K, "equilibrate_ps": self._npt_steps(progress) * self.s.dt_ps,
                  **density_convergence(self._npt_densities(progress)),
                  "density_samples": int(self._second_half_volumes(progress).size), "total_mass_amu": self.total_mass}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        return record

    def _npt_steps(self, progress: Progress) -> int:
        return progress.npt_total_steps or self.s.npt_steps

    def _second_half_volumes(self, progress: Progress) -> np.ndarray:
        half = self._npt_steps(progress) / 2
        return np.array([v for step, v in progress.npt_volumes if step > half])

    def _switch_to_nvt(self, context, progress: Progress, nvt_density: dict[str, Any] | None):
        """Rescale molecule centres to the cube of the NVT volume and continue without barostat.

        The volume is the second-half NPT mean, or the one of ``nvt_density`` when given.
        """
        from openmm import Vec3

        own = density_convergence(self._npt_densities(progress))
        if nvt_density is None:
            nvt_density = {"source": "own NPT second-half mean", "density_kg_m3": own["density_kg_m3"]}
        # density_kg_m3 is monotonic in the volume: invert it through the mean volume's density.
        mean_volume = float(np.mean(self._second_half_volumes(progress)))
        volume = mean_volume * density_kg_m3(self.total_mass, mean_volume) / nvt_density["density_kg_m3"]
        edge = volume ** (1.0 / 3.0)
        state = context.getState(getPositions=True, getVelocities=True, enforcePeriodicBox=False)
        positions = in_nm(state.getPositions(asNumpy=True))
        old_edge = in_nm(state.getPeriodicBoxVectors()[0][0])
        # NPT boxes stay cubic (isotropic barostat); whole molecules move with their centre.
        for atoms in self.molecules:
            centre = self.masses[atoms] @ positions[atoms] / self.masses[atoms].sum()
            positions[atoms] += centre * (edge / old_edge - 1.0)
        nvt = self._context(barostat=False)
        nvt.setPeriodicBoxVectors(Vec3(edge, 0, 0), Vec3(0, edge, 0), Vec3(0, 0, edge))
        nvt.setPositions(positions)
        nvt.applyConstraints(1e-6)
        nvt.setVelocities(state.getVelocities())
        nvt.setTime(state.getTime())
        nvt.setStepCount(state.getStepCount())
        progress.stage, progress.nvt_edge_nm, progress.nvt_density = "nvt", edge, nvt_density
        self._save_checkpoint(nvt, progress)
        rho = density_kg_m3(self.total_mass, edge**3)
        self.log(f"{self._tag()} NVT box edge {edge:.4f} nm ({rho:.1f} kg/m3, {nvt_density['source']}; "
                 f"own NPT mean {own['density_kg_m3']:.1f} kg/m3)")
        return nvt

    def _npt_densities(self, progress: Progress) -> np.ndarray:
        """Densities of the second half of NPT: what the NVT box and its error are taken from."""
        return density_kg_m3(self.total_mass, self._second_half_volumes(progress))

    def _write_npt_density(self, progress: Progress) -> None:
        lines = ["time_ps,volume_nm3,density_kg_m3"]
        lines += [f"{step * self.s.dt_ps:.4f},{v:.6f},{density_kg_m3(self.total_mass, v):.3f}"
                  for step, v in progress.npt_volumes]
        write_text_atomic(self.dir / NPT_DENSITY_CSV, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------ production

    def _production(self, context, progress: Progress) -> None:
        from openmm_cgnn.frames import FrameWriter, TopologyInfo

        frames_path = self.dir / FRAMES_H5
        state = context.getState(getPositions=True, enforcePeriodicBox=False)
        self.topology.setPeriodicBoxVectors(state.getPeriodicBoxVectors())
        if not frames_path.exists() or not (self.dir / TOPOLOGY_PDB).exists():
            self._write_topology_pdb(state)
        info = TopologyInfo.from_openmm(self.topology, context.getSystem(), state.getPositions())
        npt = density_convergence(self._npt_densities(progress))
        metadata = dict(self.metadata, density_kg_m3=npt["density_kg_m3"], nvt_box_edge_nm=progress.nvt_edge_nm,
                        density_sem_kg_m3=npt["density_sem_kg_m3"],
                        nvt_density_source=(progress.nvt_density or {}).get("source", "own NPT second-half mean"))
        writer = FrameWriter(frames_path, info, metadata, with_forces=True, resume=True)
        try:
            if writer.n_frames > progress.frames_done:  # only if frames.h5 outlived its checkpoint
                writer.truncate(progress.frames_done)
            if writer.n_frames == progress.frames_done - 1:  # checkpointed, not yet appended
                self._append_frame(writer, context, progress.frames_done)
            if writer.n_frames != progress.frames_done:
                raise AARunError(f"{frames_path}: holds {writer.n_frames} frames but the checkpoint expects "
                                 f"{progress.frames_done}; rerun with --overwrite")
            total = self.s.n_frames
            t0, steps0 = time.perf_counter(), context.getStepCount()
            due = _Reporter(total, 1)
            while progress.frames_done < total:
                self._step(context, self.s.steps_per_frame)
                progress.frames_done += 1
                self._save_checkpoint(context, progress)
                self._append_frame(writer, context, progress.frames_done)
                if due(progress.frames_done):
                    step = progress.frames_done * self.s.steps_per_frame
                    self._report(context, "NVT", step, total * self.s.steps_per_frame, t0,
                                 steps0 - self._npt_steps(progress))
            if context.getStepCount() > steps0:
                progress.ms_per_step = (time.perf_counter() - t0) / (context.getStepCount() - steps0) * 1000
                self._save_checkpoint(context, progress)
        finally:
            writer.close()
        self._write_dcd()

    def _append_frame(self, writer, context, frame_number: int) -> None:
        # getState forces are -dU/dx of the System's potential energy at these positions: the
        # force kernels only. Langevin friction and noise live in the integrator, and constraint
        # forces are applied inside the integrator's step, so neither is part of these forces.
        state = context.getState(getPositions=True, getForces=True, getEnergy=True, enforcePeriodicBox=False)
        writer.append(
            positions=in_nm(state.getPositions(asNumpy=True)),
            box=np.array(in_nm(state.getPeriodicBoxVectors())),
            time=frame_number * self.s.save_every_ps,
            forces=in_kj_mol_nm(state.getForces(asNumpy=True)),
            potential_energy=in_kj_mol(state.getPotentialEnergy()),
        )

    def _write_topology_pdb(self, state) -> None:
        import io

        from openmm.app import PDBFile

        out = io.StringIO()
        PDBFile.writeFile(self.topology, state.getPositions(), out)
        write_text_atomic(self.dir / TOPOLOGY_PDB, out.getvalue())

    def _write_dcd(self) -> None:
        """trajectory.dcd from frames.h5 (the frames file is the record; the DCD is derived).

        OpenMM's DCDFile writes the time step and frame interval into the header, so outside tools
        (MDAnalysis, VMD) read the real frame spacing; frame k (from 1) is at step k * steps_per_frame.
        """
        from openmm.app import DCDFile

        from openmm_cgnn.frames import read_frames

        frames = read_frames(self.dir)
        with atomic_path(self.dir / TRAJECTORY_DCD) as tmp, open(tmp, "wb") as handle:
            dcd = DCDFile(handle, self.topology, self.s.dt_ps, firstStep=self.s.steps_per_frame,
                          interval=self.s.steps_per_frame)
            for positions, box in zip(frames.positions, frames.box):
                dcd.writeModel(positions.astype(np.float64), periodicBoxVectors=box)

    def _summary(self, progress: Progress) -> dict[str, Any]:
        densities = self._npt_densities(progress)
        summary = {
            "kind": "aa",
            **self.s.unit_counts(),
            "composition": self.s.composition,
            "n_atoms": int(self.masses.size),
            "temperature_K": self.s.temperature_K,
            **density_convergence(densities),  # a large drift means NPT was too short to equilibrate
            "density_std_kg_m3": float(np.std(densities)),
            "density_samples": len(densities),
            "nvt_box_edge_nm": progress.nvt_edge_nm,
            # the density of the NVT box: the own NPT mean above, or a rho(T) fit over all temperatures
            "nvt_density_kg_m3": density_kg_m3(self.total_mass, progress.nvt_edge_nm**3),
            "nvt_density": progress.nvt_density,
            "n_frames": progress.frames_done,
            "platform": self.s.platform,
            "ms_per_step": progress.ms_per_step,
            "npt_ms_per_step": progress.npt_ms_per_step,
            "charge_scale": self.s.charge_scale,
            "cutoff_nm": self.s.cutoff_nm,
            "dt_fs": self.s.dt_fs,
            "seed": self.s.seed,
            "equilibrate_ps": self._npt_steps(progress) * self.s.dt_ps,
            "production_ps": progress.frames_done * self.s.save_every_ps,
            "save_every_ps": self.s.save_every_ps,
            "forcefield": self.s.forcefield,
            "files": {"frames": FRAMES_H5, "topology": TOPOLOGY_PDB, "trajectory": TRAJECTORY_DCD,
                      "npt_density": NPT_DENSITY_CSV, "checkpoint": CHECKPOINT_CHK},
        }
        write_text_atomic(self.dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
        return summary


class _Reporter:
    """True at every tenth of ``total`` (in units of ``unit``), at the end, and every REPORT_EVERY_S."""

    def __init__(self, total: int, unit: int) -> None:
        self.total, self.every, self.last_slot, self.last_time = total, max(total // 10, unit), -1, time.perf_counter()

    def __call__(self, done: int) -> bool:
        slot = done // self.every
        if slot != self.last_slot or done >= self.total or time.perf_counter() - self.last_time > REPORT_EVERY_S:
            self.last_slot, self.last_time = slot, time.perf_counter()
            return True
        return False


def stdout_log(message: str) -> None:
    print(message, flush=True, file=sys.stdout)
