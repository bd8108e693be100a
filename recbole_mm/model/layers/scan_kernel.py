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
from recbole_mm.model.layers.compiled import ADDRESS as _ADDRESS, I64 as _I64, ptr, run_sliced


_FUNCTIONS = (("scan_forward", (_I64, _ADDRESS, _I64, _I64) + (_ADDRESS,) * 7),
              ("scan_gradients", (_I64, _ADDRESS, _I64, _I64) + (_ADDRESS,) * 15))


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


def _layout(u: torch.Tensor, offsets: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """The kernel's row offsets (int64, ``nseq + 1``) and longest sequence: ``offsets`` for packed
    ``[N, d]`` inputs, else those of the padded ``[b, l, d]`` batch."""
    if offsets is None:
        batch, length = u.shape[:2]
        return torch.arange(batch + 1, dtype=torch.int64) * length, length
    if offsets.dtype != torch.int64 or offsets.device.type != "cpu" or int(offsets[-1]) != u.shape[0]:
        raise ValueError(f"offsets must be int64 CPU row offsets ending at the {u.shape[0]} packed rows")
    return offsets.contiguous(), int((offsets[1:] - offsets[:-1]).max())


def forward(u, delta, A, B, C, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y_t = C_t h_t`` for contiguous float32 CPU tensors ``u, delta: [b, l, d]``, ``A: [d, n]``,
    ``B, C: [b, l, n]`` (no ``D`` term); with ``offsets`` (``nseq + 1`` row indices) the inputs are
    packed, ``u, delta: [N, d]``, ``B, C: [N, n]``, sequence ``s`` in rows ``offsets[s]:offsets[s+1]``."""
    _check(u, delta, A, B, C)
    lib = load()[0]
    offsets, _ = _layout(u, offsets)
    d, n = A.shape
    A_t = A.t().contiguous()
    y = torch.empty_like(u)

    def work(lo, hi):
        h = torch.empty(n * d)
        lib.scan_forward(hi - lo, ptr(offsets[lo:]), d, n, ptr(u), ptr(delta), ptr(A_t), ptr(B), ptr(C),
                         ptr(y), ptr(h))

    run_sliced(len(offsets) - 1, work)
    return y


def backward(u, delta, A, B, C, dy, offsets: Optional[torch.Tensor] = None):
    """Gradients ``(d_u, d_delta, d_A, d_B, d_C)`` of ``sum(dy * y)`` (same layouts as
    :func:`forward`; ``d_u`` without the ``D`` term). Each sequence's states are recomputed just
    before its backward pass (``scan_gradients``), so they are read back from the core's cache."""
    _check(u, delta, A, B, C, dy)
    lib = load()[0]
    offsets, longest = _layout(u, offsets)
    d, n = A.shape
    A_t = A.t().contiguous()
    d_u, d_delta = torch.empty_like(u), torch.empty_like(delta)
    d_B, d_C = torch.empty_like(B), torch.empty_like(C)
    partial_A = {}  # each slice's dA, by its first row: summed in row order, whichever finishes first

    def work(lo, hi):
        d_A_t = torch.zeros(n, d)
        h, g, decay_next = torch.empty(n * d), torch.empty(n * d), torch.empty(n * d)
        states = torch.empty(longest * n * d)  # one sequence's, reused for each
        lib.scan_gradients(hi - lo, ptr(offsets[lo:]), d, n, ptr(u), ptr(delta), ptr(A_t), ptr(B), ptr(C),
                           ptr(dy), ptr(d_u), ptr(d_delta), ptr(d_A_t), ptr(d_B), ptr(d_C), ptr(h), ptr(states),
                           ptr(g), ptr(decay_next))
        partial_A[lo] = d_A_t

    run_sliced(len(offsets) - 1, work)
    return d_u, d_delta, torch.stack([partial_A[lo] for lo in sorted(partial_A)]).sum(0).t(), d_B, d_C
