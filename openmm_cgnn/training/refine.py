"""Bonded refinement after force matching (``openmm-cgnn refine``): iterative Boltzmann inversion of
the tabulated bond and angle tables of a trained model, with its network on and unchanged.

Force matching with a limited network does not reproduce marginal distributions: the network's
intramolecular part shifts them (at the cpu size the butyl angle lost its second well, while the
Boltzmann-inverted tables alone kept it). Refinement corrects each table by what the full model
gets wrong, U_{k+1}(x) = U_k(x) + alpha kT ln[P_CG,k(x) / P_AA(x)]:

- P_CG,k comes from short CG runs of the full model (network on, tables U_k), one per training
  temperature, started from the last frame of that temperature's all-atom run, as
  ``simulate --from-aa`` does (:class:`~openmm_cgnn.openmm.simulation.CGRun`); P_AA from the mapped
  all-atom frames. Both are pooled over temperatures with the all-atom frame counts as weights, at
  the frame-averaged kT: how the prior fit pools (``priors._tabulate_terms``).
- The ratio is of histograms on the table's own grid (one bin per grid point), so the Jacobian
  (r^2, sin theta) cancels. Bins where either histogram holds ``min_counts`` samples count (the
  other side's probability floored at one sample: a region only the CG model visits is pushed
  away, one only AA visits pulled in); their log-ratios are smoothed by the same cubic smoothing
  spline the fit uses (chi^2 = number of bins, weights from the counting errors).
- Beyond the bins either side sampled the correction is held at its edge value: the harmonic walls
  keep their shape (no force changes there) and the table stays continuous.

Every round's CG runs also give the total-variation difference (TV, as the report computes it,
:func:`~openmm_cgnn.analysis.structure.compare_distributions`) of every bond and angle type; after
the last update one more round measures the final tables. The output is the round with the
smallest worst TV (the original tables when no update helped), written as a complete new model
directory whose ``checkpoint.pt``, ``prior.json`` and ``model.pt`` hold the refined tables
(``refine.json`` records every round). The input model directory is never written to.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..analysis.structure import angle_label, bond_angles, bond_label, bond_lengths, compare_distributions
from ..layout import CHECKPOINT_PT, CHECKSUM_SUFFIX, MAPPING_JSON, MARKER, MODEL_PT, PRIOR_JSON, REFINE_JSON
from ..units import kT_kj_mol

REFINE_FORMAT = "openmm_cgnn.refine/1"
KINDS = ("bonds", "angles")


class RefineError(ValueError):
    """Bad refinement input; one line naming the file or option."""


@dataclass
class RefineSettings:
    iterations: int = 2  # table updates; each is followed by a round of CG runs that measures it
    steps: int = 2000  # production steps of each CG run (per temperature and round)
    alpha: float = 1.0  # damping of each update: U += alpha kT ln(P_CG / P_AA)
    dt_fs: float | None = None  # None: the NVE stability check of the first run picks it, later runs reuse it
    dt_candidates_fs: tuple[float, ...] | None = None  # the check's candidates (None: simulate's default)
    save_every_steps: int = 10  # frame interval of the CG runs (the histograms' samples)
    min_counts: int = 10  # samples a bin needs in either histogram before its ratio is used
    platform: str | None = None
    device_index: int | None = None  # GPU platforms: OpenMM's DeviceIndex
    seed: int = 0

    def validate(self) -> None:
        checks = [("--iterations", self.iterations >= 1, "must be >= 1"),
                  ("--steps", self.steps >= self.save_every_steps, f"must be >= --save-every-steps ({self.save_every_steps})"),
                  ("--alpha", 0 < self.alpha <= 2 and math.isfinite(self.alpha), "must be in (0, 2]"),
                  ("--dt-fs", self.dt_fs is None or self.dt_fs > 0, "must be positive"),
                  ("--dt-candidates-fs", not self.dt_candidates_fs or min(self.dt_candidates_fs) > 0,
                   "must be positive"),
                  ("--save-every-steps", self.save_every_steps >= 1, "must be >= 1"),
                  ("--min-counts", self.min_counts >= 1, "must be >= 1"),
                  ("--device-index", self.device_index is None or self.device_index >= 0, "must be >= 0")]
        for option, ok, message in checks:
            if not ok:
                value = getattr(self, option[2:].replace("-", "_"))
                raise RefineError(f"{option} {value}: {message}")


@dataclass
class RunSamples:
    """The bonded samples of one run: per table entry of the prior, its values (nm or rad)."""

    temperature_K: float
    n_frames: int
    bonds: dict[int, np.ndarray] = field(default_factory=dict)
    angles: dict[int, np.ndarray] = field(default_factory=dict)


def term_samples(cg: Any, prior: Any, temperature_K: float) -> RunSamples:
    """Bond lengths (nm) and angles (rad) of ``cg`` (CGFrames) per bond and angle entry of ``prior``."""
    bonds, angles = prior.system_terms(np.asarray(cg.bead_type), np.asarray(cg.molecule_index))
    samples = RunSamples(float(temperature_K), int(cg.n_frames))
    for entry in range(len(prior.bonds.residues)):
        samples.bonds[entry] = bond_lengths(cg, bonds[0][bonds[-1] == entry])
    for entry in range(len(prior.angles.residues)):
        samples.angles[entry] = np.radians(bond_angles(cg, angles[0][angles[-1] == entry]))
    return samples


def term_labels(cg: Any, prior: Any) -> dict[str, dict[int, str]]:
    """The report's name of each bond and angle entry of ``prior`` (``RES:A-B``, ``RES:A-B-C``)."""
    bonds, angles = prior.system_terms(np.asarray(cg.bead_type), np.asarray(cg.molecule_index))
    labels: dict[str, dict[int, str]] = {"bonds": {}, "angles": {}}
    for entry in range(len(prior.bonds.residues)):
        i, j = sorted(int(b) for b in bonds[0][bonds[-1] == entry][0])
        labels["bonds"][entry] = bond_label(cg, i, j)
    for entry in range(len(prior.angles.residues)):
        i, centre, k = (int(b) for b in angles[0][angles[-1] == entry][0])
        i, k = sorted((i, k))
        labels["angles"][entry] = angle_label(cg, i, centre, k)
    return labels


