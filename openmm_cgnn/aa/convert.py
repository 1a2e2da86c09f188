"""Convert CL&P molecules (``il.ff`` + z-matrices) into OpenMM package data.

Regenerate the shipped data with::

    python -m openmm_cgnn.aa.convert --clandp-dir data/clandp --out openmm_cgnn/aa/data

``data/clandp`` holds the CL&P repository's files (MIT licence; see its README). Any ion with a
z-matrix and parameters in ``il.ff`` converts; name its residue with ``--molecule FILE=RESNAME``
(repeatable). A construct the converter cannot represent (a missing il.ff parameter, bonds to be
guessed from distances, a non-z-matrix file) is a one-line error naming the file. Conventions
that change a term (a dropped angle) are printed as warnings. Output in ``--out``:

* ``forcefield.xml``: an OpenMM ``ForceField`` file (atom types, residue templates, bonds,
  angles, proper torsions, charges and LJ parameters) plus a ``<CLandP>`` element that OpenMM's
  own loader ignores: the residue list, the constrained bonds, the impropers (z-matrix or
  automatic, in il.ff's atom order) and the dropped angles (bonded triples far from their il.ff
  equilibrium, e.g. trans F-P-F in PF6; see ``openmm_cgnn.aa.clandp``).
  ``openmm_cgnn.aa.build_system`` applies all of CL&P (geometric mixing, impropers,
  constraints, dropped angles); plain ``ForceField.createSystem`` on this file does not.
* ``RES.pdb``: each residue's geometry built from its z-matrix (PDB keeps only 3 characters of
  a residue name; the XML holds the full one).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shlex
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from ..io import write_text_atomic
from ..layout import FORCEFIELD_XML
from .clandp import ClandpError, ClandpWarning, ForceFieldFile, TypedMolecule, fourier_to_periodic, parse_forcefield, parse_zmat, type_molecule

# The molecules of the package's default data (aa/data); other ions are named with --molecule.
DEFAULT_MOLECULES = {"c4c1im.zmat": "BMIM", "BF4.zmat": "BF4"}
LJ14_SCALE = COULOMB14_SCALE = 0.5


def element_for_mass(mass: float, where: str):
    from openmm import unit
    from openmm.app import element

    def distance(e) -> float:
        return abs(e.mass.value_in_unit(unit.dalton) - mass)

    # Only the atomic mass identifies the element in il.ff.
    best = min((e for e in element.Element._elements_by_symbol.values() if e.mass is not None), key=distance)
    if distance(best) > 0.1:
        raise ClandpError(f"{where}: no element has mass {mass} amu")
    return best


def atom_names(molecule: TypedMolecule, elements) -> list[str]:
    """Element symbol + z-matrix index (``N1``, ``C2``, ...), per-element counters if over 4 chars."""
    names = [f"{e.symbol}{i + 1}" for i, e in enumerate(elements)]
    if max(len(n) for n in names) <= 4:
        return names
    counts: dict[str, int] = {}
    out = []
    for e in elements:
        counts[e.symbol] = counts.get(e.symbol, 0) + 1
        out.append(f"{e.symbol}{counts[e.symbol]}")
    return out


def _fmt(x: float) -> str:
    return format(float(x), ".12g")  # round-trips the file's digits, drops float noise from unit changes


def _torsion_attrib(v) -> dict[str, str]:
    attrib = {}
    for n, (periodicity, phase, k) in enumerate(fourier_to_periodic(v), start=1):
        attrib.update({f"periodicity{n}": str(periodicity), f"phase{n}": _fmt(phase), f"k{n}": _fmt(k)})
    return attrib


def build_xml(ff: ForceFieldFile, molecules: dict[str, TypedMolecule], command: str) -> tuple[ET.ElementTree, dict[str, list]]:
    """The ForceField XML and, per residue, (atom names, elements) for the PDB files."""
    root = ET.Element("ForceField")
    info = ET.SubElement(root, "Info")
    digest = hashlib.sha256(ff.path.read_bytes()).hexdigest()
    ET.SubElement(info, "Source").text = f"CL&P {ff.path.name} version {ff.version} sha256 {digest}"
    ET.SubElement(info, "Reference").text = ("J. N. Canongia Lopes, A. A. H. Padua, J. Phys. Chem. B 108, 2038 (2004); "
                                             "110, 19586 (2006)")
    ET.SubElement(info, "Command").text = command
    ET.SubElement(info, "Note").text = ("Use openmm_cgnn.aa.build_system: CL&P mixes LJ geometrically and has the "
                                        "impropers, constraints and dropped angles of the CLandP element, which plain "
                                        "ForceField.createSystem does not apply.")
    types_el = ET.SubElement(root, "AtomTypes")
    residues_el = ET.SubElement(root, "Residues")
    bonds_el = ET.SubElement(root, "HarmonicBondForce")
    angles_el = ET.SubElement(root, "HarmonicAngleForce")
    torsions_el = ET.SubElement(root, "PeriodicTorsionForce")
    nonbonded_el = ET.SubElement(root, "NonbondedForce", coulomb14scale=_fmt(COULOMB14_SCALE), lj14scale=_fmt(LJ14_SCALE))
    clandp_el = ET.SubElement(root, "CLandP", mixing="geometric", lj14scale=_fmt(LJ14_SCALE),
                              coulomb14scale=_fmt(COULOMB14_SCALE), source=ff.path.name, version=ff.version)
    seen_types: set[str] = set()
    seen_terms: set[tuple] = set()
    names_elements: dict[str, list] = {}

    def once(key: tuple) -> bool:
        canonical = min(key, key[::-1])
        if canonical in seen_terms:
            return False
        seen_terms.add(canonical)
        return True

    for resname, mol in molecules.items():
        where = str(mol.zmat.path)
        elements = [element_for_mass(t.mass, f"{ff.path}:{t.line}") for t in mol.atom_types]
        names = atom_names(mol, elements)
        names_elements[resname] = (names, elements)
        res_el = ET.SubElement(residues_el, "Residue", name=resname)
        for name, t, e in zip(names, mol.atom_types, elements):
            ET.SubElement(res_el, "Atom", name=name, type=t.name)
            if t.name not in seen_types:
                seen_types.add(t.name)
                ET.SubElement(types_el, "Type", name=t.name, attrib={"class": t.bonded_class, "element": e.symbol,
                                                                     "mass": _fmt(t.mass)})
                ET.SubElement(nonbonded_el, "Atom", type=t.name, charge=_fmt(t.charge), sigma=_fmt(t.sigma_nm),
                              epsilon=_fmt(t.epsilon_kj_mol))
        ET.SubElement(clandp_el, "Residue", name=resname, pdb=f"{resname}.pdb", zmat=mol.zmat.path.name,
                      title=mol.zmat.title, charge=_fmt(round(mol.charge, 6)))
        for i, j, p in mol.bonds:
            ET.SubElement(res_el, "Bond", atomName1=names[i], atomName2=names[j])
            if once(p.classes):
                ET.SubElement(bonds_el, "Bond", class1=p.classes[0], class2=p.classes[1], length=_fmt(p.length_nm),
                              k=_fmt(p.k_kj_mol_nm2))
            if p.constrained:
                ET.SubElement(clandp_el, "Constraint", residue=resname, atomName1=names[i], atomName2=names[j],
                              length=_fmt(p.length_nm))
        for i, j, k, p in mol.angles:
            if once(p.classes):
                ET.SubElement(angles_el, "Angle", class1=p.classes[0], class2=p.classes[1], class3=p.classes[2],
                              angle=_fmt(p.theta_rad), k=_fmt(p.k_kj_mol_rad2))
        for i, j, k, p, theta in mol.dropped_angles:
            ET.SubElement(clandp_el, "DroppedAngle", residue=resname, atomName1=names[i], atomName2=names[j],
                          atomName3=names[k], geometry=_fmt(round(theta, 6)), equilibrium=_fmt(p.theta_rad))
        for *_, p in mol.dihedrals:
            attrib = _torsion_attrib(p.v)
            if attrib and once(p.classes):  # all-zero series add nothing
                ET.SubElement(torsions_el, "Proper", attrib={f"class{n + 1}": c for n, c in enumerate(p.classes)} | attrib)
        for *idx, p in mol.impropers:
            attrib = _torsion_attrib(p.v)
            if attrib:
                ET.SubElement(clandp_el, "Improper", attrib={"residue": resname} |
                              {f"atomName{n + 1}": names[i] for n, i in enumerate(idx)} | attrib)
        if abs(mol.charge - round(mol.charge)) > 1e-6:
            raise ClandpError(f"{where}: total charge {mol.charge:.6f} e is not an integer; check the ATOMS charges in {ff.path}")
    ET.indent(root)
    return ET.ElementTree(root), names_elements


def pdb_text(resname: str, mol: TypedMolecule, names: list[str], elements) -> str:
    from openmm import unit
    from openmm.app import PDBFile, Topology

    top = Topology()
    residue = top.addResidue(resname, top.addChain())
    atoms = [top.addAtom(n, e, residue) for n, e in zip(names, elements)]
    for i, j, _ in mol.bonds:
        top.addBond(atoms[i], atoms[j])
    out = io.StringIO()
    PDBFile.writeFile(top, mol.coordinates_nm * unit.nanometer, out)
    # OpenMM's REMARK carries today's date; without it regenerated data is byte-identical.
    return "".join(line for line in out.getvalue().splitlines(keepends=True) if not line.startswith("REMARK"))


def convert(clandp_dir: str | Path, out_dir: str | Path, molecules: dict[str, str] | None = None,
            forcefield_file: str | None = None, command: str = "") -> list[Path]:
    """Convert ``{zmat file: residue name}`` from ``clandp_dir``; returns the files written.

    Everything is parsed and checked before the first file is replaced.
    """
    clandp_dir, out_dir = Path(clandp_dir), Path(out_dir)
    molecules = dict(DEFAULT_MOLECULES if molecules is None else molecules)
    if not molecules:
        raise ClandpError("no molecules to convert")
    for resname in molecules.values():
        if not resname.isalnum() or len(resname) > 4:
            raise ClandpError(f"residue name {resname!r}: use 1-4 letters or digits")
    if len(set(molecules.values())) != len(molecules):
        raise ClandpError(f"residue names must be unique: {sorted(molecules.values())}")
    zmats = {res: parse_zmat(clandp_dir / name) for name, res in molecules.items()}
    ff_names = {forcefield_file or z.forcefield_file or "il.ff" for z in zmats.values()}
    if len(ff_names) != 1:
        raise ClandpError(f"the z-matrices name different force-field files {sorted(ff_names)}; convert them separately")
    ff = parse_forcefield(clandp_dir / ff_names.pop())
    typed = {res: type_molecule(z, ff) for res, z in zmats.items()}
    tree, names_elements = build_xml(ff, typed, command)
    outputs = {FORCEFIELD_XML: ET.tostring(tree.getroot(), encoding="unicode") + "\n"}
    for res, mol in typed.items():
        outputs[f"{res}.pdb"] = pdb_text(res, mol, *names_elements[res])
    return [write_text_atomic(out_dir / name, text) for name, text in outputs.items()]


def _molecule_arg(text: str) -> tuple[str, str]:
    if text.count("=") != 1:
        raise argparse.ArgumentTypeError(f"expected FILE=RESNAME, got {text!r}")
    zmat, res = text.split("=")
    return zmat, res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openmm_cgnn.aa.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--clandp-dir", required=True, help="directory with il.ff and the .zmat files")
    parser.add_argument("--out", required=True, help="output directory (package data: openmm_cgnn/aa/data)")
    parser.add_argument("--molecule", action="append", type=_molecule_arg, metavar="FILE=RESNAME",
                        help=f"z-matrix file and residue name, repeatable (default: "
                             f"{' '.join(f'{k}={v}' for k, v in DEFAULT_MOLECULES.items())})")
    parser.add_argument("--forcefield", help="force-field file in --clandp-dir (default: the one the z-matrices name)")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python -m openmm_cgnn.aa.convert " + shlex.join(argv_used)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClandpWarning)
        try:
            written = convert(args.clandp_dir, args.out, dict(args.molecule) if args.molecule else None,
                              args.forcefield, command)
        except ClandpError as exc:
            error = exc
        else:
            error = None
    for w in caught:
        if issubclass(w.category, ClandpWarning):
            print(f"convert: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        print(f"convert: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
