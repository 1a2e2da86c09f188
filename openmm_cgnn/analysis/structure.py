"""Molecular centres of mass and intramolecular CG structure (bond lengths, angles) from CGFrames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..periodic import minimum_image_orthorhombic, orthorhombic_lengths

if TYPE_CHECKING:
    from ..mapping.spec import CGFrames


@dataclass
class MoleculeCentres:
    positions: np.ndarray  # (F, n_molecules, 3) nm, centre of mass of each whole molecule
    residue_name: list[str]  # (n_molecules,)
    masses: np.ndarray  # (n_molecules,) amu

    def species(self) -> list[str]:
        """Residue names in order of first appearance."""
        return list(dict.fromkeys(self.residue_name))

    def indices(self, residue: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.residue_name) == residue)


def molecule_centres(cg: "CGFrames") -> MoleculeCentres:
    """Mass-weighted centres of the molecules of ``cg``, made whole along their bead bonds first.

    CG runs are not guaranteed to keep molecules whole (only mapped AA frames are), so they are
    rebuilt here before averaging; for whole molecules this changes nothing.
    """
    from scipy import sparse

    from ..mapping.spec import make_molecules_whole

    orthorhombic_lengths(cg.box)
    molecule = np.asarray(cg.molecule_index)
    whole = make_molecules_whole(cg.positions, cg.box, molecule, cg.bonds)
    n_molecules = int(molecule.max()) + 1
    masses = np.asarray(cg.masses, dtype=np.float64)
    totals = np.bincount(molecule, weights=masses, minlength=n_molecules)
    if np.any(totals <= 0):
        raise ValueError("molecule_centres: a molecule has no mass (bead masses missing?)")
    weights = sparse.csr_matrix(
        (masses / totals[molecule], (molecule, np.arange(molecule.size))), shape=(n_molecules, molecule.size)
    )
    n_frames = whole.shape[0]
    flat = whole.transpose(1, 0, 2).reshape(molecule.size, -1)
    centres = np.asarray(weights @ flat).reshape(n_molecules, n_frames, 3).transpose(1, 0, 2)
    first_bead = np.unique(molecule, return_index=True)[1]
    return MoleculeCentres(
        positions=np.ascontiguousarray(centres),
        residue_name=[cg.residue_name[i] for i in first_bead],
        masses=totals,
    )


def _neighbours(n_beads: int, bonds: np.ndarray) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in range(n_beads)]
    for i, j in np.asarray(bonds).reshape(-1, 2):
        neighbours[int(i)].append(int(j))
        neighbours[int(j)].append(int(i))
    return neighbours


def bond_label(cg: "CGFrames", i: int, j: int) -> str:
    """A bond type's name, ``RES:A-B`` with the bead names in bead order (``i < j``)."""
    return f"{cg.residue_name[i]}:{cg.bead_name[i]}-{cg.bead_name[j]}"


def angle_label(cg: "CGFrames", i: int, centre: int, k: int) -> str:
    """An angle type's name, ``RES:A-B-C`` with the centre bead in the middle (``i < k``)."""
    return f"{cg.residue_name[centre]}:{cg.bead_name[i]}-{cg.bead_name[centre]}-{cg.bead_name[k]}"


def bonded_terms(cg: "CGFrames") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Bead index pairs per bond type and triplets per angle type (angles: every two bonds sharing a bead).

    Type names are ``RES:A-B`` and ``RES:A-B-C`` with bead names; every molecule of a residue
    type has the same beads in the same order, so these are the same across runs.
    """
    bonds: dict[str, list[tuple[int, int]]] = {}
    angles: dict[str, list[tuple[int, int, int]]] = {}
    for i, j in np.asarray(cg.bonds).reshape(-1, 2):
        i, j = sorted((int(i), int(j)))
        bonds.setdefault(bond_label(cg, i, j), []).append((i, j))
    for centre, partners in enumerate(_neighbours(cg.n_beads, cg.bonds)):
        partners = sorted(partners)
        for a in range(len(partners)):
            for b in range(a + 1, len(partners)):
                i, k = partners[a], partners[b]
                angles.setdefault(angle_label(cg, i, centre, k), []).append((i, centre, k))
    return (
        {k: np.array(v, dtype=np.int64) for k, v in bonds.items()},
        {k: np.array(v, dtype=np.int64) for k, v in angles.items()},
    )


def bond_lengths(cg: "CGFrames", pairs: np.ndarray) -> np.ndarray:
    """All lengths (nm) of the given bead pairs over all frames, flattened."""
    lengths = orthorhombic_lengths(cg.box)[:, None, :]
    delta = minimum_image_orthorhombic(cg.positions[:, pairs[:, 1]].astype(np.float64) - cg.positions[:, pairs[:, 0]], lengths)
    return np.linalg.norm(delta, axis=-1).ravel()


def bond_angles(cg: "CGFrames", triplets: np.ndarray) -> np.ndarray:
    """All angles (degrees) i-j-k of the given bead triplets over all frames, flattened."""
    lengths = orthorhombic_lengths(cg.box)[:, None, :]
    centre = cg.positions[:, triplets[:, 1]].astype(np.float64)
    u = minimum_image_orthorhombic(cg.positions[:, triplets[:, 0]] - centre, lengths)
    v = minimum_image_orthorhombic(cg.positions[:, triplets[:, 2]] - centre, lengths)
    cosine = np.einsum("fpk,fpk->fp", u, v) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))).ravel()


@dataclass
class DistributionComparison:
    edges: np.ndarray
    density_aa: np.ndarray
    density_cg: np.ndarray
    mean: dict[str, float]
    std: dict[str, float]
    error: float  # total-variation distance of the two histograms, 0 (same) to 1 (disjoint)
    # TV distance between the first and second half of the AA sample on the same bins: what finite,
    # time-correlated sampling alone gives (AA samples are frame-major, so the halves are time halves).
    noise_floor: float = 0.0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "error": self.error, "noise_floor": self.noise_floor}


def compare_distributions(aa: np.ndarray, cg: np.ndarray, n_bins: int = 60) -> DistributionComparison:
    """Histogram two samples on shared bins; the error is half the integrated absolute difference."""
    if aa.size == 0 or cg.size == 0:
        raise ValueError("compare_distributions: an empty sample")
    both = np.concatenate([aa, cg])
    lo, hi = np.percentile(both, [0.1, 99.9])
    pad = 0.05 * max(hi - lo, 1e-6)
    edges = np.linspace(lo - pad, hi + pad, n_bins + 1)
    density_aa = np.histogram(aa, edges, density=True)[0]
    density_cg = np.histogram(cg, edges, density=True)[0]
    half = aa.size // 2
    noise_floor = 0.0
    if half:
        first, second = (np.histogram(part, edges, density=True)[0] for part in (aa[:half], aa[half:]))
        # Halves have half the samples: scale by 1/sqrt(2) to the full sample's counting noise.
        noise_floor = float(0.5 * np.sum(np.abs(first - second) * np.diff(edges)) / np.sqrt(2.0))
    return DistributionComparison(
        edges=edges,
        density_aa=density_aa,
        density_cg=density_cg,
        mean={"aa": float(aa.mean()), "cg": float(cg.mean())},
        std={"aa": float(aa.std()), "cg": float(cg.std())},
        error=float(0.5 * np.sum(np.abs(density_aa - density_cg) * np.diff(edges))),
        noise_floor=noise_floor,
    )
