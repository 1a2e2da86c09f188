"""The evaluation stage: AA and CG runs in, ``metrics.json`` + PNG plots + ``report.md`` out.

AA runs are mapped to beads with the learned mapping and every quantity is then computed on AA
and CG the same way, from :class:`~openmm_cgnn.mapping.spec.CGFrames`. Runs are paired by their
metadata temperature; structure is compared at temperatures that have both, dynamics are
reported for every run.

Two additions make the report say what the network and the training temperatures are worth:
prior-only CG runs (``simulate --network off``, the ablation) are compared with the AA runs the
same way as the trained model's, and held-out temperatures (AA runs left out of training) are
marked, with the activation energies fitted with and without them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..frames import evenly_spaced
from ..io import check_output_dir, output_dir, write_json_atomic
from . import plots
from ..layout import METRICS_JSON, REFINE_JSON, REPORT_MD
from .arrhenius import fit_arrhenius
from .density import composition, find_experimental_density, run_density
from .msd import DiffusionResult, MSDCurve, fit_diffusion, frame_interval, msd_curve, remove_drift, unwrap
from ..periodic import orthorhombic_lengths
from .rdf import first_peak, max_rdf_range, radial_distribution, rdf_error, rdf_noise_floor
from .structure import MoleculeCentres, bond_angles, bond_lengths, bonded_terms, compare_distributions, molecule_centres

FORMAT = "openmm_cgnn.evaluation/1"
KINDS = ("aa", "cg")
# An RDF error more than this many counting-noise floors is a real difference (the floor is the
# mean error of two identical liquids; its spread is well under that).
RESOLVED_OVER_NOISE = 2.0


class EvaluationError(ValueError):
    """The runs given to the evaluation cannot be compared (wrong kind, clashing temperatures, ...)."""


@dataclass
class EvaluationSettings:
    start_ps: float = 0.0  # frames before this time (from each run's first frame) are skipped
    stride: int = 1
    rdf_bin_nm: float = 0.01
    rdf_r_max_nm: float | None = None  # default: half the shortest box edge of the two runs
    rdf_max_frames: int = 250  # evenly spaced; structure converges long before dynamics do
    max_lag_fraction: float = 0.3
    slope_tolerance: float = 0.15
    min_span_decades: float = 0.3
    n_blocks: int = 10
    temperature_tolerance_K: float = 0.5
    chunk_frames: int = 500  # all-atom frames read and mapped at a time
    # Pa s, one value for all temperatures or {T: value}; AA and CG fluids have their own viscosity.
    viscosity_pa_s: float | dict[float, float] | None = None
    cg_viscosity_pa_s: float | dict[float, float] | None = None
    # The verdict's targets: |E_a(CG) / E_a(AA) - 1| and the worst RDF error must stay under these.
    target_ea_relative: float = 0.15
    target_rdf_error: float = 0.05
    # ... and the worst total-variation difference of a bond or angle distribution (CG vs mapped AA).
    target_bonded_tv: float = 0.05
    # Temperatures whose AA run was left out of training: marked in the report, and E_a is also
    # fitted without them (the verdict stays on the fit over every temperature).
    held_out_temperatures_K: tuple[float, ...] = ()


@dataclass
class Run:
    path: Path
    kind: str
    temperature_K: float
    cg: Any  # CGFrames
    centres: MoleculeCentres
    box_nm: float  # cube root of the mean volume
    molecule_formulae: dict[str, int] | None = None  # AA only: formula -> number of molecules
    total_mass_amu: float = 0.0
    n_molecules: dict[str, int] = field(default_factory=dict)
    # AA runs with a box fixed from NPT: the standard error of that NPT density (frames metadata)
    npt_density_sem_kg_m3: float | None = None
    # CG runs: whether the network ran (False: a prior-only ablation run); None if not recorded
    network: bool | None = None
    # CG runs: the force field they ran (model directory or file), as the run recorded it
    forcefield: str | None = None

    def summary(self) -> dict:
        return {
            "path": str(self.path), "kind": self.kind, "temperature_K": self.temperature_K,
            **({"network": self.network} if self.network is not None else {}),
            **({"forcefield": self.forcefield, "refined": refined_model(self.forcefield)} if self.forcefield else {}),
            "n_frames": self.cg.n_frames, "time_ps": [float(self.cg.time[0]), float(self.cg.time[-1])],
            "n_molecules": self.n_molecules, "n_beads": self.cg.n_beads, "box_nm": self.box_nm,
        }


def refined_model(forcefield: str) -> bool:
    """Whether a CG run's force field is a model directory whose bonded tables ``openmm-cgnn refine`` corrected."""
    return (Path(forcefield) / REFINE_JSON).exists()


