"""Toy all-atom runs with a known best grouping, written with the real FrameWriter (tests of the CGAE).

A toy molecule is rigid clusters of atoms whose centres form a flexible chain; each cluster is
rotated at random in every sample. Forces are opposite random pairs inside chosen atom pairs (so
they cancel when both atoms share a bead, like stiff bond forces) plus uncorrelated noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openmm_cgnn.frames import FrameWriter, TopologyInfo


@dataclass
class ToyMolecule:
    name: str
    atoms: list[str]
    elements: list[str]
    clusters: list[list[int]]  # atom indices of each rigid cluster, in chain order
    offsets: np.ndarray  # (n_atoms, 3) nm, position of each atom relative to its cluster centre
    bonds: list[tuple[int, int]]
    force_pairs: list[tuple[int, int]] = field(default_factory=list)
    cluster_spacing: float = 0.45  # nm
    pair_force: float = 300.0  # kJ/mol/nm, std of the opposite pair forces
    noise_force: float = 30.0  # kJ/mol/nm, std of the independent atomic forces
    jitter: float = 0.01  # nm

    @property
    def masses(self) -> np.ndarray:
        return np.array([1.008 if e == "H" else 12.011 for e in self.elements])

    def permuted(self, order: list[int]) -> "ToyMolecule":
        """The same molecule with its atoms listed in ``order`` (old indices)."""
        new = {old: k for k, old in enumerate(order)}
        return ToyMolecule(
            name=self.name,
            atoms=[self.atoms[i] for i in order],
            elements=[self.elements[i] for i in order],
            clusters=[[new[i] for i in c] for c in self.clusters],
            offsets=self.offsets[order],
            bonds=[(new[i], new[j]) for i, j in self.bonds],
            force_pairs=[(new[i], new[j]) for i, j in self.force_pairs],
            cluster_spacing=self.cluster_spacing,
            pair_force=self.pair_force,
            noise_force=self.noise_force,
            jitter=self.jitter,
        )

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.atoms)
        pos = np.zeros((n, 3))
        centre = np.zeros(3)
        for k, cluster in enumerate(self.clusters):
            if k:
                step = rng.normal(size=3)
                centre = centre + self.cluster_spacing * step / np.linalg.norm(step)
            rotation = _random_rotation(rng)
            pos[cluster] = centre + self.offsets[cluster] @ rotation.T
        pos += rng.normal(scale=self.jitter, size=pos.shape)
        forces = rng.normal(scale=self.noise_force, size=(n, 3))
        for i, j in self.force_pairs:
            g = rng.normal(scale=self.pair_force, size=3)
            forces[i] += g
            forces[j] -= g
        return pos, forces


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _triangle(scale: float = 0.08) -> np.ndarray:
    return scale * np.array([[1.0, 0.0, 0.0], [-0.5, 0.87, 0.0], [-0.5, -0.87, 0.0]])


def trimer() -> ToyMolecule:
    """Three clusters of three heavy atoms (two carry a hydrogen): the 3-bead answer is the clusters."""
    atoms = ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3", "HA", "HC"]
    elements = ["C"] * 9 + ["H", "H"]
    offsets = np.zeros((11, 3))
    offsets[0:3] = offsets[3:6] = offsets[6:9] = _triangle()
    offsets[9] = offsets[1] * 1.9  # HA beyond A2
    offsets[10] = offsets[6] * 1.9  # HC beyond C1
    clusters = [[0, 1, 2, 9], [3, 4, 5], [6, 7, 8, 10]]
    bonds = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (1, 9), (6, 10)]
    pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (1, 9), (6, 10)]
    return ToyMolecule("TRI", atoms, elements, clusters, offsets, bonds, pairs)


def dimer() -> ToyMolecule:
    """Two clusters of two heavy atoms: the 2-bead answer is the clusters."""
    atoms = ["X1", "X2", "Y1", "Y2"]
    offsets = 0.06 * np.array([[1.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0]])
    return ToyMolecule("DIM", atoms, ["C"] * 4, [[0, 1], [2, 3]], offsets, [(0, 1), (1, 2), (2, 3)], [(0, 1), (2, 3)])


def rectangle() -> ToyMolecule:
    """Ring P-Q-R-S, a rigid 0.20 x 0.16 nm rectangle: geometry groups the close pairs P+S and Q+R,
    while strong opposite forces on the far pairs P-Q and S-R make P+Q and S+R the force-optimal beads."""
    atoms = ["P", "Q", "R", "S"]
    offsets = np.array([[-0.1, -0.08, 0.0], [0.1, -0.08, 0.0], [0.1, 0.08, 0.0], [-0.1, 0.08, 0.0]])
    return ToyMolecule(
        "SQR", atoms, ["C"] * 4, [[0, 1, 2, 3]], offsets, [(0, 1), (1, 2), (2, 3), (3, 0)], [(0, 1), (3, 2)],
        pair_force=500.0, noise_force=50.0,
    )


def write_toy_run(
    directory: Path,
    molecules: list[tuple[ToyMolecule, int]],
    n_frames: int = 20,
    seed: int = 0,
    box_nm: float = 2.0,
    with_forces: bool = True,
    wrap: bool = True,
    atom_order: dict[str, list[int]] | None = None,
) -> Path:
    """Write ``frames.h5`` for ``count`` copies of each toy molecule; with ``wrap`` atoms are put in the box.

    ``atom_order`` lists a residue's atoms in another order in the file, with the very same samples.
    """
    rng = np.random.default_rng(seed)
    names, elements, masses, residue_name, residue_index, bonds = [], [], [], [], [], []
    layout = []
    for molecule, count in molecules:
        order = (atom_order or {}).get(molecule.name, list(range(len(molecule.atoms))))
        listed = molecule.permuted(order)
        for _ in range(count):
            offset = len(names)
            names += listed.atoms
            elements += listed.elements
            masses += listed.masses.tolist()
            residue_name += [listed.name] * len(listed.atoms)
            residue_index += [len(layout)] * len(listed.atoms)
            bonds += [(offset + i, offset + j) for i, j in listed.bonds]
            layout.append((molecule, offset, order))
    topology = TopologyInfo(names, elements, np.array(masses), residue_name, np.array(residue_index), np.array(bonds))
    box = np.eye(3) * box_nm
    path = Path(directory) / "frames.h5"
    with FrameWriter(path, topology, {"kind": "aa", "temperature_K": 300.0}, with_forces=with_forces) as writer:
        for frame in range(n_frames):
            positions = np.zeros((len(names), 3))
            forces = np.zeros((len(names), 3))
            for molecule, offset, order in layout:
                pos, frc = molecule.sample(rng)
                n = len(molecule.atoms)
                positions[offset : offset + n] = pos[order] + rng.uniform(0, box_nm, size=3)
                forces[offset : offset + n] = frc[order]
            if wrap:
                positions = np.mod(positions, box_nm)
            writer.append(positions, box, float(frame), forces=forces if with_forces else None)
    return Path(directory)
