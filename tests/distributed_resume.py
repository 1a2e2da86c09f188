"""Started by torchrun from test_training_distributed.py: a 2-process run cut after one epoch, then resumed.

Before resuming, rank 0 keeps a copy of the interrupted model directory, which the test resumes
in a single process. Arguments: RUN_DIR OUT_ROOT.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import openmm_cgnn  # noqa: F401  (torch before openmm)
from openmm_cgnn.training import TrainConfig, train
from openmm_cgnn.training.distributed import World

# The settings of test_training_distributed.CLI_SETTINGS, as the library takes them.
SETTINGS = dict(epochs=2, batch_size=4, lr=1e-3, quick=True, device="cpu", validation_fraction=0.17)
MODEL_OPTIONS = {"features": 12}


def main() -> None:
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    # One process group for both calls (torchrun cannot reliably set up a second one).
    torch.distributed.init_process_group("gloo")
    arguments = ([run], run / "mapping.json", out / "cut")
    train(*arguments, TrainConfig(**SETTINGS), MODEL_OPTIONS, show_progress=False, stop_after_epochs=1)
    if World.from_env().is_main:
        shutil.copytree(out / "cut", out / "cut_after_1_epoch")
    train(*arguments, TrainConfig(**SETTINGS), MODEL_OPTIONS, resume=True, show_progress=False)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
