"""``openmm-cgnn import``: GROMACS and LAMMPS files written from a real run come back as the same frames.

The source is a short OpenMM run of the synthetic liquid (openmm_cgnn/testing/known_potential.py) stored as an
all-atom run: dimers A-B and monomers X, 40 amu each (written out as argon). Its files are written
with MDAnalysis's own writers (PDB, TRR, LAMMPS data); MDAnalysis has no LAMMPS dump writer, so the
dump text is written here. Atoms are wrapped into the box one by one, as MD programs write them, so
the import must rebuild whole, continuous molecules.
"""

from __future__ import annotations

import json
import warnings

import MDAnalysis as mda  # in the test extra: the import command's tests must run in CI
import numpy as np
import pytest

from openmm_cgnn.aa.importer import UNIT_STYLES, Unwrapper
from openmm_cgnn.cli import main
from openmm_cgnn.frames import read_frames
from openmm_cgnn.testing.known_potential import SyntheticSystem

LAMMPS_DT_FS = 5.0  # the synthetic run's 0.005 ps step


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # Argon's own mass: a PDB carries no masses, so the import takes the element's, and the
    # mapping (whose bead masses must match the atoms') then fits both runs.
    run = SyntheticSystem(mass_amu=39.948).simulate(tmp_path_factory.mktemp("import") / "run", n_frames=40, steps_per_frame=20, kind="aa")
    return read_frames(run, require_forces=True), run / "mapping.json"


def atom_types(topology):
    """LAMMPS atom types 1, 2, ...: one per (residue, atom name), numbered by first appearance."""
    types: dict[tuple[str, str], int] = {}
    return [types.setdefault(key, len(types) + 1) for key in zip(topology.residue_name, topology.atom_name)]


def wrapped(frames):
    """Atoms put into the box one by one, as GROMACS and LAMMPS write them (orthorhombic box)."""
    lengths = np.diagonal(frames.box, axis1=1, axis2=2)[:, None, :]
    return np.mod(frames.positions, lengths)


def universe(frames, positions_nm, forces=True):
    """An MDAnalysis Universe holding the frames, in MDAnalysis's base units (Å, kJ/mol/Å)."""
    from MDAnalysis.coordinates.memory import MemoryReader

    top = frames.topology
    n_res = top.n_residues
    u = mda.Universe.empty(top.n_particles, n_res, atom_resindex=top.residue_index, trajectory=False)
    u.add_TopologyAttr("names", top.atom_name)
    u.add_TopologyAttr("elements", [e or "Ar" for e in top.element])  # synthetic atoms: argon
    u.add_TopologyAttr("types", [str(t) for t in atom_types(top)])
    u.add_TopologyAttr("masses", top.mass)
    u.add_TopologyAttr("charges", np.zeros(top.n_particles))
    u.add_TopologyAttr("resnames", [top.residue_name[top.residue_atoms(r)[0]] for r in range(n_res)])
    u.add_TopologyAttr("resids", np.arange(1, n_res + 1))
    for name in ("bonds", "angles", "dihedrals", "impropers"):
        u.add_TopologyAttr(name, [])
    u.add_bonds([tuple(b) for b in top.bonds], types=["1"] * len(top.bonds))
    lengths = np.diagonal(frames.box, axis1=1, axis2=2) * 10.0
    dimensions = np.hstack([lengths, np.full((frames.n_frames, 3), 90.0)])
    u.load_new(positions_nm * 10.0, format=MemoryReader, dimensions=dimensions,
               forces=frames.forces / 10.0 if forces else None, dt=float(frames.time[1] - frames.time[0]))
    return u


def write_gromacs(frames, folder, forces=True, atoms=None):
    """topology.pdb (names, residues, elements, CONECT bonds) and traj.trr with times and forces."""
    folder.mkdir(parents=True, exist_ok=True)
    u = universe(frames, wrapped(frames), forces=forces)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u.atoms.write(folder / "topology.pdb", bonds="conect")
        selection = u.atoms if atoms is None else u.atoms[atoms]
        with mda.Writer(str(folder / "traj.trr"), selection.n_atoms) as writer:
            for k, ts in enumerate(u.trajectory):
                ts.time = float(frames.time[k])
                writer.write(selection)
    return folder / "topology.pdb", folder / "traj.trr"


