"""Physical priors under the network: excluded volume, bonds and angles (``prior.json``).

The priors keep a CG simulation out of regions the training data never visited (overlapping
beads, stretched bonds); the network learns the correction on top. Their parameters are fitted
from mapped data by Boltzmann inversion (:func:`fit_priors`) and saved in ``prior.json``
(format in docs/contracts.md), which the OpenMM stage can also turn into native forces.

Bonds and angles come in two forms. ``harmonic``: one well, k/2 (x - x0)^2. ``tabulated``: the
Boltzmann inversion itself, U = -kT ln[P(r)/r^2] or -kT ln[P(theta)/sin theta], smoothed on a grid
and evaluated as a natural cubic spline (the interpolation OpenMM's Continuous1DFunction uses, so
the native forces are the same function), with harmonic walls beyond the sampled range. Only the
tabulated form can hold two wells, such as the butyl chain's gauche/trans angle.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..frames import evenly_spaced
from ..io import write_text_atomic
from ..layout import PRIOR_JSON
from ..units import kT_kj_mol
from .geometry import FLAG_BOX_TOO_SMALL, FLAG_PAIR_OVERFLOW, pair_vectors, safe_norm
from .system import SystemTensors, molecule_tables, residue_layout

PRIOR_FORMAT = "openmm_cgnn.prior/2"
# Version 1 had harmonic bonds and angles only; it reads as bonded_form "harmonic".
READABLE_PRIOR_FORMATS = ("openmm_cgnn.prior/1", PRIOR_FORMAT)
BONDED_FORMS = ("tabulated", "harmonic")
BOND_GRID_POINTS = 96
ANGLE_GRID_POINTS = 181  # 1 degree spacing over [0, pi]


def type_pair_key(name_a: str, name_b: str) -> str:
    return "|".join(sorted((name_a, name_b)))


def harmonic_bond_energy(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor,
                         r0: Tensor, k: Tensor) -> Tensor:
    """Sum of k/2 (r - r0)^2 per frame, (B,) float64; OpenMM's HarmonicBondForce convention."""
    if index_i.numel() == 0:
        return torch.zeros(positions.shape[0], dtype=torch.float64, device=positions.device)
    distance = torch.linalg.vector_norm(pair_vectors(positions, box, index_i, index_j), dim=-1)
    return (0.5 * k * (distance - r0) ** 2).to(torch.float64).sum(-1)


def harmonic_angle_energy(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor, index_k: Tensor,
                          theta0: Tensor, k: Tensor) -> Tensor:
    """Sum of k/2 (theta - theta0)^2 per frame with theta the angle i-j-k at bead j, (B,) float64."""
    if index_i.numel() == 0:
        return torch.zeros(positions.shape[0], dtype=torch.float64, device=positions.device)
    theta = angle_values(positions, box, index_i, index_j, index_k)
    return (0.5 * k * (theta - theta0) ** 2).to(torch.float64).sum(-1)


def angle_values(positions: Tensor, box: Tensor, index_i: Tensor, index_j: Tensor, index_k: Tensor) -> Tensor:
    """Angles i-j-k at bead j (rad), (B, A); acos clamped just inside +-1 so forces stay finite when straight."""
    # Both arms (j->i, then j->k) in one gather and one minimum image.
    arms = pair_vectors(positions, box, torch.cat([index_j, index_j], dim=-1), torch.cat([index_i, index_k], dim=-1))
    count = index_i.shape[-1]
    first, second = arms[:, :count], arms[:, count:]
    cosine = (first * second).sum(-1) / torch.sqrt((first * first).sum(-1) * (second * second).sum(-1))
    return torch.acos(torch.clamp(cosine, -1.0 + 1e-6, 1.0 - 1e-6))


def spline_energy(x: Tensor, entry: Tensor, parameters: Tensor, knots: Tensor, points: int) -> Tensor:
    """Tabulated energies at ``x`` (B, T) for terms using tables ``entry`` (T,): the natural cubic
    spline on ``points`` grid points continued beyond the grid by its edge slope plus wall_k/2 d^2.

    ``parameters`` (tables, 6): low, spacing, high, slope_low, slope_high, wall_k of each table;
    ``knots`` (tables * points, 4): value and second derivative at each grid point and the next one
    (:class:`_Tables`), so that each term needs two gathers. Static shapes, no host reads."""
    low, step, high, slope_low, slope_high, wall_k = parameters.index_select(0, entry).to(x.dtype).unbind(-1)
    inside = torch.minimum(torch.maximum(x, low), high)
    u = (inside - low) / step
    # NaN in (a blown-up or degenerate configuration) must give NaN energy, never an out-of-range
    # gather that throws inside openmm-torch: a NaN segment becomes 0 before the cast to an index.
    segment = torch.clamp(torch.nan_to_num(torch.floor(u.detach()), nan=0.0), 0.0, float(points - 2))
    t = u - segment
    flat = (entry * points + segment.long()).reshape(-1)
    y0, y1, m0, m1 = knots.index_select(0, flat).to(x.dtype).reshape(x.shape[0], x.shape[1], 4).unbind(-1)
    s = 1.0 - t
    energy = s * y0 + t * y1 + step * step / 6.0 * ((s * s * s - s) * m0 + (t * t * t - t) * m1)
    beyond = x - inside
    slope = torch.where(beyond < 0, slope_low, slope_high)
    return energy + slope * beyond + 0.5 * wall_k * beyond * beyond


