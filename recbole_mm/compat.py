"""The one place where recbole-mm adapts RecBole 1.2.1 to today's Python stack (SPEC §5).

RecBole 1.2.1 was written for NumPy 1, PyTorch < 2.6 and SciPy < 1.13. Each fix below names the
breakage it prevents; ``tests/test_compat.py`` shows each failure without the fix. :func:`apply`
runs every fix once; calling it again does nothing. Nothing else in the package patches RecBole
(registration of our models is a separate, explicit step: :mod:`recbole_mm.registry`).

Version pins that need no code: ``pandas<3`` (RecBole's loaders use ``DataFrame`` behaviour
that pandas 3 changed) and ``hyperopt==0.2.5`` (RecBole's exhaustive search uses hyperopt
internals that 0.3 removed) are declared in ``setup.cfg``.
"""

import functools
import importlib
import logging
import sys
import types

import numpy as np

_APPLIED = False

#: NumPy 2 removed these aliases; RecBole's ``Config.compatibility_settings`` reads them on every
#: ``Config(...)`` (``np.float = np.float_`` ...) and its metrics use ``np.float``.
NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}

#: RecBole modules that ``torch.load`` their own checkpoints (which pickle a ``Config``).
#: (``load_data_and_model`` imports torch inside the function; recbole-mm's replacement, bound
#: by the registry, passes ``weights_only=False`` explicitly.)
TORCH_LOAD_MODULES = ("recbole.trainer.trainer",)


def restore_numpy_aliases() -> None:
    """numpy 2: ``np.float_`` / ``np.complex_`` / ``np.unicode_`` are gone -> ``Config()`` raises
    ``AttributeError`` before it does anything. Restore them (they alias the same dtypes)."""
    for name, value in NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def import_quick_start_without_ray() -> None:
    """``recbole.quick_start`` does ``from ray import tune`` at import time although only the
    hyper-tuning objective calls ``tune.report``. With ray missing (or broken, as ray 2.6 is on
    Python 3.11 with numpy 2) RecBole's whole entry point fails to import; with ray working, every
    ``import recbole_mm`` would pay for importing ray (seconds, in every DDP worker too). So import
    it with a placeholder ``ray.tune`` that explains what to install when used, unless ray.tune
    is already imported; :func:`enable_ray` puts the real one in when the Ray Tune backend is
    asked for. The placeholder is removed from ``sys.modules`` again, so no other code sees a
    fake ray."""
    if "recbole.quick_start.quick_start" in sys.modules:
        return
    if sys.modules.get("ray.tune") is not None:  # the caller imported a working ray itself
        importlib.import_module("recbole.quick_start.quick_start")
        return
    reason = "recbole-mm imports ray only for the Ray Tune backend, through recbole_mm.compat.enable_ray()"

    class _MissingTune(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            raise ImportError(
                f"ray.tune.{attr} is unavailable ({reason}). Install the optional extra: "
                "pip install 'recbole-mm[ray]'"
            )

    ray_stub, tune_stub = types.ModuleType("ray"), _MissingTune("ray.tune")
    ray_stub.tune = tune_stub
    saved = {k: sys.modules.get(k) for k in ("ray", "ray.tune")}
    sys.modules.update({"ray": ray_stub, "ray.tune": tune_stub})
    try:
        importlib.import_module("recbole.quick_start.quick_start")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


#: ray 2.6.3 (the newest ray RecBole 1.2.1 accepts: ``ray<=2.6.3``) names ``np.bool8`` in the
#: class bodies of ray.tune's TensorBoard and Aim loggers, so ``import ray.tune`` raises
#: ``AttributeError`` under numpy 2. Restored only by :func:`enable_ray`, never by :func:`apply`.
RAY_NUMPY_ALIASES = {"bool8": np.bool_}


def restore_ray_numpy_aliases() -> None:
    for name, value in RAY_NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def enable_ray():
    """Import the real ``ray.tune`` for the Ray Tune backend and return it; only that backend
    calls this. Restores ``np.bool8`` for ray 2.6.3 and gives RecBole's quick start (imported
    with a placeholder by :func:`import_quick_start_without_ray`) the real ``tune``, so RecBole's
    own ``objective_function`` reports to Ray as well. ``ImportError`` says what to install."""
    restore_ray_numpy_aliases()
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler  # noqa: F401  (fails on some broken installs)
    except Exception as err:
        raise ImportError(f"The Ray Tune backend needs a working ray ({type(err).__name__}: {err}). "
                          "Install the optional extra: pip install 'recbole-mm[ray]'") from err
    import_quick_start_without_ray()
    sys.modules["recbole.quick_start.quick_start"].tune = tune
    return tune


def ray_worker_setup_hook():
    """A ``worker_process_setup_hook`` for ``ray.init``: Ray's worker processes import ray.tune
    (to unpickle a trial) before any recbole-mm code runs, so they need ``np.bool8`` first. The
    hook is a closure, which Ray's cloudpickle ships by value: importing recbole_mm in the worker
    to find it would run :func:`apply` before the alias exists."""
    aliases = dict(RAY_NUMPY_ALIASES)

    def restore_numpy_aliases_for_ray():
        import numpy

        for name, value in aliases.items():
            if name not in numpy.__dict__:
                setattr(numpy, name, value)

    return restore_numpy_aliases_for_ray


class _TrustedTorch(types.ModuleType):
    """``torch`` as seen from RecBole's trainer and quick start: everything is torch itself,
    except that ``load`` defaults to ``weights_only=False``.

    torch >= 2.6 loads with ``weights_only=True`` by default, which refuses RecBole's own
    checkpoints (they pickle the ``Config``, whose YAML loader holds compiled regexes that no
    safe-globals list can admit), so ``trainer.evaluate(load_best_model=True)`` — the end of
    every RecBole run — raises ``UnpicklingError``. Only these modules, which load the files
    they wrote themselves, get the old default; a caller's explicit ``weights_only`` wins.
    """

    def __init__(self, torch_module):
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, attr):
        return getattr(self._torch, attr)

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self._torch.load(*args, **kwargs)