def grid_edges(grid: np.ndarray) -> np.ndarray:
    """Bin edges with one bin centred on each (equally spaced) grid point."""
    half = 0.5 * (grid[1] - grid[0])
    return np.concatenate([[grid[0] - half], 0.5 * (grid[1:] + grid[:-1]), [grid[-1] + half]])


def pooled_histogram(runs: Sequence[np.ndarray], weights: Sequence[float], edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability per bin, raw counts per bin) of several runs' samples: each run's normalised
    histogram weighted by ``weights`` (normalised here), so every pool weighs temperatures alike."""
    weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    probability = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    for values, weight in zip(runs, weights):
        histogram = np.histogram(values, edges)[0].astype(np.float64)
        counts += histogram
        if histogram.sum() > 0:
            probability += weight * histogram / histogram.sum()
    return probability, counts


def ibi_correction(grid: np.ndarray, p_cg: np.ndarray, counts_cg: np.ndarray, p_aa: np.ndarray,
                   counts_aa: np.ndarray, kT: float, alpha: float = 1.0, min_counts: int = 10) -> np.ndarray:
    """alpha kT ln(P_CG / P_AA) on ``grid`` (kJ/mol): smoothed over the bins where either histogram
    has ``min_counts`` samples, held at its edge values beyond (zeros when fewer than 5 bins qualify).

    A bin only one side visits gets the other side's probability of one sample: where the CG model
    goes and AA never does (a collapsed angle the network allows) the correction pushes it out, and
    where AA goes and the CG model does not (a lost well) it pulls it in."""
    from scipy.interpolate import UnivariateSpline

    keep = np.flatnonzero((counts_cg >= min_counts) | (counts_aa >= min_counts))
    correction = np.zeros(len(grid))
    if len(keep) < 5:
        return correction
    # One sample's probability in each pool: its probability per count (pooled weights included).
    floor_cg = float(np.sum(p_cg) / max(np.sum(counts_cg), 1.0))
    floor_aa = float(np.sum(p_aa) / max(np.sum(counts_aa), 1.0))
    x = grid[keep]
    raw = alpha * kT * np.log(np.maximum(p_cg[keep], floor_cg) / np.maximum(p_aa[keep], floor_aa))
    # Counting error of a log-ratio of two histograms: sqrt(1/n_cg + 1/n_aa) (in units of alpha kT).
    error = alpha * kT * np.sqrt(1.0 / np.maximum(counts_cg[keep], 1.0) + 1.0 / np.maximum(counts_aa[keep], 1.0))
    spline = UnivariateSpline(x, raw, w=1.0 / error, k=3, s=float(len(keep)))
    first, last = keep[0], keep[-1]
    correction[first:last + 1] = spline(grid[first:last + 1])
    correction[:first] = correction[first]
    correction[last + 1:] = correction[last]
    return correction


def _table_grid(table: dict[str, Any], unit: str) -> np.ndarray:
    return np.linspace(float(table[f"min_{unit}"]), float(table[f"max_{unit}"]), len(table["energy_kj_mol"]))


def refine_prior(prior: Any, aa: Sequence[RunSamples], cg: Sequence[RunSamples], kT: float,
                 alpha: float = 1.0, min_counts: int = 10) -> tuple[Any, dict[str, dict[int, float]]]:
    """One update of every tabulated bond and angle table of ``prior`` (a PriorSet): a new PriorSet and,
    per entry, the range (max - min) of its correction (kJ/mol). ``aa`` and ``cg`` hold one
    RunSamples per temperature, in the same order; the pools weigh them by the AA frame counts."""
    from ..model.priors import PriorSet

    if len(aa) != len(cg):
        raise ValueError(f"refine_prior: {len(aa)} all-atom sample sets against {len(cg)} CG ones")
    weights = [run.n_frames for run in aa]
    data = prior.to_dict()
    changes: dict[str, dict[int, float]] = {"bonds": {}, "angles": {}}
    for kind, unit in (("bonds", "nm"), ("angles", "rad")):
        for entry, term in enumerate(data[kind]):
            table = term.get("table")
            if table is None:  # harmonic in this prior: nothing to refine
                continue
            grid = _table_grid(table, unit)
            edges = grid_edges(grid)
            p_aa, n_aa = pooled_histogram([getattr(run, kind)[entry] for run in aa], weights, edges)
            p_cg, n_cg = pooled_histogram([getattr(run, kind)[entry] for run in cg], weights, edges)
            correction = ibi_correction(grid, p_cg, n_cg, p_aa, n_aa, kT, alpha, min_counts)
            energy = np.asarray(table["energy_kj_mol"], dtype=np.float64) + correction
            table["energy_kj_mol"] = (energy - energy.min()).tolist()
            changes[kind][entry] = float(np.ptp(correction))
    return PriorSet.from_dict(data, prior.bead_type_names, source="refined prior"), changes


def bonded_tv(aa: Sequence[RunSamples], cg: Sequence[RunSamples], labels: dict[str, dict[int, str]]) -> dict[str, Any]:
    """Per temperature and bond/angle type, the report's TV difference of CG against AA, and the worst."""
    result: dict[str, Any] = {"per_temperature": {}, "worst": {"error": 0.0}}
    for run_aa, run_cg in zip(aa, cg):
        key = f"{run_aa.temperature_K:g}K"
        errors: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            scale = 1.0 if kind == "bonds" else 180.0 / math.pi  # angles in degrees, as the report bins them
            errors[kind] = {labels[kind][entry]: compare_distributions(values * scale, getattr(run_cg, kind)[entry] * scale).error
                            for entry, values in getattr(run_aa, kind).items()}
            for label, error in errors[kind].items():
                if error > result["worst"]["error"]:
                    result["worst"] = {"error": error, "term": label, "temperature": key}
        result["per_temperature"][key] = errors
    return result


