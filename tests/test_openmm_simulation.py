"""CG dynamics: NVE energy conservation, the runner's files, resume, time-step choice, NaN detection, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
import struct

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm)

import openmm
from models.make_models import make_model_dir, write_aa_run
from openmm_cgnn.cli import main as cli_main
from openmm_cgnn.frames import FrameWriter, TopologyInfo, read_frames
from openmm_cgnn.openmm.engines import ENGINES, PythonForceEngine
from openmm_cgnn.openmm.force import CGNNForce
from openmm_cgnn.openmm.simulation import CGRun, RunConfig, SimulationError, SimulationUnstable, choose_platform
from openmm_cgnn.units import kT_kj_mol



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), use_temperature=True)


def config(**kw):
    base = dict(temperature_K=300.0, steps=100, dt_fs=10.0, platform="Reference", save_every_steps=20, seed=7,
                thermalize_steps=50, stability_steps=60, progress=False)
    base.update(kw)
    return RunConfig(**base)


def test_nve_energy_drift_real_model(cg, tmp_path):
    """Velocity Verlet, 1000 steps of 5 fs with the float64 CGModel + native prior.

    Bound: the total energy stays within 2e-3 N_dof kT of its start and its linear drift over the
    5 ps is below 5e-4 N_dof kT (about 0.46 and 0.12 kJ/mol here; measured about 0.07 and 0.02).
    """
    folder = make_model_dir(tmp_path / "m64", dtype="float64")
    force = CGNNForce(folder, cg)
    system = cg.system()
    force.add_to(system)
    integrator = openmm.VerletIntegrator(0.005)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(cg.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(300.0, 1)
    totals = []
    for _ in range(50):
        integrator.step(20)
        state = context.getState(getEnergy=True)
        totals.append(state.getPotentialEnergy()._value + state.getKineticEnergy()._value)
    totals = np.array(totals)
    scale = kT_kj_mol(300.0) * (3 * cg.n_beads - 3)
    assert np.isfinite(totals).all()
    assert np.abs(totals - totals[0]).max() < 2e-3 * scale
    slope = np.polyfit(np.arange(len(totals)) * 0.1, totals, 1)[0]  # kJ/mol/ps
    assert abs(slope) * 5.0 < 5e-4 * scale
    # the kinetic energy did move: this was not a frozen system
    assert context.getState(getEnergy=True).getKineticEnergy()._value > 0.1 * scale / 2


def test_run_writes_run_directory(cg, toy_dir, tmp_path):
    out = tmp_path / "run"
    result = CGRun(CGNNForce(toy_dir / "model.pt", cg), cg, out, config(steps=100)).run()
    for name in ("frames.h5", "trajectory.dcd", "topology.pdb", "state.csv", "summary.json", "checkpoint.chk"):
        assert (out / name).exists(), name
    frames = read_frames(out)
    assert frames.kind == "cg" and frames.temperature_K == 300.0
    assert frames.n_frames == 6
    np.testing.assert_allclose(frames.time, np.arange(6) * 0.2, atol=1e-9)
    assert frames.topology.atom_name == cg.bead_names and set(frames.topology.element) == {""}
    np.testing.assert_allclose(frames.topology.mass, cg.masses)
    assert np.isfinite(frames.potential_energy).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 100 and summary["dt_fs"] == 10.0
    assert summary["prior_carrier"] == "openmm" and summary["n_frames"] == 6
    import mdtraj

    traj = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))
    np.testing.assert_allclose(traj.xyz, frames.positions, atol=1e-4)
    assert result.summary["ms_per_step"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_continues_exactly(cg, toy_dir, tmp_path, engine):
    """An interrupted run resumed from its checkpoint gives the same frames as one uninterrupted run,
    also when frames were written after the last checkpoint (they are rewound); with either engine."""
    force = CGNNForce(toy_dir / "model.pt", cg, engine=engine)
    whole = tmp_path / "whole"
    CGRun(force, cg, whole, config(steps=120)).run()
    parts = tmp_path / "parts"
    CGRun(force, cg, parts, config(steps=60)).run()
    # simulate a crash after a frame was written but before its checkpoint
    topology = TopologyInfo.from_openmm(cg.topology(), cg.system())
    with FrameWriter(parts / "frames.h5", topology, {}, with_forces=False, resume=True) as writer:
        writer.append(np.zeros((cg.n_beads, 3)), cg.box, 99.0)
    (parts / "summary.json").write_text("{}")
    with pytest.raises(SimulationError, match="use --resume or --overwrite"):
        CGRun(force, cg, parts, config(steps=120))
    CGRun(force, cg, parts, config(steps=120), resume=True).run()
    a, b = read_frames(whole), read_frames(parts)
    assert b.n_frames == a.n_frames == 7
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.time, b.time)
    with open(parts / "trajectory.dcd", "rb") as handle:
        handle.seek(8)
        assert struct.unpack("<i", handle.read(4))[0] == 7
    steps = [int(line.split(",")[0]) for line in (parts / "state.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 120
    assert json.loads((parts / "summary.json").read_text())["status"] == "finished"
    with pytest.raises(SimulationError, match="temperature_K=300.0, now 310.0"):
        CGRun(force, cg, parts, config(steps=200, temperature_K=310.0), resume=True).run()


def test_stability_check_reports_largest_stable_step(cg, toy_dir, tmp_path):
    run = CGRun(CGNNForce(toy_dir / "model.pt", cg), cg, tmp_path / "dt",
                config(steps=20, dt_fs=None, dt_candidates_fs=(400.0, 100.0, 10.0), save_every_steps=10), log=lambda m: None)
    summary = run.run().summary
    results = {r["dt_fs"]: r for r in summary["dt_stability"]}
    assert not results[400.0]["stable"]  # far beyond the stiffest bond's period
    assert summary["dt_fs"] == summary["largest_stable_dt_fs"] == max(dt for dt, r in results.items() if r["stable"])
    assert summary["dt_chosen_by"] == "stability check"
    assert all(r["ratio"] is None or r["ratio"] >= 0 for r in results.values())


def test_nan_detection_stops_and_keeps_frames(cg, toy_dir, tmp_path):
    out = tmp_path / "nan"
    run = CGRun(CGNNForce(toy_dir / "model.pt", cg), cg, out, config(steps=3000, dt_fs=400.0, save_every_steps=5))
    with pytest.raises(SimulationUnstable, match=r"unstable.*Kept \d+ frames.*smaller --dt-fs"):
        run.run()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed: unstable"
    frames = read_frames(out)
    assert frames.n_frames == summary["n_frames"] >= 1
    assert np.isfinite(frames.positions).all()


# -- command line -------------------------------------------------------------------------------


def test_cli_simulate_from_aa_and_resume(cg, model_dir, tmp_path, capsys):
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=350.0)
    out = tmp_path / "cg"
    args = ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa), "--temperature", "350", "--steps", "40",
            "--dt-fs", "5", "--platform", "CPU", "--save-every-steps", "20", "--seed", "3", "--quiet", "--out", str(out)]
    assert cli_main(args) == 0
    assert "CG run finished: 40 steps" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"] == str(aa) and summary["temperature_K"] == 350.0
    # a 40-step run on CPU takes TorchForce (a compilation would not pay for itself), torch threads
    # pinned to OpenMM's CPU thread count
    assert summary["force_engine"]["engine"] == "torch" and summary["torch_threads"] >= 1
    assert cli_main(args) == 2  # the run is there: neither --resume nor --overwrite
    assert "use --resume or --overwrite" in capsys.readouterr().err
    args[args.index("40")] = "60"
    assert cli_main(args + ["--resume"]) == 0
    assert read_frames(out).n_frames == 4


def test_cli_simulate_length_in_ps(cg, model_dir, tmp_path, capsys):
    """--length-ps: the step count follows the time step (here the one --dt-from takes from a run),
    a resumed run extends to the new length, and a bad length is refused before anything is written."""
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=350.0)
    first = tmp_path / "first"
    base = ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa), "--temperature", "350", "--platform", "CPU",
            "--save-every-steps", "10", "--seed", "3", "--quiet"]
    assert cli_main(base + ["--steps", "10", "--dt-fs", "4", "--out", str(first)]) == 0
    out = tmp_path / "cg"
    args = base + ["--length-ps", "0.1", "--dt-from", str(first), "--out", str(out)]
    assert cli_main(args) == 0
    assert "CG run finished: 25 steps of 4 fs" in capsys.readouterr().out
    args[args.index("0.1")] = "0.2"
    assert cli_main(args + ["--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 50 and summary["dt_fs"] == 4.0
    bad = base + ["--dt-fs", "4", "--out", str(tmp_path / "bad")]
    for length in ("0", "nan", "-1"):
        assert cli_main(bad + ["--length-ps", length]) == 2
        assert f"--length-ps {float(length):g}: must be a positive number of ps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one or the other
        cli_main(bad + ["--length-ps", "1", "--steps", "10"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_simulate_user_errors(model_dir, tmp_path, capsys):
    base = ["simulate", "--temperature", "350", "--steps", "10", "--out", str(tmp_path / "x")]
    assert cli_main(base + ["--forcefield", str(model_dir), "--pairs", "4"]) == 2
    assert "--pairs needs --density" in capsys.readouterr().err
    assert cli_main(base + ["--forcefield", str(tmp_path), "--pairs", "4", "--density", "800"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    # 4 pairs at this density make a box under twice the cutoff: refused with the reason
    assert cli_main(base + ["--forcefield", str(model_dir), "--pairs", "4", "--density", "800"]) == 2
    assert "twice the model cutoff" in capsys.readouterr().err
    assert cli_main(base + ["--forcefield", str(model_dir), "--pairs", "4", "--density", "300", "--prior", "model",
                            "--mts-inner-steps", "2"]) == 2
    assert "prior='openmm'" in capsys.readouterr().err
    for inner in ("0", "two"):
        with pytest.raises(SystemExit):  # argparse: a whole number >= 1, or auto
            cli_main(base + ["--forcefield", str(model_dir), "--pairs", "4", "--density", "300", "--mts-inner-steps", inner])
        assert "a whole number >= 1, or auto" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("engine", ["torch", "python-eager"])
def test_setup_overflow_regrows_the_pair_list_and_finishes(cg, tmp_path, engine):
    """A start with more pairs than the capacity: set-up regrows the list (no NaN verdict on any
    time step) and the run finishes, twice in one process (libtorch used to crash when the module
    raised in a second Context). The regrown force replaces the old one by its index, whichever
    engine runs it (PythonForce uncompiled here: a compile per capacity would dominate the test)."""
    crowded = cg.with_positions(cg.positions * 0.3)  # far more pairs than the model's capacity
    # skin 0: the PythonForce engine without its own pair list runs the module's capacity-bound search
    chosen = "torch" if engine == "torch" else PythonForceEngine(compile=False, skin_nm=0.0)
    force = CGNNForce(make_model_dir(tmp_path / "small", max_pairs_per_bead=4.0), crowded, engine=chosen)
    for attempt in range(2):
        run = CGRun(force, crowded, tmp_path / f"run{attempt}", config(dt_fs=None, steps=20, dt_candidates_fs=(10.0, 4.0)),
                    log=lambda m: None)
        summary = run.run().summary
        assert summary["status"] == "finished"
        names = [run.system.getForce(i).getName() for i in range(run.system.getNumForces())]
        assert names.count("CGNNForce") == 1 and names[force.force_index] == "CGNNForce"
        if attempt == 0:  # the force keeps its regrown list for later runs
            regrown = summary["pair_list_regrown"]
            assert regrown and regrown[0]["where"] == "the starting structure"
            assert regrown[0]["pair_count"] > regrown[0]["pair_capacity"] == 64
            assert summary["max_pairs_per_bead"] == regrown[-1]["max_pairs_per_bead"] > 4.0
        assert all("NaN" not in r["reason"] for r in summary["dt_stability"])


def test_python_engine_pair_list_outgrows_the_model_capacity(cg, tmp_path):
    """The PythonForce engine's own pair list (a skin, outside the compiled graph) is as long as the
    pairs found: the same crowded start runs without overflow or regrowth, and the list is longer
    than the model's capacity."""
    crowded = cg.with_positions(cg.positions * 0.3)
    force = CGNNForce(make_model_dir(tmp_path / "small", max_pairs_per_bead=4.0), crowded,
                      engine=PythonForceEngine(compile=False))
    run = CGRun(force, crowded, tmp_path / "run", config(dt_fs=None, steps=20, dt_candidates_fs=(10.0, 4.0)),
                log=lambda m: None)
    summary = run.run().summary
    assert summary["status"] == "finished" and not summary["pair_list_regrown"]
    pair_list = force.engine_report()["pair_list"]
    assert pair_list["capacity"] > 64 and 0 < pair_list["rebuilds"] <= pair_list["calls"]
    assert all("NaN" not in r["reason"] for r in summary["dt_stability"])


