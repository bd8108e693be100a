"""Running a causal sequence encoder on the real positions of a right-padded batch only.

RecBole pads every sequence on the right to ``MAX_ITEM_LIST_LENGTH``; on Amazon Beauty 4-6x more
positions are padding than items. For a causal encoder that reads the last valid position, the
outputs at real positions do not depend on what follows them, so a batch can be cut into groups of
similar length, each truncated to its own longest sequence, with exactly the same result.
"""

from typing import Callable, List

import torch

#: per-group fixed cost, in padded positions: what one more encoder call costs in Python and
#: small-op overhead, expressed as the positions that would cost the same (see :func:`length_groups`)
GROUP_OVERHEAD = 32


def length_groups(lengths: torch.Tensor, overhead: int = GROUP_OVERHEAD) -> List[torch.Tensor]:
    """Indices of the batch cut into groups of sequences with similar ``lengths``.

    Sequences are sorted by length and cut where a cut saves more padded positions than one more
    group costs (``overhead`` positions): a dynamic programme over the distinct lengths minimising
    ``sum_g (size_g * max_length_g + overhead)``. Returns index tensors in increasing length.
    """
    order = torch.argsort(lengths, stable=True)
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    best, cut = [0.0] + [float("inf")] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            cost = best[i] + (cum[j] - cum[i]) * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(values)
    while j > 0:
        bounds.append((cum[cut[j]], cum[j]))
        j = cut[j]
    return [order[lo:hi] for lo, hi in reversed(bounds)]


def _cat(parts, inverse):
    """Concatenates per-group outputs (tensors with the batch first, or lists/tuples of them,
    or ``None``) and puts the rows back in the batch's order."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[k] for p in parts], inverse) for k in range(len(first)))
    return torch.cat(parts)[inverse]


def by_length(encode: Callable, item_seq: torch.Tensor, item_seq_len: torch.Tensor,
              overhead: int = GROUP_OVERHEAD):
    """``encode(item_seq[g, :max_len_g], item_seq_len[g])`` for each group ``g`` of
    :func:`length_groups`, outputs reassembled in the batch's order. ``encode`` must return
    per-sequence outputs (batch first), or lists/tuples of them (``None`` allowed)."""
    groups = length_groups(item_seq_len, overhead)
    if len(groups) == 1:
        return encode(item_seq[:, :int(item_seq_len.max())], item_seq_len)
    parts = [encode(item_seq[idx, :int(item_seq_len[idx[-1]])], item_seq_len[idx]) for idx in groups]
    inverse = torch.empty_like(item_seq_len)
    inverse[torch.cat(groups)] = torch.arange(len(item_seq_len), device=item_seq_len.device)
    return _cat(parts, inverse)
