"""End-to-end evaluation on small synthetic runs written as real frames files."""

import json

import numpy as np
import pytest

from openmm_cgnn.analysis.evaluate import EvaluationError, EvaluationSettings, target_verdict, evaluate
from openmm_cgnn.testing.brownian import synthetic_mapping, write_brownian_run, write_mapping
from openmm_cgnn.cli import main
from openmm_cgnn.frames import FrameWriter, FramesError, TopologyInfo
from openmm_cgnn.io import MARKER, write_marker
from openmm_cgnn.units import MOLAR_GAS_CONSTANT_KJ_MOL_K

TEMPERATURES = (400.0, 500.0)
COUNTS = {"CHN": 40, "ION": 40}
EA = {"aa": {"CHN": 20.0, "ION": 15.0}, "cg": {"CHN": 12.0, "ION": 10.0}}  # kJ/mol


def _D(kind, residue, T):
    """nm^2/ps, Arrhenius with the activation energies above."""
    return 1.0 * np.exp(-EA[kind][residue] / (MOLAR_GAS_CONSTANT_KJ_MOL_K * T))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    mapping = write_mapping(root / "map" / "mapping.json")
    dirs = {"aa": [], "cg": []}
    for i, T in enumerate(TEMPERATURES):
        for kind in ("aa", "cg"):
            D = {res: _D(kind, res, T) for res in COUNTS}
            # CG positions are wrapped into the box: unwrapping and whole-molecule code must cope.
            dirs[kind].append(write_brownian_run(root / f"{kind}{T:g}", kind, T, D, COUNTS, n_frames=400,
                                                 seed=10 * i + (kind == "cg"), wrap=kind == "cg"))
    return root, mapping, dirs


@pytest.fixture(scope="module")
def evaluated(runs):
    root, mapping, dirs = runs
    out = root / "report"
    # Chunks smaller than the runs: AA frames are read and mapped piecewise.
    return out, evaluate(dirs["aa"], dirs["cg"], mapping, out, chunk_frames=150)


def test_metrics_plots_and_report(evaluated):
    out, metrics = evaluated
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["temperatures_K"]["paired"] == ["400", "500"]
    assert [r["n_frames"] for r in metrics["runs"]] == [400] * 4
    assert all(r["time_ps"] == [0.0, 399.0] for r in metrics["runs"])
    # Every plot exists and is linked from the report.
    report = (out / "report.md").read_text()
    for name in metrics["plots"]:
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in report
    assert {"msd_CHN.png", "msd_ION.png", "arrhenius.png", "rdf_com_400K.png", "rdf_bead_500K.png",
            "bonds_400K.png", "angles_400K.png"} <= set(metrics["plots"])
    # RDFs per pair of molecule types and of bead types; a one-bead molecule's bead-bead RDF is its COM RDF.
    assert {"com:CHN-CHN", "com:CHN-ION", "com:ION-ION", "bead:CHN:B0-ION:B0"} <= set(metrics["rdf"])
    assert "bead:ION:B0-ION:B0" not in metrics["rdf"]
    entry = metrics["rdf"]["com:CHN-ION"]
    assert set(entry["by_temperature"]) == {"400", "500"}
    # Ideal gases on both sides: the difference is counting noise.
    for m in entry["by_temperature"].values():
        assert m["error"] < 3 * m["noise_floor"]
        assert set(m["peak_r_nm"]) == {"aa", "cg"}
    assert entry["error"] == max(m["error"] for m in entry["by_temperature"].values())
    bonds = metrics["structure"]["400"]["bonds"]["CHN:B0-B1"]
    assert bonds["mean_nm"]["aa"] == pytest.approx(bonds["mean_nm"]["cg"], abs=0.005)
    assert metrics["density"]["reference"] is None and "no experimental density" in metrics["density"]["note"]
    assert "| CHN | 400 |" in report and "E_a AA" in report


def test_diffusion_and_arrhenius_recover_the_known_dynamics(evaluated):
    _, metrics = evaluated
    for species in COUNTS:
        for T in TEMPERATURES:
            entry = metrics["diffusion"][species][f"{T:g}"]
            for kind in ("aa", "cg"):
                result = entry[kind]
                assert result["status"] == "ok", result["reason"]
                expected = _D(kind, species, T) * 1e-6
                assert abs(result["D_m2_s"] - expected) < 4 * result["D_err_m2_s"] + 0.03 * expected
                assert result["box_nm"] == pytest.approx(3.0)
            ratio = metrics["d_ratio_cg_aa"][species][f"{T:g}"]
            assert ratio["ratio"] == pytest.approx(entry["cg"]["D_m2_s"] / entry["aa"]["D_m2_s"])
        for kind in ("aa", "cg"):
            fit = metrics["arrhenius"][species][kind]
            assert fit["status"] == "ok"
            assert abs(fit["Ea_kJ_mol"] - EA[kind][species]) < 4 * fit["Ea_err_kJ_mol"]
        assert "Ea_relative_difference" in metrics["arrhenius"][species]


