"""Exact full ranking with bounded memory: a running top-k over item blocks (issue 17).

RecBole's full-ranking evaluation builds, per batch of users, the dense ``[users, n_items]``
score matrix plus an int matrix of the same size (``Collector.eval_batch_collect``:
``zeros_like(scores, dtype=int)``), and gives general models ``eval_batch_size // n_items`` users
per batch (one user per batch at a million items). This path ranks the same items for the same
users with the same masks, but

* takes ``eval_batch_size`` users per chunk, general and sequential models alike;
* scores one ``[chunk users, eval_item_block]`` block at a time (:mod:`.scorers`), masks padding
  and history in it, and keeps a running top-``max(topk)`` per user;
* writes exactly what RecBole's collector writes for top-k metrics: ``rec.topk`` (hit flags of
  the top-k positions + the number of positives per user) and ``rec.items`` (the top-k ids).

So Recall, NDCG, MRR, Hit, Precision, MAP and the ``rec.items`` metrics (ItemCoverage,
AveragePopularity, GiniIndex, ShannonEntropy, TailPercentage) are RecBole's own computations on
identical inputs. Metrics that need every score (AUC, GAUC: ``rec.meanrank``; value metrics:
``rec.score``) run RecBole's path, with a message. Items with exactly equal scores may be
ordered differently: ``torch.topk`` itself does not specify an order among ties.

Config keys (defaults in ``properties/overall.yaml``): ``topk_eval`` — ``auto`` (this path when
evaluated users x items exceed ``topk_eval_threshold``), ``blocked`` (always, where possible) or
``recbole``; ``eval_item_block`` — items per score block. A trainer gets the path through
:func:`recbole_mm.trainer.scale.with_scale_hooks`.
"""

from logging import getLogger

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector
from recbole.evaluator.register import metric_information
from recbole.utils import EvaluatorType
from tqdm import tqdm

from recbole_mm.evaluation.scorers import make_scorer
from recbole_mm.model.layers.blocks import merge_topk

MODES = ("auto", "blocked", "recbole")
#: collector entries this path produces; any other needed entry means RecBole's path
TOPK_NEEDS = {"rec.topk", "rec.items", "data.num_items", "data.num_users", "data.count_items", "data.count_users"}
#: users of the first chunk on which a recognised scorer is checked against full_sort_predict
CHECK_USERS = 8


def mask_block(scores: torch.Tensor, rows: slice, item_lo: int, history) -> None:
    """RecBole's masks, restricted to one block: padding item 0 and the users' history items
    (``(row, item)`` pairs, rows counted in the chunk) get ``-inf``, in place."""
    if item_lo == 0:
        scores[:, 0] = -np.inf
    if history is None:
        return
    users, items = history
    inside = (users >= rows.start) & (users < rows.stop) & (items >= item_lo) & (items < item_lo + scores.shape[1])
    scores[users[inside] - rows.start, items[inside] - item_lo] = -np.inf


def blocked_topk(scorer, interaction, history, n_items: int, k: int, item_block: int, budget: int) -> torch.Tensor:
    """Top-``k`` item ids ``[chunk users, k]`` (best first), never a ``[users, n_items]`` matrix."""
    done, state, rows_now = [], None, None
    for rows, item_lo, scores in scorer.blocks(interaction, n_items, item_block, budget):
        if rows != rows_now:
            if state is not None:
                done.append(state[1])
            state, rows_now = None, rows
        mask_block(scores, rows, item_lo, history)
        state = merge_topk(state, item_lo, scores, k)
    done.append(state[1])
    return torch.cat(done)


