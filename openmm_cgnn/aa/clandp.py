"""Parser for the CL&P ionic-liquid force field (``il.ff``) and its z-matrix molecule files.

This module only reads text and does geometry: no OpenMM import, so the converter's logic is
testable on its own. ``openmm_cgnn.aa.convert`` turns the result into OpenMM package data.

File formats (those of the CL&P distribution, as read by its ``fftool``):

* ``il.ff``: sections ``ATOMS``, ``BONDS``, ``ANGLES``, ``DIHEDRALS``, ``IMPROPER``; ``#`` starts a
  comment. Non-bonded parameters belong to the atom *type* (``C1A``); bonded parameters to its
  bonded class, the second column of ``ATOMS`` (``CT``). Units: kJ/mol, Angstrom, degrees,
  charges in e. Bonds and angles are ``k/2 (x - x0)^2``; a ``cons`` bond is constrained.
  Dihedrals and impropers are OPLS Fourier series
  ``E = 1/2 [V1 (1 + cos p) + V2 (1 - cos 2p) + V3 (1 + cos 3p) + V4 (1 - cos 4p)]``.
* ``*.zmat``: a title line (``#`` comment lines may come first), then a block of atom lines
  ``[index] type [i r [j angle [k dihedral]]]`` ending at the first blank line (the atom is
  bonded to ``i``; the index is optional, as in fftool), then optional ``name = value``
  variables usable in place of numbers, ``connect i j`` (extra bonds closing rings),
  ``improper i j k l`` (central atom third) and the force-field file name.

CL&P conventions applied when a molecule is typed (those of the CL&P authors' ``fftool``):

* Bonds come from the z-matrix and ``connect`` lines; angles and proper dihedrals from the bond
  graph. A missing bond, angle or dihedral parameter is an error (fftool drops the term).
* An angle whose z-matrix geometry is ``ANGLE_TOLERANCE_DEG`` or more from its il.ff equilibrium
  is dropped with a warning: the bond graph of an octahedron (PF6) has trans F-P-F angles at
  180 degrees that the 90 degree F-P-F term was never meant for.
* Impropers: those of the z-matrix, or, when it lists none, one on every atom with exactly three
  bonded neighbours. Either way the central atom is third and the outer atoms are put in the
  order of the il.ff entry they match (any order of the outer atoms may match). An automatic
  improper with no il.ff entry is skipped with a warning (a pyramidal centre has none).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FOURIER_TERMS = 4  # OPLS V1..V4
# fftool's AngleTol: an angle this far from its il.ff equilibrium in the z-matrix geometry is not
# meant to carry that term (the trans F-P-F pairs of PF6 sit at 180 degrees, the term at 90).
ANGLE_TOLERANCE_DEG = 15.0
# fftool's BondTol: a bond this far from its il.ff length in the z-matrix geometry is reported (the
# term is kept); one more than BOND_ERROR_NM off is taken for a wrong z-matrix reference or 'connect'.
BOND_TOLERANCE_NM = 0.025
BOND_ERROR_NM = 0.05
# The outer-atom orders tried against il.ff, as positions in (i, j, l) of an improper i j k l, in
# fftool's order: identity first, so atoms of equal class keep the z-matrix's order.
_IMPROPER_ORDERS = ((0, 1, 2), (1, 0, 2), (0, 2, 1), (2, 0, 1), (1, 2, 0), (2, 1, 0))


class ClandpError(ValueError):
    """A parameter or molecule file is malformed or lacks a parameter; names the file and line."""


class ClandpWarning(UserWarning):
    """A CL&P convention changed a term of the molecule (a dropped angle, a skipped improper)."""


# --------------------------------------------------------------------------- il.ff


@dataclass(frozen=True)
class AtomType:
    name: str
    bonded_class: str
    mass: float  # amu
    charge: float  # e
    sigma_nm: float
    epsilon_kj_mol: float
    line: int


@dataclass(frozen=True)
class BondType:
    classes: tuple[str, str]
    length_nm: float
    k_kj_mol_nm2: float
    constrained: bool
    line: int


@dataclass(frozen=True)
class AngleType:
    classes: tuple[str, str, str]
    theta_rad: float
    k_kj_mol_rad2: float
    line: int


@dataclass(frozen=True)
class TorsionType:
    """OPLS Fourier coefficients V1..V4 in kJ/mol (dihedral or improper)."""

    classes: tuple[str, str, str, str]
    v: tuple[float, float, float, float]
    line: int


@dataclass
class ForceFieldFile:
    path: Path
    version: str
    atoms: dict[str, AtomType] = field(default_factory=dict)
    bonds: dict[tuple[str, str], BondType] = field(default_factory=dict)
    angles: dict[tuple[str, str, str], AngleType] = field(default_factory=dict)
    dihedrals: dict[tuple[str, str, str, str], TorsionType] = field(default_factory=dict)
    impropers: dict[tuple[str, str, str, str], TorsionType] = field(default_factory=dict)

    # Look-ups accept either direction, as the file lists each term once.
    def bond(self, a: str, b: str) -> BondType | None:
        return self.bonds.get((a, b)) or self.bonds.get((b, a))

    def angle(self, a: str, b: str, c: str) -> AngleType | None:
        return self.angles.get((a, b, c)) or self.angles.get((c, b, a))

    def dihedral(self, a: str, b: str, c: str, d: str) -> TorsionType | None:
        return self.dihedrals.get((a, b, c, d)) or self.dihedrals.get((d, c, b, a))

    def improper(self, a: str, b: str, central: str, d: str) -> tuple[TorsionType, tuple[int, int, int, int]] | None:
        """The il.ff entry for an improper of these classes and the atom order that matches it.

        The outer atoms may be in any order (central stays third); the order returned, as
        positions in ``(a, b, central, d)``, lists the atoms as the il.ff entry does.
        """
        outer = (a, b, d)
        for order in _IMPROPER_ORDERS:
            p, q, r = (outer[n] for n in order)
            found = self.impropers.get((p, q, central, r))
            if found is not None:
                positions = (0, 1, 3)
                return found, (positions[order[0]], positions[order[1]], 2, positions[order[2]])
        return None


_SECTIONS = {"ATOMS", "BONDS", "ANGLES", "DIHEDRALS", "IMPROPER", "IMPROPERS"}


def _floats(values: list[str], where: str, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ClandpError(f"{where}: {what} must be numbers, got {' '.join(values)!r}") from None


def parse_forcefield(path: str | Path) -> ForceFieldFile:
    """Read an ``il.ff`` file. Units are converted to OpenMM's (nm, rad)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClandpError(f"{path}: cannot read force-field file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ClandpError(f"{path}: not a text file") from None
    ff = ForceFieldFile(path=path, version="")
    section = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if lineno == 1 and "version" in raw:
            ff.version = raw.split("version", 1)[1].strip()
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path}:{lineno}"
        if len(fields) == 1 and fields[0] in _SECTIONS:
            section = "IMPROPER" if fields[0] == "IMPROPERS" else fields[0]
            continue
        if section is None:
            raise ClandpError(f"{where}: data before the first section header (ATOMS, BONDS, ...)")
        _parse_entry(ff, section, fields, where, lineno)
    if not ff.atoms:
        raise ClandpError(f"{path}: no ATOMS section with entries; not a CL&P force-field file?")
    return ff


