"""Tiny TorchScript models that follow the TorchForce contract, and the toy CG system they belong to.

Run ``python tests/models/make_models.py`` to rewrite the files in this folder. The models are
hand-written (not trained) so tests of the OpenMM stage have a fixed, exactly known energy:

- ``pair_model.pt``: a smooth Gaussian pair potential between beads of different molecules plus
  harmonic bead bonds, no prior (``includes_prior: false``);
- ``pair_model_with_prior.pt``: the same plus the prior of ``toy_prior.json`` written in torch
  from the formulas of docs/contracts.md, an implementation independent of the OpenMM prior forces.

Both accept float32 and float64 positions (openmm-torch passes either, by platform precision).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
N_PAIRS = 8
BOX_NM = 2.0
TEMPERATURE_K = 300.0
PAIR_CUTOFF_NM = 0.8

MAPPING = {
    "format": "openmm_cgnn.mapping/1",
    "residues": {
        "CAT": {
            "atoms": ["C1", "C2", "C3", "C4"],
            "beads": [
                {"name": "A", "atoms": ["C1", "C2"], "mass": 30.0},
                {"name": "B", "atoms": ["C3"], "mass": 15.0},
                {"name": "C", "atoms": ["C4"], "mass": 15.0},
            ],
            "bead_bonds": [[0, 1], [1, 2]],
        },
        "ANI": {"atoms": ["X1", "X2"], "beads": [{"name": "X", "atoms": ["X1", "X2"], "mass": 80.0}], "bead_bonds": []},
    },
    "training": {"note": "toy mapping for the OpenMM-stage tests"},
}

TYPES = ["CAT:A", "CAT:B", "CAT:C", "ANI:X"]
# dyadic values: exact in float32, which is how the model stores sigma
SIGMA = {"CAT:A": 0.3125, "CAT:B": 0.25, "CAT:C": 0.25, "ANI:X": 0.34375}

PRIOR = {
    "format": "openmm_cgnn.prior/1",
    "excluded_volume": {
        "exponent": 12,
        "cutoff_nm": 0.6,
        "epsilon_kj_mol": 1.5,
        "sigma_nm": {"|".join(sorted((a, b))): 0.5 * (SIGMA[a] + SIGMA[b]) for a in TYPES for b in TYPES},
    },
    "bonds": [
        {"residue": "CAT", "beads": [0, 1], "r0_nm": 0.30, "k_kj_mol_nm2": 2000.0},
        {"residue": "CAT", "beads": [1, 2], "r0_nm": 0.28, "k_kj_mol_nm2": 1500.0},
    ],
    "angles": [{"residue": "CAT", "beads": [0, 1, 2], "theta0_rad": 2.0, "k_kj_mol_rad2": 40.0}],
}
PRIOR["excluded_volume"]["sigma_nm"]["ANI:X|CAT:C"] = 0.0  # a pair the prior leaves alone

# Pair potential A exp(-(r/w)^2) (1 - (r/rc)^2)^2: negative A attracts. Cation-anion attract.
PAIR_A = np.array(
    [
        [0.8, 0.6, 0.6, -3.0],
        [0.6, 0.5, 0.5, -1.0],
        [0.6, 0.5, 0.5, -1.0],
        [-3.0, -1.0, -1.0, 1.0],
    ]
)
PAIR_WIDTH_NM = 0.35


def minimum_image(delta: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """OpenMM's reduced-box convention: remove c, then b, then a."""
    delta = delta - torch.outer(torch.round(delta[..., 2] / box[2, 2]).reshape(-1), box[2]).reshape(delta.shape)
    delta = delta - torch.outer(torch.round(delta[..., 1] / box[1, 1]).reshape(-1), box[1]).reshape(delta.shape)
    delta = delta - torch.outer(torch.round(delta[..., 0] / box[0, 0]).reshape(-1), box[0]).reshape(delta.shape)
    return delta


