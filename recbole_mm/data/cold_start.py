"""Cold-start items: a share of the items held out of training entirely, and metrics reported
separately for warm and cold targets (issue 17).

``cold_item_ratio: r`` (with ``cold_seed``) draws ``round(r * n)`` of the ``n`` items that have
interactions, uniformly under ``cold_seed`` (independent of the model's seed, so every model of a
comparison gets the same cold items). After RecBole's (or the label) split:

* general data: every training interaction of a cold item moves to validation or test, each one
  drawn in proportion to the two parts' sizes;
* sequential data (one row per target, the items before it in ``<field>_list`` fields): training
  rows whose target is cold move likewise; cold items are removed from the remaining training
  rows' input lists (the lists are compacted, lengths shortened, rows left empty dropped), so no
  cold item is an input or a target in training;
* negatives: with ``cold_negatives: false`` (the default) a cold item is no training negative
  either (:func:`keep_out_of_negatives`): the training loader's negative sampler redraws every cold
  item it draws, and a sequential model trained with cross-entropy over all items has the cold
  items' logits at ``-inf`` in its loss (out of the softmax's denominator, no gradient). So a cold
  item is in no training pair at all. With ``cold_negatives: true`` a cold item is drawn as a
  negative with the cold items' share of the catalogue and stays in the softmax, and its only
  training signal pushes it down (with it, MambaRec's, MGCN's and FREEDOM's cold Recall@20 on
  TikTok was 0; it stayed 0 without: docs/results/cold-start-tiktok.md).

Item features stay known for every item (cold ones included): models that build item graphs from
features (MambaRec, MGCN, FREEDOM) link a cold item to its nearest warm ones.

Valid and test rows keep cold items in their histories: they are what a user did, and a model
that embeds items from features can use them. The item ids are on every part as
``dataset.cold_items`` (a sorted ``LongTensor``). :func:`evaluate_warm_cold` evaluates a trainer on
the test (or valid) interactions whose target item is warm and on those whose target is cold,
ranking all items both times: ID-only models are the floor on cold items, since a cold item's ID
embedding got no positive signal.
"""

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import ModelType
from torch import nn

from recbole_mm.model.loss.chunked_ce import ExcludingCrossEntropy


