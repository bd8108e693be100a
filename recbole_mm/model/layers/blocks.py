"""Block-wise helpers: cache-sized row blocks for hand-written CPU loops (DREAM's gated merge, the
PyTorch scan, the MMD's and InfoNCE's kernel and logit matrices) and a running top-k over column blocks (the blocked full-ranking evaluation, the
kNN item graphs) whose score blocks share one buffer, so that no ``[rows, n_items]`` matrix is
ever needed whole."""

from typing import List, Optional, Tuple

import torch


def row_blocks(n: int, values_per_row: int, budget: int, device: torch.device) -> List[slice]:
    """Slices of ``range(n)`` holding about ``budget`` values per torch thread each
    (``values_per_row`` per row, at least one row a slice) on a CPU, where a block that stays in the
    cache beats one large pass, and each thread's share of a block's ops stays in its own core's
    cache (on two threads, DREAM's forward + backward with the one-thread block measured 10-20% slower);
    one slice elsewhere, since on a GPU every block costs a kernel launch per op."""
    size = max(1, budget * torch.get_num_threads() // values_per_row) if device.type == "cpu" else max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


#: columns a group of :func:`block_topk`, and the width from which it groups
TOPK_GROUP, TOPK_GROUPED_WIDTH = 64, 32768


def block_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=1)`` of a wide ``[rows, width]`` block, the same values (ids may order
    equal values differently, as ``torch.topk`` itself may) at a fraction of the cost: the k best
    columns of a row lie in the k groups of :data:`TOPK_GROUP` columns with the largest maxima (a
    group holding one of them has a maximum at least the k-th value, and at most k groups hold
    them), so one pass takes the groups' maxima and only those k x TOPK_GROUP candidates are
    ranked. On a CPU torch's topk over 65,536 columns costs several times the pass (k = 10)."""
    rows, width = scores.shape
    k = min(k, width)
    if width < TOPK_GROUPED_WIDTH or 4 * k * TOPK_GROUP > width:
        return scores.topk(k, dim=1)
    whole = width - width % TOPK_GROUP
    groups = scores[:, :whole].unflatten(1, (whole // TOPK_GROUP, TOPK_GROUP))  # a view, no copy
    best = groups.amax(2).topk(k, dim=1).indices
    candidates = groups.gather(1, best.unsqueeze(2).expand(-1, -1, TOPK_GROUP)).flatten(1)
    ids = (best.unsqueeze(2) * TOPK_GROUP + torch.arange(TOPK_GROUP, device=scores.device)).flatten(1)
    if whole < width:  # the columns of the last, partial group are candidates as they are
        candidates = torch.cat([candidates, scores[:, whole:]], 1)
        ids = torch.cat([ids, torch.arange(whole, width, device=scores.device).expand(rows, -1)], 1)
    values, pos = candidates.topk(k, dim=1)
    return values, ids.gather(1, pos)


class BlockProduct:
    """``a @ b.T`` block after block into one reused buffer. On a CPU a fresh score block is fresh
    memory whose page faults cost more than its product: a ``[1024, 65536]`` block of 32-d
    similarities took 0.45 s allocated anew and 0.075 s written into a kept buffer (one thread).
    A result is valid until the next call, so the caller must be done with one block (top-k taken,
    nothing kept) before asking for the next. Falls back to a plain product where autograd needs one."""

    def __init__(self):
        self.buffer: Optional[torch.Tensor] = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return a @ b.T
        size = a.shape[0] * b.shape[0]
        if self.buffer is None or self.buffer.numel() < size or self.buffer.dtype != a.dtype \
                or self.buffer.device != a.device:
            self.buffer = torch.empty(size, dtype=a.dtype, device=a.device)
        return torch.mm(a, b.T, out=self.buffer[:size].view(a.shape[0], b.shape[0]))


def merge_topk(state: Optional[Tuple[torch.Tensor, torch.Tensor]], col_lo: int, scores: torch.Tensor, k: int):
    """Running top-k per row: ``state`` (``(values, column ids)`` or ``None``) merged with a block
    of ``scores`` for columns ``col_lo, col_lo + width``."""
    values, ids = block_topk(scores, k)
    ids = ids + col_lo
    if state is None:
        return values, ids
    values, ids = torch.cat([state[0], values], 1), torch.cat([state[1], ids], 1)
    values, pos = values.topk(min(k, values.shape[1]), dim=1)
    return values, ids.gather(1, pos)
