"""Mamba sequence layers for FindRec, with a CUDA and a pure-PyTorch backend.

Reference: A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv 2312.00752); the block layout is FindRec's (KDD'25, sec. 2.1).

:class:`Mamba` is the selective-SSM mixer. It owns exactly the parameters of
``mamba_ssm.Mamba`` (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``, same shapes and initialisation), so a checkpoint moves between backends; the
backend only decides who runs the selective scan:

- ``cuda``: mamba-ssm's fused CUDA kernel ``selective_scan_fn``.
- ``torch``: :func:`selective_scan`, a step loop in plain PyTorch with a hand-written
  backward pass (any device).
- ``auto``: ``cuda`` when mamba-ssm imports and the input lies on a CUDA device, else ``torch``.
  It is resolved at the first forward call (RecBole builds models on the CPU and moves them
  afterwards) and one log line says which backend runs.

Asking for ``cuda`` when it cannot run raises :class:`MambaBackendError` with the reason.
``mamba_ssm`` is imported only inside :func:`_import_selective_scan_cuda`: its modules import
the compiled ``selective_scan_cuda`` unconditionally, so the import fails on machines without
CUDA even when the package is installed.
"""

import functools
import logging
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_mm.model.layers import scan_kernel
from recbole_mm.model.layers.blocks import row_blocks
from recbole_mm.model.layers.dropout import Dropout
from recbole_mm.model.layers.packing import Packing

BACKENDS = ("auto", "cuda", "torch")

_logged_backend_lines = set()


class MambaBackendError(RuntimeError):
    """``mamba_backend: cuda`` was asked for where mamba-ssm's CUDA kernels cannot run."""