def register_intermolecular_pairs(module: torch.nn.Module, bead_type, molecule_index, name: str, table) -> None:
    """Buffers pair_i, pair_j (every pair of beads in different molecules) and ``name``: each pair's
    entry of the bead-type ``table``."""
    types = torch.as_tensor(bead_type)
    i, j = torch.triu_indices(len(types), len(types), 1)
    keep = torch.as_tensor(molecule_index)[i] != torch.as_tensor(molecule_index)[j]
    module.register_buffer("pair_i", i[keep])
    module.register_buffer("pair_j", j[keep])
    module.register_buffer(name, torch.as_tensor(table)[types[i[keep]], types[j[keep]]])


class ToyPrior(torch.nn.Module):
    """The contract's prior formulas in torch, for fixed per-bead arrays."""

    def __init__(self, bead_type, molecule_index, bead_in_residue, residue_of_bead, prior=PRIOR):
        super().__init__()
        ev = prior["excluded_volume"]
        n_types = len(TYPES)
        sigma = np.zeros((n_types, n_types))
        for a in range(n_types):
            for b in range(n_types):
                sigma[a, b] = ev["sigma_nm"]["|".join(sorted((TYPES[a], TYPES[b])))]
        register_intermolecular_pairs(self, bead_type, molecule_index, "pair_sigma", sigma)
        self.exponent = float(ev["exponent"])
        self.cutoff = float(ev["cutoff_nm"])
        self.epsilon = float(ev["epsilon_kj_mol"])
        bonds, r0, kb = [], [], []
        angles, t0, ka = [], [], []
        starts = [k for k in range(len(bead_type)) if k == 0 or molecule_index[k] != molecule_index[k - 1]]
        for s in starts:
            for b in prior["bonds"]:
                if residue_of_bead[s] == b["residue"]:
                    bonds.append([s + b["beads"][0], s + b["beads"][1]])
                    r0.append(b["r0_nm"])
                    kb.append(b["k_kj_mol_nm2"])
            for a in prior["angles"]:
                if residue_of_bead[s] == a["residue"]:
                    angles.append([s + x for x in a["beads"]])
                    t0.append(a["theta0_rad"])
                    ka.append(a["k_kj_mol_rad2"])
        self.register_buffer("bonds", torch.tensor(bonds, dtype=torch.long).reshape(-1, 2))
        self.register_buffer("bond_r0", torch.tensor(r0, dtype=torch.float64))
        self.register_buffer("bond_k", torch.tensor(kb, dtype=torch.float64))
        self.register_buffer("angles", torch.tensor(angles, dtype=torch.long).reshape(-1, 3))
        self.register_buffer("angle_t0", torch.tensor(t0, dtype=torch.float64))
        self.register_buffer("angle_k", torch.tensor(ka, dtype=torch.float64))

    def forward(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        dtype = positions.dtype
        d = minimum_image(positions[self.pair_j] - positions[self.pair_i], box)
        r = torch.linalg.norm(d, dim=1)
        s = self.pair_sigma.to(dtype)
        rc = self.cutoff
        p = self.exponent
        e = self.epsilon * ((s / r) ** p - (s / rc) ** p + p * (s / rc) ** p * (r - rc) / rc)
        energy = torch.where(r < rc, e, torch.zeros_like(e)).sum()
        b = minimum_image(positions[self.bonds[:, 1]] - positions[self.bonds[:, 0]], box)
        rb = torch.linalg.norm(b, dim=1)
        energy = energy + (0.5 * self.bond_k.to(dtype) * (rb - self.bond_r0.to(dtype)) ** 2).sum()
        u = minimum_image(positions[self.angles[:, 0]] - positions[self.angles[:, 1]], box)
        v = minimum_image(positions[self.angles[:, 2]] - positions[self.angles[:, 1]], box)
        cos = (u * v).sum(1) / (torch.linalg.norm(u, dim=1) * torch.linalg.norm(v, dim=1))
        theta = torch.acos(torch.clamp(cos, -1.0, 1.0))
        energy = energy + (0.5 * self.angle_k.to(dtype) * (theta - self.angle_t0.to(dtype)) ** 2).sum()
        return energy


class PairModel(torch.nn.Module):
    """The TorchForce contract: forward(positions [N,3] nm, boxvectors [3,3] nm) -> energy kJ/mol."""

    def __init__(self, bead_type, molecule_index, bead_in_residue, residue_of_bead, include_prior: bool):
        super().__init__()
        register_intermolecular_pairs(self, bead_type, molecule_index, "pair_a", PAIR_A)
        self.width = PAIR_WIDTH_NM
        self.cutoff = PAIR_CUTOFF_NM
        self.include_prior = include_prior
        self.prior = ToyPrior(bead_type, molecule_index, bead_in_residue, residue_of_bead)

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor) -> torch.Tensor:
        box = boxvectors.to(positions.dtype)
        d = minimum_image(positions[self.pair_j] - positions[self.pair_i], box)
        r = torch.linalg.norm(d, dim=1)
        x = r / self.cutoff
        e = self.pair_a.to(positions.dtype) * torch.exp(-((r / self.width) ** 2)) * (1 - x * x) ** 2
        energy = torch.where(r < self.cutoff, e, torch.zeros_like(e)).sum()
        if self.include_prior:
            energy = energy + self.prior(positions, box)
        return energy


