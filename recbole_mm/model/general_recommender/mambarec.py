"""MambaRec: Modality Alignment with Multi-scale Bilateral Attention for Multimodal Recommendation.

Reference: Kelin Ren, Chan-Yang Ju, Dong-Ho Lee. CIKM'25 (arXiv 2509.09114); choices the paper leaves
open are fixed by SPEC §3 and written down here.

Pipeline, per modality ``m`` of the config's ``modalities`` (any number >= 1):

0. feature normalisation (``feature_norm``): ``none`` (as given), ``l2`` (unit rows) or ``standard``
   (zero-mean unit-variance columns over the items that have features); the normalised matrix is
   both the model's input and what the kNN graph of step 3 is built from. Raw feature scales differ
   widely between datasets (TikTok's image rows have norm ~33 and a mean cosine of 0.86 between
   items, its audio rows norm ~4.5), which the paper's datasets and MGCN's code never meet;
1. dimension reduction (eq. 12-13): ``x_m -> W_m x_m`` with ``d = floor(min_m D_m / r)``
   (``reduction_ratio`` r, the minimum over *all* configured modalities), one linear map each;
2. local alignment: :class:`~recbole_mm.model.layers.dream.DREAM` (sec. 4.1) on a ``C x H x W`` view
   of the ``d``-vector, output ``embedding_size``; one DREAM per modality unless ``dream_shared``;
   ``use_dream: false`` (the paper's "w/o LA") replaces it by a linear map ``d -> embedding_size``;
3. multi-view encoder (sec. 4.4, MGCN's design, Yu et al. MM'23): a LightGCN over the normalised
   user-item graph on the ID embeddings gives the content view ``e_id`` (mean over the
   ``n_ui_layers + 1`` layers); per modality the modality embedding ``h^m`` passes an optional
   LayerNorm and dropout (``modality_layernorm``, ``modality_dropout``; the authors' code applies
   both, dropout 0.2), then the purifier ``q_i * sigmoid(W h_i^m)`` gates the item-ID embedding,
   the result is propagated ``n_mm_layers`` times over the frozen item-item kNN graph of the
   (normalised) features, and users get ``D_u^-1/2 R D_i^-1/2`` times the item view; an attention
   fuser (softmax over modalities of ``w^T tanh(W v)``) forms the common view, each modality's
   specific part ``v_m - common`` is scaled by a preference gate ``sigmoid(W_m e_id)``, and
   ``e_side = (common + sum_m specific_m) / (M + 1)``; final ``e* = e_id + e_side`` for users and
   items, score ``e*_u . e*_i`` (eq. 14).

Loss (eq. 16): ``BPR + cl_weight * InfoNCE + mmd_weight * MMD^2 + reg_weight * L2``, computed on the
batch's distinct positive items (and distinct users). InfoNCE (temperature ``cl_temp``), by
``cl_views``: ``modalities`` = eq. 10 read literally, between two modality item views of the same
item (averaged over modality pairs, none with one modality); ``side_content`` = what MGCN and the
authors' code do, ``InfoNCE(e_side, e_id)`` on the items plus the same on the users (any number of
modalities). MMD^2 (sec. 4.2): unbiased, Gaussian kernel summed over ``mmd_bandwidth``, between two
modalities (pairs averaged), on what ``mmd_input`` names: ``views`` = the modality item views of
step 3 (gated ID embeddings, far smaller than a bandwidth of 1: on TikTok the logged term stays
0.0000, i.e. it has no effect),
``embeddings`` = the L2-normalised modality embeddings ``h^m`` (the authors' code; eq. 7's "image and
text feature sets"). ``use_mmd: false`` is "w/o GA" (MMD off); ``use_cl`` switches InfoNCE. The
L2 term is on the batch's ego ID embeddings (``sum ||e||^2 / (2 B)``, RecBole's ``EmbLoss``, as
RecBole's LightGCN; MGCN puts it on the final embeddings), not on every parameter; the paper's
"weight decay 1e-4" is this ``reg_weight`` (RecBole's ``weight_decay`` is 0).

Evaluation: the final user/item embeddings are computed once per evaluation and cached
(``restore_user_e`` / ``restore_item_e``, as RecBole's LightGCN); ``full_sort_predict`` is one matrix
product. The cache is dropped on ``train()`` / ``eval()`` and in ``calculate_loss``.

Hyperparameters (``properties/model/MambaRec.yaml``): embedding_size, reduction_ratio, knn_k,
n_ui_layers, n_mm_layers, feature_norm, modality_layernorm, modality_dropout, cl_weight, cl_temp,
cl_views, mmd_weight, mmd_bandwidth, mmd_input, reg_weight, use_dream, use_mmd, use_cl,
dream_map_shape, dream_dilations, dream_branch_channels, dream_att_reduction, dream_shared. The
views come from the dataset (``modalities``).
"""

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_uniform_initialization
from recbole.utils import InputType
from torch import nn