@functools.lru_cache(maxsize=None)
def _import_selective_scan_cuda() -> Tuple[Optional[Callable], str]:
    """``(selective_scan_fn, "")`` when mamba-ssm imports, else ``(None, why)``."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or OSError/RuntimeError from the compiled extension
        return None, f"mamba_ssm cannot be imported ({type(err).__name__}: {err})"
    return selective_scan_fn, ""


def _torch_scan_name(x: torch.Tensor) -> str:
    """Which scan the torch backend runs on ``x``, and why not the compiled one, for the log."""
    if kernel_runs_on(x):
        return "selective scan compiled for this CPU"
    why = scan_kernel.load()[1] or f"{x.dtype} on {x.device}"
    return f"PyTorch step-loop selective scan; compiled CPU scan not used: {why}"


def _log_backend_once(line: str) -> None:
    if line not in _logged_backend_lines:
        _logged_backend_lines.add(line)
        logging.getLogger().info(line)


# Elements of one [l, b_chunk, d, n] block the scan works on at a time, per torch thread
# (row_blocks): ~2 MB of float32, the size of this project's CPU's per-core L2 cache. Measured (1
# thread, batch 128, d_state 16): at length 50, d_inner 512 chunks of 1-2 sequences were fastest, at
# d_inner 128 chunks of 4.
_SCAN_BLOCK_ELEMENTS = 2 ** 19


def _scan_states(u_t, delta_t, A, B_t):
    """Time-major ``[l, b, d, n]`` discretised decay ``exp(delta A)`` and states ``h``."""
    decay = torch.exp(delta_t.unsqueeze(-1) * A)  # ZOH discretisation of A
    states = (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(2)  # Euler step delta B u, then h_t
    for t in range(1, states.shape[0]):
        states[t].addcmul_(decay[t], states[t - 1])
    return decay, states


class _SelectiveScan(torch.autograd.Function):
    """The selective scan with a hand-written backward pass (equations in :func:`selective_scan`).

    Autograd through a Python step loop records several nodes per step and keeps every
    ``[b, l, d, n]`` intermediate in memory. Here the batch is cut into chunks whose
    ``[l, chunk, d, n]`` blocks stay in cache; the forward pass keeps only the inputs, and the
    backward pass recomputes a chunk's states, runs the adjoint recurrence
    ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` and takes every gradient from ``g`` and ``h``.
    The recomputation costs less than writing the states to memory and reading them back, and
    peak memory no longer grows with ``d_inner * d_state``. Internals are time-major so that each
    step of the two loops is one contiguous block.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, use_kernel, offsets):
        ctx.use_kernel, ctx.offsets = use_kernel, offsets
        ctx.save_for_backward(u, delta, A, B, C, D)
        if use_kernel:
            return scan_kernel.forward(*(x.contiguous() for x in (u, delta, A, B, C)), offsets=offsets) + u * D
        u_t, delta_t, B_t, C_t = (x.transpose(0, 1).contiguous() for x in (u, delta, B, C))
        y = torch.empty_like(u_t)
        for rows in _batch_blocks(u_t.shape, A.shape[1], u.device):
            states = _scan_states(u_t[:, rows], delta_t[:, rows], A, B_t[:, rows])[1]
            torch.matmul(states, C_t[:, rows].unsqueeze(-1), out=y[:, rows].unsqueeze(-1))
        return y.transpose(0, 1) + u * D

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, delta, A, B, C, D = ctx.saved_tensors
        d_D = (dy * u).reshape(-1, u.shape[-1]).sum(0)
        if ctx.use_kernel:
            d_u, d_delta, d_A, d_B, d_C = scan_kernel.backward(*(x.contiguous() for x in (u, delta, A, B, C, dy)),
                                                               offsets=ctx.offsets)
            return d_u.addcmul_(dy, D), d_delta, d_A, d_B, d_C, d_D, None, None
        u_t, delta_t, B_t, C_t, dy_t = (x.transpose(0, 1).contiguous() for x in (u, delta, B, C, dy))
        d_u, d_delta, d_B, d_C = (torch.empty_like(x) for x in (u_t, delta_t, B_t, C_t))
        d_A = torch.zeros_like(A)
        for rows in _batch_blocks(u_t.shape, A.shape[1], u.device):
            uc, dc, Bc, Cc, dyc = u_t[:, rows], delta_t[:, rows], B_t[:, rows], C_t[:, rows], dy_t[:, rows]
            decay, states = _scan_states(uc, dc, A, Bc)
            g = dyc.unsqueeze(-1) * Cc.unsqueeze(2)  # dL/dh_t, accumulated from the last step back
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            torch.matmul(dyc.unsqueeze(-2), states, out=d_C[:, rows].unsqueeze(-2))
            torch.matmul((dc * uc).unsqueeze(-2), g, out=d_B[:, rows].unsqueeze(-2))
            d_du = (g @ Bc.unsqueeze(-1)).squeeze(-1)  # dL/d(delta u)
            torch.mul(d_du, dc, out=d_u[:, rows])
            torch.mul(d_du, uc, out=d_delta[:, rows])
            # dL/d(delta A)_t = g_t * h_{t-1} * exp(delta_t A), zero at t = 0 (h_{-1} = 0); g is
            # not needed any more, so it is overwritten
            d_dA = g[1:].mul_(states[:-1]).mul_(decay[1:])
            d_A += (d_dA * dc[1:].unsqueeze(-1)).sum((0, 1))
            d_delta[1:, rows] += d_dA.mul_(A).sum(-1)
        d_u.addcmul_(dy_t, D)
        return (d_u.transpose(0, 1), d_delta.transpose(0, 1), d_A, d_B.transpose(0, 1),
                d_C.transpose(0, 1), d_D, None, None)


def _batch_blocks(shape, d_state, device):
    """Slices of the batch axis of a time-major ``[l, b, d]`` tensor, each about
    ``_SCAN_BLOCK_ELEMENTS`` elements once expanded by ``d_state``."""
    length, batch, d_inner = shape
    return row_blocks(batch, length * d_inner * d_state, _SCAN_BLOCK_ELEMENTS, device)


def kernel_runs_on(x: torch.Tensor) -> bool:
    """Whether the compiled CPU scan (:mod:`~recbole_mm.model.layers.scan_kernel`) takes ``x``:
    float32 on a CPU, and the kernel built on this machine."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and scan_kernel.available()


def selective_scan(u, delta, A, B, C, D, kernel: Optional[bool] = None, packing: Optional[Packing] = None):
    """Selective scan ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``.

    Shapes: ``u, delta: [b, l, d]`` (``delta`` after softplus), ``A: [d, n]`` (negative),
    ``B, C: [b, l, n]``, ``D: [d]``; returns ``y: [b, l, d]`` (before the ``silu(z)`` gate). With
    ``packing`` (:class:`~recbole_mm.model.layers.packing.Packing`) ``u, delta, B, C`` and ``y`` are
    packed rows ``[N, .]``: the kernel scans each sequence at its own length; the step loop runs on
    the padded batch, unpacked and packed again.

    ``kernel`` (default: :func:`kernel_runs_on`) runs the compiled CPU kernel of
    :mod:`~recbole_mm.model.layers.scan_kernel`; otherwise a step loop over time with a
    hand-written backward on cache-sized batch chunks (:class:`_SelectiveScan`), which is the
    reference the kernel is tested against and the path on GPUs without mamba-ssm and in float64.

    The step loop, before the kernel existed Measured on this project's 2-core CPU machine (torch 2.13, one
    thread, the other core busy with another job), forward + backward of one scan at FindRec's
    paper size (batch 128, length 50, ``d_inner`` 512, ``d_state`` 16):

    ==============================================================  ============
    scan                                                            seconds
    ==============================================================  ============
    this one (chunks of the batch, states recomputed in backward)   0.65-0.87
    the same backward on the whole batch, states kept               0.70-0.96
    the step loop under autograd (one node per step, states kept)   1.5-2.4
    ==============================================================  ============

    Inside a whole FindRec training step (paper dimensions, 3 streams x 2 layers, one thread) the
    chunked scan took 5.9-7.3 s against 12.8 s unchunked (memory traffic of the kept states), and
    3.9-4.3 s with the scan replaced by a trivial stand-in. Earlier measurements (2 mixers,
    ``d_inner`` 128, batch 256, lightly loaded) ranked the autograd loop (2.2 s at L = 50) ahead
    of ``mambapy``'s Blelloch parallel scan (4.0 s), a log-depth doubling scan (11.3 s) and a
    chunked doubling scan (9.1 s): on a CPU the extra work of a parallel scan costs more than the
    sequential steps it removes. ``benchmarks/findrec_speed.py`` re-measures against ``mambapy``.
    """
    # under autocast (RecBole's enable_amp: bfloat16 on a CPU) the projections arrive in bfloat16
    # while the conv path is float32; the recurrence runs in float32, as mamba-ssm's kernels do
    # (float64 stays float64); the casts are autograd ops, so gradients return in each input's dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C, D = (x.to(dtype) for x in (u, delta, A, B, C, D))
    if kernel is None:
        kernel = kernel_runs_on(u)
    elif kernel and not kernel_runs_on(u):
        raise RuntimeError(f"the compiled scan takes float32 CPU tensors and a built kernel "
                           f"({scan_kernel.load()[1] or f'got {u.dtype} on {u.device}'})")
    if packing is not None and not kernel:
        u, delta, B, C = (packing.unpack(x) for x in (u, delta, B, C))
        return packing.pack(_SelectiveScan.apply(u, delta, A, B, C, D, False, None))
    return _SelectiveScan.apply(u, delta, A, B, C, D, kernel, None if packing is None else packing.offsets)


def selective_scan_reference(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
    """Plain step-by-step recurrence in mamba-ssm's ``selective_scan_ref`` layout, for tests.

    ``u, delta, z: [b, d, l]``, ``A: [d, n]``, ``B, C: [b, n, l]``, ``D: [d]``. Computes each
    step's discretisation on its own and accumulates the output with explicit sums.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # [b, d, 1]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    y = torch.stack(ys, dim=-1)
    return y if z is None else y * F.silu(z)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          packing: Optional[Packing] = None) -> torch.Tensor:
    """``conv1d`` of ``mamba_ssm.Mamba`` (depthwise, width ``k``, left-padded so output ``t`` sees
    inputs ``t-k+1..t``) on ``x: [b, l, d]`` with ``weight: [d, 1, k]``, ``bias: [d]``; with
    ``packing``, on packed rows ``x: [N, d]``, where a row ``s < k`` positions into its sequence
    sees zeros, not the previous sequence, ``s`` rows back.

    Written as ``k`` shifted multiply-adds in the ``[b, l, d]`` layout: on a CPU that costs less
    than a depthwise ``nn.Conv1d`` and its backward plus the two transposes around it."""
    length, width = x.shape[-2], weight.shape[-1]
    padded = F.pad(x, (0, 0, width - 1, 0))
    w = weight[:, 0, :]
    out = bias
    for k in range(width):
        term, shift = padded[..., k:k + length, :], width - 1 - k
        if packing is not None and shift:
            term = term * (packing.position >= shift).unsqueeze(-1).to(x.dtype)
        out = torch.addcmul(out, term, w[:, k])
    return out


class Mamba(nn.Module):
    """Selective-SSM mixer with ``mamba_ssm.Mamba``'s parameters and two scan backends.

    Args:
        d_model: input/output width.
        d_state: SSM state size ``N``.
        d_conv: width of the causal depthwise convolution.
        expand: ``d_inner = expand * d_model``.
        backend: ``auto`` | ``cuda`` | ``torch`` (see the module docstring).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, backend="auto",
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"mamba_backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._scan_cuda, self._why_not_cuda = None, ""
        if backend != "torch":
            self._scan_cuda, why_not = _import_selective_scan_cuda()
            if backend == "cuda" and self._scan_cuda is None:
                raise MambaBackendError(f"mamba_backend='cuda' cannot run: {why_not}. "
                                        "Use mamba_backend 'torch' or 'auto'.")
            self._why_not_cuda = why_not
        if backend == "cuda" and not torch.cuda.is_available():
            raise MambaBackendError("mamba_backend='cuda' cannot run: torch sees no CUDA device. "
                                    "Use mamba_backend 'torch' or 'auto'.")

        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # mamba-ssm's initialisation: dt_proj keeps the variance of dt; its bias is the inverse
        # softplus of a log-uniform step size in [dt_min, dt_max]; A is S4D-real (-1..-N).
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def _use_cuda_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            _log_backend_once(f"Mamba backend: torch ({_torch_scan_name(x)}), mamba_backend='torch'.")
            return False
        if x.is_cuda and self._scan_cuda is not None:
            _log_backend_once("Mamba backend: cuda (mamba_ssm selective_scan_fn kernel).")
            return True
        if self.backend == "cuda":
            raise MambaBackendError(f"mamba_backend='cuda' needs the model on a CUDA device, got {x.device}.")
        why = self._why_not_cuda or f"input on {x.device}"
        _log_backend_once(f"Mamba backend: torch ({_torch_scan_name(x)}); cuda not used: {why}.")
        return False

    def forward(self, x: torch.Tensor, packing: Optional[Packing] = None) -> torch.Tensor:
        """``x: [b, l, d_model] -> [b, l, d_model]``, causal in ``l``; with ``packing``, packed rows
        ``[N, d_model] -> [N, d_model]`` (CPU only)."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [b, l, d_inner] each
        u = F.silu(causal_depthwise_conv(u, self.conv1d.weight, self.conv1d.bias, packing))
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        if self._use_cuda_kernel(x):  # the kernel wants [b, d, l] / [b, n, l] and fuses bias, softplus, gate
            if packing is not None:
                raise ValueError("mamba_ssm's kernel takes padded batches: packing is for CPUs only")
            y = self._scan_cuda(u.transpose(1, 2), (dt @ self.dt_proj.weight.t()).transpose(1, 2), A,
                                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
                                delta_softplus=True).transpose(1, 2)
        else:
            y = selective_scan(u, F.softplus(self.dt_proj(dt)), A, B, C, self.D, packing=packing) * F.silu(z)
        return self.out_proj(y)


class MambaBlock(nn.Module):
    """FindRec's Mamba layer (sec. 2.1): ``x + alpha * Dropout(Mamba(LN(x)))`` with a learnable
    scalar ``alpha`` (init 1), then a pre-LN position-wise FFN ``x + Dropout(W2 GELU(W1 LN(x)))``
    (inner width ``4 * d_model``) as in Mamba4Rec."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dropout=0.2, backend="auto"):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.alpha = nn.Parameter(torch.ones(()))
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), Dropout(dropout),
                                 nn.Linear(4 * d_model, d_model))
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, packing: Optional[Packing] = None) -> torch.Tensor:
        x = x + self.alpha * self.dropout(self.mixer(self.norm(x), packing))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MambaEncoder(nn.Module):
    """``n_layers`` :class:`MambaBlock` s and a final LayerNorm (the blocks are pre-LN, so the
    stream's output would otherwise be unnormalised). Causal: output ``t`` sees inputs ``<= t``."""

    def __init__(self, n_layers, d_model, d_state=16, d_conv=4, expand=2, dropout=0.2, backend="auto"):
        super().__init__()
        self.layers = nn.ModuleList(
            MambaBlock(d_model, d_state, d_conv, expand, dropout, backend) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, packing: Optional[Packing] = None) -> torch.Tensor:
        """``[b, l, d_model]``, or packed rows ``[N, d_model]`` with ``packing``."""
        for layer in self.layers:
            x = layer(x, packing)
        return self.norm(x)
