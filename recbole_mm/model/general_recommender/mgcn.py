"""MGCN: Multi-View Graph Convolutional Network for Multimedia Recommendation.

Reference: Penghang Yu, Zhiyi Tan, Guanming Lu, Bing-Kun Bao. ACM MM'23 (arXiv 2308.03588).

Per modality ``m`` of the dataset's ``modalities`` (any number >= 1):

1. the (optionally normalised, ``feature_norm``) item features ``x_m`` are projected to the
   embedding size, ``h^m = W_m x_m + b_m``; the features are trainable (``train_features``, as in
   MGCN's code), the kNN graph is built from their initial values;
2. behaviour-guided purifier (eq. 3): ``e_id * sigmoid(W h^m + b)`` keeps the ID dimensions the
   modality supports;
3. item-item view (eq. 4): the purified item embeddings are propagated ``n_mm_layers`` times over
   the frozen kNN graph of the modality (``knn_k`` neighbours; see
   :mod:`recbole_mm.model.layers.graph` for its normalisation); users get the normalised user-item
   matrix ``D_u^-1/2 R D_i^-1/2`` times the item view (eq. 5);
4. user-item view (eq. 1-2): LightGCN over the ID embeddings, mean of layers ``0..n_ui_layers``:
   the content view ``e_id``;
5. behaviour-aware fuser (eq. 7-9): attention over the modality views gives the common part, each
   view's specific part ``v_m - common`` is gated by ``sigmoid(W_m e_id)``;
   ``e_side = (common + sum_m specific_m) / (M + 1)`` (with one modality ``v / 2``, or ``v`` with
   ``single_modality_side: full``); final ``e* = e_id + e_side``, score ``e*_u . e*_i``.

Loss (eq. 10-13): ``BPR + cl_weight * (InfoNCE(e_side, e_id) on the batch's items + the same on its
users) + reg_weight * L2``, InfoNCE temperature ``cl_temp``. The L2 term is RecBole's ``EmbLoss``
(``sum ||e||^2 / (2 B)``) on the batch's final embeddings (``reg_embeddings: final``, MGCN's code) or
on its ego ID embeddings (``ego``, RecBole's LightGCN). The InfoNCE takes each user and item of the
batch once (MGCN's code repeats them, which makes a repeated row a false negative of itself).
Every linear and embedding weight is Xavier-initialised (RecBole's ``xavier_uniform_initialization``;
MGCN's code does so for the embedding tables and keeps torch's default for the linear layers).

Training computes what the loss needs: every LightGCN layer but the last and the item views of all
items (the propagation needs them whole); the last layer, the user views (eq. 5) and the fuser for
the batch's distinct users and items only (each is row-wise, so the result is the same). On the CPU
eq. 5 for a batch's users touches only their rows of ``R``: a batch picks users in proportion to
their degree, so a TikTok batch's ~700 users still hold 43k of the matrix's 60k entries, but the
product over them writes ~700 rows instead of every user's, forward and backward (gathering those
entries with torch ops instead measured 4x slower than the product over all users). The sparse
products are :func:`~recbole_mm.model.layers.graph.sparse_matmul`'s, LightGCN's on the two
user-item blocks of its adjacency (:meth:`MGCN._content_view`). Evaluation computes every user and
item once and caches them (``restore_user_e`` / ``restore_item_e``, as RecBole's LightGCN);
``full_sort_predict`` is one matrix product. The cache is dropped on ``train()`` / ``eval()`` and in
``calculate_loss``.

Hyperparameters (``properties/model/MGCN.yaml``): embedding_size, knn_k, n_ui_layers, n_mm_layers,
single_modality_side, feature_norm, train_features, modality_layernorm, modality_dropout, cl_weight,
cl_temp, reg_weight, reg_embeddings; ``log_loss_terms`` (~ = off) logs each term's value and gradient at ``h^m`` per
epoch (:class:`~recbole_mm.model.loss.term_log.LossTermLog`). MambaRec (:mod:`recbole_mm.model.general_recommender.mambarec`) is this model with
DREAM in place of the projection and MMD / InfoNCE alignment added to the loss.
"""

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_uniform_initialization
from recbole.utils import InputType
from torch import nn

from recbole_mm.model.abstract_recommender import CachedDotProductMixin
from recbole_mm.model.layers.gather import gather_rows
from recbole_mm.model.layers.graph import (
    load_or_build_knn_graph,
    normalized_interaction_matrix,
    sparse_matmul,
)
from recbole_mm.model.layers.item_features import dataset_features
from recbole_mm.model.layers.multiview import ModalityView, ViewFuser
from recbole_mm.model.loss.mixins import BPRLossMixin, EmbRegLossMixin, InfoNCELossMixin
from recbole_mm.model.loss.term_log import LossTermLog

