"""The compiled CPU selective scan (``csrc/selective_scan.c``): load it and call it.

Built and loaded by :mod:`~recbole_mm.model.layers.compiled` (at first use, cached per source and
CPU); a machine without a compiler keeps the PyTorch scan, and :func:`load` says why in one string
that the Mamba layer logs once. ``RECBOLE_MM_SCAN_KERNEL=0`` turns the kernel off (to measure
against the PyTorch scan). Each call covers slices of the batch, one per torch thread.
"""

import ctypes
from typing import Optional, Tuple

import torch

from recbole_mm.model.layers import compiled
from recbole_mm.model.layers.compiled import ptr, run_sliced


_I64, _ADDRESS = ctypes.c_int64, ctypes.c_void_p
_FUNCTIONS = (("scan_forward", (_I64,) * 4 + (_ADDRESS,) * 8),
              ("scan_gradients", (_I64,) * 4 + (_ADDRESS,) * 15))


def load() -> Tuple[Optional[ctypes.CDLL], str]:
    """``(library, "")`` when the kernel is built (or cached) and loads, else ``(None, why)``."""
    return compiled.library("selective_scan", "SCAN", _FUNCTIONS)


def available() -> bool:
    return load()[0] is not None


def _check(*tensors) -> None:
    """The C code reads raw float32 buffers: anything else would be read out of bounds."""
    for x in tensors:
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"the compiled scan takes contiguous float32 CPU tensors, got {x.dtype} on {x.device}"
                             f"{'' if x.is_contiguous() else ' (not contiguous)'}")


def forward(u, delta, A, B, C) -> torch.Tensor:
    """``y_t = C_t h_t`` for contiguous float32 CPU tensors ``u, delta: [b, l, d]``, ``A: [d, n]``,
    ``B, C: [b, l, n]`` (no ``D`` term)."""
    _check(u, delta, A, B, C)
    lib = load()[0]
    batch, length, d = u.shape
    n = A.shape[1]
    A_t = A.t().contiguous()
    y = torch.empty_like(u)

    def work(lo, hi):
        h = torch.empty(n * d)
        lib.scan_forward(hi - lo, length, d, n, ptr(u[lo:hi]), ptr(delta[lo:hi]), ptr(A_t),
                         ptr(B[lo:hi]), ptr(C[lo:hi]), ptr(y[lo:hi]), ptr(h), None)

    run_sliced(batch, work)
    return y


def backward(u, delta, A, B, C, dy):
    """Gradients ``(d_u, d_delta, d_A, d_B, d_C)`` of ``sum(dy * y)`` (same layout as
    :func:`forward`; ``d_u`` without the ``D`` term). Each sequence's states are recomputed just
    before its backward pass (``scan_gradients``), so they are read back from the core's cache."""
    _check(u, delta, A, B, C, dy)
    lib = load()[0]
    batch, length, d = u.shape
    n = A.shape[1]
    A_t = A.t().contiguous()
    d_u, d_delta = torch.empty_like(u), torch.empty_like(delta)
    d_B, d_C = torch.empty_like(B), torch.empty_like(C)
    partial_A = []

    def work(lo, hi):
        d_A_t = torch.zeros(n, d)
        h, g, decay_next = torch.empty(n * d), torch.empty(n * d), torch.empty(n * d)
        states = torch.empty(length * n * d)  # one sequence's, reused for each
        rows = slice(lo, hi)
        lib.scan_gradients(hi - lo, length, d, n, ptr(u[rows]), ptr(delta[rows]), ptr(A_t), ptr(B[rows]),
                           ptr(C[rows]), ptr(dy[rows]), ptr(d_u[rows]), ptr(d_delta[rows]), ptr(d_A_t),
                           ptr(d_B[rows]), ptr(d_C[rows]), ptr(h), ptr(states), ptr(g), ptr(decay_next))
        partial_A.append(d_A_t)

    run_sliced(batch, work)
    return d_u, d_delta, torch.stack(partial_A).sum(0).t(), d_B, d_C
