"""``run_aa``: all-atom ground truth for one or more temperatures (the ``openmm-cgnn aa`` stage).

Everything is checked, the box built and the System created before the output directory is
touched, so bad input leaves nothing behind. With one temperature the run lives in ``out``;
with several, in ``out/T<T>K/`` each, and ``out/summary.json`` lists them.

The NVT box of each temperature is its own NPT mean by default. With ``density_fit`` it is read off
a straight rho(T) line fitted over the NPT runs of every temperature (this command's and those of
other ``aa`` directories, e.g. one job per temperature that stopped after NPT with ``npt_only``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..layout import CHECKPOINT_CHK, NPT_JSON, RUN_JSON, SUMMARY_JSON
from ..platforms import PlatformError, available_platforms, get_platform, platform_properties, versions  # noqa: F401  (aa API)
from ..units import cube_edge_nm, in_amu
from ..io import (CorruptFileError, check_output_dir, output_dir, read_marker, staging_path, verify_checksum,
                  write_text_atomic)
from .stages import AARunError, RunSettings, SingleRun, stdout_log

if TYPE_CHECKING:
    from ..liquids import Liquid

DEFAULT_CUTOFF_NM = 1.0
MIN_CUTOFF_NM = 0.4  # below this the truncated LJ and PME real-space sums are poor
# NPT may compress the start box by up to this density factor; the cutoff must stay below half
# the compressed edge (OpenMM stops otherwise).
MAX_COMPRESSION = 1.6
# Settings a resumed run must share with the original (production_ps may grow).
RESUME_KEYS = {"composition": "the molecule counts (--liquid, --pairs, --units, --molecules, --residues)",
               "temperature_K": "--temperature",
               "equilibrate_ps": "--equilibrate-ps", "save_every_ps": "--save-every-ps",
               "charge_scale": "--charge-scale", "seed": "--seed", "cutoff_nm": "--cutoff-nm", "dt_fs": "--dt-fs",
               "start_density_kg_m3": "--start-density", "platform": "--platform",
               "forcefield": "--forcefield-dir", "pressure_bar": "pressure_bar", "friction_per_ps": "friction_per_ps",
               "max_equilibrate_ps": "--max-equilibrate-ps"}


class AAInputError(ValueError):
    """Bad input to an all-atom run; the message names the argument (CLI spelling)."""


def auto_cutoff_nm(start_edge_nm: float) -> float:
    """Default cutoff: 1.0 nm, or less for small boxes (half the edge after maximal compression)."""
    limit = max_cutoff_nm(start_edge_nm)
    return min(DEFAULT_CUTOFF_NM, math.floor(limit * 100) / 100)


def max_cutoff_nm(start_edge_nm: float) -> float:
    return 0.5 * start_edge_nm * MAX_COMPRESSION ** (-1.0 / 3.0)


def run_dir_name(temperature_K: float) -> str:
    return f"T{temperature_K:g}K"


def _positive(value: float, flag: str, integer: bool = False) -> None:
    bad = (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0
           or (integer and int(value) != value))
    if bad:
        raise AAInputError(f"{flag} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _multiple_of_dt(value_ps: float, dt_ps: float, flag: str) -> None:
    steps = value_ps / dt_ps
    if abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
        raise AAInputError(f"{flag} {value_ps:g} ps is not a whole number of {dt_ps * 1000:g} fs time steps")


def run_aa(out: str | Path, count: int | Mapping[str, int], temperatures: float | Sequence[float],
           equilibrate_ps: float, production_ps: float, save_every_ps: float, *, charge_scale: float = 1.0,
           platform: str | None = None, seed: int = 0, cutoff_nm: float | None = None, dt_fs: float = 2.0,
           resume: bool = False, overwrite: bool = False, start_density_kg_m3: float | None = None,
           forcefield_dir: str | Path | None = None, residues: Sequence[str] | None = None,
           liquid: "str | Path | Liquid | None" = None, count_option: str = "--pairs",
           device_index: int | None = None, pressure_bar: float = 1.0, friction_per_ps: float = 1.0,
           max_equilibrate_ps: float | None = None, npt_only: bool = False,
           density_fit: Sequence[str | Path] | None = None,
           log: Callable[[str], None] = stdout_log) -> dict[str, Any]:
    """Build, minimise, equilibrate (NPT) and run NVT production at each temperature.

    ``count`` is a number of formula units or explicit molecule counts ``{residue: n}``. The
    molecule types and their ratio come from ``liquid`` (a name, a liquid file or a
    :class:`~openmm_cgnn.liquids.Liquid`; its force field unless ``forcefield_dir`` is given), or
    else from ``residues`` (default: every residue of the force field data), one of each per unit.
    ``count_option`` is the option named in errors about the count (``--pairs``, ``--units``,
    ``--molecules``). Molecules are inserted at ``start_density_kg_m3`` (default: the densest of
    ``builder.START_DENSITY_LADDER`` that fits). Returns the summary (with several temperatures: the list of
    per-temperature summaries under ``"runs"``). Raises :class:`AAInputError` naming the
    argument for bad input, before anything is written.

    ``max_equilibrate_ps``: extend NPT (in steps of half ``equilibrate_ps``) while its density
    drifts, up to this length. ``npt_only``: stop every temperature after NPT (``npt.json``); a
    later call with ``resume`` continues it. ``density_fit``: NVT boxes from the rho(T) line over
    this call's NPT runs and those in the given ``aa`` directories (an empty list: this call's only).
    """
    temps = [temperatures] if isinstance(temperatures, (int, float)) else list(temperatures)
    if isinstance(count, Mapping):
        count_option = "--molecules"
    else:
        _positive(count, count_option, integer=True)
    _check_settings(temps, equilibrate_ps, production_ps, save_every_ps, charge_scale, dt_fs, pressure_bar,
                    friction_per_ps, seed, max_equilibrate_ps)
    if resume and overwrite:
        raise AAInputError("--resume and --overwrite exclude each other")
    if npt_only and density_fit is not None:
        raise AAInputError("--npt-only and --density-fit exclude each other (the fit decides the NVT box)")
    try:  # the fastest platform that starts here when none is given
        platform = get_platform(platform).getName()
        platform_properties(platform, device_index)  # a device index needs a GPU platform
    except PlatformError as exc:
        raise AAInputError(str(exc)) from None

    ff, composition, n_units, liquid = _molecules(count, count_option, liquid, residues, forcefield_dir)
    topology, positions, start_density_kg_m3, cutoff_nm = _start_box(
        ff, composition, _describe(count), count_option, start_density_kg_m3, seed, cutoff_nm, charge_scale)

    ff_hash = hashlib.sha256(ff.xml_path.read_bytes()).hexdigest()
    forcefield = f"{ff.description}; converted {ff.xml_path.name} sha256 {ff_hash}"
    out = Path(out)
    multi = len(temps) > 1
    runs = {t: (out / run_dir_name(t) if multi else out) for t in temps}
    fit_sources = None if density_fit is None else _npt_sources(density_fit, set(runs.values()))
    settings = {t: RunSettings(
        n_units=n_units, composition=composition, temperature_K=float(t), equilibrate_ps=float(equilibrate_ps),
        production_ps=float(production_ps), save_every_ps=float(save_every_ps), charge_scale=float(charge_scale),
        seed=seed, cutoff_nm=float(cutoff_nm), dt_fs=float(dt_fs), start_density_kg_m3=float(start_density_kg_m3),
        pressure_bar=float(pressure_bar), friction_per_ps=float(friction_per_ps), platform=platform,
        forcefield=forcefield, max_equilibrate_ps=None if max_equilibrate_ps is None else float(max_equilibrate_ps))
        for t in temps}
    replace = _prepare_directory(out, runs, settings, resume, overwrite)
    # A replacement is built beside the old run and swapped in when every temperature is done.
    try:
        with output_dir(out, "aa", replace) as work:
            runners = _runners(work, temps, settings, topology, positions, ff, forcefield, composition, liquid,
                               cutoff_nm, platform, device_index, log)
            if npt_only:
                return _run_npt_only(runners, out, work)
            summaries = _run_all(runners, out, work, fit_sources)
    except AARunError as exc:
        if replace:
            raise AARunError(f"{exc} (the failed run is in {staging_path(out)}; {out} is unchanged)") from None
        raise
    if multi:
        return json.loads((out / SUMMARY_JSON).read_text())
    summaries[0]["dir"] = str(out)
    return summaries[0]


def _check_settings(temps: list[float], equilibrate_ps: float, production_ps: float, save_every_ps: float,
                    charge_scale: float, dt_fs: float, pressure_bar: float, friction_per_ps: float, seed: int,
                    max_equilibrate_ps: float | None) -> None:
    """The numbers of a run, each checked; the error names the option."""
    if not temps:
        raise AAInputError("--temperature needs at least one value")
    for t in temps:
        _positive(t, "--temperature")
    if len(set(temps)) != len(temps):
        raise AAInputError(f"--temperature lists a value twice: {temps}")
    for value, flag in ((equilibrate_ps, "--equilibrate-ps"), (production_ps, "--production-ps"),
                        (save_every_ps, "--save-every-ps"), (charge_scale, "--charge-scale"), (dt_fs, "--dt-fs"),
                        (pressure_bar, "pressure_bar"),
                        (friction_per_ps, "friction_per_ps")):
        _positive(value, flag)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AAInputError(f"--seed must be a non-negative integer, got {seed!r}")
    if dt_fs > 4.0:
        raise AAInputError(f"--dt-fs {dt_fs:g} is too large for constrained X-H bonds only (use <= 4)")
    dt_ps = dt_fs / 1000.0
    _multiple_of_dt(save_every_ps, dt_ps, "--save-every-ps")
    _multiple_of_dt(equilibrate_ps, dt_ps, "--equilibrate-ps")
    if round(equilibrate_ps / dt_ps) < 20:
        raise AAInputError(f"--equilibrate-ps {equilibrate_ps:g} is under 20 time steps; the density needs more")
    if save_every_ps > production_ps:
        raise AAInputError(f"--save-every-ps {save_every_ps:g} exceeds --production-ps {production_ps:g}: no frames")
    if max_equilibrate_ps is not None:
        _positive(max_equilibrate_ps, "--max-equilibrate-ps")
        _multiple_of_dt(max_equilibrate_ps, dt_ps, "--max-equilibrate-ps")
        if max_equilibrate_ps < equilibrate_ps:
            raise AAInputError(f"--max-equilibrate-ps {max_equilibrate_ps:g} is under --equilibrate-ps {equilibrate_ps:g}")


def _start_box(ff: Any, composition: dict[str, int], count_text: str, count_option: str,
               start_density_kg_m3: float | None, seed: int, cutoff_nm: float | None,
               charge_scale: float) -> tuple[Any, Any, float, float]:
    """(topology, positions, start density, cutoff) of the inserted box; its System is built once as a check."""
    from .builder import BoxBuildError, build_box, build_box_auto
    from .forcefield import ForceFieldDataError, build_system

    if start_density_kg_m3 is not None:
        _positive(start_density_kg_m3, "--start-density")
    try:
        if start_density_kg_m3 is None:
            topology, positions, start_density_kg_m3 = build_box_auto(ff, composition, seed=seed)
        else:
            topology, positions = build_box(ff, composition, start_density_kg_m3, seed=seed)
    except BoxBuildError as exc:
        raise AAInputError(f"--start-density: {exc}") from None
    total_mass = sum(in_amu(a.element.mass) for a in topology.atoms())
    start_edge = cube_edge_nm(total_mass, start_density_kg_m3)
    if cutoff_nm is None:
        cutoff_nm = auto_cutoff_nm(start_edge)
    _positive(cutoff_nm, "--cutoff-nm")
    limit = max_cutoff_nm(start_edge)
    if cutoff_nm > limit:
        raise AAInputError(f"--cutoff-nm {cutoff_nm:g} is more than half the box edge after NPT compression "
                           f"(start edge {start_edge:.2f} nm, allowed <= {limit:.2f} nm); use a larger {count_option}")
    if cutoff_nm < MIN_CUTOFF_NM:
        raise AAInputError(f"{count_option} {count_text} gives a box too small for a cutoff of at least "
                           f"{MIN_CUTOFF_NM} nm (start edge {start_edge:.2f} nm)")
    try:
        build_system(topology, ff, cutoff_nm=cutoff_nm, charge_scale=charge_scale)
    except ForceFieldDataError as exc:
        raise AAInputError(f"--forcefield-dir: {exc}") from None
    return topology, positions, float(start_density_kg_m3), float(cutoff_nm)


def _runners(work: Path, temps: list[float], settings: dict[float, RunSettings], topology: Any,
             positions: Any, ff: Any, forcefield: str, composition: dict[str, int], liquid: "Liquid | None",
             cutoff_nm: float, platform: str, device_index: int | None,
             log: Callable[[str], None]) -> list[SingleRun]:
    """One :class:`SingleRun` per temperature (in ``work``, the directory being written), run.json written."""
    multi = len(temps) > 1
    runs = {t: (work / run_dir_name(t) if multi else work) for t in temps}
    stack = versions()
    runners = []
    for t in temps:
        s = settings[t]
        write_text_atomic(runs[t] / RUN_JSON, json.dumps(s.__dict__, indent=2) + "\n")
        metadata = {"kind": "aa", "temperature_K": s.temperature_K, "charge_scale": s.charge_scale,
                    "forcefield": forcefield, "forcefield_dir": str(ff.directory), "seed": s.seed, "versions": stack,
                    "platform": platform, **s.unit_counts(), "composition": composition, "cutoff_nm": s.cutoff_nm,
                    "liquid": liquid.name if liquid is not None else None,
                    "dt_fs": s.dt_fs, "save_every_ps": s.save_every_ps, "equilibrate_ps": s.equilibrate_ps,
                    "pressure_bar": s.pressure_bar, "friction_per_ps": s.friction_per_ps,
                    "time_origin": "start of NVT production (frame k at k * save_every_ps)",
                    "thermostat": "LangevinMiddleIntegrator",
                    "ensemble": "NVT at the NPT mean density, or at a rho(T) fit over several NPT runs",
                    "constraints": "CL&P cons bonds (X-H)", "nonbonded": "PME + LJ geometric mixing with LRC"}
        counts = ", ".join(f"{n} {r}" for r, n in composition.items())
        log(f"[aa {t:g} K] {runs[t]}: {counts}, {topology.getNumAtoms()} atoms, cutoff {cutoff_nm:g} nm, "
            f"platform {platform}")
        runners.append(SingleRun(runs[t], s, topology, positions, ff, metadata, log, device_index))
    return runners


def _run_npt_only(runners: list[SingleRun], out: Path, work: Path) -> dict[str, Any]:
    """Every temperature up to the end of NPT; their npt.json contents (one, or a list under ``runs``)."""
    results = [dict(r.run(npt_only=True), dir=str(out / r.dir.relative_to(work))) for r in runners]
    if len(results) == 1:
        return results[0]
    return {"kind": "aa", "stage": "npt", "runs": results, "density_kg_m3": [r["density_kg_m3"] for r in results]}


def _run_all(runners: list[SingleRun], out: Path, work: Path,
             fit_sources: list[Path] | None) -> list[dict[str, Any]]:
    """Every temperature to the end; with ``fit_sources`` NPT first everywhere, then NVT at the rho(T) line."""
    multi = len(runners) > 1
    temps = [r.s.temperature_K for r in runners]
    densities: dict[float, dict[str, Any] | None] = {t: None for t in temps}
    if fit_sources is not None:
        own = [r.run(npt_only=True) for r in runners]
        densities = _fitted_densities(own + [_read_npt(p) for p in fit_sources], temps, runners[0].log)
    summaries = []
    for runner in runners:
        summary = runner.run(nvt_density=densities[runner.s.temperature_K])
        summary["dir"] = str(out / runner.dir.relative_to(work))
        summaries.append(summary)
        if multi:
            _write_parent_summary(work, summaries, temps)
    return summaries


def _npt_sources(dirs: Sequence[str | Path], own: set[Path]) -> list[Path]:
    """The npt.json files a rho(T) fit reads besides this call's own runs; errors name --density-fit."""
    own_resolved = {p.resolve() for p in own}
    found: list[Path] = []
    for d in map(Path, dirs):
        if d.resolve() in own_resolved:
            continue  # this call's own run: its NPT comes first
        candidates = [d / NPT_JSON] if (d / NPT_JSON).exists() else sorted(d.glob(f"T*K/{NPT_JSON}"))
        candidates = [c for c in candidates if c.parent.resolve() not in own_resolved]
        if not candidates and not any(p.resolve().is_relative_to(d.resolve()) for p in own):
            raise AAInputError(f"--density-fit {d}: no finished NPT run there ({NPT_JSON}); run `aa --npt-only` "
                               "there first")
        found += candidates
    return found


