"""Turn a soft (atoms x beads) assignment into the final discrete map, automatically.

Rules, applied in this order and each change logged:
1. every heavy atom goes to its argmax bead; a hydrogen follows its bonded heavy atom;
2. a bead whose atoms are not one connected piece of the molecular graph keeps its most probable
   piece; every other piece joins the bonded neighbouring bead that wants it most;
3. an empty bead takes the atom group (heavy atom + its hydrogens) that wants it most among those
   whose removal leaves their own bead non-empty and connected.
If the molecular graph itself is disconnected, rule 2 cannot hold and is skipped (logged).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .spec import MappingError


class DiscretizationError(MappingError):
    """No valid discrete map can be read from this assignment (the caller retrains)."""


def is_hydrogen(element: str, mass: float) -> bool:
    element = element.strip().upper()
    # CG or element-less topologies still mark hydrogens by their mass.
    return element in ("H", "D") or (element == "" and 0.0 < mass < 2.1)


def atom_groups(n_atoms: int, bonds: np.ndarray, hydrogen: Sequence[bool]) -> np.ndarray:
    """Group index per atom: each heavy atom with the hydrogens bonded to it; lone hydrogens alone.

    Groups are numbered in order of their heavy atom (or lone hydrogen) so the numbering follows
    the atom order given.
    """
    heavy_partner = np.full(n_atoms, -1)
    for i, j in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        for h, other in ((i, j), (j, i)):
            if hydrogen[h] and not hydrogen[other] and (heavy_partner[h] < 0 or other < heavy_partner[h]):
                heavy_partner[h] = other
    leader = np.where(heavy_partner >= 0, heavy_partner, np.arange(n_atoms))
    _, group = np.unique(leader, return_inverse=True)
    return group


def _components(nodes: list[int], adjacency: list[set[int]]) -> list[list[int]]:
    remaining, parts = set(nodes), []
    for start in nodes:
        if start not in remaining:
            continue
        part, stack = [], [start]
        remaining.discard(start)
        while stack:
            node = stack.pop()
            part.append(node)
            for nb in adjacency[node]:
                if nb in remaining:
                    remaining.discard(nb)
                    stack.append(nb)
        parts.append(sorted(part))
    return parts


def discretize(
    probabilities: np.ndarray,
    bonds: np.ndarray,
    elements: Sequence[str],
    masses: Sequence[float],
    atom_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Bead index per atom, and the list of repairs made (human-readable, empty if none).

    ``probabilities`` is (n_atoms, n_beads); ``bonds`` are atom index pairs inside the molecule.
    Bead labels are the columns of ``probabilities`` (see :func:`beads_by_first_atom` to renumber).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_atoms, n_beads = probabilities.shape
    names = list(atom_names) if atom_names is not None else [str(i) for i in range(n_atoms)]
    hydrogen = [is_hydrogen(e, m) for e, m in zip(elements, masses)]
    group = atom_groups(n_atoms, bonds, hydrogen)
    n_groups = int(group.max()) + 1
    if n_beads > n_groups:
        raise DiscretizationError(
            f"{n_beads} beads but only {n_groups} heavy atoms (hydrogens go with their heavy atom)"
        )
    members = [np.flatnonzero(group == g) for g in range(n_groups)]
    # A group goes where its heavy atom wants to go (its first member: heavy atoms lead their group).
    leaders = [int(m[np.argmin([hydrogen[i] for i in m])]) for m in members]
    want = probabilities[leaders]
    repairs: list[str] = []

    def label(g: int) -> str:
        return "+".join(names[i] for i in members[g])

    assign = want.argmax(axis=1)
    strays = [i for i in range(n_atoms) if probabilities[i].argmax() != assign[group[i]]]
    if strays:
        repairs.append(
            "hydrogens follow their bonded heavy atom: " + ", ".join(names[i] for i in strays) + " moved"
        )

    adjacency: list[set[int]] = [set() for _ in range(n_groups)]
    for i, j in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        gi, gj = group[i], group[j]
        if gi != gj:
            adjacency[gi].add(gj)
            adjacency[gj].add(gi)
    connected_molecule = len(_components(list(range(n_groups)), adjacency)) == 1
    if not connected_molecule:
        repairs.append("molecular graph is disconnected: bead connectivity not enforced")

    def bead_is_connected(groups: list[int]) -> bool:
        return len(_components(groups, adjacency)) <= 1

    for _ in range(n_groups * n_beads + 1):
        changed = False
        if connected_molecule:
            for bead in range(n_beads):
                parts = _components([g for g in range(n_groups) if assign[g] == bead], adjacency)
                if len(parts) < 2:
                    continue
                parts.sort(key=lambda p: -want[p, bead].sum())
                for part in parts[1:]:
                    neighbours = sorted({int(assign[nb]) for g in part for nb in adjacency[g]} - {bead})
                    target = max(neighbours, key=lambda b: want[part, b].sum())
                    assign[part] = target
                    repairs.append(
                        f"bead {bead} was disconnected: moved {', '.join(label(g) for g in part)} to bead {target}"
                    )
                    changed = True
        for bead in range(n_beads):
            if np.any(assign == bead):
                continue
            candidates = []
            for g in range(n_groups):
                rest = [h for h in range(n_groups) if assign[h] == assign[g] and h != g]
                if rest and (not connected_molecule or bead_is_connected(rest)):
                    candidates.append(g)
            if not candidates:
                raise DiscretizationError(f"bead {bead} is empty and no atom can be moved into it")
            chosen = max(candidates, key=lambda g: want[g, bead])
            repairs.append(f"bead {bead} was empty: moved {label(chosen)} into it from bead {assign[chosen]}")
            assign[chosen] = bead
            changed = True
        if not changed:
            break
    else:  # pragma: no cover - each pass either stops or strictly fixes a bead
        raise DiscretizationError("repairs did not converge")

    return assign[group], repairs


def beads_by_first_atom(assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber beads in order of their first atom (B0 holds atom 0); also returns old label per new bead."""
    first: dict[int, int] = {}
    for bead in np.asarray(assignment).tolist():
        first.setdefault(bead, len(first))
    old_of_new = np.array(sorted(first, key=first.get), dtype=np.int64)
    return np.array([first[b] for b in np.asarray(assignment).tolist()], dtype=np.int64), old_of_new


def check_discrete_map(assignment: np.ndarray, n_beads: int, bonds: np.ndarray, elements: Sequence[str], masses: Sequence[float]) -> list[str]:
    """Rule violations of a discrete map (empty list when it satisfies all three rules)."""
    problems = []
    n_atoms = len(assignment)
    hydrogen = [is_hydrogen(e, m) for e, m in zip(elements, masses)]
    group = atom_groups(n_atoms, bonds, hydrogen)
    for g in np.unique(group):
        if len(set(assignment[group == g])) > 1:
            problems.append(f"atom group {np.flatnonzero(group == g).tolist()} is split across beads")
    adjacency: list[set[int]] = [set() for _ in range(n_atoms)]
    for i, j in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        adjacency[i].add(int(j))
        adjacency[j].add(int(i))
    whole = len(_components(list(range(n_atoms)), adjacency)) == 1
    for bead in range(n_beads):
        atoms = np.flatnonzero(assignment == bead).tolist()
        if not atoms:
            problems.append(f"bead {bead} is empty")
        elif whole and len(_components(atoms, adjacency)) > 1:
            problems.append(f"bead {bead} is not connected")
    return problems