def natural_spline_second_derivatives(values: np.ndarray, spacing: float) -> np.ndarray:
    """Second derivatives of the natural cubic spline through equally spaced ``values`` (zero at both ends)."""
    n = len(values)
    second = np.zeros(n)
    if n < 3:
        return second
    diagonal = np.full(n - 2, 4.0)
    rhs = 6.0 * (values[2:] - 2.0 * values[1:-1] + values[:-2]) / (spacing * spacing)
    # Thomas algorithm for the tridiagonal system [1 4 1] M = rhs.
    for k in range(1, n - 2):
        factor = 1.0 / diagonal[k - 1]
        diagonal[k] -= factor
        rhs[k] -= factor * rhs[k - 1]
    inner = np.zeros(n - 2)
    inner[-1] = rhs[-1] / diagonal[-1]
    for k in range(n - 4, -1, -1):
        inner[k] = (rhs[k] - inner[k + 1]) / diagonal[k]
    second[1:-1] = inner
    return second


class _Tables(nn.Module):
    """Spline tables of tabulated bonded terms, one per prior.json entry, all on G grid points."""

    def __init__(self, x_min: Sequence[float], x_max: Sequence[float], energies: Sequence[Sequence[float]],
                 wall_k: Sequence[float], kind: str):
        super().__init__()
        self.x_min: List[float] = [float(v) for v in x_min]
        self.x_max: List[float] = [float(v) for v in x_max]
        self.energies: List[List[float]] = [[float(e) for e in row] for row in energies]
        self.wall_k: List[float] = [float(v) for v in wall_k]
        points = {len(row) for row in self.energies}
        if len(points) > 1 or (points and min(points) < 4):
            raise ValueError(f"{kind}: every table needs the same number (>= 4) of energies, got {sorted(points)}")
        n = points.pop() if points else 4
        values = np.zeros((len(self.energies), n))
        second = np.zeros_like(values)
        slopes = np.zeros((len(self.energies), 2))
        for row, (low, high, energy, wall) in enumerate(zip(self.x_min, self.x_max, self.energies, self.wall_k)):
            energy = np.asarray(energy, dtype=np.float64)
            if not (high > low and np.all(np.isfinite(energy)) and wall >= 0 and math.isfinite(wall)):
                raise ValueError(f"{kind}: bad table {row}: range [{low}, {high}], wall_k {wall}, finite energies "
                                 f"{bool(np.all(np.isfinite(energy)))}")
            step = (high - low) / (n - 1)
            values[row], second[row] = energy, natural_spline_second_derivatives(energy, step)
            slopes[row] = ((energy[1] - energy[0]) / step - step * second[row, 1] / 6.0,
                           (energy[-1] - energy[-2]) / step + step * second[row, -2] / 6.0)
        self.register_buffer("values", torch.as_tensor(values), persistent=False)
        self.register_buffer("second", torch.as_tensor(second), persistent=False)
        self.register_buffer("low", torch.as_tensor(np.array(self.x_min, dtype=np.float64).reshape(-1)), persistent=False)
        self.register_buffer("spacing", torch.as_tensor(
            (np.array(self.x_max, dtype=np.float64) - np.array(self.x_min, dtype=np.float64)).reshape(-1) / (n - 1)),
            persistent=False)
        self.register_buffer("slope_low", torch.as_tensor(slopes[:, 0].copy()), persistent=False)
        self.register_buffer("slope_high", torch.as_tensor(slopes[:, 1].copy()), persistent=False)
        self.register_buffer("walls", torch.as_tensor(np.array(self.wall_k, dtype=np.float64).reshape(-1)), persistent=False)
        # What spline_energy gathers per term, packed once: one row of parameters per table, and per
        # grid point its value and second derivative with those of the next point (the last point's
        # "next" is never read: the segment index stops at n - 2).
        self.points = n
        self.register_buffer("table_parameters", torch.stack(
            [self.low, self.spacing, self.low + self.spacing * (n - 1), self.slope_low, self.slope_high, self.walls],
            dim=-1), persistent=False)
        following = torch.cat([self.values[:, 1:], self.values[:, -1:]], dim=1)
        following_second = torch.cat([self.second[:, 1:], self.second[:, -1:]], dim=1)
        self.register_buffer("knots", torch.stack([self.values, following, self.second, following_second],
                                                  dim=-1).reshape(-1, 4), persistent=False)

    def forward(self, x: Tensor, entry: Tensor) -> Tensor:
        return spline_energy(x, entry, self.table_parameters, self.knots, self.points)

    def table_dicts(self, unit: str) -> list[dict[str, Any]]:
        return [{f"min_{unit}": low, f"max_{unit}": high, "energy_kj_mol": energy, f"wall_k_kj_mol_{unit}2": wall}
                for low, high, energy, wall in zip(self.x_min, self.x_max, self.energies, self.wall_k)]