def temperature_key(temperature_K: float) -> str:
    return f"{temperature_K:g}"


def _file_label(name: str) -> str:
    """A residue name made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def load_run(path: str | Path, mapping: Any, kind: str, settings: EvaluationSettings) -> Run:
    """Read one run, check it is of the expected kind, and bring it to CG frames.

    All-atom runs are read and mapped ``chunk_frames`` frames at a time, so memory holds the
    beads of the whole run but the atoms (and their forces) of one chunk only.
    """
    from ..frames import count_frames, read_frames
    from ..mapping.spec import CGFrames, apply_mapping, cg_frames_from_cg_run

    first = read_frames(path, stop=1)  # errors on an empty or malformed file, naming it
    if first.kind != kind:
        other = "--cg" if first.kind == "cg" else "--aa"
        raise EvaluationError(
            f"{first.path}: is a {first.kind!r} run (metadata 'kind') but was given as {kind!r}; pass it with {other}"
        )
    recorded = first.metadata.get("mapping_sha256")
    if kind == "cg" and recorded and recorded != mapping.sha256():
        raise EvaluationError(f"{first.path}: this CG run was made with another mapping (sha256 {recorded[:12]}) than "
                              f"--mapping (sha256 {mapping.sha256()[:12]}); pass the mapping of its model")
    temperature = first.temperature_K
    formulae = None
    if kind == "aa":
        try:
            formulae = composition(first.topology.element, first.topology.residue_index)
        except ValueError:  # particles without elements: no experimental density can match
            formulae = None
    to_beads = apply_mapping if kind == "aa" else cg_frames_from_cg_run
    n_total, step = count_frames(path), settings.chunk_frames * settings.stride
    parts = [to_beads(mapping, read_frames(path, start=s, stop=min(s + step, n_total), stride=settings.stride))
             for s in range(0, n_total, step)]
    cg = CGFrames.concatenate(parts)
    keep = cg.time >= cg.time[0] + settings.start_ps - 1e-9
    if keep.sum() < 2:
        raise EvaluationError(f"{first.path}: fewer than 2 frames after skipping the first {settings.start_ps:g} ps")
    if not keep.all():
        cg = cg.select(np.flatnonzero(keep))
    try:
        lengths = orthorhombic_lengths(cg.box, str(first.path))
        frame_interval(cg.time, str(first.path))
    except ValueError as exc:
        raise EvaluationError(str(exc)) from exc
    centres = molecule_centres(cg)
    species = centres.species()
    return Run(
        path=Path(path), kind=kind, temperature_K=temperature, cg=cg, centres=centres,
        box_nm=float(np.mean(np.prod(lengths, axis=1)) ** (1 / 3)), molecule_formulae=formulae,
        total_mass_amu=float(np.sum(cg.masses)),
        n_molecules={s: int(centres.indices(s).size) for s in species},
        npt_density_sem_kg_m3=first.metadata.get("density_sem_kg_m3"),
        network=first.metadata.get("network") if kind == "cg" else None,
        forcefield=first.metadata.get("forcefield") if kind == "cg" else None,
    )


def _pair_by_temperature(runs: Sequence[Run], tolerance: float) -> dict[str, dict[str, Run]]:
    """{T key: {kind: run}}; two runs of one kind at the same temperature are an error."""
    table: dict[str, dict[str, Run]] = {}
    anchors: dict[str, float] = {}
    for run in runs:
        key = next((k for k, t in anchors.items() if abs(t - run.temperature_K) <= tolerance), None)
        if key is None:
            key = temperature_key(run.temperature_K)
            anchors[key] = run.temperature_K
        if run.kind in table.setdefault(key, {}):
            raise EvaluationError(
                f"two {run.kind.upper()} runs at {key} K: {table[key][run.kind].path} and {run.path}; "
                "give one run per temperature"
            )
        table[key][run.kind] = run
    return dict(sorted(table.items(), key=lambda kv: anchors[kv[0]]))


def _check_network(runs: Sequence[Run], prior_runs: Sequence[Run]) -> None:
    """A run's metadata says whether its network ran: a prior-only run given as the trained model's
    (or the reverse) would swap the two rows of the ablation."""
    for run in runs:
        if run.network is False:
            raise EvaluationError(f"{run.path}: a prior-only run (network off) given with --cg; "
                                  "pass it with --cg-prior-only")
    for run in prior_runs:
        if run.network is True:
            raise EvaluationError(f"{run.path}: a run with the network on given with --cg-prior-only; pass it with --cg")


def _check_same_liquid(runs: Sequence[Run]) -> None:
    """All runs must hold the same molecule types (counts may differ); the topologies must match."""
    reference = runs[0]
    for run in runs[1:]:
        if set(run.n_molecules) != set(reference.n_molecules):
            raise EvaluationError(
                f"mismatched topologies: {reference.path} has molecules {reference.n_molecules}, "
                f"{run.path} has {run.n_molecules}"
            )


def _viscosity(value: float | dict[float, float] | None, temperature_K: float, tolerance: float) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    for t, eta in value.items():
        if abs(float(t) - temperature_K) <= tolerance:
            return float(eta)
    return None


def _check_viscosity_temperatures(runs: Sequence[Run], settings: EvaluationSettings) -> None:
    """Every T=VALUE viscosity entry must match a run of its kind: a typo would silently drop the correction."""
    for kind, name in (("aa", "viscosity_pa_s"), ("cg", "cg_viscosity_pa_s")):
        value = getattr(settings, name)
        if not isinstance(value, dict):
            continue
        temperatures = sorted({run.temperature_K for run in runs if run.kind == kind})
        for t in value:
            if not any(abs(float(t) - run_t) <= settings.temperature_tolerance_K for run_t in temperatures):
                have = ", ".join(f"{x:g}" for x in temperatures) or "none"
                raise EvaluationError(
                    f"{name} (--{name.replace('_', '-')}): {float(t):g} K matches no {kind.upper()} run "
                    f"(their temperatures: {have} K)"
                )


def run_diffusion(run: Run, settings: EvaluationSettings) -> dict[str, tuple[MSDCurve, DiffusionResult]]:
    """MSD curve and D of every molecule type of one run (drift of the whole system removed)."""
    centres = run.centres
    tracks = remove_drift(unwrap(centres.positions, run.cg.box), centres.masses)
    eta = _viscosity(
        settings.viscosity_pa_s if run.kind == "aa" else settings.cg_viscosity_pa_s,
        run.temperature_K, settings.temperature_tolerance_K,
    )
    out = {}
    for species in centres.species():
        try:
            curve = msd_curve(tracks[:, centres.indices(species)], run.cg.time, settings.max_lag_fraction)
        except ValueError as exc:
            raise EvaluationError(f"{run.path}: {exc}") from exc
        out[species] = (curve, fit_diffusion(
            curve, run.temperature_K, run.box_nm, viscosity_pa_s=eta, slope_tolerance=settings.slope_tolerance,
            min_span_decades=settings.min_span_decades, n_blocks=settings.n_blocks,
        ))
    return out


def _rdf_sets(run: Run, frames: np.ndarray) -> tuple[dict, dict]:
    """Particle sets for RDFs: molecule centres per species, beads per bead type."""
    centres = run.centres
    com = {s: centres.positions[frames][:, centres.indices(s)] for s in centres.species()}
    cg = run.cg
    beads = {}
    for t in np.unique(cg.bead_type):
        idx = np.flatnonzero(cg.bead_type == t)
        beads[cg.bead_type_names[t]] = (cg.positions[frames][:, idx], cg.molecule_index[idx])
    return com, beads


def compare_rdfs(aa: Run, cg: Run, settings: EvaluationSettings) -> tuple[dict, list, list]:
    """RDF metrics per pair (molecule centres and bead types) and plot panels for both groups."""
    r_max = min(max_rdf_range(aa.cg.box, str(aa.path)), max_rdf_range(cg.cg.box, str(cg.path)))
    if settings.rdf_r_max_nm is not None:
        r_max = min(r_max, settings.rdf_r_max_nm)
    sets = {}
    for run in (aa, cg):
        frames = evenly_spaced(run.cg.n_frames, settings.rdf_max_frames)
        sets[run.kind] = (frames, run.cg.box[frames], *_rdf_sets(run, frames))
    metrics: dict[str, dict] = {}
    panels: dict[str, list] = {"com": [], "bead": []}
    beads_per_molecule = np.bincount(aa.cg.molecule_index)
    single_bead = {  # bead types that are a whole molecule by themselves
        aa.cg.bead_type_names[t]: bool(beads_per_molecule[aa.cg.molecule_index[np.argmax(aa.cg.bead_type == t)]] == 1)
        for t in np.unique(aa.cg.bead_type)
    }
    for group in ("com", "bead"):
        names = list(sets["aa"][2 if group == "com" else 3])
        for i, a in enumerate(names):
            for b in names[i:]:
                if group == "bead" and single_bead[a] and single_bead[b]:
                    continue  # the same curve as the molecular-centre RDF of these molecules
                rdfs = {}
                for kind, run in (("aa", aa), ("cg", cg)):
                    _, box, com, beads = sets[kind]
                    try:
                        if group == "com":
                            rdfs[kind] = radial_distribution(com[a], com[b], box, r_max, settings.rdf_bin_nm, same=a == b)
                        else:
                            (pa, ma), (pb, mb) = beads[a], beads[b]
                            rdfs[kind] = radial_distribution(pa, pb, box, r_max, settings.rdf_bin_nm, ma, mb, same=a == b)
                        counted = bool(np.any(rdfs[kind].counts))
                    except ValueError:  # no pairs at all (e.g. one molecule of a type)
                        counted = False
                    if not counted:
                        raise EvaluationError(
                            f"{run.path}: no {a}-{b} pair closer than {r_max:.3g} nm in the frames used, so there is "
                            "no RDF to compare: the run is too short or has too few molecules (run it longer or larger)")
                error = rdf_error(rdfs["aa"], rdfs["cg"])
                noise = rdf_noise_floor(rdfs["aa"], rdfs["cg"])
                peaks = {kind: first_peak(rdfs[kind]) for kind in KINDS}
                label = f"{a}-{b}"
                metrics[f"{group}:{label}"] = {
                    "kind": group, "pair": [a, b], "error": error,
                    "noise_floor": noise, "r_max_nm": r_max,
                    "peak_r_nm": {k: peaks[k][0] for k in KINDS}, "peak_g": {k: peaks[k][1] for k in KINDS},
                    "n_frames": {k: rdfs[k].n_frames for k in KINDS},
                }
                panels[group].append(plots.RDFPanel(
                    label, rdfs["aa"].r, rdfs["aa"].g, rdfs["cg"].g, error,
                    reliable=(rdfs["aa"].ideal >= 20) & (rdfs["cg"].ideal >= 20), noise_floor=noise))
    return metrics, panels["com"], panels["bead"]


def compare_bonded(aa: Run, cg: Run) -> tuple[dict, dict, dict]:
    """Bond-length and angle distributions of CG against mapped AA, per bond and angle type."""
    bonds_aa, angles_aa = bonded_terms(aa.cg)
    bonds_cg, angles_cg = bonded_terms(cg.cg)
    if set(bonds_aa) != set(bonds_cg) or set(angles_aa) != set(angles_cg):
        raise EvaluationError(
            f"mismatched topologies: bond types of {aa.path} ({sorted(bonds_aa)}) and {cg.path} "
            f"({sorted(bonds_cg)}) differ"
        )
    bonds = {k: compare_distributions(bond_lengths(aa.cg, v), bond_lengths(cg.cg, bonds_cg[k]))
             for k, v in bonds_aa.items()}
    angles = {k: compare_distributions(bond_angles(aa.cg, v), bond_angles(cg.cg, angles_cg[k]))
              for k, v in angles_aa.items()}
    metrics = {
        "bonds": {k: {"mean_nm": c.mean, "std_nm": c.std, "error": c.error, "noise_floor": c.noise_floor}
                  for k, c in bonds.items()},
        "angles": {k: {"mean_deg": c.mean, "std_deg": c.std, "error": c.error, "noise_floor": c.noise_floor}
                   for k, c in angles.items()},
    }
    return metrics, bonds, angles


def _ratio(aa: DiffusionResult, cg: DiffusionResult) -> dict:
    if aa.status != "ok" or cg.status != "ok":
        return {"ratio": None, "error": None, "reason": "D not converged for " + ("AA" if aa.status != "ok" else "CG")}
    ratio = cg.D_m2_s / aa.D_m2_s
    rel = math.hypot(aa.D_err_m2_s / aa.D_m2_s, cg.D_err_m2_s / cg.D_m2_s)
    out = {"ratio": ratio, "error": ratio * rel, "box_nm": {"aa": aa.box_nm, "cg": cg.box_nm}}
    if abs(aa.box_nm - cg.box_nm) > 0.01 * aa.box_nm:
        out["note"] = "box sizes differ, so finite-size effects on D differ"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _diffusion(table: dict, settings: EvaluationSettings, say: Callable[[str], None],
               measured: dict | None = None) -> tuple[dict, dict]:
    """The diffusion of every run in ``table``, added to a copy of the ``measured`` results
    ({species: {T key: {kind: result}}}); returns (results, MSD curves for plotting)."""
    diffusion = {species: {key: dict(entry) for key, entry in by_t.items()} for species, by_t in (measured or {}).items()}
    msd_series: dict[str, dict[str, list]] = {}
    for key, by_kind in table.items():
        for kind, run in by_kind.items():
            say(f"diffusion: {kind.upper()} {key} K")
            for species, (curve, result) in run_diffusion(run, settings).items():
                diffusion.setdefault(species, {}).setdefault(key, {})[kind] = result.to_dict()
                msd_series.setdefault(species, {}).setdefault(kind, []).append(plots.MSDSeries(
                    run.temperature_K, curve.lag_ps, curve.msd_nm2, result.fit_start_ps, result.fit_end_ps,
                    result.D_m2_s))
    return diffusion, msd_series


def _d_ratios(diffusion: dict) -> dict:
    """D_CG/D_AA of each species at every temperature with both kinds measured."""
    ratios: dict[str, dict] = {}
    for species, by_t in diffusion.items():
        for key, entry in by_t.items():
            if set(entry) >= set(KINDS):
                results = {k: DiffusionResult(**entry[k]) for k in KINDS}
                ratios.setdefault(species, {})[key] = _ratio(results["aa"], results["cg"])
    return ratios


def _arrhenius(diffusion: dict, held_out: Sequence[str] = ()) -> tuple[dict, dict[str, dict[str, plots.ArrheniusSeries]]]:
    """The Arrhenius fits of the converged D of each species and kind: (fits, series for plotting).

    With ``held_out`` temperature keys, each entry also gets ``without_held_out``: the same fits
    over the other temperatures (the transfer claim is the difference between the two).
    """
    fits: dict[str, dict] = {}
    series: dict[str, dict[str, plots.ArrheniusSeries]] = {}
    for species, by_t in diffusion.items():
        entry, series[species] = _arrhenius_fits(by_t)
        if held_out:
            kept = {key: value for key, value in by_t.items() if key not in held_out}
            entry["without_held_out"] = {"temperatures_K": list(kept), **_arrhenius_fits(kept)[0]}
        fits[species] = entry
    return fits, series


def _arrhenius_fits(by_t: dict) -> tuple[dict, dict[str, plots.ArrheniusSeries]]:
    """The Arrhenius fit of each kind over the converged D in ``by_t`` ({T key: {kind: D result}}),
    and the relative E_a difference CG against AA when both fits worked."""
    entry: dict[str, Any] = {}
    series: dict[str, plots.ArrheniusSeries] = {}
    for kind in KINDS:
        results = [by_kind[kind] for by_kind in by_t.values() if kind in by_kind]
        if not results:
            continue
        ok = [r for r in results if r["status"] == "ok"]
        T = np.array([r["temperature_K"] for r in ok])
        D = np.array([r["D_m2_s"] for r in ok])
        err = np.array([r["D_err_m2_s"] for r in ok])
        fit = fit_arrhenius(T, D, err)
        entry[kind] = fit.to_dict()
        if ok and all(r["D_yeh_hummer_m2_s"] is not None for r in ok):
            corrected = np.array([r["D_yeh_hummer_m2_s"] for r in ok])
            entry[f"{kind}_yeh_hummer"] = fit_arrhenius(T, corrected, err).to_dict()
        series[kind] = plots.ArrheniusSeries(T, D, err, fit.Ea_kJ_mol, fit.Ea_err_kJ_mol, fit.D0_m2_s)
    if all(entry.get(k, {}).get("status") == "ok" for k in KINDS):
        aa_ea, cg_ea = entry["aa"]["Ea_kJ_mol"], entry["cg"]["Ea_kJ_mol"]
        entry["Ea_relative_difference"] = (cg_ea - aa_ea) / aa_ea
        aa_err, cg_err = entry["aa"]["Ea_err_kJ_mol"], entry["cg"]["Ea_err_kJ_mol"]
        entry["Ea_relative_difference_err"] = math.hypot(cg_err / aa_ea, cg_ea * aa_err / aa_ea ** 2)
    return entry, series


def target_verdict(metrics: dict, settings: EvaluationSettings) -> dict:
    """Each target met, missed or not measured, with the numbers that decide it.

    An RDF error above the target but within a few noise floors may be counting noise alone, and an
    E_a difference whose uncertainty exceeds the target says nothing either way: both read "not
    resolved", not "missed", so a user knows to sample more rather than retrain.
    """
    verdict: dict[str, Any] = {"targets": {"Ea_relative": settings.target_ea_relative,
                                           "rdf_error": settings.target_rdf_error,
                                           "bonded_tv": settings.target_bonded_tv}, "Ea": {}, "rdf": {}, "bonded": {}}
    for species, entry in metrics["arrhenius"].items():
        difference = entry.get("Ea_relative_difference")
        if difference is None:
            missing = [k.upper() for k in KINDS if entry.get(k, {}).get("status") != "ok"]
            verdict["Ea"][species] = {"status": "not measured",
                                      "detail": f"no Arrhenius fit for {' and '.join(missing)}"}
        else:
            error = entry["Ea_relative_difference_err"]
            if error > settings.target_ea_relative:
                status = "not resolved"  # the fits' errors alone are wider than the target
            else:
                status = "met" if abs(difference) <= settings.target_ea_relative else "missed"
            verdict["Ea"][species] = {"status": status, "relative_difference": difference,
                                      "relative_difference_err": error}
    for group in ("com", "bead"):
        cases = [(m["error"], m["noise_floor"], "–".join(e["pair"]), key)
                 for e in metrics["rdf"].values() if e["kind"] == group for key, m in e["by_temperature"].items()]
        if not cases:
            continue
        error, floor, pair, key = max(cases)
        if error <= settings.target_rdf_error:
            status = "met"
        elif error > RESOLVED_OVER_NOISE * floor:
            status = "missed"
        else:
            status = "not resolved"
        verdict["rdf"][group] = {"status": status, "worst_error": error, "noise_floor": floor, "pair": pair,
                                 "temperature": key, "max_noise_floor": max(c[1] for c in cases)}
    # Per bond and angle type: the worst total-variation difference over the temperatures.
    for group in ("bonds", "angles"):
        for key, bonded in metrics.get("structure", {}).items():
            for name, m in bonded.get(group, {}).items():
                worst = verdict["bonded"].get(name)
                if worst is None or m["error"] > worst["worst_tv"]:
                    verdict["bonded"][name] = {"kind": group[:-1], "worst_tv": m["error"], "temperature": key,
                                               "noise_floor": m.get("noise_floor", 0.0)}
    for entry in verdict["bonded"].values():
        if entry["worst_tv"] <= settings.target_bonded_tv:
            entry["status"] = "met"
        else:
            entry["status"] = "missed" if entry["worst_tv"] > RESOLVED_OVER_NOISE * entry["noise_floor"] else "not resolved"
    return verdict


def _structure(table: dict, settings: EvaluationSettings, say: Callable[[str], None]) -> tuple[dict, dict, dict]:
    """RDF and bonded comparisons at the temperatures with both kinds: (rdf, structure, figures to draw)."""
    rdf: dict[str, dict] = {}
    structure: dict[str, dict] = {}
    figures: dict[str, tuple] = {}
    for key, by_kind in table.items():
        if len(by_kind) < 2:
            continue
        say(f"structure: {key} K")
        rdf_metrics, com_panels, bead_panels = compare_rdfs(by_kind["aa"], by_kind["cg"], settings)
        for name, m in rdf_metrics.items():
            entry = rdf.setdefault(name, {"kind": m["kind"], "pair": m["pair"], "error": None, "by_temperature": {}})
            entry["by_temperature"][key] = {k: v for k, v in m.items() if k not in ("kind", "pair")}
            entry["error"] = max(v["error"] for v in entry["by_temperature"].values())
        figures[f"rdf_com_{key}K.png"] = (plots.plot_rdfs, f"Molecular centre-of-mass RDFs at {key} K", com_panels)
        if bead_panels:
            figures[f"rdf_bead_{key}K.png"] = (plots.plot_rdfs, f"Bead-type RDFs (intermolecular) at {key} K",
                                               bead_panels)
        if len(by_kind["aa"].cg.bonds):
            bonded, bonds, angles = compare_bonded(by_kind["aa"], by_kind["cg"])
            structure[key] = bonded
            figures[f"bonds_{key}K.png"] = (plots.plot_distributions, f"CG bond lengths at {key} K", "r (nm)", bonds)
            if angles:
                figures[f"angles_{key}K.png"] = (plots.plot_distributions, f"CG angles at {key} K",
                                                 "angle (degrees)", angles)
    return rdf, structure, figures


def _prior_only(prior_runs: Sequence[Run], table: dict, settings: EvaluationSettings, diffusion: dict,
                say: Callable[[str], None]) -> dict:
    """The ablation: each prior-only CG run against the AA run at its temperature, analysed exactly as
    the trained model's runs are (rdf, structure, diffusion, d_ratio_cg_aa, arrhenius)."""
    paired: dict[str, dict[str, Run]] = {}
    for run in prior_runs:
        key = next((k for k, v in table.items()
                    if "aa" in v and abs(v["aa"].temperature_K - run.temperature_K) <= settings.temperature_tolerance_K),
                   None)
        if key is None:
            raise EvaluationError(f"{run.path}: a prior-only run at {run.temperature_K:g} K, but no AA run at that "
                                  "temperature to compare it with")
        if key in paired:
            raise EvaluationError(f"two prior-only runs at {key} K: {paired[key]['cg'].path} and {run.path}; "
                                  "give one run per temperature")
        paired[key] = {"aa": table[key]["aa"], "cg": run}
    paired = {key: paired[key] for key in table if key in paired}
    # The AA diffusion is already measured: only the prior-only runs are analysed again.
    measured_aa: dict[str, dict] = {}
    for species, by_t in diffusion.items():
        for key in paired:
            if "aa" in by_t.get(key, {}):
                measured_aa.setdefault(species, {})[key] = {"aa": by_t[key]["aa"]}
    prefixed = lambda message: say(f"prior-only {message}")  # noqa: E731
    prior_diffusion, _ = _diffusion({key: {"cg": v["cg"]} for key, v in paired.items()}, settings, prefixed, measured_aa)
    rdf, structure, _ = _structure(paired, settings, prefixed)  # no figures: the table in the report compares them
    return {"rdf": rdf, "structure": structure, "diffusion": prior_diffusion, "d_ratio_cg_aa": _d_ratios(prior_diffusion),
            "arrhenius": _arrhenius(prior_diffusion)[0]}


