"""Gaussian (RBF) kernels shared by MambaRec's MMD and FindRec's IICM / Stein estimator.

All functions work on batches of row vectors and are differentiable in their inputs; a
bandwidth computed from the data (:func:`median_bandwidth`) is detached, so it acts as a
constant scale and not as something the model can shrink to cheat the loss.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch

Bandwidth = Union[float, Sequence[float], torch.Tensor]


def pairwise_sq_dists(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``D[i, j] = ||x_i - y_j||^2`` for ``x: [n, d]``, ``y: [m, d]`` (``y = x`` if omitted).

    Uses the expanded form ``|x|^2 + |y|^2 - 2 x y^T`` (one matmul, no ``[n, m, d]`` tensor)
    and clamps the rounding negatives to zero.
    """
    y = x if y is None else y
    d = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2.0 * x @ y.transpose(-1, -2)
    return d.clamp_min(0.0)


def median_bandwidth(x: torch.Tensor, y: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Median heuristic: the median of the pairwise Euclidean distances (off-diagonal when
    ``y`` is omitted), detached. Falls back to 1 when all points coincide."""
    with torch.no_grad():
        d2 = pairwise_sq_dists(x, y)
        if y is None and d2.shape[0] > 1:
            n = d2.shape[0]
            d2 = d2[~torch.eye(n, dtype=torch.bool, device=d2.device)]
        sigma = d2.flatten().median().sqrt()
        return torch.where(sigma > eps, sigma, torch.ones_like(sigma))


def _as_bandwidths(bandwidth: Bandwidth, like: torch.Tensor) -> torch.Tensor:
    bw = torch.as_tensor(bandwidth, dtype=like.dtype, device=like.device).flatten()
    if bw.numel() == 0 or bool((bw <= 0).any()):
        raise ValueError(f"kernel bandwidths must be positive, got {bandwidth!r}")
    return bw


def gaussian_kernel_from_sq_dists(d2: torch.Tensor, bandwidth: Bandwidth) -> torch.Tensor:
    """``sum_s exp(-d2 / (2 s^2))`` over the bandwidths ``s`` (one value = a plain RBF).

    One bandwidth at a time, summed in place: never a ``[..., n_bw]`` tensor (MambaRec's MMD on a
    batch of ~2000 items spent more time building that tensor than computing the distances)."""
    bw = _as_bandwidths(bandwidth, d2)
    out = torch.exp(-d2 / (2.0 * bw[0].pow(2)))
    for s in bw[1:]:
        out = out + torch.exp(-d2 / (2.0 * s.pow(2)))
    return out


def exponent_factors(x: torch.Tensor, y: torch.Tensor, bandwidth: Bandwidth) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
    """``(left, right, ratios)`` with ``left @ right.T = E / s_0^2`` for the exponent ``E[i, j] =
    -||x_i - y_j||^2 / 2`` and the first bandwidth ``s_0``, and ``ratios[s] = s_0^2 / s^2``.

    ``E / s^2 = (x_i . y_j - |x_i|^2 / 2 - |y_j|^2 / 2) / s^2`` comes out of one matrix product:
    ``[x, -|x|^2/2, 1] . [y, 1, -|y|^2/2]``, so the squared norms ride in the product and no
    ``[n, m]`` pass is spent on them (MambaRec's MMD on ~1400 items: 0.17 s instead of 0.22 s
    forward + backward with distances first, one thread). A row block of ``left`` gives the same
    rows of ``E``, which is how :mod:`recbole_mm.model.loss.mmd` walks the matrix."""
    inv_sq = _as_bandwidths(bandwidth, x).pow(-2).tolist()
    left = torch.cat([x, -0.5 * x.pow(2).sum(-1, keepdim=True), x.new_ones(x.shape[0], 1)], 1) * inv_sq[0]
    right = torch.cat([y, y.new_ones(y.shape[0], 1), -0.5 * y.pow(2).sum(-1, keepdim=True)], 1)
    return left, right, [w / inv_sq[0] for w in inv_sq]


def kernel_from_exponent(scaled: torch.Tensor, ratios: Sequence[float],
                         slope: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The kernel ``K = sum_s exp(scaled * ratios[s])`` from ``scaled = E / s_0^2`` (clamped at 0
    against rounding by the caller) and :func:`exponent_factors`'s ``ratios``; with ``slope`` also
    ``S = sum_s ratios[s] exp(scaled * ratios[s])``, so that ``dK/dE = S / s_0^2`` (for a
    hand-written backward pass). With one bandwidth ``S`` is ``K`` itself."""
    out = torch.exp(scaled)
    if len(ratios) == 1:
        return (out, out) if slope else out
    d_out = out
    for r in ratios[1:]:
        term = torch.exp(scaled * r)
        out = out + term
        d_out = d_out + term * r
    return (out, d_out) if slope else out


def gaussian_kernel(x: torch.Tensor, y: Optional[torch.Tensor] = None, bandwidth: Bandwidth = 1.0) -> torch.Tensor:
    """Gram matrix ``K[i, j] = sum_s exp(-||x_i - y_j||^2 / (2 s^2))`` for ``x: [n, d]``, ``y: [m, d]``
    (``y = x`` if omitted), differentiable in both."""
    left, right, ratios = exponent_factors(x, x if y is None else y, bandwidth)
    return kernel_from_exponent((left @ right.T).clamp_max(0.0), ratios)


def paired_gaussian_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: Bandwidth = 1.0) -> torch.Tensor:
    """Row-wise kernel ``k_i = K(x_i, y_i)`` (FindRec eq. 1), shape ``[n]``."""
    return gaussian_kernel_from_sq_dists((x - y).pow(2).sum(-1), bandwidth)