class ExcludedVolumePrior(nn.Module):
    """Shifted-force repulsion eps[(s/r)^p - (s/rc)^p + p (s/rc)^p (r - rc)/rc] for r < rc between
    beads of different molecules; s per bead-type pair (0 switches a pair off)."""

    def __init__(self, bead_type_names: Sequence[str], sigma_nm: Tensor | None = None, exponent: float = 12.0,
                 cutoff_nm: float = 0.8, epsilon_kj_mol: float = 1.0):
        super().__init__()
        n_types = len(bead_type_names)
        self.bead_type_names: List[str] = list(bead_type_names)
        self.exponent = float(exponent)
        self.cutoff = float(cutoff_nm)
        self.epsilon = float(epsilon_kj_mol)
        sigma = torch.zeros(n_types, n_types, dtype=torch.float64) if sigma_nm is None else torch.as_tensor(sigma_nm, dtype=torch.float64)
        if tuple(sigma.shape) != (n_types, n_types):
            raise ValueError(f"excluded volume: sigma table must be {n_types}x{n_types}, got {tuple(sigma.shape)}")
        if not torch.allclose(sigma, sigma.T):
            raise ValueError("excluded volume: sigma table must be symmetric")
        if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError("excluded volume: sigma values must be finite and >= 0")
        if bool((sigma >= self.cutoff).any()):
            raise ValueError(f"excluded volume: every sigma must be below the cutoff {self.cutoff} nm")
        self.enabled = bool((sigma > 0).any())
        self.register_buffer("sigma", sigma, persistent=False)
        # Per type pair, once: sigma and the shifted-force terms, eps * [(s/r)^p + slope * r + offset]
        # with slope = p (s/rc)^p / rc and offset = -(1 + p) (s/rc)^p (all 0 where sigma is 0).
        ratio_cut = (sigma / self.cutoff) ** self.exponent
        self.register_buffer("coefficients", torch.stack(
            [sigma, self.exponent * ratio_cut / self.cutoff, -(1.0 + self.exponent) * ratio_cut], dim=-1),
            persistent=False)

    def forward(self, distance: Tensor, type_i: Tensor, type_j: Tensor, valid: Tensor) -> Tensor:
        """Energy per frame (B,) float64 from pair distances (B, P) (each pair once)."""
        if not self.enabled:
            return torch.zeros(distance.shape[0], dtype=torch.float64, device=distance.device)
        sigma, slope, offset = self.coefficients[type_i, type_j].to(distance.dtype).unbind(-1)
        energy = (sigma / distance) ** self.exponent + slope * distance + offset
        energy = torch.where(valid & (distance < self.cutoff), energy, 0.0)
        return (self.epsilon * energy.to(torch.float64)).sum(-1)


class HarmonicBondPrior(nn.Module):
    """Harmonic bonds per residue: ``beads`` are indices inside the residue."""

    def __init__(self, residues: Sequence[str] = (), beads: Sequence[Sequence[int]] = (),
                 r0_nm: Sequence[float] = (), k_kj_mol_nm2: Sequence[float] = ()):
        super().__init__()
        if not (len(residues) == len(beads) == len(r0_nm) == len(k_kj_mol_nm2)):
            raise ValueError("bonds: residues, beads, r0_nm and k_kj_mol_nm2 must have equal lengths")
        self.residues: List[str] = list(residues)
        self.beads: List[List[int]] = [[int(b) for b in pair] for pair in beads]
        self.r0: List[float] = [float(x) for x in r0_nm]
        self.k: List[float] = [float(x) for x in k_kj_mol_nm2]
        for pair, r0, k in zip(self.beads, self.r0, self.k):
            if len(pair) != 2 or pair[0] == pair[1] or not (r0 > 0 and k >= 0 and math.isfinite(r0 * k)):
                raise ValueError(f"bonds: bad entry beads={pair} r0_nm={r0} k_kj_mol_nm2={k}")

    def forward(self, positions: Tensor, box: Tensor, system: SystemTensors) -> Tensor:
        return harmonic_bond_energy(positions, box, system.bond_i, system.bond_j,
                                    system.bond_r0.to(positions.dtype), system.bond_k.to(positions.dtype))

    def to_list(self) -> list[dict[str, Any]]:
        return [{"residue": r, "beads": b, "r0_nm": r0, "k_kj_mol_nm2": k}
                for r, b, r0, k in zip(self.residues, self.beads, self.r0, self.k)]


class HarmonicAnglePrior(nn.Module):
    """Harmonic angles per residue: ``beads`` (i, j, k) inside the residue, angle at j."""

    def __init__(self, residues: Sequence[str] = (), beads: Sequence[Sequence[int]] = (),
                 theta0_rad: Sequence[float] = (), k_kj_mol_rad2: Sequence[float] = ()):
        super().__init__()
        if not (len(residues) == len(beads) == len(theta0_rad) == len(k_kj_mol_rad2)):
            raise ValueError("angles: residues, beads, theta0_rad and k_kj_mol_rad2 must have equal lengths")
        self.residues: List[str] = list(residues)
        self.beads: List[List[int]] = [[int(b) for b in triple] for triple in beads]
        self.theta0: List[float] = [float(x) for x in theta0_rad]
        self.k: List[float] = [float(x) for x in k_kj_mol_rad2]
        for triple, theta0, k in zip(self.beads, self.theta0, self.k):
            if len(triple) != 3 or len(set(triple)) != 3 or not (0 <= theta0 <= math.pi and k >= 0):
                raise ValueError(f"angles: bad entry beads={triple} theta0_rad={theta0} k_kj_mol_rad2={k}")

    def forward(self, positions: Tensor, box: Tensor, system: SystemTensors) -> Tensor:
        return harmonic_angle_energy(positions, box, system.angle_i, system.angle_j, system.angle_k,
                                     system.angle_theta0.to(positions.dtype),
                                     system.angle_k_theta.to(positions.dtype))

    def to_list(self) -> list[dict[str, Any]]:
        return [{"residue": r, "beads": b, "theta0_rad": t, "k_kj_mol_rad2": k}
                for r, b, t, k in zip(self.residues, self.beads, self.theta0, self.k)]


