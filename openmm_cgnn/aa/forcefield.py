"""The converted CL&P force field as an OpenMM ``System`` with CL&P's conventions.

``load_forcefield`` reads the package data written by ``openmm_cgnn.aa.convert``;
``build_system`` creates the System with OpenMM's ``ForceField`` and then applies what that
cannot express:

* LJ with geometric mixing of sigma *and* epsilon. ``NonbondedForce`` mixes sigma
  arithmetically, so LJ moves to a ``CustomNonbondedForce`` (with the long-range dispersion
  correction) and ``NonbondedForce`` keeps only Coulomb (PME). Because both mixing rules are
  geometric, ``4 eps_ij sigma_ij^n = (2 sqrt(eps_i) sigma_i^(n/2)) (2 sqrt(eps_j) sigma_j^(n/2))``
  factorises into per-atom coefficients, which keeps the custom kernel cheap.
* 1-4 pairs: exceptions with LJ and Coulomb scaled by 0.5 and geometric sigma; 1-2 and 1-3
  pairs excluded (both forces exclude every exception pair).
* The impropers and the ``cons`` bonds as constraints (their length from il.ff).
* The dropped angles: OpenMM's class-based angle templates cover every bonded triple, so the
  triples the converter dropped (e.g. trans F-P-F in PF6, see ``openmm_cgnn.aa.clandp``) get k = 0.
* ``charge_scale`` multiplies every charge (1-4 charge products by its square).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import FORCEFIELD_XML
from ..units import in_kj_mol, in_nm

DATA_DIR = Path(__file__).resolve().parent / "data"

# Force groups, so energies can be reported per component.
FORCE_GROUPS = {"HarmonicBondForce": 0, "HarmonicAngleForce": 1, "PeriodicTorsionForce": 2,
                "NonbondedForce": 3, "CustomNonbondedForce": 4}
LJ_EXPRESSION = "(a1*a2*ir6 - b1*b2)*ir6; ir6 = 1/r^6"


class ForceFieldDataError(ValueError):
    """The converted force-field data is missing or malformed; names the file."""


@dataclass
class ResidueTemplate:
    name: str
    pdb_path: Path
    charge: float
    atom_names: list[str] = field(default_factory=list)


@dataclass
class AAForceField:
    """Converted CL&P data: the OpenMM XML plus what only openmm_cgnn applies."""

    directory: Path
    xml_path: Path
    residues: dict[str, ResidueTemplate]
    lj14_scale: float
    coulomb14_scale: float
    # (residue, atom names, [(periodicity, phase, k)])
    impropers: list[tuple[str, tuple[str, str, str, str], list[tuple[int, float, float]]]]
    # (residue, atom name 1, atom name 2, length nm)
    constraints: list[tuple[str, str, str, float]]
    description: str
    # (residue, atom names) of bonded triples that carry no angle term
    dropped_angles: list[tuple[str, tuple[str, str, str]]] = field(default_factory=list)

    def openmm_forcefield(self):
        from openmm.app import ForceField

        try:
            return ForceField(str(self.xml_path))
        except Exception as exc:  # OpenMM raises plain exceptions for bad XML
            raise ForceFieldDataError(f"{self.xml_path}: OpenMM cannot load it ({exc})") from exc


def load_forcefield(directory: str | Path | None = None) -> AAForceField:
    """Read converted data (default: the package's ``aa/data``); errors name the bad file."""
    directory = Path(directory) if directory is not None else DATA_DIR
    xml_path = directory / FORCEFIELD_XML
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise ForceFieldDataError(f"{xml_path}: missing; regenerate with python -m openmm_cgnn.aa.convert") from None
    except ET.ParseError as exc:
        raise ForceFieldDataError(f"{xml_path}: corrupt XML ({exc})") from None
    spec = root.find("CLandP")
    if spec is None:
        raise ForceFieldDataError(f"{xml_path}: no <CLandP> element; not written by openmm_cgnn.aa.convert")
    try:
        residues = {}
        for el in spec.findall("Residue"):
            res = ResidueTemplate(el.attrib["name"], directory / el.attrib["pdb"], float(el.attrib["charge"]))
            template = root.find(f"Residues/Residue[@name='{res.name}']")
            if template is None:
                raise ForceFieldDataError(f"{xml_path}: residue {res.name} has no template in <Residues>")
            res.atom_names = [a.attrib["name"] for a in template.findall("Atom")]
            if not res.pdb_path.exists():
                raise ForceFieldDataError(f"{res.pdb_path}: missing geometry of residue {res.name}")
            residues[res.name] = res
        impropers = []
        for el in spec.findall("Improper"):
            names = tuple(el.attrib[f"atomName{n}"] for n in range(1, 5))
            terms = []
            n = 1
            while f"k{n}" in el.attrib:
                terms.append((int(el.attrib[f"periodicity{n}"]), float(el.attrib[f"phase{n}"]), float(el.attrib[f"k{n}"])))
                n += 1
            impropers.append((el.attrib["residue"], names, terms))
        constraints = [(el.attrib["residue"], el.attrib["atomName1"], el.attrib["atomName2"], float(el.attrib["length"]))
                       for el in spec.findall("Constraint")]
        dropped_angles = [(el.attrib["residue"], tuple(el.attrib[f"atomName{n}"] for n in range(1, 4)))
                          for el in spec.findall("DroppedAngle")]
        lj14, coul14 = float(spec.attrib["lj14scale"]), float(spec.attrib["coulomb14scale"])
        if spec.attrib.get("mixing") != "geometric":
            raise ForceFieldDataError(f"{xml_path}: mixing {spec.attrib.get('mixing')!r} unsupported (geometric only)")
    except (KeyError, ValueError) as exc:
        if isinstance(exc, ForceFieldDataError):
            raise
        raise ForceFieldDataError(f"{xml_path}: malformed <CLandP> element ({exc!r})") from None
    if not residues:
        raise ForceFieldDataError(f"{xml_path}: the <CLandP> element lists no residues")
    for res, *names in ([(r, *n) for r, n, _ in impropers] + [(r, a, b) for r, a, b, _ in constraints]
                        + [(r, *n) for r, n in dropped_angles]):
        if res not in residues or any(n not in residues[res].atom_names for n in names):
            raise ForceFieldDataError(f"{xml_path}: improper/constraint/dropped angle names unknown residue or atoms "
                                      f"{res} {names}")
    source = root.findtext("Info/Source", default="CL&P")
    return AAForceField(directory, xml_path, residues, lj14, coul14, impropers, constraints, source, dropped_angles)


def molecule_template(ff: AAForceField, residue: str):
    """(openmm Topology of one molecule, positions as an (n, 3) nm array) from the residue's PDB."""
    import numpy as np
    from openmm import unit
    from openmm.app import PDBFile

    res = ff.residues[residue]
    try:
        pdb = PDBFile(str(res.pdb_path))
    except Exception as exc:
        raise ForceFieldDataError(f"{res.pdb_path}: unreadable PDB ({exc})") from exc
    names = [a.name for a in pdb.topology.atoms()]
    if names != res.atom_names:
        raise ForceFieldDataError(f"{res.pdb_path}: atom names {names} differ from the template of {residue} in {ff.xml_path}")
    return pdb.topology, np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


def build_system(topology: Any, ff: AAForceField | None = None, cutoff_nm: float = 1.0,
                 charge_scale: float = 1.0, ewald_tolerance: float = 5e-4, periodic: bool = True):
    """An OpenMM System for ``topology`` (residues named as in the force field) with CL&P conventions.

    ``periodic`` selects PME with a cutoff (liquids) or no cutoff (a lone molecule in tests).
    """
    from openmm import app, unit

    ff = ff or load_forcefield()
    unknown = sorted({r.name for r in topology.residues()} - set(ff.residues))
    if unknown:
        raise ForceFieldDataError(f"{ff.xml_path}: no residue template for {unknown}")
    method = app.PME if periodic else app.NoCutoff
    try:
        system = ff.openmm_forcefield().createSystem(
            topology, nonbondedMethod=method, nonbondedCutoff=cutoff_nm * unit.nanometer,
            constraints=None, rigidWater=False, ewaldErrorTolerance=ewald_tolerance, removeCMMotion=True)
    except ValueError as exc:  # e.g. a residue whose bonds do not match its template
        raise ForceFieldDataError(f"{ff.xml_path}: {exc}") from exc
    forces = {type(f).__name__: f for f in system.getForces()}
    nonbonded = forces["NonbondedForce"]
    _move_lj_to_geometric_force(system, nonbonded, ff, cutoff_nm if periodic else None)
    _scale_charges(nonbonded, charge_scale)
    _add_impropers(topology, forces["PeriodicTorsionForce"], ff)
    _drop_angles(topology, forces.get("HarmonicAngleForce"), ff)
    _constrain_bonds(system, topology, forces["HarmonicBondForce"], ff)
    for f in system.getForces():
        f.setForceGroup(FORCE_GROUPS.get(type(f).__name__, 5))
    return system


def _move_lj_to_geometric_force(system, nonbonded, ff: AAForceField, cutoff_nm: float | None) -> None:
    import openmm

    lj = openmm.CustomNonbondedForce(LJ_EXPRESSION)
    lj.addPerParticleParameter("a")  # 2 sqrt(eps) sigma^6
    lj.addPerParticleParameter("b")  # 2 sqrt(eps) sigma^3
    sigma, epsilon = [], []
    for i in range(nonbonded.getNumParticles()):
        q, s, e = nonbonded.getParticleParameters(i)
        s, e = in_nm(s), in_kj_mol(e)
        sigma.append(s)
        epsilon.append(e)
        lj.addParticle([2.0 * math.sqrt(e) * s**6, 2.0 * math.sqrt(e) * s**3])
        nonbonded.setParticleParameters(i, q, 1.0, 0.0)
    for k in range(nonbonded.getNumExceptions()):
        i, j, qq, _, eps14 = nonbonded.getExceptionParameters(k)
        lj.addExclusion(i, j)
        if in_kj_mol(eps14) != 0.0 or qq.value_in_unit(openmm.unit.elementary_charge**2) != 0.0:  # a 1-4 pair; 1-2 and 1-3 pairs stay excluded
            nonbonded.setExceptionParameters(k, i, j, qq, math.sqrt(sigma[i] * sigma[j]),
                                             ff.lj14_scale * math.sqrt(epsilon[i] * epsilon[j]))
    nonbonded.setUseDispersionCorrection(False)  # its epsilons are now zero; LJ's correction is below
    if cutoff_nm is None:
        lj.setNonbondedMethod(openmm.CustomNonbondedForce.NoCutoff)
    else:
        lj.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
        lj.setCutoffDistance(cutoff_nm)
        # Plain truncation plus the analytic tail correction, as in CL&P's published setups.
        lj.setUseLongRangeCorrection(True)
    lj.setName("LennardJonesGeometric")
    system.addForce(lj)


def _scale_charges(nonbonded, scale: float) -> None:
    if scale == 1.0:
        return
    for i in range(nonbonded.getNumParticles()):
        q, s, e = nonbonded.getParticleParameters(i)
        nonbonded.setParticleParameters(i, q * scale, s, e)
    for k in range(nonbonded.getNumExceptions()):
        i, j, qq, s, e = nonbonded.getExceptionParameters(k)
        nonbonded.setExceptionParameters(k, i, j, qq * scale**2, s, e)


def _atoms_by_residue_and_name(topology) -> list[tuple[str, dict[str, int]]]:
    return [(r.name, {a.name: a.index for a in r.atoms()}) for r in topology.residues()]


def _add_impropers(topology, torsions, ff: AAForceField) -> None:
    for resname, index in _atoms_by_residue_and_name(topology):
        for res, names, terms in ff.impropers:
            if res == resname:
                atoms = [index[n] for n in names]
                for periodicity, phase, k in terms:
                    torsions.addTorsion(*atoms, periodicity, phase, k)


def _drop_angles(topology, angles, ff: AAForceField) -> None:
    if not ff.dropped_angles:
        return
    dropped = set()
    for resname, index in _atoms_by_residue_and_name(topology):
        for res, (a, b, c) in ff.dropped_angles:
            if res == resname:
                dropped.add((min(index[a], index[c]), index[b], max(index[a], index[c])))
    for n in range(angles.getNumAngles()):
        i, j, k, theta, _ = angles.getAngleParameters(n)
        if (min(i, k), j, max(i, k)) in dropped:
            angles.setAngleParameters(n, i, j, k, theta, 0.0)


def _constrain_bonds(system, topology, bonds, ff: AAForceField) -> None:
    """Replace the ``cons`` bonds' harmonic terms by constraints at the il.ff length."""
    import openmm

    constrained: dict[tuple[int, int], float] = {}
    for resname, index in _atoms_by_residue_and_name(topology):
        for res, a, b, length in ff.constraints:
            if res == resname:
                constrained[tuple(sorted((index[a], index[b])))] = length
    if not constrained:
        return
    kept = openmm.HarmonicBondForce()
    for k in range(bonds.getNumBonds()):
        i, j, r0, kb = bonds.getBondParameters(k)
        if tuple(sorted((i, j))) in constrained:
            system.addConstraint(i, j, constrained.pop(tuple(sorted((i, j)))))
        else:
            kept.addBond(i, j, r0, kb)
    if constrained:
        raise ForceFieldDataError(f"{ff.xml_path}: constrained atom pairs {sorted(constrained)} are not bonded")
    kept.setUsesPeriodicBoundaryConditions(bonds.usesPeriodicBoundaryConditions())
    # createSystem makes exactly one HarmonicBondForce: the one being replaced.
    system.removeForce(next(n for n, f in enumerate(system.getForces()) if isinstance(f, openmm.HarmonicBondForce)))
    system.addForce(kept)


def energy_components(context) -> dict[str, float]:
    """Potential energy (kJ/mol) per force group name, from a Context of a ``build_system`` System."""
    from openmm import unit

    out = {}
    for name, group in FORCE_GROUPS.items():
        state = context.getState(getEnergy=True, groups={group})
        out[name] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return out
