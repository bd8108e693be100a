"""Mamba sequence layers for FindRec, with a CUDA and a pure-PyTorch backend.

Reference: A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv 2312.00752); the block layout is FindRec's (KDD'25, sec. 2.1).

:class:`Mamba` is the selective-SSM mixer. It owns exactly the parameters of
``mamba_ssm.Mamba`` (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``, same shapes and initialisation), so a checkpoint moves between backends; the
backend only decides who runs the selective scan:

- ``cuda``: mamba-ssm's fused CUDA kernel ``selective_scan_fn``.
- ``torch``: :func:`selective_scan`, a step loop in plain PyTorch (any device).
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


def _log_backend_once(line: str) -> None:
    if line not in _logged_backend_lines:
        _logged_backend_lines.add(line)
        logging.getLogger().info(line)


def selective_scan(u, delta, A, B, C, D):
    """Selective scan ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``.

    Shapes: ``u, delta: [b, l, d]`` (``delta`` after softplus), ``A: [d, n]`` (negative),
    ``B, C: [b, l, n]``, ``D: [d]``; returns ``y: [b, l, d]`` (before the ``silu(z)`` gate).

    A Python loop over time steps that unbinds the discretised tensors and stacks the states,
    without in-place indexing, so autograd records one small node per step. It was chosen by
    measuring forward + backward of 2 Mamba layers, ``d_model`` 64 (``d_inner`` 128,
    ``d_state`` 16), batch 256, on this project's 2-core CPU machine (torch 2.13, 2 threads):

    ============================================  ==========  ==========
    scan (best of 3, machine lightly loaded)      L = 50      L = 200
    ============================================  ==========  ==========
    this step loop                                2.2 s       11.5 s
    ``mambapy`` 1.2.0 parallel scan (Blelloch)    4.0 s       10.8 s
    log-depth doubling scan (out-of-place)        11.3 s      114 s
    chunked: doubling inside chunks of 8 + loop   9.1 s       53 s
    ============================================  ==========  ==========

    SPEC §5 measured the same ordering at L = 50 (loop 1.58 s, ``mambapy`` 2.72 s). With the
    machine shared by other jobs (load average 4-8) the two are within noise of each other
    (interleaved runs, L = 50: loop 6.6-8.0 s, ``mambapy`` 5.6-7.5 s; L = 200: 26-34 s vs
    23-34 s), and ``mambapy`` peaks higher in memory (L = 200: 7.1 GB vs 5.4 GB RSS): it pads the
    length to the next power of two and clones its inputs. The maintained package would be
    preferred if it were as fast; it is not at FindRec's paper length 50 on an idle machine, so
    the loop is used. ``benchmarks/findrec_speed.py`` re-measures both.
    """
    delta_a = torch.exp(delta.unsqueeze(-1) * A)  # [b, l, d, n], ZOH discretisation of A
    delta_bu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, l, d, n], Euler step for B
    h = torch.zeros_like(delta_bu[:, 0])
    states = []
    for a_t, bu_t in zip(delta_a.unbind(1), delta_bu.unbind(1)):
        h = a_t * h + bu_t
        states.append(h)
    y = (torch.stack(states, dim=1) @ C.unsqueeze(-1)).squeeze(-1)
    return y + u * D


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
            _log_backend_once("Mamba backend: torch (step-loop selective scan), mamba_backend='torch'.")
            return False
        if x.is_cuda and self._scan_cuda is not None:
            _log_backend_once("Mamba backend: cuda (mamba_ssm selective_scan_fn kernel).")
            return True
        if self.backend == "cuda":
            raise MambaBackendError(f"mamba_backend='cuda' needs the model on a CUDA device, got {x.device}.")
        why = self._why_not_cuda or f"input on {x.device}"
        _log_backend_once(f"Mamba backend: torch (step-loop selective scan); cuda not used: {why}.")
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [b, l, d_model] -> [b, l, d_model]``, causal in ``l``."""
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [b, l, d_inner] each
        # depthwise conv padded on both sides; keeping the first `length` outputs makes it causal
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length]).transpose(1, 2)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        if self._use_cuda_kernel(x):  # the kernel wants [b, d, l] / [b, n, l] and fuses bias, softplus, gate
            y = self._scan_cuda(u.transpose(1, 2), (dt @ self.dt_proj.weight.t()).transpose(1, 2), A,
                                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
                                delta_softplus=True).transpose(1, 2)
        else:
            y = selective_scan(u, F.softplus(self.dt_proj(dt)), A, B, C, self.D) * F.silu(z)
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
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha * self.dropout(self.mixer(self.norm(x)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MambaEncoder(nn.Module):
    """``n_layers`` :class:`MambaBlock` s and a final LayerNorm (the blocks are pre-LN, so the
    stream's output would otherwise be unnormalised). Causal: output ``t`` sees inputs ``<= t``."""

    def __init__(self, n_layers, d_model, d_state=16, d_conv=4, expand=2, dropout=0.2, backend="auto"):
        super().__init__()
        self.layers = nn.ModuleList(
            MambaBlock(d_model, d_state, d_conv, expand, dropout, backend) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