class TabulatedBondPrior(HarmonicBondPrior):
    """Tabulated bonds: a spline table per entry over [min_nm, max_nm], harmonic walls beyond.

    ``r0``/``k`` keep the entry's harmonic fit (bond lengths for packing, the harmonic carrier's
    numbers); the energy is the table's alone.
    """

    def __init__(self, residues: Sequence[str], beads: Sequence[Sequence[int]], r0_nm: Sequence[float],
                 k_kj_mol_nm2: Sequence[float], tables: Sequence[dict[str, Any]]):
        super().__init__(residues, beads, r0_nm, k_kj_mol_nm2)
        if len(tables) != len(self.residues):
            raise ValueError("bonds: every entry needs a 'table' in the tabulated form")
        self.tables = _Tables([t["min_nm"] for t in tables], [t["max_nm"] for t in tables],
                              [t["energy_kj_mol"] for t in tables], [t["wall_k_kj_mol_nm2"] for t in tables], "bonds")
        for low in self.tables.x_min:
            if not low >= 0.0:
                raise ValueError(f"bonds: table min_nm must be >= 0, got {low}")

    def forward(self, positions: Tensor, box: Tensor, system: SystemTensors) -> Tensor:
        if system.bond_i.numel() == 0:
            return torch.zeros(positions.shape[0], dtype=torch.float64, device=positions.device)
        vectors = pair_vectors(positions, box, system.bond_i, system.bond_j)
        distance = torch.sqrt((vectors * vectors).sum(-1))
        return self.tables(distance, system.bond_entry).to(torch.float64).sum(-1)

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(entry, table=table) for entry, table in zip(super().to_list(), self.tables.table_dicts("nm"))]


class TabulatedAnglePrior(HarmonicAnglePrior):
    """Tabulated angles: a spline table per entry over [0, pi] (walls included in the table)."""

    def __init__(self, residues: Sequence[str], beads: Sequence[Sequence[int]], theta0_rad: Sequence[float],
                 k_kj_mol_rad2: Sequence[float], tables: Sequence[dict[str, Any]]):
        super().__init__(residues, beads, theta0_rad, k_kj_mol_rad2)
        if len(tables) != len(self.residues):
            raise ValueError("angles: every entry needs a 'table' in the tabulated form")
        self.tables = _Tables([t["min_rad"] for t in tables], [t["max_rad"] for t in tables],
                              [t["energy_kj_mol"] for t in tables], [t.get("wall_k_kj_mol_rad2", 0.0) for t in tables],
                              "angles")
        for low, high in zip(self.tables.x_min, self.tables.x_max):
            # OpenMM's Continuous1DFunction is 0 outside its range: it must cover every angle.
            if abs(low) > 1e-12 or abs(high - math.pi) > 1e-12:
                raise ValueError(f"angles: a table must span [0, pi] rad, got [{low}, {high}]")

    def forward(self, positions: Tensor, box: Tensor, system: SystemTensors) -> Tensor:
        if system.angle_i.numel() == 0:
            return torch.zeros(positions.shape[0], dtype=torch.float64, device=positions.device)
        theta = angle_values(positions, box, system.angle_i, system.angle_j, system.angle_k)
        return self.tables(theta, system.angle_entry).to(torch.float64).sum(-1)

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(entry, table=table) for entry, table in zip(super().to_list(), self.tables.table_dicts("rad"))]


