"""Statistically optimal force map: the least noisy bead forces consistent with the position map.

Force matching regresses the mapped instantaneous force onto the CG coordinates; its conditional
mean is the mean force whatever linear force map ``B`` is used, as long as ``B M^T = I`` for the
centre-of-mass position map ``M`` (Krämer, Durumeric, Charron, Chen, Clementi, Noé, "Statistically
optimal force aggregation for coarse-graining molecular dynamics", JPCL 2023). The summed map (1
for the bead's own atoms, 0 elsewhere) is one such map. Of all of them, the one with the smallest
mean squared mapped force gives the least noisy labels; the network's loss floor is that noise.

Per residue type with ``n`` atoms and force samples ``F_s`` (every molecule of every frame), the
objective is ``sum_I b_I^T C b_I`` with the Gram matrix ``C = sum_s F_s F_s^T`` (n x n, summed over
x, y, z: one weight per atom and bead for all three components), under the linear equality
constraints ``B M^T = I``: a quadratic problem solved in closed form (its KKT system).

Atoms joined by a constraint share one weight in every bead: OpenMM's reported forces leave out the
constraint forces, and only a map that weighs both ends of a constraint equally cancels them (the
unreported pair force is equal and opposite). The constrained pairs here are the X-H bonds (all
bonds to a hydrogen), which is what the AA stage constrains; each heavy atom and its hydrogens form
one group (``discretize.atom_groups``). Weights may reach atoms outside the bead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..frames import Frames
from .discretize import atom_groups, is_hydrogen
from .spec import CGMapping, MappingError, ResidueMapping

FORCE_MAPS = ("optimal", "sum")
# Relative ridge on the Gram matrix: keeps the KKT system solvable when force samples are linearly
# dependent (a rigid molecule, too few samples) without changing a well-sampled answer measurably.
RIDGE = 1e-9


@dataclass
class ForceSamples:
    """Per residue type: the force Gram matrix over all its molecules and frames, in mapping atom order."""

    gram: np.ndarray  # (n, n) sum over samples and x, y, z of F_i . F_j, (kJ/mol/nm)^2
    n_samples: int  # molecules x frames
    masses: np.ndarray  # (n,) amu
    groups: np.ndarray  # (n,) constraint group per atom (a heavy atom with its hydrogens)


def position_map(residue: ResidueMapping, masses: np.ndarray) -> np.ndarray:
    """The centre-of-mass map M (beads x atoms): row I holds m_i / M_I on the atoms of bead I."""
    index = {atom: k for k, atom in enumerate(residue.atoms)}
    matrix = np.zeros((len(residue.beads), len(residue.atoms)))
    for row, bead in enumerate(residue.beads):
        cols = [index[a] for a in bead.atoms]
        matrix[row, cols] = masses[cols] / masses[cols].sum()
    return matrix


def summed_force_map(residue: ResidueMapping) -> np.ndarray:
    """The summed map (beads x atoms): 1 on the bead's own atoms."""
    index = {atom: k for k, atom in enumerate(residue.atoms)}
    matrix = np.zeros((len(residue.beads), len(residue.atoms)))
    for row, bead in enumerate(residue.beads):
        matrix[row, [index[a] for a in bead.atoms]] = 1.0
    return matrix