def _read_npt(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        float(data["temperature_K"]), float(data["density_kg_m3"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AAInputError(f"--density-fit: cannot read {path} ({exc})") from None
    return data


def _fitted_densities(npt_runs: list[dict[str, Any]], temps: list[float],
                      log: Callable[[str], None]) -> dict[float, dict[str, Any]]:
    """The NVT density of each temperature from the rho(T) line over ``npt_runs`` (one per temperature)."""
    from ..analysis.density import density_line_fit, density_on_line

    by_t = {float(r["temperature_K"]): r for r in npt_runs}  # a temperature listed twice counts once
    try:
        fit = density_line_fit(list(by_t), [r["density_kg_m3"] for r in by_t.values()],
                               [r.get("density_sem_kg_m3") for r in by_t.values()])
    except ValueError as exc:
        raise AAInputError(f"--density-fit: {exc}") from None
    log(f"[aa] rho(T) line over {len(by_t)} NPT runs: {fit['intercept_kg_m3']:.1f} "
        f"{fit['slope_kg_m3_K']:+.4f} * T kg/m3 (slope ± {fit['slope_err_kg_m3_K']:.4f})")
    out = {}
    for t in temps:
        value, err = density_on_line(fit, t)
        out[t] = {"source": f"rho(T) line over {len(by_t)} NPT runs", "density_kg_m3": value, "err_kg_m3": err,
                  "own_npt_kg_m3": by_t[t]["density_kg_m3"] if t in by_t else None, "fit": fit}
    return out


def _molecules(count: int | Mapping[str, int], count_option: str, liquid: "str | Path | Liquid | None",
               residues: Sequence[str] | None, forcefield_dir: str | Path | None):
    """(force field, {residue: molecules}, formula units or None, Liquid or None), checked; errors name the option."""
    from ..liquids import Liquid, LiquidError, composition_for, load_liquid
    from .forcefield import ForceFieldDataError, load_forcefield

    if liquid is not None and residues:
        raise AAInputError("--residues and --liquid exclude each other (the liquid names its molecules)")
    try:
        if liquid is not None and not isinstance(liquid, Liquid):
            liquid = load_liquid(liquid)
    except LiquidError as exc:
        raise AAInputError(str(exc)) from None
    # --forcefield-dir overrides the liquid's data (e.g. a regenerated copy).
    use_liquid_data = forcefield_dir is None and liquid is not None
    try:
        ff = load_forcefield(liquid.forcefield_dir if use_liquid_data else forcefield_dir)
    except ForceFieldDataError as exc:
        where = f"{liquid.path}: forcefield.dir" if use_liquid_data else "--forcefield-dir"
        raise AAInputError(f"{where}: {exc}") from None
    residues_option = "--residues" if liquid is None else f"{liquid.path}: molecules"
    residues = liquid.residues if liquid is not None else list(residues) if residues else list(ff.residues)
    unknown = [r for r in residues if r not in ff.residues]
    if unknown or len(set(residues)) != len(residues):
        raise AAInputError(f"{residues_option} {residues}: each must be one of {list(ff.residues)} "
                           f"(in {ff.xml_path}), once")
    try:
        composition, _ = composition_for(liquid, residues, **{count_option.lstrip("-"): count})
    except (LiquidError, TypeError) as exc:
        raise AAInputError(str(exc)) from None
    net = sum(ff.residues[r].charge * n for r, n in composition.items())
    if abs(net) > 1e-6:
        counts = ", ".join(f"{n} {r}" for r, n in composition.items())
        # Explicit counts are the user's to fix; otherwise the molecule list or its ratio is wrong.
        where = "--molecules" if count_option == "--molecules" else residues_option
        raise AAInputError(f"{where}: {counts} has net charge {net:+g} e; a box must be neutral")
    stoichiometry = liquid.stoichiometry if liquid is not None else {r: 1 for r in residues}
    return ff, composition, _formula_units(composition, stoichiometry), liquid


def _formula_units(composition: Mapping[str, int], stoichiometry: Mapping[str, int]) -> int | None:
    """Whole formula units in ``composition``, or None when the counts are not in the liquid's ratio."""
    units = {composition.get(r, 0) / n for r, n in stoichiometry.items()}
    if len(units) == 1 and (value := units.pop()) == int(value) and value > 0:
        return int(value)
    return None


def _describe(count: int | Mapping[str, int]) -> str:
    return ",".join(f"{r}={n}" for r, n in count.items()) if isinstance(count, Mapping) else str(count)


def _prepare_directory(out: Path, runs: dict[float, Path], settings: dict[float, RunSettings], resume: bool,
                       overwrite: bool) -> bool:
    """Check ``out`` for this run; True when an old run there is to be replaced (see ``io.output_dir``)."""
    replace = check_output_dir(out, "aa", overwrite=overwrite, resume=resume)
    exists = out.exists() and any(out.iterdir())
    if exists and resume:
        for run_dir in runs.values():  # a damaged checkpoint is found before anything is rewritten
            if (run_dir / CHECKPOINT_CHK).exists():
                try:
                    verify_checksum(run_dir / CHECKPOINT_CHK, required=False)
                except CorruptFileError as exc:
                    raise AAInputError(f"{exc}; rerun with --overwrite") from None
        if read_marker(out) is None and not any((run_dir / RUN_JSON).exists() for run_dir in runs.values()):
            raise AAInputError(f"--resume: {out} holds no aa run (no {RUN_JSON}); choose another --out")
        for t, run_dir in runs.items():
            old_path = run_dir / RUN_JSON
            if not old_path.exists():
                continue
            try:
                old = json.loads(old_path.read_text())
            except (OSError, ValueError) as exc:
                raise AAInputError(f"--resume: cannot read {old_path} ({exc})") from None
            new = settings[t].__dict__
            for key, flag in RESUME_KEYS.items():
                if old.get(key) != new[key]:
                    raise AAInputError(f"--resume: {flag} differs from the run in {run_dir} "
                                       f"({old.get(key)!r} there, {new[key]!r} now)")
    return replace


def _write_parent_summary(out: Path, summaries: list[dict[str, Any]], temps: list[float]) -> None:
    first = summaries[0]
    # The per-run keys appear as lists (in temperature order) so the parent has the same keys.
    parent = {"kind": "aa", **{k: first[k] for k in ("n_units", "n_pairs", "composition") if k in first},
              "temperature_K": temps, "platform": first["platform"],
              "density_kg_m3": [s["density_kg_m3"] for s in summaries],
              "n_frames": [s["n_frames"] for s in summaries],
              "charge_scale": first["charge_scale"], "complete": len(summaries) == len(temps),
              "runs": [{"temperature_K": s["temperature_K"], "dir": Path(s["dir"]).name,
                        "density_kg_m3": s["density_kg_m3"], "n_frames": s["n_frames"]} for s in summaries]}
    write_text_atomic(out / SUMMARY_JSON, json.dumps(parent, indent=2) + "\n")
