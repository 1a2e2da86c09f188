"""Write reference.json: the bonded terms the CL&P authors' fftool assigns to each CL&P molecule.

Not run by the tests: it needs a checkout of fftool (https://github.com/paduagroup/fftool, MIT licence)::

    python tests/data/clandp_fftool/make_reference.py /path/to/fftool/fftool data/clandp

It loads fftool as a module, builds each molecule from its z-matrix as ``fftool`` does (``mol``:
geometry, bonds, angles, dihedrals, impropers, il.ff parameters, fftool's own warnings) and keeps
what fftool decided: atom classes, coordinates (Angstrom), and every term with its atoms and
parameters in il.ff units (Angstrom, degrees, kJ/mol). tests/test_aa_clandp.py compares the
converter's OpenMM System with these numbers.
"""

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

# The ions of the converter's tests: imidazolium with permuted impropers, automatic impropers
# (acetate, trifluoroacetate, tosylate, guanidinium, butylpyridinium), linear or dropped angles
# (thiocyanate, dca, PF6), z-matrices with unnumbered lines (SCN, guanidinium, phenylacetate).
MOLECULES = ["c1c1im", "c2c1im", "c4c1im", "c6c1im", "c2im", "c4pyri", "BF4", "PF6", "ntf2", "oac", "tfa",
             "tso", "otf", "dca", "SCN", "gua", "phoac", "fsi", "c1c1pyrr", "N1111", "c1SO4"]


def main(fftool_path: str, clandp_dir: str) -> None:
    loader = importlib.machinery.SourceFileLoader("fftool", fftool_path)
    spec = importlib.util.spec_from_loader("fftool", loader)
    fftool = importlib.util.module_from_spec(spec)
    loader.exec_module(fftool)
    commit = subprocess.run(["git", "-C", str(Path(fftool_path).parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = {"source": f"fftool {commit}, mol(zmat) after setff; il.ff units (Angstrom, degrees, kJ/mol)",
           "molecules": {}}
    here = Path.cwd()
    try:
        os.chdir(clandp_dir)  # fftool opens the force-field file named in the z-matrix
        for name in MOLECULES:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                m = fftool.mol(f"{name}.zmat", True, None)
            r = lambda x: round(x, 6)  # noqa: E731
            out["molecules"][name] = {
                "classes": [a.type for a in m.atom],
                "xyz": [[r(a.x), r(a.y), r(a.z)] for a in m.atom],
                "bonds": [[b.i, b.j, b.pot, *b.par] for b in m.bond],
                "angles": [[a.i, a.j, a.k, *a.par] for a in m.angle],
                "dihedrals": [[d.i, d.j, d.k, d.l, *d.par] for d in m.dihed],
                "impropers": [[d.i, d.j, d.k, d.l, *d.par] for d in m.dimpr],
                "fftool_log": log.getvalue().splitlines(),
            }
    finally:
        os.chdir(here)
    path = Path(__file__).with_name("reference.json")
    text = json.dumps(out, indent=None, separators=(",", ":"))
    path.write_text(text.replace('},"', '},\n"') + "\n")
    print(path, len(text), "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
