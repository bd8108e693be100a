"""What a benchmark runs: suite entries (a model plus overrides, under a label) x seeds on one
dataset, each run identified by ``(model, seed, config_hash)``.

A suite is a YAML file (``benchmarks/suites/*.yaml``)::

    name: findrec-table2-beauty        # names the summary and plot files
    title: FindRec Table 2, Amazon Beauty
    dataset: amazon-beauty
    seeds: 3
    reference: FindRec                 # label the others are tested against (default: the first)
    config: {topk: [5, 10]}            # overrides for every run
    config_files: []                   # RecBole YAML files for every run
    runs:
      - SASRec                         # a bare model name is its own label
      - {label: "FindRec w/o IICM", model: FindRec, config: {use_iicm: false}}
      - {label: "FindRec (2 layers)", model: FindRec, preset: presets/findrec-over-mm.yaml, config: {n_layers: 2}}
    paper: {source: "...", metrics: {label: {ndcg@10: 0.1027}}}   # optional, shown beside ours
    notes: "..."                       # optional, copied into the summary
    pairs: [["FindRec w/o IICM", "SASRec"]]   # optional, tested one against the other as well

An entry's ``preset`` is a YAML file of overrides (its path relative to the suite's folder), read
into the entry's ``config`` beneath the entry's own keys: one configuration shared by entries of
several suites, where a YAML anchor reaches only within its file. It changes no config hash: the
hash is that of the effective settings.

``--models A B`` on the command line is the suite ``runs: [A, B]`` with no paper numbers.

Precedence of a run's settings, lowest first: the model's and dataset's YAML defaults, the
``config_files``, the suite's ``config``, ``--quick``'s settings (they shrink what the suite
sets), ``--key=value`` flags, the entry's own ``config`` (last, so an ablation switch cannot be
overridden by accident).
"""

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from recbole_mm.config import Config

#: RecBole's default seed; seeds of a benchmark count up from it, and the split is made under it
BASE_SEED = 2020

#: config keys that say where or how verbosely a run happens, not what it computes; left out of
#: the config hash so that they do not invalidate finished runs (the seed is a key of its own)
HASH_IGNORED = frozenset({
    "seed", "state", "show_progress", "checkpoint_dir", "gpu_id", "use_gpu", "local_rank", "nproc",
    "world_size", "offset", "ip", "port", "log_wandb", "wandb_project", "single_spec", "worker",
})
#: keys added after benchmarks had finished runs, left out of the hash at their neutral value, the
#: one that computes what runs from before the key computed (``iicm_share`` off; cold items drawn as
#: negatives, as they were; FindRec's ID stream over the ID embeddings and eq. 4's output; no item ID
#: dropout in the (MM) baselines and FindRec's feature logits; cold items scored by the model itself; MGCN's and MambaRec's loss
#: terms not logged, ``~`` in their YAML, while FindRec's ``false`` has always been hashed; IICM on the views
#: as they are; MGCN's halved side view of a single modality), so such
#: runs keep their key; other values hash as new
HASH_NEUTRAL = {"iicm_share": None, "cold_negatives": True, "id_input": "id", "log_loss_terms": None,
                "output_head": "ffn", "item_id_dropout": 0.0, "cold_item_neighbours": 0,
                "iicm_normalize": False, "iicm_sigma_attached": False, "single_modality_side": "half"}
#: keys that mean nothing unless another key is set: left out of the hash then (``cold_negatives``
#: came after runs without cold items had finished, which keep their key)
HASH_ONLY_WITH = {"cold_negatives": "cold_item_ratio"}
#: evaluation protocol given to every run from the reference entry (unless set for all)
PINNED = ("metrics", "topk", "valid_metric")
#: what every run of one benchmark must share to be compared side by side
SHARED = PINNED + ("eval_args",)