REG_EMBEDDINGS = ("ego", "final")


class Encoding(NamedTuple):
    """What one pass of the encoder returns for the selected users and items (all of them when no
    selection is given): final ``e*``, side view ``e_side``, content view ``e_id``; plus the item
    views and the modality embeddings ``h^m`` of *every* item, one tensor per modality."""

    users: torch.Tensor
    items: torch.Tensor
    side_users: torch.Tensor
    side_items: torch.Tensor
    content_users: torch.Tensor
    content_items: torch.Tensor
    item_views: List[torch.Tensor]
    embeddings: List[torch.Tensor]


class MGCN(CachedDotProductMixin, BPRLossMixin, EmbRegLossMixin, InfoNCELossMixin, GeneralRecommender):
    """MGCN (MM'23); see the module docstring for the architecture and hyperparameters."""

    input_type = InputType.PAIRWISE
    #: the terms of :meth:`calculate_loss`, in order (logged under these names)
    loss_names = ("bpr", "cl", "reg")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        features = dataset_features(dataset, type(self).__name__, config["feature_norm"])
        self.modalities = list(features)
        self.reg_embeddings = config["reg_embeddings"]
        if self.reg_embeddings not in REG_EMBEDDINGS:
            raise ValueError(f"reg_embeddings must be one of {REG_EMBEDDINGS}, got {self.reg_embeddings!r}")
        emb = config["embedding_size"]
        self.n_ui_layers = config["n_ui_layers"]
        self.cl_weight = config["cl_weight"]
        self.reg_weight = config["reg_weight"]
        masks = dataset.item_feature_mask
        d, refiner = self.modality_refiner(config, {m: f.shape[1] for m, f in features.items()}, emb)
        graph_dir = dataset.cache_dir
        self.views = nn.ModuleList(
            ModalityView(
                features[m],
                load_or_build_knn_graph(features[m], config["knn_k"], graph_dir, name=m, mask=masks[m]),
                d, emb, refiner(), config["n_mm_layers"],
                layernorm=bool(config["modality_layernorm"]), dropout=float(config["modality_dropout"]),
                train_features=bool(config["train_features"]),
            )
            for m in self.modalities
        )
        self.fuser = ViewFuser(emb, len(self.modalities), config["single_modality_side"])
        self.user_embedding = nn.Embedding(self.n_users, emb)
        self.item_embedding = nn.Embedding(self.n_items, emb)

        inter = dataset.inter_matrix(form="coo")
        users, items = torch.from_numpy(inter.row).long(), torch.from_numpy(inter.col).long()
        ui_mat = normalized_interaction_matrix(users, items, self.n_users, self.n_items)
        # the user-item block of LightGCN's adjacency and its transpose: the content view and eq. 5
        self.register_buffer("ui_mat", ui_mat, persistent=False)
        self.register_buffer("ui_mat_t", ui_mat.t().coalesce(), persistent=False)
        self.init_infonce_loss(config["cl_temp"])
        # log_loss_terms (~ = off): each term's value and gradient at h^m, logged per epoch
        self.term_log = LossTermLog.from_config(config["log_loss_terms"], "bpr", "h^m")
        self.logger = logging.getLogger()
        self.apply(xavier_uniform_initialization)
        self.init_cold_items(config, dataset)  # cold_item_neighbours

    def modality_refiner(self, config, dims: Dict[str, int], emb: int) -> Tuple[int, Callable[[], nn.Module]]:
        """``(d, make)``: each modality's features are projected linearly to ``d`` values, then
        ``make()`` (one call per modality) maps them to ``emb``. MGCN: ``d = emb``, identity."""
        return emb, nn.Identity

    def _content_view(self, users: Optional[torch.Tensor] = None,
                      items: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """LightGCN over the ID embeddings: mean of layers ``0..n_ui_layers``, ``(users, items)``, at the
        users and items given (indices; all when None).

        A layer is the product with ``D^-1/2 [[0, R], [R^T, 0]] D^-1/2``, computed as its two blocks:
        users from items by ``ui_mat``, items from users by its transpose (same sums; on TikTok's
        graph the two block products take 2 ms where the whole ``[n, n]`` one takes 5 ms, one thread).
        Every layer but the last is needed whole, to propagate; the last only at the rows asked for."""
        users_l = total_u = self.user_embedding.weight
        items_l = total_i = self.item_embedding.weight
        for _ in range(self.n_ui_layers - 1):
            users_l, items_l = (sparse_matmul(self.ui_mat, items_l, self.ui_mat_t),
                                sparse_matmul(self.ui_mat_t, users_l, self.ui_mat))
            # running sums: no [n_ui_layers + 1, n, emb] stack to copy and average
            total_u, total_i = total_u + users_l, total_i + items_l
        if users is not None:
            total_u = total_u[users]
        if items is not None:
            total_i = total_i[items]
        if self.n_ui_layers > 0:
            total_u = total_u + sparse_matmul(self.ui_mat, items_l, self.ui_mat_t, rows=users)
            total_i = total_i + sparse_matmul(self.ui_mat_t, users_l, self.ui_mat, rows=items)
        return total_u / (self.n_ui_layers + 1), total_i / (self.n_ui_layers + 1)

    def encode(self, users: Optional[torch.Tensor] = None, items: Optional[torch.Tensor] = None) -> Encoding:
        """The encoder for the users and items given (indices; all when None), see :class:`Encoding`."""
        content_u, content_i = self._content_view(users, items)
        item_views, embeddings = zip(*(view(self.item_embedding.weight, return_embeddings=True) for view in self.views))
        # eq. 5, for the users asked for only: a batch's users hold a fraction of R's entries
        user_views = [sparse_matmul(self.ui_mat, v, self.ui_mat_t, rows=users) for v in item_views]
        sel_views = list(item_views) if items is None else [v[items] for v in item_views]
        n_u = content_u.shape[0]
        # the fuser is row-wise: users and items in one call
        side = self.fuser([torch.cat([u, i]) for u, i in zip(user_views, sel_views)], torch.cat([content_u, content_i]))
        side_u, side_i = side[:n_u], side[n_u:]
        return Encoding(content_u + side_u, content_i + side_i, side_u, side_i, content_u, content_i,
                        list(item_views), list(embeddings))

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Final user and item embeddings ``e*`` and the per-modality item views."""
        enc = self.encode()
        return enc.users, enc.items, enc.item_views

    def calculate_loss(self, interaction) -> Tuple[torch.Tensor, ...]:
        self.clear_cache()
        terms, enc, _ = self.loss_terms(interaction)
        if self.term_log is not None and self.training:
            self.term_log.record(terms, enc.embeddings)
        return tuple(terms.values())

    def loss_terms(self, interaction) -> Tuple[Dict[str, torch.Tensor], Encoding, torch.Tensor]:
        """``({name: weighted term}, encoding, pos_items)`` in :attr:`loss_names`' order: the context
        a subclass adds its own terms from, with the ids of the batch's distinct positive items."""
        user, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        batch_users, user_rows = torch.unique(user, return_inverse=True)
        batch_items, item_rows = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        pos_rows, neg_rows = item_rows[: pos.numel()], item_rows[pos.numel():]
        enc = self.encode(batch_users, batch_items)
        u = gather_rows(enc.users, user_rows)
        i_pos, i_neg = gather_rows(enc.items, pos_rows), gather_rows(enc.items, neg_rows)
        bpr = self.bpr_loss((u * i_pos).sum(-1), (u * i_neg).sum(-1))  # eq. 13
        if self.reg_embeddings == "final":
            reg = self.emb_reg_loss(u, i_pos, i_neg)
        else:
            reg = self.emb_reg_loss(self.user_embedding(user), self.item_embedding(pos), self.item_embedding(neg))
        distinct_pos = torch.unique(pos_rows)  # each item once: duplicates would be false InfoNCE negatives
        cl = bpr.new_zeros(())
        if self.uses_side_content_cl() and distinct_pos.numel() > 1:
            cl = self.side_content_infonce(enc, distinct_pos, torch.arange(batch_users.numel(), device=user.device))
        terms = {"bpr": bpr, "cl": self.cl_weight * cl, "reg": self.reg_weight * reg}
        return terms, enc, batch_items[distinct_pos]

    def uses_side_content_cl(self) -> bool:
        """Whether the loss has MGCN's side-vs-content InfoNCE (always, in MGCN)."""
        return True

    def side_content_infonce(self, enc: Encoding, item_rows: torch.Tensor, user_rows: torch.Tensor) -> torch.Tensor:
        """MGCN eq. 10-11: ``InfoNCE(e_side, e_id)`` on the given item rows plus the same on the user
        rows (none with fewer than two users) of an encoding."""
        cl = self.infonce_loss(enc.side_items[item_rows], enc.content_items[item_rows])
        if user_rows.numel() > 1:
            cl = cl + self.infonce_loss(enc.side_users[user_rows], enc.content_users[user_rows])
        return cl

    def train(self, mode: bool = True):
        """Switching to evaluation logs the loss terms of the training batches since the last
        switch (``log_loss_terms``)."""
        if not mode and self.term_log is not None and (line := self.term_log.summary(type(self).__name__)):
            self.logger.info(line)
        return super().train(mode)

    def final_embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(users, items)`` final embeddings, cached for evaluation by :class:`CachedDotProductMixin`."""
        users, items, _ = self.forward()
        return users, items