def trust_recbole_checkpoints() -> None:
    import torch

    for name in TORCH_LOAD_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.__dict__.get("torch"), _TrustedTorch):
            module.torch = _TrustedTorch(torch)


def _dok_update(self, data):
    # SciPy's own ``_update`` (removed in 1.13/1.15) was a plain dict update of the storage.
    self._dict.update(data)


def restore_dok_update() -> None:
    """SciPy >= 1.15: ``dok_matrix._update`` is gone; RecBole's LightGCN, NGCF, NCL, GCMC,
    SpectralCF, KGIN and MCCLK build their adjacency with ``A._update(data_dict)`` and raise
    ``AttributeError``. Restore it as the bulk dict update it was."""
    import scipy.sparse as sp

    for cls in {sp.dok_matrix, getattr(sp, "dok_array", sp.dok_matrix)}:
        if not hasattr(cls, "_update"):
            cls._update = _dok_update


def _recbole_ddp(module, *args, device_ids=None, **kwargs):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    sparse = [name for name, buf in module.named_buffers() if buf.layout != torch.strided]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sparse)
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return DistributedDataParallel(module, *args, device_ids=None if on_cpu else device_ids, **kwargs)


def adapt_ddp_wrapper() -> None:
    """RecBole's trainer wraps every model in ``DistributedDataParallel(model,
    device_ids=[local_rank])``, which fails twice for models RecBole 1.2.1 never ran under DDP:

    * on the CPU (gloo, see ``Config._init_device``) torch refuses ``device_ids`` for a CPU module
      (``ValueError: DistributedDataParallel device_ids ... only work with ... GPU modules``):
      dropped for CPU modules;
    * DDP broadcasts every buffer from rank 0, and neither gloo nor nccl broadcasts sparse tensors
      (``RuntimeError: No support for sparse tensors``): graph models keep their normalised
      adjacency as sparse buffers (MambaRec's user-item and kNN graphs). Those are built from the
      data identically on every rank, so DDP is told to leave them alone.
    """
    import recbole.trainer.trainer as rb_trainer

    rb_trainer.DistributedDataParallel = _recbole_ddp


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank0_local_time() -> str:
    from recbole.utils import get_local_time
    import torch.distributed as dist

    stamp = [get_local_time()]
    if _distributed():
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def _save_checkpoint_then_wait(save_checkpoint):
    @functools.wraps(save_checkpoint)
    def wrapper(self, *args, **kwargs):
        save_checkpoint(self, *args, **kwargs)
        if _distributed():
            import torch.distributed as dist

            dist.barrier()

    wrapper.__recbole_mm_synced__ = True
    return wrapper


def sync_ddp_checkpoints() -> None:
    """Under DDP only rank 0 writes the checkpoint, but every rank loads it for the final test
    (``evaluate(load_best_model=True)``). RecBole 1.2.1 (a) names the file after each rank's own
    clock (``<Model>-<local time>.pth``), so ranks that built their trainer a second apart look
    for a file that never exists, and (b) lets the other ranks read it while rank 0 may still be
    writing it (``FileNotFoundError`` or a truncated pickle). Take rank 0's time stamp on every
    rank, and let all ranks wait after each save (every rank calls ``_save_checkpoint`` at the
    same point of ``fit``; ranks other than 0 return from it at once)."""
    import recbole.trainer.trainer as rb_trainer

    rb_trainer.get_local_time = _rank0_local_time
    if not getattr(rb_trainer.Trainer._save_checkpoint, "__recbole_mm_synced__", False):
        rb_trainer.Trainer._save_checkpoint = _save_checkpoint_then_wait(rb_trainer.Trainer._save_checkpoint)


def disable_recbole_anomaly_detection() -> None:
    """``recbole/model/sequential_recommender/sine.py`` calls
    ``torch.autograd.set_detect_anomaly(True)`` at import time, and importing any RecBole
    sequential model imports it: from then on every backward pass of every model checks for
    NaN (measured here: a SASRec epoch on amazon-beauty 835 s with it, see the README for the
    time without). Import the package once, then switch the debugging aid off again."""
    import torch

    importlib.import_module("recbole.model.sequential_recommender")
    torch.autograd.set_detect_anomaly(False)


def apply() -> None:
    """Apply every fix, once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    restore_numpy_aliases()
    restore_dok_update()
    disable_recbole_anomaly_detection()
    import_quick_start_without_ray()
    trust_recbole_checkpoints()
    adapt_ddp_wrapper()
    sync_ddp_checkpoints()
    _APPLIED = True
    logging.getLogger(__name__).debug("recbole-mm compat fixes applied")