def toy_cg_system(n_pairs: int = N_PAIRS, seed: int = 1):
    """The toy CG system: ``n_pairs`` CAT + ANI molecules packed in a cubic box, relaxed in the prior."""
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.openmm.topology import CGConfiguration

    mapping = CGMapping.from_dict(MAPPING)
    rng = np.random.default_rng(seed)
    molecules = ["CAT"] * n_pairs + ["ANI"] * n_pairs
    edge = BOX_NM * (n_pairs / N_PAIRS) ** (1 / 3)
    shape = {"CAT": np.array([[-0.25, 0.1, 0.0], [0.0, -0.1, 0.0], [0.25, 0.05, 0.0]]), "ANI": np.zeros((1, 3))}
    # a jittered lattice keeps every starting distance well inside the smooth part of the potentials
    sites = int(np.ceil(len(molecules) ** (1 / 3)))
    grid = np.array([(x, y, z) for x in range(sites) for y in range(sites) for z in range(sites)], dtype=float)
    grid = grid[rng.permutation(len(grid))[: len(molecules)]] * edge / sites
    coords = [shape[name] + site + rng.normal(scale=0.02, size=3) for name, site in zip(molecules, grid)]
    return CGConfiguration.from_molecules(mapping, molecules, np.vstack(coords), np.eye(3) * edge)


def metadata_for(cg, include_prior: bool) -> dict:
    return {
        "units": {"positions": "nm", "boxvectors": "nm", "energy": "kJ/mol"},
        "cutoff_intra_nm": 0.0,
        "cutoff_inter_nm": PAIR_CUTOFF_NM,
        "bead_type_names": list(cg.bead_type_names),
        "bead_type": [int(t) for t in cg.bead_type],
        "bead_names": list(cg.bead_names),
        "masses": [float(m) for m in cg.masses],
        "n_beads": cg.n_beads,
        "mapping_sha256": cg.mapping.sha256(),
        "uses_temperature": False,
        "temperature_K": TEMPERATURE_K,
        "includes_prior": include_prior,
        "package_version": "tests",
        "periodic": True,
    }


def scripted_model(cg, include_prior: bool) -> torch.jit.ScriptModule:
    model = PairModel(cg.bead_type, cg.molecule_index, cg.bead_in_residue, cg.residue_names, include_prior)
    return torch.jit.script(model.double())


def save_model(cg, include_prior: bool, path: Path) -> Path:
    module = scripted_model(cg, include_prior)
    extra = {"metadata.json": json.dumps(metadata_for(cg, include_prior), indent=1)}
    torch.jit.save(module, str(path), _extra_files=extra)
    return path


