"""Blocked exact top-k evaluation (recbole_mm/evaluation/topk.py): the same metrics as RecBole's
dense full ranking, to the last decimal, for general and sequential models on ml-100k and the
planted dataset, without a [users, n_items] matrix."""

import logging

import numpy as np
import pytest
import torch
from recbole.evaluator.collector import Collector
from recbole.trainer import Trainer

from conftest import TINY
from recbole_mm import Config
from recbole_mm.evaluation.scorers import make_scorer
from recbole_mm.evaluation.topk import CHECK_USERS, blocked_topk, topk_hits, use_blocked
from recbole_mm.model.layers.blocks import TOPK_GROUPED_WIDTH, BlockProduct, block_topk, merge_topk
from recbole_mm.trainer.scale import with_scale_hooks
from recbole_mm.registry import get_trainer

METRICS = ["Recall", "NDCG", "MRR", "Hit", "Precision", "MAP", "ShannonEntropy"]


class _Blocks:
    """A scorer over a fixed dense matrix, in item blocks (what EmbeddingScorer yields)."""

    name = "dense"

    def __init__(self, scores):
        self.scores = scores

    def blocks(self, interaction, n_items, item_block, budget):
        for lo in range(0, n_items, item_block):
            yield slice(0, self.scores.shape[0]), lo, self.scores[:, lo:lo + item_block].clone()


def test_blocked_topk_equals_topk_of_the_masked_matrix():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(13, 50, generator=gen)
    hist_u, hist_i = torch.randint(0, 13, (40,), generator=gen), torch.randint(1, 50, (40,), generator=gen)
    dense = scores.clone()
    dense[:, 0] = -np.inf
    dense[hist_u, hist_i] = -np.inf
    expected = dense.topk(10, dim=1).indices
    for block in (1, 7, 10, 50, 64):
        got = blocked_topk(_Blocks(scores), None, (hist_u, hist_i), 50, 10, block, budget=0)
        assert torch.equal(got, expected), block


def test_merge_topk_keeps_the_best_of_both():
    state = merge_topk(None, 0, torch.tensor([[5.0, 1.0, 3.0]]), 2)
    values, ids = merge_topk(state, 3, torch.tensor([[4.0, 6.0]]), 2)
    assert ids.tolist() == [[4, 0]] and values.tolist() == [[6.0, 5.0]]


def test_block_product_reuses_one_buffer_and_keeps_autograd():
    gen = torch.Generator().manual_seed(3)
    product, table = BlockProduct(), torch.randn(50, 8, generator=gen)
    users = torch.randn(7, 8, generator=gen)
    pointers = set()
    for lo, width in ((0, 20), (20, 20), (40, 10), (0, 50)):  # shrinking, then growing
        got = product(users, table[lo:lo + width])
        torch.testing.assert_close(got, users @ table[lo:lo + width].T, rtol=0, atol=1e-6)
        pointers.add(got.data_ptr())
    assert len(pointers) == 2  # one buffer until a block needs more room
    users.requires_grad_(True)
    product(users, table).sum().backward()  # a plain product where autograd needs one
    torch.testing.assert_close(users.grad, table.sum(0).expand(7, -1))