def model_summary(model: dict) -> dict:
    """One model's fidelity in a few numbers, the rows of the ablation table: per temperature the worst
    centre-of-mass and bead-type RDF errors, every bonded total-variation difference and D_CG/D_AA;
    per species the CG activation energy and its difference from AA's."""
    by_t: dict[str, dict[str, Any]] = {}
    for entry in model["rdf"].values():
        for key, m in entry["by_temperature"].items():
            name = f"worst_{entry['kind']}_rdf_error"
            row = by_t.setdefault(key, {})
            if name not in row or m["error"] > row[name]["error"]:
                row[name] = {"error": m["error"], "pair": "–".join(entry["pair"])}
    for key, bonded in model["structure"].items():
        by_t.setdefault(key, {})["bonded_tv"] = {name: m["error"] for group in ("bonds", "angles")
                                                 for name, m in bonded.get(group, {}).items()}
    for species, ratios in model["d_ratio_cg_aa"].items():
        for key, ratio in ratios.items():
            by_t.setdefault(key, {}).setdefault("d_ratio_cg_aa", {})[species] = {
                "ratio": ratio.get("ratio"), "error": ratio.get("error")}
    ea = {species: {"Ea_kJ_mol": entry.get("cg", {}).get("Ea_kJ_mol"),
                    "Ea_err_kJ_mol": entry.get("cg", {}).get("Ea_err_kJ_mol"),
                    "relative_difference": entry.get("Ea_relative_difference")}
          for species, entry in model["arrhenius"].items()}
    return {"by_temperature": dict(sorted(by_t.items(), key=lambda kv: float(kv[0]))), "Ea": ea}


