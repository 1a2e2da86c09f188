"""The evaluation's ablation (prior-only CG runs beside the trained model) and held-out temperature,
on synthetic runs of known dynamics written as real frames files."""

import json

import numpy as np
import pytest

from openmm_cgnn.analysis.evaluate import EvaluationError, evaluate
from openmm_cgnn.testing.brownian import write_brownian_run, write_mapping
from openmm_cgnn.cli import main
from openmm_cgnn.units import MOLAR_GAS_CONSTANT_KJ_MOL_K

TEMPERATURES = (400.0, 450.0, 500.0)
COUNTS = {"CHN": 30, "ION": 30}
# kJ/mol: the trained CG model is close to AA, the prior alone is far off (too fast, too flat)
EA = {"aa": {"CHN": 16.0, "ION": 12.0}, "cg": {"CHN": 15.0, "ION": 11.0}, "prior": {"CHN": 5.0, "ION": 4.0}}
PREFACTOR = {"aa": 1.0, "cg": 1.0, "prior": 0.3}


def _D(model, residue, T):
    return PREFACTOR[model] * np.exp(-EA[model][residue] / (MOLAR_GAS_CONSTANT_KJ_MOL_K * T))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    mapping = write_mapping(root / "mapping.json")
    dirs = {"aa": [], "cg": [], "prior": []}
    for i, T in enumerate(TEMPERATURES):
        for j, model in enumerate(dirs):
            kind = "aa" if model == "aa" else "cg"
            metadata = {} if model == "aa" else {"network": model == "cg"}
            dirs[model].append(write_brownian_run(
                root / f"{model}{T:g}", kind, T, {r: _D(model, r, T) for r in COUNTS}, COUNTS, n_frames=400,
                seed=10 * i + j, metadata=metadata))
    return root, mapping, dirs


@pytest.fixture(scope="module")
def evaluated(runs):
    root, mapping, dirs = runs
    out = root / "report"
    status = main(["evaluate", "--aa", *map(str, dirs["aa"]), "--cg", *map(str, dirs["cg"]),
                   "--cg-prior-only", *map(str, dirs["prior"]), "--held-out-temperature", "450",
                   "--mapping", str(mapping), "--out", str(out), "--quiet"])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_prior_only_runs_are_reported_beside_the_trained_model(evaluated):
    out, metrics = evaluated
    assert [r["network"] for r in metrics["prior_only_runs"]] == [False] * 3
    ablation = metrics["ablation"]
    for model, name in (("cg", "trained"), ("prior", "prior_only")):
        rows = ablation[name]["by_temperature"]
        assert list(rows) == ["400", "450", "500"]
        for key, row in rows.items():
            assert row["worst_com_rdf_error"]["error"] > 0 and row["worst_bead_rdf_error"]["error"] > 0
            assert set(row["bonded_tv"]) == set(metrics["structure"][key]["bonds"]) | set(metrics["structure"][key]["angles"])
            for species in COUNTS:  # each model's own D against the same AA run
                expected = _D(model, species, float(key)) / _D("aa", species, float(key))
                ratio = row["d_ratio_cg_aa"][species]
                assert abs(ratio["ratio"] - expected) < 4 * ratio["error"] + 0.05 * expected
        for species in COUNTS:
            ea = ablation[name]["Ea"][species]
            assert abs(ea["Ea_kJ_mol"] - EA[model][species]) < 4 * ea["Ea_err_kJ_mol"] + 1.0
    # The verdict is the trained model's: its E_a difference, not the prior-only one.
    for species in COUNTS:
        trained = metrics["arrhenius"][species]["Ea_relative_difference"]
        assert metrics["verdict"]["Ea"][species]["relative_difference"] == trained
        assert metrics["prior_only"]["arrhenius"][species]["Ea_relative_difference"] < trained - 0.3
    report = (out / "report.md").read_text()
    assert "## Ablation: trained model against the prior alone" in report
    assert "| prior only | 450 (held out) |" in report and "CG (prior only)" in report


def test_held_out_temperature_is_marked_and_fitted_both_ways(evaluated):
    out, metrics = evaluated
    assert metrics["held_out_temperatures_K"] == ["450"]
    assert metrics["settings"]["held_out_temperatures_K"] == [450.0]
    for species in COUNTS:
        entry = metrics["arrhenius"][species]
        without = entry["without_held_out"]
        assert without["temperatures_K"] == ["400", "500"]
        for kind in ("aa", "cg"):
            assert entry[kind]["n_points"] == 3 and without[kind]["n_points"] == 2
            assert without[kind]["Ea_kJ_mol"] != entry[kind]["Ea_kJ_mol"]
            assert abs(without[kind]["Ea_kJ_mol"] - EA[kind][species]) < 4 * without[kind]["Ea_err_kJ_mol"] + 1.0
        assert without["Ea_relative_difference"] is not None
    report = (out / "report.md").read_text()
    assert "without the held-out 450 K" in report
    assert "| 450 (held out) |" in report and "were not used in training" in report


def test_bad_ablation_and_held_out_inputs(runs, tmp_path):
    root, mapping, dirs = runs
    base = [dirs["aa"][:2], dirs["cg"][:2], mapping]
    with pytest.raises(EvaluationError, match="pass it with --cg-prior-only"):
        evaluate(dirs["aa"][:2], [dirs["cg"][0], dirs["prior"][1]], mapping, tmp_path / "a")
    with pytest.raises(EvaluationError, match="pass it with --cg$"):
        evaluate(*base, tmp_path / "b", cg_prior_dirs=[dirs["cg"][0]])
    with pytest.raises(EvaluationError, match="no AA run at that temperature"):
        evaluate(*base, tmp_path / "c", cg_prior_dirs=[dirs["prior"][2]])
    with pytest.raises(EvaluationError, match="--held-out-temperature 650: no AA and CG run pair"):
        evaluate(*base, tmp_path / "d", held_out_temperatures_K=(650.0,))
    assert not any((tmp_path / d).exists() for d in "abcd")
