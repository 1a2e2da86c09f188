"""The file names of the contract between stages (docs/contracts.md): one definition each.

Every stage names the files it writes and reads through these constants, never through literals,
so a reader finds all users of a file with one search and a rename is one line. The sections
are those of docs/contracts.md.
"""

from __future__ import annotations

# 0. Every output directory (openmm_cgnn.io).
MARKER = ".openmm_cgnn_run.json"  # the stage's marker: kind, stage, format
CHECKSUM_SUFFIX = ".sha256"  # beside each checkpoint: size and SHA-256 of it (and of the previous one)

# 1. Run directories, AA and CG.
FRAMES_H5 = "frames.h5"  # the frames file (openmm_cgnn.frames)
TOPOLOGY_PDB = "topology.pdb"
TRAJECTORY_DCD = "trajectory.dcd"  # derived from frames.h5, for mdtraj and VMD
SUMMARY_JSON = "summary.json"  # written when a run ends (or fails); a multi-temperature AA run's index
CHECKPOINT_CHK = "checkpoint.chk"  # OpenMM checkpoint of a resumable AA or CG run
# AA runs only.
RUN_JSON = "run.json"  # the settings of a multi-temperature AA run (what --resume must match)
NPT_DENSITY_CSV = "npt_density.csv"  # every NPT volume sample
NPT_JSON = "npt.json"  # written when NPT ends: its density and error, what a rho(T) fit reads
# CG runs only (section 4).
STATE_CSV = "state.csv"  # OpenMM StateDataReporter output
CHECKPOINT_JSON = "checkpoint.json"  # settings and progress beside checkpoint.chk

# 2. Mapping directory.
MAPPING_JSON = "mapping.json"  # also copied into model and export directories
MAPPING_REPORT_JSON = "mapping_report.json"

# 3. Model directory.
CHECKPOINT_PT = "checkpoint.pt"  # training checkpoint: hparams, weights, prior, optimiser
HPARAMS_JSON = "hparams.json"
PRIOR_JSON = "prior.json"  # also in export directories
METRICS_JSON = "metrics.json"  # also in report directories (section 5)
MODEL_PT = "model.pt"  # TorchScript (also in export directories)
LOSS_CURVE_PNG = "loss_curve.png"
REFINE_JSON = "refine.json"  # a refined model directory only (`openmm-cgnn refine`): every round's bonded TVs

# Export directory (section 4, `openmm-cgnn export`).
SYSTEM_XML = "system.xml"
CG_PDB = "cg.pdb"
METADATA_JSON = "metadata.json"
README_MD = "README.md"

# 5. Report directory.
REPORT_MD = "report.md"

# 6. Converted force-field directory (openmm_cgnn.aa.convert).
FORCEFIELD_XML = "forcefield.xml"
