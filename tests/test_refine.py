"""Bonded refinement (openmm-cgnn refine): iterative Boltzmann inversion of a trained model's tables.

The target is a real CG run of a toy model whose angle table has its well at 2.0 rad, written as an
all-atom run; the model to refine has the same network and its angle well at 2.5 rad."""

import copy
import hashlib
import json
import math

import numpy as np
import openmm
import pytest

from models.make_models import PRIOR, make_model_dir, write_aa_run
from openmm_cgnn.cli import main as cli_main
from openmm_cgnn.layout import CHECKPOINT_PT, MODEL_PT, PRIOR_JSON, REFINE_JSON
from openmm_cgnn.mapping.spec import load_cg_frames
from openmm_cgnn.model.checkpoint import read_checkpoint
from openmm_cgnn.openmm.force import CGNNForce
from openmm_cgnn.openmm.simulation import CGRun, RunConfig
from openmm_cgnn.training import refine

TEMPERATURE_K = 350.0


def tabulated_prior(theta0_rad: float) -> dict:
    """The toy prior with its harmonic bonds and angle as tables, the angle's well at ``theta0_rad``."""
    data = copy.deepcopy(PRIOR)
    data.update(format="openmm_cgnn.prior/2", bonded_form="tabulated")
    grid = np.linspace(0.1, 0.5, 96)
    for bond in data["bonds"]:
        bond["table"] = {"min_nm": 0.1, "max_nm": 0.5, "wall_k_kj_mol_nm2": bond["k_kj_mol_nm2"],
                         "energy_kj_mol": (0.5 * bond["k_kj_mol_nm2"] * (grid - bond["r0_nm"]) ** 2).tolist()}
    angles = np.linspace(0.0, math.pi, 181)
    for angle in data["angles"]:
        angle["theta0_rad"] = theta0_rad
        angle["table"] = {"min_rad": 0.0, "max_rad": math.pi, "wall_k_kj_mol_rad2": angle["k_kj_mol_rad2"],
                          "energy_kj_mol": (0.5 * angle["k_kj_mol_rad2"] * (angles - theta0_rad) ** 2).tolist()}
    return data


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def toy(cg, tmp_path_factory):
    """(target AA run, model with the wrong angle table, a harmonic model) in one folder."""
    root = tmp_path_factory.mktemp("refine")
    right = make_model_dir(root / "right", prior=tabulated_prior(2.0))
    wrong = make_model_dir(root / "wrong", prior=tabulated_prior(2.5))
    harmonic = make_model_dir(root / "harmonic")
    config = RunConfig(temperature_K=TEMPERATURE_K, steps=1500, dt_fs=4.0, platform="CPU", save_every_steps=10,
                       seed=5, progress=False)
    CGRun(CGNNForce(right, cg, TEMPERATURE_K), cg, root / "reference", config, log=lambda _: None).run()
    frames = load_cg_frames(root / "reference", cg.mapping)
    aa = write_aa_run(root / "aa", cg, temperature_K=TEMPERATURE_K, bead_positions=frames.positions)
    return aa, wrong, harmonic


@pytest.fixture(scope="module")
def refined(toy, tmp_path_factory):
    aa, wrong, _ = toy
    before = digest(wrong)
    out = tmp_path_factory.mktemp("refined") / "model"
    settings = refine.RefineSettings(iterations=1, steps=1500, dt_fs=4.0, platform="CPU", seed=3, min_counts=5)
    summary = refine.refine_model(wrong, [aa], out, settings, log=lambda _: None)
    assert digest(wrong) == before  # the input model is never written to
    return out, summary


def test_refinement_moves_a_wrong_angle_table_toward_the_target(refined):
    out, summary = refined
    written = json.loads((out / REFINE_JSON).read_text())
    assert written["format"] == refine.REFINE_FORMAT and written["chosen_round"] == summary["chosen_round"]
    tv = [r["tv"]["per_temperature"]["350K"]["angles"]["CAT:A-B-C"] for r in written["rounds"]]
    assert len(tv) == 2 and tv[0] > 0.3, tv  # wells 0.5 rad apart: far from the target
    assert tv[1] < 0.5 * tv[0], tv
    assert written["chosen_round"] == 1 and written["tv_after"] < written["tv_before"]
    # The refined table's minimum moved from 2.5 rad toward the target's 2.0.
    table = json.loads((out / PRIOR_JSON).read_text())["angles"][0]["table"]["energy_kj_mol"]
    minimum = np.linspace(0.0, math.pi, len(table))[int(np.argmin(table))]
    assert abs(minimum - 2.0) < abs(2.5 - 2.0) - 0.15, minimum


def test_refined_model_directory_is_complete_and_every_prior_carrier_agrees(refined, toy, cg, tmp_path):
    out, _ = refined
    assert read_checkpoint(out)["prior"] == json.loads((out / PRIOR_JSON).read_text())
    assert (out / "mapping.json").exists() and (out / "hparams.json").exists() and (out / MODEL_PT).exists()

    def energy(source, **kw):
        system = cg.system()
        CGNNForce(source, cg, TEMPERATURE_K, **kw).add_to(system)
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
        context.setPeriodicBoxVectors(*cg.box)
        context.setPositions(cg.positions)
        return context.getState(getEnergy=True).getPotentialEnergy()._value

    inside, native, scripted = energy(out, prior="model"), energy(out, prior="openmm"), energy(out / MODEL_PT)
    assert inside == pytest.approx(native, rel=1e-5, abs=1e-3)
    assert scripted == pytest.approx(native, rel=1e-5, abs=1e-3)
    # The export ships the refined tables.
    exported = tmp_path / "export"
    assert cli_main(["export", "--model", str(out), "--from-aa", str(toy[0]), "--out", str(exported)]) == 0
    assert json.loads((exported / PRIOR_JSON).read_text())["angles"] == json.loads((out / PRIOR_JSON).read_text())["angles"]


