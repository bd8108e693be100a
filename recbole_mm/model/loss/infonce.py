"""InfoNCE between two views of the same items (MambaRec eq. 10).

Row ``i`` of ``a`` and row ``i`` of ``b`` describe the same item (e.g. its visual and its textual
view); every other row of ``b`` is a negative for ``a_i``. ``sim`` is the dot product of
L2-normalised vectors, divided by the temperature. As in eq. 10 the loss is one-directional
(``a`` is the anchor); duplicated items in a batch would act as false negatives, so callers pass
each item once.
"""

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """``-1/N sum_i log( exp(s_ii / tau) / sum_j exp(s_ij / tau) )`` with ``s = cos(a_i, b_j)``.

    Args:
        temperature: ``tau`` (MambaRec ``cl_temp``, 0.2).

    Shape: ``a, b: [N, d]``; output: scalar.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCE temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(
                f"InfoNCE needs two views of the same items, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        # 1/tau on the n rows of a rather than on the n x n logits
        logits = (F.normalize(a, dim=-1) / self.temperature) @ F.normalize(b, dim=-1).T
        # cross-entropy with the diagonal as target == eq. 10 (log-sum-exp is the stable form)
        return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))
