"""Cache-sized row blocks for hand-written CPU loops (DREAM's gated merge, the PyTorch scan)."""

from typing import List

import torch


def row_blocks(n: int, values_per_row: int, budget: int, device: torch.device) -> List[slice]:
    """Slices of ``range(n)`` holding about ``budget`` values each (``values_per_row`` per row, at
    least one row a slice) on a CPU, where a block that stays in the cache beats one large pass;
    one slice elsewhere, since on a GPU every block costs a kernel launch per op."""
    size = max(1, budget // values_per_row) if device.type == "cpu" else max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
