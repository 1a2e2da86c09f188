"""Force-matching training of the Hybridgraph CG force field (docs/contracts.md §3).

``train(data_paths, mapping_path, out_dir, TrainConfig(...))`` runs the whole stage; the parts
(data loading and time-block split, the Trainer loop, metrics) are usable on their own.
"""

from .data import TrainingData, TrainingDataError, load_training_data, split_runs, time_block_split
from .pipeline import build_model, train
from .trainer import TrainConfig, Trainer, TrainingError

__all__ = [
    "TrainConfig", "Trainer", "TrainingData", "TrainingDataError", "TrainingError", "build_model",
    "load_training_data", "split_runs", "time_block_split", "train",
]