def _store(table: dict, key, value, where: str, reverse=None) -> None:
    for k in (key, reverse):
        if k is not None and k in table:
            label = key if isinstance(key, str) else "-".join(key)
            raise ClandpError(f"{where}: duplicate entry {label} (first at line {table[k].line})")
    table[key] = value


def _parse_entry(ff: ForceFieldFile, section: str, fields: list[str], where: str, lineno: int) -> None:
    if section == "ATOMS":
        if len(fields) != 7:
            raise ClandpError(f"{where}: ATOMS line needs 7 fields (type class mass charge lj sigma eps)")
        name, cls, pot = fields[0], fields[1], fields[4]
        if pot != "lj":
            raise ClandpError(f"{where}: unsupported non-bonded potential {pot!r} for {name} (only 'lj')")
        mass, charge, sigma, eps = _floats([fields[2], fields[3], fields[5], fields[6]], where, "mass, charge, sigma, epsilon")
        if mass <= 0 or sigma < 0 or eps < 0:
            raise ClandpError(f"{where}: atom type {name} needs mass > 0, sigma >= 0, epsilon >= 0")
        _store(ff.atoms, name, AtomType(name, cls, mass, charge, sigma / 10.0, eps, lineno), where)
    elif section == "BONDS":
        if len(fields) != 5:
            raise ClandpError(f"{where}: BONDS line needs 5 fields (i j pot r0 k)")
        if fields[2] not in ("harm", "cons"):
            raise ClandpError(f"{where}: unknown bond potential {fields[2]!r} (expected harm or cons)")
        r0, k = _floats(fields[3:5], where, "r0 and k")
        key = (fields[0], fields[1])
        # kJ/mol/A^2 -> kJ/mol/nm^2; both files and OpenMM use the k/2 (r - r0)^2 form.
        _store(ff.bonds, key, BondType(key, r0 / 10.0, k * 100.0, fields[2] == "cons", lineno), where, key[::-1])
    elif section == "ANGLES":
        if len(fields) != 6:
            raise ClandpError(f"{where}: ANGLES line needs 6 fields (i j k pot theta k)")
        if fields[3] != "harm":
            raise ClandpError(f"{where}: unsupported angle potential {fields[3]!r} (only harm)")
        theta, k = _floats(fields[4:6], where, "theta and k")
        key = (fields[0], fields[1], fields[2])
        _store(ff.angles, key, AngleType(key, math.radians(theta), k, lineno), where, key[::-1])
    else:  # DIHEDRALS, IMPROPER
        if len(fields) != 5 + FOURIER_TERMS:
            raise ClandpError(f"{where}: {section} line needs 9 fields (i j k l opls V1 V2 V3 V4)")
        if fields[4] != "opls":
            raise ClandpError(f"{where}: unsupported {section.lower()} potential {fields[4]!r} (only opls)")
        v = tuple(_floats(fields[5:9], where, "V1..V4"))
        key = tuple(fields[:4])
        table = ff.dihedrals if section == "DIHEDRALS" else ff.impropers
        _store(table, key, TorsionType(key, v, lineno), where, key[::-1] if section == "DIHEDRALS" else None)