@dataclass(frozen=True)
class Entry:
    """One row of a suite: a model with overrides, shown under ``label``."""

    label: str
    model: str
    config: Dict = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    dataset: str
    entries: List[Entry]
    title: str = ""
    seeds: int = 3
    reference: Optional[str] = None
    config: Dict = field(default_factory=dict)
    config_files: List[str] = field(default_factory=list)
    paper: Optional[Dict] = None
    notes: str = ""
    #: ``(label, against)`` pairs the summary tests besides everything against the reference
    pairs: List[Tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        labels = [e.label for e in self.entries]
        if not labels:
            raise ValueError(f"suite {self.name!r} has no runs")
        if len(set(labels)) != len(labels):
            raise ValueError(f"suite {self.name!r}: labels must be unique, got {labels}")
        self.reference = self.reference or labels[0]
        if self.reference not in labels:
            raise ValueError(f"suite {self.name!r}: reference {self.reference!r} is not one of {labels}")
        self.pairs = [tuple(pair) for pair in self.pairs]
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(labels):
                raise ValueError(f"suite {self.name!r}: a pair is two different labels of {labels}, got {list(pair)}")


_SUITE_KEYS = {"name", "title", "dataset", "seeds", "reference", "config", "config_files", "runs", "paper", "notes",
               "pairs"}


def _entry(item, folder: Path) -> Entry:
    if isinstance(item, str):
        return Entry(item, item)
    unknown = set(item) - {"label", "model", "config", "preset"}
    if "model" not in item or unknown:
        raise ValueError(f"a suite run needs `model` (optional `label`, `config`, `preset`), got {item}")
    config = dict(item.get("config") or {})
    if item.get("preset"):
        preset, label = folder / item["preset"], item.get("label", item["model"])
        if not preset.is_file():
            raise ValueError(f"preset {preset} of run {label!r} not found (a path relative to the suite's folder)")
        settings = yaml.safe_load(preset.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"preset {preset} of run {label!r} is not a YAML mapping of config keys")
        config = {**settings, **config}
    return Entry(item.get("label", item["model"]), item["model"], config)


def load_suite(path) -> Suite:
    """Read a suite YAML file (see the module docstring); errors name the file."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - _SUITE_KEYS
    if unknown or "runs" not in raw:
        raise ValueError(f"{path}: a suite needs `runs`; unknown keys {sorted(unknown)} (allowed: {sorted(_SUITE_KEYS)})")
    return Suite(name=raw.get("name", path.stem), dataset=raw.get("dataset"), entries=[_entry(r, path.parent) for r in raw["runs"]],
                 title=raw.get("title", ""),
                 seeds=raw.get("seeds", 3), reference=raw.get("reference"), config=dict(raw.get("config") or {}),
                 config_files=[str((path.parent / f).resolve()) for f in raw.get("config_files") or []],
                 paper=raw.get("paper"), notes=raw.get("notes", ""), pairs=raw.get("pairs") or [])


@dataclass(frozen=True)
class Run:
    """One training run; everything a worker process needs, JSON-serialisable."""

    label: str
    model: str
    dataset: str
    seed: int
    split_seed: int
    config_files: Tuple[str, ...]
    config: Dict
    config_hash: str = ""

    @property
    def key(self) -> Tuple[str, int, str]:
        return self.model, self.seed, self.config_hash

    @property
    def stem(self) -> str:
        """File-name stem of the run's per-user metrics and log."""
        return f"{self.model}-seed{self.seed}-{self.config_hash}"

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "Run":
        raw = json.loads(text)
        return cls(**{**raw, "config_files": tuple(raw["config_files"])})


@contextlib.contextmanager
def _own_argv():
    """RecBole's ``Config`` reads ``--key=value`` from ``sys.argv``; the benchmark's own flags
    (``--models``, ``--out=...``) must not leak into the runs' configs."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def build_config(run: Run) -> Config:
    """The run's RecBole ``Config`` (recbole-mm's layering), with the run's seed."""
    with _own_argv():
        return Config(model=run.model, dataset=run.dataset, config_file_list=list(run.config_files) or None,
                      config_dict={**run.config, "seed": run.seed})


def config_hash(config: Config, split_seed: int) -> str:
    """12 hex digits of the final config (minus :data:`HASH_IGNORED`, :data:`HASH_NEUTRAL` keys at
    their neutral value and :data:`HASH_ONLY_WITH` keys without their key) and the split seed: a
    run whose effective settings changed in any layer — a YAML default, a file, a flag — is new."""
    final = config.final_config_dict
    settings = {k: v for k, v in final.items()
                if k not in HASH_IGNORED and not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])
                and not (k in HASH_ONLY_WITH and not final.get(HASH_ONLY_WITH[k]))}
    text = json.dumps({"config": settings, "split_seed": split_seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _with_hash(run: Run) -> Tuple[Run, Config]:
    config = build_config(run)
    return Run(**{**run.__dict__, "config_hash": config_hash(config, run.split_seed)}), config


def plan_runs(suite: Suite, split_seed: int = BASE_SEED, overrides: Optional[Dict] = None,
              quick: Optional[Dict] = None) -> List[Run]:
    """Every entry x seed of ``suite``, entry by entry, each with its config hash.

    Models bring their own evaluation defaults (MambaRec: Recall/NDCG@10/20; RecBole: MRR@10
    and others); a side-by-side table needs one protocol, so the reference entry's values of
    :data:`PINNED` are given to every run unless the suite or a flag sets them. Runs that still
    differ in :data:`SHARED` (an entry's own override, or models of different types) are an error.
    """
    base = {**suite.config, **(quick or {}), **(overrides or {})}
    entries = sorted(suite.entries, key=lambda e: e.label != suite.reference)  # the reference first

    reference, hashed = None, {}
    for entry in entries:
        settings = {**{k: reference[k] for k in PINNED if k not in base and reference}, **base, **entry.config}
        run, config = _with_hash(Run(entry.label, entry.model, suite.dataset, BASE_SEED, split_seed,
                                     tuple(suite.config_files), settings))  # the seed is not part of the hash
        reference = reference or config
        differ = [k for k in SHARED if config[k] != reference[k]]
        if differ:
            raise ValueError(f"{entry.label} would be evaluated differently from the reference "
                             f"{suite.reference}: {', '.join(f'{k}={config[k]} vs {reference[k]}' for k in differ)}")
        twin = next((label for label, other in hashed.items() if other.key == run.key), None)
        if twin is not None:  # one run would be reported under two labels
            raise ValueError(f"suite {suite.name!r}: {entry.label!r} runs exactly the configuration of {twin!r}; "
                             "give it a setting that differs or drop it")
        hashed[entry.label] = run
    return [Run(**{**hashed[e.label].__dict__, "seed": seed})
            for e in suite.entries for seed in range(BASE_SEED, BASE_SEED + suite.seeds)]
