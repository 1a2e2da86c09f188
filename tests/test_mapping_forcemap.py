"""The statistically optimal force map: unbiased (B M^T = I, analytic mean force recovered), less noisy
than the summed map, constrained atoms sharing a weight, stored in mapping.json (and old files read)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openmm_cgnn.frames import FrameWriter, TopologyInfo, read_frames
from openmm_cgnn.mapping import Bead, CGMapping, MappingError, ResidueMapping, apply_mapping
from openmm_cgnn.mapping.forcemap import (
    collect_force_samples,
    fit_force_map,
    mean_squared_force,
    optimal_force_map,
    position_map,
    summed_force_map,
)
from openmm_cgnn.units import kT_kj_mol

ATOMS = ["C1", "H1", "C2", "N3", "H3", "O4"]
ELEMENTS = ["C", "H", "C", "N", "H", "O"]
MASSES = np.array([12.011, 1.008, 12.011, 14.007, 1.008, 15.999])
BONDS = [(0, 1), (0, 2), (2, 3), (3, 4), (3, 5)]
KT = kT_kj_mol(300.0)


def gaussian_mapping() -> CGMapping:
    beads = [Bead("P", ["C1", "H1", "C2"], float(MASSES[:3].sum())), Bead("Q", ["N3", "H3", "O4"], float(MASSES[3:].sum()))]
    return CGMapping(residues={"GAU": ResidueMapping(atoms=list(ATOMS), beads=beads, bead_bonds=[(0, 1)])})


def stiffness() -> np.ndarray:
    """A fixed positive-definite coupling: random couplings plus stiff bonds inside and across the beads."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=(6, 6))
    k = 300.0 * (a @ a.T + 6.0 * np.eye(6))
    for i, j, kb in ((0, 2, 6000.0), (3, 5, 6000.0), (2, 3, 3000.0)):
        e = np.zeros(6)
        e[i], e[j] = 1.0, -1.0
        k += kb * np.outer(e, e)
    return k


def write_gaussian_run(directory, n_molecules: int, n_frames: int, seed: int):
    """Molecules in U = 1/2 dx^T K dx (dx: atom displacements from the molecule's anchor, per component),
    sampled exactly: dx ~ N(0, kT K^-1), F = -K dx. The mean force on the bead COMs is then exactly
    -(M K^-1 M^T)^-1 (R - R_anchor) whatever the map."""
    rng = np.random.default_rng(seed)
    k = stiffness()
    chol = np.linalg.cholesky(KT * np.linalg.inv(k))
    n = len(ATOMS)
    topology = TopologyInfo(
        ATOMS * n_molecules, ELEMENTS * n_molecules, np.tile(MASSES, n_molecules), ["GAU"] * n * n_molecules,
        np.repeat(np.arange(n_molecules), n), np.array([(m * n + i, m * n + j) for m in range(n_molecules) for i, j in BONDS]),
    )
    anchors = np.concatenate([rng.uniform(1.0, 9.0, size=(n_molecules, 1, 3)) + 0.15 * rng.normal(size=(n_molecules, n, 3))])
    box = np.eye(3) * 10.0
    with FrameWriter(directory / "frames.h5", topology, {"kind": "aa", "temperature_K": 300.0}) as writer:
        for frame in range(n_frames):
            dx = np.einsum("ij,mjc->mic", chol, rng.normal(size=(n_molecules, n, 3)))
            forces = -np.einsum("ij,mjc->mic", k, dx)
            writer.append((anchors + dx).reshape(-1, 3), box, float(frame), forces=forces.reshape(-1, 3))
    return anchors


def test_position_and_summed_maps():
    residue = gaussian_mapping().residues["GAU"]
    m = position_map(residue, MASSES)
    assert m.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert summed_force_map(residue) @ m.T == pytest.approx(np.eye(2))


def test_optimal_map_honours_position_map_and_groups():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(500, 6, 3)) * np.array([1, 5, 2, 1, 9, 3])[None, :, None]
    gram = np.einsum("sic,sjc->ij", samples, samples)
    m = position_map(gaussian_mapping().residues["GAU"], MASSES)
    groups = np.array([0, 0, 1, 2, 2, 3])
    weights = optimal_force_map(gram, m, groups)
    assert weights @ m.T == pytest.approx(np.eye(2), abs=1e-9)
    assert weights[:, 0] == pytest.approx(weights[:, 1]) and weights[:, 3] == pytest.approx(weights[:, 4])
    # Weights reach outside the bead where that lowers the noise, and never raise it above the sum's.
    assert np.abs(weights[0, 3:]).max() > 1e-3
    summed = summed_force_map(gaussian_mapping().residues["GAU"])
    assert np.trace(weights @ gram @ weights.T) < np.trace(summed @ gram @ summed.T)


