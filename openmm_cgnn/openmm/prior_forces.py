"""The fitted prior (``prior.json``, docs/contracts.md section 3) as native OpenMM forces.

Native forces are the alternative to evaluating the prior inside the TorchScript model; they are
also what plain-OpenMM users see in an exported ``system.xml``. The file is read, validated and
laid onto the system by the model's own :class:`~openmm_cgnn.model.priors.PriorSet`, so both
carriers use the same parameters (including the float32 rounding of sigma); only the formulas
are written again here, in OpenMM's terms: a shifted-force excluded volume between beads of
different molecules, harmonic bonds and angles, or tabulated ones as CustomCompoundBondForces
over Continuous1DFunctions (the same natural cubic splines the model evaluates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np



class PriorError(ValueError):
    """``prior.json`` is malformed or does not fit the CG system."""


def load_prior(path: str | Path, bead_type_names: Sequence[str] | None = None) -> Any:
    """A :class:`PriorSet` from ``prior.json``; errors name the file and the field."""
    from ..model.priors import PriorSet

    try:
        return PriorSet.from_json(path, bead_type_names)
    except (FileNotFoundError, ValueError) as exc:
        raise PriorError(str(exc)) from None


def prior_forces(prior: Any, bead_type: np.ndarray, molecule_index: np.ndarray, bead_type_names: Sequence[str],
                 force_group: int = 1, skip_bonds: Sequence[int] = ()) -> list[Any]:
    """OpenMM forces for the prior terms that act in this system (excluded volume, bonds, angles).

    ``bead_type`` and ``molecule_index`` are per bead in CG topology order, indexing ``bead_type_names``;
    the bond entries in ``skip_bonds`` get no force (they are constrained).
    """
    if list(prior.bead_type_names) != list(bead_type_names):
        raise PriorError(f"the prior's bead types {prior.bead_type_names} are not the model's {list(bead_type_names)}")
    bead_type = np.asarray(bead_type, dtype=np.int64)
    molecule_index = np.asarray(molecule_index, dtype=np.int64)
    forces = []
    if prior.excluded_volume.enabled:
        forces.append(excluded_volume_force(prior.excluded_volume, bead_type, molecule_index))
    try:
        (bond_index, r0, k_bond, bond_entry), (angle_index, theta0, k_angle, angle_entry) = \
            prior.system_terms(bead_type, molecule_index, skip_bonds)
    except ValueError as exc:
        raise PriorError(f"the prior does not fit this system: {exc}") from None
    if prior.bonded_form == "tabulated":
        forces += tabulated_forces(prior.bonds.tables, bond_index, bond_entry, "CGPriorBonds", "distance")
        forces += tabulated_forces(prior.angles.tables, angle_index, angle_entry, "CGPriorAngles", "angle")
    else:
        if len(bond_index):
            forces.append(bond_force(bond_index, r0, k_bond))
        if len(angle_index):
            forces.append(angle_force(angle_index, theta0, k_angle))
    for force in forces:
        force.setForceGroup(force_group)
    return forces


def excluded_volume_force(excluded_volume: Any, bead_type: np.ndarray, molecule_index: np.ndarray) -> Any:
    """CustomNonbondedForce ``eps[(s/r)^p - (s/rc)^p + p (s/rc)^p (r - rc)/rc]`` for r < rc; same-molecule pairs excluded."""
    import openmm

    p, rc, eps = excluded_volume.exponent, excluded_volume.cutoff, excluded_volume.epsilon
    sigma = excluded_volume.sigma.double().cpu().numpy()
    n = sigma.shape[0]
    # Constants are folded into the expression so the energy is the contract's formula exactly;
    # sigma = 0 switches a pair off (every term is then 0).
    expression = f"{eps!r}*((s/r)^{p!r} - (s/{rc!r})^{p!r} + {p!r}*(s/{rc!r})^{p!r}*(r - {rc!r})/{rc!r}); s = sigma(type1, type2)"
    force = openmm.CustomNonbondedForce(expression)
    force.setName("CGPriorExcludedVolume")
    # Discrete2DFunction is indexed x + n*y; sigma is symmetric so either orientation works.
    force.addTabulatedFunction("sigma", openmm.Discrete2DFunction(n, n, sigma.T.ravel().tolist()))
    force.addPerParticleParameter("type")
    for t in bead_type:
        force.addParticle([float(t)])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(rc)
    force.setUseSwitchingFunction(False)
    force.setUseLongRangeCorrection(False)
    for members in molecules(molecule_index):
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                force.addExclusion(int(members[x]), int(members[y]))
    return force


def bond_force(index: np.ndarray, r0: np.ndarray, k: np.ndarray) -> Any:
    """HarmonicBondForce ``k/2 (r - r0)^2``."""
    import openmm

    force = openmm.HarmonicBondForce()
    force.setName("CGPriorBonds")
    force.setUsesPeriodicBoundaryConditions(True)
    for (i, j), length, stiffness in zip(index, r0, k):
        force.addBond(int(i), int(j), float(length), float(stiffness))
    return force


def angle_force(index: np.ndarray, theta0: np.ndarray, k: np.ndarray) -> Any:
    """HarmonicAngleForce ``k/2 (theta - theta0)^2``, angle at the middle bead."""
    import openmm

    force = openmm.HarmonicAngleForce()
    force.setName("CGPriorAngles")
    force.setUsesPeriodicBoundaryConditions(True)
    for (i, j, m), angle, stiffness in zip(index, theta0, k):
        force.addAngle(int(i), int(j), int(m), float(angle), float(stiffness))
    return force


def tabulated_forces(tables: Any, index: np.ndarray, entry: np.ndarray, name: str, geometry: str) -> list[Any]:
    """One CustomCompoundBondForce per table that has terms here: ``u(x)`` with ``x`` the ``distance``
    or ``angle`` of the term's particles and ``u`` a Continuous1DFunction of the table (OpenMM
    interpolates it with the same natural cubic spline as the model). The function is 0 outside
    its range, so x is clamped into it and continued by the edge slope plus the harmonic wall, as
    in :func:`openmm_cgnn.model.priors.spline_energy` (angles: the range is [0, pi], nothing is beyond)."""
    import openmm

    forces = []
    n_particles = index.shape[1]
    particles = ", ".join(f"p{k + 1}" for k in range(n_particles))
    for table in np.unique(entry):
        low, high = tables.x_min[table], tables.x_max[table]
        slope_low, slope_high = float(tables.slope_low[table]), float(tables.slope_high[table])
        wall = tables.wall_k[table]
        expression = (f"u(xc) + select(step(x - xc), {slope_high!r}, {slope_low!r})*(x - xc) + {0.5 * wall!r}*(x - xc)^2; "
                      f"xc = min(max(x, {low!r}), {high!r}); x = {geometry}({particles})")
        force = openmm.CustomCompoundBondForce(n_particles, expression)
        force.setName(name)
        force.addTabulatedFunction("u", openmm.Continuous1DFunction(list(tables.energies[table]), low, high))
        force.setUsesPeriodicBoundaryConditions(True)
        for term in np.flatnonzero(entry == table):
            force.addBond([int(i) for i in index[term]], [])
        forces.append(force)
    return forces


def molecules(molecule_index: np.ndarray) -> list[np.ndarray]:
    """Bead indices of each molecule."""
    order = np.argsort(molecule_index, kind="stable")
    bounds = np.flatnonzero(np.diff(molecule_index[order])) + 1
    return np.split(order, bounds)


def bond_lengths(prior: Any) -> dict[tuple[str, int, int], float]:
    """``(residue, i, j) -> r0`` of the prior's bonds (shapes for packing new configurations)."""
    return {
        (residue, min(pair), max(pair)): float(r0)
        for residue, pair, r0 in zip(prior.bonds.residues, prior.bonds.beads, prior.bonds.r0)
    }
