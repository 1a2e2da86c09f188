"""The CG system in OpenMM terms: a Topology whose "atoms" are beads, a System, a first configuration.

Everything here is read from ``mapping.json`` (residue names, bead names, masses, bead bonds), so
no molecule is special. Bead order is the CG topology order of docs/contracts.md section 2:
molecules in order, beads of each molecule in mapping order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io import atomic_path
from ..mapping.spec import CGFrames, CGMapping, MappingError
from ..periodic import minimum_image_orthorhombic
from ..units import cube_edge_nm, density_kg_m3

DEFAULT_BOND_NM = 0.35  # bead spacing when no prior bond length is known (typical CG bond)


@dataclass
class CGConfiguration:
    """A CG configuration with the per-bead arrays that the model, the priors and the reporters need.

    Not an ``openmm.System``: :meth:`system` and :meth:`topology` build the OpenMM objects from it.
    """

    mapping: CGMapping
    positions: np.ndarray  # (M, 3) nm, molecules whole
    box: np.ndarray  # (3, 3) nm, rows are box vectors
    bead_type: np.ndarray  # (M,) int64 index into mapping.bead_type_names
    bead_names: list[str]  # (M,)
    bead_in_residue: np.ndarray  # (M,) index of the bead within its molecule (mapping order)
    molecule_index: np.ndarray  # (M,) int64, 0-based
    residue_names: list[str]  # (M,) residue (molecule type) of each bead
    masses: np.ndarray  # (M,) amu
    bonds: np.ndarray  # (K, 2) bead index pairs inside molecules

    @property
    def n_beads(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_molecules(self) -> int:
        return int(self.molecule_index.max()) + 1 if self.n_beads else 0

    @property
    def bead_type_names(self) -> list[str]:
        return self.mapping.bead_type_names

    @property
    def molecule_residues(self) -> list[str]:
        """Residue name of each molecule, in order."""
        first = np.unique(self.molecule_index, return_index=True)[1]
        return [self.residue_names[i] for i in first]

    def composition(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.molecule_residues:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def density_kg_m3(self) -> float:
        return float(density_kg_m3(self.masses.sum(), abs(np.linalg.det(self.box))))

    # -- OpenMM objects -------------------------------------------------------------------------

    def topology(self) -> Any:
        """``openmm.app.Topology``: one residue per molecule named after its type, beads as atoms without elements."""
        import openmm.app as app
        import openmm.unit as unit

        top = app.Topology()
        chain = top.addChain()
        atoms = []
        residue = None
        for i in range(self.n_beads):
            if i == 0 or self.molecule_index[i] != self.molecule_index[i - 1]:
                residue = top.addResidue(self.residue_names[i], chain)
            atoms.append(top.addAtom(self.bead_names[i], None, residue))
        for i, j in self.bonds:
            top.addBond(atoms[int(i)], atoms[int(j)])
        top.setPeriodicBoxVectors(self.box * unit.nanometer)
        return top

    def system(self) -> Any:
        """``openmm.System`` with the bead masses and the box; forces are added by CGNNForce."""
        import openmm

        system = openmm.System()
        for mass in self.masses:
            system.addParticle(float(mass))
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*map(float, row)) for row in self.box))
        return system

    def positions_quantity(self) -> Any:
        import openmm.unit as unit

        return [tuple(map(float, p)) for p in self.positions] * unit.nanometer

    def write_pdb(self, path: str | Path) -> Path:
        """PDB with CRYST1 box and CONECT bead bonds, written atomically."""
        import openmm.app as app

        with atomic_path(path) as tmp, open(tmp, "w") as handle:
            app.PDBFile.writeFile(self.topology(), self.positions_quantity(), handle, keepIds=False)
        return Path(path)

    def with_positions(self, positions: np.ndarray, box: np.ndarray | None = None) -> "CGConfiguration":
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != self.positions.shape:
            raise ValueError(f"positions have shape {positions.shape}, this CG system needs {self.positions.shape}")
        return CGConfiguration(
            mapping=self.mapping,
            positions=positions,
            box=self.box if box is None else np.asarray(box, dtype=np.float64),
            bead_type=self.bead_type,
            bead_names=self.bead_names,
            bead_in_residue=self.bead_in_residue,
            molecule_index=self.molecule_index,
            residue_names=self.residue_names,
            masses=self.masses,
            bonds=self.bonds,
        )

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_molecules(cls, mapping: CGMapping, molecule_residues: Sequence[str], positions: np.ndarray, box: np.ndarray) -> "CGConfiguration":
        """Beads of the named molecules in order; ``positions`` (M, 3) nm in CG topology order."""
        bead_type, bead_names, bead_in_residue, molecule_index, residue_names, masses, bonds = [], [], [], [], [], [], []
        for mol, name in enumerate(molecule_residues):
            if name not in mapping.residues:
                raise MappingError(f"molecule {mol} is a '{name}', which the mapping does not have (it has {list(mapping.residues)})")
            rm = mapping.residues[name]
            first = len(bead_names)
            for k, bead in enumerate(rm.beads):
                if not bead.mass > 0:
                    raise MappingError(f"mapping: bead '{name}:{bead.name}' has no positive 'mass'")
                bead_type.append(mapping.bead_type_index(name, k))
                bead_names.append(bead.name)
                bead_in_residue.append(k)
                molecule_index.append(mol)
                residue_names.append(name)
                masses.append(bead.mass)
            bonds += [(first + i, first + j) for i, j in rm.bead_bonds]
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (len(bead_names), 3):
            raise ValueError(f"positions have shape {positions.shape}, the molecules have {len(bead_names)} beads")
        return cls(
            mapping=mapping,
            positions=positions,
            box=_check_box(box),
            bead_type=np.array(bead_type, dtype=np.int64),
            bead_names=bead_names,
            bead_in_residue=np.array(bead_in_residue, dtype=np.int64),
            molecule_index=np.array(molecule_index, dtype=np.int64),
            residue_names=residue_names,
            masses=np.array(masses, dtype=np.float64),
            bonds=np.array(bonds, dtype=np.int64).reshape(-1, 2),
        )

    @classmethod
    def from_cg_frames(cls, mapping: CGMapping, frames: CGFrames, frame: int = -1) -> "CGConfiguration":
        """One frame of mapped (or CG-run) frames; bead masses are the mapping's."""
        first = np.unique(frames.molecule_index, return_index=True)[1]
        residues = [frames.residue_name[i] for i in first]
        system = cls.from_molecules(mapping, residues, frames.positions[frame], frames.box[frame])
        if not np.array_equal(system.bead_type, frames.bead_type):
            raise MappingError("the CG frames' bead types do not follow the mapping's bead order")
        return system

    @classmethod
    def from_run(cls, mapping: CGMapping, run_dir: str | Path, frame: int = -1) -> "CGConfiguration":
        """A frame of an AA run (mapped with ``apply_mapping``) or of a CG run (read as beads)."""
        from ..mapping.spec import load_cg_frames

        # one frame only: runs can be long, and reading stays inside read_frames (negative = from the end)
        stop = None if frame == -1 else frame + 1
        frames = load_cg_frames(run_dir, mapping, start=frame, stop=stop)
        return cls.from_cg_frames(mapping, frames, 0)

    @classmethod
    def packed(
        cls,
        mapping: CGMapping,
        counts: Mapping[str, int],
        density_kg_m3: float,
        seed: int = 0,
        bond_lengths: Mapping[tuple[str, int, int], float] | None = None,
        min_distance_nm: float = 0.3,
    ) -> "CGConfiguration":
        """Molecules inserted at random into a cubic box of the target density.

        Molecule shapes are grown along the mapping's bead bonds with ``bond_lengths``
        (``(residue, i, j) -> r0``, e.g. from the prior) and otherwise a typical CG bond length; the
        insertion keeps beads of different molecules ``min_distance_nm`` apart where it can. The
        result still needs an energy minimisation in the real force field before dynamics.
        """
        if density_kg_m3 <= 0:
            raise ValueError(f"density must be positive, got {density_kg_m3} kg/m3")
        residues: list[str] = []
        for name, count in counts.items():
            if name not in mapping.residues:
                raise MappingError(f"cannot pack '{name}': the mapping has residues {list(mapping.residues)}")
            if count < 0:
                raise ValueError(f"molecule count for '{name}' is negative ({count})")
            residues += [name] * int(count)
        if not residues:
            raise ValueError("nothing to pack: all molecule counts are zero")
        rng = np.random.default_rng(seed)
        total_mass = sum(sum(b.mass for b in mapping.residues[r].beads) for r in residues)
        edge = cube_edge_nm(total_mass, density_kg_m3)
        box = np.eye(3) * edge
        templates = {name: _grow_molecule(mapping, name, bond_lengths or {}, rng) for name in set(residues)}
        order = rng.permutation(len(residues))  # insert species interleaved so none is squeezed out last
        placed: list[np.ndarray | None] = [None] * len(residues)
        occupied = np.zeros((0, 3))
        for mol in order:
            coords = _insert(templates[residues[mol]], occupied, edge, min_distance_nm, rng)
            placed[mol] = coords
            occupied = np.vstack([occupied, coords])
        positions = np.vstack([p for p in placed if p is not None])
        return cls.from_molecules(mapping, residues, positions, box)


