import numpy as np
import pytest

from openmm_cgnn.analysis.density import (
    composition,
    find_experimental_density,
    hill_formula,
    run_density,
)
from openmm_cgnn.analysis.structure import (
    bond_angles,
    bond_lengths,
    bonded_terms,
    compare_distributions,
    molecule_centres,
)
from openmm_cgnn.mapping.spec import CGFrames


def _chain_frames(wrap: bool) -> CGFrames:
    """Two bent three-bead molecules (bond 0.3 nm, angle 90 degrees) and one single bead."""
    one = np.array([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.3, 0.3, 0.0]])
    positions = np.concatenate([one + [1.9, 1.9, 1.9], one + [0.5, 0.5, 0.5], [[1.0, 1.0, 0.1]]])[None]
    box = np.eye(3)[None] * 2.0
    if wrap:
        positions = positions % 2.0  # the first molecule now straddles the box edge
    return CGFrames(
        positions=positions.astype(np.float32), forces=None, box=box, time=np.zeros(1),
        temperature_K=np.full(1, 300.0), bead_type=np.array([0, 1, 2, 0, 1, 2, 3]),
        bead_type_names=["CHN:A", "CHN:B", "CHN:C", "ION:X"], bead_name=["A", "B", "C", "A", "B", "C", "X"],
        molecule_index=np.array([0, 0, 0, 1, 1, 1, 2]), residue_name=["CHN"] * 6 + ["ION"],
        masses=np.array([10.0, 20.0, 10.0, 10.0, 20.0, 10.0, 50.0]),
        bonds=np.array([[0, 1], [1, 2], [3, 4], [4, 5]]),
    )


def test_molecule_centres_of_wrapped_molecules():
    centres = molecule_centres(_chain_frames(wrap=True))
    expected_first = (np.array([[0, 0, 0], [0.3, 0, 0], [0.3, 0.3, 0]]) * [[10], [20], [10]]).sum(0) / 40 + 1.9
    assert np.allclose(centres.positions[0, 0] % 2.0, expected_first % 2.0, atol=1e-5)
    # Whole: the centre is not dragged across the box by the wrapped beads.
    assert np.linalg.norm(((centres.positions[0, 0] - expected_first) + 1) % 2.0 - 1) < 1e-5
    assert centres.residue_name == ["CHN", "CHN", "ION"]
    np.testing.assert_allclose(centres.masses, [40.0, 40.0, 50.0])
    assert centres.species() == ["CHN", "ION"]


def test_bond_and_angle_types_and_values():
    cg = _chain_frames(wrap=True)
    bonds, angles = bonded_terms(cg)
    assert sorted(bonds) == ["CHN:A-B", "CHN:B-C"]
    assert list(angles) == ["CHN:A-B-C"]
    np.testing.assert_allclose(bond_lengths(cg, bonds["CHN:A-B"]), 0.3, atol=1e-5)
    np.testing.assert_allclose(bond_angles(cg, angles["CHN:A-B-C"]), 90.0, atol=1e-3)


def test_compare_distributions():
    rng = np.random.default_rng(0)
    same = compare_distributions(rng.normal(1, 0.1, 20000), rng.normal(1, 0.1, 20000))
    shifted = compare_distributions(rng.normal(1, 0.1, 20000), rng.normal(2, 0.1, 20000))
    assert same.error < 0.05
    assert shifted.error > 0.95
    assert shifted.mean["cg"] == pytest.approx(2.0, abs=0.01)


def test_formula_and_experimental_density_lookup():
    assert hill_formula(["N", "C", "H", "H", "C"]) == "C2H2N"
    assert hill_formula(["F", "B", "F", "F", "F"]) == "BF4"
    elements = ["B", "F", "F", "F", "F"] * 2
    assert composition(elements, np.repeat([0, 1], 5)) == {"BF4": 2}
    reference = find_experimental_density({"C8H15N2": 300, "BF4": 300})
    assert reference is not None and reference.name == "[BMIM][BF4]"
    assert reference.at(298.0) == (1200.0, False)
    value, extrapolated = reference.at(400.0)
    assert extrapolated and value == pytest.approx(1408.9 - 0.7 * 400)
    assert find_experimental_density({"C8H15N2": 2, "BF4": 1}) is None  # a different liquid


def test_run_density():
    # 300 ion pairs of 226.02 g/mol in a 4.54 nm cube: about 1200 kg/m^3 (reference sheet).
    box = np.tile(np.eye(3) * 4.54, (10, 1, 1))
    result = run_density(300 * 226.02, box)
    assert result.density_kg_m3 == pytest.approx(1200, rel=0.01)
    assert result.box_fixed and result.err_kg_m3 == 0.0
    box[:, 0, 0] = np.linspace(4.5, 4.6, 10)
    assert not run_density(300 * 226.02, box).box_fixed
