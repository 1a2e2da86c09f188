"""``openmm-cgnn map``: the files it writes, and one-line errors naming the bad argument or file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mapping_toys import ToyMolecule, dimer, trimer, write_toy_run

from openmm_cgnn.cli import main
from openmm_cgnn.cli.map import parse_beads
from openmm_cgnn.mapping import CGMapping


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_toy_run(tmp_path_factory.mktemp("run"), [(trimer(), 4), (dimer(), 4)], n_frames=20, seed=2)


def map_cli(run_dir, out, *extra, beads="TRI=3,DIM=2"):
    return main(["map", "--data", str(run_dir), "--beads", beads, "--out", str(out), "--epochs", "60", "--restarts", "2", *extra])


def test_map_writes_mapping_plots_and_report(run_dir, tmp_path, capsys):
    out = tmp_path / "map"
    assert map_cli(run_dir, out, "--max-frames", "10", "--seed", "3") == 0
    mapping = CGMapping.load(out / "mapping.json")
    assert list(mapping.residues) == ["TRI", "DIM"]
    assert [len(r.beads) for r in mapping.residues.values()] == [3, 2]
    for name in ("TRI", "DIM"):
        for kind in ("loss", "assignment"):
            png = out / f"{kind}_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "mapping_report.json").read_text())
    tri = report["residues"]["TRI"]
    assert tri["chosen_seed"] in (3, 4) and tri["n_samples"] == 10 * 4
    assert set(tri["final"]) == {"loss", "rec", "inst"} and isinstance(tri["repairs"], list)
    assert report["settings"]["rho"] == pytest.approx(1.0) and report["max_frames"] == 10
    assert mapping.training["residues"]["TRI"]["final"] == tri["final"]
    printed = capsys.readouterr().out
    assert "TRI: loss" in printed and "B0" in printed
    assert not list(out.glob("*.tmp*"))


def test_several_runs_are_pooled(run_dir, tmp_path):
    # Runs may list the residues in another order (and hold other molecule counts): samples pool.
    second = write_toy_run(tmp_path / "second", [(dimer(), 3), (trimer(), 2)], n_frames=5, seed=9)
    out = tmp_path / "map"
    assert main(["map", "--data", str(run_dir), str(second), "--beads", "DIM=2,TRI=3", "--out", str(out), "--epochs", "30",
                 "--restarts", "1"]) == 0
    report = json.loads((out / "mapping_report.json").read_text())
    assert report["residues"]["TRI"]["n_samples"] == 4 * 20 + 2 * 5
    assert report["residues"]["DIM"]["n_samples"] == 4 * 20 + 3 * 5
    assert list(CGMapping.load(out).residues) == ["TRI", "DIM"]  # order of the first run


def test_one_bead_residue_needs_no_training(run_dir, tmp_path):
    out = tmp_path / "map"
    assert map_cli(run_dir, out, beads="TRI=1,DIM=1") == 0
    report = json.loads((out / "mapping_report.json").read_text())
    assert report["residues"]["DIM"]["restarts"] == [] and report["residues"]["DIM"]["final"]["rec"] > 0
    assert CGMapping.load(out).residues["DIM"].beads[0].atoms == ["X1", "X2", "Y1", "Y2"]
    assert (out / "loss_DIM.png").exists()


def test_parse_beads():
    assert list(parse_beads("BMIM=4, BF4=1").items()) == [("BMIM", 4), ("BF4", 1)]


@pytest.mark.parametrize(
    "beads, message",
    [
        ("TRI=3", "--beads: no bead count for residue(s) DIM; give one for every residue present: TRI (11 atoms), DIM (4 atoms)"),
        ("TRI=3,DIM=2,FOO=1", "--beads: residue(s) FOO not in the data"),
        ("TRI=3,DIM=5", "--beads: residue 'DIM': 5 beads requested but it has only 4 atoms"),
        ("TRI=10,DIM=2", "--beads: residue 'TRI': 10 beads requested but it has only 9 heavy atoms"),
        ("TRI=three,DIM=2", "--beads: malformed item 'TRI=three'"),
        ("TRI:3", "--beads: malformed item 'TRI:3'"),
        ("TRI=3,TRI=2,DIM=2", "--beads: residue TRI is given twice"),
        ("TRI=0,DIM=2", "--beads: TRI=0; a residue needs at least 1 bead"),
    ],
)
def test_bad_beads_are_refused_before_anything_is_written(run_dir, tmp_path, capsys, beads, message):
    from openmm_cgnn.io import MARKER, write_marker

    out = tmp_path / "map"
    out.mkdir()
    (out / "mapping.json").write_text("previous")
    write_marker(out, "mapping")  # an earlier map run, which --overwrite may replace
    assert map_cli(run_dir, out, "--overwrite", beads=beads) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "mapping.json"])
    assert (out / "mapping.json").read_text() == "previous"


def test_data_without_forces(tmp_path, capsys):
    run = write_toy_run(tmp_path / "noforces", [(dimer(), 2)], n_frames=3, with_forces=False)
    assert map_cli(run, tmp_path / "map", beads="DIM=2") == 2
    err = capsys.readouterr().err
    assert "--data" in err and "noforces/frames.h5" in err and "'forces'" in err


def test_missing_data_directory(tmp_path, capsys):
    assert map_cli(tmp_path / "nowhere", tmp_path / "map") == 2
    assert "nowhere" in capsys.readouterr().err


def test_inconsistent_topology_across_files(run_dir, tmp_path, capsys):
    # Same residue name, other atom names: the runs cannot share one mapping.
    other = dimer()
    renamed = ToyMolecule("DIM", ["X1", "X2", "Y1", "Z9"], other.elements, other.clusters, other.offsets, other.bonds)
    second = write_toy_run(tmp_path / "second", [(trimer(), 4), (renamed, 4)], n_frames=3)
    assert main(["map", "--data", str(run_dir), str(second), "--beads", "TRI=3,DIM=2", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "second/frames.h5" in err and "residue 'DIM' has a different topology" in err
    # A run with other residue types is refused too.
    third = write_toy_run(tmp_path / "third", [(dimer(), 4)], n_frames=3)
    assert main(["map", "--data", str(run_dir), str(third), "--beads", "TRI=3,DIM=2", "--out", str(tmp_path / "m")]) == 2
    assert "third/frames.h5: residue types ['DIM'] differ" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_molecules_of_one_residue_must_match(tmp_path, capsys):
    other = dimer()
    renamed = ToyMolecule("DIM", ["X1", "X2", "Y1", "Z9"], other.elements, other.clusters, other.offsets, other.bonds)
    run = write_toy_run(tmp_path / "mixed", [(dimer(), 2), (renamed, 2)], n_frames=3)
    assert map_cli(run, tmp_path / "map", beads="DIM=2") == 2
    assert "molecules of residue 'DIM' differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--restarts", "0"], "--restarts must be >= 1"),
        (["--rho", "-1"], "--rho must be >= 0"),
        (["--max-frames", "0"], "--max-frames must be >= 1"),
    ],
)
def test_bad_numbers(run_dir, tmp_path, capsys, extra, message):
    assert map_cli(run_dir, tmp_path / "map", *extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_device(run_dir, tmp_path, capsys):
    assert map_cli(run_dir, tmp_path / "map", "--device", "cuda") == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_training_gives_a_valid_map(run_dir, tmp_path):
    out = tmp_path / "map"
    assert map_cli(run_dir, out, "--device", "cuda") == 0
    mapping = CGMapping.load(out)
    assert {frozenset(b.atoms) for b in mapping.residues["DIM"].beads} == {frozenset({"X1", "X2"}), frozenset({"Y1", "Y2"})}
    assert np.isfinite(json.loads((out / "mapping_report.json").read_text())["residues"]["TRI"]["final"]["loss"])
