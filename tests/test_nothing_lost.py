"""Nothing lost, nothing silently wrong (issue 12): each case reproduced with real runs.

Every refusal is one line on stderr naming the file or option, with a non-zero exit, and leaves
what was there byte-identical; a run that had started records its failure in summary.json.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm)

from models.make_models import make_model_dir, write_aa_run
from openmm_cgnn.cli import main
from openmm_cgnn.io import MARKER, read_marker, write_marker
from openmm_cgnn.mapping.spec import CGMapping
from openmm_cgnn.testing.known_potential import SyntheticSystem


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) -> SHA-256 of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def refused(capsys, args: list, *needles: str, code: int = 2) -> str:
    assert main([str(a) for a in args]) == code
    err = one_line(capsys)
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lost")


@pytest.fixture(scope="module")
def model_dir(root):
    """A model directory as train leaves it: marker, and the mapping's hash in checkpoint.pt."""
    from openmm_cgnn.model import load_model, save_checkpoint

    folder = make_model_dir(root / "model")
    mapping = CGMapping.load(folder / "mapping.json")
    save_checkpoint(folder, load_model(folder), epoch=0, extra={"mapping_sha256": mapping.sha256()})
    write_marker(folder, "model")
    return folder


@pytest.fixture(scope="module")
def aa_run(root, cg):
    return write_aa_run(root / "aa", cg, temperature_K=350.0)


def simulate_args(model, aa, out, steps=40):
    return ["simulate", "--forcefield", model, "--from-aa", aa, "--temperature", "350", "--steps", str(steps),
            "--dt-fs", "5", "--platform", "CPU", "--save-every-steps", "20", "--seed", "3", "--quiet", "--out", out]


@pytest.fixture(scope="module")
def cg_run(root, model_dir, aa_run):
    out = root / "cg"
    assert main([str(a) for a in simulate_args(model_dir, aa_run, out)]) == 0
    assert read_marker(out) == "cg"
    return out


@pytest.fixture
def cg_copy(cg_run, tmp_path):
    return Path(shutil.copytree(cg_run, tmp_path / "cg"))


def renamed_mapping(model_dir, path):
    """The model's mapping with one bead renamed: the same molecules, another mapping (another sha256)."""
    data = json.loads((model_dir / "mapping.json").read_text())
    data["residues"]["CAT"]["beads"][0]["name"] = "Z"
    path.write_text(json.dumps(data))
    return path


# ---- lost results ----------------------------------------------------------------------------------
def test_simulate_overwrite_with_bad_platform_keeps_the_old_run(cg_copy, model_dir, aa_run, capsys):
    before = tree(cg_copy)
    refused(capsys, simulate_args(model_dir, aa_run, cg_copy) + ["--overwrite", "--platform", "NoSuchPlatform"],
            "NoSuchPlatform")
    assert tree(cg_copy) == before


def test_simulate_overwrite_that_fails_keeps_the_old_run_and_records_why(cg_copy, model_dir, aa_run, capsys):
    before = tree(cg_copy)
    args = [a for a in simulate_args(model_dir, aa_run, cg_copy) if a not in ("--dt-fs", "5")]
    # A 2 ps time step cannot be integrated: the new run fails after it started.
    assert main([str(a) for a in args + ["--overwrite", "--dt-candidates-fs", "2000"]]) != 0
    err = capsys.readouterr().err
    assert tree(cg_copy) == before
    attempt = cg_copy.parent / f".{cg_copy.name}.partial"
    assert str(attempt) in err
    summary = json.loads((attempt / "summary.json").read_text())
    assert summary["status"].startswith("failed") and summary["error"]


