"""Each compat fix, with the failure it prevents (docs/design.md §compatibility)."""

import importlib
import pickle
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recbole_mm import compat


def test_numpy_aliases_restored_for_recbole_config(monkeypatch):
    from recbole.config.configurator import Config as RecBoleConfig

    monkeypatch.delattr(np, "float_")
    with pytest.raises(AttributeError):
        RecBoleConfig.compatibility_settings(None)  # what every Config() runs first
    compat.restore_numpy_aliases()
    RecBoleConfig.compatibility_settings(None)
    assert np.float_ is np.float64 and np.unicode_ is np.str_ and np.complex_ is np.complex128


def test_quick_start_imports_without_ray(monkeypatch):
    # pretend ray is missing: `import ray` raises ImportError
    import recbole

    monkeypatch.setattr(recbole, "quick_start", recbole.quick_start)
    for name in [m for m in sys.modules if m.startswith("recbole.quick_start")]:
        monkeypatch.delitem(sys.modules, name)  # monkeypatch puts the real modules back
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(ImportError):
        importlib.import_module("recbole.quick_start.quick_start")
    sys.modules.pop("recbole.quick_start.quick_start", None)

    compat.import_quick_start_without_ray()
    qs = sys.modules["recbole.quick_start.quick_start"]
    assert callable(qs.run_recbole)
    with pytest.raises(ImportError, match=r"recbole-mm\[ray\]"):
        qs.tune.report(ndcg=1.0)
    assert sys.modules.get("ray") is None  # the placeholder did not leak


def test_recbole_checkpoints_load_under_torch_weights_only_default(tmp_path):
    from recbole_mm.config import Config

    config = Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    file = tmp_path / "ckpt.pth"
    torch.save({"config": config, "state_dict": {}}, file)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(file)  # torch >= 2.6 default: weights_only=True
    import recbole.trainer.trainer as rb_trainer

    assert rb_trainer.torch.load(file)["config"]["model"] == "BPR"
    assert rb_trainer.torch.nn is torch.nn  # everything else is torch itself


def test_dok_update_restored(monkeypatch):
    monkeypatch.delattr(sp.dok_matrix, "_update")
    a = sp.dok_matrix((3, 3), dtype=np.float32)
    with pytest.raises(AttributeError):
        a._update({(0, 1): 1.0})
    compat.restore_dok_update()
    a._update({(0, 1): 1.0, (2, 2): 3.0})
    np.testing.assert_array_equal(a.toarray(), [[0, 1, 0], [0, 0, 0], [0, 0, 3]])


def test_apply_applies_every_fix_once(monkeypatch):
    import recbole.trainer.trainer as rb_trainer

    def recbole_loss_line(self, *args):
        return "RecBole's line"

    monkeypatch.setattr(compat, "_APPLIED", False)  # as in a fresh process, before `import recbole_mm`
    monkeypatch.delattr(np, "float_")
    monkeypatch.delattr(sp.dok_matrix, "_update")
    monkeypatch.setattr(rb_trainer, "torch", torch)
    monkeypatch.setattr(rb_trainer, "DistributedDataParallel", torch.nn.parallel.DistributedDataParallel)
    monkeypatch.setattr(rb_trainer.Trainer, "_save_checkpoint", rb_trainer.Trainer._save_checkpoint)
    monkeypatch.setattr(rb_trainer.Trainer, "_generate_train_loss_output", recbole_loss_line)
    monkeypatch.setattr(compat, "_recbole_train_loss_output", None)
    compat.apply()
    assert np.float_ is np.float64 and hasattr(sp.dok_matrix, "_update")
    assert isinstance(rb_trainer.torch, compat._TrustedTorch)
    assert rb_trainer.DistributedDataParallel is compat._recbole_ddp
    assert rb_trainer.Trainer._save_checkpoint is compat._save_checkpoint
    assert rb_trainer.Trainer._generate_train_loss_output is compat._named_train_loss_output
    assert compat._recbole_train_loss_output is recbole_loss_line  # RecBole's own, for unnamed losses
    monkeypatch.delattr(np, "float_")
    compat.apply()  # the second call does nothing
    assert not hasattr(np, "float_")


