"""The CL&P converter against the CL&P authors' own tooling, for every kind of ion in the repository.

Reference: tests/data/clandp_fftool/reference.json holds what fftool (A. Padua's tool that turns
CL&P z-matrices into LAMMPS/GROMACS/OpenMM input) assigns to 21 molecules: atom classes,
coordinates, and every bond, angle, dihedral and improper with its atoms and il.ff parameters.
Nothing in it went through openmm_cgnn. The tests build an OpenMM System per molecule from the
converter's XML and compare its terms, and its bonded energies evaluated by OpenMM, with the
reference terms evaluated here with numpy.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)

openmm = pytest.importorskip("openmm")
from openmm import app, unit  # noqa: E402

from openmm_cgnn.aa import clandp, convert, forcefield  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLANDP = ROOT / "data" / "clandp"
SHARED_CLANDP = ROOT.parent / "shared" / "data" / "clandp"
REFERENCE = json.loads((Path(__file__).parent / "data" / "clandp_fftool" / "reference.json").read_text())
MOLECULES = list(REFERENCE["molecules"])
IMPROPER_GROUP = 6  # the test moves impropers to their own force group to compare them apart

# The files of the CL&P repository that do not convert, and the one-line reason each gives.
UNSUPPORTED = {
    "benzc1im.zmat": r"no DIHEDRALS entry for classes CR NA CT CA .*; also CW NA CT CA, NA CT CA CA",
    "c2OHc1im.zmat": r"no DIHEDRALS entry for classes NA CT CT OH ",
    "c4fc1fsi.zmat": r"no DIHEDRALS entry for classes FB CF CF CF ",
}
XYZ_REASON = r"unsupported molecule file format '\.xyz'"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """All reference molecules converted into one force-field directory (residues M0, M1, ...)."""
    out = tmp_path_factory.mktemp("clandp")
    residues = {f"{name}.zmat": f"M{n}" for n, name in enumerate(MOLECULES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", clandp.ClandpWarning)  # PF6's dropped angles; tested below
        convert.convert(CLANDP, out, residues)
    ff = forcefield.load_forcefield(out)
    return ff, {name: residues[f"{name}.zmat"] for name in MOLECULES}


def one_molecule(ff, residue: str):
    """A System of one molecule from the converted XML; impropers moved to IMPROPER_GROUP."""
    template, positions = forcefield.molecule_template(ff, residue)
    top = app.Topology()
    res = top.addResidue(residue, top.addChain())
    atoms = [top.addAtom(a.name, a.element, res) for a in template.atoms()]
    for a, b in template.bonds():
        top.addBond(atoms[a.index], atoms[b.index])
    return top, forcefield.build_system(top, ff, periodic=False), positions


def torsion_series(system) -> dict[tuple[int, ...], np.ndarray]:
    """Every atom quadruple's periodic terms summed back into OPLS V1..V4 (kJ/mol)."""
    series: dict[tuple[int, ...], np.ndarray] = {}
    for force in system.getForces():
        if isinstance(force, openmm.PeriodicTorsionForce):
            for t in range(force.getNumTorsions()):
                *idx, n, phase, k = force.getTorsionParameters(t)
                # k (1 + cos(n phi - phase)) = V_n/2 (1 + cos n phi) for odd n, (1 - cos n phi) for even n
                assert phase.value_in_unit(unit.radian) == pytest.approx(0.0 if n % 2 else math.pi)
                series.setdefault(tuple(idx), np.zeros(4))[n - 1] += 2 * k.value_in_unit(unit.kilojoule_per_mole)
    return series


def assert_same_terms(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), f"missing {set(expected) - set(got)}, extra {set(got) - set(expected)}"
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


# --------------------------------------------------------------- the reference, evaluated with numpy


def dihedral(x: np.ndarray, i: int, j: int, k: int, l: int) -> float:
    """IUPAC dihedral (trans = 180 degrees), radians."""
    b1, b2, b3 = x[j] - x[i], x[k] - x[j], x[l] - x[k]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    m = np.cross(n1, b2 / np.linalg.norm(b2))
    return math.atan2(float(np.dot(m, n2)), float(np.dot(n1, n2)))


def opls(v, phi: float) -> float:
    v1, v2, v3, v4 = v
    return 0.5 * (v1 * (1 + math.cos(phi)) + v2 * (1 - math.cos(2 * phi)) + v3 * (1 + math.cos(3 * phi))
                  + v4 * (1 - math.cos(4 * phi)))


