"""Reading and writing RecBole atomic files, and writing them so that a run that stops half-way
leaves nothing behind."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pandas as pd

from recbole_mm.data.features import read_atomic_columns


def read_atomic_file(path: Path, sep: str = "\t") -> pd.DataFrame:
    """All columns of an atomic file as strings, named by their typed header (``item_id:token``)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n\r").split(sep)
    frame = read_atomic_columns(path, [h.split(":")[0] for h in header], sep)
    frame.columns = header
    return frame


def write_atomic_file(path: Path, frame: pd.DataFrame, sep: str = "\t") -> None:
    """Write ``frame`` (typed column names, string-like values) as an atomic file. Lines are joined
    by hand: RecBole reads with ``QUOTE_NONE``, so no value may be quoted or escaped."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(sep.join(frame.columns) + "\n")
        for row in frame.astype(str).itertuples(index=False, name=None):
            f.write(sep.join(row) + "\n")


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")


def refuse_overwriting_source(target: Path, source: Path) -> None:
    """An importer must not write its dataset over the folder it reads: replacing ``target`` would
    delete ``source`` (or the folder holding it) once the new folder is renamed into place."""
    target, source = Path(target).resolve(), Path(source).resolve()
    if source == target or target in source.parents:
        raise ValueError(f"the output {target} would replace the source {source}; choose another --out or --name")


def user_mode(mode: int = 0o777) -> int:
    """``mode`` restricted by the process's umask, as ``mkdir`` would create it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def staged_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target`` to write into. When the block ends normally
    the folder replaces ``target`` by a rename; when it raises (an error, Ctrl-C) the folder is
    deleted and ``target`` stays as it was. A process killed outright leaves at most a hidden
    ``.<name>.partial-*`` folder, never a half-written ``target``."""
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    stage.chmod(user_mode())  # mkdtemp's 0700 would become the dataset folder's mode
    try:
        yield stage
        if target.exists():
            old = stage.with_name(stage.name.replace(".partial-", ".old-"))
            os.rename(target, old)
            os.rename(stage, target)
            shutil.rmtree(old)
        else:
            os.rename(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def replace_files(arrays: Dict[Path, np.ndarray]) -> None:
    """Save each array next to its destination, then rename them all into place, so a reader
    never sees a partly written ``.npy``."""
    staged = {}
    try:
        for path, array in arrays.items():
            staged[path] = path.with_name(path.name + ".partial.npy")
            np.save(staged[path], array)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