def _held_out_keys(table: dict, settings: EvaluationSettings) -> list[str]:
    """The table keys of the held-out temperatures; each must have an AA and a CG run."""
    keys = []
    for t in settings.held_out_temperatures_K:
        key = next((k for k, v in table.items() if set(v) >= set(KINDS)
                    and abs(v["aa"].temperature_K - float(t)) <= settings.temperature_tolerance_K), None)
        if key is None:
            paired = ", ".join(k for k, v in table.items() if set(v) >= set(KINDS)) or "none"
            raise EvaluationError(f"--held-out-temperature {float(t):g}: no AA and CG run pair at that temperature "
                                  f"(paired temperatures: {paired} K)")
        keys.append(key)
    return keys


def _density(aa_runs: Sequence[Run]) -> tuple[dict, Any, list]:
    """Every AA run's density against the experimental table of its liquid, if known:
    (the metrics entry, the reference, (T, density, error) points for plotting)."""
    formulae = aa_runs[0].molecule_formulae
    reference = find_experimental_density(formulae) if formulae else None
    density: dict[str, Any] = {"reference": reference.to_dict() if reference else None, "runs": {}}
    if reference is None:
        density["note"] = (f"no experimental density for molecules {formulae}" if formulae
                           else "no experimental density: the AA topology has no elements")
    points = []
    for run in aa_runs:
        d = run_density(run.total_mass_amu, run.cg.box).to_dict()
        if d["box_fixed"] and run.npt_density_sem_kg_m3 is not None:
            # The NVT box is the NPT mean: its uncertainty is the NPT one, not zero.
            d.update(err_kg_m3=float(run.npt_density_sem_kg_m3), err_from="NPT")
        if reference is not None:
            exp, extrapolated = reference.at(run.temperature_K)
            d.update(experiment_kg_m3=exp, experiment_extrapolated=extrapolated,
                     relative_difference=(d["density_kg_m3"] - exp) / exp)
        density["runs"][temperature_key(run.temperature_K)] = d
        points.append((run.temperature_K, d["density_kg_m3"], d["err_kg_m3"]))
    return density, reference, points


