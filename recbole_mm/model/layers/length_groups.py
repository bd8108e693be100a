"""Running a causal sequence encoder on the real positions of a right-padded batch only.

RecBole pads every sequence on the right to ``MAX_ITEM_LIST_LENGTH``; on Amazon Beauty 4-6x more
positions are padding than items. For a causal encoder that reads the last valid position, the
outputs at real positions do not depend on what follows them, so a batch can be cut into groups of
similar length, each truncated to its own longest sequence, with exactly the same result.
"""

from typing import List

import torch

#: per-group fixed cost in padded positions, for models of width 256: one more encoder call costs
#: about what 32 positions do (measured on FindRec at paper size: 16-128 gave the same step time
#: within noise, one group 2x slower)
GROUP_OVERHEAD = 32


def group_overhead(width: int) -> int:
    """:data:`GROUP_OVERHEAD` for a model of ``width``: a position costs ~``width^2`` (its matrix
    products) while a call's fixed cost does not shrink, so narrow models want fewer, longer groups
    (measured on FindRec at width 64: 512 positions per group, 0.29-0.34 s a step, against
    0.35-0.55 s at 32)."""
    return max(8, round(GROUP_OVERHEAD * (256 / width) ** 2))


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


class LengthGroups:
    """A right-padded batch cut by :func:`length_groups` (or, with ``enabled`` false or on a GPU,
    the padded batch as it is: one group of full width).

    Groups are cut on a CPU only. On a GPU each group is one more pass of kernel launches while
    padded positions cost almost nothing: measured on an NVIDIA H200 (FindRec at the paper's size
    on the paper's Beauty, the PyTorch scan, docs/results/findrec-speed.md), a training epoch took
    79.5 s in groups and 15.1 s padded.

    :meth:`inputs` gives each group's ``(item_seq, item_seq_len)``; :meth:`merge` puts per-group
    outputs back into the batch's order; :meth:`split` cuts a batch-ordered tensor by group, so a
    later step can run per group on merged tensors (gradients then reach the merged ones).
    """

    def __init__(self, item_seq_len: torch.Tensor, enabled: bool = True, overhead: int = GROUP_OVERHEAD):
        self.enabled = enabled and item_seq_len.device.type == "cpu"
        self.groups = length_groups(item_seq_len, overhead) if self.enabled else [None]
        if len(self.groups) == 1:
            self.groups = [None]
            self.inverse = None
        else:
            self.inverse = torch.empty_like(item_seq_len)
            self.inverse[torch.cat(self.groups)] = torch.arange(len(item_seq_len), device=item_seq_len.device)

    def inputs(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor):
        for idx in self.groups:
            seq, lens = (item_seq, item_seq_len) if idx is None else (item_seq[idx], item_seq_len[idx])
            yield (seq[:, :int(lens.max())] if self.enabled else seq), lens

    def split(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [x if idx is None else x[idx] for idx in self.groups]

    def merge(self, parts):
        """Per-group outputs (tensors with the batch first, lists/tuples of them, or ``None``) in
        the batch's order."""
        first = parts[0]
        if first is None:
            return None
        if isinstance(first, (list, tuple)):
            return type(first)(self.merge([p[k] for p in parts]) for k in range(len(first)))
        return first if self.inverse is None else torch.cat(parts)[self.inverse]
