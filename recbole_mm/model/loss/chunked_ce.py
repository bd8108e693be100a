"""Cross-entropy over all items without the ``[batch, n_items]`` logits: the exact loss and
gradients from slices of the item table (the forward pass keeps a running log-sum-exp per row,
the backward pass recomputes each slice's softmax). Peak memory is ``batch x chunk`` floats instead
of ``batch x n_items``, for a second matrix product per slice in backward. Used by the trainer's
``ce_item_chunk`` (recbole_mm/trainer/chunked_ce.py) and by models that compute their CE term
themselves (FindRec)."""

import torch


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, target, chunk):
        lse = torch.full((hidden.shape[0],), -torch.inf, dtype=hidden.dtype, device=hidden.device)
        for lo in range(0, table.shape[0], chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(hidden @ table[lo:lo + chunk].T, dim=1))
        target_logit = (hidden * table[target]).sum(1)
        ctx.save_for_backward(hidden, table, target, lse)
        ctx.chunk = chunk
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad):
        hidden, table, target, lse = ctx.saved_tensors
        scale = grad / hidden.shape[0]
        grad_hidden = -table[target]
        grad_table = torch.zeros_like(table)
        grad_table.index_add_(0, target, -hidden)
        for lo in range(0, table.shape[0], ctx.chunk):
            part = table[lo:lo + ctx.chunk]
            prob = torch.exp(hidden @ part.T - lse.unsqueeze(1))  # softmax restricted to the slice
            grad_hidden = grad_hidden + prob @ part
            grad_table[lo:lo + ctx.chunk] += prob.T @ hidden
        return grad_hidden * scale, grad_table * scale, None, None


def chunked_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, target: torch.Tensor, chunk: int):
    """``F.cross_entropy(hidden @ table.T, target)`` (mean) computed ``chunk`` items at a time."""
    return _ChunkedCE.apply(hidden, table, target, int(chunk))