def topk_hits(topk_ids: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor, n_items: int) -> torch.Tensor:
    """RecBole's ``rec.topk`` rows: ``[hit flag of each top-k position..., number of positives]``,
    without its ``[users, n_items]`` positives matrix (a positive is a ``user * n_items + item`` key)."""
    device = topk_ids.device
    keys = torch.unique(positive_u.to(device) * n_items + positive_i.to(device))
    n_pos = torch.bincount(keys // n_items, minlength=topk_ids.shape[0])
    rows = torch.arange(topk_ids.shape[0], device=device).unsqueeze(1)
    hits = torch.isin(rows * n_items + topk_ids, keys).int()
    return torch.cat((hits, n_pos.unsqueeze(1)), dim=1)


class TopKCollector(Collector):
    """RecBole's collector, which the blocked path feeds a batch's top-k ids instead of its scores."""

    def eval_topk_collect(self, topk_ids, interaction, positive_u, positive_i, n_items):
        """What :meth:`eval_batch_collect` writes for the top-k metrics, from ``topk_ids`` alone."""
        if self.register.need("rec.items"):
            self.data_struct.update_tensor("rec.items", topk_ids)
        if self.register.need("rec.topk"):
            self.data_struct.update_tensor("rec.topk", topk_hits(topk_ids, positive_u, positive_i, n_items))


def full_score_metrics(config):
    """The configured metrics that need more than the top-k positions."""
    return [m for m in config["metrics"] if set(metric_information[m.lower()]) - TOPK_NEEDS]


def use_blocked(config, eval_data) -> bool:
    """Whether ``eval_data`` is evaluated by the blocked path (logs why not, where it was asked for)."""
    mode = config["topk_eval"]
    if mode is None or mode == "recbole":
        return False
    if mode not in MODES:
        raise ValueError(f"topk_eval must be one of {MODES}, got {mode!r}")
    if not isinstance(eval_data, FullSortEvalDataLoader) or config["eval_type"] != EvaluatorType.RANKING:
        return False
    size = eval_data.sample_size * eval_data._dataset.item_num
    if mode == "auto" and size <= float(config["topk_eval_threshold"]):
        return False
    others = full_score_metrics(config)
    if others:
        getLogger(__name__).warning(
            f"topk_eval={mode}: {others} need every item's score, not only the top-k; evaluating with "
            f"RecBole's dense [users, n_items] path ({eval_data.sample_size} users x "
            f"{eval_data._dataset.item_num} items)")
        return False
    return True


class TopKEvalMixin:
    """Put before a RecBole ``Trainer`` class: full-ranking evaluation through :func:`blocked_topk`
    when :func:`use_blocked` says so, RecBole's own ``evaluate`` otherwise. Its ``eval_collector``
    is a :class:`TopKCollector` (or a subclass a caller puts there after ``__init__``)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = TopKCollector(config)
        self._described = None

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data or not use_blocked(self.config, eval_data):
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = torch.load(checkpoint_file, map_location=self.device, weights_only=False)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        self.model.eval()
        n_items = self.tot_item_num = eval_data._dataset.item_num
        k, chunk = max(self.config["topk"]), int(self.config["eval_batch_size"])
        item_block = int(self.config["eval_item_block"])
        indices = list(eval_data.sampler)  # this rank's users (all of them without DDP)
        starts = range(0, len(indices), chunk)
        if show_progress:
            starts = tqdm(starts, ncols=100, desc="Evaluate (blocked top-k)")
        scorer = None
        for start in starts:
            interaction, history, positive_u, positive_i = eval_data.collate_fn(indices[start:start + chunk])
            interaction = interaction.to(self.device)
            if history is not None:
                history = tuple(h.to(self.device) for h in history)
            if scorer is None:
                try:
                    scorer = make_scorer(self.model, interaction[:CHECK_USERS], n_items)
                except NotImplementedError:  # no full_sort_predict (NeuMF, NNCF, ConvNCF): RecBole's
                    # path scores every item through predict; the weights are loaded already
                    self._describe(f"{type(self.model).__name__} has no full_sort_predict: RecBole's evaluation")
                    return super().evaluate(eval_data, False, model_file, show_progress)
                about = (f"blocked top-{k} evaluation: {len(indices)} users x {n_items} items, "
                         f"scores from {scorer.name}, blocks of {chunk} users x {item_block} items")
                self._describe(about)
            topk_ids = blocked_topk(scorer, interaction, history, n_items, k, item_block, chunk * item_block)
            self.eval_collector.eval_topk_collect(topk_ids, interaction, positive_u, positive_i, n_items)
        self.eval_collector.model_collect(self.model)
        result = self.evaluator.evaluate(self.eval_collector.get_data_struct())
        if not self.config["single_spec"]:
            # RecBole weighs each rank by ``len(batched_data)`` summed over its batches, i.e. 4 per
            # loader batch; the same weights keep DDP results equal to RecBole's.
            result = self._map_reduce(result, 4 * len(eval_data))
        self.wandblogger.log_eval_metrics(result, head="eval")
        return result

    def _describe(self, about: str) -> None:
        """Logs how the ranking runs: once, not after every training epoch."""
        if about != self._described:
            self.logger.info(about)
            self._described = about
