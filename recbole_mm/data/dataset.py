"""Multimodal datasets: RecBole's ``Dataset`` / ``SequentialDataset`` plus per-item features.

Format (``docs/design.md`` §data): next to ``<ds>.inter`` / ``<ds>.item`` lies one
``<m>_feat.npy`` per modality ``m`` of the config's ``modalities``, shaped ``(rows of .item,
dim)``; row ``r`` belongs to the ``r``-th data row of ``.item``. After RecBole has filtered and
remapped the data, rows are moved to RecBole's internal item ids (``field2id_token``), so every
model indexes features by item id:

* ``dataset.item_features[m]`` — ``float32 [item_num, dim]``, row 0 (padding) all zeros;
* ``dataset.item_feature_mask[m]`` — ``bool [item_num]``, False for padding, for items that
  have no ``.item`` row (allowed up to ``feature_missing_tolerance``, a fraction of items), and
  for rows marked False in an optional ``<m>_mask.npy`` (one bool per ``.item`` row); masked
  items get zero feature rows.

Bad input raises :class:`FeatureFileError` naming the file, what was expected and what was found.
Nothing is truncated or padded silently.

Config keys: ``modalities`` (list), ``modality_dims`` (optional ``{m: dim}``),
``feature_missing_tolerance`` (default 0), ``text_features`` / ``text_encoder`` (recipes for
modalities computed from ``.item`` text, see :mod:`recbole_mm.data.features`), and
``split_label_field`` (e.g. ``x_label``: use the file's own 0/1/2 = train/valid/test split).
"""

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.utils import ModelType

from recbole_mm.data import cold_start
from recbole_mm.data.features import (DEFAULT_TEXT_ENCODER, cached_text_features, locate_feature_file,
                                      read_atomic_columns, read_npy)
from recbole_mm.data.locate import cache_dir


class FeatureFileError(ValueError):
    """A multimodal feature file (or the dataset around it) is unusable."""


SPLIT_LABELS = {"0": 0, "1": 1, "2": 2}  # MMRec's x_label: train, valid, test


# Pure checks, shared with ``python -m recbole_mm.prepare`` so that a prepared dataset passes the
# loader by construction.
def unique_item_index(tokens, item_file) -> pd.Index:
    """Item tokens in ``.item`` data-row order (feature row r <-> position r); they must be unique."""
    index = pd.Index(tokens)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise FeatureFileError(f"{item_file}: item ids are not unique (e.g. {dup}); "
                               "feature rows would be ambiguous")
    return index


def check_inter_items(inter_items: pd.Index, item_rows: pd.Index, tolerance: float, inter_name: str,
                      item_file) -> pd.Index:
    """The items of ``.inter`` that have no ``.item`` row; an error when they are more than
    ``tolerance`` (a fraction) of the interacted items."""
    unknown = inter_items[item_rows.get_indexer(inter_items) < 0]
    share = len(unknown) / max(len(inter_items), 1)
    if share > tolerance:
        raise FeatureFileError(
            f"{inter_name}: {len(unknown)} of {len(inter_items)} items ({share:.2%}) are not in "
            f"{item_file} (e.g. {unknown[:5].tolist()}); feature_missing_tolerance is {tolerance}. "
            "Add the items to .item (with feature rows) or raise feature_missing_tolerance.")
    return unknown


def check_feature_array(feat, path, n_rows: int, item_file_name: str, modality: str, expected_dim=None) -> np.ndarray:
    """``feat`` (read from ``path``) as float32 after checking its shape against the ``.item`` rows,
    its width against ``expected_dim`` and its values for NaN / Inf."""
    if feat.ndim != 2 or feat.shape[0] != n_rows:
        raise FeatureFileError(
            f"{path}: expected shape ({n_rows}, dim) — one row per data row of {item_file_name} — "
            f"but found {feat.shape}")
    if expected_dim is not None and feat.shape[1] != int(expected_dim):
        raise FeatureFileError(
            f"{path}: modality_dims says '{modality}' is {expected_dim}-d but the file has {feat.shape[1]} columns")
    if not np.issubdtype(feat.dtype, np.floating):
        logging.getLogger(__name__).warning(f"{path}: {feat.dtype} features, read as float32 (features are "
                                            "usually float; check that this is the file you meant)")
    feat = np.asarray(feat, dtype=np.float32)
    bad = ~np.isfinite(feat).all(axis=1)
    if bad.any():
        raise FeatureFileError(
            f"{path}: {int(bad.sum())} rows hold NaN or Inf (first at row {int(np.argmax(bad))})")
    return feat