def write_all(folder: Path = HERE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cg = toy_cg_system()
    (folder / "toy_mapping.json").write_text(json.dumps(MAPPING, indent=2) + "\n")
    (folder / "toy_prior.json").write_text(json.dumps(PRIOR, indent=2) + "\n")
    cg.write_pdb(folder / "toy_cg.pdb")
    save_model(cg, False, folder / "pair_model.pt")
    save_model(cg, True, folder / "pair_model_with_prior.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)


def make_model_dir(folder: Path, use_temperature: bool = False, seed: int = 0, prior: dict | None = None,
                   **config_overrides) -> Path:
    """A model directory (docs/contracts.md section 3) holding an untrained tiny CGModel with the toy
    prior (or ``prior``, a prior.json dictionary)."""
    from openmm_cgnn.mapping.spec import CGMapping
    from openmm_cgnn.model import CGModel, HybridGraphConfig, PriorSet, save_checkpoint

    torch.manual_seed(seed)
    sizes = dict(features=16, filters=16, n_gaussians=8, intra_blocks=1, inter_blocks=1, intra_cutoff_nm=0.6,
                 inter_cutoff_nm=0.7, use_temperature=use_temperature, energy_scale=5.0)
    sizes.update(config_overrides)
    config = HybridGraphConfig.quick(len(TYPES), bead_type_names=list(TYPES), **sizes)
    model = CGModel(config, PriorSet.from_dict(PRIOR if prior is None else prior, TYPES))
    folder = Path(folder)
    save_checkpoint(folder, model, epoch=0)
    CGMapping.from_dict(MAPPING).save(folder / "mapping.json")
    return folder


AA_ATOM_MASS = {"C1": 15.0, "C2": 15.0, "C3": 15.0, "C4": 15.0, "X1": 40.0, "X2": 40.0}


def write_aa_run(folder: Path, cg, temperature_K: float = 350.0, n_frames: int = 2, seed: int = 0,
                 bead_positions: np.ndarray | None = None) -> Path:
    """A small all-atom-kind run (frames.h5) whose mapped bead positions are ``cg.positions`` in its last
    frame, or ``bead_positions`` (frames, beads, 3) in every frame."""
    from openmm_cgnn.frames import FrameWriter, TopologyInfo

    rng = np.random.default_rng(seed)
    names, elements, masses, resname, resindex, bonds, coords, bead_of_atom = [], [], [], [], [], [], [], []
    for mol in range(cg.n_molecules):
        beads = np.flatnonzero(cg.molecule_index == mol)
        residue = cg.residue_names[beads[0]]
        rm = cg.mapping.residues[residue]
        first_atom = len(names)
        for k, bead in zip(beads, rm.beads):
            offset = rng.normal(scale=0.05, size=3)
            # equal-mass atoms placed symmetrically keep the bead's centre of mass exact
            shifts = [offset, -offset] if len(bead.atoms) == 2 else [np.zeros(3)]
            for atom, shift in zip(bead.atoms, shifts):
                names.append(atom)
                elements.append("C" if residue == "CAT" else "F")
                masses.append(AA_ATOM_MASS[atom])
                resname.append(residue)
                resindex.append(mol)
                coords.append(cg.positions[k] + shift)
                bead_of_atom.append(k)
        atoms = list(range(first_atom, len(names)))
        bonds += list(zip(atoms[:-1], atoms[1:]))
    top = TopologyInfo(names, elements, np.array(masses), resname, np.array(resindex), np.array(bonds))
    coords = np.array(coords)
    folder = Path(folder)
    with FrameWriter(folder / "frames.h5", top, {"temperature_K": temperature_K, "kind": "aa"}, with_forces=True) as writer:
        if bead_positions is not None:
            # each atom keeps its offset from its bead's position in cg
            offsets = coords - cg.positions[bead_of_atom]
            for k, frame in enumerate(np.asarray(bead_positions)):
                writer.append(frame[bead_of_atom] + offsets, cg.box, float(k), forces=np.zeros_like(coords))
            return folder
        for k in range(n_frames):
            jitter = 0.0 if k == n_frames - 1 else 0.01
            writer.append(coords + jitter, cg.box, float(k), forces=np.zeros_like(coords))
    return folder
