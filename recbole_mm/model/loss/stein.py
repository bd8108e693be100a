"""FindRec's Integrated Information Coordination Module loss (IICM, KDD'25 sec. 2.2, eq. 1-2).

- :class:`SteinEntropy`: differentiable surrogate whose gradient raises the differential entropy
  of a batch of embeddings, using the Stein gradient estimator of the score ``grad_z log q(z)``
  (Y. Li, R. E. Turner, "Gradient Estimators for Implicit Models", ICLR 2018, eq. 7).
- :class:`IICMLoss`: ``L_align + entropy_weight * L_ent`` with ``L_align = 1 - mean_b K(z_a, z_b)``
  and ``L_ent`` either the Stein term or a KL to ``N(0, I)`` (``iicm_entropy: stein | kl``).

The Gaussian kernels come from :mod:`recbole_mm.model.loss.kernels` (shared with MambaRec).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_mm.model.loss.kernels import (gaussian_kernel_from_sq_dists, median_bandwidth,
                                           paired_gaussian_kernel, pairwise_sq_dists)

ENTROPY_TERMS = ("stein", "kl")


class SteinEntropy(nn.Module):
    """Stein entropy surrogate ``L_ent = mean_b <stopgrad(g_b), z_b> / d`` (per dimension).

    ``g = -(K + eta I)^{-1} <grad, K>`` estimates ``grad_z log q(z)`` at the batch's samples
    (Li & Turner eq. 7) with the RBF kernel ``K_ij = exp(-||z_i - z_j||^2 / (2 s^2))``, ``s`` the
    median pairwise distance (detached) and ``<grad, K>_i = sum_j grad_{z_j} K(z_j, z_i)
    = (z_i sum_j K_ij - sum_j K_ij z_j) / s^2``. As ``grad_theta H(q) = -E[grad_z log q(z) dz/dtheta]``,
    the gradient of ``L_ent`` is ``-grad_theta H``: minimising ``L_ent`` raises the entropy. Its value
    itself carries no meaning (it may be negative).

    Args:
        eta: ridge added to ``K`` (``stein_eta``); 0.1 recovers the score of a Gaussian within
            ~30 % (see tests/test_findrec.py) where 1e-3 is dominated by noise.
    """

    def __init__(self, eta: float = 0.1):
        super().__init__()
        if eta <= 0:
            raise ValueError(f"stein_eta must be positive, got {eta}")
        self.eta = eta

    @torch.no_grad()
    def score(self, z: torch.Tensor) -> torch.Tensor:
        """Stein estimate of ``grad_z log q(z)`` at each row of ``z: [M, d]``; shape ``[M, d]``."""
        z = z.detach()
        sigma = median_bandwidth(z)
        kernel = gaussian_kernel_from_sq_dists(pairwise_sq_dists(z), sigma)
        grad_kernel = (kernel.sum(1, keepdim=True) * z - kernel @ z) / sigma.pow(2)
        ridge = self.eta * torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
        return -torch.linalg.solve(kernel + ridge, grad_kernel)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # per dimension (mean, not sum, over d): the score grows with d while the alignment's
        # gradient shrinks with it, so a summed form outweighed alignment ~100x at d = 256
        return (self.score(z) * z).mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per dimension (mean over dimensions and the
    batch), on the same per-dimension scale as :class:`SteinEntropy`."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class IICMLoss(nn.Module):
    """``L_IICM = mean_pairs L_align + entropy_weight * mean_views L_ent`` (FindRec sec. 2.2).

    ``L_align(a, b) = 1 - mean_b K(z_a_b, z_b_b)`` with ``K = exp(-||x - y||^2 / (2 sigma^2))``
    (eq. 1). Eq. 2 writes the loss as ``E[K]``, whose minimisation would push the modalities
    apart; the sign is flipped (docs/design.md §findrec). ``sigma`` is fixed, attached (below) or
    adaptive: the median distance between the batch's ``z_a`` and ``z_b`` rows (all cross pairs),
    detached so the model cannot lower the loss by inflating the bandwidth; re-measured every batch,
    it rewards shrinking the views instead (``normalize`` and ``sigma_attached`` below).

    Args:
        entropy: ``"stein"`` (:class:`SteinEntropy` on each view), ``"kl"`` (KL of each view's
            Gaussian posterior to ``N(0, I)``) or ``None`` (alignment only, ``use_entropy: False``).
        entropy_weight: weight of the entropy term.
        sigma: fixed kernel bandwidth (``iicm_sigma``); ``None`` = adaptive.
        stein_eta: ridge of the Stein estimator.
        normalize: L2-normalise each view before both parts (``iicm_normalize``), which makes the
            loss blind to the views' scale. Without it, the adaptive bandwidth lets the alignment
            lower its loss by shrinking every view at once (the bandwidth is re-measured on the
            next batch, so the pull never ends), which the entropy term alone must hold back
            (docs/design.md §findrec). The ``kl`` term acts on the posteriors, unnormalised.
        sigma_attached: the bandwidth is the batch's root-mean-square ``z_a``-``z_b`` distance over
            all cross pairs, kept in the graph (``iicm_sigma_attached``): the alignment is then the
            same for ``z`` and ``c (z - m) + m`` (any scale ``c``, centre ``m``), so shrinking or
            contracting the batch does not lower it; only pairs closer than the batch's typical
            pair do. The median, detached, rewards both.
    """

    def __init__(self, entropy: Optional[str] = "stein", entropy_weight: float = 1.0,
                 sigma: Optional[float] = None, stein_eta: float = 0.1, normalize: bool = False,
                 sigma_attached: bool = False):
        super().__init__()
        if entropy is not None and entropy not in ENTROPY_TERMS:
            raise ValueError(f"iicm_entropy must be one of {ENTROPY_TERMS}, got {entropy!r}")
        if sigma is not None and sigma <= 0:
            raise ValueError(f"iicm_sigma must be positive or None, got {sigma}")
        if sigma is not None and sigma_attached:
            raise ValueError("iicm_sigma_attached needs the adaptive bandwidth (iicm_sigma ~), got a fixed iicm_sigma")
        self.entropy, self.entropy_weight, self.sigma = entropy, entropy_weight, sigma
        self.normalize, self.sigma_attached = normalize, sigma_attached
        self.stein = SteinEntropy(stein_eta) if entropy == "stein" else None

    def alignment(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if self.sigma_attached:
            # mean_ij |a_i - b_j|^2 = mean|a|^2 + mean|b|^2 - 2 mean(a).mean(b), no [B, B] matrix
            cross = z_a.pow(2).sum(-1).mean() + z_b.pow(2).sum(-1).mean() - 2.0 * z_a.mean(0) @ z_b.mean(0)
            sigma = cross.clamp_min(1e-12).sqrt()
        else:
            sigma = self.sigma if self.sigma is not None else median_bandwidth(z_a, z_b)
        return 1.0 - paired_gaussian_kernel(z_a, z_b, sigma).mean()

    def terms(self, views: Sequence[torch.Tensor], pairs: Sequence[Tuple[int, int]],
              posteriors: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
        """The two parts of ``L_IICM``, ``{"align": L_align, "entropy": entropy_weight * L_ent}``,
        each present only where it applies (no pair: no alignment; ``entropy=None``: no entropy).
        ``views[m]: [B, d]`` (row ``b`` = the same sequence in every view); ``pairs`` index the
        views to align; ``posteriors[m] = (mu, logvar)`` of each view, needed for ``kl``."""
        parts = {}
        if self.normalize:
            views = [F.normalize(z, dim=-1) for z in views]
        if pairs:
            parts["align"] = sum(self.alignment(views[i], views[j]) for i, j in pairs) / len(pairs)
        if self.entropy == "stein":
            parts["entropy"] = self.entropy_weight * sum(self.stein(z) for z in views) / len(views)
        elif self.entropy == "kl":
            if posteriors is None:
                raise ValueError("iicm_entropy 'kl' needs the (mu, logvar) of every view")
            parts["entropy"] = self.entropy_weight * sum(gaussian_kl(mu, lv) for mu, lv in posteriors) / len(posteriors)
        return parts

    def forward(self, views: Sequence[torch.Tensor], pairs: Sequence[Tuple[int, int]],
                posteriors: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
        """``L_IICM``: the sum of :meth:`terms`."""
        return sum(self.terms(views, pairs, posteriors).values(), views[0].new_zeros(()))