@dataclass
class AARun:
    path: Path
    temperature_K: float
    frames: Any  # CGFrames, mapped


def load_aa_runs(paths: Sequence[str | Path], mapping: Any) -> list[AARun]:
    """The mapped all-atom runs, each with its temperature (its frames' median: what the AA run's
    summary records); refuses CG runs and runs without frames."""
    from ..frames import read_frames
    from ..mapping.spec import apply_mapping

    runs = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise RefineError(f"--aa {path}: no such run directory")
        try:
            frames = read_frames(path)
        except (OSError, ValueError, KeyError) as exc:
            raise RefineError(f"--aa {path}: {exc}") from None
        if frames.kind != "aa":
            raise RefineError(f"--aa {path}: a {frames.kind!r} run, not an all-atom one")
        cg = apply_mapping(mapping, frames)
        if cg.n_frames < 1:
            raise RefineError(f"--aa {path}: no frames")
        runs.append(AARun(path, float(np.median(cg.temperature_K)), cg))
    return runs


def _load_model(model_dir: Path) -> tuple[dict[str, Any], Any, Any]:
    """(checkpoint payload, eager model, CGMapping) of a model directory, refusing one without tables."""
    from ..mapping.spec import CGMapping, MappingError
    from ..model.checkpoint import check_model_mapping, model_from_checkpoint, read_checkpoint

    if not (model_dir / CHECKPOINT_PT).is_file():
        raise RefineError(f"--model {model_dir}: not a model directory (no {CHECKPOINT_PT})")
    try:
        mapping = CGMapping.load(model_dir / MAPPING_JSON)
        check_model_mapping(model_dir, mapping.sha256(), model_dir / MAPPING_JSON)
        payload = read_checkpoint(model_dir)
        model = model_from_checkpoint(payload, source=str(model_dir / CHECKPOINT_PT))
    except (MappingError, FileNotFoundError, ValueError) as exc:
        raise RefineError(f"--model {model_dir}: {exc}") from None
    if model.prior is None:
        raise RefineError(f"--model {model_dir}: the model has no prior, so no bonded tables to refine")
    if model.prior.bonded_form != "tabulated":
        raise RefineError(f"--model {model_dir}: its bonded prior is harmonic (trained with --prior-form harmonic): "
                          "there are no tables to refine; train with --prior-form tabulated")
    return payload, model, mapping


