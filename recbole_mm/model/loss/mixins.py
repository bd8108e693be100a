"""Loss mixins for the models of recbole-mm.

A model inherits the mixins it needs next to its RecBole base class, e.g.
``class MGCN(BPRLossMixin, EmbRegLossMixin, InfoNCELossMixin, GeneralRecommender)``, and
calls the ``init_*`` method of a mixin with hyperparameters from its ``__init__``. The
parameter-free losses (RecBole's ``BPRLoss`` and ``EmbLoss``) are class attributes, so they need no
set-up and add nothing to the ``state_dict``.
"""

from itertools import combinations
from typing import Sequence, Tuple

import torch
from recbole.model.loss import BPRLoss, EmbLoss

from recbole_mm.model.loss.infonce import InfoNCELoss
from recbole_mm.model.loss.kernels import Bandwidth
from recbole_mm.model.loss.mmd import MMDLoss


class BPRLossMixin:
    """``bpr_loss(pos, neg) = -mean log sigmoid(pos - neg)`` (RecBole's ``BPRLoss``)."""

    _bpr = BPRLoss()

    def bpr_loss(self, pos_score: torch.Tensor, neg_score: torch.Tensor) -> torch.Tensor:
        return self._bpr(pos_score, neg_score)


class EmbRegLossMixin:
    """``emb_reg_loss(*E) = sum_E ||E||_2^2 / (2 * batch)`` (RecBole's ``EmbLoss`` with
    ``require_pow=True``, the LightGCN convention); pass the batch's ego embeddings."""

    _emb_reg = EmbLoss(norm=2)

    def emb_reg_loss(self, *embeddings: torch.Tensor) -> torch.Tensor:
        return self._emb_reg(*embeddings, require_pow=True).squeeze()


class InfoNCELossMixin:
    """``infonce_loss(a, b)``: InfoNCE between two views of the same rows (MGCN eq. 10, MambaRec
    eq. 10), temperature ``cl_temp``."""

    def init_infonce_loss(self, cl_temp: float) -> None:
        self.infonce_loss = InfoNCELoss(cl_temp)


class AlignmentLossMixin(InfoNCELossMixin):
    """Global cross-modal alignment (MambaRec sec. 4.2): MMD^2 (eq. 7-9) and InfoNCE (eq. 10) on the
    same sets (one per modality, row ``i`` the same item in each), averaged over every pair of
    modalities (one pair for image/text)."""

    def init_alignment_losses(self, mmd_bandwidth: Bandwidth, cl_temp: float) -> None:
        self.mmd_loss = MMDLoss(mmd_bandwidth)
        self.init_infonce_loss(cl_temp)

    def alignment_losses(self, sets: Sequence[torch.Tensor], with_cl: bool = True,
                         with_mmd: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """``sets[m]: [N, d]``, row ``i`` the same item in every set. Returns ``(mmd, infonce)``;
        both are zero with fewer than two sets; ``with_cl=False`` / ``with_mmd=False`` skip the
        InfoNCE / the MMD (returned as zero, never computed)."""
        pairs = list(combinations(range(len(sets)), 2))
        zero = sets[0].new_zeros(()) if sets else torch.zeros(())
        mmd = sum(self.mmd_loss(sets[i], sets[j]) for i, j in pairs) / len(pairs) if pairs and with_mmd else zero
        cl = sum(self.infonce_loss(sets[i], sets[j]) for i, j in pairs) / len(pairs) if pairs and with_cl else zero
        return mmd, cl
