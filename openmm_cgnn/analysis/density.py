"""Mass density of runs, and the experimental density of the same liquid from a data table.

The experimental tables live in the liquid files (``openmm_cgnn/liquids/*.json``, field
``experimental_density``); a run is matched to a liquid by the element formulae of its molecule
types (Hill order) and their ratio, so residue names do not matter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import gcd
from typing import Any, Sequence

import numpy as np

from ..units import density_kg_m3
from ..periodic import orthorhombic_lengths


def hill_formula(elements: Sequence[str]) -> str:
    """Element formula in Hill order (C, H, then alphabetical; alphabetical without carbon)."""
    counts: dict[str, int] = {}
    for element in elements:
        if not element:
            raise ValueError("hill_formula: a particle has no element (a CG bead?)")
        counts[element] = counts.get(element, 0) + 1
    order = sorted(counts)
    if "C" in counts:
        order = ["C"] + (["H"] if "H" in counts else []) + [e for e in order if e not in ("C", "H")]
    return "".join(e + (str(counts[e]) if counts[e] > 1 else "") for e in order)


def composition(elements: Sequence[str], residue_index: np.ndarray) -> dict[str, int]:
    """Number of molecules of each formula in an all-atom topology."""
    elements = list(elements)
    residue_index = np.asarray(residue_index)
    counts: dict[str, int] = {}
    for residue in np.unique(residue_index):
        formula = hill_formula([elements[i] for i in np.flatnonzero(residue_index == residue)])
        counts[formula] = counts.get(formula, 0) + 1
    return counts


def _reduced(counts: dict[str, int]) -> dict[str, int]:
    divisor = 0
    for n in counts.values():
        divisor = gcd(divisor, int(n))
    return {k: int(n) // divisor for k, n in counts.items()}


@dataclass
class ExperimentalDensity:
    name: str
    source: str
    temperature_K: np.ndarray
    density_kg_m3: np.ndarray
    intercept: float
    slope: float

    def at(self, temperature_K: float) -> tuple[float, bool]:
        """Density (kg/m^3) at T and whether it is extrapolated beyond the measured range.

        Inside the table: linear interpolation between measurements; outside: the linear fit.
        """
        t_min, t_max = float(self.temperature_K.min()), float(self.temperature_K.max())
        if t_min <= temperature_K <= t_max:
            return float(np.interp(temperature_K, self.temperature_K, self.density_kg_m3)), False
        return float(self.intercept + self.slope * temperature_K), True

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source,
                "measured_range_K": [float(self.temperature_K.min()), float(self.temperature_K.max())]}


def find_experimental_density(molecule_counts: dict[str, int], liquids: Sequence[Any] | None = None
                              ) -> ExperimentalDensity | None:
    """The experimental density of the liquid whose formula units match ``molecule_counts``
    (formula -> count) in ratio, if that liquid has one (default: the shipped liquids)."""
    from ..liquids import available_liquids, load_liquid

    wanted = _reduced(molecule_counts)
    for liquid in liquids if liquids is not None else [load_liquid(n) for n in available_liquids()]:
        entry = liquid.experimental_density
        if entry is not None and _reduced(liquid.formula_units()) == wanted:
            return ExperimentalDensity(
                name=liquid.title,
                source=entry["source"],
                temperature_K=np.asarray(entry["temperature_K"], dtype=np.float64),
                density_kg_m3=np.asarray(entry["density_kg_m3"], dtype=np.float64),
                intercept=float(entry["linear_fit"]["intercept_kg_m3"]),
                slope=float(entry["linear_fit"]["slope_kg_m3_K"]),
            )
    return None


@dataclass
class DensityResult:
    density_kg_m3: float
    err_kg_m3: float | None  # standard error over time blocks; 0 when the box never changes (NVT)
    box_fixed: bool
    n_frames: int

    def to_dict(self) -> dict:
        return asdict(self)


def block_standard_error(values: Sequence[float], n_blocks: int) -> float | None:
    """Standard error of the mean of a correlated series from ``n_blocks`` consecutive block means.

    None with fewer than two samples per block: too few to tell fluctuation from drift.
    """
    values = np.asarray(values, dtype=float)
    if n_blocks < 2 or values.size < 2 * n_blocks:
        return None
    blocks = np.array([b.mean() for b in np.array_split(values, n_blocks)])
    return float(blocks.std(ddof=1) / np.sqrt(n_blocks))


def run_density(total_mass_amu: float, box: np.ndarray, n_blocks: int = 5) -> DensityResult:
    """Mean mass density of a run from its box volumes, with a block-average error."""
    lengths = orthorhombic_lengths(box)
    density = density_kg_m3(total_mass_amu, np.prod(lengths, axis=1))
    fixed = bool(np.ptp(density) <= 1e-9 * density.mean())
    err = 0.0 if fixed else block_standard_error(density, n_blocks)
    return DensityResult(float(density.mean()), err, fixed, int(density.size))


def density_line_fit(temperatures_K: Sequence[float], densities_kg_m3: Sequence[float],
                     errors_kg_m3: Sequence[float | None]) -> dict[str, Any]:
    """Weighted straight line rho(T) = intercept + slope * T through per-temperature densities.

    Weights are 1/error^2; a missing or zero error gets the mean of the others (all missing: equal
    weights). Liquid densities are close to linear in T over a few hundred K, so the line pools the
    NPT runs of every temperature and takes out the noise of each one's short average.
    ``residual_chi2`` is the weighted sum of squared residuals over the degrees of freedom (about 1
    when the line and the errors agree). Needs two or more distinct temperatures.
    """
    t = np.asarray(temperatures_K, dtype=float)
    rho = np.asarray(densities_kg_m3, dtype=float)
    if np.unique(t).size < 2:
        raise ValueError(f"a rho(T) line needs NPT runs at two or more temperatures, got {sorted(set(t.tolist()))}")
    known = [e for e in errors_kg_m3 if e]
    fill = float(np.mean(known)) if known else 1.0
    sigma = np.array([e if e else fill for e in errors_kg_m3], dtype=float)
    (slope, intercept), cov = np.polyfit(t, rho, 1, w=1.0 / sigma, cov="unscaled")
    residual = (rho - (intercept + slope * t)) / sigma
    dof = t.size - 2
    return {"slope_kg_m3_K": float(slope), "intercept_kg_m3": float(intercept),
            "slope_err_kg_m3_K": float(np.sqrt(cov[0, 0])), "covariance": cov.tolist(),
            "residual_chi2": float(residual @ residual / dof) if dof > 0 else None,
            "points": [{"temperature_K": float(a), "density_kg_m3": float(b), "err_kg_m3": float(c)}
                       for a, b, c in zip(t, rho, sigma)]}


def density_on_line(fit: dict[str, Any], temperature_K: float) -> tuple[float, float]:
    """The fitted density at ``temperature_K`` and its standard error (from the fit's covariance)."""
    x = np.array([temperature_K, 1.0])
    value = fit["intercept_kg_m3"] + fit["slope_kg_m3_K"] * temperature_K
    return float(value), float(np.sqrt(x @ np.asarray(fit["covariance"]) @ x))