class PriorSet(nn.Module):
    """The three priors for one set of bead types; reads and writes ``prior.json``."""

    def __init__(self, bead_type_names: Sequence[str], excluded_volume: ExcludedVolumePrior | None = None,
                 bonds: HarmonicBondPrior | None = None, angles: HarmonicAnglePrior | None = None):
        super().__init__()
        self.bead_type_names = list(bead_type_names)
        layout = residue_layout(self.bead_type_names)
        self.excluded_volume = excluded_volume or ExcludedVolumePrior(self.bead_type_names)
        if self.excluded_volume.bead_type_names != self.bead_type_names:
            raise ValueError("excluded volume prior was built for other bead types")
        self.bonds = bonds or HarmonicBondPrior()
        self.angles = angles or HarmonicAnglePrior()
        for kind, residues, beads in (("bonds", self.bonds.residues, self.bonds.beads),
                                      ("angles", self.angles.residues, self.angles.beads)):
            for residue, entry in zip(residues, beads):
                if residue not in layout:
                    raise ValueError(f"prior {kind}: residue {residue!r} has no bead types in {self.bead_type_names}")
                if max(entry) >= len(layout[residue]) or min(entry) < 0:
                    raise ValueError(
                        f"prior {kind}: beads {entry} out of range for residue {residue!r} "
                        f"({len(layout[residue])} beads)"
                    )

    @property
    def cutoff_nm(self) -> float:
        return self.excluded_volume.cutoff

    @property
    def bonded_form(self) -> str:
        """"tabulated" when the bonds or angles are tables, else "harmonic"."""
        tabulated = isinstance(self.bonds, TabulatedBondPrior) or isinstance(self.angles, TabulatedAnglePrior)
        return "tabulated" if tabulated else "harmonic"

    # ---- system terms -------------------------------------------------------------------------
    def system_terms(self, bead_type: np.ndarray, molecule_index: np.ndarray, skip_bonds: Sequence[int] = ()):
        """Bond and angle terms laid onto a system: ((K,2) index, r0, k, entry), ((A,3) index, theta0, k, entry);
        ``entry`` is each term's position in the prior's bond or angle list (its table when tabulated).
        Bond entries in ``skip_bonds`` give no terms (bonds held by constraints, openmm/constraints.py)."""
        if not self.bonds.residues and not self.angles.residues:
            return ((np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64)),
                    (np.zeros((0, 3), np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64)))
        residues, table = molecule_tables(bead_type, molecule_index, self.bead_type_names)
        residue_array = np.array(residues, dtype=object)

        def expand(kind: str, entries_residue, entries_beads, *values):
            values = values + (list(range(len(entries_residue))),)
            index, expanded = [], [[] for _ in values]
            for entry, (residue, beads) in enumerate(zip(entries_residue, entries_beads)):
                molecules = np.flatnonzero(residue_array == residue)
                members = table[molecules][:, beads]
                missing = np.flatnonzero((members < 0).any(axis=1))
                if len(missing):
                    raise ValueError(
                        f"prior {kind}: molecule {molecules[missing[0]]} of residue {residue!r} lacks one of "
                        f"beads {beads}"
                    )
                index.append(members)
                for out, vals in zip(expanded, values):
                    out.append(np.full(len(molecules), vals[entry], dtype=np.float64))
            width = 2 if kind == "bonds" else 3
            index_array = np.concatenate(index) if index else np.zeros((0, width), np.int64)
            *reals, entry = [np.concatenate(v) if v else np.zeros(0) for v in expanded]
            return (index_array.reshape(-1, width), *reals, entry.astype(np.int64))

        bonds = expand("bonds", self.bonds.residues, self.bonds.beads, self.bonds.r0, self.bonds.k)
        if len(skip_bonds):
            keep = ~np.isin(bonds[-1], np.asarray(skip_bonds, dtype=np.int64))
            bonds = tuple(part[keep] for part in bonds)
        angles = expand("angles", self.angles.residues, self.angles.beads, self.angles.theta0, self.angles.k)
        return bonds, angles

    @torch.jit.ignore
    def energy(self, positions: Tensor, box: Tensor, bead_type: Tensor, molecule_index: Tensor) -> Tensor:
        """Total prior energy per frame (B,) for positions (B, N, 3); a stand-alone evaluator."""
        from .neighbors import DenseNeighborSearch
        from .system import build_system_tensors

        positions = positions.reshape(-1, positions.shape[-2], 3)
        box = box.reshape(-1, 3, 3).to(positions.dtype)
        system = build_system_tensors(bead_type, molecule_index, self, device=positions.device, dtype=positions.dtype)
        total = self.bonds(positions, box, system) + self.angles(positions, box, system)
        if self.excluded_volume.enabled:
            search = DenseNeighborSearch(self.cutoff_nm, max_pairs_per_bead=float(positions.shape[1]))
            index_i, index_j, valid, _, _ = search(positions, box, system.molecule_index)
            distance = safe_norm(pair_vectors(positions, box, index_i, index_j), valid, self.cutoff_nm)
            total = total + self.excluded_volume(distance, system.bead_type[index_i], system.bead_type[index_j], valid)
        return total

    # ---- prior.json ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        ev = self.excluded_volume
        names = self.bead_type_names
        sigma = {type_pair_key(names[a], names[b]): float(ev.sigma[a, b])
                 for a in range(len(names)) for b in range(a, len(names))}
        return {
            "format": PRIOR_FORMAT,
            "bead_type_names": list(names),
            "bonded_form": self.bonded_form,
            "excluded_volume": {"exponent": ev.exponent, "cutoff_nm": ev.cutoff, "epsilon_kj_mol": ev.epsilon,
                                "sigma_nm": sigma},
            "bonds": self.bonds.to_list(),
            "angles": self.angles.to_list(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], bead_type_names: Sequence[str] | None = None,
                  source: str = PRIOR_JSON) -> "PriorSet":
        if not isinstance(data, dict) or data.get("format") not in READABLE_PRIOR_FORMATS:
            raise ValueError(f"{source}: 'format' must be one of {list(READABLE_PRIOR_FORMATS)}")
        form = data.get("bonded_form", "harmonic")
        if form not in BONDED_FORMS:
            raise ValueError(f"{source}: 'bonded_form' must be one of {list(BONDED_FORMS)}, got {form!r}")
        names = list(data.get("bead_type_names") or bead_type_names or [])
        if not names:
            raise ValueError(f"{source}: no 'bead_type_names' in the file and none given")
        if bead_type_names is not None and list(bead_type_names) != names:
            raise ValueError(f"{source}: bead_type_names {names} differ from the model's {list(bead_type_names)}")
        index = {name: i for i, name in enumerate(names)}
        try:
            ev_data = data.get("excluded_volume") or {}
            sigma = torch.zeros(len(names), len(names))
            for key, value in (ev_data.get("sigma_nm") or {}).items():
                pair = key.split("|")
                if len(pair) != 2 or pair[0] not in index or pair[1] not in index:
                    raise ValueError(f"excluded_volume.sigma_nm: key {key!r} is not 'TYPE|TYPE' of known bead types")
                sigma[index[pair[0]], index[pair[1]]] = sigma[index[pair[1]], index[pair[0]]] = float(value)
            excluded_volume = ExcludedVolumePrior(
                names, sigma, exponent=float(ev_data.get("exponent", 12)), cutoff_nm=float(ev_data.get("cutoff_nm", 0.8)),
                epsilon_kj_mol=float(ev_data.get("epsilon_kj_mol", 1.0)))
            bonds_data = data.get("bonds") or []
            bond_args = ([b["residue"] for b in bonds_data], [b["beads"] for b in bonds_data],
                         [b["r0_nm"] for b in bonds_data], [b["k_kj_mol_nm2"] for b in bonds_data])
            angles_data = data.get("angles") or []
            angle_args = ([a["residue"] for a in angles_data], [a["beads"] for a in angles_data],
                          [a["theta0_rad"] for a in angles_data], [a["k_kj_mol_rad2"] for a in angles_data])
            if form == "tabulated":
                bonds = TabulatedBondPrior(*bond_args, [b["table"] for b in bonds_data])
                angles = TabulatedAnglePrior(*angle_args, [a["table"] for a in angles_data])
            else:
                bonds, angles = HarmonicBondPrior(*bond_args), HarmonicAnglePrior(*angle_args)
            return cls(names, excluded_volume, bonds, angles)
        except (KeyError, TypeError, ValueError) as exc:
            missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{source}: {missing}") from exc

    def to_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike, bead_type_names: Sequence[str] | None = None) -> "PriorSet":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: prior file not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, bead_type_names, source=str(path))


