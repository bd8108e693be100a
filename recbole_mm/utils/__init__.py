"""Run building blocks below the entry points (quick start, tuning, benchmark): data and model
in RecBole's order, checkpoints, results as plain numbers."""

from recbole_mm.utils.build import build_data, build_data_and_model, plain
from recbole_mm.utils.checkpoint import CheckpointError, load_checkpoint, resume_training, warn_if_features_changed

__all__ = ["build_data", "build_data_and_model", "plain", "CheckpointError", "load_checkpoint", "resume_training",
           "warn_if_features_changed"]
