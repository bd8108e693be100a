"""Hold an auxiliary loss term's gradient at a fixed share of the main term's.

A fixed weight on an auxiliary loss fixes its *value* scale, not its say in training: FindRec's
cross-entropy gradient at the streams' last states grows ~8x while it converges and IICM's stays
flat, so a weight that gives IICM 5-30% of the CE's gradient at initialisation leaves it 0.2% at the
best epoch (docs/design.md §findrec). :class:`GradientShare` measures both gradients where they meet
and sets the weight so that their ratio stays at ``share``.
"""
from contextlib import contextmanager
from typing import List, Sequence

import torch
from torch import nn

#: EMA decay of the gradient norms: ~20 batches of memory smooths the per-batch noise and still
#: follows the CE's growth over epochs (hundreds of batches each)
DECAY = 0.95


class _NormProbe(torch.autograd.Function):
    """Identity on a list of tensors whose backward adds the joint norm of their gradients,
    divided by ``scale``, to an EMA of ``owner``'s (the gradient itself passes unchanged)."""

    @staticmethod
    def forward(ctx, owner, slot, scale, *tensors):
        ctx.owner, ctx.slot, ctx.scale = owner, slot, scale
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if present and ctx.owner.recording:
            norm = torch.sqrt(sum(g.detach().pow(2).sum() for g in present)) / ctx.scale
            ctx.owner.record(ctx.slot, norm)
        return (None, None, None, *grads)


class GradientShare(nn.Module):
    """Weight ``w_t`` for a term ``T`` beside a reference term ``R`` such that
    ``|w_t dT/dz| = share * |dR/dz|`` at the tensors ``z`` both reach (EMAs of the norms, debiased
    as Adam's moments, so the weight moves smoothly from batch to batch).

    Use: the reference's path reads :meth:`watch` ``(z, REFERENCE)``, the term's path reads
    :meth:`watch` ``(z, TERM, scale=w)`` and the term enters the loss as ``w * T`` with
    ``w = weight()`` taken before the forward pass. Until both norms have been seen once, the weight
    is ``initial``. The EMAs are buffers: a checkpoint resumes them.

    Args:
        share: target ratio of the term's gradient norm to the reference's (> 0).
        initial: the weight of the first step.
    """

    REFERENCE, TERM = 0, 1

    def __init__(self, share: float, initial: float):
        super().__init__()
        if share <= 0:
            raise ValueError(f"share must be positive, got {share}")
        if initial <= 0:  # the first step measures the term's gradient through this weight
            raise ValueError(f"the initial weight must be positive, got {initial}")
        self.share, self.initial, self.recording = share, initial, True
        self.register_buffer("ema", torch.zeros(2))
        self.register_buffer("seen", torch.zeros(2, dtype=torch.long))

    @torch.no_grad()
    def record(self, slot: int, norm: torch.Tensor) -> None:
        self.ema[slot] = DECAY * self.ema[slot] + (1 - DECAY) * norm.to(self.ema.dtype)
        self.seen[slot] += 1

    def weight(self) -> torch.Tensor:
        """The current weight (a detached scalar tensor; no host synchronisation)."""
        debiased = self.ema / (1 - DECAY ** self.seen.to(self.ema.dtype)).clamp_min(1e-12)
        adaptive = self.share * debiased[self.REFERENCE] / debiased[self.TERM].clamp_min(1e-30)
        return torch.where((self.seen > 0).all(), adaptive, adaptive.new_tensor(self.initial)).detach()

    def watch(self, tensors: Sequence[torch.Tensor], slot: int, scale=1.0) -> List[torch.Tensor]:
        """``tensors`` unchanged; their gradient norm (all together, divided by ``scale``: the
        weight the term was multiplied by) feeds ``slot``'s EMA in the backward pass."""
        return list(_NormProbe.apply(self, slot, scale, *tensors))

    @contextmanager
    def paused(self):
        """Backward passes inside do not update the EMAs (extra ``autograd.grad`` calls that
        measure, e.g. FindRec's ``log_loss_terms``)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def extra_repr(self) -> str:
        return f"share={self.share}, initial={self.initial}"
