"""Small C kernels for the CPU (``csrc/*.c``): build, cache and load them, and split their work
over torch's threads.

A source is compiled at first use with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``; ``-O3 -march=native``) into a per-user cache (``$RECBOLE_MM_CACHE`` or
``~/.cache/recbole_mm``), keyed by the source, the flags, the compiler and the CPU, and loaded with
``ctypes``. Nothing is built at install time, so ``pip install`` stays as it is; a machine without
a compiler (or where the build fails) keeps the PyTorch code, and :func:`library` says why in one
string. Each kernel has its own switch, ``RECBOLE_MM_<SWITCH>_KERNEL=0`` (``SCAN``, ``DROPOUT``,
``DREAM``, ``SPARSE``), to measure it against the PyTorch code.

Threads: :func:`run_sliced` calls the kernel on ``torch.get_num_threads()`` slices, each in its
own Python thread; ``ctypes`` releases the GIL for the call, so the slices run in parallel without
a second OpenMP runtime beside torch's.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from recbole_mm.files import atomic_write

CSRC = Path(__file__).with_name("csrc")
# -ffast-math lets float sums vectorise; the scan's polynomial exp needs no libm. On x86 gcc
# vectorises with 256-bit registers by default even where AVX-512 exists; 512-bit ones measured
# 1.3x faster here (paper-size scan, fwd+bwd 0.116 s vs 0.150 s, one thread).
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")


def _cache_dir() -> Path:
    root = os.environ.get("RECBOLE_MM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "recbole_mm")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and flags: a binary built with ``-march=native`` runs only where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def library(name: str, switch: str, functions: Tuple[Tuple[str, tuple], ...] = ()) -> Tuple[Optional[ctypes.CDLL], str]:
    """``(library, "")`` when ``csrc/<name>.c`` is built (or cached) and loads, else ``(None, why)``;
    ``RECBOLE_MM_<switch>_KERNEL=0`` keeps it unloaded. ``functions`` are the ``(name, argtypes)``
    of the library's void C functions, declared to ``ctypes`` once here."""
    variable = f"RECBOLE_MM_{switch}_KERNEL"
    if os.environ.get(variable, "1") == "0":
        return None, f"{variable}=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    source_path = CSRC / f"{name}.c"
    source = source_path.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_signature().encode())
    target = _cache_dir() / f"{name}_{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            # build beside the target and rename: concurrent processes never load a half-written file
            with atomic_write(target, suffix=".so") as tmp:
                subprocess.run([compiler, *FLAGS, str(source_path), "-o", str(tmp), "-lm"],
                               capture_output=True, text=True, timeout=120, check=True)
        except subprocess.CalledProcessError as err:
            return None, f"compiling {source_path.name} failed: {err.stderr.strip()[-300:]}"
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"building {source_path.name} failed ({type(err).__name__}: {err})"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return None, f"loading {target} failed ({err})"
    for function, argtypes in functions:
        getattr(lib, function).argtypes = list(argtypes)
        getattr(lib, function).restype = None
    return lib, ""


#: the ``ctypes`` argument types of the kernels' 64-bit sizes and buffer addresses (:func:`ptr`)
I64, ADDRESS = ctypes.c_int64, ctypes.c_void_p


def ptr(x: Optional[torch.Tensor]):
    return None if x is None else x.data_ptr()


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recbole_mm_kernel")


def run_sliced(total: int, work: Callable[[int, int], None], min_slice: int = 1) -> None:
    """Calls ``work(start, stop)`` on up to ``torch.get_num_threads()`` contiguous slices of
    ``range(total)``, none shorter than ``min_slice`` (threads cost more than tiny slices save)."""
    workers = max(1, min(torch.get_num_threads(), total // max(min_slice, 1)))
    if workers == 1:
        work(0, total)
        return
    bounds = [total * i // workers for i in range(workers + 1)]
    for future in [_pool(workers).submit(work, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]:
        future.result()