def test_simulate_on_a_full_disk_records_the_failure(model_dir, aa_run, tmp_path, capsys, monkeypatch):
    from openmm_cgnn.frames import FrameWriter

    real_append = FrameWriter.append

    def disk_full_at_second_frame(self, *args, **kwargs):
        if self.n_frames == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(FrameWriter, "append", disk_full_at_second_frame)
    out = tmp_path / "cg"
    err = refused(capsys, simulate_args(model_dir, aa_run, out), "No space left on device", str(out / "frames.h5"), code=1)
    assert err.startswith("openmm-cgnn simulate: error:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed: OSError" and "No space left on device" in summary["error"]


def test_export_onto_its_own_model_is_refused(model_dir, aa_run, tmp_path, capsys):
    before = tree(model_dir)
    refused(capsys, ["export", "--model", model_dir, "--from-aa", aa_run, "--out", model_dir, "--overwrite"],
            str(model_dir), "holds a model directory")
    assert tree(model_dir) == before
    # A directory without a marker (an older version's, or the user's) is never replaced.
    legacy = Path(shutil.copytree(model_dir, tmp_path / "legacy"))
    (legacy / MARKER).unlink()
    before = tree(legacy)
    refused(capsys, ["export", "--model", model_dir, "--from-aa", aa_run, "--out", legacy, "--overwrite"],
            str(legacy), MARKER, "remove it yourself")
    assert tree(legacy) == before


def test_aa_overwrite_refuses_a_cg_run_with_a_model_inside(cg_copy, model_dir, capsys):
    shutil.copytree(model_dir, cg_copy / "model")
    before = tree(cg_copy)
    refused(capsys, ["aa", "--pairs", "8", "--temperature", "450", "--equilibrate-ps", "0.4", "--production-ps", "0.2",
                     "--save-every-ps", "0.1", "--platform", "CPU", "--out", cg_copy, "--overwrite"],
            str(cg_copy), "holds a cg directory")
    assert tree(cg_copy) == before


def test_evaluate_and_map_refuse_a_model_directory(model_dir, aa_run, capsys):
    before = tree(model_dir)
    refused(capsys, ["evaluate", "--aa", aa_run, "--mapping", model_dir / "mapping.json", "--out", model_dir, "--quiet"],
            str(model_dir), "holds a model directory")
    refused(capsys, ["map", "--data", aa_run, "--beads", "CAT=3,ANI=1", "--out", model_dir, "--epochs", "1"],
            str(model_dir), "holds a model directory")
    refused(capsys, ["map", "--data", aa_run, "--beads", "CAT=3,ANI=1", "--out", model_dir, "--overwrite"],
            str(model_dir), "holds a model directory")
    assert tree(model_dir) == before


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: use a file system that takes no files
        yield Path("/proc/self/openmm_cgnn_out")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder / "out"
    folder.chmod(0o700)


@pytest.mark.parametrize("stage", ["aa", "map", "train", "export", "simulate", "evaluate"])
def test_unwritable_out_fails_before_any_compute(stage, read_only_dir, model_dir, aa_run, capsys):
    args = {
        "aa": ["aa", "--pairs", "8", "--temperature", "450", "--equilibrate-ps", "0.4", "--production-ps", "0.2",
               "--save-every-ps", "0.1", "--platform", "CPU"],
        "map": ["map", "--data", aa_run, "--beads", "CAT=3,ANI=1"],
        "train": ["train", "--data", aa_run, "--mapping", model_dir / "mapping.json", "--quick", "--no-progress"],
        "export": ["export", "--model", model_dir, "--from-aa", aa_run],
        "simulate": simulate_args(model_dir, aa_run, read_only_dir)[:-2],
        "evaluate": ["evaluate", "--aa", aa_run, "--mapping", model_dir / "mapping.json"],
    }[stage]
    refused(capsys, args + ["--out", read_only_dir], "--out", str(read_only_dir), "cannot write")


# ---- silently wrong ---------------------------------------------------------------------------------
def test_a_model_never_meets_another_mapping(model_dir, aa_run, tmp_path, capsys):
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    renamed_mapping(model_dir, model / "mapping.json")  # what `map --out MODELDIR` used to do
    before = tree(model)
    refused(capsys, simulate_args(model, aa_run, tmp_path / "cg"), str(model / "mapping.json"), "trained with")
    refused(capsys, ["export", "--model", model, "--from-aa", aa_run, "--out", tmp_path / "export"],
            str(model / "mapping.json"), "trained with")
    assert tree(model) == before
    assert not (tmp_path / "cg").exists() and not (tmp_path / "export").exists()


def test_evaluate_refuses_a_mapping_other_than_the_cg_runs(cg_run, aa_run, model_dir, tmp_path, capsys):
    other = renamed_mapping(model_dir, tmp_path / "other.json")
    refused(capsys, ["evaluate", "--aa", aa_run, "--cg", cg_run, "--mapping", other, "--out", tmp_path / "report",
                     "--quiet"], str(cg_run), "another mapping", "--mapping")
    assert not (tmp_path / "report").exists()


def test_simulate_resume_with_another_model_is_refused(cg_copy, aa_run, tmp_path, capsys):
    other = make_model_dir(tmp_path / "other", seed=1)
    before = tree(cg_copy)
    refused(capsys, simulate_args(other, aa_run, cg_copy, steps=80) + ["--resume"], "another model", "cannot resume")
    assert tree(cg_copy) == before


def test_truncated_cg_checkpoint_is_refused(cg_copy, model_dir, aa_run, capsys):
    checkpoint = cg_copy / "checkpoint.chk"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = tree(cg_copy)
    refused(capsys, simulate_args(model_dir, aa_run, cg_copy, steps=80) + ["--resume"], str(checkpoint),
            "corrupt checkpoint")
    assert tree(cg_copy) == before


@pytest.fixture(scope="module")
def synthetic_run(root):
    return SyntheticSystem().simulate(root / "synthetic", n_frames=20, steps_per_frame=20)


def train_args(run, out, *extra):
    return ["train", "--data", run, "--mapping", run / "mapping.json", "--out", out, "--quick", "--no-progress",
            "--device", "cpu", *extra]


def test_train_resume_treats_every_option_alike(synthetic_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main([str(a) for a in train_args(synthetic_run, out, "--epochs", "1", "--model-option", "features=12")]) == 0
    capsys.readouterr()
    assert read_marker(out) == "model"
    before = tree(out)
    for options in (["--model-option", "features=16"], []):  # changed, and left out (back to the default)
        refused(capsys, train_args(synthetic_run, out, "--epochs", "2", "--resume", *options), "cannot resume",
                "features: 12 there")
    refused(capsys, train_args(synthetic_run, out, "--epochs", "2", "--resume", "--model-option", "features=12",
                               "--lr", "1e-2"), "cannot resume", "lr")
    other = tmp_path / "other.json"
    data = json.loads((synthetic_run / "mapping.json").read_text())
    data["residues"]["DIM"]["bead_bonds"] = []  # another mapping of the same beads
    other.write_text(json.dumps(data))
    refused(capsys, ["train", "--data", synthetic_run, "--mapping", other, "--out", out, "--quick", "--no-progress",
                     "--epochs", "2", "--resume", "--model-option", "features=12"], "cannot resume", "--mapping")
    assert tree(out) == before
    # --overwrite builds the new model beside the old one and swaps it in when it is finished.
    assert main([str(a) for a in train_args(synthetic_run, out, "--epochs", "1", "--overwrite")]) == 0
    assert json.loads((out / "hparams.json").read_text())["features"] == 32 and read_marker(out) == "model"
    assert not (out.parent / f".{out.name}.partial").exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d["residues"]["MON"]["beads"][0].update(mass=-5), ["'mass' must be a positive", "-5"]),
    (lambda d: d["residues"]["MON"]["beads"][0].update(mass=0), ["'mass' must be a positive"]),
    (lambda d: d["residues"]["MON"]["beads"][0].update(mass=41.0), ["weigh", "40"]),
    (lambda d: [], ["expected a JSON object", "list"]),
    (lambda d: {"format": d["format"], "residues": {"MON": []}}, ["residue 'MON'"]),
])
def test_bad_mappings_are_refused(synthetic_run, tmp_path, capsys, edit, needles):
    data = json.loads((synthetic_run / "mapping.json").read_text())
    edited = edit(data)
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(data if edited is None else edited))
    refused(capsys, ["train", "--data", synthetic_run, "--mapping", path, "--out", tmp_path / "model", "--quick",
                     "--no-progress"], str(path), *needles)
    assert not (tmp_path / "model").exists()