def test_both_maps_recover_the_analytic_mean_force_and_optimal_is_less_noisy(tmp_path):
    (tmp_path / "fit").mkdir()
    (tmp_path / "test").mkdir()
    write_gaussian_run(tmp_path / "fit", n_molecules=40, n_frames=40, seed=1)
    anchors = write_gaussian_run(tmp_path / "test", n_molecules=40, n_frames=60, seed=2)
    mapping = gaussian_mapping()
    fitted, report = fit_force_map(mapping, [read_frames(tmp_path / "fit")])
    weights = fitted.residues["GAU"].force_weights
    m = position_map(mapping.residues["GAU"], MASSES)
    assert weights @ m.T == pytest.approx(np.eye(2), abs=1e-9)
    # The hydrogens are constrained to their heavy atoms (C1-H1, N3-H3): one weight each pair, every bead.
    assert weights[:, 0] == pytest.approx(weights[:, 1], abs=1e-12)
    assert weights[:, 3] == pytest.approx(weights[:, 4], abs=1e-12)
    info = report["GAU"]
    assert info["n_samples"] == 40 * 40
    # Exactly, E[F F^T] = kT K: the map fitted on samples approaches the one for that Gram matrix,
    # and so does its gain over the summed map.
    k = stiffness()
    exact = optimal_force_map(KT * k, m, np.array([0, 0, 1, 2, 2, 3]))
    summed = summed_force_map(mapping.residues["GAU"])
    exact_ratio = np.trace(exact @ k @ exact.T) / np.trace(summed @ k @ summed.T)
    assert exact_ratio < 0.95
    assert info["ratio_optimal_to_sum"] == pytest.approx(exact_ratio, rel=0.05)
    assert np.abs(weights - exact).max() < 0.1

    expected = -np.linalg.inv(m @ np.linalg.inv(k) @ m.T)  # mean force = expected @ (R - R_anchor)
    frames = read_frames(tmp_path / "test")
    anchor_beads = np.einsum("bi,mic->mbc", m, anchors)  # (molecules, 2, 3)
    residual_variance = {}
    for name, source in (("sum", mapping), ("optimal", fitted)):
        cg = apply_mapping(source, frames, force_map=name)
        assert cg.force_map == name
        dr = (cg.positions.astype(np.float64).reshape(-1, 40, 2, 3) - anchor_beads[None]).transpose(0, 1, 3, 2).reshape(-1, 2)
        f = cg.forces.astype(np.float64).reshape(-1, 40, 2, 3).transpose(0, 1, 3, 2).reshape(-1, 2)
        slope = np.linalg.lstsq(dr, f, rcond=None)[0].T
        assert np.abs(slope - expected).max() < 0.08 * np.abs(expected).max(), (name, slope, expected)
        residual_variance[name] = float(np.mean((f - dr @ slope.T) ** 2))
    assert residual_variance["optimal"] < residual_variance["sum"]
    # The residual is the noise around the mean force: E[F_mf F_mf^T] = -kT expected, so the exact noise
    # of a map W is kT (tr(W K W^T) + tr(expected)) per component.
    noise = {name: np.trace(w @ k @ w.T) + np.trace(expected) for name, w in (("sum", summed), ("optimal", exact))}
    assert residual_variance["sum"] == pytest.approx(KT * noise["sum"] / 2, rel=0.1)
    assert residual_variance["optimal"] / residual_variance["sum"] == pytest.approx(noise["optimal"] / noise["sum"], abs=0.05)


