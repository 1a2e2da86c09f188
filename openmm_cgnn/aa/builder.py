"""Build a periodic liquid box: molecules from the residue templates, inserted without overlaps."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..units import cube_edge_nm
from .forcefield import AAForceField, molecule_template

# Closest approach allowed between atoms of different molecules when inserting. Well below LJ
# contact distances (~0.25-0.35 nm): the minimiser removes the strain, and a small value lets
# random insertion succeed near liquid density.
DEFAULT_MIN_DISTANCE_NM = 0.15
# Start densities tried in turn (kg/m3) when none is given: the densest box that random insertion
# fills is the least the NPT stage must compress (the Monte Carlo barostat compresses slowly,
# ~10 ps for 20%). Insertion of [BMIM][BF4] jams near 1000 for hundreds of pairs.
START_DENSITY_LADDER = (1000.0, 950.0, 900.0, 850.0, 800.0, 700.0, 600.0)


class BoxBuildError(RuntimeError):
    """Molecules did not fit; names the density and what to change."""


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed rotation matrix (from a random unit quaternion)."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def build_box_auto(ff: AAForceField, composition: dict[str, int], seed: int = 0,
                   densities: tuple[float, ...] = START_DENSITY_LADDER) -> tuple[Any, np.ndarray, float]:
    """``build_box`` at the first density of ``densities`` that fits; returns it as well."""
    for density in densities:
        try:
            return (*build_box(ff, composition, density, seed=seed), density)
        except BoxBuildError:
            continue
    raise BoxBuildError(f"could not insert the molecules at any start density {densities} kg/m3")


def build_box(ff: AAForceField, composition: dict[str, int], density: float, seed: int = 0,
              min_distance_nm: float = DEFAULT_MIN_DISTANCE_NM, max_tries: int = 1000,
              attempts: int = 5) -> tuple[Any, np.ndarray]:
    """Random insertion of ``composition`` ({residue: count}) into a cube at ``density`` kg/m3.

    Returns (topology with box vectors, positions (n, 3) nm). Molecules are whole, with their
    centres inside the box; the topology lists residues in ``composition`` order, one chain per
    residue name.
    """
    from openmm import Vec3, unit
    from openmm.app import Topology

    templates = {res: molecule_template(ff, res) for res in composition}
    masses = {res: np.array([a.element.mass.value_in_unit(unit.dalton) for a in top.atoms()])
              for res, (top, _) in templates.items()}
    centred = {res: xyz - masses[res] @ xyz / masses[res].sum() for res, (_, xyz) in templates.items()}
    total_mass = sum(masses[res].sum() * n for res, n in composition.items())
    edge = cube_edge_nm(total_mass, density)

    topology = Topology()
    slots: list[tuple[str, slice]] = []
    for res, count in composition.items():
        template = templates[res][0]
        chain = topology.addChain(res)
        for _ in range(count):
            residue = topology.addResidue(res, chain)
            start = topology.getNumAtoms()
            atoms = [topology.addAtom(a.name, a.element, residue) for a in template.atoms()]
            for bond in template.bonds():
                topology.addBond(atoms[bond[0].index], atoms[bond[1].index])
            slots.append((res, slice(start, topology.getNumAtoms())))
    topology.setPeriodicBoxVectors([Vec3(edge, 0, 0), Vec3(0, edge, 0), Vec3(0, 0, edge)] * unit.nanometer)

    rng = np.random.default_rng(seed)
    # Big molecules first: they are the hardest to fit once the box fills up.
    order = sorted(slots, key=lambda s: -(s[1].stop - s[1].start))
    for _ in range(attempts):  # a jammed insertion sequence is retried from an empty box
        positions = _insert(order, centred, edge, rng, min_distance_nm, max_tries, topology.getNumAtoms())
        if positions is not None:
            return topology, positions
    raise BoxBuildError(f"could not insert all molecules without overlap at {density:.0f} kg/m3 "
                        f"({attempts} attempts); lower the start density")


def _insert(order, centred, edge, rng, min_distance_nm, max_tries, n_atoms) -> np.ndarray | None:
    from scipy.spatial import cKDTree

    positions = np.zeros((n_atoms, 3))
    placed: list[np.ndarray] = []
    tree = None
    for res, atoms in order:
        for _ in range(max_tries):
            trial = centred[res] @ random_rotation(rng).T + rng.uniform(0, edge, size=3)
            if tree is None or np.isinf(tree.query(np.mod(trial, edge), distance_upper_bound=min_distance_nm)[0]).all():
                break
        else:
            return None
        positions[atoms] = trial
        placed.append(np.mod(trial, edge))
        # Rebuilt per molecule: cheap next to the tries it answers, and periodic via boxsize.
        tree = cKDTree(np.concatenate(placed), boxsize=edge)
    return positions