def reference_energies(mol: dict, x_angstrom: np.ndarray) -> dict[str, float]:
    """fftool's terms at a geometry, in il.ff units: k/2 (r - r0)^2, k/2 (theta - theta0)^2, OPLS series."""
    x = x_angstrom
    e = {"bonds": 0.0, "angles": 0.0, "dihedrals": 0.0, "impropers": 0.0}
    for i, j, pot, r0, k in mol["bonds"]:
        if pot == "harm":  # 'cons' bonds are constraints: no energy
            e["bonds"] += 0.5 * k * (np.linalg.norm(x[i] - x[j]) - r0) ** 2
    for i, j, k, theta0, ka in mol["angles"]:
        u, w = x[i] - x[j], x[k] - x[j]
        theta = math.acos(np.clip(np.dot(u, w) / np.linalg.norm(u) / np.linalg.norm(w), -1, 1))
        e["angles"] += 0.5 * ka * (theta - math.radians(theta0)) ** 2
    for kind in ("dihedrals", "impropers"):
        for i, j, k, l, *v in mol[kind]:
            e[kind] += opls(v, dihedral(x, i, j, k, l))
    return e


def openmm_energies(system, positions_nm: np.ndarray, improper_atoms: set[tuple[int, ...]]) -> dict[str, float]:
    """Bonded energies by OpenMM (Reference platform), impropers in a group of their own."""
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    torsions = next(f for f in system.getForces() if isinstance(f, openmm.PeriodicTorsionForce))
    impropers = openmm.PeriodicTorsionForce()
    for t in range(torsions.getNumTorsions()):
        *idx, n, phase, k = torsions.getTorsionParameters(t)
        if tuple(idx) in improper_atoms:
            impropers.addTorsion(*idx, n, phase, k)
            torsions.setTorsionParameters(t, *idx, n, phase, 0.0)
    impropers.setForceGroup(IMPROPER_GROUP)
    system.addForce(impropers)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions_nm)
    groups = {"bonds": forcefield.FORCE_GROUPS["HarmonicBondForce"],
              "angles": forcefield.FORCE_GROUPS["HarmonicAngleForce"],
              "dihedrals": forcefield.FORCE_GROUPS["PeriodicTorsionForce"], "impropers": IMPROPER_GROUP}
    return {kind: ctx.getState(getEnergy=True, groups={g}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            for kind, g in groups.items()}


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", MOLECULES)
def test_terms_match_fftool(converted, name):
    """Every bonded term, its atoms (improper order included) and parameters as the CL&P tooling has them."""
    ff, residues = converted
    mol = REFERENCE["molecules"][name]
    top, system, positions = one_molecule(ff, residues[name])
    forces = {type(f).__name__: f for f in system.getForces()}

    harmonic, constrained = {}, {}
    bf = forces["HarmonicBondForce"]
    for n in range(bf.getNumBonds()):
        i, j, r0, k = bf.getBondParameters(n)
        harmonic[frozenset((i, j))] = (r0.value_in_unit(unit.nanometer), k.value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2))
    for n in range(system.getNumConstraints()):
        i, j, d = system.getConstraintParameters(n)
        constrained[frozenset((i, j))] = d.value_in_unit(unit.nanometer)
    assert_same_terms(harmonic, {frozenset((i, j)): (r0 / 10, k * 100) for i, j, pot, r0, k in mol["bonds"] if pot == "harm"})
    assert_same_terms(constrained, {frozenset((i, j)): r0 / 10 for i, j, pot, r0, _ in mol["bonds"] if pot == "cons"})

    angles = {}
    af = forces["HarmonicAngleForce"]
    for n in range(af.getNumAngles()):
        i, j, k, theta, ka = af.getAngleParameters(n)
        if ka.value_in_unit(unit.kilojoule_per_mole / unit.radian**2) != 0.0:  # dropped angles have k = 0
            angles[(min(i, k), j, max(i, k))] = (theta.value_in_unit(unit.radian), ka.value_in_unit(ka.unit))
    assert_same_terms(angles, {(min(i, k), j, max(i, k)): (math.radians(t), ka) for i, j, k, t, ka in mol["angles"]})

    series = torsion_series(system)
    for i, j, k, l, *v in mol["impropers"]:  # exactly fftool's atom order: the dihedral depends on it
        assert series.pop((i, j, k, l)) == pytest.approx(v), f"improper {i + 1}-{j + 1}-{k + 1}-{l + 1}"
    for i, j, k, l, *v in mol["dihedrals"]:
        got = series.pop((i, j, k, l), None)
        got = series.pop((l, k, j, i), np.zeros(4)) if got is None else got  # all-zero series are not written
        assert got == pytest.approx(v), f"dihedral {i + 1}-{j + 1}-{k + 1}-{l + 1}"
    assert not series, f"torsions fftool does not have: {list(series)}"

    # The shipped geometry is fftool's, up to a rigid motion: same interatomic distances.
    x_ref = np.array(mol["xyz"]) / 10
    distances = lambda x: np.linalg.norm(x[:, None] - x[None], axis=2)  # noqa: E731
    assert distances(positions) == pytest.approx(distances(x_ref), abs=2e-4)


