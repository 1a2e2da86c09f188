"""Reading the final discrete map: argmax, hydrogens with their heavy atom, beads non-empty and connected."""

from __future__ import annotations

import numpy as np
import pytest

from openmm_cgnn.mapping.discretize import (
    DiscretizationError,
    atom_groups,
    beads_by_first_atom,
    check_discrete_map,
    discretize,
    is_hydrogen,
)

# Chain C0-C1-C2-C3-C4-C5 with one hydrogen H6 on C2 and one H7 on C5.
CHAIN_BONDS = np.array([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (2, 6), (5, 7)])
CHAIN_ELEMENTS = ["C"] * 6 + ["H", "H"]
CHAIN_MASSES = [12.011] * 6 + [1.008, 1.008]
NAMES = ["C0", "C1", "C2", "C3", "C4", "C5", "H6", "H7"]


def probabilities_from(choice: list[int], n_beads: int, confidence: float = 0.9) -> np.ndarray:
    p = np.full((len(choice), n_beads), (1 - confidence) / (n_beads - 1))
    p[np.arange(len(choice)), choice] = confidence
    return p


def run(choice, n_beads, **kw):
    p = probabilities_from(choice, n_beads, **kw)
    assignment, repairs = discretize(p, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES, NAMES)
    assert check_discrete_map(assignment, n_beads, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES) == []
    return assignment, repairs


def test_clean_argmax_needs_no_repair():
    assignment, repairs = run([0, 0, 0, 1, 1, 1, 0, 1], 2)
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert repairs == []


def test_hydrogen_follows_its_heavy_atom():
    # H6 (on C2) prefers bead 1, H7 (on C5) bead 0: both follow their carbon, and it is logged.
    assignment, repairs = run([0, 0, 0, 1, 1, 1, 1, 0], 2)
    assert assignment[6] == assignment[2] == 0 and assignment[7] == assignment[5] == 1
    assert len(repairs) == 1 and "H6" in repairs[0] and "H7" in repairs[0]
    # A very confident hydrogen still cannot drag its heavy atom along.
    p = probabilities_from([0, 0, 0, 1, 1, 1, 0, 1], 2, confidence=0.6)
    p[6] = [0.0, 1.0]
    assignment, _ = discretize(p, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES, NAMES)
    assert assignment[2] == assignment[6] == 0


def test_disconnected_bead_is_repaired():
    # Bead 0 = {C0, C1, C5}: C5 is cut off from C0-C1, joins its bonded neighbour bead 1.
    assignment, repairs = run([0, 0, 1, 1, 1, 0, 1, 0], 2)
    assert assignment.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert any("disconnected" in r and "C5+H7" in r for r in repairs)


def test_disconnected_piece_goes_to_the_neighbour_that_wants_it_most():
    # Bead 2's stray piece C3 sits between beads 0 (C2) and 1 (C4): it prefers bead 1 second.
    p = probabilities_from([0, 0, 0, 2, 1, 2, 0, 2], 3)
    p[3] = [0.1, 0.3, 0.6]
    assignment, repairs = discretize(p, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES, NAMES)
    assert assignment[3] == assignment[4] == 1
    assert check_discrete_map(assignment, 3, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES) == []
    assert any("C3" in r for r in repairs)


def test_empty_bead_is_filled_without_breaking_another():
    # Everything wants bead 0; bead 2 wants C2+H6 most but taking it would split bead 0, so it gets
    # an end atom; bead 1 gets the other end.
    p = probabilities_from([0] * 8, 3, confidence=0.8)
    p[2] = [0.5, 0.0, 0.5]
    p[5] = [0.6, 0.3, 0.1]
    p[0] = [0.7, 0.05, 0.25]
    assignment, repairs = discretize(p, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES, NAMES)
    assert check_discrete_map(assignment, 3, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES) == []
    assert assignment[5] == assignment[7] == 1 and assignment[0] == 2
    assert sum("was empty" in r for r in repairs) == 2


def test_too_many_beads_for_the_heavy_atoms():
    with pytest.raises(DiscretizationError, match="heavy atoms"):
        discretize(np.full((8, 7), 1 / 7), CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES)


def test_disconnected_molecule_skips_the_connectivity_rule():
    bonds = np.array([(0, 1), (2, 3)])
    p = probabilities_from([0, 1, 0, 1], 2)
    assignment, repairs = discretize(p, bonds, ["C"] * 4, [12.0] * 4)
    assert assignment.tolist() == [0, 1, 0, 1]
    assert any("disconnected" in r and "not enforced" in r for r in repairs)


def test_groups_and_bead_order_helpers():
    group = atom_groups(4, np.array([(0, 1), (1, 2), (2, 3)]), [False, True, False, False])
    assert group.tolist() == [0, 0, 1, 2]
    # Element-less atoms count as hydrogens by mass (some topologies drop elements).
    assert is_hydrogen("", 1.008) and is_hydrogen("H", 1.008) and not is_hydrogen("", 12.0) and not is_hydrogen("C", 1.0)
    renumbered, old_of_new = beads_by_first_atom(np.array([2, 2, 0, 1, 0]))
    assert renumbered.tolist() == [0, 0, 1, 2, 1] and old_of_new.tolist() == [2, 0, 1]
    problems = check_discrete_map(np.array([0, 1, 0, 1, 1, 0, 0, 1]), 3, CHAIN_BONDS, CHAIN_ELEMENTS, CHAIN_MASSES)
    assert any("empty" in p for p in problems) and any("not connected" in p for p in problems)
