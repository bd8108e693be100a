"""MGCN's multi-view encoder pieces (Yu et al., MM'23), shared by MGCN and MambaRec.

* :func:`normalize_features`: optional normalisation of a raw feature matrix (``feature_norm``).
* :class:`ModalityView`: one modality's item view: project the features (``reduce``, then
  ``refine``: identity in MGCN, DREAM or a linear map in MambaRec) to the modality embedding
  ``h^m``; the behaviour-guided purifier ``e_id * sigmoid(W h^m)`` (MGCN eq. 3); propagation over
  the frozen item-item kNN graph of the features (MGCN eq. 4).
* :class:`ViewFuser`: the behaviour-aware fuser (MGCN eq. 7-9): attention-weighted common part of
  the modality views plus preference-gated modality-specific parts. It is row-wise: each row (a user
  or an item) depends only on its own views and content embedding, so a training step can fuse the
  batch's rows only.

The user-item graphs and the kNN graph themselves live in :mod:`recbole_mm.model.layers.graph`.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.layers.dropout import Dropout
from recbole_mm.model.layers.graph import sparse_matmul

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
    """One modality's item view: reduce -> refine -> [LayerNorm -> dropout] -> purify the item-ID
    embedding -> propagate ``n_layers`` times over the modality's kNN graph.

    ``item_graph`` (sparse COO ``[n_items, n_items]``, symmetric, as ``graph.build_knn_graph`` makes
    it) is a constant, non-persistent buffer, rebuilt from the dataset. ``features`` ``[n_items, D]`` is one too, unless ``train_features``: then it is a
    parameter initialised with the features (MGCN's ``nn.Embedding.from_pretrained(freeze=False)``)
    and it is saved in checkpoints.
    """

    def __init__(self, features: torch.Tensor, item_graph: torch.Tensor, d: int, emb: int,
                 refine: nn.Module, n_layers: int, layernorm: bool = False, dropout: float = 0.0,
                 train_features: bool = False):
        super().__init__()
        if train_features:
            self.features = nn.Parameter(features.clone())
        else:
            self.register_buffer("features", features, persistent=False)
        self.register_buffer("item_graph", item_graph, persistent=False)
        self.reduce = nn.Linear(features.shape[1], d)
        self.refine = refine
        self.norm = nn.LayerNorm(emb) if layernorm else nn.Identity()
        self.dropout = Dropout(dropout)  # h^m of every item each step: torch's CPU dropout costs ~3 ms a modality on TikTok
        self.gate = nn.Linear(emb, emb)
        self.n_layers = n_layers

    def modality_embeddings(self) -> torch.Tensor:
        """``h^m = refine(W_m x_m)`` for every item, ``[n_items, emb]``."""
        return self.refine(self.reduce(self.features))

    def forward(self, item_id_emb: torch.Tensor,
                return_embeddings: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The item view ``[n_items, emb]``; with ``return_embeddings`` also ``h^m``."""
        # MGCN's purifier: the modality decides which ID dimensions are kept for this view; the
        # MambaRec authors' code normalises (LayerNorm) and drops out h^m first, so the gate's input
        # has unit scale whatever the scale of the raw features
        h = self.modality_embeddings()
        view = item_id_emb * torch.sigmoid(self.gate(self.dropout(self.norm(h))))
        for _ in range(self.n_layers):
            view = sparse_matmul(self.item_graph, view)
        return (view, h) if return_embeddings else view


#: the side view of a single modality (``single_modality_side``): MGCN's ``/ (M + 1)``, or the view itself
SINGLE_MODALITY_SIDES = ("half", "full")


class ViewFuser(nn.Module):
    """MGCN's fuser of ``M`` modality views ``[n, emb]`` given the content (ID) view ``[n, emb]``:
    ``(common + sum_m sigmoid(W_m content) * (v_m - common)) / (M + 1)`` with
    ``common = sum_m softmax_m(w^T tanh(W v_m)) v_m``.

    With one view ``common = v`` and the specific part is zero, so MGCN's divisor leaves ``v / 2``
    (``single_modality: "half"``): a single-modality ablation also halves the side view's scale
    against ``e_id``. ``"full"`` divides by the one part there is and keeps ``v``."""

    def __init__(self, emb: int, n_views: int, single_modality: str = "half"):
        super().__init__()
        if single_modality not in SINGLE_MODALITY_SIDES:
            raise ValueError(f"single_modality_side must be one of {SINGLE_MODALITY_SIDES}, got {single_modality!r}")
        self.query = nn.Sequential(nn.Linear(emb, emb), nn.Tanh(), nn.Linear(emb, 1, bias=False))
        self.prefer = nn.ModuleList(nn.Sequential(nn.Linear(emb, emb), nn.Sigmoid()) for _ in range(n_views))
        self.divisor = 1 if n_views == 1 and single_modality == "full" else n_views + 1

    def forward(self, views: List[torch.Tensor], content: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(views, dim=1)  # [n, M, emb]
        weights = torch.softmax(self.query(stacked), dim=1)  # [n, M, 1]
        common = (weights * stacked).sum(1)
        specific = [(v - common) * prefer(content) for v, prefer in zip(views, self.prefer)]
        return (common + sum(specific)) / self.divisor
