"""Cross-entropy over all items without the ``[batch, n_items]`` logits: the exact loss and
gradients from slices of the item table (the forward pass keeps a running log-sum-exp per row,
the backward pass recomputes each slice's softmax). Peak memory is ``batch x chunk`` floats instead
of ``batch x n_items``, for a second matrix product per slice in backward. Used by the trainer's
``ce_item_chunk`` (recbole_mm/trainer/chunked_ce.py) and by models that compute their CE term
themselves (FindRec).

Both forms can leave items out of the softmax (:class:`ExcludingCrossEntropy`, ``excluded``): the
cold-start split's held-out items, which would otherwise get a push down in every training step
(recbole_mm/data/cold_start.py)."""

from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from recbole_mm.model.layers.blocks import BlockProduct


def _slice_logits(product: BlockProduct, hidden, table, excluded, lo, chunk):
    """The logits of items ``lo, lo + chunk``, written into ``product``'s kept buffer."""
    logits = product(hidden, table[lo:lo + chunk])
    return logits if excluded is None else logits.masked_fill_(excluded[lo:lo + chunk], -torch.inf)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """``logits.logsumexp(1)``, overwriting ``logits`` (no block-sized temporaries). A row whose
    slice is all ``-inf`` (every item excluded) gives ``-inf``, as ``torch.logsumexp`` does."""
    top = logits.amax(1, keepdim=True)
    top.masked_fill_(top == -torch.inf, 0.0)
    return logits.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))


class _ChunkedCE(torch.autograd.Function):
    """Every ``[batch, chunk]`` block lives in one reused buffer and is transformed in place:
    at a million items, fresh blocks and temporaries cost more in page faults and memory passes
    than the products themselves (docs/design.md §evaluation, the same finding for ranking)."""

    @staticmethod
    def forward(ctx, hidden, table, target, chunk, excluded):
        product = BlockProduct()
        lse = torch.full((hidden.shape[0],), -torch.inf, dtype=hidden.dtype, device=hidden.device)
        for lo in range(0, table.shape[0], chunk):
            lse = torch.logaddexp(lse, _logsumexp_(_slice_logits(product, hidden, table, excluded, lo, chunk)))
        target_logit = (hidden * table[target]).sum(1)
        ctx.save_for_backward(hidden, table, target, lse)
        ctx.chunk, ctx.excluded = chunk, excluded
        return (lse - target_logit).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, table, target, lse = ctx.saved_tensors
        scale = grad / hidden.shape[0]
        product = BlockProduct()
        grad_hidden = -table[target]
        grad_table = torch.zeros_like(table)
        grad_table.index_add_(0, target, -hidden)
        for lo in range(0, table.shape[0], ctx.chunk):
            # softmax restricted to the slice, in place; an excluded item's probability is exp(-inf) = 0
            prob = _slice_logits(product, hidden, table, ctx.excluded, lo, ctx.chunk).sub_(lse.unsqueeze(1)).exp_()
            grad_hidden.addmm_(prob, table[lo:lo + ctx.chunk])
            grad_table[lo:lo + ctx.chunk].addmm_(prob.T, hidden)
        return grad_hidden.mul_(scale), grad_table.mul_(scale), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, target: torch.Tensor, chunk: int,
                          excluded: Optional[torch.Tensor] = None):
    """``F.cross_entropy(hidden @ table.T, target)`` (mean) computed ``chunk`` items at a time;
    ``excluded`` (``[n_items]`` bool): items whose logits are ``-inf``, out of the softmax."""
    return _ChunkedCE.apply(hidden, table, target, int(chunk), excluded)


class ExcludingCrossEntropy(nn.Module):
    """A model's cross-entropy loss (``loss(logits, target)``, logits over the items on the last
    axis) with the ``excluded`` items' logits set to ``-inf``: they are in no softmax denominator
    and get no gradient. The mask is a non-persistent buffer, so checkpoints do not change."""

    def __init__(self, loss: nn.Module, excluded: torch.Tensor):
        super().__init__()
        self.loss = loss
        self.register_buffer("excluded", excluded, persistent=False)

    def forward(self, logits, target):
        if logits.shape[-1] != len(self.excluded):
            raise ValueError(f"ExcludingCrossEntropy: logits over {logits.shape[-1]} items, the mask has "
                             f"{len(self.excluded)}")
        return self.loss(logits.masked_fill(self.excluded, -torch.inf), target)


def excluded_items(model) -> Optional[torch.Tensor]:
    """The ``[n_items]`` bool mask of items ``model``'s loss leaves out of the softmax, or ``None``."""
    return getattr(getattr(model, "loss_fct", None), "excluded", None)
