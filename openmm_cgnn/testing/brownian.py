"""Synthetic runs with known dynamics, written as real frames files: test and demo data for the evaluation.

Rigid molecules whose centres perform Brownian walks with a chosen D per molecule type (no
interactions, so the structure is that of an ideal gas). The same liquid is written as an "aa"
run (atoms with elements) or a "cg" run (one particle per bead), with a ``mapping.json`` that
maps the first onto the second. Two molecule types: ``CHN``, a bent chain of three beads (six
atoms), and ``ION``, one bead (two atoms).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..layout import FRAMES_H5

# Residue templates: atom names, elements, masses (amu), positions in the molecule frame (nm),
# atom bonds, and beads as lists of atom names.
TEMPLATES = {
    "CHN": {
        "atoms": ["C1", "H1", "C2", "H2", "C3", "H3"],
        "elements": ["C", "H", "C", "H", "C", "H"],
        "masses": [12.011, 1.008, 12.011, 1.008, 12.011, 1.008],
        "xyz": [[0.0, 0.0, 0.0], [-0.05, 0.09, 0.0], [0.30, 0.0, 0.0], [0.30, -0.10, 0.0],
                [0.45, 0.26, 0.0], [0.55, 0.26, 0.05]],
        "bonds": [[0, 1], [0, 2], [2, 3], [2, 4], [4, 5]],
        "beads": [["C1", "H1"], ["C2", "H2"], ["C3", "H3"]],
        "bead_bonds": [[0, 1], [1, 2]],
    },
    "ION": {
        "atoms": ["N1", "O1"],
        "elements": ["N", "O"],
        "masses": [14.007, 15.999],
        "xyz": [[0.0, 0.0, 0.0], [0.12, 0.0, 0.0]],
        "bonds": [[0, 1]],
        "beads": [["N1", "O1"]],
        "bead_bonds": [],
    },
}


def synthetic_mapping() -> dict:
    """``mapping.json`` content for the synthetic molecules (bead masses are atom-mass sums)."""
    residues = {}
    for name, t in TEMPLATES.items():
        mass = dict(zip(t["atoms"], t["masses"]))
        residues[name] = {
            "atoms": list(t["atoms"]),
            "beads": [{"name": f"B{k}", "atoms": atoms, "mass": sum(mass[a] for a in atoms)}
                      for k, atoms in enumerate(t["beads"])],
            "bead_bonds": t["bead_bonds"],
        }
    return {"format": "openmm_cgnn.mapping/1", "residues": residues, "training": {"note": "synthetic"}}


def write_mapping(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(synthetic_mapping(), indent=2) + "\n")
    return path


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def write_brownian_run(
    directory: str | Path,
    kind: str,
    temperature_K: float,
    diffusion_nm2_ps: dict[str, float],
    n_molecules: dict[str, int],
    box_nm: float = 3.0,
    n_frames: int = 400,
    dt_ps: float = 1.0,
    wrap: bool = False,
    vibration_nm: float = 0.005,
    seed: int = 0,
    metadata: dict | None = None,
) -> Path:
    """Write ``directory/frames.h5`` of Brownian rigid molecules; returns the directory.

    ``metadata`` adds entries to the run's metadata (e.g. what an AA run records of its NPT stage).

    ``wrap=True`` puts every particle back into the box each frame (the worst case for the
    unwrapping and molecule-rebuilding code); otherwise trajectories are continuous, as the
    frames contract specifies.
    """
    from ..frames import FrameWriter, TopologyInfo

    if kind not in ("aa", "cg"):
        raise ValueError(f"kind must be 'aa' or 'cg', got {kind!r}")
    rng = np.random.default_rng(seed)
    names, elements, masses, residue_names, residue_index, bonds = [], [], [], [], [], []
    body, molecule_of, d_of = [], [], []
    molecule = 0
    for residue, count in n_molecules.items():
        t = TEMPLATES[residue]
        xyz, atom_mass = np.asarray(t["xyz"]), np.asarray(t["masses"])
        for _ in range(count):
            offset = len(names)
            if kind == "aa":
                names += t["atoms"]
                elements += t["elements"]
                masses += t["masses"]
                local = xyz
                bonds += [[offset + i, offset + j] for i, j in t["bonds"]]
            else:
                index = {a: k for k, a in enumerate(t["atoms"])}
                local, bead_mass = [], []
                for k, atoms in enumerate(t["beads"]):
                    idx = [index[a] for a in atoms]
                    bead_mass.append(atom_mass[idx].sum())
                    local.append(atom_mass[idx] @ xyz[idx] / bead_mass[-1])
                    names.append(f"B{k}")
                    elements.append("")
                local = np.asarray(local)
                masses += bead_mass
                bonds += [[offset + i, offset + j] for i, j in t["bead_bonds"]]
            n = len(local)
            body.append(local - np.average(xyz, axis=0, weights=atom_mass))
            residue_names += [residue] * n
            residue_index += [molecule] * n
            molecule_of += [molecule] * n
            d_of.append(diffusion_nm2_ps[residue])
            molecule += 1
    n_mol = molecule
    rotation = _random_rotations(rng, n_mol)
    local = np.concatenate([b @ rotation[m].T for m, b in enumerate(body)])
    molecule_of = np.asarray(molecule_of)
    steps = rng.normal(size=(n_frames, n_mol, 3)) * np.sqrt(2 * np.asarray(d_of) * dt_ps)[None, :, None]
    steps[0] = rng.uniform(0, box_nm, size=(n_mol, 3))
    centres = np.cumsum(steps, axis=0)
    topology = TopologyInfo(atom_name=names, element=elements, mass=np.asarray(masses), residue_name=residue_names,
                            residue_index=np.asarray(residue_index), bonds=np.asarray(bonds).reshape(-1, 2))
    metadata = {"kind": kind, "temperature_K": float(temperature_K), "forcefield": "synthetic Brownian rigid molecules",
                "seed": seed, **(metadata or {})}
    directory = Path(directory)
    box = np.eye(3) * box_nm
    with FrameWriter(directory / FRAMES_H5, topology, metadata, with_forces=False) as writer:
        for f in range(n_frames):
            positions = centres[f, molecule_of] + local + rng.normal(scale=vibration_nm, size=local.shape)
            if wrap:
                positions = positions % box_nm
            writer.append(positions, box, f * dt_ps)
    return directory