def _save_round(stage: Path, payload: dict[str, Any], prior: Any) -> Any:
    """Write the model directory's checkpoint.pt (+ hparams.json, prior.json): the trained network
    with ``prior``; returns that eager model. It is rebuilt, not patched: the energy module holds
    the prior's tables."""
    from ..model.checkpoint import model_from_checkpoint, save_checkpoint

    model = model_from_checkpoint({**payload, "prior": prior.to_dict()}, source=f"{stage}: refined model").eval()
    extra = {k: v for k, v in payload.items() if k not in ("hparams", "state_dict", "prior", "optimizer", "epoch")}
    save_checkpoint(stage, model, payload.get("optimizer"), payload.get("epoch"), extra=extra)
    return model


def _cg_round(stage: Path, scratch: Path, mapping: Any, aa_runs: Sequence[AARun], prior: Any,
              settings: RefineSettings, dt_fs: float | None, log: Callable[[str], None]) -> tuple[list[RunSamples], float]:
    """One CG run of the model in ``stage`` per temperature; their samples and the time step used."""
    from ..mapping.spec import load_cg_frames
    from ..openmm.force import CGNNForce
    from ..openmm.simulation import CGRun, RunConfig
    from ..openmm.topology import CGConfiguration

    samples = []
    for run in aa_runs:
        start = CGConfiguration.from_cg_frames(mapping, run.frames, run.frames.n_frames - 1)
        force = CGNNForce(stage, start, run.temperature_K)
        config = RunConfig(temperature_K=run.temperature_K, steps=settings.steps, dt_fs=dt_fs,
                           platform=settings.platform, device_index=settings.device_index,
                           save_every_steps=settings.save_every_steps,
                           seed=settings.seed, progress=False)
        if settings.dt_candidates_fs:
            config.dt_candidates_fs = tuple(settings.dt_candidates_fs)
        out = scratch / f"T{run.temperature_K:g}K"
        result = CGRun(force, start, out, config, overwrite=out.exists(), log=log,
                       metadata={"start": str(run.path)}).run()
        dt_fs = float(result.summary["dt_fs"])
        samples.append(term_samples(load_cg_frames(out, mapping), prior, run.temperature_K))
    assert dt_fs is not None
    return samples, dt_fs


def _copy_model_files(model_dir: Path, stage: Path) -> list[str]:
    """Everything of the model directory but what refinement rewrites (checkpoint, prior, model.pt, marker)."""
    rewritten = {CHECKPOINT_PT, CHECKPOINT_PT + CHECKSUM_SUFFIX, PRIOR_JSON, MODEL_PT, MARKER, REFINE_JSON}
    copied = []
    for item in sorted(model_dir.iterdir()):
        if item.name in rewritten or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, stage / item.name)
        else:
            shutil.copy2(item, stage / item.name)
        copied.append(item.name)
    return copied