from recbole_mm.data.locate import cache_dir
from recbole_mm.model.layers.dream import DREAM
from recbole_mm.model.layers.graph import (
    load_or_build_knn_graph,
    normalized_bipartite_adjacency,
    normalized_interaction_matrix,
)
from recbole_mm.model.loss.mixins import AlignmentLossMixin, BPRLossMixin, EmbRegLossMixin

logger = logging.getLogger(__name__)


FEATURE_NORMS = ("none", "l2", "standard")


def normalize_features(features: torch.Tensor, mode: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalise a raw feature matrix ``[n_items, D]`` (config ``feature_norm``).

    ``none``: as given; ``l2``: each row scaled to unit norm; ``standard``: each column centred and
    scaled to unit variance, the statistics taken over the items that have features (``mask``,
    default: rows not all zero). Rows without features (the padding row 0, masked items) stay zero.
    """
    if mode not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {mode!r}")
    feats = features.float()
    if mode == "none":
        return feats
    valid = feats.abs().sum(1) > 0
    if mask is not None:
        valid = valid & mask.to(valid.device).bool()
    out = torch.zeros_like(feats)
    rows = feats[valid]
    if mode == "l2":
        out[valid] = F.normalize(rows, dim=1)
    else:
        mean, std = rows.mean(0), rows.std(0, unbiased=False)
        out[valid] = (rows - mean) / std.clamp_min(1e-8)  # constant columns become 0
    return out


class ModalityView(nn.Module):
    """One modality's item view: reduce (eq. 12) -> refine (DREAM or linear) -> [LayerNorm ->
    dropout] -> purify the item-ID embedding -> propagate over the modality's kNN graph.

    ``features`` ``[n_items, D]`` and ``item_graph`` (sparse ``[n_items, n_items]``) are constant,
    non-persistent buffers: they are rebuilt from the dataset, never stored in checkpoints.
    """

    def __init__(self, features: torch.Tensor, item_graph: torch.Tensor, d: int, emb: int,
                 refine: nn.Module, n_layers: int, layernorm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("item_graph", item_graph, persistent=False)
        self.reduce = nn.Linear(features.shape[1], d)
        self.refine = refine
        self.norm = nn.LayerNorm(emb) if layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(emb, emb)
        self.n_layers = n_layers

    def modality_embeddings(self) -> torch.Tensor:
        """``h^m = refine(W_m x_m)`` for every item, ``[n_items, emb]``."""
        return self.refine(self.reduce(self.features))

    def forward(self, item_id_emb: torch.Tensor, return_embeddings: bool = False):
        """The item view ``[n_items, emb]``; with ``return_embeddings`` also ``h^m``."""
        # MGCN's purifier: the modality decides which ID dimensions are kept for this view; the
        # authors' code normalises (LayerNorm) and drops out h^m first, so the gate's input has unit
        # scale whatever the scale of the raw features
        h = self.modality_embeddings()
        view = item_id_emb * torch.sigmoid(self.gate(self.dropout(self.norm(h))))
        for _ in range(self.n_layers):
            view = torch.sparse.mm(self.item_graph, view)
        return (view, h) if return_embeddings else view


class ViewFuser(nn.Module):
    """MGCN's fuser of ``M`` modality views ``[n, emb]`` given the content (ID) view ``[n, emb]``:
    attention-weighted common part plus preference-gated modality-specific parts."""

    def __init__(self, emb: int, n_views: int):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(emb, emb), nn.Tanh(), nn.Linear(emb, 1, bias=False))
        self.prefer = nn.ModuleList(nn.Sequential(nn.Linear(emb, emb), nn.Sigmoid()) for _ in range(n_views))

    def forward(self, views: List[torch.Tensor], content: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(views, dim=1)  # [n, M, emb]
        weights = torch.softmax(self.query(stacked), dim=1)  # [n, M, 1]
        common = (weights * stacked).sum(1)
        specific = [(v - common) * prefer(content) for v, prefer in zip(views, self.prefer)]
        return (common + sum(specific)) / (len(views) + 1)


class MambaRec(BPRLossMixin, EmbRegLossMixin, AlignmentLossMixin, GeneralRecommender):
    """MambaRec (CIKM'25); see the module docstring for the architecture and hyperparameters."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.modalities = list(getattr(dataset, "modalities", None) or [])
        if not self.modalities:
            raise ValueError("MambaRec needs item features: set `modalities` (e.g. [image, text]) for the dataset")
        emb = config["embedding_size"]
        ratio = config["reduction_ratio"]
        knn_k = config["knn_k"]
        n_mm_layers = config["n_mm_layers"]
        self.n_ui_layers = config["n_ui_layers"]
        self.cl_weight = config["cl_weight"]
        self.mmd_weight = config["mmd_weight"]
        self.reg_weight = config["reg_weight"]
        self.use_cl = config["use_cl"]
        self.use_mmd = config["use_mmd"]
        self.cl_views = config["cl_views"] or "modalities"
        if self.cl_views not in ("modalities", "side_content"):
            raise ValueError(f"cl_views must be 'modalities' or 'side_content', got {self.cl_views!r}")
        feature_norm = config["feature_norm"] or "none"
        self.mmd_input = config["mmd_input"] or "embeddings"
        if self.mmd_input not in ("views", "embeddings"):
            raise ValueError(f"mmd_input must be 'views' or 'embeddings', got {self.mmd_input!r}")
        if len(self.modalities) < 2 and (self.use_cl or self.use_mmd):
            logger.info("MambaRec with one modality %s: no cross-modal alignment loss", self.modalities)

        features = {m: normalize_features(dataset.item_features[m], feature_norm, dataset.item_feature_mask[m])
                    for m in self.modalities}
        dims = {m: f.shape[1] for m, f in features.items()}
        d = min(dims.values()) // ratio  # eq. 13, min over every configured modality
        if d < 1:
            raise ValueError(f"reduction_ratio {ratio} leaves no dimension for feature sizes {dims}")

        use_dream = config["use_dream"]
        dream_args = dict(map_shape=config["dream_map_shape"], dilations=config["dream_dilations"],
                          branch_channels=config["dream_branch_channels"], att_reduction=config["dream_att_reduction"])

        def refine() -> nn.Module:
            return DREAM(d, emb, **dream_args) if use_dream else nn.Linear(d, emb)

        shared = refine() if config["dream_shared"] else None
        graph_dir = cache_dir(config)
        self.views = nn.ModuleList(
            ModalityView(
                features[m],
                load_or_build_knn_graph(features[m], knn_k, graph_dir, name=m, mask=dataset.item_feature_mask[m]),
                d, emb, shared if shared is not None else refine(), n_mm_layers,
                layernorm=bool(config["modality_layernorm"]), dropout=float(config["modality_dropout"] or 0.0),
            )
            for m in self.modalities
        )
        self.fuser = ViewFuser(emb, len(self.modalities))
        self.user_embedding = nn.Embedding(self.n_users, emb)
        self.item_embedding = nn.Embedding(self.n_items, emb)

        inter = dataset.inter_matrix(form="coo")
        users, items = torch.from_numpy(inter.row).long(), torch.from_numpy(inter.col).long()
        self.register_buffer("ui_adj", normalized_bipartite_adjacency(users, items, self.n_users, self.n_items),
                             persistent=False)
        self.register_buffer("ui_mat", normalized_interaction_matrix(users, items, self.n_users, self.n_items),
                             persistent=False)
        self.init_alignment_losses(config["mmd_bandwidth"], config["cl_temp"])
        self.restore_user_e: Optional[torch.Tensor] = None
        self.restore_item_e: Optional[torch.Tensor] = None
        self.apply(xavier_uniform_initialization)  # the paper initialises with Xavier (sec. 5.1.4)

    def train(self, mode: bool = True):
        # parameters may change from here on: the evaluation cache is stale
        self.restore_user_e = self.restore_item_e = None
        return super().train(mode)

    def _content_view(self) -> torch.Tensor:
        """LightGCN over the ID embeddings: mean of layers ``0..n_ui_layers``, ``[n_users + n_items, emb]``."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = [ego]
        for _ in range(self.n_ui_layers):
            layers.append(torch.sparse.mm(self.ui_adj, layers[-1]))
        return torch.stack(layers).mean(0)

    def _encode(self):
        """``(users e*, items e*, per-modality item views, e_side, e_id, per-modality h^m)``;
        ``e_side`` and ``e_id`` are ``[n_users + n_items, emb]``."""
        content = self._content_view()
        item_views, embeddings = zip(*(view(self.item_embedding.weight, return_embeddings=True) for view in self.views))
        item_views, embeddings = list(item_views), list(embeddings)
        views = [torch.cat([torch.sparse.mm(self.ui_mat, v), v]) for v in item_views]
        side = self.fuser(views, content)
        users, items = torch.split(content + side, [self.n_users, self.n_items])
        return users, items, item_views, side, content, embeddings

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Final user and item embeddings ``e*`` and the per-modality item views (for eq. 16)."""
        return self._encode()[:3]

    def calculate_loss(self, interaction):
        self.restore_user_e = self.restore_item_e = None
        user, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        users, items, item_views, side, content, embeddings = self._encode()
        u = users[user]
        bpr = self.bpr_loss((u * items[pos]).sum(-1), (u * items[neg]).sum(-1))  # eq. 15
        reg = self.emb_reg_loss(self.user_embedding(user), self.item_embedding(pos), self.item_embedding(neg))
        zero = bpr.new_zeros(())
        mmd, cl = zero, zero
        batch_items = torch.unique(pos)  # each item once: duplicates would be false InfoNCE negatives
        # the unbiased MMD needs two items; a last batch of one item has no alignment term. Only the
        # terms that count are computed ("w/o GA" computes no MMD, side_content no modality InfoNCE)
        modality_cl = self.use_cl and self.cl_views == "modalities"
        if (self.use_mmd or modality_cl) and len(item_views) > 1 and batch_items.numel() > 1:
            mmd_sets = None
            if self.use_mmd and self.mmd_input == "embeddings":  # the authors' code: L2-normalised h^m
                mmd_sets = [F.normalize(h[batch_items], dim=-1) for h in embeddings]
            mmd, cl = self.alignment_losses([v[batch_items] for v in item_views], mmd_sets,
                                            with_cl=modality_cl, with_mmd=self.use_mmd)
        if self.use_cl and self.cl_views == "side_content" and batch_items.numel() > 1:
            # MGCN's (and the authors' code's) InfoNCE: side view vs content view, items + users
            batch_users = torch.unique(user)
            side_u, side_i = torch.split(side, [self.n_users, self.n_items])
            content_u, content_i = torch.split(content, [self.n_users, self.n_items])
            cl = self.infonce_loss(side_i[batch_items], content_i[batch_items])
            if batch_users.numel() > 1:
                cl = cl + self.infonce_loss(side_u[batch_users], content_u[batch_users])
        return (
            bpr,
            self.cl_weight * cl if self.use_cl else zero,
            self.mmd_weight * mmd if self.use_mmd else zero,
            self.reg_weight * reg,
        )

    def _final_embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.restore_user_e is None or self.restore_item_e is None:
            with torch.no_grad():
                self.restore_user_e, self.restore_item_e, _ = self.forward()
        return self.restore_user_e, self.restore_item_e

    def predict(self, interaction):
        users, items = self._final_embeddings()
        return (users[interaction[self.USER_ID]] * items[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        users, items = self._final_embeddings()
        return (users[interaction[self.USER_ID]] @ items.T).view(-1)
