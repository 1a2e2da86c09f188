"""``openmm-cgnn import``: an all-atom trajectory with forces from GROMACS or LAMMPS into a run directory.

Examples::

    openmm-cgnn import --topology topol.tpr --trajectory traj.trr --temperature 300 --out runs/gmx \
        --residue-map BMI=BMIM
    openmm-cgnn import --topology system.data --trajectory forces.lammpstrj --units real \
        --temperature 350 --out runs/lmp --residue-map MOL1=BMIM,MOL2=BF4

Writes ``OUT/frames.h5`` (docs/contracts.md section 1), ``OUT/topology.pdb`` and ``OUT/summary.json``;
``map``, ``train`` and ``evaluate`` read it as they read an ``aa`` run. Files are read with
MDAnalysis (``pip install 'openmm_cgnn[import]'``).
"""

from __future__ import annotations

import argparse
import re

from . import CLIError

_MAP_ITEM = re.compile(r"^\s*([^=\s,]+)\s*=\s*([A-Za-z0-9_+\-]+)\s*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True, metavar="FILE",
                        help="GROMACS .tpr/.gro/.pdb (the .tpr has masses and bonds), or a LAMMPS data file")
    parser.add_argument("--trajectory", required=True, metavar="FILE",
                        help="GROMACS .trr with forces, or a LAMMPS dump with columns id, x y z (or xu yu zu ...) and fx fy fz")
    parser.add_argument("--temperature", type=float, required=True, metavar="K",
                        help="temperature of the run in K (neither format records it)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output run directory")
    parser.add_argument("--format", default=None, metavar="gromacs|lammps",
                        help="source program (default: from the trajectory suffix: .trr, or .lammpstrj/.lammpsdump/.dump)")
    parser.add_argument("--units", default=None, metavar="STYLE",
                        help="LAMMPS unit style: real (Å, kcal/mol/Å, fs) or metal (Å, eV/Å, ps); required for LAMMPS")
    parser.add_argument("--residue-map", default=None, metavar="FROM=TO,...",
                        help="rename molecule types; FROM is a residue name (GROMACS), a LAMMPS molecule type MOLk "
                             "(numbered by first appearance; the command lists them) or a formula such as C8H15N2")
    parser.add_argument("--mapping", default=None, metavar="MAPDIR/mapping.json",
                        help="check the imported residues against this mapping; LAMMPS molecule types not named by "
                             "--residue-map take the mapping residue with the same atoms")
    parser.add_argument("--lammps-timestep", type=float, default=None, metavar="DT",
                        help="the LAMMPS timestep in the unit style's time unit (default: LAMMPS's, 1 fs)")
    parser.add_argument("--atom-style", default=None, metavar="'id resid type charge x y z'",
                        help="LAMMPS data file atom style, when not atomic or full")
    parser.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    parser.add_argument("--stop", type=int, default=None, help="stop before this frame (default: the end)")
    parser.add_argument("--stride", type=int, default=1, help="keep every N-th frame (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the import is complete")


def parse_residue_map(text: str | None) -> dict[str, str]:
    """``"BMI=BMIM,MOL2=BF4"`` -> {from: to}; errors name ``--residue-map`` and the bad item."""
    if text is None:
        return {}
    result: dict[str, str] = {}
    for item in text.split(","):
        match = _MAP_ITEM.match(item)
        if not match:
            raise CLIError(f"--residue-map: malformed item {item!r}; expected FROM=TO[,FROM=TO...], e.g. MOL1=BMIM,MOL2=BF4")
        if match.group(1) in result:
            raise CLIError(f"--residue-map: {match.group(1)} is given twice")
        result[match.group(1)] = match.group(2)
    return result


def run(args: argparse.Namespace) -> int:
    from ..aa.importer import TrajectoryImportError, import_trajectory
    from ..frames import FramesError

    residue_map = parse_residue_map(args.residue_map)
    mapping = None
    if args.mapping is not None:
        from ..mapping.spec import CGMapping, MappingError

        try:
            mapping = CGMapping.load(args.mapping)
        except (MappingError, OSError, ValueError) as exc:
            raise CLIError(f"--mapping: {exc}") from None
    try:
        summary = import_trajectory(
            args.topology, args.trajectory, args.out, args.temperature, source=args.format, units=args.units,
            residue_map=residue_map, mapping=mapping, timestep=args.lammps_timestep, atom_style=args.atom_style,
            start=args.start, stop=args.stop, stride=args.stride, overwrite=args.overwrite)
    except (TrajectoryImportError, FramesError) as exc:
        raise CLIError(str(exc)) from None
    print(f"import: wrote {args.out} ({summary['n_frames']} frames, {summary['n_atoms']} atoms, "
          f"{summary['n_molecules']} molecules, {summary['temperature_K']:g} K; units nm, kJ/mol/nm, ps)")
    return 0
