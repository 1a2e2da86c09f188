"""What a CG mapping is, its file (``mapping.json``), and how it turns runs into CG frames.

A mapping assigns every atom of each residue (molecule) type to exactly one bead. Bead positions are
centres of mass and bead masses sums of atomic masses. Bead forces are a linear force map of the
atomic forces: the summed map (each bead's own atoms), or a residue's stored force map (weights
over all its atoms, ``forcemap.py``: the statistically optimal one). Any map with ``B M^T = I`` for
the position map M makes mapped instantaneous forces the right target for force matching.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..frames import Frames, FramesError, read_frames
from ..layout import MAPPING_JSON
from ..periodic import minimum_image

FORMAT = "openmm_cgnn.mapping/2"
# Version 1 had no force maps; it reads as a mapping whose residues all use the summed map.
READABLE_FORMATS = ("openmm_cgnn.mapping/1", FORMAT)


class MappingError(ValueError):
    """A mapping is malformed or does not fit the data it is applied to."""


@dataclass
class Bead:
    name: str
    atoms: list[str]
    mass: float = 0.0


@dataclass
class ResidueMapping:
    """The beads of one residue type; ``atoms`` is the residue template's atom order.

    ``force_weights`` (beads x atoms, columns in ``atoms`` order) is the residue's force map when one
    was fitted; ``force_map_info`` says how it compares with the summed map on its samples.
    """

    atoms: list[str]
    beads: list[Bead]
    bead_bonds: list[tuple[int, int]] = field(default_factory=list)
    force_weights: np.ndarray | None = None
    force_map_info: dict[str, Any] = field(default_factory=dict)

    def validate(self, residue: str, source: str = "mapping") -> None:
        where = f"{source}: residue '{residue}'"
        if len(set(self.atoms)) != len(self.atoms):
            raise MappingError(f"{where}: duplicate atom names in 'atoms'")
        if not self.beads:
            raise MappingError(f"{where}: has no beads")
        names = [b.name for b in self.beads]
        if len(set(names)) != len(names):
            raise MappingError(f"{where}: duplicate bead names {names}")
        seen: dict[str, str] = {}
        for bead in self.beads:
            if not bead.atoms:
                raise MappingError(f"{where}: bead '{bead.name}' has no atoms")
            for atom in bead.atoms:
                if atom not in self.atoms:
                    raise MappingError(f"{where}: bead '{bead.name}' names unknown atom '{atom}'")
                if atom in seen:
                    raise MappingError(f"{where}: atom '{atom}' is in beads '{seen[atom]}' and '{bead.name}'")
                seen[atom] = bead.name
        missing = [a for a in self.atoms if a not in seen]
        if missing:
            raise MappingError(f"{where}: atoms {missing} are in no bead")
        for i, j in self.bead_bonds:
            if not (0 <= i < len(self.beads) and 0 <= j < len(self.beads)) or i == j:
                raise MappingError(f"{where}: 'bead_bonds' entry {[i, j]} is not a pair of bead indices")
        if self.force_weights is not None:
            weights = np.asarray(self.force_weights, dtype=np.float64)
            if weights.shape != (len(self.beads), len(self.atoms)) or not np.all(np.isfinite(weights)):
                raise MappingError(f"{where}: 'force_map.weights' must be a finite {len(self.beads)} x {len(self.atoms)} "
                                   f"matrix (beads x atoms), got shape {weights.shape}")
            self.force_weights = weights

    def atom_to_bead(self) -> dict[str, int]:
        return {atom: k for k, bead in enumerate(self.beads) for atom in bead.atoms}

    @classmethod
    def from_assignment(
        cls,
        atoms: Sequence[str],
        assignment: Sequence[int],
        masses: Sequence[float],
        bonds: Iterable[tuple[int, int]] = (),
        bead_names: Sequence[str] | None = None,
    ) -> "ResidueMapping":
        """Build from a bead index per atom; ``bonds`` (atom index pairs) give the bead bonds."""
        assignment = np.asarray(assignment, dtype=int)
        n_beads = int(assignment.max()) + 1
        names = list(bead_names) if bead_names is not None else [f"B{k}" for k in range(n_beads)]
        beads = [
            Bead(
                name=names[k],
                atoms=[atoms[i] for i in np.flatnonzero(assignment == k)],
                mass=float(np.sum(np.asarray(masses)[assignment == k])),
            )
            for k in range(n_beads)
        ]
        bead_bonds = sorted(
            {tuple(sorted((int(assignment[i]), int(assignment[j])))) for i, j in bonds if assignment[i] != assignment[j]}
        )
        return cls(atoms=list(atoms), beads=beads, bead_bonds=[tuple(b) for b in bead_bonds])


@dataclass
class CGMapping:
    """The contents of ``mapping.json``: for each residue, its beads and bead bonds (docs/contracts.md section 2)."""

    residues: "OrderedDict[str, ResidueMapping]"
    training: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="mapping", compare=False)  # the file it was read from, for messages

    def __post_init__(self) -> None:
        self.residues = OrderedDict(self.residues)
        for name, residue in self.residues.items():
            residue.validate(name)

    @property
    def bead_type_names(self) -> list[str]:
        return [f"{res}:{bead.name}" for res, rm in self.residues.items() for bead in rm.beads]

    def bead_type_index(self, residue: str, bead: int) -> int:
        offset = 0
        for name, rm in self.residues.items():
            if name == residue:
                return offset + bead
            offset += len(rm.beads)
        raise MappingError(f"mapping has no residue '{residue}' (it has {list(self.residues)})")

    @property
    def has_force_map(self) -> bool:
        """Every residue carries a stored force map."""
        return all(rm.force_weights is not None for rm in self.residues.values())

    def to_dict(self) -> dict[str, Any]:
        residues = {}
        for name, rm in self.residues.items():
            residues[name] = {
                "atoms": list(rm.atoms),
                # A bead of unknown mass (0) is written without one: it then takes its atoms' masses.
                "beads": [{"name": b.name, "atoms": list(b.atoms), **({"mass": round(float(b.mass), 6)} if b.mass > 0 else {})}
                          for b in rm.beads],
                "bead_bonds": [list(map(int, b)) for b in rm.bead_bonds],
            }
            if rm.force_weights is not None:
                # Full float64 precision (repr) so B M^T = I holds exactly after a round trip.
                residues[name]["force_map"] = {"weights": [[float(w) for w in row] for row in rm.force_weights],
                                               **rm.force_map_info}
        return {"format": FORMAT, "residues": residues, "training": self.training}

    def sha256(self) -> str:
        """Hash of what defines the CG system (residues, atoms, beads), not of training notes.

        The force map only changes training labels, not the CG system, so it is left out: a model
        keeps the hash of the same mapping with or without one (and of its version-1 file).
        """
        residues = {name: {k: v for k, v in rd.items() if k != "force_map"} for name, rd in self.to_dict()["residues"].items()}
        canonical = json.dumps(residues, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        from ..io import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mapping") -> "CGMapping":
        if not isinstance(data, dict):
            raise MappingError(f"{source}: expected a JSON object with 'format' and 'residues', got {type(data).__name__}")
        if data.get("format") not in READABLE_FORMATS:
            raise MappingError(f"{source}: field 'format' is {data.get('format')!r}, expected one of {list(READABLE_FORMATS)}")
        if not isinstance(data.get("residues"), dict) or not data["residues"]:
            raise MappingError(f"{source}: field 'residues' must be a non-empty object")
        residues = OrderedDict()
        for name, rd in data["residues"].items():
            try:
                if not isinstance(rd, dict) or not isinstance(rd["beads"], list) or not isinstance(rd["atoms"], list):
                    raise TypeError("'atoms' and 'beads' must be lists")
                beads = [Bead(name=str(b["name"]), atoms=list(b["atoms"]), mass=float(b.get("mass", 0.0))) for b in rd["beads"]]
                force_map = dict(rd.get("force_map") or {})
                weights = force_map.pop("weights", None)
                rm = ResidueMapping(
                    atoms=list(rd["atoms"]), beads=beads, bead_bonds=[tuple(map(int, b)) for b in rd.get("bead_bonds", [])],
                    force_weights=None if weights is None else np.array(weights, dtype=np.float64),
                    force_map_info=force_map,
                )
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise MappingError(f"{source}: residue '{name}' is missing or has a bad field ({exc})") from exc
            for raw, bead in zip(rd["beads"], beads):
                # A bead without 'mass' takes its atoms' masses; a given mass must be one.
                if "mass" in raw and not (math.isfinite(bead.mass) and bead.mass > 0):
                    raise MappingError(f"{source}: residue '{name}' bead '{bead.name}': 'mass' must be a positive "
                                       f"number of amu, got {raw['mass']!r}")
            rm.validate(name, source)
            residues[name] = rm
        return cls(residues=residues, training=dict(data.get("training", {})), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "CGMapping":
        path = Path(path)
        if path.is_dir():
            path = path / MAPPING_JSON
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise MappingError(f"{path}: mapping file not found") from exc
        except json.JSONDecodeError as exc:
            raise MappingError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


# The short name of older code; new code says CGMapping, which does not shadow typing.Mapping.
Mapping = CGMapping


@dataclass
class CGFrames:
    """CG positions and forces of a run, in CG topology order (docs/contracts.md section 2)."""

    positions: np.ndarray  # (F, M, 3) float32 nm, molecules whole
    forces: np.ndarray | None  # (F, M, 3) float32 kJ/mol/nm
    box: np.ndarray  # (F, 3, 3) nm
    time: np.ndarray  # (F,) ps
    temperature_K: np.ndarray  # (F,) K
    bead_type: np.ndarray  # (M,) int64
    bead_type_names: list[str]
    bead_name: list[str]
    molecule_index: np.ndarray  # (M,) int64
    residue_name: list[str]  # (M,)
    masses: np.ndarray  # (M,) amu
    bonds: np.ndarray  # (K, 2) int64
    force_map: str = "sum"  # how AA forces became bead forces: "sum", "optimal"; "cg" for a CG run's own forces

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_beads(self) -> int:
        return int(self.positions.shape[1])

    def same_topology(self, other: "CGFrames") -> bool:
        return (
            self.bead_type_names == other.bead_type_names
            and np.array_equal(self.bead_type, other.bead_type)
            and np.array_equal(self.molecule_index, other.molecule_index)
        )

    def select(self, index: np.ndarray | slice) -> "CGFrames":
        """A subset of frames with the same topology."""
        return replace(
            self,
            positions=self.positions[index],
            forces=None if self.forces is None else self.forces[index],
            box=self.box[index],
            time=self.time[index],
            temperature_K=self.temperature_K[index],
        )

    @staticmethod
    def concatenate(parts: Sequence["CGFrames"]) -> "CGFrames":
        if not parts:
            raise MappingError("no CG frames to concatenate")
        first = parts[0]
        for k, part in enumerate(parts[1:], start=1):
            if not first.same_topology(part):
                raise MappingError(f"CG frames part {k} has a different CG topology from part 0 (bead types or molecules differ)")
            if part.force_map != first.force_map and part.forces is not None and first.forces is not None:
                raise MappingError(f"CG frames part {k} has forces from the {part.force_map!r} force map, part 0 from "
                                   f"the {first.force_map!r} one: labels of different maps do not mix")
        has_forces = all(p.forces is not None for p in parts)
        return replace(
            first,
            positions=np.concatenate([p.positions for p in parts]),
            forces=np.concatenate([p.forces for p in parts]) if has_forces else None,
            box=np.concatenate([p.box for p in parts]),
            time=np.concatenate([p.time for p in parts]),
            temperature_K=np.concatenate([p.temperature_K for p in parts]),
        )


def make_molecules_whole(positions: np.ndarray, box: np.ndarray, residue_index: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """Rebuild each molecule from its first atom outward along bonds, each bond by minimum image.

    Walking bonds (not distances to one reference atom) keeps molecules longer than half the box
    whole; atoms with no bond path fall back to the minimum image of their residue's first atom.
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = positions.shape[1]
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        if residue_index[i] == residue_index[j]:
            neighbours[i].append(int(j))
            neighbours[j].append(int(i))
    parent = np.full(n, -1)
    depth = np.full(n, -1)
    _, roots = np.unique(residue_index, return_index=True)
    for root in roots:
        depth[root] = 0
        frontier = [int(root)]
        while frontier:
            nxt = []
            for i in frontier:
                for j in neighbours[i]:
                    if depth[j] < 0:
                        depth[j], parent[j] = depth[i] + 1, i
                        nxt.append(j)
            frontier = nxt
    orphans = np.flatnonzero(depth < 0)
    if orphans.size:
        depth[orphans] = 1
        parent[orphans] = roots[np.searchsorted(np.unique(residue_index), residue_index[orphans])]
    whole = positions.copy()
    for level in range(1, int(depth.max(initial=0)) + 1):
        atoms = np.flatnonzero(depth == level)
        anchor = whole[:, parent[atoms]]
        whole[:, atoms] = anchor + minimum_image(positions[:, atoms] - anchor, box)
    return whole


