"""Strict configuration: known keys on the command line, and values in range.

Two checks, both in this one table-driven module (``docs/design.md`` §config-validation):

* :func:`check_cli_overrides` — every ``--key=value`` of a command line must name a key that
  some configuration file of this run could define: RecBole's own YAML files (``overall.yaml``,
  ``dataset/sample.yaml``, the quick-start files, the model's and the dataset's file), ours
  (``properties/overall.yaml``, ``properties/model/<M>.yaml``, ``properties/dataset/<ds>.yaml``)
  and :data:`RUNTIME_KEYS`. An unknown key is an error listing the nearest known keys;
  ``--free.KEY=value`` passes ``KEY`` on purpose (RecBole's ``Config`` then sees ``--KEY=value``,
  see :meth:`recbole_mm.config.Config._load_cmd_line`). Anything not written ``--key=value``
  (``--epochs 1``) is an error too: RecBole would only warn that it "will not be used".
* :func:`check_values` — run on every ``Config`` once its layers are merged: each key of
  :data:`RULES` (any model), :data:`MODEL_RULES` (one model) or :func:`declared_switches` (keys
  our YAML files declare ``(bool)``: true or false) present with a value other than
  ``None`` must have the type and range the table gives; otherwise :class:`ConfigError` names
  each offending key, its value and the allowed range. ``None`` means "the model's automatic
  choice" wherever a YAML default is ``~``.

Config files and ``config_dict`` may hold keys this run does not use (a shared file for several
models, the benchmark's tiny settings): those are RecBole's to ignore, as they always were.
"""

import logging
import numbers
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from recbole_mm.config.properties import properties_dir
from recbole_mm.evaluation.topk import MODES as TOPK_EVAL_MODES
from recbole_mm.model.general_recommender.mambarec import CL_VIEWS, MMD_INPUTS
from recbole_mm.model.general_recommender.mgcn import REG_EMBEDDINGS
from recbole_mm.model.layers.mamba import BACKENDS as MAMBA_BACKENDS
from recbole_mm.model.layers.multiview import FEATURE_NORMS, SINGLE_MODALITY_SIDES
from recbole_mm.model.loss.stein import ENTROPY_TERMS
from recbole_mm.model.sequential_recommender.findrec import ID_INPUTS, OUTPUT_HEADS
from recbole_mm.names import nearest
from recbole_mm.trainer.findrec_trainer import SCHEDULES

#: prefix of a command-line key passed on purpose although no configuration file knows it
FREE_PREFIX = "free."

#: keys RecBole reads from the command line or ``run(...)`` that no YAML file lists
RUNTIME_KEYS = frozenset({"model", "dataset", "config_files", "nproc", "world_size", "ip", "port", "group_offset",
                          "offset", "local_rank"})


class ConfigError(ValueError):
    """A configuration key is unknown or its value is outside the allowed range."""


