"""RecBole's own DDP path (``run(nproc=N)``) for recbole-mm's models on CPUs with gloo.

The comparison runs with ``epochs: 0``: both runs then test the same initial weights (rank 0
builds them with the 1-process seed and DDP broadcasts them), so any difference comes from the
distributed evaluation itself — the samplers that split users across ranks, the gathering of
per-rank metrics, the cached full-ranking embeddings and the checkpoint every rank reloads.
Trained runs are not expected to match: DDP shuffles with its own sampler, each rank draws its
own negatives and dropout masks (seed + rank), and batch-level losses (MMD, InfoNCE, IICM) see
half a batch per rank.
"""

import socket

import pytest
import torch

from conftest import TINY
from recbole_mm.quick_start import run

SPLIT = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}
SETTINGS = {
    "MambaRec": {"modalities": ["image", "text"], "embedding_size": 8, "reduction_ratio": 4, "knn_k": 3,
                 "eval_args": SPLIT},
    "FindRec": {"modalities": ["image", "text"], "embedding_size": 8, "align_dim": 8, "n_experts": 2,
                "MAX_ITEM_LIST_LENGTH": 10},
}


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("model", ["MambaRec", "FindRec"])
def test_two_gloo_processes_evaluate_like_one(model, tmp_path):
    try:
        from recbole_mm.registry import get_model

        get_model(model)
    except (ImportError, ValueError, AttributeError) as err:
        pytest.skip(f"{model} is not available yet ({err})")
    from recbole_mm.data.synthetic import make_planted_dataset

    # 60 users: an even split, so DistributedSampler pads no rank with a repeated user
    root = make_planted_dataset(tmp_path / "data", n_users=60, n_items=30, seed=0)
    config = {**TINY, "load_col": None, **SETTINGS[model], "data_path": root, "epochs": 0,
              "eval_batch_size": 16, "metric_decimal_place": 8}
    single = run(model, "planted", config_dict=dict(config))
    double = run(model, "planted", config_dict=dict(config), nproc=2, port=_free_port())
    assert double is not None, "rank 0 puts its result on the queue"
    for key, value in single["test_result"].items():
        assert double["test_result"][key] == pytest.approx(float(value), abs=1e-6), key


def test_config_joins_a_gloo_group_on_cpu(tmp_path):
    from recbole_mm.config import Config

    config = Config(model="BPR", dataset="ml-100k", config_dict={
        "local_rank": 0, "world_size": 1, "nproc": 1, "offset": 0, "ip": "localhost", "port": _free_port(),
        "state": "WARNING", "use_gpu": False})
    try:
        assert torch.distributed.get_backend() == "gloo"
        assert config["device"] == torch.device("cpu") and config["single_spec"] is False
    finally:
        torch.distributed.destroy_process_group()