def _check_bead_mass(mapping: CGMapping, residue: str, bead: Bead, run_mass: float, path: Any) -> None:
    """A mapping that records bead masses must agree with the run's (else it belongs to other molecules)."""
    if bead.mass > 0 and abs(bead.mass - run_mass) > 1e-3 + 1e-5 * run_mass:
        raise MappingError(f"{mapping.source}: bead '{residue}:{bead.name}' has 'mass' {bead.mass:g} amu, but it (its atoms) "
                           f"weigh {run_mass:g} amu in {path}; the mapping does not belong to these runs")


def _resolve_force_map(mapping: CGMapping, force_map: str | None, source: Any) -> bool:
    """True when the stored per-residue force maps are used, False for the summed map."""
    if force_map is None:
        return mapping.has_force_map
    if force_map == "sum":
        return False
    if force_map == "optimal":
        if not mapping.has_force_map:
            lacking = [name for name, rm in mapping.residues.items() if rm.force_weights is None]
            raise MappingError(f"{source}: the mapping has no stored force map for residue(s) {lacking} "
                               "(a version-1 mapping.json? fit one with mapping.forcemap.fit_force_map)")
        return True
    raise MappingError(f"force map must be 'optimal' or 'sum', got {force_map!r}")


def _bead_matrices(mapping: CGMapping, frames: Frames, stored_force_map: bool = False):
    """Sparse (M, N) matrices for centre of mass, bead membership and the force map, plus per-bead bookkeeping."""
    from scipy import sparse

    from .forcemap import position_map

    top = frames.topology
    rows, cols, weights = [], [], []
    force_rows, force_cols, force_weights = [], [], []
    bead_type, molecule, bead_name, residue_name, bonds = [], [], [], [], []
    masses = top.mass
    checked: set[str] = set()
    n_beads = 0
    for res in range(top.n_residues):
        atoms = top.residue_atoms(res)
        if atoms.size == 0:
            continue
        name = top.residue_name[atoms[0]]
        if name not in mapping.residues:
            raise MappingError(f"{frames.path}: residue '{name}' (index {res}) is not in the mapping (it has {list(mapping.residues)})")
        rm = mapping.residues[name]
        names = [top.atom_name[i] for i in atoms]
        if sorted(names) != sorted(rm.atoms):
            raise MappingError(
                f"{frames.path}: residue '{name}' (index {res}) has atoms {sorted(names)}, the mapping expects {sorted(rm.atoms)}"
            )
        index_of = dict(zip(names, atoms))
        molecule_atoms = np.array([index_of[a] for a in rm.atoms])
        if stored_force_map and name not in checked:
            # The stored map was fitted for some atom masses; it is unbiased only if B M^T = I for these.
            product = rm.force_weights @ position_map(rm, masses[molecule_atoms]).T
            if not np.allclose(product, np.eye(len(rm.beads)), atol=1e-5):
                raise MappingError(f"{frames.path}: residue '{name}': the mapping's force map does not satisfy B M^T = I "
                                   "with this run's atom masses (fitted on other data?)")
            checked.add(name)
        first_bead = n_beads
        for k, bead in enumerate(rm.beads):
            idx = np.array([index_of[a] for a in bead.atoms])
            _check_bead_mass(mapping, name, bead, float(np.sum(masses[idx])), frames.path)
            rows += [n_beads] * len(idx)
            cols += list(idx)
            weights += list(masses[idx])
            if stored_force_map:
                force_rows += [n_beads] * len(molecule_atoms)
                force_cols += list(molecule_atoms)
                force_weights += list(rm.force_weights[k])
            bead_type.append(mapping.bead_type_index(name, k))
            molecule.append(res)
            bead_name.append(bead.name)
            residue_name.append(name)
            n_beads += 1
        bonds += [(first_bead + i, first_bead + j) for i, j in rm.bead_bonds]
    n = top.n_particles
    member = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_beads, n))
    mass_w = sparse.csr_matrix((weights, (rows, cols)), shape=(n_beads, n))
    bead_mass = np.asarray(mass_w.sum(axis=1)).ravel()
    if np.any(bead_mass <= 0):
        raise MappingError(f"{frames.path}: a bead has zero total mass (atom masses missing from the topology?)")
    com = sparse.diags(1.0 / bead_mass) @ mass_w
    force = sparse.csr_matrix((force_weights, (force_rows, force_cols)), shape=(n_beads, n)) if stored_force_map else member
    molecule_index = np.unique(np.array(molecule), return_inverse=True)[1]
    return (com, member, force, bead_type, list(molecule_index), bead_name, residue_name,
            np.array(bonds, dtype=np.int64).reshape(-1, 2))


