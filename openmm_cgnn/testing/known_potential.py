"""A small CG liquid with a known potential, simulated in OpenMM: test and benchmark data for training.

Dimers (beads A-B, harmonic bond) and monomers (bead X) interact between molecules through a
shifted-force Lennard-Jones potential with per-type sigma and epsilon. Forces are exact (no
fluctuating remainder of removed atoms), so a force-matching model can drive the error far below
the force scale, which is what the recovery test checks. The run is written as a CG-kind frames
file plus a matching ``mapping.json``, so it goes through the same readers as real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..layout import FRAMES_H5, MAPPING_JSON
from ..platforms import get_platform


@dataclass
class SyntheticSystem:
    n_dimers: int = 12
    n_monomers: int = 12
    box_nm: float = 1.9
    cutoff_nm: float = 0.75
    bond_r0_nm: float = 0.3
    bond_k: float = 3000.0  # kJ/mol/nm^2
    sigma_nm: dict[str, float] = field(default_factory=lambda: {"A": 0.36, "B": 0.42, "X": 0.40})
    epsilon_kj_mol: dict[str, float] = field(default_factory=lambda: {"A": 1.2, "B": 2.0, "X": 1.6})
    mass_amu: float = 40.0
    temperature_K: float = 300.0

    def mapping_dict(self) -> dict:
        """``mapping.json`` content describing these molecules (a CG run: one atom per bead)."""
        return {
            "format": "openmm_cgnn.mapping/1",
            "residues": {
                "DIM": {
                    "atoms": ["A", "B"],
                    "beads": [{"name": "A", "atoms": ["A"], "mass": self.mass_amu},
                              {"name": "B", "atoms": ["B"], "mass": self.mass_amu}],
                    "bead_bonds": [[0, 1]],
                },
                "MON": {"atoms": ["X"], "beads": [{"name": "X", "atoms": ["X"], "mass": self.mass_amu}], "bead_bonds": []},
            },
            "training": {"note": "synthetic known-potential system"},
        }

    def build(self):
        """(topology, system, initial positions in nm) on a lattice with no overlaps."""
        import openmm
        import openmm.app as app

        topology = app.Topology()
        chain = topology.addChain()
        bead_names: list[str] = []
        for _ in range(self.n_dimers):
            residue = topology.addResidue("DIM", chain)
            a = topology.addAtom("A", None, residue)
            b = topology.addAtom("B", None, residue)
            topology.addBond(a, b)
            bead_names += ["A", "B"]
        for _ in range(self.n_monomers):
            residue = topology.addResidue("MON", chain)
            topology.addAtom("X", None, residue)
            bead_names.append("X")
        topology.setPeriodicBoxVectors(np.eye(3) * self.box_nm)

        system = openmm.System()
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * self.box_nm))
        for _ in bead_names:
            system.addParticle(self.mass_amu)
        bonds = openmm.HarmonicBondForce()
        bonds.setUsesPeriodicBoundaryConditions(True)
        for m in range(self.n_dimers):
            bonds.addBond(2 * m, 2 * m + 1, self.bond_r0_nm, self.bond_k)
        system.addForce(bonds)

        # Shifted-force LJ: energy and force both vanish at the cutoff, like the model's envelope.
        rc = self.cutoff_nm
        lj = "4*eps*((sig/r)^12-(sig/r)^6)"
        ljc = "4*eps*((sig/rc)^12-(sig/rc)^6)"
        dljc = "4*eps*(-12*sig^12/rc^13+6*sig^6/rc^7)"
        pair = openmm.CustomNonbondedForce(
            f"{lj} - {ljc} - (r-rc)*{dljc}; sig=0.5*(s1+s2); eps=sqrt(e1*e2); rc={rc}"
        )
        pair.addPerParticleParameter("s")
        pair.addPerParticleParameter("e")
        pair.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
        pair.setCutoffDistance(rc)
        for name in bead_names:
            pair.addParticle([self.sigma_nm[name], self.epsilon_kj_mol[name]])
        for m in range(self.n_dimers):
            pair.addExclusion(2 * m, 2 * m + 1)
        system.addForce(pair)

        n_sites = self.n_dimers + self.n_monomers
        per_side = int(np.ceil(n_sites ** (1 / 3)))
        spacing = self.box_nm / per_side
        grid = np.array([(i, j, k) for i in range(per_side) for j in range(per_side) for k in range(per_side)])
        centres = (grid[:n_sites] + 0.5) * spacing
        positions = []
        for m in range(self.n_dimers):
            half = np.array([self.bond_r0_nm / 2, 0.0, 0.0])
            positions += [centres[m] - half, centres[m] + half]
        positions += list(centres[self.n_dimers:])
        return topology, system, np.array(positions)

    def simulate(self, out_dir: str | Path, n_frames: int = 200, steps_per_frame: int = 50,
                 equilibration_steps: int = 2000, seed: int = 1, kind: str = "cg",
                 temperature_K: float | None = None) -> Path:
        """Langevin MD; writes ``out_dir/frames.h5`` (with forces) and ``out_dir/mapping.json``."""
        import json

        import openmm
        import openmm.unit as unit

        from openmm_cgnn.frames import FrameWriter, TopologyInfo

        temperature = self.temperature_K if temperature_K is None else temperature_K
        topology, system, positions = self.build()
        integrator = openmm.LangevinMiddleIntegrator(temperature, 5.0, 0.005)
        integrator.setRandomNumberSeed(seed)
        context = openmm.Context(system, integrator, get_platform("Reference", check=False))
        context.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(context, 1.0, 200)
        context.setVelocitiesToTemperature(temperature, seed)
        integrator.step(equilibration_steps)

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MAPPING_JSON).write_text(json.dumps(self.mapping_dict(), indent=2))
        info = TopologyInfo.from_openmm(topology, system)
        metadata = {"kind": kind, "temperature_K": temperature, "forcefield": "synthetic shifted-force LJ", "seed": seed}
        with FrameWriter(out / FRAMES_H5, info, metadata, with_forces=True) as writer:
            for k in range(n_frames):
                integrator.step(steps_per_frame)
                state = context.getState(getPositions=True, getForces=True, getEnergy=True)
                writer.append(
                    positions=state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                    box=state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer),
                    time=state.getTime().value_in_unit(unit.picosecond),
                    forces=state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
                    potential_energy=state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                )
        return out