# ---- smaller items ----------------------------------------------------------------------------------
def test_train_quick_on_a_small_box_says_which_option_to_change(tmp_path, capsys):
    run = SyntheticSystem(n_dimers=5, n_monomers=5, box_nm=1.55, cutoff_nm=0.7).simulate(
        tmp_path / "small", n_frames=8, steps_per_frame=10)
    err = refused(capsys, train_args(run, tmp_path / "model"), "--model-option inter_cutoff_nm=0.77", "1.60 nm",
                  "molecules")
    assert "intra_cutoff_nm" not in err  # 0.7 nm fits a 1.55 nm box
    assert not (tmp_path / "model").exists()


def test_train_progress_is_plain_lines_in_a_log(synthetic_run, tmp_path, capsys):
    args = ["train", "--data", synthetic_run, "--mapping", synthetic_run / "mapping.json", "--out", tmp_path / "model",
            "--quick", "--device", "cpu", "--epochs", "2"]
    assert main([str(a) for a in args]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("force matching:")]
    assert "\r" not in err and lines and lines[-1].startswith("force matching: ")
    assert "(100%)" in lines[-1]


def test_evaluate_with_a_cg_run_without_pairs(tmp_path, capsys):
    from openmm_cgnn.testing.brownian import write_brownian_run, write_mapping

    mapping = write_mapping(tmp_path / "mapping.json")
    aa = write_brownian_run(tmp_path / "aa", "aa", 400, {"CHN": 0.01, "ION": 0.01}, {"CHN": 20, "ION": 20}, n_frames=10)
    cg = write_brownian_run(tmp_path / "cg", "cg", 400, {"CHN": 0.01, "ION": 0.01}, {"CHN": 1, "ION": 1}, n_frames=3)
    refused(capsys, ["evaluate", "--aa", aa, "--cg", cg, "--mapping", mapping, "--out", tmp_path / "report", "--quiet"],
            str(cg), "no CHN-CHN pair", "too few molecules")
    assert not (tmp_path / "report").exists()


