"""Distance constraints for the stiffest CG bonds (``simulate --constrain-bonds``).

A bond's prior sets how fast it vibrates: a harmonic well of curvature ``k`` between beads of
reduced mass ``mu`` has the period ``2 pi sqrt(mu / k)``; velocity Verlet needs several steps per
period, so the stiffest bond bounds the time step. Holding such a bond at a fixed length (an
OpenMM constraint, SHAKE/RATTLE in every integrator the runner uses) removes that bound; the
bond's prior term is then dropped (the model's bonded prior inside the module and the native
forces alike), because a constrained distance has no energy to give.

The curvature is read from the prior itself: the spline's second derivative at the table's
minimum for tabulated priors (what the dynamics sees; a skewed distribution's harmonic fit can be
several times softer: 11 000 against 78 000 kJ/mol/nm^2 for one bond of the quick BMIM model),
``k`` for harmonic ones. The constraint length is the entry's ``r0``, the harmonic fit to the
mapped all-atom distribution: for that skewed bond it lies 0.0015 nm from the mapped mean, where
the table's minimum lies 0.01 nm away. Which bonds are constrained is a per-entry choice of the
prior's bond list (a bond type of a residue): every molecule's copy of it gets the constraint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

CONSTRAIN_BONDS = ("none", "stiff", "all")
# "stiff": bonds vibrating faster than this. The quick model's NVE check accepted 8 fs with its
# stiffest bond at a 52 fs period (6.5 steps per period) and failed at 10 fs; a bond under 100 fs
# would hold the step below about 15 fs, so those are the ones worth constraining.
STIFF_BOND_PERIOD_FS = 100.0


@dataclass(frozen=True)
class BondConstraint:
    """One constrained bond type: entry ``entry`` of the prior's bond list (residue, beads in it)."""

    entry: int
    residue: str
    beads: tuple[int, int]
    length_nm: float
    period_fs: float  # harmonic period at the prior's minimum, with the beads' reduced mass
    curvature_kj_mol_nm2: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["beads"] = list(self.beads)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BondConstraint":
        try:
            return cls(int(data["entry"]), str(data["residue"]), (int(data["beads"][0]), int(data["beads"][1])),
                       float(data["length_nm"]), float(data["period_fs"]), float(data["curvature_kj_mol_nm2"]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"constrained_bonds: bad entry {data!r} ({exc})") from None


def bond_curvature(prior: Any, entry: int) -> float:
    """Curvature (kJ/mol/nm^2) of one bond entry's prior at its minimum."""
    tables = getattr(prior.bonds, "tables", None)
    if tables is None:
        return float(prior.bonds.k[entry])
    return float(tables.second[entry, int(tables.values[entry].argmin())])


def choose_bond_constraints(prior: Any, bead_type: np.ndarray, molecule_index: np.ndarray, masses: Sequence[float],
                            mode: str, stiff_period_fs: float = STIFF_BOND_PERIOD_FS) -> list[BondConstraint]:
    """The bond entries to constrain in this system: none, all, or those with a period under ``stiff_period_fs``.

    ``bead_type``, ``molecule_index`` and ``masses`` (amu) are per bead in CG topology order; the
    reduced mass of an entry is that of its first pair of beads here (every copy has the same types).
    """
    if mode not in CONSTRAIN_BONDS:
        raise ValueError(f"--constrain-bonds must be one of {', '.join(CONSTRAIN_BONDS)}, got {mode!r}")
    if mode == "none" or prior is None:
        return []
    (index, _, _, entry), _ = prior.system_terms(np.asarray(bead_type, np.int64), np.asarray(molecule_index, np.int64))
    masses = np.asarray(masses, dtype=np.float64)
    chosen = []
    for e in range(len(prior.bonds.residues)):
        terms = np.flatnonzero(entry == e)
        if not len(terms):
            continue  # a residue this system does not hold
        i, j = index[terms[0]]
        mu = masses[i] * masses[j] / (masses[i] + masses[j])
        curvature = bond_curvature(prior, e)
        # amu / (kJ/mol/nm^2) = ps^2; a flat or concave minimum has no period (never "stiff")
        period_fs = 2e3 * math.pi * math.sqrt(mu / curvature) if curvature > 0 else math.inf
        if mode == "all" or period_fs < stiff_period_fs:
            chosen.append(BondConstraint(e, str(prior.bonds.residues[e]), tuple(int(b) for b in prior.bonds.beads[e]),
                                         float(prior.bonds.r0[e]), float(period_fs), float(curvature)))
    return chosen


def constraint_pairs(constraints: Sequence[BondConstraint], residue_names: Sequence[str],
                     molecule_index: np.ndarray) -> list[tuple[int, int, float]]:
    """(bead i, bead j, length nm) of every molecule's copy of each constrained bond; beads of a
    molecule are contiguous and in mapping order (CG topology order), so bead k of a molecule is
    its k-th bead here."""
    molecule_index = np.asarray(molecule_index, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, np.diff(molecule_index) != 0])
    sizes = np.diff(np.r_[starts, len(molecule_index)])
    pairs = []
    for c in constraints:
        for start, size in zip(starts, sizes):
            if residue_names[start] != c.residue:
                continue
            if max(c.beads) >= size:
                raise ValueError(f"constrained bond {c.residue} {list(c.beads)}: molecule at bead {start} has {size} beads")
            pairs.append((int(start + c.beads[0]), int(start + c.beads[1]), c.length_nm))
    return pairs


def add_constraints(system: Any, pairs: Sequence[tuple[int, int, float]]) -> None:
    """Add the constraints to an ``openmm.System`` (lengths in nm)."""
    for i, j, length in pairs:
        system.addConstraint(i, j, length)
