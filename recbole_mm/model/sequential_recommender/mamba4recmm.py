"""Mamba4Rec (MM): Mamba4Rec whose items are ID embeddings plus projected multimodal features.

Reference: the "simple multi-modal" baseline of FindRec's Table 2 (M. Wang et al., KDD'25, sec. 3.2:
"we incorporate multi-modal signals directly into the Mamba backbone network"), on
:class:`~recbole_mm.model.sequential_recommender.mamba4rec.Mamba4Rec` (Liu et al., 2024).

Item ``i`` is ``E_id[i] + sum_m W_m f_m[i]`` (one bias-free linear map per modality of the dataset's
``modalities``, :class:`~recbole_mm.model.layers.item_features.ItemFeatureEmbedding`), both as the
encoder's input and as the candidate it scores. Everything else is Mamba4Rec.

Hyperparameters (``properties/model/Mamba4RecMM.yaml``): Mamba4Rec's, feature_norm and item_id_dropout
(in training, an item vector's ID part dropped with that probability). The views come from the
dataset (``modalities``).
"""

from recbole_mm.model.layers.item_features import ItemFeaturesMixin
from recbole_mm.model.sequential_recommender.mamba4rec import Mamba4Rec


class Mamba4RecMM(ItemFeaturesMixin, Mamba4Rec):
    """Mamba4Rec (MM); see the module docstring."""