def test_evaluate_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "RDF bin width" in text and "no progress lines" in text


def test_aa_dcd_time_axis_failed_overwrite_and_corrupt_checkpoint(tmp_path, capsys, monkeypatch):
    """MDAnalysis reads the AA trajectory's real frame spacing; a replacement that fails (full disk)
    leaves the old run and records why; a truncated AA checkpoint is 'corrupt'."""
    MDAnalysis = pytest.importorskip("MDAnalysis")
    from openmm_cgnn.aa.run import run_aa
    from openmm_cgnn.frames import read_frames

    out = tmp_path / "aa"
    run_aa(out, 8, 450.0, 0.4, 0.2, 0.1, platform="CPU", seed=1, log=lambda message: None)
    frames = read_frames(out)
    universe = MDAnalysis.Universe(str(out / "topology.pdb"), str(out / "trajectory.dcd"))
    assert len(universe.trajectory) == frames.n_frames == 2
    assert universe.trajectory.dt == pytest.approx(0.1, rel=1e-4)
    assert [ts.time for ts in universe.trajectory] == pytest.approx(frames.time, rel=1e-4)
    np.testing.assert_allclose(universe.trajectory[1].positions / 10.0, frames.positions[1], atol=2e-4)

    from openmm_cgnn.aa.stages import SingleRun

    def disk_full(self, writer, context, frame_number):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "frames.h5"))

    args = ["aa", "--pairs", "8", "--temperature", "450", "--equilibrate-ps", "0.4", "--production-ps", "0.3",
            "--save-every-ps", "0.1", "--platform", "CPU", "--seed", "1", "--out", out]
    before = tree(out)
    with monkeypatch.context() as patch:
        patch.setattr(SingleRun, "_append_frame", disk_full)
        refused(capsys, args + ["--overwrite"], "No space left on device", "frames.h5", code=1)
    assert tree(out) == before
    summary = json.loads((tmp_path / ".aa.partial" / "summary.json").read_text())
    assert summary["status"] == "failed: OSError" and "No space left on device" in summary["error"]

    checkpoint = out / "checkpoint.chk"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = tree(out)
    refused(capsys, args + ["--resume"], str(checkpoint), "corrupt checkpoint")
    assert tree(out) == before


def test_map_progress_is_plain_lines_in_a_log(aa_run, tmp_path, capsys):
    assert main(["map", "--data", str(aa_run), "--beads", "CAT=3,ANI=1", "--out", str(tmp_path / "map"),
                 "--epochs", "20", "--restarts", "1"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("CAT seed 0:")]
    assert "\r" not in err and lines and "20/20 epoch (100%)" in lines[-1]


def test_overwrite_replaces_a_directory_of_its_own_kind(cg_copy, model_dir, aa_run, tmp_path, capsys):
    """The other side of the rule: --overwrite does replace what the same stage wrote, and no .partial stays."""
    from openmm_cgnn.testing.brownian import write_brownian_run, write_mapping

    args = [a if a != "3" else "4" for a in simulate_args(model_dir, aa_run, cg_copy)]  # --seed 4
    assert main([str(a) for a in args + ["--overwrite"]]) == 0
    assert json.loads((cg_copy / "summary.json").read_text())["seed"] == 4 and read_marker(cg_copy) == "cg"

    export = tmp_path / "export"
    for extra in ([], ["--overwrite"]):
        assert main([str(a) for a in ["export", "--model", model_dir, "--from-aa", aa_run, "--out", export, *extra]]) == 0
    assert read_marker(export) == "export" and (export / "system.xml").exists()

    mapping_dir = tmp_path / "map"
    map_args = ["map", "--data", str(aa_run), "--beads", "CAT=3,ANI=1", "--out", str(mapping_dir), "--epochs", "5",
                "--restarts", "1", "--no-progress"]
    assert main(map_args) == 0 and main(map_args) == 2 and main(map_args + ["--overwrite"]) == 0
    assert read_marker(mapping_dir) == "mapping"

    mapping = write_mapping(tmp_path / "synthetic_mapping.json")
    runs = [write_brownian_run(tmp_path / f"synthetic_{kind}", kind, 400, {"CHN": 0.01, "ION": 0.01}, {"CHN": 20, "ION": 20},
                               n_frames=10) for kind in ("aa", "cg")]
    report = tmp_path / "report"
    evaluate_args = ["evaluate", "--aa", str(runs[0]), "--cg", str(runs[1]), "--mapping", str(mapping), "--out",
                     str(report), "--quiet"]
    assert main(evaluate_args) == 0 and main(evaluate_args) == 2 and main(evaluate_args + ["--overwrite"]) == 0
    assert read_marker(report) == "report" and (report / "report.md").exists()
    capsys.readouterr()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not (cg_copy.parent / f".{cg_copy.name}.partial").exists()
