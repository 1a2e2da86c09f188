"""Per-system topology tensors: which bead pairs/triplets the network and the priors act on.

A CG system is described by ``bead_type[N]`` and ``molecule_index[N]`` only. Bead types are
``"RES:BEAD"`` names ordered by residue, then bead order (``Mapping.bead_type_names``), so a bead's
type also gives its residue and its index inside the residue; that is how per-residue prior terms
(``prior.json`` bonds and angles, indexed within the residue) are laid onto a system.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor


class SystemTensors(NamedTuple):
    """Topology of one CG system; every index refers to beads in CG topology order."""

    bead_type: Tensor       # (N,) long
    molecule_index: Tensor  # (N,) long
    intra_i: Tensor         # (P,) long: all same-molecule pairs, i < j
    intra_j: Tensor
    bond_i: Tensor          # (K,) long
    bond_j: Tensor
    bond_r0: Tensor         # (K,) nm
    bond_k: Tensor          # (K,) kJ/mol/nm^2
    angle_i: Tensor         # (A,) long, angle at angle_j
    angle_j: Tensor
    angle_k: Tensor
    angle_theta0: Tensor    # (A,) rad
    angle_k_theta: Tensor   # (A,) kJ/mol/rad^2
    bond_entry: Tensor      # (K,) long: the prior.json bond entry of each term (its table when tabulated)
    angle_entry: Tensor     # (A,) long: the prior.json angle entry of each term


def residue_layout(bead_type_names: Sequence[str]) -> dict[str, list[int]]:
    """Residue name -> its bead-type indices in bead order (from the ``"RES:BEAD"`` names)."""
    layout: dict[str, list[int]] = {}
    for type_index, name in enumerate(bead_type_names):
        residue, sep, bead = name.partition(":")
        if not sep or not residue or not bead:
            raise ValueError(f"bead type name {name!r} is not of the form 'RESIDUE:BEAD'")
        layout.setdefault(residue, []).append(type_index)
    return layout


def molecule_tables(
    bead_type: np.ndarray, molecule_index: np.ndarray, bead_type_names: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """Residue of each molecule and a table (molecules, max beads) of global bead indices by
    position inside the residue (-1 where a molecule lacks that bead)."""
    layout = residue_layout(bead_type_names)
    residue_of_type = [""] * len(bead_type_names)
    local_of_type = np.zeros(len(bead_type_names), dtype=np.int64)
    for residue, types in layout.items():
        for local, type_index in enumerate(types):
            residue_of_type[type_index] = residue
            local_of_type[type_index] = local
    n_molecules = int(molecule_index.max()) + 1 if len(molecule_index) else 0
    width = max(len(types) for types in layout.values())
    table = np.full((n_molecules, width), -1, dtype=np.int64)
    residues = [""] * n_molecules
    for bead, (type_index, molecule) in enumerate(zip(bead_type.tolist(), molecule_index.tolist())):
        residue = residue_of_type[type_index]
        if residues[molecule] and residues[molecule] != residue:
            raise ValueError(
                f"molecule {molecule} mixes beads of residues {residues[molecule]!r} and {residue!r} "
                "(bead_type and molecule_index disagree)"
            )
        residues[molecule] = residue
        local = local_of_type[type_index]
        if table[molecule, local] != -1:
            raise ValueError(
                f"molecule {molecule} has two beads of type {bead_type_names[type_index]!r} "
                f"(beads {table[molecule, local]} and {bead})"
            )
        table[molecule, local] = bead
    return residues, table


def check_topology(bead_type: Tensor, molecule_index: Tensor, n_bead_types: int) -> None:
    """Clear errors for malformed topology arguments (eager entry points only)."""
    if bead_type.dim() != 1 or molecule_index.dim() != 1:
        raise ValueError(
            f"bead_type and molecule_index must be 1-D, got shapes {tuple(bead_type.shape)} and "
            f"{tuple(molecule_index.shape)}"
        )
    if bead_type.shape[0] != molecule_index.shape[0]:
        raise ValueError(
            f"bead_type has {bead_type.shape[0]} entries but molecule_index has {molecule_index.shape[0]}"
        )
    if bead_type.dtype.is_floating_point or molecule_index.dtype.is_floating_point:
        raise ValueError("bead_type and molecule_index must be integer tensors")
    if bead_type.numel() and (int(bead_type.min()) < 0 or int(bead_type.max()) >= n_bead_types):
        raise ValueError(
            f"bead_type values must lie in [0, {n_bead_types}), got [{int(bead_type.min())}, {int(bead_type.max())}]"
        )
    if molecule_index.numel() and int(molecule_index.min()) < 0:
        raise ValueError("molecule_index values must be >= 0")


def build_system_tensors(
    bead_type: Tensor, molecule_index: Tensor, prior=None, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32, skip_bonds: Sequence[int] = (),
) -> SystemTensors:
    """Topology tensors for one system; ``prior`` (a PriorSet or None) adds bond and angle terms
    (none for the bond entries in ``skip_bonds``: constrained bonds)."""
    types = bead_type.detach().cpu().numpy().astype(np.int64)
    molecules = molecule_index.detach().cpu().numpy().astype(np.int64)
    device = bead_type.device if device is None else device

    # All same-molecule pairs i < j: group beads by molecule, then pair within each group.
    order = np.argsort(molecules, kind="stable")
    boundaries = np.flatnonzero(np.diff(molecules[order])) + 1
    pair_i: list[np.ndarray] = []
    pair_j: list[np.ndarray] = []
    for group in np.split(order, boundaries) if len(order) else []:
        if len(group) > 1:
            first, second = np.triu_indices(len(group), k=1)
            a, b = group[first], group[second]
            pair_i.append(np.minimum(a, b))
            pair_j.append(np.maximum(a, b))
    intra_i = np.concatenate(pair_i) if pair_i else np.zeros(0, dtype=np.int64)
    intra_j = np.concatenate(pair_j) if pair_j else np.zeros(0, dtype=np.int64)

    if prior is not None:
        bonds, angles = prior.system_terms(types, molecules, skip_bonds)
    else:
        bonds = (np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
        angles = (np.zeros((0, 3), np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))

    def long(values: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(values), dtype=torch.long, device=device)

    def real(values: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype, device=device)

    return SystemTensors(
        bead_type=long(types), molecule_index=long(molecules),
        intra_i=long(intra_i), intra_j=long(intra_j),
        bond_i=long(bonds[0][:, 0]), bond_j=long(bonds[0][:, 1]), bond_r0=real(bonds[1]), bond_k=real(bonds[2]),
        angle_i=long(angles[0][:, 0]), angle_j=long(angles[0][:, 1]), angle_k=long(angles[0][:, 2]),
        angle_theta0=real(angles[1]), angle_k_theta=real(angles[2]),
        bond_entry=long(bonds[3]), angle_entry=long(angles[3]),
    )