@pytest.mark.parametrize("extra", [0, 37])  # whole groups only; a last partial group
@pytest.mark.parametrize("k", [1, 10, 50])
def test_block_topk_equals_torch_topk_on_wide_blocks(k, extra):
    gen = torch.Generator().manual_seed(k + extra)
    width = TOPK_GROUPED_WIDTH + extra
    scores = (torch.randn(6, width, generator=gen) * 8).round()  # many equal values
    scores[:, torch.randint(0, width, (width // 3,), generator=gen)] = -float("inf")  # masked history
    scores[1, :] = -float("inf")
    scores[1, [5, width - 1]] = 2.0  # fewer finite scores than k
    scores[2, width - 3] = 1e6  # the best column in the partial group (or the last whole one)
    values, ids = block_topk(scores, k)
    assert torch.equal(values, scores.topk(k, dim=1).values)
    assert torch.equal(scores.gather(1, ids), values)  # ids name columns holding those values
    assert all(len(set(row)) == k for row in ids.tolist())
    assert ids[2, 0] == width - 3


def test_topk_hits_equal_recbole_collector():
    gen = torch.Generator().manual_seed(1)
    n_users, n_items, k = 9, 30, 5
    scores = torch.randn(n_users, n_items, generator=gen)
    positive_u = torch.randint(0, n_users, (25,), generator=gen)
    positive_i = torch.randint(1, n_items, (25,), generator=gen)  # duplicates included on purpose
    config = {"eval_args": {"mode": "full"}, "topk": [k], "device": "cpu", "metrics": ["Recall"]}
    collector = Collector(config)
    collector.eval_batch_collect(scores, None, positive_u, positive_i)
    got = topk_hits(scores.topk(k, dim=1).indices, positive_u, positive_i, n_items)
    assert torch.equal(got, collector.get_data_struct()["rec.topk"])


def _setup(model, data, overrides=None):
    from recbole_mm.quick_start.quick_start import build_data_and_model

    cfg = {**TINY, "modalities": None, "text_features": None, "metrics": METRICS, "topk": [5, 10, 20],
           "metric_decimal_place": 12, **(data or {}), **(overrides or {})}
    config = Config(model=model, dataset=cfg.pop("dataset", "ml-100k"), config_dict=cfg)
    _, train_data, _, test_data, net = build_data_and_model(config)
    return config, train_data, test_data, net


def _planted(planted):
    root, name = planted
    return {"data_path": root, "dataset": name}


SEQ = {"train_neg_sample_args": None, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}}


@pytest.mark.parametrize("model, on_planted, overrides, scorer, train", [
    ("BPR", False, {}, "get_user_embedding", True),
    ("SASRec", False, SEQ, "sequence_output", False),  # an epoch on ml-100k's 99k sequences is a minute
    ("LightGCN", True, {}, "restore_user_e", True),
    ("SASRec", True, SEQ, "sequence_output", True),
    ("BERT4Rec", True, SEQ, "full_sort_predict", True),  # its output bias: no embedding form fits
])
def test_blocked_metrics_equal_recbole(model, on_planted, overrides, scorer, train, request):
    data = _planted(request.getfixturevalue("planted")) if on_planted else None
    config, train_data, test_data, net = _setup(model, data, overrides)
    trainer_cls = get_trainer(config["MODEL_TYPE"], model)
    trainer = trainer_cls(config, net)
    if train:
        trainer.fit(train_data, saved=False)
    expected = trainer.evaluate(test_data, load_best_model=False)

    # several user chunks and item blocks, the last block partial
    config["topk_eval"], config["eval_batch_size"], config["eval_item_block"] = "blocked", 37, 29
    assert use_blocked(config, test_data)
    got = with_scale_hooks(trainer_cls)(config, net).evaluate(test_data, load_best_model=False)
    assert got == expected
    assert expected["recall@20"] > 0  # a ranking that finds something, not two empty results

    net.eval()
    interaction = test_data.collate_fn(list(range(CHECK_USERS)))[0]
    with torch.no_grad():
        assert make_scorer(net, interaction, test_data._dataset.item_num).name == scorer


def test_auto_threshold_and_full_score_metrics_fall_back(planted, caplog):
    config, _, test_data, _ = _setup("BPR", _planted(planted))
    size = test_data.sample_size * test_data._dataset.item_num
    config["topk_eval"], config["topk_eval_threshold"] = "auto", size
    assert not use_blocked(config, test_data)
    config["topk_eval_threshold"] = size - 1
    assert use_blocked(config, test_data)
    config["topk_eval"] = "recbole"
    assert not use_blocked(config, test_data)
    config["topk_eval"], config["metrics"] = "blocked", ["Recall", "GAUC"]
    with caplog.at_level(logging.WARNING):
        assert not use_blocked(config, test_data)
    assert "GAUC" in caplog.text and "RecBole's dense" in caplog.text
    config["topk_eval"] = "fast"
    with pytest.raises(ValueError, match="topk_eval must be one of"):
        use_blocked(config, test_data)


def test_predict_scorer_keeps_to_the_budget(planted):
    config, _, test_data, net = _setup("BPR", _planted(planted))
    net.eval()
    interaction = test_data.collate_fn(list(range(20)))[0]
    n_items = test_data._dataset.item_num
    from recbole_mm.evaluation.scorers import PredictScorer

    blocks = list(PredictScorer(net).blocks(interaction, n_items, item_block=8, budget=3 * n_items + 1))
    assert [b[2].shape for b in blocks] == [(3, n_items)] * 6 + [(2, n_items)]
    assert [b[0] for b in blocks][-1] == slice(18, 20)


def test_with_scale_hooks_makes_one_subclass_per_trainer():
    cls = with_scale_hooks(Trainer)
    assert issubclass(cls, Trainer) and cls is not Trainer
    assert with_scale_hooks(Trainer) is cls and with_scale_hooks(cls) is cls
    assert cls.__name__ == "Trainer"


def test_the_blocked_path_describes_itself_once_per_trainer_and_user_set(caplog):
    config, _, test_data, net = _setup("BPR", None)
    caplog.set_level(logging.INFO)
    trainer = get_trainer(config["MODEL_TYPE"], "BPR")(config, net)
    for _ in range(3):  # as after every training epoch
        trainer.evaluate(test_data, load_best_model=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("blocked top-")]
    assert len(lines) == 1 and f"{test_data.sample_size} users" in lines[0]


def test_a_model_without_full_sort_predict_is_ranked_by_recboles_path(caplog):
    # NeuMF (like NNCF, ConvNCF) scores items through predict only: the default blocked path
    # hands it to RecBole's evaluation, which does that, instead of failing
    config, _, test_data, net = _setup("NeuMF", None)
    caplog.set_level(logging.INFO)
    trainer = get_trainer(config["MODEL_TYPE"], "NeuMF")(config, net)
    assert use_blocked(config, test_data)
    got = trainer.evaluate(test_data, load_best_model=False)
    assert "NeuMF has no full_sort_predict: RecBole's evaluation" in caplog.text
    config["topk_eval"] = "recbole"
    assert got == trainer.evaluate(test_data, load_best_model=False)