def check_feature_mask(mask, path, n_rows: int, item_file_name: str) -> np.ndarray:
    """An optional ``<m>_mask.npy``: one bool per ``.item`` row, False = the item has no feature
    (e.g. no image); its feature row is then ignored, whatever it holds."""
    if mask.dtype != bool or mask.shape != (n_rows,):
        raise FeatureFileError(f"{path}: expected a bool array of shape ({n_rows},) — one entry per data row "
                               f"of {item_file_name} — but found {mask.dtype} {mask.shape}")
    return np.asarray(mask)


def load_npy(path, mmap: bool = True) -> np.ndarray:
    """A feature or mask file, any unreadable one a :class:`FeatureFileError` naming it."""
    try:
        return read_npy(path, mmap)
    except ValueError as err:
        raise FeatureFileError(str(err)) from None


def check_interaction_file(config) -> None:
    """Problems in ``<ds>.inter`` that RecBole reports late or not at all, named with the file
    and line: no data rows (RecBole: "Some feat is empty"), a row with more fields than the
    header (RecBole drops the extra ones silently), a sequential model without the time column
    (RecBole fails after loading), a non-numeric value in a ``float`` time column (RecBole names
    neither file nor row)."""
    path = Path(config["data_path"]) / f"{config['dataset']}.inter"
    if config["benchmark_filename"] or not path.is_file():
        return  # pre-split files, or RecBole's own "not found" message
    sep = config["field_separator"] or "\t"
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n\r").split(sep)
        rows = 0
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            rows += 1
            if line.count(sep) >= len(header):
                raise FeatureFileError(f"{path}, line {line_no}: {line.count(sep) + 1} fields but the header has "
                                       f"{len(header)} ({header})")
    if rows == 0:
        raise FeatureFileError(f"{path}: a header and no interactions")
    names = [h.split(":")[0] for h in header]
    time_field = config["TIME_FIELD"]
    load_col = (config["load_col"] or {}).get("inter") if isinstance(config["load_col"], dict) else None
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and time_field and (
            time_field not in names or (load_col is not None and time_field not in load_col)):
        where = f"the header has {names}" if time_field not in names else f"load_col's inter list is {load_col}"
        raise FeatureFileError(f"{path}: {config['model']} is sequential and orders each user's interactions by "
                               f"TIME_FIELD '{time_field}', but {where}")
    if time_field in names and header[names.index(time_field)].endswith(":float"):
        column = pd.read_csv(path, sep=sep, usecols=[names.index(time_field)], dtype=str, keep_default_na=False,
                             quoting=csv.QUOTE_NONE, skip_blank_lines=True, encoding="utf-8").iloc[:, 0]
        bad = pd.to_numeric(column, errors="coerce").isna() & (column != "")
        if bad.any():
            first = int(np.argmax(bad.to_numpy()))
            raise FeatureFileError(f"{path}, data row {first + 1}: {time_field} is {column.iloc[first]!r}, not a "
                                   f"number ({int(bad.sum())} such rows)")


def check_split_labels(label_field: str, values) -> None:
    """MMRec's split column may hold only 0/1/2."""
    unknown = set(values) - set(SPLIT_LABELS)
    if unknown:
        raise FeatureFileError(f"{label_field} must hold only 0/1/2 (train/valid/test); found {unknown}")


