"""Liquids as data (openmm_cgnn/liquids), the ``aa`` counts, and the ``openmm-cgnn run`` driver:
its printed commands, the GPU each per-temperature job gets, and the tiny chain for [EMIM][BF4]."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)
from openmm_cgnn.analysis.density import find_experimental_density
from openmm_cgnn.cli import main
from openmm_cgnn.driver import DriverError, plan, resolve_devices
from openmm_cgnn.liquids import LIQUIDS_DIR, LiquidError, available_liquids, composition_for, load_liquid

ROOT = Path(__file__).resolve().parents[1]


def write_liquid(tmp_path: Path, change=None, name: str = "liquid.json") -> Path:
    """bmim_bf4.json copied next to tmp_path (force-field dir made absolute), edited by ``change``."""
    data = json.loads((LIQUIDS_DIR / "bmim_bf4.json").read_text())
    data["forcefield"]["dir"] = str((LIQUIDS_DIR / data["forcefield"]["dir"]).resolve())
    data["name"] = "my_liquid"
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_shipped_liquids():
    assert available_liquids() == ["bmim_bf4", "bmim_pf6", "emim_bf4"]
    expected = {"bmim_bf4": ("BMIM=4,BF4=1", {"C8H15N2": 1, "BF4": 1}),
                "emim_bf4": ("EMIM=3,BF4=1", {"C6H11N2": 1, "BF4": 1}),
                "bmim_pf6": ("BMIM=4,PF6=1", {"C8H15N2": 1, "F6P": 1})}
    for name, (beads, formula_units) in expected.items():
        liquid = load_liquid(name)
        # The residues, and their formulae, are those of the converted force field the file points to.
        assert liquid.beads_option() == beads and liquid.formula_units() == formula_units
        assert liquid.one_to_one and liquid.composition(5) == {r: 5 for r in liquid.residues}
        assert {"tiny", "quick", "cpu", "full"} <= set(liquid.sizes)
    # The experimental density lives in the liquid file and is found by formula ratio, not by name.
    reference = find_experimental_density({"C8H15N2": 32, "BF4": 32})
    assert reference is not None and reference.name == "[BMIM][BF4]" and reference.at(298.0) == (1200.0, False)
    assert find_experimental_density({"C6H11N2": 8, "BF4": 8}) is None  # EMIM/BF4 ships no table


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(format="x/1"), "format"),
    (lambda d: d.pop("molecules"), "molecules: missing"),
    (lambda d: d["molecules"][0].update(beads=0), "molecules[0].beads"),
    (lambda d: d["molecules"][1].update(per_unit="two"), "molecules[1].per_unit"),
    (lambda d: d["molecules"].append(dict(d["molecules"][0])), "listed twice"),
    (lambda d: d["molecules"][0].update(per_unit=2) or d["molecules"][1].update(per_unit=2), "share a factor"),
    (lambda d: d["forcefield"].update(dir="/nonexistent"), "forcefield.dir"),
    (lambda d: d["sizes"]["quick"].update(temperatures_K=[400, 400]), "sizes.quick.temperatures_K"),
    (lambda d: d["sizes"]["cpu"].update(units=-1), "sizes.cpu.units"),
    (lambda d: d["experimental_density"].pop("source"), "experimental_density.source"),
    (lambda d: d.update(colour="blue"), "colour: unknown field"),
])
def test_bad_liquid_file_names_file_and_field(tmp_path, change, needle):
    path = write_liquid(tmp_path, change)
    with pytest.raises(LiquidError) as error:
        load_liquid(path)
    message = str(error.value)
    assert str(path) in message and needle in message and "\n" not in message


def test_counts_and_stoichiometry(tmp_path):
    emim = load_liquid("emim_bf4")
    assert composition_for(emim, [], pairs=4) == ({"EMIM": 4, "BF4": 4}, "--pairs")
    assert composition_for(emim, [], molecules={"BF4": 3, "EMIM": 3}) == ({"EMIM": 3, "BF4": 3}, "--molecules")
    with pytest.raises(LiquidError, match="--molecules: PF6"):
        composition_for(emim, [], molecules={"PF6": 3})
    # A 1:2 liquid: --units follows the ratio and --pairs is refused.
    one_two = load_liquid(write_liquid(tmp_path, lambda d: d["molecules"][1].update(per_unit=2)))
    assert not one_two.one_to_one
    assert composition_for(one_two, [], units=3) == ({"BMIM": 3, "BF4": 6}, "--units")
    with pytest.raises(LiquidError, match="--pairs is for 1:1 liquids.*1:2"):
        composition_for(one_two, [], pairs=3)


def test_aa_liquid_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    base = ["aa", "--temperature", "450", "--equilibrate-ps", "1", "--production-ps", "0.2", "--save-every-ps", "0.1",
            "--platform", "CPU", "--out", str(out)]
    # The BMIM + 2 BF4 formula unit of this file is charged: the error names the liquid file's molecules.
    charged = write_liquid(tmp_path, lambda d: d["molecules"][1].update(per_unit=2))
    cases = [(["--liquid", str(charged), "--units", "4"], f"{charged}: molecules"),
             (["--liquid", str(charged), "--pairs", "4"], "--pairs is for 1:1 liquids"),
             (["--liquid", "no_such_liquid", "--pairs", "4"], "--liquid 'no_such_liquid'"),
             (["--liquid", "emim_bf4", "--molecules", "EMIM=4", "BF4=3"], "--molecules: 4 EMIM, 3 BF4 has net charge"),
             (["--liquid", "emim_bf4", "--molecules", "EMIM4"], "--molecules: expected RES=N"),
             (["--liquid", "emim_bf4", "--pairs", "4", "--residues", "BMIM", "BF4"], "--residues and --liquid"),
             (["--liquid", "emim_bf4", "--pairs", "4", "--device-index", "0"], "--device-index needs a GPU platform")]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, (extra, err)
        assert not out.exists()


def test_aa_with_liquid_writes_composition(tmp_path):
    out = tmp_path / "aa"
    assert main(["aa", "--liquid", "emim_bf4", "--molecules", "EMIM=4", "BF4=4", "--temperature", "450",
                 "--equilibrate-ps", "0.1", "--production-ps", "0.1", "--save-every-ps", "0.05", "--platform", "CPU",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["composition"] == {"EMIM": 4, "BF4": 4} and summary["n_units"] == 4 and summary["n_pairs"] == 4
    assert summary["n_atoms"] == 4 * 19 + 4 * 5


def commands_by_group(text: str) -> list[tuple[str, list[list[str]]]]:
    groups: list[tuple[str, list[list[str]]]] = []
    for line in text.splitlines():
        if line.startswith("# group "):
            groups.append((line.split(": ", 1)[1].split(" ", 1)[0], []))
        elif line and not line.startswith("#"):
            groups[-1][1].append(shlex.split(line))
    return groups


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_print_commands_in_dependency_order_with_gpus_round_robin(tmp_path, capsys):
    out = tmp_path / "chain"
    assert main(["run", "--liquid", "emim_bf4", "--gpus", "0,1", "--print-commands", "--out", str(out)]) == 0
    groups = commands_by_group(capsys.readouterr().out)
    assert [g for g, _ in groups] == ["aa_npt", "aa", "map", "train", "refine", "export", "simulate",
                                      "simulate_prior", "evaluate"]
    commands = dict(groups)
    assert all(argv[0] == "openmm-cgnn" and argv[1] == group.split("_")[0] for group, members in groups for argv in members)
    # Full size: four temperatures from the liquid file, each on its own GPU, round-robin over two.
    aa, simulate = commands["aa"], commands["simulate"]
    assert [option(a, "--temperature") for a in aa] == ["350", "400", "450", "500"]
    assert [option(a, "--device-index") for a in aa] == ["0", "1", "0", "1"]
    assert [option(a, "--device-index") for a in simulate] == ["0", "1", "0", "1"]
    assert all(option(a, "--platform") == "CUDA" and option(a, "--liquid") == "emim_bf4" and option(a, "--units") == "300"
               for a in aa)
    # Each later stage reads what the earlier ones write.
    aa_dirs = [option(a, "--out") for a in aa]
    # NPT everywhere first, stopping there; then NVT in the box of the rho(T) line over all of them.
    npt = commands["aa_npt"]
    assert [option(a, "--out") for a in npt] == aa_dirs and all("--npt-only" in a for a in npt)
    assert all(a[a.index("--density-fit") + 1:][:4] == aa_dirs and "--resume" in a for a in aa)
    assert all(n[:n.index("--npt-only")] == a[:a.index("--density-fit")] for n, a in zip(npt, aa))
    (map_cmd,), (train,), (export,), (evaluate,) = commands["map"], commands["train"], commands["export"], commands["evaluate"]
    (refine,) = commands["refine"]
    assert option(map_cmd, "--beads") == "EMIM=3,BF4=1" and option(map_cmd, "--device") == "cuda:0"
    assert map_cmd[map_cmd.index("--data") + 1:][:4] == aa_dirs
    assert option(train, "--mapping") == str(Path(option(map_cmd, "--out")) / "mapping.json")
    assert option(train, "--device") == "cuda:0"
    # The bonded refinement of the trained model: what the export and every CG run use.
    assert option(refine, "--model") == option(train, "--out") != option(refine, "--out")
    assert option(refine, "--device-index") == "0" and option(refine, "--platform") == "CUDA"
    assert option(export, "--model") == option(refine, "--out")
    assert [option(s, "--forcefield") for s in simulate] == [option(refine, "--out")] * 4
    assert [option(s, "--from-aa") for s in simulate] == aa_dirs
    assert evaluate[evaluate.index("--cg") + 1:][:4] == [option(s, "--out") for s in simulate]
    # The ablation: the same model with the network off, at each trained run's time step, steps and seed.
    prior = commands["simulate_prior"]
    assert [option(p, "--dt-from") for p in prior] == [option(s, "--out") for s in simulate]
    assert all(option(p, "--network") == "off" and option(p, k) == option(s, k)
               for p, s in zip(prior, simulate) for k in ("--forcefield", "--steps", "--seed", "--temperature"))
    assert evaluate[evaluate.index("--cg-prior-only") + 1:][:4] == [option(p, "--out") for p in prior]
    assert "--held-out-temperature" not in evaluate  # the full size holds nothing out
    assert not out.exists()  # printing runs nothing


@pytest.mark.parametrize("size, held_out, trained", [("quick", "450", ["400", "500"]),
                                                      ("cpu", "650", ["550", "600", "700"])])
def test_held_out_temperature_is_left_out_of_mapping_and_training(size, held_out, trained, capsys):
    assert main(["run", "--liquid", "bmim_bf4", "--size", size, "--print-commands", "--out", "o"]) == 0
    commands = dict(commands_by_group(capsys.readouterr().out))
    aa_dirs = {option(a, "--temperature"): option(a, "--out") for a in commands["aa"]}
    assert held_out in aa_dirs  # its AA run is made, and its CG runs
    for group in ("map", "train"):
        argv = commands[group][0]
        data = argv[argv.index("--data") + 1:argv.index("--data") + 1 + len(trained) + 1]
        assert data[:len(trained)] == [aa_dirs[t] for t in trained] and data[-1].startswith("-")
    assert held_out in [option(s, "--temperature") for s in commands["simulate"] + commands["simulate_prior"]]
    if size == "cpu":  # CG runs as long in ps as the AA production, so the MSDs reach the same lags
        production = {option(a, "--production-ps") for a in commands["aa"]}
        assert {option(s, "--length-ps") for s in commands["simulate"] + commands["simulate_prior"]} == production
    (evaluate,) = commands["evaluate"]
    assert option(evaluate, "--held-out-temperature") == held_out
    assert evaluate[evaluate.index("--aa") + 1:][:len(aa_dirs)] == list(aa_dirs.values())


def test_held_out_must_leave_a_training_temperature(tmp_path):
    for held in ([400, 450, 500], [425], "450"):
        path = write_liquid(tmp_path, lambda data: data["sizes"]["quick"].update(held_out_K=held))
        with pytest.raises(LiquidError, match=r"sizes.quick.held_out_K"):
            load_liquid(path)
    assert load_liquid("bmim_bf4").sizes["cpu"].training_temperatures_K == (550.0, 600.0, 700.0)


def test_devices_each_job_gets():
    # --gpus: indices round-robin, CUDA implied; several jobs share a GPU when there are fewer GPUs.
    platform, gpus = resolve_devices("quick", None, "3")
    stages = plan(load_liquid("bmim_bf4"), "quick", Path("out"), platform, gpus)
    assert platform == "CUDA" and [s.device for s in stages if s.group in ("aa", "simulate")] == ["cuda:3"] * 6
    assert [s.device for s in stages if s.group in ("map", "train")] == ["cuda:3"] * 2
    # CUDA_VISIBLE_DEVICES: one index per visible device, as the processes number them.
    assert resolve_devices("full", None, None, {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == ("CUDA", [0, 1, 2])
    assert resolve_devices("full", None, None, {"CUDA_VISIBLE_DEVICES": "-1"}) == ("CUDA", [])
    assert resolve_devices("quick", None, None, {"CUDA_VISIBLE_DEVICES": "0,1"}) == ("CPU", [])  # CPU size
    stages = plan(load_liquid("bmim_bf4"), "quick", Path("out"), "CPU", [])
    assert all(s.device is None and "--device-index" not in s.args for s in stages)
    for gpus, platform, needle in [("0,x", None, "--gpus '0,x'"), ("-1", None, ">= 0"), ("0", "CPU", "GPU platform")]:
        with pytest.raises(DriverError, match=needle):
            resolve_devices("full", platform, gpus)


def test_device_index_reaches_openmm_properties():
    import openmm

    from openmm_cgnn.platforms import PlatformError, platform_properties

    assert platform_properties("CUDA", 2) == {"Precision": "mixed", "DeviceIndex": "2"}
    assert platform_properties("CUDA") == {"Precision": "mixed"} and platform_properties("CPU") == {}
    with pytest.raises(PlatformError, match="--device-index"):
        platform_properties(openmm.Platform.getPlatformByName("CPU"), 1)
    with pytest.raises(PlatformError, match="--device-index"):
        platform_properties("CUDA", -1)


def test_run_bmim_is_the_driver(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "run_bmim.py"), "--quick", "--print-commands",
                             "--out", str(tmp_path / "q")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    groups = dict(commands_by_group(result.stdout))
    assert [option(a, "--units") for a in groups["aa"]] == ["16"] * 3
    assert option(groups["map"][0], "--beads") == "BMIM=4,BF4=1"


@pytest.mark.slow
def test_tiny_chain_for_a_second_liquid(tmp_path, monkeypatch):
    """aa -> map -> train -> export -> simulate -> evaluate for [EMIM][BF4], 8 pairs, two temperatures."""
    # One thread per stage, as in conftest: on a busy 2-core CI machine two spinning torch/OpenMM
    # threads made the 32-bead CG steps 100 times slower (250 against 2.5 ms/step).
    for name in ("OMP_NUM_THREADS", "OPENMM_CPU_THREADS"):
        monkeypatch.setenv(name, "1")
    out = tmp_path / "emim"
    assert main(["run", "--liquid", "emim_bf4", "--size", "tiny", "--out", str(out)]) == 0
    aa = json.loads((out / "aa" / "T450K" / "summary.json").read_text())
    assert aa["composition"] == {"EMIM": 8, "BF4": 8} and aa["n_frames"] == 20
    mapping = json.loads((out / "mapping" / "mapping.json").read_text())
    assert {r: len(m["beads"]) for r, m in mapping["residues"].items()} == {"EMIM": 3, "BF4": 1}
    assert (out / "model" / "model.pt").exists() and (out / "export" / "system.xml").exists()
    for t in (450, 500):
        cg = json.loads((out / "cg" / f"T{t}K" / "summary.json").read_text())
        assert cg["steps_done"] == 200 and cg["composition"] == {"EMIM": 8, "BF4": 8}
        prior = json.loads((out / "cg_prior" / f"T{t}K" / "summary.json").read_text())
        assert prior["network"] is False and prior["steps_done"] == 200 and prior["dt_fs"] == cg["dt_fs"]
        # the twin steps its prior as the trained run did (simulate's default: single stepping)
        assert cg["integrator"] == prior["integrator"] == "LangevinMiddleIntegrator"
        assert prior["mts_inner_steps"] == cg["mts_inner_steps"] == 1
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["ablation"]) == {"trained", "prior_only"} and metrics["held_out_temperatures_K"] == []
    report = (out / "report" / "report.md").read_text()
    assert "## Ablation" in report
    # the runs' force field is the refined model, and the report says so
    assert f"CG force field: `{out / 'model_refined'}` (bonded tables refined" in report
    assert all(r["refined"] for r in metrics["runs"] + metrics["prior_only_runs"] if r["kind"] == "cg")
    # Done stages are skipped: a second call runs nothing and succeeds.
    assert main(["run", "--liquid", "emim_bf4", "--size", "tiny", "--out", str(out)]) == 0
    # The fidelity table: a variant with harmonic priors, trained and run on the same data and step.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fidelity_table

    assert fidelity_table.main(["--run", str(out), "--liquid", "emim_bf4", "--size", "tiny",
                                "--variants", "harmonic"]) == 0
    variant = out / "variants" / "harmonic"
    assert json.loads((variant / "model" / "prior.json").read_text())["bonded_form"] == "harmonic"
    assert json.loads((out / "model" / "prior.json").read_text())["bonded_form"] == "tabulated"
    for t in (450, 500):
        run = json.loads((variant / "cg" / f"T{t}K" / "summary.json").read_text())
        cg = json.loads((out / "cg" / f"T{t}K" / "summary.json").read_text())
        assert run["steps_done"] == 200 and run["dt_fs"] == cg["dt_fs"]
    rows = json.loads((out / "fidelity_table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["trained (optimal map, tabulated priors, refined)", "prior only (network off)",
                                          "trained, harmonic bonded priors, not refined"]
    assert all(r["worst_com_rdf_error"] is not None and r["worst_bonded_tv"] is not None for r in rows)
    assert rows[0]["worst_com_rdf_error"] == metrics["verdict"]["rdf"]["com"]["worst_error"]
    # The network-size sweep on the same chain: one tiny network, short CG runs, no timing.
    import network_sweep

    assert network_sweep.main(["--run", str(out), "--liquid", "emim_bf4", "--size", "tiny", "--networks", "n8",
                               "--cg-steps", "50", "--no-timing"]) == 0
    hparams = json.loads((out / "sweep" / "n8" / "model" / "hparams.json").read_text())
    assert (hparams["features"], hparams["intra_blocks"], hparams["intra_cutoff_nm"]) == (8, 1, 0.5)
    assert json.loads((out / "sweep" / "n8" / "cg" / "T450K" / "summary.json").read_text())["steps_done"] == 50
    (row,) = json.loads((out / "network_sweep.json").read_text())["rows"]
    assert row["model"] == "n8" and row["parameters"] > 0 and row["validation_force_rmse"] > 0
    # --train-only: a second size trained and tabulated without CG runs
    assert network_sweep.main(["--run", str(out), "--liquid", "emim_bf4", "--size", "tiny", "--networks", "n16",
                               "--train-only", "--no-timing"]) == 0
    assert (out / "sweep" / "n16" / "model" / "model.pt").exists() and not (out / "sweep" / "n16" / "cg").exists()
    (row,) = json.loads((out / "network_sweep.json").read_text())["rows"]
    assert row["model"] == "n16" and row["validation_force_rmse"] > 0 and row["worst_com_rdf_error"] is None

    # MTS against single stepping on the same model: two seeds each, one temperature, a short length
    import mts_accuracy

    assert mts_accuracy.main(["--run", str(out), "--temperatures", "450", "--seeds", "1", "2", "--length-ps", "1",
                              "--save-every-steps", "5", "5"]) == 0
    part = json.loads((out / "mts_accuracy" / "mts_accuracy.json").read_text())["by_temperature"]["450"]
    assert {r["mts_inner_steps"] for r in part["runs"].values()} == {1, 4}
    assert all(r["simulated_ps"] >= 1.0 for r in part["runs"].values())
    assert part["comparison"]["worst bead RDF"]["single"][0] > 0 and part["cg_vs_cg"]["across"]["pairs"] == 4


def test_fidelity_variants_are_refined_like_the_chain_unless_harmonic(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fidelity_table

    chain = plan(load_liquid("bmim_bf4"), "cpu", tmp_path)
    for name, refined in (("sum_map", True), ("harmonic", False)):
        root = tmp_path / "variants" / name
        stages = fidelity_table.variant_stages(chain, root, name, fidelity_table.VARIANTS[name][1],
                                               temperatures={"650"})
        refine = [s for s in stages if s.group == "refine"]
        model = root / ("model_refined" if refined else "model")
        assert len(refine) == refined and all(option(s.args, "--model") == str(root / "model") for s in refine)
        simulate = [s for s in stages if s.group == "simulate"]
        assert [option(s.args, "--temperature") for s in simulate] == ["650"]
        assert all(option(s.args, "--forcefield") == str(model) for s in simulate)


def test_network_sweep_reuses_the_chain_model_it_would_retrain(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import network_sweep

    chain = tmp_path / "chain"
    (chain / "model").mkdir(parents=True)
    (chain / "model" / "hparams.json").write_text(json.dumps(
        {"features": 64, "filters": 64, "n_gaussians": 32, "intra_blocks": 2, "inter_blocks": 2, "dtype": "float32"}))
    assert network_sweep.reuse_chain_model(chain, chain / "sweep" / "n64", network_sweep.NETWORKS["n64"])
    assert (chain / "sweep" / "n64" / "model" / "hparams.json").exists()
    assert not network_sweep.reuse_chain_model(chain, chain / "sweep" / "n64", network_sweep.NETWORKS["n64"])  # linked
    for other in ("n32", "n128", "reference"):
        assert not network_sweep.reuse_chain_model(chain, chain / "sweep" / other, network_sweep.NETWORKS[other])
        assert not (chain / "sweep" / other).exists()


def test_cg_packing_takes_any_stoichiometry():
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.openmm.topology import build_cg_system

    mapping = CGMapping.load(ROOT / "tests" / "models" / "toy_mapping.json")
    cg = build_cg_system(mapping, molecules={"ANI": 6, "CAT": 3}, density_kg_m3=800.0)
    assert cg.composition() == {"CAT": 3, "ANI": 6} and cg.n_beads == 3 * 3 + 6
    assert build_cg_system(mapping, pairs=2, density_kg_m3=800.0).composition() == {"CAT": 2, "ANI": 2}
    with pytest.raises(LiquidError, match="--molecules: XYZ.*the mapping has residues CAT, ANI"):
        build_cg_system(mapping, molecules={"XYZ": 2}, density_kg_m3=800.0)
