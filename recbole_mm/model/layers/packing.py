"""Running a causal sequence encoder on the real positions of a right-padded batch only.

RecBole pads every sequence on the right to ``MAX_ITEM_LIST_LENGTH``; on the FindRec paper's Amazon
Beauty ~4x more positions are padding than items. For a causal encoder that reads the last valid
position, the outputs at real positions do not depend on what follows them, so the real positions
can be packed end to end, ``[N, d]`` for ``N = sum(lengths)``, with exactly the padded batch's
result: position-wise maps (projections, norms, FFNs, dropout) run on the ``N`` rows at once, and
the two layers that mix positions, the causal convolution and the selective scan, are told where
each sequence starts (:class:`~recbole_mm.model.layers.mamba.Mamba`).

Packing replaced cutting the batch into groups of similar length, each padded to its longest
sequence (one encoder call per group): on the paper's Beauty a batch of 128 became ~7 groups
holding ~15% padding, and each call's fixed cost was worth ~32 positions at width 256. Measured
there (FindRec at the paper's size, one thread, docs/results/findrec-speed.md) a step over the
same positions in one padding-free call took 0.75x the grouped step's time.
"""

from typing import Optional

import torch


class Packing:
    """The real positions of a right-padded batch with ``item_seq_len``, packed in batch order.

    With ``enabled`` false, or off a CPU (on a GPU padded positions cost almost nothing while
    every extra kernel launch does: docs/results/findrec-speed.md, "On a GPU"), the batch stays
    padded and every method is the padded computation: :meth:`pack` and :meth:`unpack` return
    their input, :meth:`last` gathers each row's last valid position, and :attr:`layout` is
    ``None``, which the Mamba layers read as "padded".
    """

    def __init__(self, item_seq_len: torch.Tensor, length: int, enabled: bool = True):
        self.enabled = enabled and item_seq_len.device.type == "cpu"
        self.lengths = item_seq_len
        self.width = int(item_seq_len.max()) if self.enabled else length
        positions = torch.arange(self.width, device=item_seq_len.device)
        #: ``[B, width]``: which positions of the (cut) padded batch are real, in either layout
        self.mask = positions < item_seq_len[:, None]
        if self.enabled:
            #: row offsets of the sequences in the packed rows (``B + 1``; the scan kernel's layout)
            self.offsets = torch.cat([item_seq_len.new_zeros(1), torch.cumsum(item_seq_len, 0)])
            #: each packed row's position in its sequence (the convolution's left edge)
            self.position = positions.expand_as(self.mask)[self.mask]
            self._last = self.offsets[1:] - 1

    @property
    def layout(self) -> Optional["Packing"]:
        """What the Mamba layers take: this packing, or ``None`` for a padded batch."""
        return self if self.enabled else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` (``L >=`` the longest sequence) -> ``[N, ...]``: the real positions."""
        return x[:, :self.width][self.mask] if self.enabled else x

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[B, width, ...]``, zero at padded positions (differentiable)."""
        if not self.enabled:
            return x
        out = x.new_zeros(self.mask.shape + x.shape[1:])
        return out.index_put((self.mask,), x)

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's state at its last valid position: ``[B, ...]``."""
        if self.enabled:
            return x[self._last]
        return x[torch.arange(x.shape[0], device=x.device), self.lengths - 1]
