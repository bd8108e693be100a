"""Dropout with a cheaper random mask on CPUs."""

import torch
import torch.nn as nn

_LEVELS = 2 ** 16


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask costs a quarter of the random numbers.

    On a CPU ``nn.Dropout`` draws one Bernoulli sample per element from torch's scalar generator,
    which made dropout ~10% of a FindRec training step. Here one 64-bit draw gives four 16-bit
    uniforms, and an element is kept when its uniform is at or above ``round(p * 2^16)``: the drop
    rate is ``p`` to within ``2^-17`` and the kept elements are scaled by the exact inverse of the
    keep rate, so the expectation is unchanged. Draws come from torch's global generator, so
    ``init_seed`` makes runs repeatable. Other devices use ``nn.Dropout`` itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        drop = round(self.p * _LEVELS)
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
        keep = bits.view(x.shape) >= drop - _LEVELS // 2
        return x * keep.to(x.dtype).mul_(_LEVELS / (_LEVELS - drop))
