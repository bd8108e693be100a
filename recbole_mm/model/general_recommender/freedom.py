"""FREEDOM: freezing and denoising graph structures for multimodal recommendation.

Reference: X. Zhou, Z. Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
Multimodal Recommendation", ACM MM'23; defaults and details from the authors' code in MMRec
(``enoche/MMRec``, ``models/freedom.py``, ``configs/model/FREEDOM.yaml``).

- Frozen item-item graph: per modality ``m`` a kNN graph on the features (after ``feature_norm``)
  (:func:`~recbole_mm.model.layers.graph.load_or_build_knn_graph`, ``knn_k`` neighbours, built once
  and cached), summed with modality weights ``S = sum_m w_m S_m``. MMRec weighs image 0.1 and text 0.9
  (``mm_image_weight``); here the first modality of ``modalities`` gets ``mm_image_weight`` and the
  others share the rest equally (one modality: weight 1). Our kNN graph is symmetrised with
  self-loops and normalised ``D^-1/2 (A + I) D^-1/2`` (see graph.py); MMRec keeps the directed top-k
  (the item itself included) with ``1/k`` weights.
- Denoised user-item graph: every training epoch a fraction ``1 - edge_dropout`` of the
  training interactions is sampled without replacement with probability proportional to
  ``1 / sqrt(d_u d_i)`` (degree-sensitive edge pruning: edges between popular nodes go first) and the
  kept edges are renormalised as LightGCN's ``D^-1/2 A D^-1/2``. Evaluation uses the full graph.
  RecBole's trainer calls ``model.train()`` at the start of each epoch; that drops the pruned graph
  and the next ``calculate_loss`` samples a new one.
- Representations: LightGCN over the (pruned) user-item graph on the ID embeddings, mean
  of layers ``0..n_ui_layers``; items add ``S^{n_mm_layers} E_item`` (the ID embeddings propagated
  over the frozen item graph). Score ``h_u . h_i``.
- Loss (as in the authors' code): ``BPR(h_u, h_i) + reg_weight * sum_m BPR(h_u, W_m f_i^m)``,
  the second term ranking the projected features of the positive above the negative's (``W_m``:
  :class:`~recbole_mm.model.layers.item_features.ItemFeatureProjection`, to ``embedding_size``; the
  authors' bias would cancel in the BPR difference). MMRec also fine-tunes the raw features through
  that term; here they stay fixed (as the graph built from them).

Both graphs are symmetric, so their products are :func:`~recbole_mm.model.layers.graph.sparse_matmul`'s
with the graph as its own transpose (CSR on CPU, a C kernel for float32): a training step, one thread,
took 0.030 s instead of 0.045 s with COO's ``torch.sparse.mm`` on TikTok, 0.053 s instead of 0.099 s
on amazon-beauty (same loss values). Evaluation caches the final embeddings
(:class:`~recbole_mm.model.abstract_recommender.CachedDotProductMixin`), so ``full_sort_predict`` is
one matrix product.

Hyperparameters (``properties/model/FREEDOM.yaml``): embedding_size, knn_k, n_mm_layers, n_ui_layers,
mm_image_weight, edge_dropout, reg_weight, feature_norm. The views come from the dataset (``modalities``).
"""

from typing import List, Optional, Tuple

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType
from torch import nn

from recbole_mm.model.abstract_recommender import CachedDotProductMixin
from recbole_mm.model.layers.gather import gather_rows
from recbole_mm.model.layers.graph import (load_or_build_knn_graph, normalized_bipartite_adjacency,
                                           normalized_interaction_matrix, sparse_matmul)
from recbole_mm.model.layers.item_features import ItemFeatureProjection, dataset_features
from recbole_mm.model.loss.mixins import BPRLossMixin


def modality_weights(n_modalities: int, first_weight: float) -> List[float]:
    """MMRec's ``mm_image_weight`` for the first modality, the rest split equally among the others."""
    if n_modalities == 1:
        return [1.0]
    if not 0.0 <= first_weight <= 1.0:
        raise ValueError(f"mm_image_weight must lie in [0, 1], got {first_weight}")
    return [first_weight] + [(1.0 - first_weight) / (n_modalities - 1)] * (n_modalities - 1)


