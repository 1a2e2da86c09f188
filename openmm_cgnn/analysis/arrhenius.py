"""Arrhenius fit ln D = ln D0 - Ea / (R T) of self-diffusion coefficients over temperature."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..units import MOLAR_GAS_CONSTANT_KJ_MOL_K
NOT_ENOUGH_TEMPERATURES = "not enough temperatures"


@dataclass
class ArrheniusFit:
    status: str  # "ok" or NOT_ENOUGH_TEMPERATURES
    reason: str | None
    Ea_kJ_mol: float | None
    Ea_err_kJ_mol: float | None
    D0_m2_s: float | None  # prefactor
    ln_D0_err: float | None  # uncertainty of ln D0 (D0 itself is log-normal)
    temperatures_K: list[float] = field(default_factory=list)
    n_points: int = 0
    reduced_chi2: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def predict(self, temperature_K: np.ndarray) -> np.ndarray:
        """D (m^2/s) of the fitted law at the given temperatures."""
        if self.status != "ok":
            raise ValueError(f"no Arrhenius law to evaluate: {self.reason}")
        return self.D0_m2_s * np.exp(-self.Ea_kJ_mol / (MOLAR_GAS_CONSTANT_KJ_MOL_K * np.asarray(temperature_K)))


def fit_arrhenius(
    temperature_K: np.ndarray, D_m2_s: np.ndarray, D_err_m2_s: np.ndarray | None = None
) -> ArrheniusFit:
    """Weighted least squares of ln D against 1/T.

    Weights are 1/sigma(ln D)^2 with sigma(ln D) = sigma(D)/D. The parameter errors come from the
    covariance with the given sigmas, inflated by sqrt(reduced chi^2) when the points scatter more
    than their error bars say (never deflated). Without error bars the scatter alone sets them,
    which needs at least three temperatures. Two temperatures with error bars give an exact line
    whose errors come from the error bars only.
    """
    T = np.asarray(temperature_K, dtype=np.float64)
    D = np.asarray(D_m2_s, dtype=np.float64)
    if T.shape != D.shape or T.ndim != 1:
        raise ValueError(f"fit_arrhenius: temperatures {T.shape} and D {D.shape} must be 1-d and match")
    if np.any(T <= 0) or np.any(D <= 0) or not np.all(np.isfinite(D)):
        raise ValueError("fit_arrhenius: temperatures and D must be positive and finite")
    n_unique = np.unique(np.round(T, 3)).size
    if n_unique < 2 or (D_err_m2_s is None and n_unique < 3):
        need = 2 if D_err_m2_s is not None else 3
        return ArrheniusFit(
            status=NOT_ENOUGH_TEMPERATURES,
            reason=f"{n_unique} temperature(s) with a converged D; need at least {need}",
            Ea_kJ_mol=None, Ea_err_kJ_mol=None, D0_m2_s=None, ln_D0_err=None,
            temperatures_K=T.tolist(), n_points=int(T.size),
        )
    x = 1.0 / T
    y = np.log(D)
    if D_err_m2_s is not None:
        sigma = np.asarray(D_err_m2_s, dtype=np.float64) / D
        if sigma.shape != D.shape or np.any(~(sigma > 0)):
            raise ValueError("fit_arrhenius: D errors must be positive, one per point")
    else:
        sigma = np.ones_like(y)
    design = np.stack([np.ones_like(x), x], axis=1) / sigma[:, None]
    coeffs, *_ = np.linalg.lstsq(design, y / sigma, rcond=None)
    covariance = np.linalg.inv(design.T @ design)
    dof = T.size - 2
    chi2 = float(np.sum(((y - (coeffs[0] + coeffs[1] * x)) / sigma) ** 2))
    reduced = chi2 / dof if dof > 0 else None
    if D_err_m2_s is None:
        covariance *= reduced
    elif reduced is not None and reduced > 1:
        covariance *= reduced
    errors = np.sqrt(np.diag(covariance))
    return ArrheniusFit(
        status="ok",
        reason=None,
        Ea_kJ_mol=float(-coeffs[1] * MOLAR_GAS_CONSTANT_KJ_MOL_K),
        Ea_err_kJ_mol=float(errors[1] * MOLAR_GAS_CONSTANT_KJ_MOL_K),
        D0_m2_s=float(np.exp(coeffs[0])),
        ln_D0_err=float(errors[0]),
        temperatures_K=T.tolist(),
        n_points=int(T.size),
        reduced_chi2=reduced,
    )