def apply_mapping(mapping: CGMapping, frames: Frames, force_map: str | None = None) -> CGFrames:
    """Map all-atom frames to beads: centre-of-mass positions, mapped forces, summed masses.

    ``force_map``: ``"optimal"`` (the mapping's stored force map; an error if it has none),
    ``"sum"`` (each bead's atoms summed) or None (the stored map when the mapping has one, else the sum).
    """
    stored = _resolve_force_map(mapping, force_map, frames.path)
    com, member, force_matrix, bead_type, molecule_index, bead_name, residue_name, bonds = \
        _bead_matrices(mapping, frames, stored)
    top = frames.topology
    whole = make_molecules_whole(frames.positions, frames.box, top.residue_index, top.bonds)
    positions = _sparse_apply(com, whole)
    forces = None
    if frames.forces is not None:
        forces = _sparse_apply(force_matrix, frames.forces.astype(np.float64))
    return _cg_frames(mapping, frames, positions, forces, bead_type, bead_name, residue_name,
                      molecule_index=np.array(molecule_index, dtype=np.int64),
                      masses=np.asarray(member @ top.mass).ravel(), bonds=bonds,
                      force_map="optimal" if stored else "sum")


def _cg_frames(mapping: CGMapping, frames: Frames, positions: np.ndarray, forces: np.ndarray | None,
               bead_type: list[int], bead_name: list[str], residue_name: list[str], *, molecule_index: np.ndarray,
               masses: np.ndarray, bonds: np.ndarray, force_map: str) -> CGFrames:
    """CGFrames of these beads on ``frames``' time axis (box, time, temperature); float32 positions and forces."""
    return CGFrames(
        positions=positions.astype(np.float32),
        forces=None if forces is None else forces.astype(np.float32),
        box=frames.box.astype(np.float64),
        time=frames.time,
        temperature_K=np.full(frames.n_frames, frames.temperature_K),
        bead_type=np.array(bead_type, dtype=np.int64),
        bead_type_names=mapping.bead_type_names,
        bead_name=bead_name,
        molecule_index=molecule_index,
        residue_name=residue_name,
        masses=masses,
        bonds=bonds,
        force_map=force_map,
    )


