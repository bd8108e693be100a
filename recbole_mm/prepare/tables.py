"""A dataset held in memory, the loader's checks run on it, and its statistics."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd

from recbole_mm.data.dataset import (FeatureFileError, check_feature_array, check_feature_mask, check_inter_items,
                                     check_split_labels, unique_item_index)
from recbole_mm.prepare.atomic import read_atomic_file, staged_folder, write_atomic_file

USER, ITEM, LABEL = "user_id", "item_id", "x_label"
#: lower edges of the sequence-length histogram's bins
LENGTH_BINS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class Tables:
    """One dataset: ``.inter`` and ``.item`` frames with typed column names, and per modality a
    feature array (row r = r-th row of ``item``) and optionally a mask (False = no feature)."""

    name: str
    inter: pd.DataFrame
    item: pd.DataFrame
    features: Dict[str, np.ndarray] = field(default_factory=dict)
    masks: Dict[str, np.ndarray] = field(default_factory=dict)

    def has_column(self, frame: pd.DataFrame, name: str) -> bool:
        return any(col.split(":")[0] == name for col in frame.columns)

    def column(self, frame: pd.DataFrame, name: str) -> pd.Series:
        """The column of ``frame`` called ``name`` whatever its type suffix."""
        for col in frame.columns:
            if col.split(":")[0] == name:
                return frame[col]
        part = "inter" if frame is self.inter else "item"
        raise FeatureFileError(f"{self.name}.{part}: no '{name}' column; the header has {list(frame.columns)}")


def load_tables(folder: Path) -> Tables:
    """Read a dataset folder ``<root>/<ds>`` (``<ds>.inter``, ``<ds>.item``, ``*_feat.npy``,
    ``*_mask.npy``)."""
    name = folder.name
    for suffix in ("inter", "item"):
        if not (folder / f"{name}.{suffix}").is_file():
            raise FileNotFoundError(f"{folder / f'{name}.{suffix}'}: missing; a dataset folder <ds>/ holds "
                                    "<ds>.inter and <ds>.item")
    return Tables(name, read_atomic_file(folder / f"{name}.inter"), read_atomic_file(folder / f"{name}.item"),
                  {p.name[: -len("_feat.npy")]: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*_feat.npy"))},
                  {p.name[: -len("_mask.npy")]: np.load(p) for p in sorted(folder.glob("*_mask.npy"))})


def check_tables(tables: Tables, folder: Path, missing_tolerance: float = 0.0) -> None:
    """The loader's checks, as if ``tables`` were written to ``folder``: unique ``.item`` ids,
    ``.inter`` items present in ``.item``, 0/1/2 split labels, and per modality a finite
    ``(rows of .item, dim)`` array and a boolean mask with one entry per ``.item`` row."""
    item_file = folder / f"{tables.name}.item"
    rows = unique_item_index(tables.column(tables.item, ITEM).astype(str), item_file)
    inter_items = pd.Index(pd.unique(tables.column(tables.inter, ITEM).astype(str)))
    check_inter_items(inter_items, rows, missing_tolerance, f"{tables.name}.inter", item_file)
    if tables.has_column(tables.inter, LABEL):
        check_split_labels(LABEL, pd.unique(tables.column(tables.inter, LABEL).astype(str)))
    for modality, feat in tables.features.items():
        check_feature_array(feat, folder / f"{modality}_feat.npy", len(rows), item_file.name, modality)
    for modality, mask in tables.masks.items():
        path = folder / f"{modality}_mask.npy"
        if modality not in tables.features:
            raise FeatureFileError(f"{path}: a mask without {modality}_feat.npy")
        check_feature_mask(mask, path, len(rows), item_file.name)


def write_tables(tables: Tables, target: Path, force: bool = False, missing_tolerance: float = 0.0) -> None:
    """Check ``tables``, then write them as the dataset folder ``target`` all at once (see
    :func:`~recbole_mm.prepare.atomic.staged_folder`)."""
    check_tables(tables, target, missing_tolerance)
    with staged_folder(target, force) as stage:
        write_atomic_file(stage / f"{tables.name}.inter", tables.inter)
        write_atomic_file(stage / f"{tables.name}.item", tables.item)
        for modality, feat in tables.features.items():
            np.save(stage / f"{modality}_feat.npy", feat)
        for modality, mask in tables.masks.items():
            np.save(stage / f"{modality}_mask.npy", mask)


def length_histogram(lengths: pd.Series) -> Dict[str, int]:
    """Users per sequence-length bin (``"5-9": 120``); empty bins are left out."""
    edges = list(LENGTH_BINS) + [np.inf]
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}+" if hi == np.inf else f"{lo}-{hi - 1}"
              for lo, hi in zip(edges[:-1], edges[1:])]
    counts = pd.cut(lengths, edges, right=False, labels=labels).value_counts(sort=False)
    return {label: int(n) for label, n in counts.items() if n}


def dataset_stats(tables: Tables) -> dict:
    users, items = tables.column(tables.inter, USER).astype(str), tables.column(tables.inter, ITEM).astype(str)
    n_users, n_inter_items = users.nunique(), items.nunique()
    item_rows = pd.Index(tables.column(tables.item, ITEM).astype(str))
    lengths = users.value_counts()
    stats = {
        "users": n_users, "items": len(item_rows), "items_in_inter": n_inter_items, "interactions": len(users),
        "density": len(users) / max(n_users * n_inter_items, 1),
        "sequence_length": {"min": int(lengths.min()), "median": float(lengths.median()),
                            "mean": float(lengths.mean()), "max": int(lengths.max()),
                            "histogram": length_histogram(lengths)},
        "modalities": {},
    }
    if tables.has_column(tables.inter, LABEL):
        stats["split"] = tables.column(tables.inter, LABEL).astype(str).value_counts().sort_index().to_dict()
    rows_of_inter_items = item_rows.get_indexer(pd.Index(items.unique()))
    for modality, feat in tables.features.items():
        has = tables.masks.get(modality, np.ones(len(item_rows), dtype=bool))
        covered = (rows_of_inter_items >= 0) & has[np.maximum(rows_of_inter_items, 0)]
        stats["modalities"][modality] = {"dim": int(feat.shape[1]), "dtype": str(feat.dtype),
                                         "items_with_feature": int(has.sum()),
                                         "inter_items_with_feature": int(covered.sum())}
    return stats


def format_stats(stats: dict) -> str:
    seq = stats["sequence_length"]
    lines = [f"users {stats['users']:,}  items {stats['items']:,} ({stats['items_in_inter']:,} in .inter)  "
             f"interactions {stats['interactions']:,}  density {stats['density']:.6f}",
             f"interactions per user: min {seq['min']}  median {seq['median']:g}  mean {seq['mean']:.2f}  "
             f"max {seq['max']}"]
    width = max(seq["histogram"].values())
    lines += [f"  {label:>9} {n:>8,} {'#' * max(1, round(40 * n / width))}" for label, n in seq["histogram"].items()]
    if "split" in stats:
        lines.append("split (x_label): " + "  ".join(f"{k}: {v:,}" for k, v in stats["split"].items()))
    for modality, m in stats["modalities"].items():
        lines.append(f"{modality}: {m['dim']}-d {m['dtype']}, features for "
                     f"{m['items_with_feature']:,}/{stats['items']:,} items, "
                     f"{m['inter_items_with_feature']:,}/{stats['items_in_inter']:,} interacted items")
    return "\n".join(lines)
