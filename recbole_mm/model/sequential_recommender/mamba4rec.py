"""Mamba4Rec: sequential recommendation with selective state space models.

Reference: C. Liu, J. Lin, J. Wang, H. Liu, J. Caverlee, "Mamba4Rec: Towards Efficient Sequential
Recommendation with Selective State Space Models", arXiv 2403.03900 (2024); the authors' RecBole
code (``chengkai-liu/Mamba4Rec``) fixes what the paper leaves open.

Item-ID embedding -> dropout -> LayerNorm -> ``num_layers`` :class:`Mamba4RecLayer` -> the hidden
state at the last valid position; scores are dot products with the item table, trained with
cross-entropy over all items (``loss_type: CE``; ``BPR`` with sampled negatives as in the authors'
code). The selective SSM is recbole-mm's :class:`~recbole_mm.model.layers.mamba.Mamba` (parameters
of ``mamba_ssm.Mamba``), so the model also runs without CUDA (``mamba_backend``).

As in the authors' code every ``nn.Linear`` and ``nn.Embedding`` is initialised ``N(0, 0.02)``
(``initializer_range``) with
zero biases after the model is built, the Mamba mixer's ``in_proj``/``x_proj``/``dt_proj``/
``out_proj`` included (so its ``dt_proj`` bias starts at 0, not at mamba-ssm's inverse-softplus
step sizes); ``A_log``, ``D`` and the convolution keep the mixer's own initialisation.

Hyperparameters (``properties/model/Mamba4Rec.yaml``): hidden_size, num_layers, dropout_prob,
d_state, d_conv, expand, mamba_backend, loss_type, initializer_range.
"""

from typing import Optional

import torch
from torch import nn

from recbole_mm.model.abstract_recommender import DotProductSequentialRecommender
from recbole_mm.model.layers.dropout import Dropout
from recbole_mm.model.layers.mamba import Mamba
from recbole_mm.model.layers.mlp import feed_forward
from recbole_mm.model.layers.packing import Packing


class Mamba4RecLayer(nn.Module):
    """``h = LN(Dropout(Mamba(x)) [+ x])``, then ``LN(FFN(h) + h)`` (post-LN, eps 1e-12, FFN width
    ``4 * d_model``). The authors drop the first residual when the model has a single layer
    (``residual=False``) and keep it for stacks."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, residual: bool,
                 backend: str = "auto"):
        super().__init__()
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = feed_forward(d_model, 4 * d_model, dropout)
        self.ffn_norm = nn.LayerNorm(d_model, eps=1e-12)
        self.residual = residual

    def forward(self, x: torch.Tensor, packing: Optional[Packing] = None) -> torch.Tensor:
        h = self.dropout(self.mamba(x, packing))
        h = self.norm(h + x if self.residual else h)
        return self.ffn_norm(self.ffn(h) + h)


class Mamba4Rec(DotProductSequentialRecommender):
    """Mamba4Rec (Liu et al., 2024); see the module docstring."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        hidden, n_layers, dropout = config["hidden_size"], config["num_layers"], config["dropout_prob"]
        self.item_embedding = nn.Embedding(self.n_items, hidden, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.mamba_layers = nn.ModuleList(
            Mamba4RecLayer(hidden, config["d_state"], config["d_conv"], config["expand"], dropout,
                           residual=n_layers > 1, backend=config["mamba_backend"])
            for _ in range(n_layers))
        self.apply(self._init_weights)

    def forward(self, item_seq, item_seq_len):
        # causal layers read at the last valid position: on a CPU run the real positions only,
        # packed end to end, instead of the padded batch (same result, less work)
        packing = Packing(item_seq_len, item_seq.shape[1])
        hidden = self.LayerNorm(self.dropout(self.item_embedding(packing.pack(item_seq))))
        for layer in self.mamba_layers:
            hidden = layer(hidden, packing.layout)
        return packing.last(hidden)
