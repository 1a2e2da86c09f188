"""Physical constants and the unit conversions built on them: one definition each.

Units are OpenMM's everywhere (nm, ps, kJ/mol, amu, K); the conversions here are the few places a
quantity leaves them (densities in kg/m^3, diffusion in m^2/s, energies in J). Since the 2019 SI
redefinition the Avogadro and Boltzmann constants are exact, so the gas constant below is too. A
molar mass in g/mol and a particle mass in amu are the same number here (the molar mass constant
is taken as 1 g/mol; the 2019 SI makes it 1 - 3.5e-10).

OpenMM ``Quantity`` values are read with :func:`openmm.unit.Quantity.value_in_unit` (never through
the private ``_value``); :func:`strip` does that for values that may be plain numbers already.
"""

from __future__ import annotations

from typing import Any

import numpy as np

AVOGADRO_PER_MOL = 6.02214076e23  # exact (SI 2019)
BOLTZMANN_J_K = 1.380649e-23  # exact (SI 2019)
MOLAR_GAS_CONSTANT_KJ_MOL_K = AVOGADRO_PER_MOL * BOLTZMANN_J_K * 1e-3  # R = N_A k_B = 0.00831446261815324


def kT_kj_mol(temperature_K: Any) -> Any:
    """Thermal energy R T in kJ/mol (a float for a float, an array for an array)."""
    return MOLAR_GAS_CONSTANT_KJ_MOL_K * temperature_K


def temperature_from_kinetic_K(kinetic_energy_kj_mol: float, degrees_of_freedom: int) -> float:
    """Instantaneous temperature 2 KE / (n_dof R)."""
    return 2.0 * kinetic_energy_kj_mol / (degrees_of_freedom * MOLAR_GAS_CONSTANT_KJ_MOL_K)


def density_kg_m3(mass_amu: Any, volume_nm3: Any) -> Any:
    """Mass density of ``mass_amu`` in ``volume_nm3`` (floats or arrays)."""
    return mass_amu / AVOGADRO_PER_MOL * 1e-3 / (volume_nm3 * 1e-27)


def cube_edge_nm(mass_amu: float, density_kg_m3: float) -> float:
    """Edge of the cube that holds ``mass_amu`` at ``density_kg_m3``."""
    return (mass_amu / AVOGADRO_PER_MOL * 1e-3 / density_kg_m3 * 1e27) ** (1.0 / 3.0)


def strip(value: Any, unit: Any) -> Any:
    """``value`` in ``unit`` if it is an OpenMM Quantity, else ``value`` as it is (already in OpenMM units)."""
    from openmm.unit import is_quantity

    return value.value_in_unit(unit) if is_quantity(value) else value


# The OpenMM units that values are read in; openmm is imported on first use (after torch, see
# openmm_cgnn/__init__.py), so importing this module stays cheap.
def in_kj_mol(value: Any) -> Any:
    """An energy in kJ/mol."""
    import openmm.unit as unit

    return strip(value, unit.kilojoule_per_mole)


def in_nm(value: Any) -> Any:
    """Lengths (a number, a Vec3, positions or box vectors as returned) in nm."""
    import openmm.unit as unit

    return strip(value, unit.nanometer)


def in_nm3(value: Any) -> Any:
    """A volume in nm^3."""
    import openmm.unit as unit

    return strip(value, unit.nanometer**3)


def in_kj_mol_nm(value: Any) -> Any:
    """Forces in kJ/mol/nm."""
    import openmm.unit as unit

    return strip(value, unit.kilojoule_per_mole / unit.nanometer)


def in_amu(value: Any) -> Any:
    """A mass in amu (dalton)."""
    import openmm.unit as unit

    return strip(value, unit.dalton)


def nm_array(value: Any) -> np.ndarray:
    """Positions or box vectors as a float64 array in nm: a Quantity, a list of Vec3 Quantities
    (``System.getDefaultPeriodicBoxVectors``) or plain numbers already in nm."""
    value = in_nm(value)
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return np.array([[float(x) for x in in_nm(row)] for row in value], dtype=np.float64)
