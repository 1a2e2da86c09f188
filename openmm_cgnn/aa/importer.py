"""Bring your own all-atom data: a GROMACS or LAMMPS trajectory with forces into ``frames.h5``.

MDAnalysis reads the files (no parsers of our own); this module decides what the numbers mean.
Readers are opened with ``convert_units=False`` so every value arrives in the file's native unit
and exactly one conversion, stated in :data:`UNIT_STYLES` and in the output's metadata, takes it
to OpenMM's units. (MDAnalysis's own conversion goes to Å and kJ/mol/Å, and its LAMMPS dump reader
converts nothing at all, so relying on it would hide which factor was applied.)

Output follows the frames contract (docs/contracts.md section 1): one residue per molecule,
positions not wrapped, molecules whole and continuous in time. Sources that wrap atoms into the box
(GROMACS ``.trr``, LAMMPS ``x y z``) are rebuilt: each molecule along its bonds, then shifted by
whole box vectors so that it moves continuously from frame to frame. That is exact as long as no
molecule moves more than half a box edge between two saved frames.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__
from ..frames import FrameWriter, TopologyInfo
from ..io import OutputDirError, check_output_dir, staging_dir, swap_in, write_marker
from ..layout import FRAMES_H5, SUMMARY_JSON, TOPOLOGY_PDB
from ..mapping.spec import make_molecules_whole
from ..periodic import minimum_image

SOURCES = ("gromacs", "lammps")
GROMACS_SUFFIXES = (".trr",)
LAMMPS_SUFFIXES = (".lammpstrj", ".lammpsdump", ".dump")
CHUNK_VALUES = 1 << 23  # coordinates unwrapped together (64 MiB per float64 array): bounded memory
EV_IN_KJ_MOL = 96.48533212331  # CODATA 2018: e * N_A / 1000


class TrajectoryImportError(ValueError):
    """Bad input for an import; the message is one line naming the file or option."""


@dataclass(frozen=True)
class UnitStyle:
    """What one native unit of the source is in OpenMM units (nm, kJ/mol/nm, ps)."""

    name: str
    length_nm: float
    force_kj_mol_nm: float
    time_ps: float
    native: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"units {self.name}: length {self.native['length']} (x{self.length_nm:g} -> nm), "
                f"force {self.native['force']} (x{self.force_kj_mol_nm:g} -> kJ/mol/nm), "
                f"time {self.native['time']} (x{self.time_ps:g} -> ps)")

    def as_metadata(self) -> dict[str, Any]:
        return {"style": self.name, "native": dict(self.native),
                "factor_to_openmm": {"length_nm": self.length_nm, "force_kj_mol_nm": self.force_kj_mol_nm,
                                     "time_ps": self.time_ps}}


UNIT_STYLES: dict[str, UnitStyle] = {
    # GROMACS files are in OpenMM's units already.
    "gromacs": UnitStyle("gromacs", 1.0, 1.0, 1.0, {"length": "nm", "force": "kJ/mol/nm", "time": "ps"}),
    # LAMMPS `units real`: Å, kcal/mol/Å, fs (thermochemical kcal, 4.184 kJ, as LAMMPS uses).
    "real": UnitStyle("real", 0.1, 4.184 * 10.0, 1e-3, {"length": "Å", "force": "kcal/mol/Å", "time": "fs"}),
    # LAMMPS `units metal`: Å, eV/Å, ps (forces per atom; eV per particle -> kJ/mol).
    "metal": UnitStyle("metal", 0.1, EV_IN_KJ_MOL * 10.0, 1.0, {"length": "Å", "force": "eV/Å", "time": "ps"}),
}
LAMMPS_UNIT_STYLES = ("real", "metal")
# LAMMPS's default `timestep` per unit style, in that style's time unit (docs.lammps.org/timestep.html).
LAMMPS_DEFAULT_TIMESTEP = {"real": 1.0, "metal": 0.001}


def unit_style(source: str, units: str | None) -> UnitStyle:
    """The unit style for a source; LAMMPS files do not say theirs, so ``--units`` must."""
    if source == "gromacs":
        if units not in (None, "gromacs"):
            raise TrajectoryImportError(f"--units {units}: GROMACS files are always in nm, kJ/mol/nm and ps; drop --units")
        return UNIT_STYLES["gromacs"]
    if units is None:
        raise TrajectoryImportError(f"--units is required for LAMMPS data (the files do not record it): one of {', '.join(LAMMPS_UNIT_STYLES)}")
    if units not in LAMMPS_UNIT_STYLES:
        hint = " (lj is dimensionless and has no conversion to physical units)" if units == "lj" else ""
        raise TrajectoryImportError(f"--units {units}: unknown unit style{hint}; supported: {', '.join(LAMMPS_UNIT_STYLES)}")
    return UNIT_STYLES[units]


def guess_source(trajectory: str | Path) -> str:
    suffix = Path(trajectory).suffix.lower()
    if suffix in GROMACS_SUFFIXES:
        return "gromacs"
    if suffix in LAMMPS_SUFFIXES:
        return "lammps"
    raise TrajectoryImportError(
        f"{trajectory}: cannot tell the format from the suffix {suffix!r}; give --format gromacs (.trr) or lammps "
        f"(dump with fx fy fz: {', '.join(LAMMPS_SUFFIXES)})")


def _mdanalysis() -> Any:
    try:
        import MDAnalysis
    except ImportError as exc:
        raise TrajectoryImportError(
            "importing trajectories needs MDAnalysis: pip install 'openmm_cgnn[import]' (or pip install MDAnalysis)") from exc
    return MDAnalysis


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def open_universe(source: str, topology: Path, trajectory: Path, atom_style: str | None = None) -> tuple[Any, list[str]]:
    """An MDAnalysis Universe with native units, and notes on what was guessed; file problems
    become one-line errors."""
    mda = _mdanalysis()
    for label, path in (("--topology", topology), ("--trajectory", trajectory)):
        if not Path(path).is_file():
            raise TrajectoryImportError(f"{label} {path}: no such file")
    kwargs: dict[str, Any] = {"convert_units": False}
    if source == "lammps":
        kwargs.update(format="LAMMPSDUMP", topology_format="DATA")
        if atom_style:
            kwargs["atom_style"] = atom_style
    with warnings.catch_warnings():
        # MDAnalysis warns about every attribute it guesses; what we use is stated in the metadata.
        warnings.simplefilter("ignore")
        try:
            u = mda.Universe(str(topology), str(trajectory), **kwargs)
            notes = []
            # A LAMMPS data file lists every bond there is; .gro and plain PDB files list none.
            no_bonds = not hasattr(u, "bonds") or not len(u.bonds)
            if source == "gromacs" and no_bonds and _guess_bonds(mda, u, topology):
                notes.append(f"bonds guessed from distances in {topology} (it lists none)")
            return u, notes
        except TrajectoryImportError:
            raise
        except ValueError as exc:
            if "number of atoms" in str(exc).lower():
                raise TrajectoryImportError(_count_mismatch(mda, source, topology, trajectory, kwargs)) from None
            raise TrajectoryImportError(f"{trajectory} with {topology}: MDAnalysis cannot read them: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            raise TrajectoryImportError(f"{trajectory} with {topology}: MDAnalysis cannot read them: {_first_line(exc)}") from None


def _topology_only(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("topology_format", "atom_style")}


def _guess_bonds(mda: Any, u: Any, topology: Path) -> bool:
    """Bonds from distances (MDAnalysis's guesser, periodic box) in the topology file's own
    coordinates, read in Å as the guesser's radii are, for topologies without bonds (.gro, plain PDB)."""
    try:
        reference = mda.Universe(str(topology))
        dims = reference.dimensions
        if dims is None or not np.all(np.asarray(dims[:3]) > 0) or reference.atoms.n_atoms != u.atoms.n_atoms:
            return False
        reference.guess_TopologyAttrs(to_guess=["bonds"], box=dims)
        bonds = reference.bonds.indices
    except Exception:  # noqa: BLE001 - no coordinates or no radii: molecules fall back to their first atom
        return False
    if len(bonds):
        u.add_TopologyAttr("bonds", [tuple(b) for b in bonds])
    return bool(len(bonds))


def _count_mismatch(mda: Any, source: str, topology: Path, trajectory: Path, kwargs: dict[str, Any]) -> str:
    try:
        n_top = mda.Universe(str(topology), **_topology_only(kwargs)).atoms.n_atoms
        fmt = kwargs.get("format")
        reader = mda.coordinates.core.get_reader_for(str(trajectory), format=fmt)
        n_traj = reader(str(trajectory), convert_units=False).n_atoms
    except Exception:  # noqa: BLE001 - the counts are a courtesy; the mismatch itself is certain
        return f"{trajectory}: its atom count differs from the topology {topology}"
    return f"{trajectory}: {n_traj} atoms per frame, but the topology {topology} has {n_top}"


# --------------------------------------------------------------------------------------------
# Topology: molecules, names, elements


@dataclass
class MoleculeType:
    """One kind of molecule found in the source (same atoms in the same order, same bonds)."""

    source_name: str  # residue name in the file, or MOLk for LAMMPS (no residue names there)
    formula: str  # Hill formula from the elements ("" parts for unknown elements are "X")
    atom_names: list[str]
    count: int = 0
    name: str = ""  # after --residue-map / --mapping

    def describe(self) -> str:
        renamed = f" -> {self.name}" if self.name != self.source_name else ""
        n = len(self.atom_names)
        return f"{self.source_name}{renamed}: {self.count} molecules of {n} atom{'s' if n != 1 else ''} ({self.formula})"


def _hill_formula(elements: list[str]) -> str:
    counts: dict[str, int] = {}
    for e in elements:
        counts[e or "X"] = counts.get(e or "X", 0) + 1
    # Hill order: C, then H, then the rest alphabetically; without carbon, all alphabetically.
    first = [k for k in ("C", "H") if k in counts] if "C" in counts else []
    order = first + sorted(k for k in counts if k not in first)
    return "".join(f"{k}{counts[k] if counts[k] > 1 else ''}" for k in order)


def _elements_from_masses(masses: np.ndarray) -> list[str]:
    """Element symbols by atomic mass (LAMMPS data files have masses, not elements); "" when none fits."""
    from .clandp import ClandpError
    from .convert import element_for_mass

    symbols: dict[float, str] = {}
    for m in np.unique(masses):
        try:
            symbols[float(m)] = element_for_mass(float(m), "mass").symbol
        except ClandpError:
            symbols[float(m)] = ""
    return [symbols[float(m)] for m in masses]


def _generated_atom_names(elements: list[str]) -> list[str]:
    """Element + index in the molecule (N1, C2, ...), as the CL&P converter names atoms, so a mapping
    learned on our own runs of a CL&P liquid applies to the same molecules from a LAMMPS run."""
    from types import SimpleNamespace

    from .convert import atom_names

    return atom_names(None, [SimpleNamespace(symbol=e or "X") for e in elements])


def _molecule_ids(u: Any, source: str) -> np.ndarray:
    """Per-atom molecule number (0-based, in order of first atom): GROMACS residues, LAMMPS molecule IDs.

    LAMMPS molecule ID 0 means "no molecule"; such atoms are split into their bonded fragments.
    """
    atoms = u.atoms
    if source == "lammps":
        key = np.asarray(atoms.resids, dtype=np.int64).copy()
        free = np.flatnonzero(key == 0)
        if free.size:
            fragment = np.asarray(atoms.fragindices) if hasattr(atoms, "bonds") and len(u.bonds) else np.arange(len(atoms))
            key[free] = -1 - fragment[free]
    else:
        key = np.asarray(atoms.resindices, dtype=np.int64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def _bonds(u: Any) -> np.ndarray:
    try:
        bonds = u.bonds.indices
    except Exception:  # noqa: BLE001 - a topology without bonds
        return np.zeros((0, 2), dtype=np.int64)
    return np.asarray(bonds, dtype=np.int64).reshape(-1, 2)


def build_topology(
    u: Any,
    source: str,
    residue_map: dict[str, str] | None = None,
    mapping: Any | None = None,
    where: str = "",
) -> tuple[TopologyInfo, list[MoleculeType], list[str]]:
    """The frames topology of a Universe, with residue names mapped; notes say what was guessed."""
    atoms = u.atoms
    n = len(atoms)
    notes: list[str] = []
    molecule = _molecule_ids(u, source)
    bonds = _bonds(u)
    crossing = bonds[molecule[bonds[:, 0]] != molecule[bonds[:, 1]]] if bonds.size else bonds
    if crossing.size:
        i, j = crossing[0]
        unit = "molecule IDs" if source == "lammps" else "residues"
        raise TrajectoryImportError(
            f"{where}: atoms {i + 1} and {j + 1} are bonded but in different {unit}; the frames format needs one residue per molecule")
    masses = np.asarray(atoms.masses, dtype=np.float64) if hasattr(atoms, "masses") else np.zeros(n)
    if n and not np.all(masses > 0):
        bad = int(np.flatnonzero(~(masses > 0))[0])
        raise TrajectoryImportError(
            f"{where}: atom {bad + 1} has no mass (MDAnalysis could not tell it from the name); use a topology with masses (.tpr, LAMMPS data)")
    if source == "lammps":
        elements = _elements_from_masses(masses)
        notes.append("elements from the masses in the data file; atom names are element + index in the molecule")
    else:
        raw = [str(e) for e in atoms.elements] if hasattr(atoms, "elements") else [""] * n
        elements = [e.capitalize() if e.strip() else "" for e in raw]
        if not any(elements):
            elements = _elements_from_masses(masses)
            notes.append("elements from the masses (the topology has none)")
    if source == "lammps" or not hasattr(atoms, "names"):
        names = [""] * n
    else:
        names = [str(a) for a in atoms.names]
    if source == "gromacs":
        source_res = [str(r) for r in atoms.resnames] if hasattr(atoms, "resnames") else [""] * n
    else:
        source_res = [""] * n

    # Molecule types: same source residue name (GROMACS) or same atom types and bonds (LAMMPS).
    types = [str(t) for t in atoms.types] if hasattr(atoms, "types") else elements
    members: dict[int, list[int]] = {}
    for i, m in enumerate(molecule):
        members.setdefault(int(m), []).append(i)
    bonds_of: dict[int, list[tuple[int, int]]] = {}
    for i, j in bonds:
        bonds_of.setdefault(int(molecule[i]), []).append((int(i), int(j)))
    kinds: "OrderedDict[Any, MoleculeType]" = OrderedDict()
    atom_name = list(names)
    residue_name = [""] * n
    kind_of: list[MoleculeType] = []
    for m in range(len(members)):
        idx = members[m]
        local = {a: k for k, a in enumerate(idx)}
        sig_bonds = tuple(sorted(tuple(sorted((local[i], local[j]))) for i, j in bonds_of.get(m, [])))
        if source == "lammps":
            signature: Any = (tuple(types[a] for a in idx), sig_bonds)
        else:
            signature = (source_res[idx[0]], tuple(names[a] for a in idx))
        kind = kinds.get(signature)
        if kind is None:
            elems = [elements[a] for a in idx]
            mol_names = _generated_atom_names(elems) if source == "lammps" else [names[a] for a in idx]
            label = f"MOL{len(kinds) + 1}" if source == "lammps" else source_res[idx[0]]
            if source == "gromacs" and any(k.source_name == label for k in kinds.values()):
                raise TrajectoryImportError(
                    f"{where}: residue {label} (molecule {m + 1}) lists other atoms than the first {label}; "
                    "every molecule of a residue name must have the same atoms in the same order")
            kind = kinds[signature] = MoleculeType(label, _hill_formula(elems), mol_names, name=label)
        kind.count += 1
        kind_of.append(kind)
        for k, a in enumerate(idx):
            atom_name[a] = kind.atom_names[k]
    molecule_types = list(kinds.values())
    _apply_residue_names(molecule_types, residue_map or {}, mapping)
    for m, kind in enumerate(kind_of):
        for a in members[m]:
            residue_name[a] = kind.name
    for kind in molecule_types:
        if len(set(kind.atom_names)) != len(kind.atom_names):
            raise TrajectoryImportError(f"{where}: residue {kind.name} has repeated atom names; the mapping needs them unique")
    if not bonds.size and any(len(v) > 1 for v in members.values()):
        notes.append("the topology has no bonds: molecules are made whole around their first atom only")
    topology = TopologyInfo(atom_name, elements, masses, residue_name, molecule, bonds)
    return topology, molecule_types, notes


def _apply_residue_names(kinds: list[MoleculeType], residue_map: dict[str, str], mapping: Any | None) -> None:
    """Rename molecule types: ``--residue-map`` keys are source names or formulas; with a mapping,
    see :func:`_match_mapping`. Two types may share a name only if they have the same atoms."""
    by_key: dict[str, list[MoleculeType]] = {}
    for kind in kinds:
        by_key.setdefault(kind.source_name, []).append(kind)
        if kind.formula != kind.source_name:
            by_key.setdefault(kind.formula, []).append(kind)
    for key, new in residue_map.items():
        matched = by_key.get(key, [])
        if not matched:
            known = ", ".join(f"{k.source_name} ({k.formula})" for k in kinds)
            raise TrajectoryImportError(f"--residue-map {key}={new}: no molecule type {key} in the data; it has {known}")
        if len({id(k) for k in matched}) > 1:
            raise TrajectoryImportError(
                f"--residue-map {key}={new}: several molecule types have formula {key} "
                f"({', '.join(k.source_name for k in matched)}); name them by those")
        matched[0].name = new
    if mapping is not None:
        _match_mapping(kinds, {k.source_name for key in residue_map for k in by_key[key]}, mapping)
    named: dict[str, MoleculeType] = {}
    for kind in kinds:
        other = named.setdefault(kind.name, kind)
        if other.atom_names != kind.atom_names:
            raise TrajectoryImportError(
                f"--residue-map: {other.source_name} and {kind.source_name} are both named {kind.name} but have different atoms")


def _match_mapping(kinds: list[MoleculeType], renamed: set[str], mapping: Any) -> None:
    """Types not renamed whose name the mapping lacks take the mapping residue with exactly their
    atom list; then every type must be a mapping residue with the same atoms."""
    for kind in kinds:
        if kind.source_name in renamed or kind.name in mapping.residues:
            continue
        fits = [name for name, rm in mapping.residues.items() if list(rm.atoms) == kind.atom_names]
        if len(fits) == 1:
            kind.name = fits[0]
    for kind in kinds:
        rm = mapping.residues.get(kind.name)
        if rm is None:
            raise TrajectoryImportError(
                f"--residue-map: molecule type {kind.source_name} ({kind.formula}, {len(kind.atom_names)} atoms) is named "
                f"{kind.name}, which the mapping does not have ({', '.join(mapping.residues)}); map it, e.g. "
                f"--residue-map {kind.source_name}=NAME")
        if sorted(rm.atoms) != sorted(kind.atom_names):
            raise TrajectoryImportError(
                f"--residue-map: {kind.source_name} -> {kind.name} has atoms {' '.join(kind.atom_names)}, "
                f"the mapping's {kind.name} has {' '.join(rm.atoms)}")


def pdb_text(topology: TopologyInfo, positions_nm: np.ndarray, box_nm: np.ndarray) -> str:
    """PDB of one frame (with CONECT records), written by OpenMM as our own runs write theirs."""
    import io

    import openmm
    import openmm.app as app

    top = app.Topology()
    chain = top.addChain()
    residues: dict[int, Any] = {}
    atoms = []
    for i in range(topology.n_particles):
        r = int(topology.residue_index[i])
        if r not in residues:
            residues[r] = top.addResidue(topology.residue_name[i], chain)
        try:
            element = app.element.get_by_symbol(topology.element[i]) if topology.element[i] else None
        except KeyError:
            element = None
        atoms.append(top.addAtom(topology.atom_name[i], element, residues[r]))
    for i, j in topology.bonds:
        top.addBond(atoms[i], atoms[j])
    top.setPeriodicBoxVectors([openmm.Vec3(*row) for row in np.asarray(box_nm, dtype=float)])
    buffer = io.StringIO()
    app.PDBFile.writeFile(top, positions_nm * 10.0 * openmm.unit.angstrom, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Frames: units, box, unwrapping


class Unwrapper:
    """Makes molecules whole and continuous in time, chunk by chunk, shifting only by box vectors.

    Each molecule is first rebuilt along its bonds (``make_molecules_whole``); then its first atom
    is placed at the periodic image nearest to where its last step (minimum image) takes it, and the
    whole molecule moves with it by that lattice vector. Only lattice shifts are applied, so every
    frame stays an exact periodic image of the source configuration (forces still belong to it).
    """

    def __init__(self, residue_index: np.ndarray, bonds: np.ndarray) -> None:
        self.residue_index = np.asarray(residue_index)
        self.bonds = bonds
        _, self.roots = np.unique(self.residue_index, return_index=True)
        self.previous_raw: np.ndarray | None = None
        self.previous_placed: np.ndarray | None = None
        self.atoms_moved = 0  # atom-frames whose position changed (0: the source was already unwrapped)

    def __call__(self, positions: np.ndarray, box: np.ndarray) -> np.ndarray:
        whole = make_molecules_whole(positions, box, self.residue_index, self.bonds)
        anchors = whole[:, self.roots]
        for f in range(whole.shape[0]):
            shift = np.zeros_like(anchors[f])
            if self.previous_raw is not None:
                b = box[f : f + 1]
                target = self.previous_placed + minimum_image((anchors[f] - self.previous_raw)[None], b)[0]
                wanted = target - anchors[f]
                shift = wanted - minimum_image(wanted[None], b)[0]  # the lattice vector nearest to it
                whole[f] += shift[self.residue_index]
            self.previous_raw = anchors[f]
            self.previous_placed = anchors[f] + shift
        self.atoms_moved += int(np.count_nonzero(np.abs(whole - positions).max(axis=2) > 1e-6))
        return whole


@dataclass
class _Chunk:
    positions: list[np.ndarray] = field(default_factory=list)
    forces: list[np.ndarray] = field(default_factory=list)
    box: list[np.ndarray] = field(default_factory=list)
    time: list[float] = field(default_factory=list)


def iterate_frames(
    u: Any, source: str, units: UnitStyle, timestep: float | None, trajectory: Path,
    start: int = 0, stop: int | None = None, stride: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float] | None]:
    """(positions nm, forces kJ/mol/nm, box nm, time ps) per frame in OpenMM units; None for a
    frame that lacks positions or forces (GROMACS writes them at separate intervals)."""
    from MDAnalysis.lib.mdamath import triclinic_vectors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ts in u.trajectory[start:stop:stride]:
            if not ts.has_forces:
                if source == "lammps":
                    raise TrajectoryImportError(f"{trajectory}: the dump has no forces (columns fx fy fz); dump them with the positions")
                yield None
                continue
            if not ts.has_positions:
                yield None
                continue
            dims = ts.dimensions
            if dims is None or not np.all(np.asarray(dims[:3]) > 0):
                raise TrajectoryImportError(f"{trajectory}: frame {ts.frame} has no periodic box; the frames format needs one")
            box = triclinic_vectors(dims).astype(np.float64) * units.length_nm
            if source == "lammps":
                time = float(ts.data["step"]) * float(timestep) * units.time_ps
            else:
                time = float(ts.time) * units.time_ps
            yield (np.asarray(ts.positions, dtype=np.float64) * units.length_nm,
                   np.asarray(ts.forces, dtype=np.float64) * units.force_kj_mol_nm, box, time)


def import_trajectory(
    topology: str | Path,
    trajectory: str | Path,
    out: str | Path,
    temperature_K: float,
    source: str | None = None,
    units: str | None = None,
    residue_map: dict[str, str] | None = None,
    mapping: Any | None = None,
    timestep: float | None = None,
    atom_style: str | None = None,
    start: int = 0,
    stop: int | None = None,
    stride: int = 1,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``out/frames.h5``, ``out/topology.pdb`` and ``out/summary.json`` from a GROMACS or
    LAMMPS trajectory with forces; returns the summary. The run directory appears only when
    complete (written beside it, then renamed), so an interrupted import leaves nothing half-done
    and ``overwrite`` replaces an old one only then."""
    topology, trajectory, out = Path(topology), Path(trajectory), Path(out)
    source = source or guess_source(trajectory)
    if source not in SOURCES:
        raise TrajectoryImportError(f"--format {source}: unknown; one of {', '.join(SOURCES)}")
    style = unit_style(source, units)
    if not temperature_K > 0:
        raise TrajectoryImportError(f"--temperature must be positive (K), got {temperature_K}")
    if stride < 1 or start < 0:
        raise TrajectoryImportError(f"--stride must be >= 1 and --start >= 0, got stride {stride}, start {start}")
    if source == "lammps":
        timestep = LAMMPS_DEFAULT_TIMESTEP[style.name] if timestep is None else timestep
        if not timestep > 0:
            raise TrajectoryImportError(f"--lammps-timestep must be positive, got {timestep}")
    elif timestep is not None:
        raise TrajectoryImportError("--lammps-timestep: GROMACS files store their times; drop it")
    try:  # only an aa directory (ours or an earlier import) is ever replaced
        check_output_dir(out, "aa", overwrite=overwrite, resumable=False)
    except OutputDirError as exc:
        raise TrajectoryImportError(str(exc)) from None

    mda = _mdanalysis()
    u, notes = open_universe(source, topology, trajectory, atom_style)
    top, kinds, topology_notes = build_topology(u, source, residue_map, mapping, where=str(topology))
    notes += topology_notes
    log(f"import: {topology.name} + {trajectory.name} ({source}), {top.n_particles} atoms, {top.n_residues} molecules")
    for kind in kinds:
        log(f"  {kind.describe()}")
    log(f"  {style.describe()}")
    if source == "lammps":
        log(f"  time: dump step x {timestep:g} {style.native['time']} (--lammps-timestep; LAMMPS default for units {style.name}: "
            f"{LAMMPS_DEFAULT_TIMESTEP[style.name]:g})")

    staging = staging_dir(out)  # emptied: what an interrupted import left is never a finished result
    write_marker(staging, "aa")
    metadata = {
        "kind": "aa", "temperature_K": float(temperature_K), "forcefield": f"imported from {source}",
        "source": {"format": source, "topology": str(topology.resolve()), "trajectory": str(trajectory.resolve()),
                   "frames": {"start": start, "stop": stop, "stride": stride},
                   "units": style.as_metadata(),
                   "lammps_timestep": timestep,
                   "molecule_types": [{"source": k.source_name, "name": k.name, "formula": k.formula, "count": k.count,
                                       "atoms": len(k.atom_names)} for k in kinds],
                   "notes": notes},
        "unwrapped": "molecules made whole along bonds and continuous in time (lattice shifts only)",
        "versions": {"MDAnalysis": mda.__version__, "openmm_cgnn": __version__},
    }
    unwrapper = Unwrapper(top.residue_index, top.bonds)
    chunk_frames = max(1, min(64, CHUNK_VALUES // (3 * max(top.n_particles, 1))))
    skipped = 0
    writer: FrameWriter | None = None
    chunk = _Chunk()

    def flush() -> None:
        nonlocal writer
        if not chunk.time:
            return
        positions = unwrapper(np.stack(chunk.positions), np.stack(chunk.box))
        if writer is None:
            top.pdb = pdb_text(top, positions[0], chunk.box[0])
            (staging / TOPOLOGY_PDB).write_text(top.pdb)
            writer = FrameWriter(staging / FRAMES_H5, top, metadata, with_forces=True)
        for k in range(len(chunk.time)):
            writer.append(positions[k], chunk.box[k], chunk.time[k], forces=chunk.forces[k])
        chunk.positions.clear(), chunk.forces.clear(), chunk.box.clear(), chunk.time.clear()

    try:
        for frame in iterate_frames(u, source, style, timestep, trajectory, start, stop, stride):
            if frame is None:
                skipped += 1
                continue
            positions, forces, box, time = frame
            if not (np.isfinite(positions).all() and np.isfinite(forces).all()):
                raise TrajectoryImportError(f"{trajectory}: frame at t = {time:g} ps has NaN or infinite positions or forces")
            chunk.positions.append(positions), chunk.forces.append(forces), chunk.box.append(box), chunk.time.append(time)
            if len(chunk.time) >= chunk_frames:
                flush()
        flush()
        if writer is None:
            what = "frames with forces" if skipped else "frames"
            raise TrajectoryImportError(
                f"{trajectory}: no {what} in the range {start}:{stop}:{stride}"
                + ("; GROMACS writes forces with nstfout > 0" if skipped and source == "gromacs" else ""))
        n_frames = writer.n_frames
        writer.close()
        summary = {
            "format": "openmm_cgnn.import/1", "n_frames": n_frames, "n_atoms": top.n_particles,
            "n_molecules": top.n_residues, "frames_without_forces_skipped": skipped,
            "atom_frames_reimaged": unwrapper.atoms_moved, "temperature_K": float(temperature_K),
            "files": {"frames": FRAMES_H5, "topology": TOPOLOGY_PDB}, **{k: metadata[k] for k in ("source", "unwrapped")},
        }
        (staging / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)
    if skipped:
        log(f"  skipped {skipped} frames without positions or forces")
    log(f"  unwrapping re-imaged {unwrapper.atoms_moved} atom-frames" if unwrapper.atoms_moved
        else "  the source was already whole and unwrapped")
    for note in notes:
        log(f"  note: {note}")
    return summary
