"""`--resume=<checkpoint>`: a run interrupted after its first epoch and resumed from that
checkpoint ends with exactly the metrics of the same run left alone; checkpoints hold feature
fingerprints that warn when the files change (docs/design.md §checkpoints)."""

import glob
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, Interrupted, interrupted_at_epoch
from recbole_mm.quick_start import load_data_and_model, run_recbole

SETTINGS = {
    "BPR": {},
    # FindRec: AdamW + a cosine schedule derived from the optimizer's step count, dropout
    "FindRec": {"modalities": ["image", "text"], "align_dim": 16, "n_heads": 2, "n_experts": 2, "d_state": 4,
                "mamba_backend": "torch", "MAX_ITEM_LIST_LENGTH": 10, "warmup_steps": 3, "dropout_prob": 0.1},
    # MambaRec: dropout on the modality embeddings, DREAM's compiled gate, the eager MMD / InfoNCE gradients
    "MambaRec": {"modalities": ["image", "text"]},
}


def _config(planted, model, folder):
    root, _ = planted
    return {**TINY, **SETTINGS[model], "data_path": root, "epochs": 3, "stopping_step": 10,
            "checkpoint_dir": folder}


@pytest.mark.parametrize("model", ["BPR", "FindRec", "MambaRec"])
def test_resumed_run_equals_uninterrupted_run(planted, model, capsys):
    _, name = planted
    whole = run_recbole(model, name, config_dict=_config(planted, model, "whole"))

    with interrupted_at_epoch(1), pytest.raises(Interrupted):
        run_recbole(model, name, config_dict=_config(planted, model, "cut"))
    (checkpoint,) = glob.glob("cut/*.pth")
    capsys.readouterr()

    resumed = run_recbole(model, name, config_dict=_config(planted, model, "cut"), resume=checkpoint)
    assert resumed == whole  # every metric, to the last digit
    assert {type(v) for v in resumed["test_result"].values()} == {float}  # plain numbers, not np.float64
    start = capsys.readouterr().out
    assert f"checkpoint {Path(checkpoint).resolve()}" in start and "; log " in start


def test_checkpoint_warns_when_a_feature_file_changed(planted, caplog):
    root, name = planted
    run_recbole("BPR", name, config_dict={**TINY, "data_path": root, "modalities": ["image", "text"],
                                          "checkpoint_dir": "fp"})
    (checkpoint,) = glob.glob("fp/*.pth")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_data_and_model(checkpoint)
    assert "changed since the checkpoint" not in caplog.text
    image = f"{root}/{name}/image_feat.npy"
    feat = np.load(image)
    feat[0, 0] += 1.0
    np.save(image, feat)
    with caplog.at_level(logging.WARNING):
        load_data_and_model(checkpoint)
    assert f"{image}: changed since the checkpoint was saved" in caplog.text
