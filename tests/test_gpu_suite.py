"""The CUDA suite (benchmarks/gpu_suite.py) in its dry mode: every step's code path on CPU, tiny sizes.

The lent GPU's minutes must not be spent finding bugs: this runs the same step functions, driver,
time limits and JSON writing as the GPU run, and the agreement step against the committed
Reference values (so a change of the model's numbers that leaves them stale fails here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

# Keys each step's JSON must have, and keys of its rows.
EXPECTED = {
    "agreement": ({"rows", "tolerances", "all_agree", "reference"},
                  {"case", "term", "precision", "cuda_graphs", "energy_relative_difference", "force_relative_rms_difference",
                   "agrees"}),
    "cg_step": ({"rows", "properties"}, {"size", "prior_carrier", "cuda_graphs", "beads", "ms_per_step"}),
    "scaling": ({"rows", "ms_per_step_per_1000_beads"},
                {"beads", "openmm_step_ms", "neighbor_search_ms", "model_forward_backward_ms", "openmm_overhead_ms"}),
    "aa_vs_cg": ({"rows", "cg_dt_stability"}, {"size", "pairs", "aa", "cg", "ratio_ns_per_day_cg_over_aa"}),
    "training": ({"rows", "device"}, {"config", "n_beads", "train_step", "validation"}),
    "chain": ({"stages", "all_ok"}, {"stage", "status", "command"}),
}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_dry_run_writes_every_steps_json(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "run", "--dry-run", "--results",
                           str(results)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((results / "gpu_suite_dry.json").read_text())
    assert list(summary["steps"]) == list(gpu_suite.STEPS)
    for step, (keys, row_keys) in EXPECTED.items():
        data = json.loads((results / f"gpu_{step}_dry.json").read_text())
        assert data["status"] == "ok" and summary["steps"][step]["status"] == "ok", step
        assert keys <= set(data), (step, keys - set(data))
        rows = data.get("rows") or data.get("stages")
        assert rows, step
        for row in rows:
            assert row_keys <= set(row), (step, row_keys - set(row), row.get("error"))
    agreement = json.loads((results / "gpu_agreement_dry.json").read_text())
    assert agreement["all_agree"], "the committed reference values are stale: python benchmarks/gpu_suite.py prepare"
    chain = json.loads((results / "gpu_chain_dry.json").read_text())
    assert [s["stage"] for s in chain["stages"]][:4] == ["aa", "map", "train", "export"] and chain["all_ok"]
    assert "| step | status |" in proc.stdout  # the table printed at the end


def test_a_step_over_its_time_limit_is_killed_and_marked(tmp_path, monkeypatch):
    """The driver kills a step at its limit, records it in the step's JSON and the summary, and goes on."""
    monkeypatch.setitem(gpu_suite.MODES["dry"]["limits_s"], "training", 2)
    monkeypatch.setattr(gpu_suite, "MIN_STEP_S", 0.0)
    code = gpu_suite.run_suite("dry", tmp_path, ["training"], budget_s=100, reference=gpu_suite.REFERENCE)
    data = json.loads((tmp_path / "gpu_training_dry.json").read_text())
    summary = json.loads((tmp_path / "gpu_suite_dry.json").read_text())
    assert code == 1
    assert summary["steps"]["training"]["status"] == "timeout" and data["status"].startswith("timeout")
    monkeypatch.setattr(gpu_suite, "MIN_STEP_S", 1e9)
    assert gpu_suite.run_suite("dry", tmp_path, ["training"], budget_s=100, reference=gpu_suite.REFERENCE) == 1
    assert json.loads((tmp_path / "gpu_training_dry.json").read_text())["status"].startswith("skipped")


def test_prepare_reproduces_the_committed_reference(tmp_path):
    """prepare's code path, on the small case: same positions and energies as the committed file."""
    committed = np.load(gpu_suite.REFERENCE / "reference.npz")
    gpu_suite.prepare(tmp_path, gpu_suite.REFERENCE / "model", new_model=False, cases={"pairs16": 16})
    fresh = np.load(tmp_path / "reference.npz")
    np.testing.assert_allclose(fresh["pairs16/positions"], committed["pairs16/positions"], atol=1e-4)
    for term in gpu_suite.AGREEMENT_TERMS:
        np.testing.assert_allclose(fresh[f"pairs16/{term}/energy"], committed[f"pairs16/{term}/energy"], rtol=1e-4)
        np.testing.assert_allclose(fresh[f"pairs16/{term}/forces"], committed[f"pairs16/{term}/forces"], atol=1e-2)


def test_a_plain_start_takes_over_when_the_runner_fails(tmp_path, monkeypatch):
    """Timings must not depend on CGRun working on a platform it never ran on: the failure is kept."""
    import bench_md

    def broken(*args, **kwargs):
        raise RuntimeError("runner broke")

    monkeypatch.setattr(bench_md, "cg_thermal_start", broken)
    settings = gpu_suite.MODES["dry"]["aa_vs_cg"]
    cg, summary = gpu_suite.thermal_start(gpu_suite.REFERENCE / "model", 16, "CPU", None, settings, tmp_path)
    assert summary["runner_error"] == "RuntimeError: runner broke"
    assert summary["largest_stable_dt_fs"] in settings["dt_candidates_fs"]
    assert cg.n_beads == 80 and np.isfinite(cg.positions).all()
