"""Reading RecBole checkpoints: errors that name the file, resuming a run exactly, and a warning
when the feature files differ from the ones the checkpoint was trained on."""

from logging import getLogger
from pathlib import Path

import torch

from recbole_mm import compat
from recbole_mm.data.features import changed_feature_files, feature_fingerprints


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a RecBole checkpoint."""


def load_checkpoint(path) -> dict:
    """``torch.load`` of a RecBole checkpoint onto the CPU (it pickles its ``Config``, so
    ``weights_only=False``: open only checkpoints you trust), failures naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and EOF errors alike: the file is not a whole checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupted "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a RecBole checkpoint (no config and state_dict)")
    return checkpoint


def warn_if_features_changed(checkpoint: dict, config, path) -> list:
    """Log a warning per feature file whose size or SHA-256 differs from the checkpoint's
    fingerprints (checkpoints written before recbole-mm saved them are not checked)."""
    saved = (checkpoint.get(compat.RESUME_KEY) or {}).get("feature_fingerprints")
    if saved is None:
        return []
    changes = changed_feature_files(saved, feature_fingerprints(config))
    for change in changes:
        getLogger().warning(f"checkpoint {path}: {change}; results will differ from the checkpoint's run")
    return changes


def resume_training(trainer, train_data, path) -> None:
    """RecBole's ``resume_checkpoint`` (model, optimizer, epoch, early-stopping state) plus the
    random generators, scheduler and best result that recbole-mm saves beside them, so that
    ``trainer.fit`` continues as the interrupted run would have. Later best-epoch saves, and the
    final test's ``load_best_model``, go to the best epoch's file beside ``path`` (``path`` itself
    when it is the best epoch's checkpoint, as RecBole's are)."""
    checkpoint = load_checkpoint(path)
    warn_if_features_changed(checkpoint, trainer.config, path)
    trainer.resume_checkpoint(path)
    state = checkpoint.get(compat.RESUME_KEY)
    if state is None:
        getLogger().warning(f"{path}: saved without random generator states; the resumed run continues "
                            "but will not repeat the uninterrupted one exactly")
        return
    compat.restore_resume_state(trainer, train_data, state)
    if state.get("best_model_file"):  # absent from checkpoints saved before recbole-mm recorded it
        best = Path(path).parent / state["best_model_file"]
        if not best.is_file():
            raise CheckpointError(f"{path} continues a run whose best epoch's checkpoint {best.name} is not "
                                  "beside it: the final test loads that file")
        trainer.saved_model_file = str(best)