# --------------------------------------------------------------------------- z-matrix


@dataclass
class ZmatAtom:
    type_name: str
    refs: list[int]  # 0-based: bonded atom, angle atom, dihedral atom (as many as given)
    values: list[float]  # Angstrom, degrees
    line: int


@dataclass
class ZMatrix:
    path: Path
    title: str
    atoms: list[ZmatAtom]
    connects: list[tuple[int, int]]  # 0-based
    impropers: list[tuple[int, int, int, int]]  # 0-based, central atom third
    forcefield_file: str | None


def parse_zmat(path: str | Path) -> ZMatrix:
    """Read a z-matrix file; anything this converter cannot represent is a one-line error."""
    path = Path(path)
    if path.suffix.lower() != ".zmat":
        raise ClandpError(f"{path}: unsupported molecule file format {path.suffix or '(none)'!r}: only z-matrix "
                          "(.zmat) files convert; .xyz/.mol/.pdb files would need bonds guessed from distances")
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ClandpError(f"{path}: cannot read z-matrix file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ClandpError(f"{path}: not a text file") from None
    numbered = [(n, raw) for n, raw in enumerate(lines, start=1)]
    # The title is the first line that is not a comment; blank lines and comments may follow it.
    while numbered and numbered[0][1].lstrip().startswith("#"):
        numbered.pop(0)
    if not numbered or not numbered[0][1].strip():
        raise ClandpError(f"{path}:{numbered[0][0] if numbered else 1}: the first line (after comments) must be "
                          "the molecule's title")
    title = numbered.pop(0)[1].split("#", 1)[0].strip()
    while numbered and not numbered[0][1].split("#", 1)[0].strip():
        numbered.pop(0)
    # The atom block runs up to the first blank line (comment lines inside it are skipped).
    atom_lines: list[tuple[int, list[str]]] = []
    while numbered and numbered[0][1].strip():
        lineno, raw = numbered.pop(0)
        fields = raw.split("#", 1)[0].split()
        if fields:
            atom_lines.append((lineno, fields))
    if not atom_lines:
        raise ClandpError(f"{path}: no atom lines after the title")
    variables: dict[str, float] = {}
    connects: list[tuple[int, int]] = []
    impropers: list[tuple[int, int, int, int]] = []
    ff_file = None
    for lineno, raw in numbered:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.replace("=", " = ").split()
        where = f"{path}:{lineno}"
        if len(fields) == 3 and fields[1] == "=":
            variables[fields[0]] = _floats([fields[2]], where, "variable value")[0]
        elif fields[0].lower() in ("var", "variables") and len(fields) == 1:
            continue  # optional header of the variables (fftool)
        elif fields[0] in ("connect", "improper"):
            n = 2 if fields[0] == "connect" else 4
            if len(fields) != n + 1:
                raise ClandpError(f"{where}: '{fields[0]}' needs {n} atom indices")
            idx = _indices(fields[1:], where)
            (connects if n == 2 else impropers).append(tuple(idx))
        elif fields[0] == "reconnect":
            raise ClandpError(f"{where}: unsupported construct 'reconnect' (bonds guessed from distances); "
                              "list the bonds with 'connect' lines instead")
        elif len(fields) == 1 and ff_file is None and "." in fields[0]:
            ff_file = fields[0]
        else:
            raise ClandpError(f"{where}: cannot read {line!r} (after the atom block, which ends at the first blank "
                              "line: 'connect', 'improper', 'name = value' or the force-field file name)")
    with_index = atom_lines[0][1][0].isdigit()
    atoms = []
    for lineno, fields in atom_lines:
        where = f"{path}:{lineno}"
        if fields[0].isdigit() != with_index:
            raise ClandpError(f"{where}: atom lines must all start with their index or none may")
        atoms.append(_zmat_atom(fields, with_index, len(atoms), variables, where, lineno))
    for kind, group in (("connect", connects), ("improper", impropers)):
        for idx in group:
            if max(idx) >= len(atoms) or len(set(idx)) != len(idx):
                raise ClandpError(f"{path}: {kind} {' '.join(str(i + 1) for i in idx)} names a missing or repeated atom")
    return ZMatrix(path, title, atoms, connects, impropers, ff_file)


def _indices(values: list[str], where: str) -> list[int]:
    try:
        idx = [int(v) - 1 for v in values]
    except ValueError:
        raise ClandpError(f"{where}: atom indices must be integers, got {' '.join(values)!r}") from None
    if min(idx) < 0:
        raise ClandpError(f"{where}: atom indices start at 1")
    return idx


def _zmat_atom(fields: list[str], with_index: bool, n_before: int, variables: dict[str, float], where: str,
               lineno: int) -> ZmatAtom:
    if with_index:
        if int(fields[0]) != n_before + 1:
            raise ClandpError(f"{where}: atom index {fields[0]} out of order (expected {n_before + 1})")
        fields = fields[1:]
    expected = 1 + 2 * min(n_before, 3)
    if len(fields) != expected:
        raise ClandpError(f"{where}: atom {n_before + 1} needs {expected + with_index} fields ("
                          + "index " * with_index + "type" + " ref value" * min(n_before, 3) + ")")
    refs = _indices(fields[1::2], where) if n_before else []
    values = []
    for v in fields[2::2]:
        if v in variables:
            values.append(variables[v])
        elif v[0].isalpha():
            raise ClandpError(f"{where}: variable {v!r} is not defined ('{v} = value' after the atom block)")
        else:
            values.extend(_floats([v], where, "bond length, angle and dihedral"))
    if any(r >= n_before for r in refs) or len(set(refs)) != len(refs):
        raise ClandpError(f"{where}: atom {n_before + 1} refers to a later or repeated atom")
    return ZmatAtom(fields[0], refs, values, lineno)


def zmat_coordinates(zmat: ZMatrix) -> np.ndarray:
    """Cartesian coordinates (nm) from the internal coordinates (NeRF construction)."""
    xyz = np.zeros((len(zmat.atoms), 3))
    for i, atom in enumerate(zmat.atoms):
        if i == 0:
            continue
        r = atom.values[0] / 10.0
        a = xyz[atom.refs[0]]
        if i == 1:
            xyz[i] = a + [0.0, 0.0, r]
            continue
        theta = math.radians(atom.values[1])
        b = xyz[atom.refs[1]]
        # Third atom: any reference direction not along a-b fixes the (arbitrary) frame.
        c = xyz[atom.refs[2]] if i > 2 else b + _perpendicular(a - b)
        phi = math.radians(atom.values[2]) if i > 2 else 0.0
        bc = (a - b) / np.linalg.norm(a - b)
        n = np.cross(b - c, bc)
        if np.linalg.norm(n) < 1e-8:  # c on the a-b line: the dihedral is undefined, pick a plane
            n = np.cross(_perpendicular(bc), bc)
        n /= np.linalg.norm(n)
        m = np.cross(n, bc)
        local = np.array([-r * math.cos(theta), r * math.sin(theta) * math.cos(phi), r * math.sin(theta) * math.sin(phi)])
        xyz[i] = a + local[0] * bc + local[1] * m + local[2] * n
    return xyz


def _perpendicular(v: np.ndarray) -> np.ndarray:
    trial = np.array([1.0, 0.0, 0.0]) if abs(v[0]) < 0.9 * np.linalg.norm(v) else np.array([0.0, 1.0, 0.0])
    return np.cross(v, trial)


# --------------------------------------------------------------------------- typed molecule


@dataclass
class TypedMolecule:
    """A z-matrix molecule with every bonded term resolved against the force field."""

    zmat: ZMatrix
    atom_types: list[AtomType]
    bonds: list[tuple[int, int, BondType]]
    angles: list[tuple[int, int, int, AngleType]]
    dihedrals: list[tuple[int, int, int, int, TorsionType]]
    impropers: list[tuple[int, int, int, int, TorsionType]]  # central atom third, in il.ff's order
    coordinates_nm: np.ndarray
    # Bonded triples whose angle term was dropped (geometry far from il.ff): (i, j, k, term, angle rad)
    dropped_angles: list[tuple[int, int, int, AngleType, float]] = field(default_factory=list)
    automatic_impropers: bool = False  # the z-matrix listed none; one per three-neighbour atom
    notes: list[str] = field(default_factory=list)  # the warnings issued while typing

    @property
    def charge(self) -> float:
        return sum(t.charge for t in self.atom_types)


def bond_graph(zmat: ZMatrix) -> list[tuple[int, int]]:
    """Each atom is bonded to its first z-matrix reference; ``connect`` lines add ring closures."""
    bonds = {tuple(sorted((i, atom.refs[0]))) for i, atom in enumerate(zmat.atoms) if atom.refs}
    bonds.update(tuple(sorted(c)) for c in zmat.connects)
    return sorted(bonds)


def angles_and_dihedrals(n_atoms: int, bonds: list[tuple[int, int]]):
    neighbours: list[set[int]] = [set() for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].add(j)
        neighbours[j].add(i)
    angles = [(i, j, k) for j in range(n_atoms) for i, k in itertools.combinations(sorted(neighbours[j]), 2)]
    dihedrals = []
    for j, k in bonds:
        for i in sorted(neighbours[j] - {k}):
            for l in sorted(neighbours[k] - {j}):
                if i != l:  # a three-membered ring would repeat an atom
                    dihedrals.append((i, j, k, l))
    return angles, dihedrals


def automatic_impropers(zmat: ZMatrix) -> list[tuple[int, int, int, int]]:
    """One improper per atom with exactly three bonded neighbours, central atom third.

    The outer atoms are listed as fftool lists them (z-matrix bonds by atom index, then the
    ``connect`` partners in file order); matching il.ff reorders them, so this order only decides
    between atoms of the same class.
    """
    neighbours: list[list[int]] = [[] for _ in zmat.atoms]
    for i, atom in enumerate(zmat.atoms):
        if atom.refs:
            neighbours[i].append(atom.refs[0])
            neighbours[atom.refs[0]].append(i)
    for i, j in zmat.connects:
        neighbours[i].append(j)
        neighbours[j].append(i)
    return [(n[0], n[1], centre, n[2]) for centre, n in enumerate(neighbours) if len(n) == 3]


def _bond_angle(xyz: np.ndarray, i: int, j: int, k: int) -> float:
    u, v = xyz[i] - xyz[j], xyz[k] - xyz[j]
    return math.acos(float(np.clip(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0)))


def type_molecule(zmat: ZMatrix, ff: ForceFieldFile) -> TypedMolecule:
    """Resolve every atom type and bonded term with CL&P's conventions (module docstring).

    A missing parameter is a one-line error naming the files, atoms, types and classes; a
    convention that changes a term (a dropped angle, a skipped automatic improper) issues a
    ``ClandpWarning`` naming the molecule and the atoms.
    """
    types = []
    for i, atom in enumerate(zmat.atoms):
        if atom.type_name not in ff.atoms:
            raise ClandpError(f"{zmat.path}:{atom.line}: atom {i + 1} has type {atom.type_name!r}, "
                              f"which is not in the ATOMS section of {ff.path}")
        types.append(ff.atoms[atom.type_name])
    cls = [t.bonded_class for t in types]

    def label(idx: tuple[int, ...]) -> str:
        return (f"atoms {'-'.join(str(i + 1) for i in idx)}, "
                f"types {'-'.join(zmat.atoms[i].type_name for i in idx)} in {zmat.path}")

    def resolve(section: str, terms: list[tuple[int, ...]], lookup) -> list:
        """Typed terms; every missing class combination reported in one line."""
        found, missing = [], {}
        for idx in terms:
            p = lookup(idx)
            if p is None:
                missing.setdefault(" ".join(cls[i] for i in idx), idx)
            else:
                found.append((idx, p))
        if missing:
            (classes, idx), *more = missing.items()
            also = f"; also {', '.join(c for c, _ in more)}" if more else ""
            raise ClandpError(f"{ff.path}: no {section} entry for classes {classes} ({label(idx)}){also}")
        return found

    bonds = bond_graph(zmat)
    angle_idx, dihedral_idx = angles_and_dihedrals(len(types), bonds)
    coords = zmat_coordinates(zmat)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warnings.warn(message, ClandpWarning, stacklevel=3)

    typed_bonds = [(*idx, p) for idx, p in resolve("BONDS", bonds, lambda idx: ff.bond(*(cls[i] for i in idx)))]
    for i, j, p in typed_bonds:
        d = np.linalg.norm(coords[i] - coords[j])
        if abs(d - p.length_nm) > BOND_ERROR_NM:
            raise ClandpError(f"{zmat.path}: atoms {i + 1} and {j + 1} are bonded but {d:.3f} nm apart in the "
                              f"z-matrix geometry (bond length {p.length_nm:.3f} nm); check 'connect' lines")
        if abs(d - p.length_nm) >= BOND_TOLERANCE_NM:
            note(f"{zmat.path.name} ({zmat.title}): bond {'-'.join(p.classes)} of atoms {i + 1}-{j + 1} is "
                 f"{d * 10:.3f} A in the z-matrix geometry, il.ff length {p.length_nm * 10:.3f} A (the term is kept; "
                 "only the starting geometry is strained)")

    typed_angles, dropped = [], []
    for (i, j, k), p in resolve("ANGLES", angle_idx, lambda idx: ff.angle(*(cls[n] for n in idx))):
        theta = _bond_angle(coords, i, j, k)
        if abs(math.degrees(theta - p.theta_rad)) >= ANGLE_TOLERANCE_DEG:
            dropped.append((i, j, k, p, theta))
            note(f"{zmat.path.name} ({zmat.title}): angle {'-'.join(p.classes)} of atoms {i + 1}-{j + 1}-{k + 1} "
                 f"dropped: {math.degrees(theta):.2f} deg in the z-matrix geometry, il.ff equilibrium "
                 f"{math.degrees(p.theta_rad):.2f} deg (tolerance {ANGLE_TOLERANCE_DEG:g} deg)")
        else:
            typed_angles.append((i, j, k, p))
    typed_dihedrals = [(*idx, p) for idx, p in
                       resolve("DIHEDRALS", dihedral_idx, lambda idx: ff.dihedral(*(cls[i] for i in idx)))]

    def improper(idx: tuple[int, ...]):
        match = ff.improper(*(cls[i] for i in idx))
        return None if match is None else (tuple(idx[n] for n in match[1]), match[0])

    automatic = not zmat.impropers
    if automatic:
        typed_impropers = []
        for idx in automatic_impropers(zmat):
            match = improper(idx)
            if match is None:
                note(f"{zmat.path.name} ({zmat.title}): no improper on atom {idx[2] + 1} ({types[idx[2]].name}, "
                     f"three neighbours): il.ff has no IMPROPER entry for classes {' '.join(cls[i] for i in idx)} "
                     "in any order of the outer atoms")
            else:
                typed_impropers.append((*match[0], match[1]))
    else:
        typed_impropers = [(*order, p) for _, (order, p) in resolve("IMPROPER", zmat.impropers, improper)]
    return TypedMolecule(zmat, types, typed_bonds, typed_angles, typed_dihedrals, typed_impropers, coords,
                         dropped, automatic, notes)


def fourier_to_periodic(v: tuple[float, ...]) -> list[tuple[int, float, float]]:
    """OPLS V1..V4 as OpenMM periodic terms ``k (1 + cos(n phi - phase))``, zero terms dropped.

    ``V_n/2 (1 + cos n phi)`` for odd n and ``V_n/2 (1 - cos n phi) = V_n/2 (1 + cos(n phi - pi))``
    for even n.
    """
    return [(n, 0.0 if n % 2 else math.pi, vn / 2.0) for n, vn in enumerate(v, start=1) if vn != 0.0]