def test_mapping_json_stores_the_force_map_and_reads_version_1(tmp_path):
    (tmp_path / "run").mkdir()
    write_gaussian_run(tmp_path / "run", n_molecules=4, n_frames=5, seed=3)
    frames = read_frames(tmp_path / "run")
    mapping = gaussian_mapping()
    fitted, _ = fit_force_map(mapping, [frames])
    fitted.save(tmp_path / "mapping.json")
    data = json.loads((tmp_path / "mapping.json").read_text())
    assert data["format"] == "openmm_cgnn.mapping/2"
    assert len(data["residues"]["GAU"]["force_map"]["weights"]) == 2
    loaded = CGMapping.load(tmp_path / "mapping.json")
    assert np.array_equal(loaded.residues["GAU"].force_weights, fitted.residues["GAU"].force_weights)
    assert loaded.sha256() == mapping.sha256()  # the force map is not part of the CG system
    assert apply_mapping(loaded, frames).force_map == "optimal"  # stored map used by default

    old = mapping.to_dict()
    old["format"] = "openmm_cgnn.mapping/1"
    (tmp_path / "old.json").write_text(json.dumps(old))
    old_mapping = CGMapping.load(tmp_path / "old.json")
    assert not old_mapping.has_force_map
    summed = apply_mapping(old_mapping, frames)
    assert summed.force_map == "sum"
    per_bead = frames.forces.reshape(5, 4, 6, 3)
    assert summed.forces.reshape(5, 4, 2, 3)[:, :, 0] == pytest.approx(per_bead[:, :, :3].sum(axis=2), rel=1e-5, abs=1e-3)
    with pytest.raises(MappingError, match="no stored force map for residue"):
        apply_mapping(old_mapping, frames, force_map="optimal")
    with pytest.raises(MappingError, match="must be 'optimal' or 'sum'"):
        apply_mapping(loaded, frames, force_map="mean")


def test_bad_force_map_in_file_is_named(tmp_path):
    data = gaussian_mapping().to_dict()
    data["residues"]["GAU"]["force_map"] = {"weights": [[1.0, 0.0]]}
    (tmp_path / "mapping.json").write_text(json.dumps(data))
    with pytest.raises(MappingError, match=r"mapping.json: residue 'GAU': 'force_map.weights' must be a finite 2 x 6"):
        CGMapping.load(tmp_path / "mapping.json")


def test_force_map_fitted_for_other_masses_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    write_gaussian_run(tmp_path / "run", n_molecules=3, n_frames=4, seed=4)
    frames = read_frames(tmp_path / "run")
    fitted, _ = fit_force_map(gaussian_mapping(), [frames])
    frames.topology.mass[0] *= 2.0
    with pytest.raises(MappingError, match="does not satisfy B M\\^T = I"):
        apply_mapping(fitted, frames, force_map="optimal")
    assert collect_force_samples(gaussian_mapping(), [read_frames(tmp_path / "run")])["GAU"].n_samples == 12
    assert mean_squared_force(np.zeros((2, 6)), collect_force_samples(gaussian_mapping(), [read_frames(tmp_path / "run")])["GAU"]) == 0.0


def test_training_uses_the_optimal_map_by_default_and_sum_on_request(tmp_path, capsys):
    from mapping_toys import trimer, write_toy_run

    from openmm_cgnn.cli import main

    run = write_toy_run(tmp_path / "run", [(trimer(), 8)], n_frames=12, seed=5, box_nm=2.0)
    beads = [Bead("A", ["A1", "A2", "A3", "HA"]), Bead("B", ["B1", "B2", "B3"]), Bead("C", ["C1", "C2", "C3", "HC"])]
    old = CGMapping(residues={"TRI": ResidueMapping(atoms=trimer().atoms, beads=beads, bead_bonds=[(0, 1), (1, 2)])}).to_dict()
    old["format"] = "openmm_cgnn.mapping/1"
    (tmp_path / "mapping.json").write_text(json.dumps(old))
    common = ["train", "--data", str(run), "--mapping", str(tmp_path / "mapping.json"), "--quick", "--epochs", "1",
              "--no-progress", "--device", "cpu", "--model-option", "features=8", "inter_cutoff_nm=0.6"]
    assert main([*common, "--out", str(tmp_path / "optimal")]) == 0
    assert "has no force map: fitted the optimal one" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "sum"), "--force-map", "sum"]) == 0
    results = {}
    for name in ("optimal", "sum"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["data"]["force_map"] == name and metrics["train_config"]["force_map"] == name
        results[name] = metrics["baselines"]["constant_per_type"]["train"]["overall"]["force_rms"]
    assert CGMapping.load(tmp_path / "optimal").has_force_map and not CGMapping.load(tmp_path / "sum").has_force_map
    assert results["optimal"] < results["sum"]  # the optimal labels are the quieter ones