# The name of older code; "system" alone means an openmm.System (docs/contracts.md, "Names").
CGSystem = CGConfiguration


def composition_for_pairs(mapping: CGMapping, n_pairs: int) -> dict[str, int]:
    """``n_pairs`` formula units of a 1:1 liquid: one molecule of every residue type in the mapping per unit.

    Other stoichiometries give their counts (``composition_for_counts``; the liquid file's
    ``Liquid.composition(units)`` computes them).
    """
    if n_pairs < 1:
        raise ValueError(f"the number of pairs must be at least 1, got {n_pairs}")
    return {name: int(n_pairs) for name in mapping.residues}


def composition_for_counts(mapping: CGMapping, counts: Mapping[str, int]) -> dict[str, int]:
    """Explicit molecule counts ``{residue: n}``, checked against the mapping, in mapping order."""
    from ..liquids import checked_counts

    return checked_counts(counts, list(mapping.residues), "the mapping has residues")


def _check_box(box: np.ndarray) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (3, 3):
        raise ValueError(f"box must be 3 vectors (3x3), got shape {box.shape}")
    if not np.isfinite(box).all() or abs(np.linalg.det(box)) <= 0:
        raise ValueError("box vectors must be finite and span a volume")
    return box


def _grow_molecule(mapping: CGMapping, residue: str, bond_lengths: Mapping[tuple[str, int, int], float], rng: np.random.Generator) -> np.ndarray:
    """Bead coordinates (centred) of one molecule: a self-avoiding walk along its bead bonds."""
    rm = mapping.residues[residue]
    n = len(rm.beads)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in rm.bead_bonds:
        neighbours[i].append(j)
        neighbours[j].append(i)
    coords = np.full((n, 3), np.nan)
    for root in range(n):
        if not np.isnan(coords[root, 0]):
            continue
        # beads with no bond path to earlier ones (e.g. a bond-less multi-bead residue) start nearby
        coords[root] = 0.0 if root == 0 else coords[:root][~np.isnan(coords[:root, 0])][-1] + _unit(rng) * DEFAULT_BOND_NM
        frontier = [root]
        while frontier:
            i = frontier.pop(0)
            for j in neighbours[i]:
                if not np.isnan(coords[j, 0]):
                    continue
                length = bond_lengths.get((residue, min(i, j), max(i, j)), DEFAULT_BOND_NM)
                done = ~np.isnan(coords[:, 0])
                best, best_gap = None, -1.0
                for _ in range(20):  # keep non-bonded beads of the molecule apart where possible
                    trial = coords[i] + _unit(rng) * length
                    gap = np.min(np.linalg.norm(coords[done] - trial, axis=1))
                    if gap > best_gap:
                        best, best_gap = trial, gap
                coords[j] = best
                frontier.append(j)
    return coords - coords.mean(axis=0)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _insert(template: np.ndarray, occupied: np.ndarray, edge: float, min_distance: float, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """Place a rotated copy where its closest periodic contact is largest among ``tries`` attempts."""
    best, best_gap = None, -1.0
    for _ in range(tries):
        trial = template @ _random_rotation(rng).T + rng.uniform(0, edge, size=3)
        if occupied.size == 0:
            return trial
        delta = trial[:, None, :] - occupied[None, :, :]
        delta = minimum_image_orthorhombic(delta, edge)
        gap = float(np.sqrt((delta**2).sum(-1)).min())
        if gap >= min_distance:
            return trial
        if gap > best_gap:
            best, best_gap = trial, gap
    return best


def build_cg_system(
    mapping: CGMapping,
    *,
    from_run: str | Path | None = None,
    frame: int = -1,
    pairs: int | None = None,
    density_kg_m3: float | None = None,
    seed: int = 0,
    bond_lengths: Mapping[tuple[str, int, int], float] | None = None,
    molecules: Mapping[str, int] | None = None,
) -> CGConfiguration:
    """The starting CG configuration: a frame of a run (AA runs are mapped), or molecules packed at a density:
    ``pairs`` formula units of a 1:1 liquid or explicit ``molecules`` counts."""
    if sum(x is not None for x in (from_run, pairs, molecules)) != 1:
        raise ValueError("give exactly one of a run directory (from_run), a number of pairs or molecule counts")
    if from_run is not None:
        return CGConfiguration.from_run(mapping, from_run, frame)
    if density_kg_m3 is None:
        raise ValueError("a packed start needs the target density in kg/m3 (e.g. the density of the all-atom run)")
    counts = composition_for_counts(mapping, molecules) if molecules is not None else \
        composition_for_pairs(mapping, int(pairs))
    return CGConfiguration.packed(mapping, counts, density_kg_m3, seed, bond_lengths)