def write_lammps(frames, folder, style="real", force_columns=True):
    """system.data by MDAnalysis's DATAWriter, and a dump in ``style`` units written here."""
    folder.mkdir(parents=True, exist_ok=True)
    u = universe(frames, wrapped(frames))
    u.trajectory[0]
    u.trajectory.ts.data["molecule_tag"] = frames.topology.residue_index + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u.atoms.write(folder / "system.data")
    units = UNIT_STYLES[style]
    positions = wrapped(frames) / units.length_nm
    forces = frames.forces / units.force_kj_mol_nm
    dt_native = LAMMPS_DT_FS * 1e-3 / units.time_ps
    columns = "id type x y z fx fy fz" if force_columns else "id type x y z"
    types = atom_types(frames.topology)
    lines = []
    for k in range(frames.n_frames):
        step = int(round(frames.time[k] / (dt_native * units.time_ps)))
        edge = np.diagonal(frames.box[k]) / units.length_nm
        lines += ["ITEM: TIMESTEP", str(step), "ITEM: NUMBER OF ATOMS", str(frames.topology.n_particles),
                  "ITEM: BOX BOUNDS pp pp pp", *(f"0 {e:.10g}" for e in edge), f"ITEM: ATOMS {columns}"]
        order = np.random.default_rng(k).permutation(frames.topology.n_particles)  # dumps are not sorted by id
        for i in order:
            row = f"{i + 1} {types[i]} " + " ".join(f"{x:.9g}" for x in positions[k, i])
            if force_columns:
                row += " " + " ".join(f"{f:.9g}" for f in forces[k, i])
            lines.append(row)
    (folder / "forces.lammpstrj").write_text("\n".join(lines) + "\n")
    return folder / "system.data", folder / "forces.lammpstrj", dt_native