def _sparse_apply(matrix: Any, values: np.ndarray) -> np.ndarray:
    f, n, d = values.shape
    flat = values.transpose(1, 0, 2).reshape(n, f * d)
    return np.asarray(matrix @ flat).reshape(-1, f, d).transpose(1, 0, 2)


def cg_frames_from_cg_run(mapping: CGMapping, frames: Frames) -> CGFrames:
    """Read a CG run (particles are beads) into CGFrames, checking it against the mapping."""
    top = frames.topology
    bead_type, bead_name, residue_name, bonds = [], [], [], []
    for res in range(top.n_residues):
        beads = top.residue_atoms(res)
        name = top.residue_name[beads[0]]
        if name not in mapping.residues:
            raise MappingError(f"{frames.path}: residue '{name}' (index {res}) is not in the mapping (it has {list(mapping.residues)})")
        expected = [b.name for b in mapping.residues[name].beads]
        names = [top.atom_name[i] for i in beads]
        if names != expected:
            raise MappingError(f"{frames.path}: residue '{name}' (index {res}) has beads {names}, the mapping expects {expected}")
        for bead, index in zip(mapping.residues[name].beads, beads):
            _check_bead_mass(mapping, name, bead, float(top.mass[index]), frames.path)
        offset = int(beads[0])
        bonds += [(offset + i, offset + j) for i, j in mapping.residues[name].bead_bonds]
        bead_type += [mapping.bead_type_index(name, k) for k in range(len(names))]
        bead_name += names
        residue_name += [name] * len(names)
    return _cg_frames(mapping, frames, frames.positions, frames.forces, bead_type, bead_name, residue_name,
                      molecule_index=top.residue_index.copy(), masses=top.mass.copy(),
                      bonds=np.array(bonds, dtype=np.int64).reshape(-1, 2), force_map="cg")


def load_cg_frames(path_or_dir: str | Path, mapping: CGMapping, force_map: str | None = None, **read_kw: Any) -> CGFrames:
    """CG frames of any run: AA runs are mapped (``force_map`` as in :func:`apply_mapping`), CG runs
    (metadata ``kind == "cg"``) read as beads."""
    frames = read_frames(path_or_dir, **read_kw)
    if frames.kind == "cg":
        return cg_frames_from_cg_run(mapping, frames)
    if frames.kind != "aa":
        raise FramesError(f"{frames.path}: metadata 'kind' is {frames.kind!r}, expected 'aa' or 'cg'")
    return apply_mapping(mapping, frames, force_map)
