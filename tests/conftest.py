"""Shared fixtures. Tests run offline, on data they generate or on RecBole's bundled ml-100k;
tests that need ../shared/data skip with a reason when it is absent."""

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import recbole_mm  # noqa: E402,F401  (compat + registration, as for a user)
from recbole_mm.data.synthetic import make_planted_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class Interrupted(Exception):
    """What :func:`interrupted_at_epoch` raises in place of a training epoch."""


@contextlib.contextmanager
def interrupted_at_epoch(epoch: int):
    """Inside the block every RecBole trainer raises :class:`Interrupted` on reaching training
    epoch ``epoch``: a run cut off there, its checkpoints left as a crash would leave them."""
    from recbole.trainer import Trainer

    train_epoch = Trainer._train_epoch

    def stop(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == epoch:
            raise Interrupted
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_train_epoch", stop)
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """Inside the block torch runs on ``n`` threads; the count before is restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """The module's tests run on one torch thread (a module names why in its ``pytestmark``)."""
    with torch_threads(1):
        yield


def load_benchmark_script(name):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result_row(label, seed, **columns):
    """A finished run's CSV row as the benchmark worker writes it: made-up cost columns, then ``columns``
    (metrics, or cost values to override)."""
    return {"label": label, "model": label, "seed": seed, "config_hash": "h", "split_hash": "s", "device": "cpu",
            "best_epoch": 1, "epochs_run": 2, "train_s_per_epoch": 1.0, "inference_s": 0.1, "peak_rss_mb": 1.0,
            "peak_cuda_mb": float("nan"), "params": 10, "test_users": 5, **columns}


def planted_paths(root, **planted_args):
    """A planted-signal dataset written under ``root/data`` and the paths a test module's runs share:
    ``{"data_path", "feature_cache_dir", "checkpoint_dir"}``, to merge into a config dict."""
    return {"data_path": make_planted_dataset(root / "data", **planted_args),
            "feature_cache_dir": str(root / "cache"), "checkpoint_dir": str(root / "saved")}


def shared_dataset(name):
    """Path of ../shared/data/<name>, or skip the test with the reason."""
    folder = SHARED_DATA / name
    if not (folder / f"{name}.inter").is_file():
        pytest.skip(f"{folder} is absent (real data lives beside the project checkout only)")
    return folder


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """RecBole writes log/, saved/ and log_tensorboard/ into the working directory; keep each
    test's in its own temporary folder, and keep the feature cache there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECBOLE_MM_DATA", raising=False)


@pytest.fixture
def planted(tmp_path):
    """A small planted-signal dataset: returns (data_root, dataset_name)."""
    root = tmp_path / "data"
    make_planted_dataset(root, name="planted", seed=0)
    return str(root), "planted"


#: the smallest RecBole config that still trains, validates and tests
TINY = {
    "epochs": 1, "train_batch_size": 256, "eval_batch_size": 4096, "embedding_size": 16,
    "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "show_progress": False,
    "state": "WARNING", "seed": 2020, "reproducibility": True, "checkpoint_dir": "saved",
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
}