def test_production_overflow_regrows_from_the_checkpoint(cg, tmp_path):
    """The start fits the capacity (71 pairs in 72); thermal motion overflows it during the run:
    the runner replays from the checkpoint, names the step, regrows, and the run finishes."""
    force = CGNNForce(make_model_dir(tmp_path / "tight", max_pairs_per_bead=4.5), cg)
    run = CGRun(force, cg, tmp_path / "run", config(dt_fs=4.0, minimize=False, thermalize_steps=0, steps=40),
                log=lambda m: None)
    summary = run.run().summary
    assert summary["status"] == "finished" and summary["steps_done"] == 40 and summary["n_frames"] == 3
    (regrow,) = summary["pair_list_regrown"]
    assert regrow["where"].startswith("production run, step ")
    assert regrow["pair_count"] > regrow["pair_capacity"] == 72
    frames = read_frames(tmp_path / "run" / "frames.h5")
    assert np.isfinite(frames.positions).all() and len(frames.positions) == 3
    # a later --resume with a fresh force starts from the capacity the run had grown to
    more = CGRun(CGNNForce(tmp_path / "tight", cg), cg, tmp_path / "run", config(dt_fs=4.0, steps=60), resume=True,
                 log=lambda m: None).run().summary
    assert more["status"] == "finished" and more["max_pairs_per_bead"] == regrow["max_pairs_per_bead"]


