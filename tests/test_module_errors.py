"""The system module's error contract (model/export.py): never raise on bad data; NaN energy and NaN
forces on every particle; diagnose() names the cause; padding on distinct rows; the two-Context crash."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.make_models import make_model_dir
from openmm_cgnn.model import build_system_module, diagnose, load_model, script_for_system
from openmm_cgnn.model import neighbors as neighbors_module
from openmm_cgnn.model.geometry import FLAG_BOX_TOO_SMALL, FLAG_NONFINITE, FLAG_PAIR_OVERFLOW
from openmm_cgnn.model.neighbors import count_intermolecular_pairs

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny real CGModel with the toy prior, float64, capacity 8 pairs per bead (128 for 32 beads)."""
    return load_model(make_model_dir(tmp_path_factory.mktemp("m"), dtype="float64", max_pairs_per_bead=8.0))


def bad_inputs(cg) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """name -> (positions, box, the flag it must raise)."""
    positions, box = np.asarray(cg.positions, dtype=np.float64), np.asarray(cg.box, dtype=np.float64)
    # overflow: every molecule but the last crowded into a corner; the last (a one-bead anion) far
    # from all of them, so it takes part in no pair at all
    crowded = positions * 0.3
    crowded[-1] = 0.65 * np.diag(box)
    nonfinite = positions.copy()
    nonfinite[3, 1] = np.nan
    return {
        "overflow": (crowded, box, FLAG_PAIR_OVERFLOW),
        "nan": (nonfinite, box, FLAG_NONFINITE),
        "small box": (positions * 0.6, box * 0.6, FLAG_BOX_TOO_SMALL),
    }


def energy_and_gradient(module, positions: np.ndarray, box: np.ndarray) -> tuple[float, torch.Tensor]:
    leaf = torch.tensor(positions, requires_grad=True)
    energy = module(leaf, torch.tensor(box))
    energy.backward()
    return float(energy.detach()), leaf.grad


@pytest.mark.parametrize("host_checks", [True, False], ids=["host-reading", "graph-safe"])
def test_bad_input_gives_nan_energy_and_nan_forces_everywhere(cg, model, host_checks):
    module = script_for_system(model, cg.bead_type, cg.molecule_index, box=cg.box, host_checks=host_checks)
    assert module.graph_safe == (not host_checks)
    crowded = bad_inputs(cg)["overflow"][0]
    loner = torch.tensor(crowded[-1:])
    distance = torch.cdist(loner, torch.tensor(crowded[:-1])).min()
    assert float(distance) > model.cutoff_nm  # the last bead is in no pair: its force must be NaN too
    for name, (positions, box, flag) in bad_inputs(cg).items():
        energy, gradient = energy_and_gradient(module, positions, box)  # no exception
        assert math.isnan(energy), name
        assert bool(gradient.isnan().all()), f"{name}: {int((~gradient.isnan()).sum())} force components not NaN"
        found = diagnose(module, positions, box)
        assert found.flags & flag, (name, found)
    # good input: finite, and diagnose sees nothing
    energy, gradient = energy_and_gradient(module, cg.positions, cg.box)
    assert math.isfinite(energy) and bool(torch.isfinite(gradient).all())
    assert diagnose(module, cg.positions, cg.box).flags == 0


def test_diagnosis_counts_pairs_like_a_fresh_search(cg, model):
    module = script_for_system(model, cg.bead_type, cg.molecule_index, box=cg.box)
    positions, box, _ = bad_inputs(cg)["overflow"]
    found = diagnose(module, positions, box)
    expected = count_intermolecular_pairs(torch.tensor(positions)[None], torch.tensor(box)[None],
                                          torch.as_tensor(cg.molecule_index), model.search_cutoff)
    assert found.count == int(expected[0]) > found.capacity == 128
    assert found.causes() == ["pair_overflow"] and found.pair_overflow
    assert f"{found.count} intermolecular pairs exceed the pair capacity 128" in found.message()
    assert found.grown_max_pairs_per_bead() >= 2 * found.count / cg.n_beads


@pytest.mark.parametrize("host_checks", [True, False], ids=["host-reading", "graph-safe"])
def test_forces_are_minus_the_energy_gradient(cg, model, host_checks):
    module = script_for_system(model, cg.bead_type, cg.molecule_index, box=cg.box, host_checks=host_checks)
    positions, box = np.asarray(cg.positions, dtype=np.float64), torch.tensor(cg.box)
    _, gradient = energy_and_gradient(module, positions, cg.box)
    step = 1e-5
    for bead, axis in ((0, 0), (5, 1), (17, 2), (cg.n_beads - 1, 0)):
        shifted = [positions.copy(), positions.copy()]
        shifted[0][bead, axis] += step
        shifted[1][bead, axis] -= step
        up, down = (float(module(torch.tensor(p), box)) for p in shifted)
        assert (up - down) / (2 * step) == pytest.approx(float(gradient[bead, axis]), rel=1e-6, abs=1e-6)