def test_correction_is_zero_force_outside_the_sampled_range():
    grid = np.linspace(0.0, 1.0, 51)
    edges = refine.grid_edges(grid)
    rng = np.random.default_rng(0)
    p_aa, n_aa = refine.pooled_histogram([rng.normal(0.5, 0.05, 20000)], [1.0], edges)
    p_cg, n_cg = refine.pooled_histogram([rng.normal(0.55, 0.05, 20000)], [1.0], edges)
    correction = refine.ibi_correction(grid, p_cg, n_cg, p_aa, n_aa, kT=2.5, min_counts=10)
    sampled = np.flatnonzero((n_aa >= 10) | (n_cg >= 10))
    assert np.all(correction[:sampled[0]] == correction[sampled[0]])
    assert np.all(correction[sampled[-1] + 1:] == correction[sampled[-1]])
    # CG too far right: the correction raises the right side against the left (slope kT * 0.05 / 0.05^2 = 50).
    slope = np.polyfit(grid[sampled], correction[sampled], 1)[0]
    assert 30 < slope < 70, slope


def test_a_region_only_the_cg_model_visits_is_pushed_away():
    grid = np.linspace(0.0, 1.0, 51)
    edges = refine.grid_edges(grid)
    rng = np.random.default_rng(1)
    p_aa, n_aa = refine.pooled_histogram([rng.normal(0.6, 0.05, 20000)], [1.0], edges)
    collapsed = np.concatenate([rng.normal(0.6, 0.05, 16000), rng.normal(0.2, 0.02, 4000)])
    p_cg, n_cg = refine.pooled_histogram([collapsed], [1.0], edges)
    assert n_aa[10] == 0 and n_cg[10] > 100  # 0.2: the CG model's alone
    correction = refine.ibi_correction(grid, p_cg, n_cg, p_aa, n_aa, kT=2.5, min_counts=10)
    assert correction[10] - correction[30] > 2 * 2.5  # several kT uphill where AA never goes


def test_bad_inputs_are_refused_with_one_line(toy, tmp_path, capsys):
    aa, wrong, harmonic = toy
    mts_run = tmp_path / "mts"  # a finished CG run's summary as simulate writes it, at an MTS outer step
    mts_run.mkdir()
    (mts_run / "summary.json").write_text(json.dumps({"kind": "cg", "status": "finished", "dt_fs": 15.0,
                                                      "mts_inner_steps": 4}))
    base = ["refine", "--aa", str(aa), "--steps", "20", "--save-every-steps", "10", "--platform", "CPU"]
    cases = [
        (["--model", str(harmonic), "--out", str(tmp_path / "a")], "--prior-form"),
        (["--model", str(wrong), "--out", str(wrong)], "--out"),
        (["--model", str(tmp_path), "--out", str(tmp_path / "b")], CHECKPOINT_PT),
        (["--model", str(wrong), "--out", str(tmp_path / "c"), "--iterations", "0"], "--iterations"),
        (["--model", str(wrong), "--out", str(tmp_path / "d"), "--alpha", "-1"], "--alpha"),
        (["--model", str(wrong), "--out", str(tmp_path / "f"), "--dt-from", str(tmp_path / "norun")], "--dt-from"),
        (["--model", str(wrong), "--out", str(tmp_path / "g"), "--dt-from", str(mts_run)], "--dt-fs"),
    ]
    for args, needle in cases:
        assert cli_main(base + args) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    missing = tmp_path / "nowhere"
    assert cli_main(["refine", "--model", str(wrong), "--aa", str(missing), "--out", str(tmp_path / "e")]) == 2
    assert str(missing) in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert cli_main(base + ["--model", str(wrong), "--out", str(taken)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (taken / "mine.txt").read_text() == "keep"
    assert not any(p.name.startswith(".") and "partial" in p.name for p in tmp_path.iterdir())


def values(args, flag):
    """The values of ``flag`` in an argument list (up to the next option)."""
    start = args.index(flag) + 1
    end = next((k for k in range(start, len(args)) if args[k].startswith("--")), len(args))
    return args[start:end]


def test_chain_refines_before_export_and_the_cg_runs_use_the_refined_model(tmp_path):
    from openmm_cgnn.driver import SETTINGS, plan
    from openmm_cgnn.liquids import load_liquid

    liquid = load_liquid("bmim_bf4")
    sizes = [size for size in SETTINGS if "refine" in SETTINGS[size]]
    assert "quick" in sizes and "cpu" in sizes
    for size in sizes:
        stages = plan(liquid, size, tmp_path)
        groups = list(dict.fromkeys(s.group for s in stages))
        assert groups.index("train") < groups.index("refine") < groups.index("export") < groups.index("simulate")
        (train,) = [s for s in stages if s.group == "train"]
        (stage,) = [s for s in stages if s.group == "refine"]
        refined = values(stage.args, "--out")
        assert values(stage.args, "--model") == values(train.args, "--out") != refined
        # the training temperatures only: a held-out one never reaches the model
        assert values(stage.args, "--aa") == values(train.args, "--data")
        held_out = [f"T{t:g}K" for t in liquid.sizes[size].held_out_K]
        assert not any(h in a for h in held_out for a in values(stage.args, "--aa"))
        users = [s for s in stages if s.group in ("export", "simulate", "simulate_prior")]
        assert users and all(refined[0] in s.args for s in users) and stage.done.name == REFINE_JSON