def test_overflow_without_regrow_fails_with_the_cause(cg, tmp_path):
    """A model.pt cannot be scripted again: set-up fails with one line naming the count, the
    capacity and the way out, and summary.json records the failure and its cause."""
    crowded = cg.with_positions(cg.positions * 0.3)
    # prior inside: the model.pt below carries it
    source = CGNNForce(make_model_dir(tmp_path / "small", max_pairs_per_bead=4.0), cg, prior="model")
    force = CGNNForce(source.save_model(tmp_path / "model.pt"), crowded)
    run = CGRun(force, crowded, tmp_path / "run", config(dt_fs=None, dt_candidates_fs=(10.0, 4.0)), log=lambda m: None)
    with pytest.raises(SimulationUnstable, match=r"pair-list overflow: \d+ intermolecular pairs .*capacity 64 .*"
                                                 r"export the model again with a larger max_pairs_per_bead") as info:
        run.run()
    assert "\n" not in str(info.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed: set-up" and "pair-list overflow" in summary["error"]
    assert summary["cause"]["causes"] == ["pair_overflow"] and summary["cause"]["pair_capacity"] == 64


def test_production_overflow_of_a_model_pt_stops_with_the_cause(cg, tmp_path):
    """Without a model directory to script again, the overflow in the run ends it: one line with the
    step, the count, the capacity and the way out; summary.json keeps the cause; frames are kept."""
    # prior inside: the model.pt below carries it
    source = CGNNForce(make_model_dir(tmp_path / "tight", max_pairs_per_bead=4.5), cg, prior="model")
    force = CGNNForce(source.save_model(tmp_path / "model.pt"), cg)
    run = CGRun(force, cg, tmp_path / "run", config(dt_fs=4.0, minimize=False, thermalize_steps=0, steps=40),
                log=lambda m: None)
    with pytest.raises(SimulationUnstable, match=r"production run, step \d+\. Kept \d+ frames .*pair-list overflow: "
                                                 r"\d+ intermolecular pairs .*capacity 72"):
        run.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed: unstable" and summary["cause"]["causes"] == ["pair_overflow"]
    assert summary["cause"]["pair_count"] > 72 and summary["n_frames"] >= 1


def test_time_step_search_regrows_on_overflow_instead_of_calling_the_step_unstable(cg, tmp_path):
    """The start fits the capacity (71 pairs in 72), the NVE tests overflow it: the search regrows
    the list and tests the same step again; no candidate is marked unstable for a NaN."""
    # prior inside: it overflows with the network (as native forces the 8 fs test may blow up before)
    force = CGNNForce(make_model_dir(tmp_path / "tight", max_pairs_per_bead=4.5), cg, prior="model")
    run = CGRun(force, cg, tmp_path / "run", config(dt_fs=None, minimize=False, thermalize_steps=0, steps=20,
                                                   dt_candidates_fs=(8.0, 4.0)), log=lambda m: None)
    summary = run.run().summary
    assert summary["status"] == "finished"
    assert summary["pair_list_regrown"][0]["where"].startswith("time-step test at 8 fs, step ")
    # After the regrow the 8 fs test goes on; this toy blows up there for real (a close contact
    # flings a bead ~0.7 nm per step), so its verdict may read NaN/inf or, when float32 minimum
    # images of coordinates ~1e8 nm count pairs wrongly, an overflow again. Either way the search
    # moves on to 4 fs, which is stable; nothing is an OpenMM error.
    assert not any("OpenMM error" in r["reason"] for r in summary["dt_stability"])
    assert [r["dt_fs"] for r in summary["dt_stability"] if r["stable"]] == [4.0] and summary["dt_fs"] == 4.0


def test_prior_only_ablation_runs_the_prior_alone_at_the_trained_step(cg, model_dir, tmp_path, capsys):
    """--network off: the same model's prior as native forces and no TorchForce, at the step of --dt-from."""
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=350.0)
    trained, prior_only = tmp_path / "cg", tmp_path / "cg_prior"
    base = ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa), "--temperature", "350", "--steps", "40",
            "--platform", "CPU", "--save-every-steps", "20", "--seed", "3", "--quiet"]
    assert cli_main(base + ["--dt-fs", "4", "--out", str(trained)]) == 0
    assert cli_main(base + ["--network", "off", "--dt-from", str(trained), "--out", str(prior_only)]) == 0
    summary = json.loads((prior_only / "summary.json").read_text())
    assert summary["network"] is False and summary["prior_carrier"] == "openmm" and summary["dt_fs"] == 4.0
    assert json.loads((trained / "summary.json").read_text())["network"] is True
    assert read_frames(prior_only).metadata["network"] is False

    # The forces are the prior's alone: no TorchForce in the system, and they differ from network + prior.
    def forces(network):
        system = cg.system()
        cgnn = CGNNForce(model_dir, cg, 350.0, prior="openmm", network=network)
        cgnn.add_to(system)
        names = [system.getForce(i).getName() for i in range(system.getNumForces())]
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPeriodicBoxVectors(*cg.box)
        context.setPositions(cg.positions)
        return names, context.getState(getForces=True).getForces(asNumpy=True)._value
    names_off, f_off = forces(False)
    names_on, f_on = forces(True)
    assert "CGNNForce" in names_on and "CGNNForce" not in names_off
    assert np.abs(f_off).max() > 0 and not np.allclose(f_on, f_off)

    # A prior-only run cannot be resumed with the network on, nor the switch paired with the prior inside it.
    args = base + ["--steps", "60", "--dt-fs", "4", "--resume", "--out", str(prior_only)]
    args[args.index("40")] = "60"
    assert cli_main(args) == 2 and "network" in capsys.readouterr().err
    assert cli_main(base + ["--network", "off", "--prior", "model", "--out", str(tmp_path / "x")]) == 2
    assert "native forces" in capsys.readouterr().err
    assert cli_main(base + ["--dt-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "--dt-from" in capsys.readouterr().err


def _block_means(values, blocks=5):
    means = np.array([b.mean() for b in np.array_split(np.asarray(values), blocks)])
    return means.mean(), means.std(ddof=1) / np.sqrt(blocks)


def test_mts_is_stable_and_samples_like_single_stepping(cg, tmp_path):
    """MTS (network on the outer step, the native prior on 4 inner steps): the NVE check of outer
    steps picks a step at least as long as single stepping's, and a Langevin run with it gives the
    same mean potential energy and bond lengths as single stepping at its inner step, within noise."""
    folder = make_model_dir(tmp_path / "m", use_temperature=True)
    with pytest.raises(SimulationError, match="prior='openmm'"):
        CGRun(CGNNForce(folder, cg, 300.0, prior="model"), cg, tmp_path / "x", config(mts_inner_steps=2))
    runs = {}
    for name, inner, dt in (("single", 1, 2.5), ("mts", 4, 10.0)):
        force = CGNNForce(folder, cg, 300.0, prior="openmm", engine="torch")
        runs[name] = CGRun(force, cg, tmp_path / name, config(dt_fs=None, dt_candidates_fs=(dt,), steps=int(8000 / dt),
                                                                save_every_steps=int(200 / dt), report_every_steps=int(40 / dt),
                                                                friction_per_ps=5.0, mts_inner_steps=inner), log=lambda m: None).run()
    summary = runs["mts"].summary
    assert summary["integrator"] == "MTSLangevinIntegrator" and summary["mts_inner_steps"] == 4
    assert summary["largest_stable_dt_fs"] == 10.0  # the outer step passed the NVE check
    stats = {}
    for name, result in runs.items():
        table = np.genfromtxt(result.out_dir / "state.csv", delimiter=",", names=True)
        potential = table[[n for n in table.dtype.names if n.lower().startswith("potential")][0]]
        frames = read_frames(result.out_dir)
        bonds = np.linalg.norm(frames.positions[:, 1:] - frames.positions[:, :-1], axis=-1)  # includes every bond
        stats[name] = (_block_means(potential[len(potential) // 5:]),
                       np.array([_block_means(b) for b in bonds[frames.n_frames // 5:].T]))
    (e1, s1), b1 = stats["single"]
    (e2, s2), b2 = stats["mts"]
    assert abs(e1 - e2) < 4 * np.hypot(s1, s2) + 1e-6
    # bonded beads (intramolecular neighbours in topology order) keep the same mean length, within
    # noise (the trajectories are chaotic: one more energy read between MTS steps changes them)
    bonded = np.array([i for i in range(cg.n_beads - 1) if cg.molecule_index[i] == cg.molecule_index[i + 1]])
    difference, noise = np.abs(b2[bonded, 0] - b1[bonded, 0]), np.hypot(b1[bonded, 1], b2[bonded, 1])
    assert (difference < 4 * noise + 1e-6).all() and (difference < 0.1 * b1[bonded, 0]).all()


def test_mts_auto_steps_singly_and_a_resumed_run_keeps_its_stepping(cg, model_dir, toy_dir, tmp_path):
    """mts_inner_steps None ("auto", simulate's default): single stepping for a fresh run; a resumed run
    keeps the K it was made with (its checkpoint holds that integrator's state) and continues the
    trajectory of an uninterrupted run, also a run of a version before MTS (no K recorded); another
    K is refused."""
    fresh = CGRun(CGNNForce(model_dir, cg, 300.0, engine="torch"), cg, tmp_path / "auto",
                  config(steps=20, mts_inner_steps=None)).run().summary
    assert (fresh["integrator"], fresh["mts_inner_steps"]) == ("LangevinMiddleIntegrator", 1)
    mts = CGNNForce(model_dir, cg, 300.0, engine="torch")
    CGRun(mts, cg, tmp_path / "mts_whole", config(steps=80, mts_inner_steps=4)).run()
    CGRun(mts, cg, tmp_path / "mts", config(steps=40, mts_inner_steps=4)).run()
    resumed = CGRun(mts, cg, tmp_path / "mts", config(steps=80, mts_inner_steps=None), resume=True).run().summary
    assert resumed["steps_done"] == 80
    assert (resumed["integrator"], resumed["mts_inner_steps"]) == ("MTSLangevinIntegrator", 4)
    np.testing.assert_array_equal(read_frames(tmp_path / "mts_whole").positions, read_frames(tmp_path / "mts").positions)
    # a single-stepping run (here as an older version wrote it) resumed under auto: the same
    # trajectory as one uninterrupted single-stepping run
    force = CGNNForce(toy_dir / "model.pt", cg, engine="torch")
    CGRun(force, cg, tmp_path / "whole", config(steps=120, mts_inner_steps=1)).run()
    parts = tmp_path / "parts"
    CGRun(force, cg, parts, config(steps=60, mts_inner_steps=1)).run()
    progress = json.loads((parts / "checkpoint.json").read_text())
    del progress["mts_inner_steps"]
    (parts / "checkpoint.json").write_text(json.dumps(progress))
    summary = CGRun(force, cg, parts, config(steps=120, mts_inner_steps=None), resume=True).run().summary
    assert (summary["integrator"], summary["mts_inner_steps"]) == ("LangevinMiddleIntegrator", 1)
    np.testing.assert_array_equal(read_frames(tmp_path / "whole").positions, read_frames(parts).positions)
    with pytest.raises(SimulationError, match="mts_inner_steps=1, now 2"):
        CGRun(force, cg, parts, config(steps=140, mts_inner_steps=2), resume=True).run()


def test_prior_only_twin_of_an_mts_run_steps_its_prior_as_the_run_did(cg, model_dir, tmp_path):
    """--dt-from an MTS run gives the prior-only twin that run's outer step and K: the prior alone is
    integrated at the trained run's inner step. At the toy's 40 fs outer step that passes the NVE
    check, and single stepping the prior alone at 40 fs does not."""
    aa = write_aa_run(tmp_path / "aa", cg, temperature_K=350.0)
    trained, twin = tmp_path / "cg", tmp_path / "cg_prior"
    base = ["simulate", "--forcefield", str(model_dir), "--from-aa", str(aa), "--temperature", "350", "--steps", "20",
            "--platform", "CPU", "--save-every-steps", "10", "--seed", "3", "--quiet"]
    assert cli_main(base + ["--dt-fs", "40", "--mts-inner-steps", "4", "--out", str(trained)]) == 0
    assert cli_main(base + ["--network", "off", "--dt-from", str(trained), "--out", str(twin)]) == 0
    first, second = (json.loads((d / "summary.json").read_text()) for d in (trained, twin))
    assert first["network"] is True and second["network"] is False and second["dt_from"] == str(trained)
    assert (second["dt_fs"], second["integrator"], second["mts_inner_steps"]) == \
        (40.0, "MTSLangevinIntegrator", 4)
    # a resumed twin keeps its own K, also one made with another K than the --dt-from run's
    single = base + ["--network", "off", "--dt-from", str(trained), "--out", str(tmp_path / "single")]
    assert cli_main(single + ["--mts-inner-steps", "1"]) == 0
    single[single.index("20")] = "30"
    assert cli_main(single + ["--resume"]) == 0
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert (summary["steps_done"], summary["mts_inner_steps"]) == (30, 1)
    for inner, largest in ((4, 40.0), (1, 2.0)):
        run = CGRun(CGNNForce(model_dir, cg, 350.0, network=False), cg, tmp_path / f"nve{inner}",
                    config(temperature_K=350.0, steps=10, dt_fs=None, dt_candidates_fs=(40.0, 2.0), mts_inner_steps=inner),
                    log=lambda m: None)
        assert run.run().summary["largest_stable_dt_fs"] == largest


def test_default_engine_follows_the_platform_and_the_run_length():
    from openmm_cgnn.openmm.engines import COMPILE_PAYBACK_STEPS, default_engine

    assert default_engine("CPU") == "python"  # length unknown (a user's own Simulation): the faster per step
    assert default_engine("CPU", COMPILE_PAYBACK_STEPS) == "python"
    assert default_engine("CPU", COMPILE_PAYBACK_STEPS - 1) == "torch"
    assert default_engine("CUDA", None) == "torch"
    assert default_engine("CUDA", 10 ** 7) == "torch" and default_engine("Reference") == "torch"
    assert default_engine(None) == "torch"  # export: the exportable engine


def test_simulate_resolves_the_engine_before_the_prior(tmp_path):
    """``simulate --carrier auto``: the platform's engine for the run's length (short runs TorchForce,
    long ones the compiled PythonForce, whose "auto" prior then goes inside its graph); multiple time
    stepping and resumed runs keep the prior as native forces."""
    from argparse import Namespace

    from openmm_cgnn.cli.simulate import resolve_engine_and_prior
    from openmm_cgnn.openmm.engines import COMPILE_PAYBACK_STEPS

    args = Namespace(carrier="auto", prior="auto", resume=False, out=tmp_path / "x", network="on", platform="CPU")
    short = RunConfig(temperature_K=300.0, steps=100, platform="CPU")
    long = RunConfig(temperature_K=300.0, steps=COMPILE_PAYBACK_STEPS, platform="CPU")
    assert resolve_engine_and_prior(args, short) == ("torch", "auto", "CPU")
    assert resolve_engine_and_prior(args, long) == ("python", "auto", "CPU")
    assert resolve_engine_and_prior(args, replace(long, mts_inner_steps=2)) == ("python", "openmm", "CPU")
    assert resolve_engine_and_prior(Namespace(**{**vars(args), "network": "off"}), long)[1] == "openmm"
    assert resolve_engine_and_prior(Namespace(**{**vars(args), "carrier": "torch"}), long) == ("torch", "auto", "CPU")
    # no --platform on a machine without a GPU: every force in the compiled graph, so OpenMM only
    # integrates, on the platform with the least fixed cost per step (engines.COMPILED_ENGINE_PLATFORM)
    unnamed = Namespace(**{**vars(args), "platform": None})
    default = choose_platform(None).getName()
    expected = "Reference" if default == "CPU" else default
    assert resolve_engine_and_prior(unnamed, replace(long, platform=None))[2] == expected
    assert resolve_engine_and_prior(unnamed, replace(short, platform=None))[2] == default
    assert resolve_engine_and_prior(Namespace(**{**vars(unnamed), "prior": "openmm"}),
                                    replace(long, platform=None))[2] == default
    # --resume keeps the prior carrier and the platform of the run it continues (its checkpoint is
    # that platform's), whatever the defaults would pick now
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.chk").write_bytes(b"")
    (run / "checkpoint.json").write_text(json.dumps({"prior_carrier": "model", "platform": "Reference"}))
    resumed = Namespace(**{**vars(unnamed), "resume": True, "out": run})
    assert resolve_engine_and_prior(resumed, replace(long, platform=None)) == ("python", "model", "Reference")
    (run / "checkpoint.json").write_text(json.dumps({"prior_carrier": "openmm", "platform": "CPU"}))
    assert resolve_engine_and_prior(resumed, replace(long, platform=None)) == ("python", "openmm", "CPU")


PYTHONFORCE_RESUME = """
import sys
import numpy as np
import torch  # noqa: F401  (before openmm)
import openmm
from openmm import app
from openmm_cgnn.openmm.simulation import load_checkpoint

def forces(state):
    return 0.0, np.zeros((4, 3))

system = openmm.System()
for _ in range(4):
    system.addParticle(10.0)
system.setDefaultPeriodicBoxVectors(openmm.Vec3(3, 0, 0), openmm.Vec3(0, 3, 0), openmm.Vec3(0, 0, 3))
system.addForce(openmm.PythonForce(forces))
topology = app.Topology()
chain = topology.addChain()
for _ in range(4):
    topology.addAtom("X", None, topology.addResidue("X", chain))
simulation = app.Simulation(topology, system, openmm.LangevinMiddleIntegrator(300, 1, 0.002),
                            openmm.Platform.getPlatformByName("CPU"))
positions = np.random.default_rng(0).random((4, 3))
if sys.argv[1] == "save":
    simulation.context.setPositions(positions)
    simulation.step(10)
    simulation.saveCheckpoint(sys.argv[2])
else:
    load_checkpoint(simulation, sys.argv[2], positions)
    simulation.step(10)
print("stepped")
"""


def test_a_pythonforce_run_resumes_in_a_fresh_process(tmp_path):
    """A System whose only force is a PythonForce (the compiled engine with the prior inside) resumed
    in a new process: plain ``loadCheckpoint`` then ``step`` crashes OpenMM 8.5.2 with a segmentation
    fault; the runner's ``load_checkpoint`` evaluates the forces once first."""
    import subprocess
    import sys

    script = tmp_path / "resume.py"
    script.write_text(PYTHONFORCE_RESUME)
    checkpoint = str(tmp_path / "run.chk")
    for stage in ("save", "load"):
        done = subprocess.run([sys.executable, str(script), stage, checkpoint], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "stepped" in done.stdout, done.stderr[-2000:]