@dataclass(frozen=True)
class Rule:
    """An allowed value: ``kind`` is ``int``, ``float``, ``list``, ``str`` or ``bool``; numbers lie in
    ``[low, high]`` (``high_open``: ``[low, high)``; ``low_open``: ``(low, high]``); for lists,
    ``item`` checks every element and ``distinct`` forbids repeats; a string is one of ``choices``."""

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    item: Optional["Rule"] = None
    distinct: bool = False
    choices: Tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind is list:
            inner = f" of {self.item.describe()}" if self.item else ""
            return f"a list{inner}{' without repeats' if self.distinct else ''}"
        name = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{name} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {self.low:g}"
        return name

    def accepts(self, value) -> bool:
        if self.kind is bool:  # a switch: "yes" or 1 would pass as true where a typo was meant
            return isinstance(value, bool)
        if self.kind is str:
            return value in self.choices
        if self.kind is list:
            if not isinstance(value, (list, tuple)):
                return False
            if self.distinct and len(set(map(str, value))) != len(value):
                return False
            return self.item is None or all(self.item.accepts(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


COUNT = Rule(int, low=1)  # sizes, counts, epochs: at least one
NON_NEGATIVE_INT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, low_open=True)
NON_NEGATIVE = Rule(float, low=0)
PROBABILITY = Rule(float, low=0, high=1, high_open=True)  # dropout rates: 1 would drop everything
FRACTION = Rule(float, low=0, high=1)
SWITCH = Rule(bool)
DISTINCT_NAMES = Rule(list, distinct=True)

#: rules for keys of any model (RecBole's and ours): applied whenever the key is set
RULES: Dict[str, Rule] = {
    "epochs": NON_NEGATIVE_INT, "train_batch_size": COUNT, "eval_batch_size": COUNT, "eval_step": NON_NEGATIVE_INT,
    "stopping_step": COUNT, "learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE,
    "embedding_size": COUNT, "hidden_size": COUNT, "inner_size": COUNT, "n_layers": COUNT, "n_heads": COUNT,
    "MAX_ITEM_LIST_LENGTH": COUNT, "topk": Rule(list, item=COUNT, distinct=True),
    "dropout_prob": PROBABILITY, "hidden_dropout_prob": PROBABILITY, "attn_dropout_prob": PROBABILITY,
    "loss_decimal_place": NON_NEGATIVE_INT, "metric_decimal_place": NON_NEGATIVE_INT,
    # recbole-mm's data keys (properties/overall.yaml)
    "modalities": DISTINCT_NAMES, "feature_missing_tolerance": FRACTION,
    "topk_eval": Rule(str, choices=TOPK_EVAL_MODES), "topk_eval_threshold": NON_NEGATIVE,
    "eval_item_block": COUNT, "ce_item_chunk": COUNT,
    "cold_item_ratio": Rule(float, low=0, high=1, low_open=True, high_open=True),
    # sizes and counts of our models, wherever a model uses the name (Mamba blocks, kNN graphs)
    "align_dim": COUNT, "d_state": COUNT, "d_conv": COUNT, "expand": COUNT, "n_experts": COUNT, "knn_k": COUNT,
    "reduction_ratio": COUNT, "n_ui_layers": NON_NEGATIVE_INT, "n_mm_layers": NON_NEGATIVE_INT, "num_layers": COUNT,
    # named choices of our models, the tuples their modules check against: a typo stops the run
    # here, before the data are loaded, rather than when the model is built
    "mamba_backend": Rule(str, choices=MAMBA_BACKENDS), "feature_norm": Rule(str, choices=FEATURE_NORMS),
}
#: MGCN's own keys, which MambaRec (MGCN + DREAM + MMD) shares
_MGCN_RULES = {"cl_weight": NON_NEGATIVE, "cl_temp": POSITIVE, "reg_weight": NON_NEGATIVE,
               "reg_embeddings": Rule(str, choices=REG_EMBEDDINGS),
               "single_modality_side": Rule(str, choices=SINGLE_MODALITY_SIDES)}

#: rules for one model's own keys (``properties/model/<Model>.yaml``)
MODEL_RULES: Dict[str, Dict[str, Rule]] = {
    "FindRec": {
        "iicm_weight": NON_NEGATIVE, "iicm_share": POSITIVE, "entropy_weight": NON_NEGATIVE, "moe_balance_weight": NON_NEGATIVE,
        "iicm_sigma": POSITIVE, "stein_eta": POSITIVE, "warmup_steps": NON_NEGATIVE_INT,
        "id_input": Rule(str, choices=ID_INPUTS), "output_head": Rule(str, choices=OUTPUT_HEADS),
        "iicm_entropy": Rule(str, choices=ENTROPY_TERMS), "lr_schedule": Rule(str, choices=SCHEDULES),
    },
    "MGCN": _MGCN_RULES,
    "MambaRec": {
        **_MGCN_RULES, "modality_dropout": PROBABILITY, "mmd_weight": NON_NEGATIVE,
        "mmd_bandwidth": Rule(list, item=POSITIVE), "dream_att_reduction": COUNT, "dream_branch_channels": COUNT,
        "cl_views": Rule(str, choices=CL_VIEWS), "mmd_input": Rule(str, choices=MMD_INPUTS),
    },
    "FREEDOM": {"mm_image_weight": FRACTION, "edge_dropout": PROBABILITY, "reg_weight": NON_NEGATIVE},
    "VBPR": {"reg_weight": NON_NEGATIVE},
}


#: values that are allowed but rarely meant: a warning says what they do
UNUSUAL: Dict[str, tuple] = {
    "epochs": (COUNT, "nothing is trained: the checkpoint and the test metrics are the initial weights'"),
}


#: a YAML line that declares its key a switch: ``key: false   # (bool) ...``
_SWITCH_LINE = re.compile(r"^([A-Za-z_]\w*):[^#]*#\s*\(bool\)")


@lru_cache(maxsize=None)
def declared_switches(model: str) -> frozenset:
    """Keys that our ``properties/overall.yaml`` or the model's file declares ``(bool)`` in its
    comment: each must be true or false (:data:`SWITCH`), so no list here repeats the YAML."""
    ours = properties_dir()
    keys = set()
    for file in (ours / "overall.yaml", ours / "model" / f"{model}.yaml"):
        if file.is_file():
            keys.update(m.group(1) for m in map(_SWITCH_LINE.match, file.read_text(encoding="utf-8").splitlines()) if m)
    return frozenset(keys)


def check_values(config_dict, model: str) -> None:
    """Raise :class:`ConfigError` listing every key whose value breaks its rule; log a warning
    for each :data:`UNUSUAL` value."""
    rules = {**RULES, **{key: SWITCH for key in declared_switches(model)}, **MODEL_RULES.get(model, {})}
    problems = [f"{key} = {config_dict[key]!r}: expected {rule.describe()}"
                for key, rule in rules.items()
                if config_dict.get(key) is not None and not rule.accepts(config_dict[key])]
    if problems:
        raise ConfigError(f"invalid configuration for {model}:\n  " + "\n  ".join(problems))
    for key, (rule, consequence) in UNUSUAL.items():
        if config_dict.get(key) is not None and not rule.accepts(config_dict[key]):
            logging.getLogger(__name__).warning(f"{key} = {config_dict[key]!r}: {consequence}")


# ----------------------------------------------------------------- known keys


def _yaml_keys(file: Path) -> List[str]:
    if not file.is_file():
        return []
    with open(file, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    return list(loaded)


@lru_cache(maxsize=None)
def known_keys(model: str, dataset: str) -> frozenset:
    """Every key a configuration file of a ``model`` x ``dataset`` run may set (see the module
    docstring)."""
    import recbole

    rb, ours = Path(recbole.__file__).resolve().parent / "properties", properties_dir()
    files = [rb / "overall.yaml", rb / "model" / f"{model}.yaml", rb / "dataset" / "sample.yaml",
             rb / "dataset" / f"{dataset}.yaml", *sorted((rb / "quick_start_config").glob("*.yaml")),
             ours / "overall.yaml", ours / "model" / f"{model}.yaml", ours / "dataset" / f"{dataset}.yaml"]
    return frozenset(RUNTIME_KEYS.union(*(_yaml_keys(f) for f in files)))


def check_cli_overrides(args: Sequence[str], model: Optional[str], dataset: Optional[str],
                        allowed: Iterable[str] = ()) -> Dict[str, str]:
    """``--key=value`` arguments (the ones argparse did not consume) as ``{key: value}`` strings;
    :class:`ConfigError` for an argument of another form or an unknown key. ``allowed``: the
    caller's own extra keys; ``--free.KEY`` passes ``KEY`` unchecked. Without a model and
    dataset (named in a config file instead) only the form is checked."""
    known = None if model is None or dataset is None else known_keys(model, dataset) | set(allowed)
    overrides, problems, args = {}, [], list(args)
    for i, arg in enumerate(args):
        if not arg.startswith("--") or "=" not in arg:
            if arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                problems.append(f"'{arg} {args[i + 1]}': write {arg}={args[i + 1]} (keys and values are joined by '=')")
            elif not (i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]):
                problems.append(f"{arg!r} is not of the form --key=value")
            continue
        key, value = arg[2:].split("=", 1)
        if key.startswith(FREE_PREFIX):
            overrides[key[len(FREE_PREFIX):]] = value
            continue
        if known is not None and key not in known:
            close = nearest(key, known)
            problems.append(f"unknown key --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                       if close else "")
                            + f" (to pass it on purpose: --{FREE_PREFIX}{key}={value})")
            continue
        overrides[key] = value
    if problems:
        raise ConfigError(f"command line{f' of {model} on {dataset}' if known is not None else ''}:\n  "
                          + "\n  ".join(problems))
    return overrides
