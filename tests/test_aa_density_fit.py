"""NPT extension, NPT-only runs and NVT boxes from a rho(T) line over several NPT runs (8 ion pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)

openmm = pytest.importorskip("openmm")

from openmm_cgnn.aa import stages  # noqa: E402
from openmm_cgnn.analysis.density import density_line_fit, density_on_line  # noqa: E402
from openmm_cgnn.cli import main  # noqa: E402
from openmm_cgnn.frames import read_frames  # noqa: E402

BASE = ["aa", "--pairs", "8", "--equilibrate-ps", "1", "--production-ps", "0.2", "--save-every-ps", "0.1",
        "--platform", "CPU", "--seed", "5"]


def box_density(run_dir) -> float:
    """kg/m3 of the NVT frames' box, from the frames themselves (an independent path to the density)."""
    frames = read_frames(run_dir)
    volume = np.prod(np.diagonal(frames.box[0]))
    return float(frames.topology.mass.sum() / volume * 1.66053906660)


def test_density_line_fit_is_weighted_least_squares():
    t = np.array([500.0, 550.0, 600.0, 650.0])
    rho = np.array([1100.0, 1072.0, 1038.0, 1013.0])
    err = np.array([2.0, 4.0, 2.0, 8.0])
    fit = density_line_fit(t, rho, err)
    # normal equations of sum ((rho - a - b t) / err)^2
    design = np.stack([np.ones_like(t), t], axis=1) / err[:, None]
    a, b = np.linalg.lstsq(design, rho / err, rcond=None)[0]
    assert fit["intercept_kg_m3"] == pytest.approx(a) and fit["slope_kg_m3_K"] == pytest.approx(b)
    value, sigma = density_on_line(fit, 575.0)
    assert value == pytest.approx(a + b * 575.0) and 0 < sigma < 4.0
    with pytest.raises(ValueError, match="two or more temperatures"):
        density_line_fit([500.0, 500.0], [1000.0, 1010.0], [1.0, 1.0])


def test_one_call_fits_the_line_over_all_its_temperatures(tmp_path):
    out = tmp_path / "aa"
    assert main(BASE + ["--temperature", "450", "500", "550", "--out", str(out), "--density-fit"]) == 0
    npt = [json.loads((out / f"T{t}K" / "npt.json").read_text()) for t in (450, 500, 550)]
    t = np.array([r["temperature_K"] for r in npt])
    rho = np.array([r["density_kg_m3"] for r in npt])
    err = np.array([r["density_sem_kg_m3"] for r in npt])
    slope, intercept = np.polyfit(t, rho, 1, w=1.0 / err)
    for temperature in (450, 500, 550):
        run_dir = out / f"T{temperature}K"
        summary = json.loads((run_dir / "summary.json").read_text())
        expected = intercept + slope * temperature
        assert summary["nvt_density_kg_m3"] == pytest.approx(expected, rel=1e-6)
        assert box_density(run_dir) == pytest.approx(expected, rel=1e-4)
        assert summary["nvt_density"]["source"] == "rho(T) line over 3 NPT runs"
        assert read_frames(run_dir).metadata["nvt_density_source"] == "rho(T) line over 3 NPT runs"


def test_npt_only_jobs_then_nvt_on_the_line(tmp_path, capsys):
    dirs = [tmp_path / "T450K", tmp_path / "T500K"]
    for temperature, run_dir in zip((450, 500), dirs):
        assert main(BASE + ["--temperature", str(temperature), "--out", str(run_dir), "--npt-only"]) == 0
        assert (run_dir / "npt.json").exists() and not (run_dir / "summary.json").exists()
        assert not (run_dir / "frames.h5").exists()
    capsys.readouterr()
    # A directory without a finished NPT run is named, and nothing changes.
    before = (dirs[0] / "checkpoint.chk").read_bytes()
    missing = tmp_path / "T550K"
    missing.mkdir()
    assert main(BASE + ["--temperature", "450", "--out", str(dirs[0]), "--resume",
                        "--density-fit", *map(str, dirs), str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--density-fit {missing}" in err and "npt.json" in err and "Traceback" not in err
    assert (dirs[0] / "checkpoint.chk").read_bytes() == before and not (dirs[0] / "frames.h5").exists()
    # Both jobs continue with the same line; with two points it passes through both NPT means.
    for temperature, run_dir in zip((450, 500), dirs):
        assert main(BASE + ["--temperature", str(temperature), "--out", str(run_dir), "--resume",
                            "--density-fit", *map(str, dirs)]) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        own = json.loads((run_dir / "npt.json").read_text())["density_kg_m3"]
        assert summary["nvt_density"]["source"] == "rho(T) line over 2 NPT runs"
        assert summary["nvt_density_kg_m3"] == pytest.approx(own, rel=1e-6)
        assert summary["n_frames"] == 2


def test_npt_is_extended_while_the_density_drifts(tmp_path, monkeypatch, capsys):
    calls = []

    def always_drifting(densities):
        calls.append(len(densities))
        return dict(real(densities), density_converged=False, density_drift_kg_m3=-40.0)

    real = stages.density_convergence
    monkeypatch.setattr(stages, "density_convergence", always_drifting)
    out = tmp_path / "aa"
    assert main(BASE + ["--temperature", "450", "--max-equilibrate-ps", "2", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "extending NPT to 1.5 ps" in log and "extending NPT to 2 ps" in log and "WARNING" in log
    npt = json.loads((out / "npt.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert npt["equilibrate_ps"] == pytest.approx(2.0) and summary["equilibrate_ps"] == pytest.approx(2.0)
    times = np.loadtxt(out / "npt_density.csv", delimiter=",", skiprows=1)[:, 0]
    assert times[-1] == pytest.approx(2.0)
    # The density is averaged over the second half of the whole, extended NPT run.
    assert npt["density_samples"] == int(np.sum(times > 1.0))


@pytest.mark.parametrize("extra, needle", [
    (["--max-equilibrate-ps", "0.5"], "--max-equilibrate-ps"),
    (["--max-equilibrate-ps", "1.0003"], "--max-equilibrate-ps"),
    (["--npt-only", "--density-fit"], "--density-fit"),
    (["--density-fit", "NOWHERE"], "--density-fit NOWHERE"),
])
def test_bad_npt_options_name_the_option(tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    try:
        rc = main(BASE + ["--temperature", "450", "--out", str(out), *extra])
    except SystemExit as exc:  # argparse's own refusals (exclusive options)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()