def check_refine_output(model_dir: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Before any compute: ``out`` may receive a model directory and is not the input model."""
    from ..io import check_output_dir

    if Path(out).resolve() == Path(model_dir).resolve():
        raise RefineError(f"--out {out}: is the --model directory; refinement writes a new model directory")
    check_output_dir(out, "model", overwrite=overwrite, resumable=False)


def refine_model(model_dir: str | Path, aa_paths: Sequence[str | Path], out: str | Path,
                 settings: RefineSettings | None = None, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Refine the bonded tables of the model in ``model_dir`` against the AA runs ``aa_paths`` (the
    training temperatures) and write the refined model to ``out``; returns refine.json's content."""
    from ..io import output_dir, write_json_atomic
    from ..model.export import export_for_frames

    settings = settings or RefineSettings()
    settings.validate()
    model_dir, out = Path(model_dir), Path(out)
    check_refine_output(model_dir, out, overwrite)
    payload, model, mapping = _load_model(model_dir)
    if not aa_paths:
        raise RefineError("--aa: give at least one all-atom run (the training temperatures)")
    aa_runs = load_aa_runs(aa_paths, mapping)
    original = model.prior
    labels = term_labels(aa_runs[0].frames, original)
    aa_samples = [term_samples(run.frames, original, run.temperature_K) for run in aa_runs]
    temperatures = np.concatenate([np.asarray(run.frames.temperature_K, dtype=np.float64) for run in aa_runs])
    kT = kT_kj_mol(float(np.mean(temperatures)))
    rounds: list[dict[str, Any]] = []
    priors = [original]
    dt_fs = settings.dt_fs
    with output_dir(out, "model", replace=True) as stage:
        copied = _copy_model_files(model_dir, stage)
        scratch = Path(tempfile.mkdtemp(prefix=".refine_runs.", dir=stage))
        try:
            for k in range(settings.iterations + 1):
                _save_round(stage, payload, priors[k])
                cg_samples, dt_fs = _cg_round(stage, scratch / f"round{k}", mapping, aa_runs, priors[k], settings,
                                              dt_fs, log)
                tv = bonded_tv(aa_samples, cg_samples, labels)
                record: dict[str, Any] = {"round": k, "tv": tv, "cg_frames": [s.n_frames for s in cg_samples]}
                log(f"refine round {k}: worst bonded TV {100 * tv['worst']['error']:.1f}% "
                    f"({tv['worst'].get('term')}, {tv['worst'].get('temperature')})")
                if k < settings.iterations:
                    refined, changes = refine_prior(priors[k], aa_samples, cg_samples, kT, settings.alpha,
                                                    settings.min_counts)
                    priors.append(refined)
                    record["correction_range_kj_mol"] = {kind: {labels[kind][e]: v for e, v in changes[kind].items()}
                                                         for kind in KINDS}
                rounds.append(record)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        best = min(range(len(rounds)), key=lambda r: (rounds[r]["tv"]["worst"]["error"], r))
        model = _save_round(stage, payload, priors[best])
        # as training scripts it: for the system of the data, at the data's median temperature (if it takes one)
        export_for_frames(model, aa_runs[0].frames, stage / MODEL_PT, mapping_sha256=mapping.sha256(),
                          temperature_K=float(np.median(temperatures)) if model.config.use_temperature else None)
        summary = {
            "format": REFINE_FORMAT,
            "source_model": str(model_dir.resolve()),
            "aa_runs": [str(run.path.resolve()) for run in aa_runs],
            "temperatures_K": [run.temperature_K for run in aa_runs],
            "kT_kj_mol": kT,
            "settings": asdict(settings),
            "dt_fs": dt_fs,
            "rounds": rounds,
            "chosen_round": best,
            "tv_before": rounds[0]["tv"]["worst"]["error"],
            "tv_after": rounds[best]["tv"]["worst"]["error"],
            "copied_files": copied,
        }
        write_json_atomic(stage / REFINE_JSON, summary)
    log(f"refined model in {out}: worst bonded TV {100 * summary['tv_before']:.1f}% -> "
        f"{100 * summary['tv_after']:.1f}% (round {best} of {settings.iterations})")
    return summary
