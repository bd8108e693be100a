"""MambaRec: Modality Alignment with Multi-scale Bilateral Attention for Multimodal Recommendation.

Reference: Kelin Ren, Chan-Yang Ju, Dong-Ho Lee. CIKM'25 (arXiv 2509.09114); choices the paper leaves
open are written down here and in ``docs/design.md``.

MambaRec is MGCN (:class:`~recbole_mm.model.general_recommender.mgcn.MGCN`, whose multi-view encoder
is the paper's sec. 4.4) with two changes: each modality's projection is eq. 12-13's reduction
followed by DREAM (local alignment), and the loss gains the global alignment terms. Per modality
``m`` of the config's ``modalities`` (any number >= 1):

0. feature normalisation (``feature_norm``): ``none`` (as given), ``l2`` (unit rows) or ``standard``
   (zero-mean unit-variance columns over the items that have features); the normalised matrix is
   both the model's input and what the kNN graph is built from. Raw feature scales differ widely
   between datasets (TikTok's image rows have norm ~33 and a mean cosine of 0.86 between items, its
   audio rows norm ~4.5), which the paper's datasets and MGCN's code never meet. The features are
   constant unless ``train_features`` (MGCN's and the authors' code train them);
1. dimension reduction (eq. 12-13): ``x_m -> W_m x_m`` with ``d = floor(min_m D_m / r)``
   (``reduction_ratio`` r, the minimum over *all* configured modalities), one linear map each;
   ``reduced_dim`` sets ``d`` directly (so that a single-modality ablation can keep the ``d`` of the
   full model);
2. local alignment: :class:`~recbole_mm.model.layers.dream.DREAM` (sec. 4.1) on a ``C x H x W`` view
   of the ``d``-vector, output ``embedding_size``; one DREAM per modality unless ``dream_shared``;
   ``use_dream: false`` (the paper's "w/o LA") replaces it by a linear map ``d -> embedding_size``;
3. MGCN's encoder: optional LayerNorm and dropout on the modality embedding ``h^m``
   (``modality_layernorm``, ``modality_dropout``; the authors' code applies both, dropout 0.2), the
   purifier gate on the item-ID embedding, ``n_mm_layers`` steps over the kNN graph, user views over
   the normalised user-item matrix, LightGCN content view (``n_ui_layers``), fuser, ``e* = e_id +
   e_side`` (eq. 14). With one modality the fuser's specific part is zero and ``e_side = v / 2``
   (MGCN's ``/(M + 1)``), half the scale of a view, or ``v`` with ``single_modality_side: full``.

Loss (eq. 16): ``BPR + cl_weight * InfoNCE + mmd_weight * MMD^2 + reg_weight * L2``. MMD^2 (sec. 4.2,
eq. 7-9): unbiased for paired samples, Gaussian kernel summed over ``mmd_bandwidth``. InfoNCE (eq. 10,
temperature ``cl_temp``) by ``cl_views``: ``modalities`` = on the same two sets the MMD compares
(positives = the same item); ``side_content`` = MGCN's ``InfoNCE(e_side, e_id)`` on the items plus the
same on the users (any number of modalities). Both alignment terms take each of the batch's positive
items once and are averaged over modality pairs (none with one modality). The sets are what
``mmd_input`` names: ``embeddings`` = the L2-normalised modality embeddings ``h^m`` (eq. 7's "image and
text feature sets", the authors' code); ``views`` = the modality item views (gated ID embeddings, far
smaller than a bandwidth of 1: on TikTok the logged MMD stays 0.0000). ``use_mmd: false`` is "w/o
GA"; ``use_cl`` switches InfoNCE; a switched-off term is not computed. The L2 term (``reg_embeddings``)
is on the batch's ego ID embeddings by default (``sum ||e||^2 / (2 B)``, RecBole's ``EmbLoss``, as
RecBole's LightGCN); the paper's "weight decay 1e-4" is this ``reg_weight`` (RecBole's
``weight_decay`` is 0).

Training and evaluation cost as in MGCN (row-wise parts, the user views and the last LightGCN layer
for the batch's rows only; cached final embeddings for evaluation). What MambaRec adds has exact
fast paths: DREAM's branches folded into one matrix product and its gating run block by block
(:mod:`recbole_mm.model.layers.dream`, "Cost"), the MMD and the InfoNCE with hand-written gradients,
computed with the value, over row blocks of their ``[N, N]`` matrices
(:mod:`recbole_mm.model.loss.mmd`, :mod:`recbole_mm.model.loss.infonce`). Per training step, batch
2048, one thread: ``benchmarks/mambarec_cost.py``.

Hyperparameters (``properties/model/MambaRec.yaml``): MGCN's (embedding_size, knn_k, n_ui_layers,
n_mm_layers, single_modality_side, feature_norm, train_features, modality_layernorm, modality_dropout,
cl_weight, cl_temp, reg_weight, reg_embeddings, log_loss_terms) and reduction_ratio, reduced_dim, cl_views, mmd_weight, mmd_bandwidth,
mmd_input, use_dream, use_mmd, use_cl, dream_map_shape, dream_dilations, dream_branch_channels,
dream_att_reduction, dream_shared. The views come from the dataset (``modalities``).
"""


