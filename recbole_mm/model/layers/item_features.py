"""Item representations from multimodal features, shared by the baselines of recbole-mm.

* :class:`ItemFeatureProjection` — per modality ``m`` a linear map ``W_m f_m`` of the item's
  feature row (looked up by item id in a non-persistent buffer, so checkpoints hold no features).
  The maps have no bias: the padding item and items without a feature row (zero rows, see
  :mod:`recbole_mm.data.dataset`) then project to exactly zero, i.e. a missing view adds nothing.
  Used by MMMLP (one stream per modality), VBPR (``E f_i`` of the concatenated features is the sum
  of the per-modality maps) and FREEDOM (the modality BPR terms).
* :class:`ItemFeatureEmbedding` — ``e_i = E_id[i] + sum_m W_m f_m[i]``, a drop-in replacement for
  an ``nn.Embedding`` item table: calling it embeds ids, ``.weight`` is the full table, so a model
  that scores against ``item_embedding.weight`` scores against the feature-aware items too. With
  ``id_dropout`` it trains the features to stand in for the ID part, which a cold item lacks.
* :class:`ItemFeaturesMixin` — turns any sequential model that looks its items up through
  ``self.item_embedding`` into its "simple multimodal" variant (FindRec, KDD'25, Table 2:
  "SASRec (MM)", "Mamba4Rec (MM)"): ``class SASRecMM(ItemFeaturesMixin, SASRec)``.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from recbole_mm.model.layers.multiview import normalize_features


def dataset_features(dataset, model_name: str, feature_norm: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """``{modality: [n_items, D_m]}`` of a multimodal dataset, normalised by ``feature_norm``
    (``none`` | ``l2`` | ``standard``, :func:`~recbole_mm.model.layers.multiview.normalize_features`;
    ``None`` = as given); ``ValueError`` when the dataset has no features."""
    modalities = list(getattr(dataset, "modalities", None) or [])
    if not modalities:
        raise ValueError(f"{model_name} needs item features: set `modalities` (e.g. [image, text]) for the dataset")
    return {m: normalize_features(dataset.item_features[m], feature_norm or "none", dataset.item_feature_mask[m])
            for m in modalities}


class ItemFeatureProjection(nn.Module):
    """``W_m f_m[i]`` for every modality ``m`` (no bias, see the module docstring).

    Args:
        features: ``{modality: [n_items, D_m]}`` (row = internal item id).
        dim: output width of every map.
    """

    def __init__(self, features: Dict[str, torch.Tensor], dim: int):
        super().__init__()
        self.modalities = list(features)
        for k, feat in enumerate(features.values()):
            self.register_buffer(f"feature_{k}", feat.float(), persistent=False)
        self.maps = nn.ModuleList(nn.Linear(f.shape[1], dim, bias=False) for f in features.values())

    def _features(self) -> List[torch.Tensor]:
        return [getattr(self, f"feature_{k}") for k in range(len(self.maps))]

    def forward(self, item_ids: torch.Tensor) -> List[torch.Tensor]:
        """One ``[*item_ids.shape, dim]`` tensor per modality."""
        return [w(feat[item_ids]) for feat, w in zip(self._features(), self.maps)]

    def all_items(self) -> List[torch.Tensor]:
        """One ``[n_items, dim]`` table per modality."""
        return [w(feat) for feat, w in zip(self._features(), self.maps)]


class ItemFeatureEmbedding(nn.Module):
    """``E_id[i] + sum_m W_m f_m[i]``; behaves like the ``nn.Embedding`` it wraps (``forward(ids)``,
    ``.weight``), so the same vectors are the encoder's inputs and the candidates it scores.

    ``id_dropout`` (training only): each looked-up vector, and each row of ``.weight``, loses its ID
    part (is ``sum_m W_m f_m[i]`` alone) with that probability, independently. A cold item (no
    training interaction) has only an untrained ID row, so it is scored by its features; dropping
    warm items' ID parts in training teaches the features to score an item on their own (the
    input dropout of DropoutNet, Volkovs et al., NeurIPS'17). Evaluation always uses both parts."""

    def __init__(self, id_embedding: nn.Embedding, features: Dict[str, torch.Tensor], id_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"item_id_dropout must be in [0, 1), got {id_dropout}")
        self.id_embedding = id_embedding
        self.projection = ItemFeatureProjection(features, id_embedding.embedding_dim)
        self.id_dropout = id_dropout

    def _id_part(self, rows: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.id_dropout):
            return rows
        keep = torch.rand(rows.shape[:-1], device=rows.device) >= self.id_dropout
        return rows * keep.unsqueeze(-1).to(rows.dtype)  # a replacement, not rescaled: no 1/(1-p)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self._id_part(self.id_embedding(item_ids)) + sum(self.projection(item_ids))

    @property
    def weight(self) -> torch.Tensor:
        return self._id_part(self.id_embedding.weight) + sum(self.projection.all_items())


class ItemFeaturesMixin:
    """Put before a RecBole sequential model whose items live in ``self.item_embedding`` and that has
    an ``_init_weights`` method (SASRec, Mamba4Rec, ...): after the model is built, its item table is
    wrapped in an :class:`ItemFeatureEmbedding` over the dataset's ``modalities`` (normalised by the
    config's ``feature_norm``), and the new maps get the model's own initialisation."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        features = dataset_features(dataset, type(self).__name__, config["feature_norm"])
        self.item_embedding = ItemFeatureEmbedding(self.item_embedding, features, config["item_id_dropout"])
        self.item_embedding.projection.apply(self._init_weights)
