"""MMMLP: multi-modal multilayer perceptron for sequential recommendation.

Reference: J. Liang, X. Zhao, M. Li, Z. Zhang, W. Wang, H. Liu, Z. Liu, "MMMLP: Multi-modal
Multilayer Perceptron for Sequential Recommendations", WWW'23; the authors' RecBole code
(``Applied-Machine-Learning-Lab/MMMLP``) fixes what the paper leaves open.

Three modules, as the paper names them:

- Feature Mixer Layer: one stream for the item-ID sequence and one per modality ``m`` of the
  dataset's ``modalities`` (the item's feature row through a bias-free linear map to
  ``hidden_size``, :class:`~recbole_mm.model.layers.item_features.ItemFeatureProjection`; the
  authors feed pre-extracted ``hidden_size``-wide image/text vectors). Each stream is a
  ``[max_seq_length x hidden_size]`` table: LayerNorm, then ``n_layers`` MLP-Mixer blocks
  (:class:`MixerBlock`), each a token mixer (an MLP across the sequence positions, per channel)
  and a channel mixer (an MLP across channels, per position), pre-LN with residuals, expansion 4.
- Fusion Mixer Layer: the streams are concatenated along the channels, LayerNorm-ed and mixed
  back to ``hidden_size`` by one linear map (the authors' ``concat_layer_f``).
- Prediction Layer: the fused state at the last valid position, LayerNorm-ed, scores every item
  by a dot product with its ID embedding; cross-entropy over all items (``loss_type: CE``).

The token mixer sees every position of the (right-padded) input sequence, as in the authors'
code; the sequence holds only the history before the target, so nothing leaks. In the authors' code
the ID stream applies one block ``n_layers`` times (shared weights) and each modality stream loops
four times over the same input (so one block's output survives); here every stream has
``n_layers`` blocks of its own.

Hyperparameters (``properties/model/MMMLP.yaml``): hidden_size, n_layers, hidden_dropout_prob,
layer_norm_eps, initializer_range, loss_type, feature_norm. The views come from the dataset (``modalities``).
"""

import torch
from torch import nn

from recbole_mm.model.abstract_recommender import DotProductSequentialRecommender
from recbole_mm.model.layers.item_features import ItemFeatureProjection, dataset_features
from recbole_mm.model.layers.mlp import feed_forward

EXPANSION = 4  # MLP width factor of both mixers (the authors' expansion_factor)


class MixerBlock(nn.Module):
    """MLP-Mixer block over ``x: [B, L, d]``: ``x += TokenMLP(LN(x)^T)^T``, then ``x += ChannelMLP(LN(x))``."""

    def __init__(self, seq_len: int, dim: int, dropout: float, eps: float):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, eps=eps)
        self.token_mlp = feed_forward(seq_len, EXPANSION * seq_len, dropout)
        self.channel_norm = nn.LayerNorm(dim, eps=eps)
        self.channel_mlp = feed_forward(dim, EXPANSION * dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class FeatureMixer(nn.Module):
    """One stream of the Feature Mixer Layer: LayerNorm, then ``n_layers`` :class:`MixerBlock` s."""

    def __init__(self, n_layers: int, seq_len: int, dim: int, dropout: float, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.blocks = nn.Sequential(*(MixerBlock(seq_len, dim, dropout, eps) for _ in range(n_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.norm(x))


class MMMLP(DotProductSequentialRecommender):
    """MMMLP (WWW'23); see the module docstring."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        hidden, n_layers = config["hidden_size"], config["n_layers"]
        dropout, eps = config["hidden_dropout_prob"], config["layer_norm_eps"]

        self.item_embedding = nn.Embedding(self.n_items, hidden, padding_idx=0)
        self.features = ItemFeatureProjection(dataset_features(dataset, "MMMLP", config["feature_norm"]), hidden)
        n_streams = 1 + len(self.features.modalities)
        self.mixers = nn.ModuleList(FeatureMixer(n_layers, self.max_seq_length, hidden, dropout, eps)
                                    for _ in range(n_streams))
        self.fusion_norm = nn.LayerNorm(n_streams * hidden, eps=eps)
        self.fusion = nn.Linear(n_streams * hidden, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=eps)
        self.apply(self._init_weights)

    def forward(self, item_seq, item_seq_len):
        streams = [self.item_embedding(item_seq)] + self.features(item_seq)
        mixed = torch.cat([mixer(s) for mixer, s in zip(self.mixers, streams)], dim=-1)
        fused = self.fusion(self.fusion_norm(mixed))
        return self.output_norm(self.gather_indexes(fused, item_seq_len - 1))