def search_output(cg, model, backend: str, skin: float):
    module = build_system_module(model, cg.bead_type, cg.molecule_index, box=cg.box, neighbor_backend=backend,
                                 neighbor_skin_nm=skin, host_checks=skin > 0, max_pairs_per_bead=12.0)
    positions = torch.tensor(cg.positions)[None]
    return module.energy.neighbors(positions, torch.tensor(cg.box)[None], module.molecule_index)


@pytest.mark.parametrize("backend,skin", [("dense", 0.0), ("dense", 0.1)], ids=["dense", "verlet"])
def test_padding_slots_point_at_distinct_beads(cg, model, backend, skin):
    index_i, index_j, valid, count, _ = search_output(cg, model, backend, skin)
    padding = int((~valid).sum())
    assert padding > cg.n_beads  # capacity 192 for 71 pairs: room to spread over every bead
    for index in (index_i[~valid], index_j[~valid]):
        first = index[: cg.n_beads].tolist()
        assert len(set(first)) == cg.n_beads  # every bead once, not all on bead 0
        assert max(index.tolist()) < cg.n_beads


def test_padding_spread_changes_no_bit_of_the_result(cg, model, monkeypatch):
    """Forces with spread padding equal, bit for bit, those with every padding slot on one row."""
    module = build_system_module(model, cg.bead_type, cg.molecule_index, box=cg.box, host_checks=False)
    spread = energy_and_gradient(module, cg.positions, cg.box)
    monkeypatch.setattr(neighbors_module, "spread_padding", lambda index_i, index_j, valid, n_beads: (index_i, index_j))
    piled = energy_and_gradient(module, cg.positions, cg.box)
    index_i = module.energy.neighbors(torch.tensor(cg.positions)[None], torch.tensor(cg.box)[None], module.molecule_index)[0]
    assert int(index_i[0, -1]) == 0  # the patch did restore the old padding
    assert spread[0] == piled[0]
    assert torch.equal(spread[1], piled[1])


TWO_CONTEXTS = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
import torch
import openmm
from models.make_models import make_model_dir, toy_cg_system
from openmm_cgnn.openmm.force import CGNNForce
from test_module_errors import bad_inputs

cg = toy_cg_system()
model_dir = make_model_dir(Path(tempfile.mkdtemp()), max_pairs_per_bead=8.0)
results = []
for platform in ("Reference", "CPU"):
    for host_checks in (True, False):
        force = CGNNForce(model_dir, cg, host_checks=host_checks)
        system = cg.system()
        force.add_to(system)
        first = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
        first.setPositions(cg.positions)
        good = first.getState(getEnergy=True).getPotentialEnergy()._value
        for name, (positions, box, flag) in bad_inputs(cg).items():
            second = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
            second.setPeriodicBoxVectors(*box)
            second.setPositions(positions)
            row = {"platform": platform, "host_checks": host_checks, "case": name, "good": good, "flag": flag}
            try:
                state = second.getState(getEnergy=True, getForces=True)
                forces = state.getForces(asNumpy=True)._value
                row.update(energy=str(state.getPotentialEnergy()._value), nan_forces=int(np.isnan(forces).sum()),
                           components=int(forces.size))
            except openmm.OpenMMException as exc:
                row["openmm_error"] = str(exc).splitlines()[0]
            found = force.diagnose(positions, box)
            row.update(flags=found.flags, explain=force.explain(found))
            results.append(row)
            del second
        del first
print("RESULT " + json.dumps(results))
"""


def test_two_contexts_with_bad_input_do_not_crash(tmp_path):
    """Issue 12: a second Context given NaN positions, an overflow or a too-small box used to kill
    the process (SIGSEGV) on Reference/CPU. Run in a subprocess so a crash fails only this test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
               OPENMM_CPU_THREADS="1")
    done = subprocess.run([sys.executable, "-c", TWO_CONTEXTS], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, f"rc {done.returncode} (-11 is a segfault)\n{done.stderr[-3000:]}"
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert len(rows) == 12
    words = {"overflow": "pair-list overflow", "nan": "NaN/inf", "small box": "twice the cutoff"}
    for row in rows:
        assert math.isfinite(row["good"]), row
        if "openmm_error" in row:  # OpenMM's own NaN check may refuse NaN coordinates first
            assert row["case"] == "nan" and "NaN" in row["openmm_error"], row
        else:
            assert row["energy"] == "nan" and row["nan_forces"] == row["components"], row
        assert row["flags"] & row["flag"] and words[row["case"]] in row["explain"], row