def import_cli(capsys, *args):
    code = main(["import", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_frames(imported, original, position_tol, force_rtol):
    """Same forces, box and times; positions equal up to one lattice vector per molecule, for all frames."""
    assert imported.n_frames == original.n_frames
    np.testing.assert_allclose(imported.box, original.box, atol=1e-6)
    np.testing.assert_allclose(imported.time, original.time, atol=1e-6)
    scale = np.abs(original.forces).max()
    np.testing.assert_allclose(imported.forces, original.forces, rtol=force_rtol, atol=force_rtol * scale)
    shift = imported.positions.astype(np.float64) - original.positions
    top = original.topology
    for r in range(top.n_residues):
        atoms = top.residue_atoms(r)
        per_molecule = shift[0, atoms[0]]
        np.testing.assert_allclose(shift[:, atoms], np.broadcast_to(per_molecule, shift[:, atoms].shape), atol=position_tol)
        cells = per_molecule / np.diagonal(original.box[0])
        np.testing.assert_allclose(cells, np.round(cells), atol=position_tol)


def test_gromacs_round_trip_then_train(source, tmp_path, capsys):
    frames, mapping = source
    pdb, trr = write_gromacs(frames, tmp_path / "gmx")
    out = tmp_path / "imported"
    code, printed, err = import_cli(capsys, "--topology", pdb, "--trajectory", trr, "--temperature", 300, "--out", out,
                                    "--mapping", mapping)
    assert code == 0, err
    assert "units gromacs" in printed and "DIM: 12 molecules of 2 atoms" in printed and "re-imaged" in printed
    imported = read_frames(out, require_forces=True)
    assert_same_frames(imported, frames, position_tol=2e-5, force_rtol=1e-6)
    top = imported.topology
    assert top.atom_name == frames.topology.atom_name and top.residue_name == frames.topology.residue_name
    assert np.array_equal(top.residue_index, frames.topology.residue_index)
    assert sorted(map(tuple, top.bonds.tolist())) == sorted(map(tuple, frames.topology.bonds.tolist()))
    np.testing.assert_allclose(top.mass, 39.948, atol=1e-3)  # a PDB has no masses: the element's
    assert set(top.element) == {"Ar"} and "CONECT" in top.pdb and (out / "topology.pdb").read_text() == top.pdb
    meta = imported.metadata
    assert meta["kind"] == "aa" and meta["temperature_K"] == 300.0
    assert meta["source"]["units"]["native"] == {"length": "nm", "force": "kJ/mol/nm", "time": "ps"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_frames"] == frames.n_frames and summary["atom_frames_reimaged"] > 0

    # Training on the import gives what training on the original run gives (same seed and settings).
    rmse = {}
    for name, data in (("imported", out), ("original", frames.path.parent)):
        model = tmp_path / f"model_{name}"
        assert main(["train", "--data", str(data), "--mapping", str(mapping), "--out", str(model), "--quick", "--epochs", "1",
                     "--no-progress", "--device", "cpu", "--model-option", "features=12"]) == 0
        rmse[name] = json.loads((model / "metrics.json").read_text())["validation"]["overall"]["rmse"]
    assert "validation force RMSE" in capsys.readouterr().out
    assert np.isfinite(rmse["imported"]) and rmse["imported"] == pytest.approx(rmse["original"], rel=1e-3)


@pytest.mark.parametrize("style", ["real", "metal"])
def test_lammps_units_round_trip(source, tmp_path, capsys, style):
    frames, _ = source
    data, dump, dt_native = write_lammps(frames, tmp_path / "lmp", style)
    if style == "real":  # the numbers in the file are Å and kcal/mol/Å: 10 and 1/41.84 of ours
        first = dump.read_text().splitlines()[9].split()
        i = int(first[0]) - 1
        assert float(first[2]) == pytest.approx(wrapped(frames)[0, i, 0] * 10.0, rel=1e-6)
        assert float(first[5]) == pytest.approx(frames.forces[0, i, 0] / 41.84, rel=1e-6)
    out = tmp_path / "imported"
    code, printed, err = import_cli(capsys, "--topology", data, "--trajectory", dump, "--units", style, "--temperature", 300,
                                    "--out", out, "--lammps-timestep", dt_native, "--residue-map", "MOL1=DIM,Ar=MON")
    assert code == 0, err
    assert f"units {style}" in printed and "MOL1 -> DIM: 12 molecules of 2 atoms (Ar2)" in printed
    imported = read_frames(out, require_forces=True)
    assert_same_frames(imported, frames, position_tol=2e-5, force_rtol=2e-6)
    top = imported.topology
    assert top.residue_name == frames.topology.residue_name and np.array_equal(top.mass, frames.topology.mass)
    assert top.atom_name[:3] == ["Ar1", "Ar2", "Ar1"]  # element + index in the molecule
    assert imported.metadata["source"]["units"]["style"] == style


def test_lammps_import_map_train(source, tmp_path, capsys):
    frames, _ = source
    data, dump, _ = write_lammps(frames, tmp_path / "lmp", "real")
    out = tmp_path / "imported"
    code, printed, err = import_cli(capsys, "--topology", data, "--trajectory", dump, "--units", "real", "--temperature", 300,
                                    "--out", out, "--residue-map", "MOL1=DIM,MOL2=MON")
    assert code == 0, err
    assert "time: dump step x 1 fs" in printed  # the LAMMPS default for units real, stated
    np.testing.assert_allclose(read_frames(out).time, frames.time / LAMMPS_DT_FS, rtol=1e-9)
    mapdir, model = tmp_path / "map", tmp_path / "model"
    assert main(["map", "--data", str(out), "--beads", "DIM=2,MON=1", "--out", str(mapdir), "--epochs", "20",
                 "--restarts", "1"]) == 0
    assert main(["train", "--data", str(out), "--mapping", str(mapdir / "mapping.json"), "--out", str(model), "--quick",
                 "--epochs", "1", "--no-progress", "--device", "cpu", "--model-option", "features=12"]) == 0
    assert "validation force RMSE" in capsys.readouterr().out
    # That mapping names the molecule types by their atoms: MOL2 (one Ar1) is MON without --residue-map.
    again = tmp_path / "again"
    code, printed, err = import_cli(capsys, "--topology", data, "--trajectory", dump, "--units", "real", "--temperature", 300,
                                    "--out", again, "--mapping", mapdir / "mapping.json", "--residue-map", "MOL1=DIM")
    assert code == 0, err
    assert read_frames(again).topology.residue_name == frames.topology.residue_name


def test_errors_are_one_line_and_leave_nothing(source, tmp_path, capsys):
    frames, mapping = source
    pdb, trr = write_gromacs(frames, tmp_path / "gmx")
    data, dump, _ = write_lammps(frames, tmp_path / "lmp")
    out = tmp_path / "out"

    def fails(*args, expect):
        code, _, err = import_cli(capsys, "--temperature", 300, "--out", out, *args)
        assert code == 2 and err.count("\n") == 1, err
        for text in expect:
            assert text in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))

    no_forces = write_gromacs(frames, tmp_path / "noforce", forces=False)
    fails("--topology", no_forces[0], "--trajectory", no_forces[1], expect=["traj.trr", "no frames with forces", "nstfout"])
    fewer = write_gromacs(frames, tmp_path / "fewer", atoms=slice(0, 30))
    fails("--topology", pdb, "--trajectory", fewer[1], expect=["30 atoms per frame", "has 36"])
    lmp_no_forces = write_lammps(frames, tmp_path / "lmpnf", force_columns=False)
    fails("--topology", lmp_no_forces[0], "--trajectory", lmp_no_forces[1], "--units", "real",
          expect=["forces.lammpstrj", "fx fy fz"])
    fails("--topology", data, "--trajectory", dump, "--units", "lj", expect=["--units lj", "real, metal"])
    fails("--topology", data, "--trajectory", dump, "--units", "si", expect=["--units si: unknown unit style"])
    fails("--topology", data, "--trajectory", dump, expect=["--units is required"])
    fails("--topology", pdb, "--trajectory", trr, "--units", "real", expect=["--units real", "GROMACS"])
    fails("--topology", pdb, "--trajectory", tmp_path / "traj.xtc", expect=["--format"])
    fails("--topology", pdb, "--trajectory", tmp_path / "missing.trr", expect=["--trajectory", "no such file"])
    fails("--topology", data, "--trajectory", dump, "--units", "real", "--residue-map", "MOL9=BMIM",
          expect=["--residue-map MOL9=BMIM", "MOL1 (Ar2)", "MOL2 (Ar)"])
    fails("--topology", data, "--trajectory", dump, "--units", "real", "--residue-map", "MOL1",
          expect=["--residue-map: malformed item"])
    fails("--topology", data, "--trajectory", dump, "--units", "real", "--mapping", mapping, "--residue-map", "MOL1=DIM",
          expect=["MOL1 -> DIM has atoms Ar1 Ar2", "mapping's DIM has A B"])
    fails("--topology", data, "--trajectory", dump, "--units", "real", "--residue-map", "MOL1=MON,MOL2=MON",
          expect=["MOL1 and MOL2 are both named MON but have different atoms"])
    fails("--topology", pdb, "--trajectory", trr, "--residue-map", "DIM=BMIM", "--mapping", mapping,
          expect=["named BMIM, which the mapping does not have"])

    # No box: a TRR whose frames have none.
    u = universe(frames, wrapped(frames))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mda.Writer(str(tmp_path / "nobox.trr"), u.atoms.n_atoms) as writer:
            for ts in u.trajectory:
                ts.dimensions = None
                writer.write(u.atoms)
    fails("--topology", pdb, "--trajectory", tmp_path / "nobox.trr", expect=["nobox.trr", "no periodic box"])

    # NaN forces late in the file: the import stops, and an older result in --out is kept as it was.
    bad = read_frames(frames.path, require_forces=True)
    bad.forces[-1, 0, 0] = np.nan
    nan_files = write_gromacs(bad, tmp_path / "nan")
    assert import_cli(capsys, "--topology", pdb, "--trajectory", trr, "--temperature", 300, "--out", out)[0] == 0
    before = (out / "frames.h5").read_bytes()
    code, _, err = import_cli(capsys, "--topology", nan_files[0], "--trajectory", nan_files[1], "--temperature", 300,
                              "--out", out, "--overwrite")
    assert code == 2 and "NaN" in err and (out / "frames.h5").read_bytes() == before
    assert not list(tmp_path.glob(".out.*"))
    code, _, err = import_cli(capsys, "--topology", pdb, "--trajectory", trr, "--temperature", 300, "--out", out)
    assert code == 2 and "--overwrite" in err and "--resume" not in err
    # --overwrite replaces only an aa directory: the user's own files are never removed.
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    code, _, err = import_cli(capsys, "--topology", pdb, "--trajectory", trr, "--temperature", 300, "--out", own,
                              "--overwrite")
    assert code == 2 and "refuses to replace" in err and [p.name for p in own.iterdir()] == ["notes.txt"]


def test_unwrapper_follows_a_molecule_across_a_triclinic_box():
    # One rigid dimer walking along a in a triclinic box; its atoms are wrapped separately each frame.
    box = np.array([[2.0, 0.0, 0.0], [0.6, 1.8, 0.0], [0.3, 0.4, 1.7]])
    steps = np.arange(30)[:, None] * np.array([0.23, 0.11, -0.07])
    true = np.stack([steps, steps + np.array([0.1, 0.05, 0.0])], axis=1)  # (F, 2, 3)
    boxes = np.broadcast_to(box, (30, 3, 3))
    frac = np.einsum("fni,ij->fnj", true, np.linalg.inv(box))
    wrapped_positions = np.einsum("fnj,ji->fni", frac - np.floor(frac), box)
    unwrapper = Unwrapper(np.array([0, 0]), np.array([[0, 1]]))
    out = np.concatenate([unwrapper(wrapped_positions[:10], boxes[:10]), unwrapper(wrapped_positions[10:], boxes[10:])])
    np.testing.assert_allclose(out - out[0, 0], true - true[0, 0], atol=1e-9)  # one lattice shift overall
    assert unwrapper.atoms_moved > 0


def test_gro_topology_without_bonds_or_masses(source, tmp_path, capsys):
    frames, _ = source
    pdb, trr = write_gromacs(frames, tmp_path / "gmx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = mda.Universe(str(pdb))
        u.atoms.write(tmp_path / "conf.gro")  # names A, B, X: no element, so no mass, can be told from them
        code, _, err = import_cli(capsys, "--topology", tmp_path / "conf.gro", "--trajectory", trr, "--temperature", 300,
                                  "--out", tmp_path / "out")
        assert code == 2 and "conf.gro: atom 1 has no mass" in err
        u.atoms.names = [{"A": "C1", "B": "C2", "X": "C3"}[a] for a in u.atoms.names]  # carbon: 12.011 amu; no bond at 0.3 nm
        u.atoms.write(tmp_path / "carbon.gro")
    out = tmp_path / "carbon"
    code, printed, err = import_cli(capsys, "--topology", tmp_path / "carbon.gro", "--trajectory", trr, "--temperature", 300,
                                    "--out", out)
    assert code == 0, err
    assert "made whole around their first atom" in printed
    imported = read_frames(out, require_forces=True)
    assert_same_frames(imported, frames, position_tol=2e-5, force_rtol=1e-6)  # dimers are whole all the same
    np.testing.assert_allclose(imported.topology.mass, 12.011) and imported.topology.bonds.size == 0


def test_without_mdanalysis_the_error_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "MDAnalysis", None)  # as if not installed
    (tmp_path / "t.pdb").write_text("END\n")
    (tmp_path / "t.trr").write_bytes(b"")
    code, _, err = import_cli(capsys, "--topology", tmp_path / "t.pdb", "--trajectory", tmp_path / "t.trr", "--temperature", 300,
                              "--out", tmp_path / "out")
    assert code == 2 and "pip install 'openmm_cgnn[import]'" in err and not (tmp_path / "out").exists()