def evaluate(
    aa_dirs: Sequence[str | Path],
    cg_dirs: Sequence[str | Path],
    mapping: Any,
    out_dir: str | Path,
    settings: EvaluationSettings | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
    cg_prior_dirs: Sequence[str | Path] = (),
    **options: Any,
) -> dict:
    """Evaluate CG runs against AA runs; writes metrics.json, PNG plots and report.md into ``out_dir``.

    ``cg_prior_dirs``: prior-only CG runs (the ablation, ``simulate --network off``), reported beside
    the trained model's ``cg_dirs`` under ``prior_only`` and ``ablation``; the verdict is the trained model's.

    ``mapping`` is a :class:`~openmm_cgnn.mapping.spec.Mapping` or the path of ``mapping.json``;
    ``options`` override fields of :class:`EvaluationSettings`. Nothing is written until every
    run has been read and analysed, so a bad input leaves an existing report untouched.
    """
    from ..mapping.spec import Mapping

    settings = settings or EvaluationSettings()
    for name, value in options.items():
        if not hasattr(settings, name):
            raise TypeError(f"evaluate() got an unknown option {name!r}")
        setattr(settings, name, value)
    say = log or (lambda message: None)
    if not aa_dirs:
        raise EvaluationError("no AA runs given: the evaluation compares against all-atom data")
    mapping_path = None
    if not isinstance(mapping, Mapping):
        mapping_path = Path(mapping)
        mapping = Mapping.load(mapping_path)
    out_dir = Path(out_dir)
    # A report replaces only an earlier report (never a model's metrics.json), and only when asked.
    replace = check_output_dir(out_dir, "report", overwrite=overwrite)

    runs, prior_runs = [], []
    for kind, dirs, into in (("aa", aa_dirs, runs), ("cg", cg_dirs, runs), ("cg", cg_prior_dirs, prior_runs)):
        for d in dirs:
            say(f"reading {'prior-only CG' if into is prior_runs else kind.upper()} run {d}")
            into.append(load_run(d, mapping, kind, settings))
    _check_network(runs, prior_runs)
    _check_same_liquid(runs + prior_runs)
    _check_viscosity_temperatures(runs + prior_runs, settings)
    table = _pair_by_temperature(runs, settings.temperature_tolerance_K)
    held_out = _held_out_keys(table, settings)

    metrics: dict[str, Any] = {
        "format": FORMAT,
        "mapping": {"path": str(mapping_path) if mapping_path else None, "sha256": mapping.sha256(),
                    "bead_types": mapping.bead_type_names},
        "settings": asdict(settings),
        "runs": [r.summary() for r in runs],
        "prior_only_runs": [r.summary() for r in prior_runs],
        "held_out_temperatures_K": held_out,
        "temperatures_K": {
            "paired": [k for k, v in table.items() if len(v) == 2],
            "aa_only": [k for k, v in table.items() if set(v) == {"aa"}],
            "cg_only": [k for k, v in table.items() if set(v) == {"cg"}],
        },
    }
    diffusion, msd_series = _diffusion(table, settings, say)
    arrhenius, arrhenius_series = _arrhenius(diffusion, held_out)
    metrics["rdf"], metrics["structure"], figures = _structure(table, settings, say)
    metrics.update(diffusion=diffusion, d_ratio_cg_aa=_d_ratios(diffusion), arrhenius=arrhenius)
    metrics["density"], reference, density_points = _density([v["aa"] for v in table.values() if "aa" in v])
    metrics["verdict"] = target_verdict(metrics, settings)  # the trained model's, never the ablation's
    if prior_runs:
        metrics["prior_only"] = _prior_only(prior_runs, table, settings, diffusion, say)
        metrics["ablation"] = {"trained": model_summary(metrics), "prior_only": model_summary(metrics["prior_only"])}

    # Every number is known: now write, beside an old report that is swapped out at the end.
    with output_dir(out_dir, "report", replace) as work:
        metrics = _write_outputs(work, metrics, msd_series, arrhenius_series, figures, reference, density_points, runs)
    say(f"wrote {out_dir / METRICS_JSON}, {out_dir / REPORT_MD} and {len(metrics['plots'])} plots")
    return metrics


def _write_outputs(out_dir: Path, metrics: dict, msd_series: dict, arrhenius_series: Any, figures: dict,
                   reference: Any, density_points: list, runs: list) -> dict:
    """Plots, metrics.json and report.md into ``out_dir``; returns the metrics as written."""
    from .report import write_report

    written = []
    for species, series in msd_series.items():
        written.append(plots.plot_msd(out_dir / f"msd_{_file_label(species)}.png", species, series))
    if arrhenius_series:
        written.append(plots.plot_arrhenius(out_dir / "arrhenius.png", arrhenius_series,
                                           [run.temperature_K for run in runs]))
    for name, (function, *args) in figures.items():
        written.append(function(out_dir / name, *args))
    if reference is not None:
        written.append(plots.plot_density(out_dir / "density.png", reference, density_points))
    metrics["plots"] = [p.name for p in written]
    metrics = _jsonable(metrics)
    write_json_atomic(out_dir / METRICS_JSON, metrics)
    write_report(out_dir / REPORT_MD, metrics)
    return metrics
