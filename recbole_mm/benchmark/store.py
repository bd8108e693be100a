"""The results CSV: one row per finished run, keyed by ``(model, seed, config_hash)``.

Rows are added as runs finish, so an interrupted or crashed benchmark loses at most the runs in
flight, and a second invocation skips every run whose key is already there. A row whose columns
the file lacks (another metric list) rewrites the file once with the union of the columns.
"""

import contextlib
import csv
import fcntl
from pathlib import Path
from typing import Dict, List, Set, Tuple

from recbole_mm.files import atomic_write

Key = Tuple[str, int, str]


def read_rows(csv_path: Path) -> List[Dict[str, str]]:
    if not Path(csv_path).is_file():
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def finished_keys(csv_path: Path) -> Set[Key]:
    return {(row["model"], int(row["seed"]), row["config_hash"]) for row in read_rows(csv_path)}


def _write_all(csv_path: Path, columns: List[str], rows: List[Dict]):
    # an interruption leaves the old file or the new one
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def _locked(csv_path: Path):
    """Exclusive lock on ``<csv>.lock``: shards of one benchmark (``--shard``) append to one file."""
    with open(f"{csv_path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def append_row(csv_path: Path, row: Dict):
    """Add one run's row (floats keep their exact ``repr``)."""
    csv_path = Path(csv_path)
    with _locked(csv_path):
        _append(csv_path, row)


def _append(csv_path: Path, row: Dict):
    rows = read_rows(csv_path)
    columns = list(rows[0]) if rows else []
    new_columns = [c for c in row if c not in columns]
    if rows and not new_columns:
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns, restval="").writerow(row)
    else:
        _write_all(csv_path, columns + new_columns, rows + [row])