class MultimodalMixin:
    """Feature loading and label-based splitting shared by both dataset classes."""

    def _data_processing(self):
        self.modalities = list(self.config["modalities"] or [])
        self._item_rows = self._item_file_rows() if self.modalities else None
        if self.modalities:
            self._check_unknown_items()
        super()._data_processing()
        self.item_features, self.item_feature_mask = {}, {}
        for modality in self.modalities:
            self.item_features[modality], self.item_feature_mask[modality] = self._load_modality(modality)

    @property
    def cache_dir(self) -> Path:
        """A writable folder for files derived from this dataset (models cache their kNN item
        graphs here), as :func:`recbole_mm.data.locate.cache_dir` places it."""
        return cache_dir(self.config)

    # ----------------------------------------------------------------- file access
    @property
    def _item_file(self) -> Path:
        return Path(self.dataset_path) / f"{self.dataset_name}.item"

    def _item_file_rows(self) -> pd.Index:
        """Item tokens in ``.item`` data-row order (feature row r <-> position r)."""
        if not self._item_file.is_file():
            raise FeatureFileError(
                f"{self._item_file}: missing; multimodal features are aligned to the rows of the "
                f".item file, so modalities {self.modalities} need it")
        tokens = read_atomic_columns(self._item_file, [self.iid_field], self.config["field_separator"])[self.iid_field]
        return unique_item_index(tokens, self._item_file)

    def _check_unknown_items(self):
        inter_items = pd.Index(pd.unique(self.inter_feat[self.iid_field].astype(str)))
        tolerance = float(self.config["feature_missing_tolerance"] or 0.0)
        unknown = check_inter_items(inter_items, self._item_rows, tolerance, f"{self.dataset_name}.inter",
                                    self._item_file)
        if len(unknown):
            self.logger.warning(f"{len(unknown)} items of .inter have no .item row: their features are masked")

    def _feature_file(self, modality: str) -> Path:
        name = f"{modality}_feat.npy"
        shipped, cached = Path(self.dataset_path) / name, self.cache_dir / name
        recipes = self.config["text_features"] or {}
        if modality in recipes and not shipped.is_file():
            return cached_text_features(self._item_file, recipes[modality], cached,
                                        self.config["text_encoder"] or DEFAULT_TEXT_ENCODER,
                                        self.config["field_separator"])
        found = locate_feature_file(self.config, modality)
        if found is not None:
            return found
        raise FeatureFileError(
            f"modality '{modality}' is in the config's modalities but there is no {name}: looked for "
            f"{shipped} and {cached}. Provide the file (row r = r-th row of {self._item_file.name}), "
            f"add a text_features recipe for '{modality}', or drop it from modalities.")

    # ----------------------------------------------------------------- alignment
    def _load_modality(self, modality: str):
        path = self._feature_file(modality)
        expected_dim = (self.config["modality_dims"] or {}).get(modality)
        feat = check_feature_array(load_npy(path), path, len(self._item_rows), self._item_file.name,
                                   modality, expected_dim)

        tokens = self.field2id_token[self.iid_field]
        rows = self._item_rows.get_indexer(pd.Index(tokens[1:].astype(str)))  # -1: no .item row
        has_row = rows >= 0
        mask_file = path.with_name(f"{modality}_mask.npy")
        if mask_file.is_file():  # written by `prepare images` for items without an image
            present = check_feature_mask(load_npy(mask_file, mmap=False), mask_file, len(self._item_rows),
                                         self._item_file.name)
            has_row[has_row] = present[rows[has_row]]
        out = torch.zeros(len(tokens), feat.shape[1], dtype=torch.float32)
        out[1:][torch.from_numpy(has_row)] = torch.from_numpy(feat[rows[has_row]])
        mask = torch.zeros(len(tokens), dtype=torch.bool)
        mask[1:] = torch.from_numpy(has_row)
        self.logger.info(f"modality '{modality}': {tuple(feat.shape)} from {path}, "
                         f"{int(mask.sum())}/{len(tokens) - 1} items with features")
        return out, mask

    # ----------------------------------------------------------------- splitting
    def build(self):
        return cold_start.hold_out(self, self._split())

    def _split(self):
        label_field = self.config["split_label_field"]
        if not label_field:
            return super().build()
        if label_field not in self.field2id_token:
            raise FeatureFileError(
                f"split_label_field is '{label_field}' but {self.dataset_name}.inter has no such token column "
                f"loaded (add it to load_col: inter)")
        self._change_feat_format()
        tokens = self.field2id_token[label_field]
        check_split_labels(label_field, tokens[1:])  # tokens[0] is RecBole's padding token
        code = np.array([SPLIT_LABELS.get(str(t), -1) for t in tokens])
        labels = torch.from_numpy(code)[self.inter_feat[label_field]]
        return [self.copy(self.inter_feat[labels == part]) for part in (0, 1, 2)]


class MMGeneralDataset(MultimodalMixin, Dataset):
    """RecBole ``Dataset`` with per-item multimodal features (for general recommenders)."""


class MMSequentialDataset(MultimodalMixin, SequentialDataset):
    """RecBole ``SequentialDataset`` with per-item multimodal features (for sequential
    recommenders). With ``split_label_field`` each augmented sample goes to the part of its
    target interaction."""