def draw_cold_items(item_ids: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """``round(ratio * n)`` of the distinct non-padding ``item_ids``, sorted; reproducible by ``seed``."""
    if not 0 < ratio < 1:
        raise ValueError(f"cold_item_ratio must lie in (0, 1), got {ratio}")
    items = np.unique(item_ids.numpy())
    items = items[items > 0]
    chosen = np.random.default_rng(seed).choice(items, int(round(ratio * len(items))), replace=False)
    return torch.from_numpy(np.sort(chosen))


def _compact_lists(inter, list_fields, len_field, drop: torch.Tensor) -> None:
    """Remove the positions ``drop`` (``[rows, max_len]`` bool) from every list field, in place."""
    length = inter[len_field]
    keep = (torch.arange(drop.shape[1]).unsqueeze(0) < length.unsqueeze(1)) & ~drop
    order = torch.argsort((~keep).int(), dim=1, stable=True)  # kept positions first, in order
    new_length = keep.sum(1)
    tail = torch.arange(drop.shape[1]).unsqueeze(0) >= new_length.unsqueeze(1)
    for field in list_fields:
        values = inter[field]
        index = order if values.dim() == 2 else order.unsqueeze(-1).expand_as(values)
        values = values.gather(1, index)
        values[tail] = 0
        inter.interaction[field] = values
    inter.interaction[len_field] = new_length.to(length.dtype)


def hold_out(dataset, parts):
    """``[train, valid, test]`` with the cold items moved out of ``train`` (see the module doc);
    ``parts`` unchanged when ``cold_item_ratio`` is not set."""
    config = dataset.config
    ratio = config["cold_item_ratio"]
    if not ratio:
        return parts
    if len(parts) != 3:
        raise ValueError(f"cold_item_ratio needs a train/valid/test split, got {len(parts)} parts")
    train, valid, test = parts
    iid = dataset.iid_field
    cold = draw_cold_items(torch.cat([p.inter_feat[iid] for p in parts]), float(ratio), int(config["cold_seed"]))
    moving = torch.isin(train.inter_feat[iid], cold)
    moved = train.inter_feat[moving]
    rng = np.random.default_rng(int(config["cold_seed"]))
    to_valid = torch.from_numpy(rng.random(len(moved)) < len(valid) / max(len(valid) + len(test), 1))
    kept = train.inter_feat[~moving]
    list_field = getattr(dataset, "item_id_list_field", None)
    if list_field is not None and list_field in kept.interaction:  # sequential: clean the inputs too
        suffix = config["LIST_SUFFIX"]
        list_fields = [f for f in kept.interaction if f.endswith(suffix)]
        _compact_lists(kept, list_fields, dataset.item_list_length_field, torch.isin(kept[list_field], cold))
        kept = kept[kept[dataset.item_list_length_field] > 0]
    parts = [train.copy(kept), valid.copy(_cat(valid.inter_feat, moved[to_valid])),
             test.copy(_cat(test.inter_feat, moved[~to_valid]))]
    for part in parts + [dataset]:
        part.cold_items = cold
    dataset.logger.info(f"cold-start: {len(cold)} items held out of training (cold_item_ratio={ratio}, "
                        f"cold_seed={config['cold_seed']}); {len(moved)} training interactions moved to "
                        f"valid ({int(to_valid.sum())}) and test ({int((~to_valid).sum())})")
    return parts


class _WarmDraws:
    """A negative sampler's ``sampling`` with every draw of a cold item redrawn (same distribution,
    conditioned on warm); a class, not a closure, so the loader still pickles."""

    def __init__(self, draw, cold: np.ndarray):
        self.draw, self.cold = draw, cold

    def __call__(self, sample_num):
        values = np.asarray(self.draw(sample_num))
        redo = np.flatnonzero(np.isin(values, self.cold))
        while len(redo):
            values[redo] = self.draw(len(redo))
            redo = redo[np.isin(values[redo], self.cold)]
        return values


def keep_out_of_negatives(train_data, model) -> None:
    """Make the training loader's negative sampler never return a cold item, and a cross-entropy
    sequential ``model``'s softmax leave them out (the module doc), unless ``cold_negatives`` is set;
    nothing to do without cold items."""
    dataset = train_data._dataset
    cold = getattr(dataset, "cold_items", None)
    if cold is None or dataset.config["cold_negatives"]:
        return
    sampler = getattr(train_data, "_sampler", None)
    if sampler is not None:
        sampler.sampling = _WarmDraws(sampler.sampling, cold.numpy())
        dataset.logger.info(f"cold-start: the {len(cold)} cold items are not drawn as training negatives "
                            "(cold_negatives: false)")
    if model.type != ModelType.SEQUENTIAL or dataset.config["loss_type"] != "CE":
        return
    loss = getattr(model, "loss_fct", None)
    if not isinstance(loss, nn.CrossEntropyLoss):
        dataset.logger.warning(f"cold-start: {type(model).__name__}'s loss_fct is not a CrossEntropyLoss; "
                               "the cold items stay in its softmax")
        return
    excluded = torch.zeros(model.n_items, dtype=torch.bool, device=model.device)
    excluded[cold.to(model.device)] = True
    model.loss_fct = ExcludingCrossEntropy(loss, excluded)
    dataset.logger.info(f"cold-start: the {len(cold)} cold items are out of {type(model).__name__}'s training "
                        "softmax (cold_negatives: false)")


def _cat(a, b):
    from recbole.data.interaction import cat_interactions

    return cat_interactions([a, b]) if len(b) else a


def cold_targets(dataset) -> torch.Tensor:
    """Per interaction of ``dataset`` (a part of a cold-start split): is its target item cold?"""
    cold = getattr(dataset, "cold_items", None)
    if cold is None:
        raise ValueError("the dataset has no cold items: set cold_item_ratio (and cold_seed) in the config")
    return torch.isin(dataset.inter_feat[dataset.iid_field], cold)


def evaluate_warm_cold(trainer, eval_data, load_best_model=False):
    """``{"warm": metrics, "cold": metrics}`` of ``trainer`` on the interactions of ``eval_data``
    (a full-ranking loader) whose target item is warm, resp. cold; ``None`` for a group without
    interactions. Both rank all items with the same history masks as ``eval_data``."""
    dataset = eval_data._dataset
    if not isinstance(eval_data, FullSortEvalDataLoader):
        raise ValueError("the warm/cold report ranks all items: it needs a full-sort evaluation loader")
    is_cold = cold_targets(dataset)
    report = {}
    for name, rows in (("warm", ~is_cold), ("cold", is_cold)):
        if not rows.any():
            report[name] = None
            continue
        loader = FullSortEvalDataLoader(eval_data.config, dataset.copy(dataset.inter_feat[rows]), eval_data._sampler)
        report[name] = trainer.evaluate(loader, load_best_model=load_best_model and name == "warm")
    return report