@pytest.mark.parametrize("name", MOLECULES)
def test_bonded_energies_match_fftool(converted, name):
    """OpenMM's bonded energies of the converted molecule = fftool's terms evaluated here, 1e-5 relative.

    At the z-matrix geometry and at a randomly strained copy: at the planar z-matrix geometry every
    improper is zero whatever its atom order, the strained one tells the orders apart.
    """
    ff, residues = converted
    mol = REFERENCE["molecules"][name]
    _, system, _ = one_molecule(ff, residues[name])
    improper_atoms = {tuple(t[:4]) for t in mol["impropers"]}
    x0 = np.array(mol["xyz"])
    rng = np.random.default_rng(7)
    for x in (x0, x0 + rng.normal(scale=0.08, size=x0.shape)):
        expected = reference_energies(mol, x)
        got = openmm_energies(system, x / 10, improper_atoms)
        for kind in expected:
            assert got[kind] == pytest.approx(expected[kind], rel=1e-5, abs=1e-7), (kind, got, expected)
    if mol["impropers"]:
        assert expected["impropers"] > 1e-3  # the strained geometry does test the impropers


def test_pf6_trans_angles_are_dropped_with_a_warning(tmp_path, capsys):
    """The octahedron's three 180-degree F-P-F pairs would carry the 90-degree term: 1437 kJ/mol each."""
    rc = convert.main(["--clandp-dir", str(CLANDP), "--out", str(tmp_path), "--molecule", "PF6.zmat=PF6"])
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"convert: warning: PF6.zmat (PF6-): angle F-P-F of atoms {a} dropped: 180.00 deg in the z-matrix "
                   "geometry, il.ff equilibrium 90.00 deg (tolerance 15 deg)" for a in ("2-1-7", "3-1-6", "4-1-5")]
    ff = forcefield.load_forcefield(tmp_path)
    _, system, positions = one_molecule(ff, "PF6")
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    angle_energy = ctx.getState(getEnergy=True, groups={forcefield.FORCE_GROUPS["HarmonicAngleForce"]}).getPotentialEnergy()
    assert angle_energy.value_in_unit(unit.kilojoule_per_mole) < 1e-3  # not 3 x 1165/2 (pi/2)^2 = 3 x 1437 kJ/mol
    af = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicAngleForce))
    params = [af.getAngleParameters(n) for n in range(af.getNumAngles())]
    zero = {(min(i, k) + 1, j + 1, max(i, k) + 1) for i, j, k, _, ka in params if ka._value == 0.0}
    assert zero == {(2, 1, 7), (3, 1, 6), (4, 1, 5)} and len(params) == 15  # 12 cis angles keep their term


def test_automatic_impropers_on_three_neighbour_atoms():
    """No 'improper' lines: one per three-neighbour atom, central third, outer atoms in il.ff's order."""
    ff = clandp.parse_forcefield(CLANDP / "il.ff")
    acetate = clandp.type_molecule(clandp.parse_zmat(CLANDP / "oac.zmat"), ff)
    assert acetate.automatic_impropers
    [(i, j, k, l, p)] = acetate.impropers
    assert [acetate.atom_types[n].bonded_class for n in (i, j, k, l)] == ["CT", "O2", "CO", "O2"]
    assert p.v == (0.0, 87.864, 0.0, 0.0)
    triflate = clandp.type_molecule(clandp.parse_zmat(CLANDP / "otf.zmat"), ff)
    assert triflate.automatic_impropers and triflate.impropers == []  # no atom has three neighbours
    listed = clandp.type_molecule(clandp.parse_zmat(CLANDP / "c2c1im.zmat"), ff)
    assert not listed.automatic_impropers
    # c2c1im.zmat lists 'improper 5 2 1 6'; il.ff has CR CW NA CT, so the atoms are reordered 2 5 1 6.
    assert [tuple(n + 1 for n in t[:4]) for t in listed.impropers][0] == (2, 5, 1, 6)


