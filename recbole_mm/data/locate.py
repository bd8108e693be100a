"""Where datasets are found, and where derived files are cached.

Search order for a dataset ``<ds>`` (the first folder holding ``<ds>/<ds>.inter`` wins):

1. ``data_path`` given by the user (config file, config dict or ``--data_path``);
2. the folder in the environment variable ``RECBOLE_MM_DATA``;
3. ``dataset/`` in the working directory (RecBole's default, where users put data);
4. ``dataset/`` of the recbole-mm checkout, when it differs from 3;
5. ``../shared/data/`` next to the working directory or next to the recbole-mm checkout;
6. for ``ml-100k`` only: the copy inside RecBole's wheel (no download needed).

A dataset *view* is another dataset seen through settings: its ``properties/dataset/<ds>.yaml``
names the source with ``view_of: <source>`` and adds what makes it different (e.g. RecBole's
``user_inter_num_interval`` filters). Its folder is made in the cache by :func:`dataset_view`:
links named ``<ds>.inter``, ``<ds>.item``, ... to the source's files, and the feature files
linked as they are, so nothing is copied.

Derived files (text features computed from ``.item``, kNN graphs) go to a writable cache folder
``<cache root>/<ds>/``; the cache root is ``feature_cache_dir`` if set, else ``RECBOLE_MM_DATA``,
else ``dataset/`` in the working directory. ``dataset/`` is git-ignored.
"""

import os
from pathlib import Path
from typing import List, Optional

from recbole_mm.files import atomic_write

ENV_VAR = "RECBOLE_MM_DATA"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset is in none of the searched folders."""


def recbole_example_dir() -> Path:
    import recbole

    return Path(recbole.__file__).resolve().parent / "dataset_example"


def search_roots(user_data_path: Optional[str] = None) -> List[Path]:
    """The folders searched for ``<root>/<ds>/<ds>.inter``, in order, without duplicates."""
    roots = []
    if user_data_path:
        roots.append(Path(user_data_path))
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    cwd = Path.cwd()
    roots += [cwd / "dataset", _PACKAGE_ROOT / "dataset"]
    roots += [cwd.parent / "shared" / "data", _PACKAGE_ROOT.parent / "shared" / "data"]
    unique = []
    for root in roots:
        resolved = root.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def find_dataset(dataset: str, user_data_path: Optional[str] = None) -> Path:
    """Return the folder that holds ``<dataset>.inter`` (see the module docstring for the order)."""
    roots = search_roots(user_data_path)
    for root in roots:
        folder = root / dataset
        if (folder / f"{dataset}.inter").is_file():
            return folder
    example = recbole_example_dir() / dataset
    if (example / f"{dataset}.inter").is_file():
        return example
    looked = "\n".join(f"  - {root / dataset}" for root in roots)
    raise DatasetNotFoundError(
        f"dataset '{dataset}' not found: no {dataset}.inter in any of\n{looked}\n"
        f"Put RecBole atomic files ({dataset}.inter, {dataset}.item, <modality>_feat.npy) in one of "
        f"these folders, pass --data_path=<folder containing {dataset}/>, or set {ENV_VAR}. "
        "`python -m recbole_mm.prepare --help` converts MMRec-format or raw Amazon data."
    )


def cache_root(config=None) -> Path:
    explicit = config["feature_cache_dir"] if config is not None and "feature_cache_dir" in config else None
    return Path(explicit or os.environ.get(ENV_VAR) or Path.cwd() / "dataset")


def cache_dir(config) -> Path:
    """A writable folder for files derived from ``config['dataset']`` (created if needed)."""
    folder = cache_root(config) / config["dataset"]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dataset_view(dataset: str, source_folder: Path, source: str, root: Path) -> Path:
    """``<root>/<dataset>/`` holding links to ``source_folder``'s files, renamed from ``<source>.*``
    to ``<dataset>.*`` (RecBole reads ``<dataset>.inter``); other files keep their names."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(source_folder.iterdir()):
        if not file.is_file():
            continue
        name = dataset + file.name[len(source):] if file.name.startswith(source + ".") else file.name
        link = folder / name
        if link.is_symlink() and link.resolve() == file.resolve():
            continue
        with atomic_write(link) as tmp:  # a concurrent run never sees a missing file
            tmp.symlink_to(file.resolve())
    return folder
