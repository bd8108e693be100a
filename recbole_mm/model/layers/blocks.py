"""Block-wise helpers: cache-sized row blocks for hand-written CPU loops (DREAM's gated merge, the
PyTorch scan) and a running top-k over column blocks (the blocked full-ranking evaluation, the
kNN item graphs), so that no ``[rows, n_items]`` matrix is ever needed whole."""

from typing import List, Optional, Tuple

import torch


def row_blocks(n: int, values_per_row: int, budget: int, device: torch.device) -> List[slice]:
    """Slices of ``range(n)`` holding about ``budget`` values each (``values_per_row`` per row, at
    least one row a slice) on a CPU, where a block that stays in the cache beats one large pass;
    one slice elsewhere, since on a GPU every block costs a kernel launch per op."""
    size = max(1, budget // values_per_row) if device.type == "cpu" else max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def merge_topk(state: Optional[Tuple[torch.Tensor, torch.Tensor]], col_lo: int, scores: torch.Tensor, k: int):
    """Running top-k per row: ``state`` (``(values, column ids)`` or ``None``) merged with a block
    of ``scores`` for columns ``col_lo, col_lo + width``."""
    values, ids = scores.topk(min(k, scores.shape[1]), dim=1)
    ids = ids + col_lo
    if state is None:
        return values, ids
    values, ids = torch.cat([state[0], values], 1), torch.cat([state[1], ids], 1)
    values, pos = values.topk(min(k, values.shape[1]), dim=1)
    return values, ids.gather(1, pos)
