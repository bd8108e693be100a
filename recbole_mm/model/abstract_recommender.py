"""Base classes shared by recbole-mm's models."""

from typing import Optional, Tuple

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_mm.model.layers.cold_items import cold_item_neighbours


class DotProductSequentialRecommender(SequentialRecommender):
    """A sequential model that scores item ``i`` by ``forward(seq) . item_embedding(i)`` (RecBole's
    SASRec pattern); a subclass builds ``self.item_embedding`` (anything with ``forward(ids)`` and
    ``.weight``) and ``forward(item_seq, item_seq_len) -> [B, d]``.

    ``loss_type``: ``CE`` = cross-entropy over all items, ``BPR`` = one sampled negative per target.
    ``_init_weights`` is RecBole's Transformer initialisation, ``N(0, initializer_range)`` for linear
    and embedding weights, zero biases, unit LayerNorms.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_type = config["loss_type"]
        if self.loss_type not in ("CE", "BPR"):
            raise ValueError(f"{type(self).__name__}'s loss_type must be 'CE' or 'BPR', got {self.loss_type!r}")
        self.initializer_range = config["initializer_range"]
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def _sequence(self, interaction) -> torch.Tensor:
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def calculate_loss(self, interaction):
        seq_output = self._sequence(interaction)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            pos = (seq_output * self.item_embedding(pos_items)).sum(-1)
            neg = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
            return self.loss_fct(pos, neg)
        return self.loss_fct(seq_output @ self.item_embedding.weight.T, pos_items)

    def predict(self, interaction):
        return (self._sequence(interaction) * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self._sequence(interaction) @ self.item_embedding.weight.T


class CachedDotProductMixin:
    """Evaluation of a general model whose score is ``users[u] . items[i]`` over final representations
    that depend on all parameters (graph propagation, feature maps): a subclass defines
    ``final_embeddings() -> (users [n_users, d], items [n_items, d])``. They are computed once per
    evaluation and kept (RecBole's ``restore_user_e`` pattern): RecBole's full ranking calls
    ``full_sort_predict`` once per batch of ``eval_batch_size // n_items`` users, i.e. one user per
    call on catalogues above 4096 items. The cache is dropped by ``train()`` / ``eval()`` and by
    :meth:`clear_cache` (call it in ``calculate_loss``).

    ``cold_item_neighbours: k`` (0 = off; set up by :meth:`init_cold_items`, which the subclass
    calls): in evaluation an item with no training interaction gets the mean final embedding of its
    ``k`` most feature-similar warm items (:mod:`recbole_mm.model.layers.cold_items`). Training is
    unchanged."""

    restore_user_e: Optional[torch.Tensor] = None
    restore_item_e: Optional[torch.Tensor] = None

    def init_cold_items(self, config, dataset) -> None:
        """Find the cold items of ``dataset`` (the training split) and their feature neighbours when
        ``cold_item_neighbours`` is set; kept as non-persistent buffers (rebuilt, never checkpointed)."""
        k = config["cold_item_neighbours"] or 0
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"cold_item_neighbours must be an int >= 0, got {k!r}")
        cold, neighbours = cold_item_neighbours(dataset, k) if k else (None, None)
        self.register_buffer("cold_items", cold, persistent=False)
        self.register_buffer("cold_neighbours", neighbours, persistent=False)

    def clear_cache(self) -> None:
        self.restore_user_e = self.restore_item_e = None

    def train(self, mode: bool = True):
        self.clear_cache()  # parameters may change from here on
        return super().train(mode)

    def _cached(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.restore_user_e is None or self.restore_item_e is None:
            with torch.no_grad():
                users, items = self.final_embeddings()
                if getattr(self, "cold_items", None) is not None and len(self.cold_items):
                    items = items.index_copy(0, self.cold_items, items[self.cold_neighbours].mean(1))
                self.restore_user_e, self.restore_item_e = users, items
        return self.restore_user_e, self.restore_item_e

    def predict(self, interaction):
        users, items = self._cached()
        return (users[interaction[self.USER_ID]] * items[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        users, items = self._cached()
        return (users[interaction[self.USER_ID]] @ items.T).view(-1)