def optimal_force_map(gram: np.ndarray, positions: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Minimise sum_I b_I^T C b_I subject to B M^T = I and equal weights inside each group.

    With ``B = W G^T`` (G: atoms x groups indicator) the problem per bead is min w^T A w subject to
    K w = e_I with A = G^T C G and K = M G; its KKT system [[2A, K^T], [K, 0]] is solved for all
    beads at once.
    """
    n_beads, n_atoms = positions.shape
    groups = np.asarray(groups, dtype=np.int64)
    indicator = np.zeros((n_atoms, int(groups.max()) + 1))
    indicator[np.arange(n_atoms), groups] = 1.0
    a = indicator.T @ gram @ indicator
    # The answer does not depend on the scale of A; normalising it keeps the KKT matrix well conditioned.
    a = a / max(float(np.trace(a)) / len(a), 1e-300) + RIDGE * np.eye(len(a))
    k = positions @ indicator
    n_groups = len(a)
    kkt = np.zeros((n_groups + n_beads, n_groups + n_beads))
    kkt[:n_groups, :n_groups] = 2.0 * a
    kkt[:n_groups, n_groups:] = k.T
    kkt[n_groups:, :n_groups] = k
    rhs = np.zeros((n_groups + n_beads, n_beads))
    rhs[n_groups:] = np.eye(n_beads)
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    weights = solution[:n_groups].T @ indicator.T
    if not np.allclose(weights @ positions.T, np.eye(n_beads), atol=1e-6):
        raise MappingError("optimal force map: no map satisfies B M^T = I with the constrained atoms' shared weights "
                           "(does a constraint group span two beads in a way the positions cannot match?)")
    return weights


def mean_squared_force(weights: np.ndarray, samples: ForceSamples) -> float:
    """Mean over samples and beads of |f_I|^2 for the map ``weights``, (kJ/mol/nm)^2."""
    return float(np.trace(weights @ samples.gram @ weights.T) / (samples.n_samples * len(weights)))


def collect_force_samples(mapping: CGMapping, frames_list: Sequence[Frames], chunk: int = 64) -> "OrderedDict[str, ForceSamples]":
    """Force Gram matrices per residue type of ``mapping`` over every molecule of every frame of every run."""
    from .learn import residue_templates

    found: "OrderedDict[str, ForceSamples]" = OrderedDict()
    for frames in frames_list:
        if frames.forces is None:
            raise MappingError(f"{frames.path}: the frames have no forces; a force map needs them")
        for name, (template, molecules) in residue_templates(frames).items():
            if name not in mapping.residues:
                raise MappingError(f"{frames.path}: residue '{name}' is not in the mapping (it has {list(mapping.residues)})")
            residue = mapping.residues[name]
            if sorted(residue.atoms) != template.atoms:
                raise MappingError(f"{frames.path}: residue '{name}' has atoms {template.atoms}, the mapping expects "
                                   f"{sorted(residue.atoms)}")
            order = [template.atoms.index(a) for a in residue.atoms]  # canonical -> mapping atom order
            index = molecules[:, order]
            if name not in found:
                masses = template.masses[order]
                hydrogen = [is_hydrogen(template.elements[k], template.masses[k]) for k in order]
                back = {canonical: position for position, canonical in enumerate(order)}
                bonds = np.array([(back[int(i)], back[int(j)]) for i, j in template.bonds], dtype=np.int64).reshape(-1, 2)
                found[name] = ForceSamples(np.zeros((len(order), len(order))), 0, masses,
                                           atom_groups(len(order), bonds, hydrogen))
            samples = found[name]
            for start in range(0, frames.n_frames, chunk):
                forces = frames.forces[start:start + chunk][:, index].astype(np.float64)  # (f, molecules, n, 3)
                samples.gram += np.einsum("fmic,fmjc->ij", forces, forces)
                samples.n_samples += forces.shape[0] * forces.shape[1]
    missing = [name for name in mapping.residues if name not in found]
    if missing:
        raise MappingError(f"no molecules of residue(s) {missing} in the runs given; cannot fit their force map")
    return found


def fit_force_map(mapping: CGMapping, frames_list: Sequence[Frames]) -> tuple[CGMapping, dict]:
    """The mapping with each residue's optimal force map stored, and a report per residue.

    The report gives the mean squared mapped force of the summed and the optimal map over the
    same samples ((kJ/mol/nm)^2 per bead), their ratio and the sample count.
    """
    samples = collect_force_samples(mapping, frames_list)
    residues: "OrderedDict[str, ResidueMapping]" = OrderedDict()
    report: dict = {}
    for name, residue in mapping.residues.items():
        s = samples[name]
        weights = optimal_force_map(s.gram, position_map(residue, s.masses), s.groups)
        summed, optimal = mean_squared_force(summed_force_map(residue), s), mean_squared_force(weights, s)
        info = {"mean_squared_force_sum": summed, "mean_squared_force_optimal": optimal, "n_samples": s.n_samples}
        residues[name] = ResidueMapping(residue.atoms, residue.beads, residue.bead_bonds, force_weights=weights,
                                        force_map_info=info)
        report[name] = {**info, "ratio_optimal_to_sum": optimal / summed if summed > 0 else None}
    return CGMapping(residues=residues, training=mapping.training), report