def test_automatic_improper_without_parameters_is_skipped_with_a_warning(tmp_path):
    """A three-neighbour centre il.ff has no improper for (here a CH3 fragment) gets none, and the run says so."""
    (tmp_path / "ch3.zmat").write_text("methyl\n\n1 CT\n2 HC 1 1.09\n3 HC 1 1.09 2 109.5\n"
                                       "4 HC 1 1.09 2 109.5 3 120.0\n\nil.ff\n")
    ff = clandp.parse_forcefield(CLANDP / "il.ff")
    with pytest.warns(clandp.ClandpWarning, match=r"ch3\.zmat \(methyl\): no improper on atom 1 \(CT, three "
                      r"neighbours\): il\.ff has no IMPROPER entry for classes HC HC CT HC"):
        mol = clandp.type_molecule(clandp.parse_zmat(tmp_path / "ch3.zmat"), ff)
    assert mol.impropers == [] and len(mol.angles) == 3


def test_unnumbered_and_commented_zmatrices_read_like_numbered_ones(tmp_path):
    numbered = "# a comment before the title\nthiocyanate\n\n1 SK\n2 CK 1 1.66\n3 NK 2 1.19 1 180.0\n\nil.ff\n"
    (tmp_path / "a.zmat").write_text(numbered)
    a = clandp.parse_zmat(tmp_path / "a.zmat")
    b = clandp.parse_zmat(CLANDP / "SCN.zmat")
    assert a.title == b.title == "thiocyanate"
    assert [(x.type_name, x.refs, x.values) for x in a.atoms] == [(x.type_name, x.refs, x.values) for x in b.atoms]
    assert clandp.parse_zmat(CLANDP / "c4pyri.zmat").title == "bpyri+"


@pytest.mark.parametrize("text, message", [
    ("t\n\n1 SK\n2 CK 1 1.66\n\nreconnect\nil.ff\n", r"x\.zmat:6: unsupported construct 'reconnect'"),
    ("t\n\n1 SK\nCK 1 1.66\n\nil.ff\n", r"x\.zmat:4: atom lines must all start with their index or none may"),
    ("t\n\n1 SK\n2 CK 1 rSC\n\nil.ff\n", r"x\.zmat:4: variable 'rSC' is not defined"),
])
def test_unsupported_zmatrix_constructs_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "x.zmat").write_text(text)
    with pytest.raises(clandp.ClandpError, match=message) as info:
        clandp.parse_zmat(tmp_path / "x.zmat")
    assert "\n" not in str(info.value)


def _molecule_files() -> list[Path]:
    folders = [CLANDP] + ([SHARED_CLANDP] if SHARED_CLANDP.is_dir() else [])
    return sorted(p for d in folders for p in d.iterdir() if p.suffix in (".zmat", ".xyz", ".mol", ".pdb"))


def test_every_clandp_molecule_file_converts_or_says_why(tmp_path, capsys):
    """Each molecule file converts (and builds a System) or the CLI prints one error line naming it."""
    outcome = {}
    for n, path in enumerate(_molecule_files()):
        out = tmp_path / f"out{n}"
        rc = convert.main(["--clandp-dir", str(path.parent), "--out", str(out), "--molecule", f"{path.name}=X"])
        captured = capsys.readouterr()
        errors = [ln for ln in captured.err.splitlines() if not ln.startswith("convert: warning: ")]
        assert "Traceback" not in captured.err
        if rc == 0:
            assert not errors
            ff = forcefield.load_forcefield(out)
            _, system, _ = one_molecule(ff, "X")
            assert system.getNumParticles() == len(ff.residues["X"].atom_names)
            outcome[path.name] = "converts"
        else:
            assert rc == 2 and len(errors) == 1 and errors[0].startswith("convert: error: ") and path.name in errors[0]
            assert not out.exists()  # nothing written
            reason = XYZ_REASON if path.suffix == ".xyz" else UNSUPPORTED.get(path.name)
            assert reason and re.search(reason, errors[0]), errors[0]
            outcome[path.name] = "unsupported"
    vendored = {p.name for p in CLANDP.iterdir() if p.suffix in (".zmat", ".xyz")}
    assert len(vendored) == 57
    assert {name for name, o in outcome.items() if o == "unsupported" and name.endswith(".zmat")} == set(UNSUPPORTED)
    assert sum(o == "converts" for o in outcome.values()) >= 40
