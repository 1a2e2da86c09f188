"""The frames file and the mapping spec: round trips, hand-computed COMs and force sums, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openmm_cgnn.frames import FrameWriter, FramesError, TopologyInfo, read_frames
from openmm_cgnn.mapping.spec import (
    Bead,
    CGMapping,
    MappingError,
    ResidueMapping,
    load_cg_frames,
    make_molecules_whole,
)
from openmm_cgnn.periodic import minimum_image

BOX = np.diag([2.0, 2.0, 2.0])


def triatomic_topology(n_molecules: int) -> TopologyInfo:
    """Linear A-B-C molecules, plus one single-atom ion 'X' per molecule."""
    names, elements, masses, resname, resindex, bonds = [], [], [], [], [], []
    r = 0
    for m in range(n_molecules):
        base = len(names)
        names += ["A", "B", "C"]
        elements += ["C", "N", "O"]
        masses += [12.0, 14.0, 16.0]
        resname += ["TRI"] * 3
        resindex += [r] * 3
        bonds += [(base, base + 1), (base + 1, base + 2)]
        r += 1
        names.append("X")
        elements.append("Cl")
        masses.append(35.0)
        resname.append("ION")
        resindex.append(r)
        r += 1
    return TopologyInfo(names, elements, np.array(masses), resname, np.array(resindex), np.array(bonds))


def tri_mapping() -> CGMapping:
    return CGMapping(
        residues={
            "TRI": ResidueMapping(atoms=["A", "B", "C"], beads=[Bead("P", ["A", "B"], 26.0), Bead("Q", ["C"], 16.0)], bead_bonds=[(0, 1)]),
            "ION": ResidueMapping(atoms=["X"], beads=[Bead("I", ["X"], 35.0)]),
        }
    )


def write_run(path, top, positions, forces, temperature=300.0, kind="aa"):
    with FrameWriter(path / "frames.h5", top, {"temperature_K": temperature, "kind": kind}, with_forces=forces is not None) as w:
        for k in range(len(positions)):
            w.append(positions[k], BOX, 0.5 * k, None if forces is None else forces[k])
    return path


def test_frames_round_trip_and_slicing(tmp_path):
    top = triatomic_topology(2)
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 2, size=(5, top.n_particles, 3))
    frc = rng.normal(size=(5, top.n_particles, 3))
    write_run(tmp_path, top, pos, frc)
    frames = read_frames(tmp_path, start=1, stride=2, require_forces=True)
    assert frames.n_frames == 2
    np.testing.assert_allclose(frames.positions, pos[1::2], rtol=1e-6)
    np.testing.assert_allclose(frames.forces, frc[1::2], rtol=1e-6)
    np.testing.assert_allclose(frames.time, [0.5, 1.5])
    assert frames.topology.atom_name == top.atom_name
    assert frames.temperature_K == 300.0

    # max_frames spreads the kept frames over the whole range (first and last included)
    spread = read_frames(tmp_path, require_forces=True, max_frames=3)
    np.testing.assert_allclose(spread.positions, pos[[0, 2, 4]], rtol=1e-6)
    np.testing.assert_allclose(spread.forces, frc[[0, 2, 4]], rtol=1e-6)
    assert read_frames(tmp_path, max_frames=50).n_frames == 5
    np.testing.assert_allclose(read_frames(tmp_path, start=1, max_frames=2).time, [0.5, 2.0])
    with pytest.raises(ValueError, match="max_frames"):
        read_frames(tmp_path, max_frames=0)


def test_frame_writer_resume_appends_and_refuses_overwrite(tmp_path):
    top = triatomic_topology(1)
    pos = np.zeros((3, top.n_particles, 3))
    write_run(tmp_path, top, pos[:2], pos[:2])
    with pytest.raises(FramesError, match="already exists"):
        FrameWriter(tmp_path / "frames.h5", top, {}, with_forces=True)
    with FrameWriter(tmp_path / "frames.h5", top, {}, with_forces=True, resume=True) as w:
        assert w.n_frames == 2
        w.append(pos[2], BOX, 1.0, pos[2])
    assert read_frames(tmp_path).n_frames == 3
    other = triatomic_topology(2)
    with pytest.raises(FramesError, match="topology differs"):
        FrameWriter(tmp_path / "frames.h5", other, {}, resume=True)


def test_read_frames_errors_name_the_problem(tmp_path):
    with pytest.raises(FramesError, match="no frames file"):
        read_frames(tmp_path)
    (tmp_path / "frames.h5").write_text("not hdf5")
    with pytest.raises(FramesError, match="not a readable HDF5"):
        read_frames(tmp_path)
    run = tmp_path / "noforces"
    top = triatomic_topology(1)
    write_run(run, top, np.zeros((1, top.n_particles, 3)), None)
    with pytest.raises(FramesError, match="forces"):
        read_frames(run, require_forces=True)


def test_minimum_image_and_whole_molecules_across_the_boundary():
    box = np.array([np.diag([2.0, 2.0, 2.0])])
    d = minimum_image(np.array([[[1.9, -1.2, 0.3]]]), box)
    np.testing.assert_allclose(d, [[[-0.1, 0.8, 0.3]]])
    # A chain whose atoms were wrapped separately into the box.
    chain = np.array([[[1.8, 1.0, 1.0], [2.1, 1.0, 1.0], [2.4, 1.0, 1.0]]])
    wrapped = chain % 2.0
    whole = make_molecules_whole(wrapped, box, np.zeros(3, int), np.array([[0, 1], [1, 2]]))
    np.testing.assert_allclose(np.diff(whole[0, :, 0]), [0.3, 0.3], atol=1e-12)


def test_apply_mapping_matches_hand_computation(tmp_path):
    top = triatomic_topology(2)
    rng = np.random.default_rng(1)
    pos = rng.uniform(0.5, 1.5, size=(2, top.n_particles, 3))
    pos[:, 2] = pos[:, 1] + [0.12, 0.0, 0.0]  # keep bonded atoms close, then wrap one across x = 2
    pos[:, 0] = pos[:, 1] - [0.1, 0.0, 0.0]
    pos[0, 0, 0] = 1.95
    pos[0, 1, 0] = 2.05 - 2.0
    pos[0, 2, 0] = 2.17 - 2.0
    frc = rng.normal(size=(2, top.n_particles, 3))
    write_run(tmp_path, top, pos, frc, temperature=350.0)
    cg = load_cg_frames(tmp_path, tri_mapping())
    assert cg.n_beads == 6
    assert cg.bead_type_names == ["TRI:P", "TRI:Q", "ION:I"]
    np.testing.assert_array_equal(cg.bead_type, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(cg.molecule_index, [0, 0, 1, 2, 2, 3])
    np.testing.assert_array_equal(cg.bonds, [[0, 1], [3, 4]])
    np.testing.assert_allclose(cg.masses, [26.0, 16.0, 35.0] * 2)
    # Frame 0, molecule 0: atoms A at 1.95, B at 2.05, C at 2.17 once made whole.
    com_x = (12.0 * 1.95 + 14.0 * 2.05) / 26.0
    assert cg.positions[0, 0, 0] == pytest.approx(com_x, abs=1e-5)
    assert cg.positions[0, 1, 0] == pytest.approx(2.17, abs=1e-5)
    np.testing.assert_allclose(cg.forces[:, 0], frc[:, 0] + frc[:, 1], rtol=1e-5)
    np.testing.assert_allclose(cg.forces[:, 2], frc[:, 3], rtol=1e-5)
    np.testing.assert_allclose(cg.temperature_K, 350.0)


def test_atom_order_in_the_file_does_not_matter(tmp_path):
    top = triatomic_topology(1)
    perm = [2, 0, 1, 3]
    shuffled = TopologyInfo([top.atom_name[i] for i in perm], [top.element[i] for i in perm], top.mass[perm],
                            [top.residue_name[i] for i in perm], top.residue_index[perm], np.array([[1, 2], [2, 0]]))
    pos = np.random.default_rng(2).uniform(0.5, 1.0, size=(1, 4, 3))
    write_run(tmp_path / "a", top, pos, pos)
    write_run(tmp_path / "b", shuffled, pos[:, perm], pos[:, perm])
    a = load_cg_frames(tmp_path / "a", tri_mapping())
    b = load_cg_frames(tmp_path / "b", tri_mapping())
    np.testing.assert_allclose(a.positions, b.positions, rtol=1e-6)
    np.testing.assert_allclose(a.forces, b.forces, rtol=1e-6)


def test_mapping_json_round_trip_and_hash(tmp_path):
    mapping = tri_mapping()
    path = mapping.save(tmp_path / "mapping.json")
    again = CGMapping.load(path)
    assert again.to_dict() == mapping.to_dict()
    assert again.sha256() == mapping.sha256()
    built = ResidueMapping.from_assignment(["A", "B", "C"], [0, 0, 1], [12.0, 14.0, 16.0], bonds=[(0, 1), (1, 2)], bead_names=["P", "Q"])
    assert built.bead_bonds == [(0, 1)]
    assert [b.mass for b in built.beads] == [26.0, 16.0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["residues"]["TRI"]["beads"][0]["atoms"].append("C"), "is in beads"),
        (lambda d: d["residues"]["TRI"]["beads"][1]["atoms"].clear(), "has no atoms"),
        (lambda d: d["residues"]["TRI"]["beads"][0]["atoms"].append("Z"), "unknown atom 'Z'"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d["residues"]["TRI"]["beads"][0].pop("atoms"), "TRI"),
    ],
)
def test_bad_mapping_files_are_rejected_with_the_field(tmp_path, edit, message):
    data = tri_mapping().to_dict()
    edit(data)
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MappingError, match=message):
        CGMapping.load(path)


def test_mapping_data_mismatch_is_reported(tmp_path):
    top = triatomic_topology(1)
    write_run(tmp_path, top, np.zeros((1, 4, 3)), np.zeros((1, 4, 3)))
    only_tri = CGMapping(residues={"TRI": tri_mapping().residues["TRI"]})
    with pytest.raises(MappingError, match="residue 'ION'.*not in the mapping"):
        load_cg_frames(tmp_path, only_tri)
    renamed = tri_mapping()
    renamed.residues["TRI"] = ResidueMapping(atoms=["A", "B", "D"], beads=[Bead("P", ["A", "B", "D"])])
    with pytest.raises(MappingError, match="has atoms"):
        load_cg_frames(tmp_path, renamed)


def test_cg_runs_read_as_beads(tmp_path):
    mapping = tri_mapping()
    aa = write_run(tmp_path / "aa", triatomic_topology(2), np.random.default_rng(3).uniform(0.5, 1.5, (2, 8, 3)), None)
    mapped = load_cg_frames(aa, mapping)
    bead_top = TopologyInfo(mapped.bead_name, [""] * mapped.n_beads, mapped.masses, mapped.residue_name, mapped.molecule_index, mapped.bonds)
    cg_run = write_run(tmp_path / "cg", bead_top, mapped.positions, None, kind="cg")
    cg = load_cg_frames(cg_run, mapping)
    assert cg.same_topology(mapped)
    np.testing.assert_allclose(cg.positions, mapped.positions)
    both = type(cg).concatenate([cg, mapped])
    assert both.n_frames == 4