def test_loss_terms_are_logged_by_name():
    import types

    from recbole.trainer import Trainer

    trainer = types.SimpleNamespace(config={"loss_decimal_place": 3},
                                    model=types.SimpleNamespace(loss_names=("ce", "iicm")))
    line = Trainer._generate_train_loss_output(trainer, 0, 0.0, 1.5, (0.5, 0.25))
    assert "ce" in line and "0.500" in line and "iicm" in line and "0.250" in line and "train_loss" not in line
    trainer.model = types.SimpleNamespace()  # no loss_names: RecBole's own line
    assert "train_loss2" in Trainer._generate_train_loss_output(trainer, 0, 0.0, 1.5, (0.5, 0.25))


def test_registry_changes_nothing_in_recbole():
    import ast
    from pathlib import Path

    from recbole_mm import registry

    tree = ast.parse(Path(registry.__file__).read_text())
    assigned = [node for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign))
                for target in getattr(node, "targets", [getattr(node, "target", None)])
                if isinstance(target, (ast.Attribute, ast.Subscript))]
    calls = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")]
    assert not assigned and not calls, "only recbole_mm.compat changes RecBole's modules"


def test_pinned_versions_recbole_needs():
    import hyperopt
    import pandas

    assert int(pandas.__version__.split(".")[0]) < 3, "RecBole 1.2.1's loaders break on pandas 3"
    assert hyperopt.__version__ == "0.2.5", "RecBole's exhaustive search breaks on hyperopt 0.3"


def test_ddp_wrapper_accepts_cpu_modules_with_sparse_buffers(monkeypatch):
    import socket

    import recbole.trainer.trainer as rb_trainer
    from torch.nn.parallel import DistributedDataParallel

    class Graph(torch.nn.Module):  # MambaRec keeps its normalised graphs as sparse buffers
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("adj", torch.eye(3).to_sparse(), persistent=False)

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://localhost:{port}")
    try:
        with pytest.raises(ValueError, match="device_ids"):  # what RecBole's trainer passes
            DistributedDataParallel(Graph(), device_ids=[0])
        with pytest.raises(RuntimeError, match="sparse"):
            DistributedDataParallel(Graph())
        wrapped = rb_trainer.DistributedDataParallel(Graph(), device_ids=[0])
        assert wrapped.module.adj.is_sparse
    finally:
        torch.distributed.destroy_process_group()


def test_ray_is_imported_only_when_asked(tmp_path):
    import subprocess

    code = "import sys, recbole_mm; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(compat.__file__).rsplit("/recbole_mm/", 1)[0], "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_enable_ray_restores_np_bool8_for_ray_2_6(monkeypatch):
    try:
        import ray  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ray is not installed: {err}")
    qs = sys.modules["recbole.quick_start.quick_start"]
    monkeypatch.setattr(qs, "tune", qs.tune)  # put RecBole's placeholder back afterwards
    monkeypatch.delattr(np, "bool8", raising=False)
    hook = compat.ray_worker_setup_hook()
    hook()  # what each Ray worker runs before it imports ray.tune
    assert np.bool8 is np.bool_
    monkeypatch.delattr(np, "bool8")
    tune = compat.enable_ray()
    assert np.bool8 is np.bool_ and sys.modules["recbole.quick_start.quick_start"].tune is tune


def test_recbole_import_leaves_autograd_anomaly_detection_off(monkeypatch):
    import torch

    # what importing RecBole's sequential models does (sine.py), e.g. on the first get_model call
    for name in [m for m in sys.modules if m.startswith("recbole.model.sequential_recommender")]:
        monkeypatch.delitem(sys.modules, name)
    import recbole.model

    monkeypatch.delattr(recbole.model, "sequential_recommender")
    importlib.import_module("recbole.model.sequential_recommender")
    try:
        assert torch.is_anomaly_enabled()
    finally:
        for name in [m for m in sys.modules if m.startswith("recbole.model.sequential_recommender")]:
            del sys.modules[name]
    compat.disable_recbole_anomaly_detection()
    assert not torch.is_anomaly_enabled()