# ---- fitting ----------------------------------------------------------------------------------
def _harmonic_by_boltzmann_inversion(values: np.ndarray, jacobian, kT: float) -> tuple[float, float]:
    """(x0, k) of the harmonic fit to -kT ln(P(x)/J(x)); falls back to moments if the fit is unusable.

    The moment estimate x0 = mean, k = kT/var is exact for a harmonic well without Jacobian.
    """
    values = values[np.isfinite(values)]
    mean, std = float(values.mean()), float(values.std())
    fallback = (mean, kT / max(std * std, 1e-12))
    if len(values) < 50 or std == 0:
        return fallback
    counts, edges = np.histogram(values, bins=40, range=(mean - 4 * std, mean + 4 * std))
    centers = 0.5 * (edges[1:] + edges[:-1])
    weight = jacobian(centers)
    keep = (counts >= max(5, 0.02 * counts.max())) & (weight > 0)
    if keep.sum() < 5:
        return fallback
    free_energy = -kT * np.log(counts[keep] / weight[keep])
    quadratic, linear, _ = np.polyfit(centers[keep], free_energy, 2, w=np.sqrt(counts[keep]))
    if quadratic <= 0:
        return fallback
    x0 = -linear / (2 * quadratic)
    if not (values.min() <= x0 <= values.max()):
        return fallback
    return float(x0), float(2 * quadratic)


def boltzmann_table(values: np.ndarray, kT: float, jacobian, grid: np.ndarray, wall_k: float,
                    low_percentile: float = 0.1) -> np.ndarray:
    """-kT ln(P(x)/J(x)) on ``grid``, with harmonic walls where the samples are too few.

    The samples between the ``low_percentile`` and 100 - ``low_percentile`` percentiles are
    histogrammed (about sqrt(n) bins, 20 to 100); each bin with at least 5 counts gives
    -kT ln(count / Jacobian volume) with the counting error kT/sqrt(count), and a cubic smoothing
    spline (FITPACK, chi^2 = number of bins) is fitted through them. Its roughness penalty acts on
    jumps of the third derivative, so a harmonic well keeps its curvature (a kernel density would
    broaden it) while two wells stay two where the data say so. Dividing counts by the exact bin
    volume, not a smoothed density by J, keeps P/J right where J vanishes (sin theta at pi).
    Beyond the fitted range each side continues from the last inside grid point with its outward
    slope (never pulling outward) plus ``wall_k``/2 d^2. The minimum is shifted to 0.
    """
    from scipy.interpolate import UnivariateSpline

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [low_percentile, 100.0 - low_percentile])
    spacing = float(grid[1] - grid[0])
    std = max(float(values.std()), spacing)
    n_bins = int(np.clip(np.sqrt(len(values)), 20, 100))
    counts, edges = np.histogram(values, np.linspace(low, high, n_bins + 1) if high > low else n_bins)
    volume = (jacobian(edges[:-1]) + 4.0 * jacobian(0.5 * (edges[1:] + edges[:-1])) + jacobian(edges[1:])) / 6.0
    volume = volume * np.diff(edges)
    keep = (counts >= 5) & (volume > 0)
    energy = np.empty(len(grid))
    if keep.sum() < 5:  # too narrow or too few samples for a table: a harmonic well at the mean
        energy[:] = 0.5 * (kT / std**2) * (grid - values.mean()) ** 2
        return energy - energy.min()
    centres = 0.5 * (edges[1:] + edges[:-1])[keep]
    free = -kT * np.log(counts[keep] / volume[keep])
    spline = UnivariateSpline(centres, free, w=np.sqrt(counts[keep]) / kT, k=3, s=float(keep.sum()))
    inside = np.flatnonzero((grid >= centres[0]) & (grid <= centres[-1]))
    if len(inside) < 2:
        energy[:] = 0.5 * (kT / std**2) * (grid - values.mean()) ** 2
        return energy - energy.min()
    first, last = inside[0], inside[-1]
    energy[first:last + 1] = spline(grid[first:last + 1])
    slope_low = min(0.0, float(spline.derivative()(grid[first])))
    slope_high = max(0.0, float(spline.derivative()(grid[last])))
    below, above = grid[:first] - grid[first], grid[last + 1:] - grid[last]
    energy[:first] = energy[first] + slope_low * below + 0.5 * wall_k * below**2
    energy[last + 1:] = energy[last] + slope_high * above + 0.5 * wall_k * above**2
    return energy - energy.min()


