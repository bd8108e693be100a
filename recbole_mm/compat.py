"""The one place where recbole-mm adapts RecBole 1.2.1 to today's Python stack (``docs/design.md`` §compatibility).

RecBole 1.2.1 was written for NumPy 1, PyTorch < 2.6 and SciPy < 1.13. Each fix below names the
breakage it prevents; ``tests/test_compat.py`` shows each failure without the fix. :func:`apply`
runs every fix once; calling it again does nothing. Nothing else in the package changes RecBole's
modules: registering our models into RecBole's entry points (:func:`register_into_recbole`) is
the one other step, also here, called by ``import recbole_mm``.

Version pins that need no code: ``pandas<3`` (RecBole's loaders use ``DataFrame`` behaviour
that pandas 3 changed) and ``hyperopt==0.2.5`` (RecBole's exhaustive search uses hyperopt
internals that 0.3 removed) are declared in ``setup.cfg``.
"""

import contextlib
import functools
import importlib
import logging
import os
import sys
import types

import numpy as np

_APPLIED = False

#: NumPy 2 removed these aliases; RecBole's ``Config.compatibility_settings`` reads them on every
#: ``Config(...)`` (``np.float = np.float_`` ...) and its metrics use ``np.float``. The second line
#: is what that method sets: a process that loads a checkpoint unpickles its Config instead of
#: building one, so without them its first evaluation fails (``no attribute 'float'``).
NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
                 "float": np.float64, "int": np.int_, "complex": np.complex128, "object": np.object_,
                 "str": np.str_, "unicode": np.str_}

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


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    """RecBole's ``Trainer._save_checkpoint`` plus what resuming needs to continue exactly
    (:func:`resume_state`), then, under DDP, a barrier (see :func:`extend_checkpoints`)."""
    import torch
    from recbole.utils import set_color

    if self.config["single_spec"] or self.config["local_rank"] == 0:
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {"config": self.config, "epoch": epoch, "cur_step": self.cur_step,
                 "best_valid_score": self.best_valid_score, "state_dict": self.model.state_dict(),
                 "other_parameter": self.model.other_parameter(), "optimizer": self.optimizer.state_dict(),
                 RESUME_KEY: resume_state(self)}
        torch.save(state, saved_model_file, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


#: the checkpoint entry holding :func:`resume_state`
RESUME_KEY = "recbole_mm"


def resume_state(trainer) -> dict:
    """What RecBole's checkpoint lacks for a resumed run to equal an uninterrupted one: every
    random generator (Python, NumPy, torch, CUDA, the training loader's shuffling generator,
    which RecBole seeds once per loader), the scheduler's state when the trainer keeps one, the
    best validation result, the name of the best epoch's checkpoint file (a checkpoint saved
    after a later epoch, :data:`recbole_mm.benchmark.worker.LAST_CHECKPOINT`, is not the one the
    final test loads), and a fingerprint of each feature file."""
    import random

    import torch

    from recbole_mm.data.features import feature_fingerprints

    train_data = getattr(trainer, "_recbole_mm_train_data", None)
    scheduler = getattr(trainer, "scheduler", None)
    return {
        "python_rng": random.getstate(), "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "train_generator": train_data.generator.get_state() if hasattr(train_data, "generator") else None,
        "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
        # RecBole sets best_valid_result only after saving a new best (cur_step 0 then); a save
        # after any other epoch finds it already set
        "best_valid_result": (getattr(trainer, "_recbole_mm_last_valid_result", None) if trainer.cur_step == 0
                              else trainer.best_valid_result),
        "best_model_file": os.path.basename(trainer.saved_model_file),
        "feature_fingerprints": feature_fingerprints(trainer.config),
    }


def restore_resume_state(trainer, train_data, state: dict) -> None:
    """Put :func:`resume_state` back, right before ``fit`` continues (scheduler state is left to
    trainers that rebuild their schedule in ``fit``, as FindRec's does from AdamW's step counts)."""
    import random

    import torch

    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state["train_generator"] is not None and hasattr(train_data, "generator"):
        train_data.generator.set_state(state["train_generator"])
    scheduler = getattr(trainer, "scheduler", None)
    if state["scheduler"] is not None and hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(state["scheduler"])
    trainer.best_valid_result = state["best_valid_result"]


def _remembering_train_data(fit):
    @functools.wraps(fit)
    def wrapper(self, train_data, *args, **kwargs):
        self._recbole_mm_train_data = train_data
        return fit(self, train_data, *args, **kwargs)

    wrapper.__recbole_mm_wrapped__ = True
    return wrapper


def _remembering_valid_result(valid_epoch):
    @functools.wraps(valid_epoch)
    def wrapper(self, *args, **kwargs):
        valid_score, valid_result = valid_epoch(self, *args, **kwargs)
        self._recbole_mm_last_valid_result = valid_result
        return valid_score, valid_result

    return wrapper


def extend_checkpoints() -> None:
    """RecBole 1.2.1's checkpoints cannot resume a run exactly, and break under DDP:

    * they hold model, optimizer and early-stopping state but no random generator states, so a
      resumed run shuffles and samples differently from an uninterrupted one; the extra state of
      :func:`resume_state` is saved beside RecBole's (the trainer remembers its training loader in
      ``fit`` and the last validation result in ``_valid_epoch`` for it);
    * under DDP only rank 0 writes the checkpoint, but every rank loads it for the final test
      (``evaluate(load_best_model=True)``). RecBole (a) names the file after each rank's own
      clock (``<Model>-<local time>.pth``), so ranks that built their trainer a second apart look
      for a file that never exists, and (b) lets the other ranks read it while rank 0 may still be
      writing it. Every rank takes rank 0's time stamp, and all ranks wait after each save."""
    import recbole.trainer.trainer as rb_trainer

    rb_trainer.get_local_time = _rank0_local_time
    trainer = rb_trainer.Trainer
    trainer._save_checkpoint = _save_checkpoint
    if not getattr(trainer.fit, "__recbole_mm_wrapped__", False):
        trainer.fit = _remembering_train_data(trainer.fit)
        trainer._valid_epoch = _remembering_valid_result(trainer._valid_epoch)


_recbole_train_loss_output = None  # RecBole's own, kept by name_loss_terms


def _named_train_loss_output(self, epoch_idx, s_time, e_time, losses):
    """RecBole's epoch line, with the model's ``loss_names`` instead of ``train_loss1..N``."""
    from recbole.utils import set_color

    names = getattr(self.model, "loss_names", None)
    if not isinstance(losses, tuple) or not names or len(names) != len(losses):
        return _recbole_train_loss_output(self, epoch_idx, s_time, e_time, losses)
    places = self.config["loss_decimal_place"] or 4
    terms = ", ".join(set_color(name, "blue") + f": {loss:.{places}f}" for name, loss in zip(names, losses))
    return (set_color("epoch %d training", "green") + " [" + set_color("time", "blue")
            + ": %.2fs, ") % (epoch_idx, e_time - s_time) + terms + "]"


def name_loss_terms() -> None:
    """RecBole logs a model's tuple of losses as ``train_loss1: ..., train_loss2: ...``; a model
    that names its terms (``loss_names = ("ce", "iicm")``, same order as ``calculate_loss``
    returns them) gets them logged under those names. Models without it keep RecBole's line."""
    import recbole.trainer.trainer as rb_trainer

    global _recbole_train_loss_output
    if rb_trainer.Trainer._generate_train_loss_output is not _named_train_loss_output:
        _recbole_train_loss_output = rb_trainer.Trainer._generate_train_loss_output
        rb_trainer.Trainer._generate_train_loss_output = _named_train_loss_output


def disable_recbole_anomaly_detection() -> None:
    """``recbole/model/sequential_recommender/sine.py`` calls
    ``torch.autograd.set_detect_anomaly(True)`` at import time, and importing any RecBole
    sequential model imports it: from then on every backward pass of every model checks for
    NaN (measured here: a SASRec epoch on amazon-beauty 835 s with it, see the README for the
    time without). Import the package once, then switch the debugging aid off again."""
    import torch

    importlib.import_module("recbole.model.sequential_recommender")
    torch.autograd.set_detect_anomaly(False)


#: FutureWarnings raised inside these packages on RecBole's behalf: RecBole 1.2.1 calls pandas and
#: torch APIs that now warn about their future; nothing a user of recbole-mm can act on
FOREIGN_WARNING_MODULES = r"(recbole|pandas|torch)(\..*)?$"


def silence_foreign_warnings() -> None:
    """Every run printed pandas/torch ``FutureWarning``s that only RecBole's code can act on;
    ignore those raised from RecBole, pandas or torch frames (ours still show)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=FOREIGN_WARNING_MODULES)


@contextlib.contextmanager
def offered_dataset_class(model_name: str, cls):
    """RecBole's ``create_dataset`` picks ``recbole.data.dataset.<Model>Dataset`` when it exists;
    offer ``cls`` there for the duration of one call (keeps RecBole's saved-dataset logic)."""
    import recbole.data.dataset as recbole_datasets

    name = f"{model_name}Dataset"
    previous = recbole_datasets.__dict__.get(name)
    setattr(recbole_datasets, name, cls)
    try:
        yield
    finally:
        if previous is None:
            delattr(recbole_datasets, name)
        else:
            setattr(recbole_datasets, name, previous)


def register_into_recbole(registry, config_class, quick_start) -> None:
    """Let RecBole's own entry points (``recbole.quick_start.run_recbole``, ``run``,
    ``objective_function``, ``load_data_and_model``) run recbole-mm's models; called once by
    ``import recbole_mm`` with :mod:`recbole_mm.registry`, our ``Config`` and our quick start
    (passed in, so this module imports nothing of recbole-mm). It

    1. exposes each model module of ``registry.MODELS`` under RecBole's model namespace
       (``recbole.model.sequential_recommender.findrec``), where ``recbole.utils.get_model`` looks;
    2. adds ``<Model>Dataset`` classes to ``recbole.data.dataset`` and ``<Model>Trainer`` classes
       to ``recbole.trainer`` — RecBole's own per-model extension points;
    3. binds ``Config``, ``create_dataset``, ``get_trainer``, ``run_recboles`` and
       ``load_data_and_model`` in ``recbole.quick_start`` (and ``recbole.config.Config``) to
       recbole-mm's, so RecBole's runs read our YAML defaults, find datasets through our search
       order, load multimodal features, get the large-catalogue trainer hooks, and start DDP
       workers that import recbole-mm. Idempotent."""
    import recbole.config
    import recbole.data.dataset as recbole_datasets
    import recbole.quick_start
    import recbole.trainer

    rb_quick_start = sys.modules["recbole.quick_start.quick_start"]
    for name in registry.MODELS:
        cls = registry.get_model(name)
        package = f"recbole.model.{registry.MODEL_PACKAGES[cls.type]}"
        sys.modules[f"{package}.{name.lower()}"] = sys.modules[cls.__module__]
        setattr(importlib.import_module(package), name, cls)
        setattr(recbole_datasets, f"{name}Dataset", registry.DATASETS[cls.type])
    for name in registry.TRAINERS:
        setattr(recbole.trainer, f"{name}Trainer", registry.get_trainer(None, name))
    recbole.config.Config = config_class
    for module in (rb_quick_start, recbole.quick_start):
        module.load_data_and_model = quick_start.load_data_and_model
        module.run_recboles = quick_start.run_recboles
    rb_quick_start.Config = config_class
    rb_quick_start.create_dataset = registry.create_dataset
    rb_quick_start.get_trainer = registry.get_trainer
    logging.getLogger(__name__).debug(f"recbole-mm registered {list(registry.MODELS)} into RecBole")


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
    extend_checkpoints()
    name_loss_terms()
    silence_foreign_warnings()
    _APPLIED = True
    logging.getLogger(__name__).debug("recbole-mm compat fixes applied")
