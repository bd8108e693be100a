"""SASRec (MM): SASRec whose items are ID embeddings plus projected multimodal features.

Reference: the "simple multi-modal" baseline of FindRec's Table 2 (M. Wang et al., KDD'25, sec. 3.2:
"directly mixes modal features into ID embeddings ... feed multi-modal signals into the original
SASRec network"), on RecBole's SASRec (W.-C. Kang, J. McAuley, ICDM'18).

Item ``i`` is ``E_id[i] + sum_m W_m f_m[i]`` (one bias-free linear map per modality of the dataset's
``modalities``, :class:`~recbole_mm.model.layers.item_features.ItemFeatureEmbedding`), both as the
encoder's input and as the candidate it scores, so the features shape the logits too. Everything
else is RecBole's SASRec.

Hyperparameters (``properties/model/SASRecMM.yaml``): SASRec's (n_layers, n_heads, hidden_size,
inner_size, hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps, initializer_range,
loss_type), feature_norm and item_id_dropout (in training, an item vector's ID part dropped
with that probability). The views come from the dataset (``modalities``).
"""

from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mm.model.layers.item_features import ItemFeaturesMixin


class SASRecMM(ItemFeaturesMixin, SASRec):
    """SASRec (MM); see the module docstring."""