def test_cli_one_temperature_with_viscosity(runs, tmp_path):
    root, mapping, dirs = runs
    out = tmp_path / "one"
    status = main(["evaluate", "--aa", str(dirs["aa"][0]), "--cg", str(dirs["cg"][0]), "--mapping", str(mapping),
                   "--out", str(out), "--viscosity-pa-s", "0.01", "--stride", "2", "--quiet"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"][0]["n_frames"] == 200 and metrics["runs"][0]["time_ps"] == [0.0, 398.0]
    for species in COUNTS:
        fit = metrics["arrhenius"][species]["aa"]
        assert fit["status"] == "not enough temperatures" and fit["Ea_kJ_mol"] is None
        aa = metrics["diffusion"][species]["400"]["aa"]
        assert aa["D_yeh_hummer_m2_s"] > aa["D_m2_s"]
        assert metrics["diffusion"][species]["400"]["cg"]["D_yeh_hummer_m2_s"] is None  # CG viscosity unknown
    assert "not enough temperatures" in (out / "report.md").read_text()


def test_too_short_runs_are_not_converged(tmp_path):
    mapping = write_mapping(tmp_path / "mapping.json")
    aa = write_brownian_run(tmp_path / "aa", "aa", 400, {"CHN": 0.01, "ION": 0.01}, COUNTS, n_frames=12)
    cg = write_brownian_run(tmp_path / "cg", "cg", 400, {"CHN": 0.01, "ION": 0.01}, COUNTS, n_frames=12, seed=1)
    metrics = evaluate([aa], [cg], mapping, tmp_path / "out")
    for species in COUNTS:
        for kind in ("aa", "cg"):
            result = metrics["diffusion"][species]["400"][kind]
            assert result["status"] == "not converged" and result["D_m2_s"] is None
            assert "too short" in result["reason"]
        assert metrics["d_ratio_cg_aa"][species]["400"]["ratio"] is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| not converged [1] |" in report and "[1] AA CHN 400 K: run too short" in report
    assert metrics["verdict"]["Ea"]["CHN"]["status"] == "not measured"


def test_verdict_against_the_targets(evaluated):
    _, metrics = evaluated
    verdict = metrics["verdict"]
    assert verdict["targets"] == {"Ea_relative": 0.15, "rdf_error": 0.05, "bonded_tv": 0.05}
    for name, judged in verdict["bonded"].items():  # every bond and angle type, its worst temperature
        group = judged["kind"] + "s"
        assert judged["worst_tv"] == max(s[group][name]["error"] for s in metrics["structure"].values())
    # Bonded total-variation differences: met, missed, and within two noise floors (not resolved).
    for tv, floor, status in ((0.03, 0.01, "met"), (0.09, 0.02, "missed"), (0.09, 0.05, "not resolved")):
        fake = {"arrhenius": {}, "rdf": {}, "structure": {"400": {"angles": {"R:A-B-C": {"error": tv, "noise_floor": floor}}},
                                                          "500": {"angles": {"R:A-B-C": {"error": tv / 2, "noise_floor": floor}}}}}
        judged = target_verdict(fake, EvaluationSettings())["bonded"]["R:A-B-C"]
        assert (judged["status"], judged["temperature"], judged["kind"]) == (status, "400", "angle")
    for species in COUNTS:  # the synthetic CG activation energies are 33-40% below AA's
        judged = verdict["Ea"][species]
        assert judged["status"] == "missed"
        assert judged["relative_difference"] == metrics["arrhenius"][species]["Ea_relative_difference"]
    com = verdict["rdf"]["com"]
    worst = max(m["error"] for e in metrics["rdf"].values() if e["kind"] == "com" for m in e["by_temperature"].values())
    assert com["worst_error"] == worst
    # Hand-made RDF entries for every branch: under target, above target and the noise, and noise above target.
    for error, floor, status in ((0.03, 0.01, "met"), (0.09, 0.02, "missed"), (0.09, 0.05, "not resolved")):
        fake = {"arrhenius": {}, "rdf": {"com:A-B": {"kind": "com", "pair": ["A", "B"], "by_temperature": {
            "400": {"error": error, "noise_floor": floor}, "500": {"error": error / 2, "noise_floor": floor}}}}}
        judged = target_verdict(fake, EvaluationSettings())["rdf"]["com"]
        assert (judged["status"], judged["temperature"], judged["pair"]) == (status, "400", "A–B")
    # E_a: a difference beyond the target is "missed" only when its own error is within the target.
    for difference, error, status in ((0.10, 0.03, "met"), (0.40, 0.05, "missed"), (0.40, 0.30, "not resolved")):
        aa = {"status": "ok", "Ea_kJ_mol": 20.0, "Ea_err_kJ_mol": 0.0}
        fake = {"rdf": {}, "arrhenius": {"X": {"aa": aa, "cg": dict(aa, Ea_kJ_mol=20.0 * (1 + difference)),
                                               "Ea_relative_difference": difference,
                                               "Ea_relative_difference_err": error}}}
        assert target_verdict(fake, EvaluationSettings())["Ea"]["X"]["status"] == status
    report = (evaluated[0] / "report.md").read_text()
    assert "| E_a of CHN |" in report and "**missed**" in report


def _cli_error(args, capsys):
    assert main(["evaluate", *map(str, args), "--quiet", "--overwrite"]) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors_and_keep_old_report(runs, tmp_path, capsys):
    root, mapping, dirs = runs
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text("previous")
    write_marker(out, "report")  # an earlier report: --overwrite may replace it, bad input may not

    # A frames file without frames.
    empty = tmp_path / "empty"
    topology = TopologyInfo(atom_name=["N1", "O1"], element=["N", "O"], mass=[14.0, 16.0],
                            residue_name=["ION", "ION"], residue_index=[0, 0], bonds=[[0, 1]])
    FrameWriter(empty / "frames.h5", topology, {"kind": "aa", "temperature_K": 400.0}, with_forces=False).close()
    err = _cli_error(["--aa", empty, "--mapping", mapping, "--out", out], capsys)
    assert "holds no frames" in err and str(empty) in err

    # A CG run given as AA.
    err = _cli_error(["--aa", dirs["cg"][0], "--mapping", mapping, "--out", out], capsys)
    assert "pass it with --cg" in err

    # Two AA runs at one temperature.
    err = _cli_error(["--aa", dirs["aa"][0], dirs["aa"][0], "--mapping", mapping, "--out", out], capsys)
    assert "two AA runs at 400 K" in err

    # A CG run of another liquid (only one of the molecule types).
    other = write_brownian_run(tmp_path / "other", "cg", 400, {"ION": 0.01}, {"ION": 30}, n_frames=50)
    err = _cli_error(["--aa", dirs["aa"][0], "--cg", other, "--mapping", mapping, "--out", out], capsys)
    assert "mismatched topologies" in err

    # A CG run whose beads are not those of the mapping.
    renamed = synthetic_mapping()
    for bead in renamed["residues"]["CHN"]["beads"]:
        bead["name"] = "P" + bead["name"][1:]
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    err = _cli_error(["--aa", dirs["aa"][0], "--cg", dirs["cg"][0], "--mapping", tmp_path / "renamed.json",
                      "--out", out], capsys)
    assert "the mapping expects" in err and "CHN" in err

    # A missing mapping and a bad viscosity.
    err = _cli_error(["--aa", dirs["aa"][0], "--mapping", tmp_path / "nope.json", "--out", out], capsys)
    assert "nope.json" in err
    err = _cli_error(["--aa", dirs["aa"][0], "--mapping", mapping, "--out", out, "--viscosity-pa-s", "-1"], capsys)
    assert "--viscosity-pa-s" in err
    err = _cli_error(["--aa", dirs["aa"][0], "--mapping", mapping, "--out", out, "--target-ea", "0"], capsys)
    assert "--target-ea" in err
    err = _cli_error(["--aa", dirs["aa"][0], "--mapping", mapping, "--out", out, "--viscosity-pa-s", "410=0.01"], capsys)
    assert "--viscosity-pa-s" in err and "410 K matches no AA run" in err and "400 K" in err

    assert (out / "metrics.json").read_text() == "previous"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "metrics.json"])


def test_evaluate_needs_aa_runs(runs, tmp_path):
    _, mapping, dirs = runs
    with pytest.raises(EvaluationError, match="no AA runs"):
        evaluate([], dirs["cg"], mapping, tmp_path)
    with pytest.raises(FramesError):
        evaluate([tmp_path / "missing"], [], mapping, tmp_path)


def test_npt_density_error_reaches_the_report(tmp_path):
    """An AA box fixed from an NPT mean carries that mean's error, not zero."""
    mapping = write_mapping(tmp_path / "mapping.json")
    aa = write_brownian_run(tmp_path / "aa", "aa", 400, {"CHN": 0.01, "ION": 0.01}, COUNTS, n_frames=30,
                            metadata={"density_sem_kg_m3": 12.5})
    metrics = evaluate([aa], [], mapping, tmp_path / "out")
    density = metrics["density"]["runs"]["400"]
    assert density["box_fixed"] and density["err_kg_m3"] == 12.5 and density["err_from"] == "NPT"
    assert "12.5 (of the NPT mean that fixed the box)" in (tmp_path / "out" / "report.md").read_text()
