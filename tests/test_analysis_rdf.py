import numpy as np
import pytest

from openmm_cgnn.analysis.rdf import first_peak, max_rdf_range, radial_distribution, rdf_error, rdf_noise_floor


def _boxes(n_frames, length):
    return np.tile(np.eye(3) * length, (n_frames, 1, 1))


def test_ideal_gas_rdf_is_one_within_noise():
    rng = np.random.default_rng(1)
    length, n_frames = 3.0, 20
    x = rng.uniform(0, length, size=(n_frames, 400, 3))
    rdf = radial_distribution(x, x, _boxes(n_frames, length), r_max=1.5, bin_width=0.05, same=True)
    far = rdf.r > 0.4  # enough pairs per bin for a tight test
    assert np.all(np.abs(rdf.g[far] - 1) < 5 * rdf.sigma[far])
    assert abs(np.average(rdf.g[far], weights=rdf.ideal[far]) - 1) < 0.01
    assert first_peak(rdf) == (None, None)


def test_ideal_gas_two_sets_with_varying_box_volume():
    rng = np.random.default_rng(2)
    n_frames = 30
    lengths = rng.uniform(2.8, 3.2, size=n_frames)  # NPT-like: each frame has its own density
    box = np.stack([np.eye(3) * L for L in lengths])
    a = rng.uniform(0, 1, size=(n_frames, 200, 3)) * lengths[:, None, None]
    b = rng.uniform(0, 1, size=(n_frames, 150, 3)) * lengths[:, None, None]
    rdf = radial_distribution(a, b, box, r_max=1.3, bin_width=0.05)
    far = rdf.r > 0.4
    assert abs(np.average(rdf.g[far], weights=rdf.ideal[far]) - 1) < 0.015


def test_excluded_same_molecule_pairs_keep_normalisation():
    # Rigid "dimers": the partner always sits 0.1 nm away; excluding same-molecule pairs must
    # remove that spike and leave g = 1 for the (independent) molecules.
    rng = np.random.default_rng(3)
    n_frames, n_mol, length = 20, 200, 3.0
    first = rng.uniform(0, length, size=(n_frames, n_mol, 3))
    direction = rng.normal(size=(n_frames, n_mol, 3))
    second = first + 0.1 * direction / np.linalg.norm(direction, axis=-1, keepdims=True)
    molecule = np.arange(n_mol)
    rdf = radial_distribution(first, second, _boxes(n_frames, length), 1.4, 0.05, molecule, molecule)
    assert rdf.n_pairs == n_mol * (n_mol - 1)
    assert rdf.g[rdf.r < 0.15].max() < 2.0
    far = rdf.r > 0.4
    assert abs(np.average(rdf.g[far], weights=rdf.ideal[far]) - 1) < 0.015


def test_simple_cubic_lattice_peaks_at_known_distances():
    a, n = 0.5, 6
    grid = np.stack(np.meshgrid(*[np.arange(n) * a] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(4)
    x = grid[None] + rng.normal(scale=0.003, size=(3, len(grid), 3))  # small thermal jitter
    box = _boxes(3, n * a)
    assert max_rdf_range(box) == pytest.approx(1.5)
    rdf = radial_distribution(x, x, box, r_max=1.5, bin_width=0.01, same=True)
    shells = a * np.sqrt([1, 2, 3, 4, 5, 6, 8, 9])  # 7 is not a sum of three squares
    occupied = rdf.r[rdf.g > 0]
    # Every non-empty bin is near a lattice shell, and every shell is populated.
    assert np.all(np.min(np.abs(occupied[:, None] - shells[None]), axis=1) < 0.03)
    for shell in shells[:-1]:  # the last one is cut by r_max
        assert rdf.g[np.abs(rdf.r - shell) < 0.03].max() > 1.0
    r_peak, g_peak = first_peak(rdf)
    assert r_peak == pytest.approx(a, abs=0.01)
    assert g_peak > 5
    # Coordination number of the first shell: 6 neighbours.
    density = len(grid) / (n * a) ** 3
    within = rdf.r < 0.6
    coordination = np.sum(4 * np.pi * rdf.r[within] ** 2 * rdf.g[within] * rdf.bin_width) * density
    assert coordination == pytest.approx(6, rel=0.05)


def test_rdf_error_and_noise_floor():
    rng = np.random.default_rng(5)
    box = _boxes(10, 3.0)
    x = rng.uniform(0, 3, size=(10, 300, 3))
    y = rng.uniform(0, 3, size=(10, 300, 3))
    gx = radial_distribution(x, x, box, 1.4, 0.05, same=True)
    gy = radial_distribution(y, y, box, 1.4, 0.05, same=True)
    assert rdf_error(gx, gx) == 0.0
    error, floor = rdf_error(gx, gy), rdf_noise_floor(gx, gy)
    assert 0 < error < 0.2
    assert 0.5 < error / floor < 2  # two ideal gases differ by counting noise only


def test_rdf_bad_input():
    x = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="half the shortest box edge"):
        radial_distribution(x, x, _boxes(2, 2.0), r_max=1.5, same=True)
    triclinic = _boxes(2, 3.0)
    triclinic[:, 1, 0] = 0.5
    with pytest.raises(ValueError, match="triclinic"):
        radial_distribution(x, x, triclinic, r_max=1.0, same=True)
    with pytest.raises(ValueError, match="no frames"):
        radial_distribution(np.zeros((0, 5, 3)), np.zeros((0, 5, 3)), np.zeros((0, 3, 3)), 1.0)