import logging
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.general_recommender.mgcn import MGCN, Encoding
from recbole_mm.model.layers.dream import DREAM
from recbole_mm.model.loss.mixins import AlignmentLossMixin

logger = logging.getLogger(__name__)

CL_VIEWS = ("modalities", "side_content")
MMD_INPUTS = ("embeddings", "views")


class MambaRec(AlignmentLossMixin, MGCN):
    """MambaRec (CIKM'25); see the module docstring for the architecture and hyperparameters."""

    loss_names = ("bpr", "cl", "mmd", "reg")

    def __init__(self, config, dataset):
        cl_views = config["cl_views"]
        if cl_views not in CL_VIEWS:
            raise ValueError(f"cl_views must be one of {CL_VIEWS}, got {cl_views!r}")
        mmd_input = config["mmd_input"]
        if mmd_input not in MMD_INPUTS:
            raise ValueError(f"mmd_input must be one of {MMD_INPUTS}, got {mmd_input!r}")
        super().__init__(config, dataset)
        self.cl_views, self.mmd_input = cl_views, mmd_input
        self.use_cl = config["use_cl"]
        self.use_mmd = config["use_mmd"]
        self.mmd_weight = config["mmd_weight"]
        if len(self.modalities) < 2 and (self.use_cl or self.use_mmd):
            logger.info("MambaRec with one modality %s: no cross-modal alignment loss", self.modalities)
        self.init_alignment_losses(config["mmd_bandwidth"], config["cl_temp"])

    def modality_refiner(self, config, dims: Dict[str, int], emb: int) -> Tuple[int, Callable[[], nn.Module]]:
        """Eq. 12-13's ``d`` and DREAM (or, "w/o LA", a linear map) from ``d`` to ``emb``."""
        ratio = config["reduction_ratio"]
        d = config["reduced_dim"] or min(dims.values()) // ratio  # eq. 13, min over every configured modality
        if d < 1:
            raise ValueError(f"reduction_ratio {ratio} leaves no dimension for feature sizes {dims}")
        use_dream = config["use_dream"]
        dream_args = dict(map_shape=config["dream_map_shape"], dilations=config["dream_dilations"],
                          branch_channels=config["dream_branch_channels"], att_reduction=config["dream_att_reduction"])

        def make() -> nn.Module:
            return DREAM(d, emb, **dream_args) if use_dream else nn.Linear(d, emb)

        if config["dream_shared"]:
            shared = make()
            return d, lambda: shared
        return d, make

    def uses_side_content_cl(self) -> bool:
        return self.use_cl and self.cl_views == "side_content"

    def alignment_sets(self, enc: Encoding, items: torch.Tensor) -> List[torch.Tensor]:
        """The per-modality sets both alignment terms compare, rows = ``items`` (``mmd_input``)."""
        if self.mmd_input == "embeddings":  # the authors' code: L2-normalised h^m
            return [F.normalize(h[items], dim=-1) for h in enc.embeddings]
        return [v[items] for v in enc.item_views]

    def loss_terms(self, interaction):
        """MGCN's terms with eq. 10's InfoNCE (``cl_views: modalities``) and the MMD (eq. 7-9)."""
        terms, enc, pos_items = super().loss_terms(interaction)
        bpr, cl, reg = terms["bpr"], terms["cl"], terms["reg"]
        mmd = bpr.new_zeros(())
        modality_cl = self.use_cl and self.cl_views == "modalities"
        # the unbiased MMD needs two items; a last batch of one item has no alignment term
        if (self.use_mmd or modality_cl) and len(self.views) > 1 and pos_items.numel() > 1:
            mmd, align_cl = self.alignment_losses(self.alignment_sets(enc, pos_items),
                                                  with_cl=modality_cl, with_mmd=self.use_mmd)
            if modality_cl:
                cl = self.cl_weight * align_cl
        zero = bpr.new_zeros(())
        terms = {"bpr": bpr, "cl": cl if self.use_cl else zero,
                 "mmd": self.mmd_weight * mmd if self.use_mmd else zero, "reg": reg}
        return terms, enc, pos_items
