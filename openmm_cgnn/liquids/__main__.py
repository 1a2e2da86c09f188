"""Regenerate the converted force field of each shipped liquid from the CL&P files.

    python -m openmm_cgnn.liquids --clandp-dir DIR [--liquid NAME ...]

Each liquid's ``forcefield.dir`` is rewritten by ``openmm_cgnn.aa.convert`` from the z-matrices
its molecules name (``DIR`` must hold them and ``il.ff``). Liquids sharing a directory (none of
the shipped ones do) would overwrite each other, so that is refused.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from . import LiquidError, available_liquids, load_liquid


def main(argv: list[str] | None = None) -> int:
    from ..aa.clandp import ClandpError
    from ..aa.convert import convert

    parser = argparse.ArgumentParser(prog="python -m openmm_cgnn.liquids", description=__doc__.splitlines()[0])
    parser.add_argument("--clandp-dir", required=True, help="directory with il.ff and the liquids' .zmat files")
    parser.add_argument("--liquid", nargs="+", default=None, help="liquids to regenerate (default: all shipped)")
    args = parser.parse_args(argv)
    try:
        liquids = [load_liquid(name) for name in (args.liquid or available_liquids())]
        targets: dict = {}
        for liquid in liquids:
            missing = [m.residue for m in liquid.molecules if not m.zmat]
            if missing:
                raise LiquidError(f"{liquid.path}: molecules {missing} name no zmat; cannot regenerate")
            if liquid.forcefield_dir in targets:
                raise LiquidError(f"{liquid.path}: forcefield.dir is also {targets[liquid.forcefield_dir]}'s")
            targets[liquid.forcefield_dir] = liquid.name
        for liquid in liquids:
            molecules = {m.zmat: m.residue for m in liquid.molecules}
            command = "python -m openmm_cgnn.liquids " + shlex.join(["--clandp-dir", args.clandp_dir,
                                                                      "--liquid", liquid.name])
            for path in convert(args.clandp_dir, liquid.forcefield_dir, molecules, liquid.clandp_forcefield, command):
                print(f"{liquid.name}: {path}")
    except (LiquidError, ClandpError) as exc:
        print(f"python -m openmm_cgnn.liquids: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
