"""Write small untrained model directories for tests of the OpenMM and analysis stages.

    python tests/models/make_test_models.py OUTDIR

OUTDIR/liquid/ and OUTDIR/liquid_1overT/ each get checkpoint.pt, hparams.json, prior.json and
model.pt (TorchForce contract, prior included) for the synthetic 8-ion-pair CG liquid of
``openmm_cgnn.testing.cg_models.ionic_liquid``; OUTDIR/*/frames.npz holds its positions and box.
In tests, call ``write_synthetic_model_dir`` directly (a second or two) instead of storing files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from openmm_cgnn.testing.cg_models import write_synthetic_model_dir


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    for name, use_temperature in (("liquid", False), ("liquid_1overT", True)):
        model_dir, cg = write_synthetic_model_dir(out / name, use_temperature=use_temperature)
        np.savez(model_dir / "frames.npz", positions=cg.positions, box=cg.box, bead_type=cg.bead_type,
                 molecule_index=cg.molecule_index, masses=cg.masses)
        print(f"wrote {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
