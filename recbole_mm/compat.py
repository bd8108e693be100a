"""The one place where recbole-mm adapts RecBole 1.2.1 to today's Python stack (SPEC §5).

RecBole 1.2.1 was written for NumPy 1, PyTorch < 2.6 and SciPy < 1.13. Each fix below names the
breakage it prevents; ``tests/test_compat.py`` shows each failure without the fix. :func:`apply`
runs every fix once; calling it again does nothing. Nothing else in the package patches RecBole
(registration of our models is a separate, explicit step: :mod:`recbole_mm.registry`).

Version pins that need no code: ``pandas<3`` (RecBole's loaders use ``DataFrame`` behaviour
that pandas 3 changed) and ``hyperopt==0.2.5`` (RecBole's exhaustive search uses hyperopt
internals that 0.3 removed) are declared in ``setup.cfg``.
"""

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
    Python 3.11 with numpy 2) RecBole's whole entry point fails to import. Import it once with a
    placeholder ``ray.tune`` that explains what to install when used; the placeholder is removed
    from ``sys.modules`` again, so no other code sees a fake ray."""
    if "recbole.quick_start.quick_start" in sys.modules:
        return
    try:
        import ray.tune  # noqa: F401  (a working ray needs no help)

        importlib.import_module("recbole.quick_start.quick_start")
        return
    except Exception as err:  # ImportError, or any error a broken ray raises at import
        reason = f"{type(err).__name__}: {err}"
        for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
            del sys.modules[name]

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
    _APPLIED = True
    logging.getLogger(__name__).debug("recbole-mm compat fixes applied")
