"""Running a causal sequence encoder on the real positions of a right-padded batch only.

RecBole pads every sequence on the right to ``MAX_ITEM_LIST_LENGTH``; on the FindRec paper's Amazon
Beauty ~4x more positions are padding than items. For a causal encoder that reads the last valid
position, the outputs at real positions do not depend on what follows them, so the real positions
can be packed end to end, ``[N, d]`` for ``N = sum(lengths)`` (rounded up: :data:`ROWS_MULTIPLE`),
with exactly the padded batch's result: position-wise maps (projections, norms, FFNs, dropout) run
on the ``N`` rows at once, and the two layers that mix positions, the causal convolution and the
selective scan, are told where each sequence starts (:class:`~recbole_mm.model.layers.mamba.Mamba`).

Packing replaced cutting the batch into groups of similar length, each padded to its longest
sequence (one encoder call per group): on the paper's Beauty a batch of 128 became ~7 groups
holding ~15% padding, and each call's fixed cost was worth ~32 positions at width 256. Measured
there (FindRec at the paper's size, one thread, docs/results/findrec-speed.md) a step over the
same positions in one padding-free call took 0.75x the grouped step's time.
"""

from typing import Optional

import torch

#: the packed row count is rounded up to a multiple of this with spare padded positions, which form
#: one more sequence after the real ones and which nothing reads. Why: the real rows vary from batch
#: to batch, and with new tensor sizes at every step glibc's heap kept growing (a paper-size FindRec
#: run reached 4.9 GB of RSS in 24 epochs; ~0.7 GB are live between steps); with a few sizes it
#: levels off (1.26 GB after 480 steps, docs/results/findrec-speed.md, "Memory"). On the paper's
#: Beauty an epoch's 263 row counts become 14, for 2.1% more rows (~31 on ~1,460 a batch).
ROWS_MULTIPLE = 64


class Packing:
    """The real positions of a right-padded batch with ``item_seq_len``, packed in batch order.

    With ``enabled`` false, or off a CPU (on a GPU padded positions cost almost nothing while
    every extra kernel launch does: docs/results/findrec-speed.md, "On a GPU"), the batch stays
    padded and every method is the padded computation: :meth:`pack` and :meth:`unpack` return
    their input, :meth:`last` gathers each row's last valid position, and :attr:`layout` is
    ``None``, which the Mamba layers read as "padded". Packed, the ``N`` rows are the real positions
    in batch order (the first :attr:`real`), then spare padded positions up to a multiple of
    ``rows_multiple`` (:data:`ROWS_MULTIPLE`).
    """

    def __init__(self, item_seq_len: torch.Tensor, length: int, enabled: bool = True,
                 rows_multiple: int = ROWS_MULTIPLE):
        self.enabled = enabled and item_seq_len.device.type == "cpu"
        self.lengths = item_seq_len
        self.width = int(item_seq_len.max()) if self.enabled else length
        positions = torch.arange(self.width, device=item_seq_len.device)
        #: ``[B, width]``: which positions of the (cut) padded batch are real, in either layout
        self.mask = positions < item_seq_len[:, None]
        if self.enabled:
            ends = torch.cumsum(item_seq_len, 0)
            #: how many packed rows are real positions
            self.real = real = int(ends[-1])
            spare = (~self.mask).nonzero()[:-real % rows_multiple]  # as many as the batch has
            #: (sequence, position) of each packed row in the padded batch: real ones, then spare padding
            self._rows = torch.cat([self.mask.nonzero(), spare]).unbind(1)
            #: row offsets of the sequences in the packed rows, the spare rows' last if any
            #: (``B + 1`` or ``B + 2``; the scan kernel's layout)
            bounds = [item_seq_len.new_zeros(1), ends]
            if len(spare):
                bounds.append(item_seq_len.new_full((1,), real + len(spare)))
            self.offsets = torch.cat(bounds)
            #: each packed row's position in its sequence (the convolution's left edge)
            self.position = torch.cat([self._rows[1][:real], torch.arange(len(spare), device=item_seq_len.device)])
            self._last = self.offsets[1:len(item_seq_len) + 1] - 1

    @property
    def layout(self) -> Optional["Packing"]:
        """What the Mamba layers take: this packing, or ``None`` for a padded batch."""
        return self if self.enabled else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` (``L >=`` the longest sequence) -> ``[N, ...]``: the real positions, then
        the spare rows."""
        return x[self._rows] if self.enabled else x

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[B, width, ...]``, zero at padded positions (differentiable)."""
        if not self.enabled:
            return x
        out = x.new_zeros(self.mask.shape + x.shape[1:])
        return out.index_put((self.mask,), x[:self.real])

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's state at its last valid position: ``[B, ...]``."""
        if self.enabled:
            return x[self._last]
        return x[torch.arange(x.shape[0], device=x.device), self.lengths - 1]
