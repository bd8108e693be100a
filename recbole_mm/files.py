"""Writing a file so that concurrent runs never see, or break, each other's half-written copy."""

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_write(target: Union[str, Path], suffix: str = "") -> Iterator[Path]:
    """Yield a fresh path beside ``target`` to write; on leaving the block it replaces ``target`` in
    one rename, and on an error it is removed and ``target`` is left as it was.

    Each writer gets its own name (process id and a random part), so two runs that build one cache
    at once (two seeds of a benchmark on one dataset) each rename a whole file of their own, and a
    reader sees the old file or a whole new one. A shared name let the first rename take the second
    writer's file away from it. The path does not exist yet, so any writer can create it (a symlink
    too); ``suffix`` is for writers that append their own (``numpy.save`` adds ``.npy``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a dot-name: patterns such as ``knn_*.pt`` or ``*.pth`` never match a file in flight
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
