"""PNG figures of the evaluation. AA is always black and solid, CG red and dashed.

Every function takes plain arrays so it can be called on any data; matplotlib is imported lazily
with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import save_figure

AA_STYLE = {"color": "black", "linestyle": "-"}
CG_STYLE = {"color": "tab:red", "linestyle": "--"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n_panels: int, panel_size: tuple[float, float] = (3.6, 2.8), max_columns: int = 3):
    plt = _pyplot()
    columns = min(max_columns, n_panels)
    rows = int(np.ceil(n_panels / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.6),
                             squeeze=False)
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    return plt, fig, axes.ravel()[:n_panels]


def _save(plt, fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    return save_figure(fig, path, dpi=110)


@dataclass
class RDFPanel:
    label: str
    r: np.ndarray
    g_aa: np.ndarray | None
    g_cg: np.ndarray | None
    error: float | None = None
    reliable: np.ndarray | None = None  # bins with enough counts to set the y range from
    noise_floor: float | None = None


def plot_rdfs(path: Path, title: str, panels: Sequence[RDFPanel]) -> Path:
    """One panel per pair: AA and CG g(r) overlaid, the relative integrated error in the corner."""
    plt, fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels):
        ax.axhline(1.0, color="0.75", linewidth=0.8)
        if panel.g_aa is not None:
            ax.plot(panel.r, panel.g_aa, label="AA (mapped)", linewidth=1.4, **AA_STYLE)
        if panel.g_cg is not None:
            ax.plot(panel.r, panel.g_cg, label="CG", linewidth=1.4, **CG_STYLE)
        ax.set_title(panel.label, fontsize=10)
        ax.set_xlabel("r (nm)")
        ax.set_ylabel("g(r)")
        ax.set_xlim(0, panel.r[-1] + 0.5 * (panel.r[1] - panel.r[0]))
        curves = [g for g in (panel.g_aa, panel.g_cg) if g is not None]
        mask = panel.reliable if panel.reliable is not None and panel.reliable.any() else slice(None)
        # Counting noise in the first, nearly empty bins would otherwise set the scale.
        ax.set_ylim(0, 1.1 * max(1.2, max(float(np.max(g[mask])) for g in curves)))
        if panel.error is not None:
            text = f"error {100 * panel.error:.1f}%"
            if panel.noise_floor is not None:
                text += f"\n(noise alone {100 * panel.noise_floor:.1f}%)"
            # Top left: inside the excluded core g(r) is 0, so no curve runs there.
            ax.text(0.03, 0.95, text, transform=ax.transAxes, ha="left", va="top", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False, ncol=2)
    return _save(plt, fig, path, layout=False)


@dataclass
class MSDSeries:
    temperature_K: float
    lag_ps: np.ndarray
    msd_nm2: np.ndarray
    fit_start_ps: float | None  # None: no diffusive regime
    fit_end_ps: float | None
    D_m2_s: float | None


def plot_msd(path: Path, species: str, series: dict[str, Sequence[MSDSeries]]) -> Path:
    """MSD against lag time, log-log, one panel per kind (AA, CG), coloured by temperature.

    The fitted diffusive window is drawn as a thick translucent band over the curve, and a dotted
    slope-1 guide marks what diffusive looks like; curves without a band have no reported D.
    """
    plt = _pyplot()
    kinds = [k for k in ("aa", "cg") if series.get(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.2), squeeze=False, sharey=True)
    temperatures = sorted({s.temperature_K for k in kinds for s in series[k]})
    cmap = plt.get_cmap("viridis")
    # viridis without its pale yellow end, which vanishes on white
    colour = {t: cmap(i / max(1, len(temperatures) - 1) * 0.8) for i, t in enumerate(temperatures)}
    for ax, kind in zip(axes[0], kinds):
        lowest = np.inf
        for s in sorted(series[kind], key=lambda s: s.temperature_K):
            keep = s.lag_ps > 0
            label = f"{s.temperature_K:g} K" + ("" if s.D_m2_s is not None else " (no D)")
            ax.loglog(s.lag_ps[keep], s.msd_nm2[keep], color=colour[s.temperature_K], linewidth=1.2, label=label)
            lowest = min(lowest, float(s.msd_nm2[keep][0]))
            if s.fit_start_ps is not None:
                window = (s.lag_ps >= s.fit_start_ps) & (s.lag_ps <= s.fit_end_ps)
                ax.loglog(s.lag_ps[window], s.msd_nm2[window], color=colour[s.temperature_K],
                          linewidth=7, alpha=0.3, solid_capstyle="butt")
        all_lags = np.concatenate([s.lag_ps[s.lag_ps > 0] for s in series[kind]])
        guide_t = np.array([all_lags.min(), all_lags.max()])
        # Below every curve so it never hides one.
        ax.loglog(guide_t, 0.3 * lowest * guide_t / guide_t[0], color="0.5", linestyle=":", label="slope 1 (guide)")
        ax.plot([], [], color="0.5", linewidth=7, alpha=0.3, label="fitted diffusive window")
        ax.set_title(f"{species}: {'AA (mapped)' if kind == 'aa' else 'CG'}", fontsize=11)
        ax.set_xlabel("lag time (ps)")
        ax.grid(True, which="major", color="0.9")
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    axes[0][0].set_ylabel("MSD of molecular centre (nm$^2$)")
    return _save(plt, fig, path)


@dataclass
class ArrheniusSeries:
    temperature_K: np.ndarray
    D_m2_s: np.ndarray
    D_err_m2_s: np.ndarray
    Ea_kJ_mol: float | None
    Ea_err_kJ_mol: float | None
    D0_m2_s: float | None


def plot_arrhenius(path: Path, data: dict[str, dict[str, ArrheniusSeries]],
                   run_temperatures_K: Sequence[float] = ()) -> Path:
    """D (log scale) against 1000/T per species with the AA and CG fits and their E_a in the legend.

    Thin grey lines mark every temperature that was run, so a temperature without a point reads
    as "D not converged there" rather than as never simulated.
    """
    from ..units import MOLAR_GAS_CONSTANT_KJ_MOL_K

    plt, fig, axes = _grid(len(data), panel_size=(4.6, 3.8))
    run_x = 1000.0 / np.asarray(sorted(set(run_temperatures_K)), dtype=float)
    for ax, (species, by_kind) in zip(axes, data.items()):
        for i, x in enumerate(run_x):
            ax.axvline(x, color="0.85", linewidth=0.8, zorder=0, label="run temperatures" if i == 0 else None)
        for kind, style, marker in (("aa", AA_STYLE, "o"), ("cg", CG_STYLE, "s")):
            s = by_kind.get(kind)
            if s is None or len(s.temperature_K) == 0:
                continue
            name = "AA" if kind == "aa" else "CG"
            x = 1000.0 / np.asarray(s.temperature_K)
            if s.Ea_kJ_mol is not None:
                label = f"{name}: $E_a$ = {s.Ea_kJ_mol:.1f} ± {s.Ea_err_kJ_mol:.1f} kJ/mol"
                grid = np.linspace(x.min(), x.max(), 50)
                ax.plot(grid, s.D0_m2_s * np.exp(-s.Ea_kJ_mol * grid / (1000 * MOLAR_GAS_CONSTANT_KJ_MOL_K)),
                        linewidth=1.2, **style)
            else:
                label = f"{name}: no fit (too few temperatures)"
            ax.errorbar(x, s.D_m2_s, yerr=s.D_err_m2_s, fmt=marker, color=style["color"], capsize=3,
                        markersize=5, label=label)
        has_points = any(s is not None and len(s.temperature_K) for s in by_kind.values())
        ax.set_xlabel("1000 / T (1/K)")
        ax.set_title(species, fontsize=11)
        if not has_points:
            # No D axis to draw: a blank linear 0..1 axis with an exponent label reads as data.
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no converged D at any temperature\n(see the MSD plot)", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
            if run_x.size:
                pad = 0.05 * max(float(np.ptp(run_x)), 0.2)
                ax.set_xlim(run_x.min() - pad, run_x.max() + pad)
        else:
            ax.set_yscale("log")
            ax.set_ylabel("D (m$^2$/s)")
            ax.legend(fontsize=8, frameon=False)
        if ax.get_xlim()[0] > 0:  # T = 1000/x is only defined on positive 1000/T
            top = ax.secondary_xaxis("top", functions=(lambda v: 1000.0 / np.maximum(v, 1e-9),
                                                        lambda v: 1000.0 / np.maximum(v, 1e-9)))
            top.set_xlabel("T (K)", fontsize=8)
            top.tick_params(labelsize=7)
    return _save(plt, fig, path)


def plot_distributions(path: Path, title: str, xlabel: str, comparisons: dict) -> Path:
    """Histograms (``structure.DistributionComparison``) of AA and CG per bond or angle type."""
    plt, fig, axes = _grid(len(comparisons), panel_size=(3.4, 2.6), max_columns=4)
    for ax, (name, c) in zip(axes, comparisons.items()):
        centres = 0.5 * (c.edges[1:] + c.edges[:-1])
        ax.plot(centres, c.density_aa, label="AA (mapped)", linewidth=1.4, **AA_STYLE)
        ax.plot(centres, c.density_cg, label="CG", linewidth=1.4, **CG_STYLE)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_yticks([])
        ax.text(0.97, 0.95, f"diff {100 * c.error:.0f}%", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False, loc="upper left")
    fig.suptitle(title, fontsize=11)
    return _save(plt, fig, path)


def plot_density(path: Path, reference, runs: Sequence[tuple[float, float, float | None]]) -> Path:
    """AA densities (T, rho, err) against the experimental table and its linear fit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    t_runs = [t for t, _, _ in runs]
    t_lo = min(float(reference.temperature_K.min()), *t_runs) - 10
    t_hi = max(float(reference.temperature_K.max()), *t_runs) + 10
    grid = np.linspace(t_lo, t_hi, 100)
    ax.plot(grid, reference.intercept + reference.slope * grid, color="0.6", linestyle=":",
            label="experiment, linear fit (extrapolated outside the points)")
    ax.plot(reference.temperature_K, reference.density_kg_m3, "D", color="0.4", markersize=4, label="experiment")
    ax.errorbar(t_runs, [r for _, r, _ in runs], yerr=[e or 0.0 for _, _, e in runs], fmt="o", color="black",
                capsize=3, label="AA simulation")
    ax.set_xlabel("T (K)")
    ax.set_ylabel("density (kg/m$^3$)")
    ax.set_title(f"Density of {reference.name}", fontsize=11)
    ax.legend(fontsize=8, frameon=False)
    return _save(plt, fig, path)
