"""Cross-entropy over a large catalogue without the ``[batch, n_items]`` logits (issue 17).

RecBole's sequential models with ``loss_type: CE`` compute ``logits = seq_output @ E.T`` over all
items; at a million items and batch 2048 those logits (and their gradient) take 8 GB each.
:func:`~recbole_mm.model.loss.chunked_ce.chunked_cross_entropy` gives the same loss and gradients
from slices of the item table (peak memory and cost: see that module).

:class:`ChunkedCEMixin` (trainer side, config key ``ce_item_chunk``: items per slice, ``~`` = off)
swaps it in for a model whose loss is exactly that cross-entropy: a model with the
``sequence_output`` form of :mod:`recbole_mm.evaluation.scorers` (``forward(item_seq,
item_seq_len)`` and ``item_embedding``), checked at the start of ``fit`` against the model's own
``calculate_loss`` on two training sequences. A model whose loss has more terms fails the check and
keeps its own loss, with a warning, unless its class says ``chunks_its_own_ce = True``: it reads
``ce_item_chunk`` itself (FindRec slices its CE term beside IICM). No accuracy is traded: it is the
exact loss (sampled softmax, which would trade it, is not offered).
"""

import torch
from recbole.utils import ModelType

from recbole_mm.model.loss.chunked_ce import chunked_cross_entropy, excluded_items

#: sequences of the first training batch on which the swap is checked
CHECK_ROWS = 2


def _chunked_loss(model, chunk):
    def calculate_loss(interaction):
        hidden = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
        return chunked_cross_entropy(hidden, model.item_embedding.weight, interaction[model.POS_ITEM_ID], chunk,
                                     excluded_items(model))

    return calculate_loss


class ChunkedCEMixin:
    """Put before a RecBole ``Trainer``: with ``ce_item_chunk`` set, a CE sequential model trains
    on :func:`chunked_cross_entropy` when that reproduces its own loss (see the module doc)."""

    def fit(self, train_data, *args, **kwargs):
        self.prepare_chunked_ce(train_data)
        return super().fit(train_data, *args, **kwargs)

    def prepare_chunked_ce(self, train_data) -> bool:
        """What ``fit`` does first: with ``ce_item_chunk`` set, swap the sliced loss in where it
        reproduces the model's own. Whether the model now trains on slices (its own or ours)."""
        chunk = self.config["ce_item_chunk"]
        if not chunk:
            return False
        if "calculate_loss" in vars(self.model):  # swapped in by an earlier fit
            return True
        return self._use_chunked_ce(train_data, int(chunk))

    def _use_chunked_ce(self, train_data, chunk) -> bool:
        model = self.model
        name = type(model).__name__
        if getattr(model, "chunks_its_own_ce", False):
            self.logger.info(f"ce_item_chunk: {name} computes its cross-entropy in slices of {chunk} items")
            return True
        if model.type != ModelType.SEQUENTIAL or self.config["loss_type"] != "CE":
            self.logger.warning(f"ce_item_chunk: {name} is not a sequential model trained with CE; ignored")
            return False
        # the loader's own collate (not an iterator, which would advance its shuffling generator)
        sample = train_data.collate_fn(list(range(CHECK_ROWS))).to(self.device)
        chunked = _chunked_loss(model, chunk)
        training = model.training
        model.eval()  # no dropout, so both losses see the same network
        try:
            with torch.no_grad():
                own, ours = model.calculate_loss(sample), chunked(sample)
            same = isinstance(own, torch.Tensor) and torch.allclose(own, ours, rtol=1e-5, atol=1e-6)
        except Exception as err:  # another forward signature, no item_embedding, ...
            same, own = False, f"{type(err).__name__}: {err}"
        finally:
            model.train(training)
        if not same:
            self.logger.warning(f"ce_item_chunk: {name}'s calculate_loss is not plain cross-entropy over "
                                f"forward(...) @ item_embedding ({own if isinstance(own, str) else 'other value'}); "
                                "it keeps its own loss")
            return False
        model.calculate_loss = chunked
        self.logger.info(f"ce_item_chunk: {name} trains on cross-entropy in slices of {chunk} items")
        return True