def _tabulate_terms(samples: dict, temperatures: np.ndarray, jacobian, kind: str) -> dict:
    """A table per term from its pooled samples at the frame-averaged kT (see :func:`fit_priors`)."""
    kT = kT_kj_mol(float(np.mean(temperatures)))
    tables = {}
    for key, values in samples.items():
        flat = np.asarray(values, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        wall_k = kT / max(float(flat.var()), 1e-12)
        if kind == "bonds":
            low, high = np.percentile(flat, [0.1, 99.9])
            pad = max(0.5 * (high - low), 2.0 * float(flat.std()))
            grid = np.linspace(max(low - pad, 0.0), high + pad, BOND_GRID_POINTS)
            tables[key] = {"min_nm": float(grid[0]), "max_nm": float(grid[-1]), "wall_k_kj_mol_nm2": wall_k,
                           "energy_kj_mol": boltzmann_table(flat, kT, jacobian, grid, wall_k).tolist()}
        else:
            grid = np.linspace(0.0, math.pi, ANGLE_GRID_POINTS)
            tables[key] = {"min_rad": 0.0, "max_rad": math.pi, "wall_k_kj_mol_rad2": wall_k,
                           "energy_kj_mol": boltzmann_table(flat, kT, jacobian, grid, wall_k).tolist()}
    return tables


def _frame_temperatures(cg, temperature_K: float | None) -> np.ndarray:
    frames = len(cg.positions)
    if temperature_K is not None:
        return np.full(frames, float(temperature_K))
    temperatures = np.asarray(getattr(cg, "temperature_K", None), dtype=np.float64).reshape(-1)
    if temperatures.size == 1:
        temperatures = np.full(frames, float(temperatures[0]))
    if temperatures.shape != (frames,) or not np.all(np.isfinite(temperatures)) or np.any(temperatures <= 0):
        raise ValueError("fit_priors: cg.temperature_K must give a positive temperature per frame (or pass temperature_K)")
    return temperatures


def _fit_harmonic_terms(samples: dict, temperatures: np.ndarray, jacobian) -> dict:
    """Fit each term's samples (frames, copies) per temperature and average weighted by frames."""
    fitted = {}
    groups = np.round(temperatures, 1)
    for key, values in samples.items():
        centre = stiffness = 0.0
        for temperature in np.unique(groups):
            rows = groups == temperature
            x0, k = _harmonic_by_boltzmann_inversion(values[rows].ravel(), jacobian,
                                                    kT_kj_mol(float(temperature)))
            centre += x0 * rows.mean()
            stiffness += k * rows.mean()
        fitted[key] = (centre, stiffness)
    return fitted


def fit_priors(
    cg, exponent: float = 12.0, cutoff_nm: float = 0.8, temperature_K: float | None = None,
    sigma_percentile: float = 0.5, epsilon_kj_mol: float | None = None, angles: bool = True,
    max_frames: int = 200, bonded_form: str = "tabulated",
) -> PriorSet:
    """Fit the priors to mapped CG data (a ``CGFrames``).

    - Bonds (``cg.bonds``) and the angles they form: harmonic fit of the Boltzmann-inverted
      distribution, -kT ln(P(r)/r^2) and -kT ln(P(theta)/sin theta), at each frame's temperature.
      With ``bonded_form="tabulated"`` (default) the energy is the inversion itself on a grid
      (:func:`boltzmann_table`), from all frames pooled at their mean kT; the harmonic fit is kept
      beside it in prior.json.
    - Excluded volume: sigma of each bead-type pair is the ``sigma_percentile`` percentile of its
      intermolecular distances below ``cutoff_nm`` (closest approach); the pair energy at sigma is
      about ``epsilon_kj_mol`` (default kT). Pairs never seen within the cutoff get sigma 0 (off).
    """
    if bonded_form not in BONDED_FORMS:
        raise ValueError(f"fit_priors: bonded_form must be one of {list(BONDED_FORMS)}, got {bonded_form!r}")
    names = list(cg.bead_type_names)
    bead_type = np.asarray(cg.bead_type, dtype=np.int64)
    molecule_index = np.asarray(cg.molecule_index, dtype=np.int64)
    positions = np.asarray(cg.positions)
    box = np.asarray(cg.box)
    if positions.ndim != 3 or positions.shape[1:] != (len(bead_type), 3) or len(positions) == 0:
        raise ValueError(f"fit_priors: cg.positions must be (frames, {len(bead_type)}, 3), got {positions.shape}")
    if box.shape != (len(positions), 3, 3):
        raise ValueError(f"fit_priors: cg.box must be ({len(positions)}, 3, 3), got {box.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("fit_priors: cg.positions contains NaN or infinite values")
    temperatures = _frame_temperatures(cg, temperature_K)
    residues, table = molecule_tables(bead_type, molecule_index, names)
    layout = residue_layout(names)
    local_of_bead = np.array([layout[names[t].partition(":")[0]].index(t) for t in bead_type], dtype=np.int64)

    # Bonds as residue-local pairs, one entry per (residue, pair).
    bond_keys: set[tuple[str, int, int]] = set()
    for a, b in np.asarray(getattr(cg, "bonds", np.zeros((0, 2))), dtype=np.int64).reshape(-1, 2):
        if molecule_index[a] != molecule_index[b]:
            raise ValueError(f"fit_priors: cg.bonds pair ({a}, {b}) joins different molecules")
        first, second = sorted((int(local_of_bead[a]), int(local_of_bead[b])))
        bond_keys.add((residues[molecule_index[a]], first, second))
    bond_keys_sorted = sorted(bond_keys)

    positions_t = torch.as_tensor(positions, dtype=torch.float64)
    box_t = torch.as_tensor(box, dtype=torch.float64)
    residue_array = np.array(residues, dtype=object)

    def members(residue: str, beads: Sequence[int]) -> np.ndarray:
        return table[np.flatnonzero(residue_array == residue)][:, list(beads)]

    bond_samples = {}
    for residue, first, second in bond_keys_sorted:
        pairs = torch.as_tensor(members(residue, (first, second)))
        vectors = pair_vectors(positions_t, box_t, pairs[:, 0], pairs[:, 1])
        bond_samples[(residue, first, second)] = vectors.norm(dim=-1).numpy()
    bond_fit = _fit_harmonic_terms(bond_samples, temperatures, lambda r: r * r)

    angle_fit = {}
    angle_samples = {}
    if angles:
        for residue in sorted({key[0] for key in bond_keys_sorted}):
            neighbours: dict[int, set[int]] = {}
            for res, first, second in bond_keys_sorted:
                if res == residue:
                    neighbours.setdefault(first, set()).add(second)
                    neighbours.setdefault(second, set()).add(first)
            for centre, ends in sorted(neighbours.items()):
                for end_a in sorted(ends):
                    for end_b in sorted(ends):
                        if end_a < end_b:
                            triple = torch.as_tensor(members(residue, (end_a, centre, end_b)))
                            u = pair_vectors(positions_t, box_t, triple[:, 1], triple[:, 0])
                            v = pair_vectors(positions_t, box_t, triple[:, 1], triple[:, 2])
                            cosine = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
                            angle_samples[(residue, end_a, centre, end_b)] = torch.acos(cosine.clamp(-1, 1)).numpy()
        angle_fit = _fit_harmonic_terms(angle_samples, temperatures, lambda t: np.sin(t))

    sigma = _fit_sigma(positions_t, box_t, bead_type, molecule_index, len(names), cutoff_nm, sigma_percentile, max_frames)
    kT = kT_kj_mol(float(np.mean(temperatures)))
    excluded_volume = ExcludedVolumePrior(names, sigma, exponent=exponent, cutoff_nm=cutoff_nm,
                                          epsilon_kj_mol=kT if epsilon_kj_mol is None else epsilon_kj_mol)
    bond_args = ([k[0] for k in bond_fit], [[k[1], k[2]] for k in bond_fit],
                 [v[0] for v in bond_fit.values()], [v[1] for v in bond_fit.values()])
    angle_args = ([k[0] for k in angle_fit], [[k[1], k[2], k[3]] for k in angle_fit],
                  [float(np.clip(v[0], 0.0, math.pi)) for v in angle_fit.values()], [v[1] for v in angle_fit.values()])
    if bonded_form == "tabulated":
        bond_tables = _tabulate_terms(bond_samples, temperatures, lambda r: r * r, "bonds")
        angle_tables = _tabulate_terms(angle_samples, temperatures, np.sin, "angles")
        bonds = TabulatedBondPrior(*bond_args, [bond_tables[k] for k in bond_fit])
        angle_prior = TabulatedAnglePrior(*angle_args, [angle_tables[k] for k in angle_fit])
    else:
        bonds, angle_prior = HarmonicBondPrior(*bond_args), HarmonicAnglePrior(*angle_args)
    return PriorSet(names, excluded_volume, bonds, angle_prior)


def _fit_sigma(positions: Tensor, box: Tensor, bead_type: np.ndarray, molecule_index: np.ndarray, n_types: int,
               cutoff: float, percentile: float, max_frames: int) -> Tensor:
    from .neighbors import DenseNeighborSearch

    frames = evenly_spaced(len(positions), max_frames)
    types = torch.as_tensor(bead_type)
    molecules = torch.as_tensor(molecule_index)
    # Generous capacity: about 6x the neighbours of a dense liquid; overflow is reported below.
    search = DenseNeighborSearch(cutoff, max_pairs_per_bead=float(min(len(bead_type), 512)))
    distances, pair_ids = [], []
    for frame in frames:
        pos = positions[frame:frame + 1]
        frame_box = box[frame:frame + 1]
        index_i, index_j, valid, _, flags = search(pos, frame_box, molecules)
        if int(flags[0]) & FLAG_BOX_TOO_SMALL:
            raise ValueError(f"fit_priors: frame {frame}: box smaller than twice the cutoff {cutoff} nm")
        if int(flags[0]) & FLAG_PAIR_OVERFLOW:
            raise ValueError(f"fit_priors: frame {frame}: over 512 neighbours per bead within {cutoff} nm; "
                             "is the data really a liquid in nm?")
        index_i, index_j = index_i[valid], index_j[valid]
        vectors = pair_vectors(pos, frame_box, index_i.unsqueeze(0), index_j.unsqueeze(0))[0]
        distances.append(vectors.norm(dim=-1))
        low = torch.minimum(types[index_i], types[index_j])
        high = torch.maximum(types[index_i], types[index_j])
        pair_ids.append(low * n_types + high)
    distance = torch.cat(distances).numpy()
    pair_id = torch.cat(pair_ids).numpy()
    sigma = torch.zeros(n_types, n_types)
    for identifier in np.unique(pair_id):
        a, b = divmod(int(identifier), n_types)
        value = float(np.percentile(distance[pair_id == identifier], percentile))
        sigma[a, b] = sigma[b, a] = min(value, 0.99 * cutoff)
    return sigma
