"""VBPR: visual Bayesian personalised ranking from implicit feedback.

Reference: R. He, J. McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback",
AAAI'16; with several modalities the item's content vector is the concatenation of its feature
rows, as in MMRec's VBPR (``enoche/MMRec``).

Score (the paper's preference predictor without the global and user offsets, which cancel in a
user's ranking and in the BPR difference):

``x_ui = beta_i + gamma_u . gamma_i + theta_u . (E f_i) + beta' . f_i``

with ``f_i = [f_i^1; ...; f_i^M]`` the item's features (fixed), ``gamma`` the latent ID factors and
``theta_u`` the user's visual factors (both ``embedding_size``), ``E`` the content embedding and
``beta'`` the global content bias. ``E f_i = sum_m E_m f_i^m`` over the blocks of ``E``, so ``E`` and
``beta'`` are the per-modality maps of one
:class:`~recbole_mm.model.layers.item_features.ItemFeatureProjection` to ``embedding_size + 1``.
Written as one dot product, ``x_ui = [gamma_u; theta_u] . [gamma_i; E f_i] + b_i`` with
``b_i = beta_i + beta' . f_i``.

Loss: BPR ``+ reg_weight * L2`` of the batch's user and item vectors
``[gamma_u; theta_u]``, ``[gamma_i; E f_i]`` (MMRec's choice of regularised terms; RecBole's
``EmbLoss`` with squared norms, ``sum ||v||^2 / (2 B)``). Xavier-normal initialisation (RecBole's
BPR); the biases beta_i and beta' start at 0. Evaluation computes the user and item vectors once
(:class:`~recbole_mm.model.abstract_recommender.CachedDotProductMixin`).

Hyperparameters (``properties/model/VBPR.yaml``): embedding_size, reg_weight, feature_norm. The views
come from the dataset (``modalities``).
"""

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_normal_initialization
from recbole.utils import InputType
from torch import nn

from recbole_mm.model.abstract_recommender import CachedDotProductMixin
from recbole_mm.model.layers.item_features import ItemFeatureProjection, dataset_features
from recbole_mm.model.loss.mixins import BPRLossMixin, EmbRegLossMixin


class VBPR(CachedDotProductMixin, BPRLossMixin, EmbRegLossMixin, GeneralRecommender):
    """VBPR (AAAI'16); see the module docstring."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        emb = config["embedding_size"]
        self.reg_weight = config["reg_weight"]
        self.user_embedding = nn.Embedding(self.n_users, 2 * emb)  # [gamma_u; theta_u]
        self.item_embedding = nn.Embedding(self.n_items, emb)  # gamma_i
        self.item_bias = nn.Embedding(self.n_items, 1)  # beta_i
        features = dataset_features(dataset, "VBPR", config["feature_norm"])
        self.content = ItemFeatureProjection(features, emb + 1)  # [E; beta'] f_i
        self.apply(xavier_normal_initialization)
        # the bias terms beta_i and beta' start at 0: a random beta' . f_i (std ~1 on standardised
        # features) ranks items by noise long before the factors have learned anything (TikTok, 5
        # epochs, valid Recall@20: 0.0239 from zero, 0.0069 from Xavier-initialised beta')
        nn.init.zeros_(self.item_bias.weight)
        with torch.no_grad():
            for w in self.content.maps:
                w.weight[-1].zero_()
        self.init_cold_items(config, dataset)  # cold_item_neighbours

    def _items(self, item_ids=None):
        """``([gamma_i; E f_i], b_i)`` of the given items (all items when ``None``)."""
        gamma = self.item_embedding.weight if item_ids is None else self.item_embedding(item_ids)
        beta = self.item_bias.weight if item_ids is None else self.item_bias(item_ids)
        content = sum(self.content.all_items() if item_ids is None else self.content(item_ids))
        visual, content_bias = content.split([content.shape[-1] - 1, 1], dim=-1)
        return torch.cat([gamma, visual], dim=-1), (beta + content_bias).squeeze(-1)

    def forward(self, user, item):
        """``(x_ui, [gamma_u; theta_u], [gamma_i; E f_i])`` for the pairs ``(user[k], item[k])``."""
        u = self.user_embedding(user)
        vec, bias = self._items(item)
        return (u * vec).sum(-1) + bias, u, vec

    def calculate_loss(self, interaction):
        self.clear_cache()
        user, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        pos_score, u, pos_vec = self.forward(user, pos)
        neg_score, _, neg_vec = self.forward(user, neg)
        return self.bpr_loss(pos_score, neg_score) + self.reg_weight * self.emb_reg_loss(u, pos_vec, neg_vec)

    def final_embeddings(self):
        """``[gamma_u; theta_u; 1]`` and ``[gamma_i; E f_i; b_i]``: their dot product is ``x_ui``."""
        vec, bias = self._items()
        users = self.user_embedding.weight
        return torch.cat([users, users.new_ones(users.shape[0], 1)], dim=-1), torch.cat([vec, bias[:, None]], dim=-1)
