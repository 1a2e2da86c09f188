"""Small synthetic CG liquids (CGFrames-shaped) for tests and benchmarks: no AA run needed.

Bead types follow the "RES:BEAD" convention of the mapping; molecules are whole and unwrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import MODEL_PT

BEAD_TYPE_NAMES = ["CAT:B0", "CAT:B1", "CAT:B2", "AN:B0"]


@dataclass
class SyntheticCG:
    positions: np.ndarray
    forces: np.ndarray | None
    box: np.ndarray
    time: np.ndarray
    temperature_K: np.ndarray
    bead_type: np.ndarray
    bead_type_names: list
    bead_name: list
    molecule_index: np.ndarray
    residue_name: list
    masses: np.ndarray
    bonds: np.ndarray


def ionic_liquid(n_pairs: int = 8, box_nm: float | None = 1.9, frames: int = 4, seed: int = 0, bond_nm: float = 0.3,
                 jitter_nm: float = 0.02, triclinic: bool = False, temperature_K: float = 300.0) -> SyntheticCG:
    """Bent 3-bead cations and 1-bead anions on a jittered lattice; molecules whole (unwrapped).

    ``box_nm=None`` picks the box for about 16 beads/nm^3, roughly a 5-bead-per-ion-pair map of
    [BMIM][BF4] at 1200 kg/m^3.
    """
    if box_nm is None:
        box_nm = (4 * n_pairs / 16.0) ** (1 / 3)
    rng = np.random.default_rng(seed)
    per_side = int(np.ceil((2 * n_pairs) ** (1 / 3)))
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)[: 2 * n_pairs]
    sites = (sites + 0.5) * box_nm / per_side
    bead_type, molecule, positions = [], [], []
    template = np.array([[-bond_nm, 0.0, 0.0], [0.0, 0.0, 0.0], [bond_nm * 0.5, bond_nm * 0.86, 0.0]])
    for m, site in enumerate(sites):
        if m % 2 == 0:
            rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            positions.append(site + template @ rotation.T)
            bead_type += [0, 1, 2]
            molecule += [m] * 3
        else:
            positions.append(site[None])
            bead_type += [3]
            molecule += [m]
    base = np.concatenate(positions)
    box = np.diag([box_nm] * 3)
    if triclinic:
        box[1, 0] = 0.3 * box_nm
        box[2, 0] = -0.2 * box_nm
        box[2, 1] = 0.25 * box_nm
    coords = base + jitter_nm * rng.normal(size=(frames,) + base.shape)
    bonds = [(i, i + 1) for i in range(len(bead_type) - 2) if bead_type[i] in (0, 1) and molecule[i] == molecule[i + 1]]
    n = len(bead_type)
    return SyntheticCG(
        positions=coords.astype(np.float32), forces=None, box=np.repeat(box[None], frames, 0).astype(np.float32),
        time=np.arange(frames, dtype=np.float64), temperature_K=np.full(frames, temperature_K),
        bead_type=np.array(bead_type, np.int64), bead_type_names=list(BEAD_TYPE_NAMES),
        bead_name=[BEAD_TYPE_NAMES[t].split(":")[1] for t in bead_type], molecule_index=np.array(molecule, np.int64),
        residue_name=[BEAD_TYPE_NAMES[t].split(":")[0] for t in bead_type], masses=np.full(n, 50.0),
        bonds=np.array(bonds, np.int64).reshape(-1, 2),
    )


def tensors(cg: SyntheticCG, dtype=torch.float64):
    return (torch.as_tensor(cg.positions, dtype=dtype), torch.as_tensor(cg.box, dtype=dtype),
            torch.as_tensor(cg.bead_type), torch.as_tensor(cg.molecule_index))


def synthetic_model(cg: SyntheticCG, seed: int = 0, weight_scale: float = 2.0, max_pairs_per_bead: float = 32.0,
                    **config_overrides):
    """An untrained quick ``CGModel`` (priors fitted to ``cg``) in eval mode, for tests and benchmarks.

    The random weights are scaled by ``weight_scale`` so the network's forces are visible next to
    the prior's.
    """
    from ..model.config import HybridGraphConfig
    from ..model.hybridgraph import CGModel
    from ..model.priors import fit_priors

    torch.manual_seed(seed)
    config = HybridGraphConfig.quick(len(cg.bead_type_names), bead_type_names=list(cg.bead_type_names),
                                     max_pairs_per_bead=max_pairs_per_bead, **config_overrides)
    model = CGModel(config, fit_priors(cg))
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.mul_(weight_scale)
    return model.eval()


def write_synthetic_model_dir(model_dir, n_pairs: int = 8, box_nm: float = 1.9, frames: int = 4, seed: int = 0,
                              use_temperature: bool = False, weight_scale: float = 2.0):
    """A complete, untrained MODELDIR (checkpoint.pt, hparams.json, prior.json, model.pt) for the
    synthetic liquid, for tests of later stages (OpenMM runs, export). Returns (path, cg).

    The weights are random (scaled by ``weight_scale`` so the network's forces are visible next to
    the prior's); ``model.pt`` includes the prior.
    """
    from pathlib import Path

    from ..model.checkpoint import save_checkpoint
    from ..model.export import export_for_frames

    cg = ionic_liquid(n_pairs=n_pairs, box_nm=box_nm, frames=frames, seed=seed)
    model = synthetic_model(cg, seed=seed, weight_scale=weight_scale, use_temperature=use_temperature)
    model_dir = Path(model_dir)
    save_checkpoint(model_dir, model, epoch=0)
    export_for_frames(model, cg, model_dir / MODEL_PT, mapping_sha256=None,
                      temperature_K=float(cg.temperature_K[0]) if use_temperature else None)
    return model_dir, cg
