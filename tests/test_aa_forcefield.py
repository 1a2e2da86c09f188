"""CL&P conversion and the OpenMM System: every term checked against il.ff read independently here."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)

# The CL&P repository's files, kept in the checkout (data/clandp/README.md).
CLANDP = Path(__file__).resolve().parents[1] / "data" / "clandp"
# Converting the default molecules drops PF6's trans F-P-F angles with a warning (tested in test_aa_clandp.py).
pytestmark = pytest.mark.filterwarnings("ignore::openmm_cgnn.aa.clandp.ClandpWarning")

openmm = pytest.importorskip("openmm")
from openmm import app  # noqa: E402

from openmm_cgnn.aa import clandp, convert, forcefield  # noqa: E402
from openmm_cgnn.aa.builder import build_box  # noqa: E402


# ----------------------------------------------------------------- an independent reading of il.ff


def read_il_ff(path: Path) -> dict[str, dict]:
    """Minimal reader, written separately from openmm_cgnn.aa.clandp on purpose."""
    tables: dict[str, dict] = {s: {} for s in ("ATOMS", "BONDS", "ANGLES", "DIHEDRALS", "IMPROPER")}
    section = None
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        if words[0] in tables and len(words) == 1:
            section = words[0]
            continue
        if section == "ATOMS":
            tables[section][words[0]] = (words[1], float(words[3]), float(words[5]), float(words[6]))
        elif section == "BONDS":
            tables[section][tuple(words[:2])] = (words[2], float(words[3]), float(words[4]))
        elif section == "ANGLES":
            tables[section][tuple(words[:3])] = (float(words[4]), float(words[5]))
        elif section in ("DIHEDRALS", "IMPROPER"):
            tables[section][tuple(words[:4])] = tuple(float(w) for w in words[5:9])
    return tables


def lookup(table: dict, key: tuple):
    return table.get(key, table.get(key[::-1]))


def read_zmat(path: Path):
    types, bonds, impropers = [], set(), []
    for line in path.read_text().splitlines()[1:]:
        w = line.split()
        if not w:
            continue
        if w[0].isdigit():
            types.append(w[1])
            if len(w) > 2:
                bonds.add(frozenset((int(w[0]) - 1, int(w[2]) - 1)))
        elif w[0] == "connect":
            bonds.add(frozenset((int(w[1]) - 1, int(w[2]) - 1)))
        elif w[0] == "improper":
            impropers.append(tuple(int(x) - 1 for x in w[1:5]))
    return types, bonds, impropers


@pytest.fixture(scope="module")
def ff():
    return forcefield.load_forcefield()


@pytest.fixture(scope="module")
def ion_pair(ff):
    """One BMIM and one BF4 in vacuum (no cutoff) with charge scale 0.8."""
    top = app.Topology()
    for res in ("BMIM", "BF4"):
        template, _ = forcefield.molecule_template(ff, res)
        residue = top.addResidue(res, top.addChain())
        atoms = [top.addAtom(a.name, a.element, residue) for a in template.atoms()]
        for b in template.bonds():
            top.addBond(atoms[b[0].index], atoms[b[1].index])
    system = forcefield.build_system(top, ff, charge_scale=0.8, periodic=False)
    return top, system


def test_every_bonded_term_matches_il_ff(ion_pair):
    top, system = ion_pair
    il = read_il_ff(CLANDP / "il.ff")
    forces = {type(f).__name__: f for f in system.getForces()}
    offset = 0
    for res, zmat in (("BMIM", "c4c1im.zmat"), ("BF4", "BF4.zmat")):
        types, bonds, impropers = read_zmat(CLANDP / zmat)
        n = len(types)
        cls = [il["ATOMS"][t][0] for t in types]
        local = lambda idx: tuple(i - offset for i in idx)  # noqa: E731
        inside = lambda idx: all(offset <= i < offset + n for i in idx)  # noqa: E731

        # Bonds: harmonic ones in HarmonicBondForce, 'cons' ones as constraints, nothing else.
        harmonic = {}
        bf = forces["HarmonicBondForce"]
        for k in range(bf.getNumBonds()):
            i, j, r0, kb = bf.getBondParameters(k)
            if inside((i, j)):
                harmonic[frozenset(local((i, j)))] = (r0._value, kb._value)
        constrained = {}
        for k in range(system.getNumConstraints()):
            i, j, d = system.getConstraintParameters(k)
            if inside((i, j)):
                constrained[frozenset(local((i, j)))] = d._value
        assert set(harmonic) | set(constrained) == bonds and not set(harmonic) & set(constrained)
        for pair in bonds:
            i, j = sorted(pair)
            kind, r0, kb = lookup(il["BONDS"], (cls[i], cls[j]))
            if kind == "cons":
                assert constrained[pair] == pytest.approx(r0 / 10)
            else:
                assert harmonic[pair] == pytest.approx((r0 / 10, kb * 100))

        # Angles: every bonded triple, il.ff theta (deg) and k (kJ/mol/rad^2).
        neighbours = {i: {j for b in bonds if i in b for j in b if j != i} for i in range(n)}
        expected = {(i, j, k) for j in range(n) for i, k in itertools.combinations(sorted(neighbours[j]), 2)}
        af = forces["HarmonicAngleForce"]
        seen = set()
        for a in range(af.getNumAngles()):
            i, j, k, theta, ka = af.getAngleParameters(a)
            if inside((i, j, k)):
                i, j, k = local((i, j, k))
                key = (min(i, k), j, max(i, k))
                seen.add(key)
                theta0, k0 = lookup(il["ANGLES"], (cls[i], cls[j], cls[k]))
                assert (theta._value, ka._value) == pytest.approx((math.radians(theta0), k0))
        assert seen == expected

        # Torsions: sum the periodic terms of each atom quadruple back into OPLS V1..V4.
        series: dict[tuple, np.ndarray] = {}
        tf = forces["PeriodicTorsionForce"]
        for t in range(tf.getNumTorsions()):
            *idx, per, phase, k = tf.getTorsionParameters(t)
            if inside(idx):
                # k (1 + cos(n phi - phase)) = V_n/2 (1 + cos n phi) for odd n, (1 - cos n phi) for even n
                assert phase._value == pytest.approx(0.0 if per % 2 else math.pi)
                series.setdefault(local(idx), np.zeros(4))[per - 1] += 2 * k._value
        for idx in impropers:  # central atom third, in the z-matrix's order
            v = series.pop(idx)
            assert v == pytest.approx(il["IMPROPER"][tuple(cls[i] for i in idx)])
        propers = {(i, j, k, l) for j, k in (sorted(b) for b in bonds) for i in neighbours[j] - {k}
                   for l in neighbours[k] - {j} if i != l}
        for idx in propers:
            v_file = np.array(lookup(il["DIHEDRALS"], tuple(cls[i] for i in idx)))
            v_sys = series.pop(idx, None)
            if v_sys is None:
                v_sys = series.pop(idx[::-1], np.zeros(4))
            assert v_sys == pytest.approx(v_file)
        assert not series, f"torsions not in the z-matrix: {list(series)}"
        offset += n


def test_charges_lj_and_exceptions(ion_pair):
    top, system = ion_pair
    il = read_il_ff(CLANDP / "il.ff")
    types = read_zmat(CLANDP / "c4c1im.zmat")[0] + read_zmat(CLANDP / "BF4.zmat")[0]
    forces = {type(f).__name__: f for f in system.getForces()}
    nb, lj = forces["NonbondedForce"], forces["CustomNonbondedForce"]
    charges = []
    for i, t in enumerate(types):
        _, q0, sigma, eps = il["ATOMS"][t]
        q, _, e = nb.getParticleParameters(i)
        a, b = lj.getParticleParameters(i)
        charges.append(q._value)
        assert q._value == pytest.approx(0.8 * q0)
        assert e._value == 0.0  # LJ lives in the geometric-mixing force only
        assert (a, b) == pytest.approx((2 * math.sqrt(eps) * (sigma / 10) ** 6, 2 * math.sqrt(eps) * (sigma / 10) ** 3))
    assert sum(charges[:25]) == pytest.approx(0.8) and sum(charges[25:]) == pytest.approx(-0.8)
    assert sum(charges) == pytest.approx(0.0, abs=1e-9)
    # 1-4 pairs: half Coulomb and half LJ with geometric sigma; 1-2 and 1-3 pairs: excluded.
    graph = {i: set() for i in range(len(types))}
    for b in top.bonds():
        graph[b[0].index].add(b[1].index)
        graph[b[1].index].add(b[0].index)
    assert nb.getNumExceptions() == lj.getNumExclusions()
    n14 = 0
    for k in range(nb.getNumExceptions()):
        i, j, qq, s, e = nb.getExceptionParameters(k)
        near = j in graph[i] or graph[i] & graph[j]
        _, qi, si, ei = il["ATOMS"][types[i]]
        _, qj, sj, ej = il["ATOMS"][types[j]]
        if near:
            assert qq._value == 0 and e._value == 0
        else:
            n14 += 1
            assert qq._value == pytest.approx(0.5 * 0.64 * qi * qj)
            assert s._value == pytest.approx(math.sqrt(si * sj) / 10)
            assert e._value == pytest.approx(0.5 * math.sqrt(ei * ej))
    assert n14 > 50  # BMIM has 59 dihedral paths, a few share end atoms


def test_geometric_mixing_pair_energy(ff):
    """Inter-molecular LJ energy of BMIM + BF4 equals the hand sum with geometric sigma and epsilon."""
    top, positions = build_box(ff, {"BMIM": 1, "BF4": 1}, density=1000.0, seed=3)
    system = forcefield.build_system(top, ff, periodic=False)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    il = read_il_ff(CLANDP / "il.ff")
    types = read_zmat(CLANDP / "c4c1im.zmat")[0] + read_zmat(CLANDP / "BF4.zmat")[0]
    sig = np.array([il["ATOMS"][t][2] / 10 for t in types])
    eps = np.array([il["ATOMS"][t][3] for t in types])
    cation, anion = positions[:25], positions[25:] - positions[25:].mean(0)
    # Put a fluorine 0.3 nm from the ring carbon C2 so the pair energy is large and repulsive-ish.
    direction = np.array([0.0, 0.0, 1.0])
    anion = anion - anion[1] + cation[1] + 0.3 * direction

    def lj_energy(anion_xyz):
        ctx.setPositions(np.concatenate([cation, anion_xyz]))
        return ctx.getState(getEnergy=True, groups={forcefield.FORCE_GROUPS["CustomNonbondedForce"]}) \
            .getPotentialEnergy()._value

    inter = lj_energy(anion) - lj_energy(anion + 100.0)  # intramolecular parts cancel
    r = np.linalg.norm(cation[:, None] - anion[None], axis=2)
    s_geo = np.sqrt(sig[:25, None] * sig[None, 25:])
    e_geo = np.sqrt(eps[:25, None] * eps[None, 25:])
    by_hand = np.sum(4 * e_geo * ((s_geo / r) ** 12 - (s_geo / r) ** 6))
    s_ari = (sig[:25, None] + sig[None, 25:]) / 2
    lorentz = np.sum(4 * e_geo * ((s_ari / r) ** 12 - (s_ari / r) ** 6))
    assert inter == pytest.approx(by_hand, rel=1e-6)
    assert abs(lorentz - by_hand) > 1e-3 * abs(by_hand)  # the test would notice arithmetic mixing


def test_energy_components_finite_after_minimisation(ff):
    top, positions = build_box(ff, {"BMIM": 4, "BF4": 4}, density=1000.0, seed=0)
    system = forcefield.build_system(top, ff, cutoff_nm=0.5)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 100.0, 500)
    energies = forcefield.energy_components(ctx)
    assert set(energies) == set(forcefield.FORCE_GROUPS)
    assert all(math.isfinite(e) for e in energies.values()), energies
    assert energies["NonbondedForce"] < 0  # a salt: Coulomb binds
    state = ctx.getState(getForces=True)
    assert np.isfinite(state.getForces(asNumpy=True)._value).all()


def test_shipped_data_is_what_the_converter_writes(tmp_path):
    written = convert.convert(CLANDP, tmp_path, command="x")
    assert {p.name for p in written} == {"forcefield.xml", "BMIM.pdb", "BF4.pdb"}
    for path in written:
        shipped = (forcefield.DATA_DIR / path.name).read_text().splitlines()
        fresh = path.read_text().splitlines()
        strip = lambda lines: [ln for ln in lines if "<Command>" not in ln]  # noqa: E731
        assert strip(fresh) == strip(shipped), f"{path.name} is stale: regenerate with python -m openmm_cgnn.aa.convert"


def test_any_ion_with_a_zmat_converts(tmp_path):
    """Not specific to BMIM/BF4: hexafluorophosphate from il.ff, with a residue name from the caller."""
    for name in ("il.ff", "c4c1im.zmat"):
        shutil.copy(CLANDP / name, tmp_path / name)
    (tmp_path / "PF6.zmat").write_text(
        "PF6-\n\n1 P\n2 FP 1 1.606\n3 FP 1 1.606 2 90.0\n4 FP 1 1.606 2 90.0 3 90.0\n"
        "5 FP 1 1.606 2 90.0 3 180.0\n6 FP 1 1.606 2 90.0 3 -90.0\n7 FP 1 1.606 3 90.0 2 180.0\n\nil.ff\n")
    out = tmp_path / "data"
    with pytest.warns(clandp.ClandpWarning, match="angle F-P-F of atoms 3-1-5 dropped: 180.00 deg"):
        convert.convert(tmp_path, out, {"c4c1im.zmat": "BMIM", "PF6.zmat": "PF6"})
    ff = forcefield.load_forcefield(out)
    assert list(ff.residues) == ["BMIM", "PF6"] and ff.residues["PF6"].charge == pytest.approx(-1.0)
    top, _ = build_box(ff, {"BMIM": 2, "PF6": 2}, density=800.0)
    system = forcefield.build_system(top, ff, cutoff_nm=0.45)
    assert system.getNumParticles() == 2 * 25 + 2 * 7


def _corrupt(tmp_path: Path, old: str, new: str) -> Path:
    for name in ("il.ff", *convert.DEFAULT_MOLECULES):
        shutil.copy(CLANDP / name, tmp_path / name)
    path = tmp_path / "il.ff"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_corrupt_parameter_file_names_file_and_line(tmp_path):
    _corrupt(tmp_path, "CW  NA   harm   1.378   3574.0", "CW  NA   harm   1.378   35x4.0")
    with pytest.raises(clandp.ClandpError, match=r"il\.ff:\d+: r0 and k must be numbers"):
        convert.convert(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_parameter_names_the_types(tmp_path):
    _corrupt(tmp_path, "NA  CT  CT  CT   opls", "#NA  CT  CT  CT   opls")
    with pytest.raises(clandp.ClandpError, match=r"no DIHEDRALS entry for classes NA CT CT CT .*c4c1im\.zmat"):
        convert.convert(tmp_path, tmp_path / "out")


def test_missing_files_and_bad_data_dir(tmp_path):
    with pytest.raises(clandp.ClandpError, match="nothere.zmat"):
        convert.convert(CLANDP, tmp_path / "out", {"nothere.zmat": "XYZ"})
    bad = tmp_path / "data"
    shutil.copytree(forcefield.DATA_DIR, bad)
    (bad / "forcefield.xml").write_text("<ForceField><AtomTypes>")
    with pytest.raises(forcefield.ForceFieldDataError, match=r"forcefield\.xml: corrupt XML"):
        forcefield.load_forcefield(bad)