def degree_sensitive_edges(weights: torch.Tensor, keep_ratio: float, generator: Optional[torch.Generator] = None):
    """Indices of ``round_down(keep_ratio * E)`` edges drawn without replacement with probability
    proportional to ``weights`` (FREEDOM: ``1 / sqrt(d_u d_i)``, so edges between popular nodes go first)."""
    keep = int(weights.numel() * keep_ratio)
    return torch.multinomial(weights, keep, replacement=False, generator=generator)


class FREEDOM(CachedDotProductMixin, BPRLossMixin, GeneralRecommender):
    """FREEDOM (MM'23); see the module docstring."""

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        emb = config["embedding_size"]
        self.n_ui_layers = config["n_ui_layers"]
        self.n_mm_layers = config["n_mm_layers"]
        self.reg_weight = config["reg_weight"]
        self.edge_dropout = config["edge_dropout"]
        if not 0.0 <= self.edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must lie in [0, 1), got {self.edge_dropout}")

        features = dataset_features(dataset, "FREEDOM", config["feature_norm"])
        weights = modality_weights(len(features), config["mm_image_weight"])
        graph_dir = dataset.cache_dir
        graphs = [w * load_or_build_knn_graph(f, config["knn_k"], graph_dir, name=m, mask=dataset.item_feature_mask[m])
                  for w, (m, f) in zip(weights, features.items())]
        item_graph = graphs[0]
        for graph in graphs[1:]:  # sparse + sparse (sum() would start from a dense 0)
            item_graph = item_graph + graph
        self.register_buffer("item_graph", item_graph.coalesce(), persistent=False)
        self.projection = ItemFeatureProjection(features, emb)

        inter = dataset.inter_matrix(form="coo")
        users, items = torch.from_numpy(inter.row).long(), torch.from_numpy(inter.col).long()
        self.register_buffer("ui_adj", normalized_bipartite_adjacency(users, items, self.n_users, self.n_items),
                             persistent=False)
        edges = normalized_interaction_matrix(users, items, self.n_users, self.n_items)  # values 1/sqrt(d_u d_i)
        self.register_buffer("edges", edges.indices(), persistent=False)
        self.register_buffer("edge_weights", edges.values(), persistent=False)

        self.user_embedding = nn.Embedding(self.n_users, emb)
        self.item_embedding = nn.Embedding(self.n_items, emb)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        self.pruned_adj: Optional[torch.Tensor] = None
        self.init_cold_items(config, dataset)  # cold_item_neighbours

    def train(self, mode: bool = True):
        self.pruned_adj = None  # a new epoch (RecBole calls train() first) gets a newly pruned graph
        return super().train(mode)

    def prune_graph(self) -> torch.Tensor:
        """A degree-sensitively pruned, renormalised user-item adjacency."""
        if self.edge_dropout == 0:
            return self.ui_adj
        kept = self.edges[:, degree_sensitive_edges(self.edge_weights, 1.0 - self.edge_dropout)]
        return normalized_bipartite_adjacency(kept[0], kept[1], self.n_users, self.n_items).to(self.ui_adj.device)

    def forward(self, adj: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """User and item representations over ``adj`` (default: the full user-item graph)."""
        adj = self.ui_adj if adj is None else adj
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = [ego]
        for _ in range(self.n_ui_layers):
            layers.append(sparse_matmul(adj, layers[-1]))  # adj is symmetric
        users, items = torch.split(torch.stack(layers).mean(0), [self.n_users, self.n_items])
        h = self.item_embedding.weight
        for _ in range(self.n_mm_layers):
            h = sparse_matmul(self.item_graph, h)  # so is the kNN graph
        return users, items + h

    def final_embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward()

    def calculate_loss(self, interaction):
        self.clear_cache()
        if self.pruned_adj is None:
            self.pruned_adj = self.prune_graph()
        user, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        users, items = self.forward(self.pruned_adj)
        u = gather_rows(users, user)
        bpr = self.bpr_loss((u * gather_rows(items, pos)).sum(-1), (u * gather_rows(items, neg)).sum(-1))
        feature_bpr = sum(self.bpr_loss((u * fp).sum(-1), (u * fn).sum(-1))
                          for fp, fn in zip(self.projection(pos), self.projection(neg)))
        return bpr, self.reg_weight * feature_bpr
