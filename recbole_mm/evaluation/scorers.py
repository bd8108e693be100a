"""Scores of all items, one block at a time: how the blocked full ranking asks a model for them.

RecBole's full ranking calls ``full_sort_predict`` for a batch of users and gets a dense
``[users, n_items]`` matrix. :mod:`recbole_mm.evaluation.topk` never holds one; it asks a
*scorer* for ``(rows, item_lo, scores)`` blocks, ``scores`` being the scores of the users ``rows``
of the chunk for the items ``item_lo, item_lo + width``:

* :class:`EmbeddingScorer` — for models whose scores are ``user_e @ item_e.T``: the user vectors
  of the chunk are computed once, then multiplied by one slice of the item table per block
  (``[chunk users, eval_item_block]`` scores at a time);
* :class:`PredictScorer` — any other model: ``full_sort_predict`` on sub-batches of users small
  enough that their score rows fit the same budget (``chunk users * eval_item_block``).

A model opts into the first with ``full_sort_embeddings(interaction) -> (user_e [B, d],
item_e [n_items, d])`` such that ``full_sort_predict(interaction) == user_e @ item_e.T``.
RecBole's own models need no change; :func:`make_scorer` recognises them by their attributes:

* ``restore_user_e`` / ``restore_item_e`` filled by ``full_sort_predict`` (LightGCN, NGCF, MambaRec);
* ``get_user_embedding`` and ``item_embedding`` (BPR);
* ``ITEM_SEQ`` / ``ITEM_SEQ_LEN``, ``forward(item_seq, item_seq_len)`` and ``item_embedding``
  (SASRec, GRU4Rec, FindRec).

An attribute says nothing certain about how a model scores (BERT4Rec adds an output bias, a
subclass may rescale), so every recognised form is checked against the model's own
``full_sort_predict`` on the first users before it is used; a form that disagrees (or fails) is
skipped, and :class:`PredictScorer` is the fallback that is always right.
"""

from logging import getLogger
from typing import Callable, Iterator, Tuple

import torch

from recbole_mm.model.layers.blocks import BlockProduct

Block = Tuple[slice, int, torch.Tensor]


class EmbeddingScorer:
    """Scores ``user_fn(interaction) @ item_table[lo:hi].T`` per item block."""

    def __init__(self, name: str, user_fn: Callable, item_table: torch.Tensor):
        self.name, self.user_fn, self.item_table = name, user_fn, item_table
        # one buffer for every block of every chunk of this evaluation (the scorer lives as long as
        # one evaluation): the caller is done with each block before asking for the next
        self.product = BlockProduct()

    def blocks(self, interaction, n_items: int, item_block: int, budget: int) -> Iterator[Block]:
        users = self.user_fn(interaction)
        rows = slice(0, users.shape[0])
        for lo in range(0, n_items, item_block):
            yield rows, lo, self.product(users, self.item_table[lo:lo + item_block])


class PredictScorer:
    """``full_sort_predict`` on as many users at a time as ``budget`` score elements allow."""

    name = "full_sort_predict"

    def __init__(self, model):
        self.model = model

    def blocks(self, interaction, n_items: int, item_block: int, budget: int) -> Iterator[Block]:
        step = max(1, budget // n_items)
        for lo in range(0, len(interaction), step):
            part = interaction[lo:lo + step]
            yield slice(lo, lo + len(part)), 0, self.model.full_sort_predict(part).view(len(part), -1)


def _declared(model):
    if not hasattr(model, "full_sort_embeddings"):
        return None
    return (lambda inter: model.full_sort_embeddings(inter)[0]), None


def _restored(model):
    if getattr(model, "restore_user_e", None) is None or getattr(model, "restore_item_e", None) is None:
        return None
    return (lambda inter: model.restore_user_e[inter[model.USER_ID]]), model.restore_item_e


def _user_embedding(model):
    if not (hasattr(model, "get_user_embedding") and hasattr(model, "item_embedding")):
        return None
    return (lambda inter: model.get_user_embedding(inter[model.USER_ID])), model.item_embedding.weight


def _sequence_output(model):
    if not (hasattr(model, "ITEM_SEQ") and hasattr(model, "item_embedding")):
        return None
    return (lambda inter: model.forward(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN])), model.item_embedding.weight


#: recognised forms, most specific first
FORMS = {"full_sort_embeddings": _declared, "restore_user_e": _restored,
         "get_user_embedding": _user_embedding, "sequence_output": _sequence_output}


def _same_scores(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if got.shape != ref.shape:
        return False
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * max(scale, 1.0)))


def make_scorer(model, sample, n_items: int):
    """The scorer for ``model`` (in eval mode), checked on ``sample`` (a few users' interaction).

    Raises ``NotImplementedError`` when the model has no ``full_sort_predict`` (the caller then
    uses RecBole's own path)."""
    reference = model.full_sort_predict(sample).view(len(sample), -1)  # also fills restore_* caches
    logger = getLogger(__name__)
    for name, form in FORMS.items():
        try:
            found = form(model)
            if found is None:
                continue
            user_fn, table = found
            if table is None:  # full_sort_embeddings gives its own item table
                table = model.full_sort_embeddings(sample)[1]
            if table.shape[0] == n_items and _same_scores(user_fn(sample) @ table.T, reference):
                return EmbeddingScorer(name, user_fn, table)
            logger.debug(f"{type(model).__name__}: '{name}' does not reproduce full_sort_predict")
        except Exception as err:  # a form that does not fit this model (e.g. another forward signature)
            logger.debug(f"{type(model).__name__}: '{name}' unusable ({type(err).__name__}: {err})")
    return PredictScorer(model)


__all__ = ["EmbeddingScorer", "PredictScorer", "make_scorer", "FORMS", "Block"]
