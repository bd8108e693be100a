"""Conversions into our format (docs/design.md §data): MMRec datasets, and RecBole's Amazon atomic files."""

from pathlib import Path
from typing import Tuple

import numpy as np
import pandas as pd

from recbole_mm.data.dataset import FeatureFileError
from recbole_mm.prepare.atomic import read_atomic_file
from recbole_mm.prepare.tables import ITEM, USER, Tables

#: MMRec column -> our typed column; other MMRec columns are not carried over
MMREC_COLUMNS = {"userID": "user_id:token", "itemID": "item_id:token", "rating": "rating:float",
                 "timestamp": "timestamp:float", "x_label": "x_label:token"}


def _mmrec_item_ids(values: pd.Series, inter_file: Path) -> pd.Series:
    """MMRec item ids are feature row numbers: they must be integers >= 0."""
    ids = pd.to_numeric(values, errors="coerce")
    bad = ids.isna() | (ids < 0) | (ids != ids.round())
    if bad.any():
        raise FeatureFileError(f"{inter_file}: itemID must be a feature row number (an integer >= 0); "
                               f"found {values[bad].iloc[0]!r} on data row {int(np.argmax(bad.to_numpy())) + 1}")
    return ids.astype(np.int64)


def read_mmrec(src: Path, name: str) -> Tables:
    """``src/<name>.inter`` (MMRec header ``userID itemID rating timestamp x_label``, tab-separated,
    no types) and ``src/<m>_feat.npy`` (row i = itemID i) as our tables: ``.item`` lists itemIDs
    0..n-1 in feature-row order, so feature rows are kept as they are; ``x_label`` is kept, so the
    split is MMRec's."""
    inter_file = src / f"{name}.inter"
    if not inter_file.is_file():
        raise FileNotFoundError(f"{inter_file}: missing; an MMRec dataset folder <ds>/ holds <ds>.inter and "
                                "<m>_feat.npy files")
    frame = pd.read_csv(inter_file, sep="\t", dtype=str, keep_default_na=False)
    if not {"userID", "itemID"} <= set(frame.columns):
        raise FeatureFileError(f"{inter_file}: expected MMRec columns {list(MMREC_COLUMNS)} (at least userID and "
                               f"itemID) but the header is {list(frame.columns)}")
    ids = _mmrec_item_ids(frame["itemID"], inter_file)
    frame["itemID"] = ids.astype(str)  # "007" and "7" are the same row
    inter = frame[[c for c in MMREC_COLUMNS if c in frame.columns]].rename(columns=MMREC_COLUMNS)
    features = {p.name[: -len("_feat.npy")]: np.load(p) for p in sorted(src.glob("*_feat.npy"))}
    n_items = len(next(iter(features.values()))) if features else int(ids.max()) + 1
    item = pd.DataFrame({"item_id:token": [str(i) for i in range(n_items)]})
    return Tables(name, inter, item, features)


def k_core(inter: pd.DataFrame, user_col: str, item_col: str, user_k: int, item_k: int) -> pd.DataFrame:
    """The largest part of ``inter`` in which every user has >= ``user_k`` and every item
    >= ``item_k`` interactions. Removing users can push items under the bar and back, so
    filtering repeats until nothing changes."""
    while True:
        user_n = inter[user_col].map(inter[user_col].value_counts())
        item_n = inter[item_col].map(inter[item_col].value_counts())
        keep = (user_n >= user_k) & (item_n >= item_k)
        if keep.all():
            return inter
        inter = inter[keep]


def read_amazon(src: Path, name: str, user_k: int = 5, item_k: int = 5) -> Tuple[Tables, int]:
    """RecBole's Amazon atomic files ``src/<src name>.{inter,item}`` reduced to their k-core, all
    columns kept. Interactions on items without a ``.item`` row are dropped first (they would have
    no text or image); returns the tables and how many were dropped that way."""
    source = Tables(src.name, read_atomic_file(src / f"{src.name}.inter"), read_atomic_file(src / f"{src.name}.item"))
    user_col, item_col = source.column(source.inter, USER).name, source.column(source.inter, ITEM).name
    item_ids = source.column(source.item, ITEM)
    described = source.inter[item_col].isin(set(item_ids))
    inter = k_core(source.inter[described], user_col, item_col, user_k, item_k).reset_index(drop=True)
    item = source.item[item_ids.isin(set(inter[item_col]))].reset_index(drop=True)
    return Tables(name, inter, item), int((~described).sum())
