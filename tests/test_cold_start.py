"""Cold-start items (recbole_mm/data/cold_start.py): held out of training entirely, moved to
valid/test, reported apart from warm items; an ID-only model is the floor on them."""

import argparse
import logging

import pytest
import torch
import yaml

from conftest import TINY, load_benchmark_script
from recbole_mm import Config
from recbole_mm.data.cold_start import draw_cold_items, evaluate_warm_cold
from recbole_mm.quick_start.quick_start import build_data_and_model
from recbole_mm.registry import get_trainer

SEQ = {"train_neg_sample_args": None, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}}
GENERAL = {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}}


def _build(model, planted, **overrides):
    root, name = planted
    # modalities make the dataset recbole-mm's (where the hold-out lives) for RecBole's models too
    cfg = {**TINY, "data_path": root, "modalities": ["image", "text"], "metrics": ["Recall", "NDCG"],
           "topk": [20], "valid_metric": "recall@20", **overrides}
    config = Config(model=model, dataset=name, config_dict=cfg)
    return config, build_data_and_model(config)


def test_draw_is_reproducible_and_sized():
    items = torch.tensor([0, 3, 3, 5, 7, 9, 11, 12, 14, 20, 21])
    first = draw_cold_items(items, 0.3, seed=1)
    assert len(first) == 3 and torch.equal(first, draw_cold_items(items, 0.3, seed=1))
    assert set(first.tolist()) <= {3, 5, 7, 9, 11, 12, 14, 20, 21}  # never padding
    assert any(not torch.equal(first, draw_cold_items(items, 0.3, seed=s)) for s in range(2, 6))


def test_general_split_moves_every_cold_interaction_out_of_training(planted):
    _, (_, train, valid, test, _) = _build("BPR", planted, **GENERAL)
    _, (_, w_train, w_valid, w_test, _) = _build("BPR", planted, cold_item_ratio=0.2, cold_seed=3, **GENERAL)
    iid = train.dataset.iid_field
    cold = w_train.dataset.cold_items
    assert len(cold) == round(0.2 * 120)
    assert not torch.isin(w_train.dataset.inter_feat[iid], cold).any()
    # nothing lost, nothing duplicated: the same interactions, cold ones in valid/test only
    def count(*parts):
        return sum(len(p.dataset.inter_feat) for p in parts)
    assert count(w_train, w_valid, w_test) == count(train, valid, test)
    before = torch.isin(torch.cat([p.dataset.inter_feat[iid] for p in (train, valid, test)]), cold).sum()
    after = torch.isin(torch.cat([p.dataset.inter_feat[iid] for p in (w_valid, w_test)]), cold).sum()
    assert before == after > 0
    for part in (w_valid, w_test):
        assert torch.isin(part.dataset.inter_feat[iid], cold).any()


def test_sequential_training_never_sees_a_cold_item(planted):
    config, (_, train, valid, test, _) = _build("SASRec", planted, cold_item_ratio=0.1, cold_seed=0, **SEQ)
    data = train.dataset
    cold = data.cold_items
    inter = data.inter_feat
    assert not torch.isin(inter[data.iid_field], cold).any()
    lists, lengths = inter[data.item_id_list_field], inter[data.item_list_length_field]
    assert not torch.isin(lists, cold).any() and (lengths > 0).all()
    positions = torch.arange(lists.shape[1]).unsqueeze(0)
    assert ((lists > 0) == (positions < lengths.unsqueeze(1))).all()  # compacted, left-aligned
    assert torch.isin(test.dataset.inter_feat[data.iid_field], cold).any()


def _negatives(train, batches=20):
    """The negative item ids of ``batches`` passes over the training loader."""
    drawn = [batch[train._dataset.config["NEG_PREFIX"] + train._dataset.iid_field]
             for _, batch in zip(range(batches), iter(train))]
    return torch.cat(drawn)


def test_cold_items_are_never_drawn_as_negatives_unless_asked(planted):
    config, (_, train, _, _, _) = _build("BPR", planted, cold_item_ratio=0.2, cold_seed=0, **GENERAL)
    cold = train.dataset.cold_items
    strict = _negatives(train)
    assert not config["cold_negatives"] and not torch.isin(strict, cold).any()
    assert len(torch.unique(strict)) > 0.6 * (train.dataset.item_num - 1 - len(cold))  # every warm item, not a few
    _, (_, loose, _, _, _) = _build("BPR", planted, cold_item_ratio=0.2, cold_seed=0, cold_negatives=True, **GENERAL)
    share = torch.isin(_negatives(loose), cold).float().mean().item()
    assert 0.1 < share < 0.3  # uniform over the catalogue: about the cold items' 20%


SMALL_FINDREC = {"embedding_size": 16, "align_dim": 16, "n_heads": 2, "n_experts": 2, "d_state": 4, "n_layers": 1,
                 "mamba_backend": "torch", "MAX_ITEM_LIST_LENGTH": 10}


@pytest.mark.parametrize("model,chunk", [("SASRec", None), ("SASRec", 16), ("GRU4Rec", None), ("SASRecMM", None),
                                         ("FindRec", None), ("FindRec", 16)])
def test_cross_entropy_models_leave_cold_items_out_of_the_softmax_unless_asked(planted, model, chunk):
    # a softmax over all items is a negative of every item: strictly held out, a cold item's ID
    # row gets no gradient at all; with cold_negatives it is pushed down like any non-target
    small = SMALL_FINDREC if model == "FindRec" else {}
    keys = {}
    for as_negatives in (False, True):
        config, (_, train, _, _, net) = _build(model, planted, cold_item_ratio=0.2, cold_seed=0, ce_item_chunk=chunk,
                                               cold_negatives=as_negatives, **small, **SEQ)
        if chunk:  # the trainer's swap (FindRec slices its own CE) must still reproduce the loss
            get_trainer(config["MODEL_TYPE"], model)(config, net)._use_chunked_ce(train, chunk)
            assert ("calculate_loss" in vars(net)) == (model != "FindRec")
        loss = net.calculate_loss(next(iter(train)))
        sum(loss if isinstance(loss, tuple) else [loss]).backward()
        ids = getattr(net.item_embedding, "id_embedding", net.item_embedding)  # SASRecMM: E_id + W f
        cold_rows = ids.weight.grad[train.dataset.cold_items]
        assert (cold_rows.abs().sum(1) > 0).all() == as_negatives
        assert (cold_rows == 0).all() != as_negatives
        keys[as_negatives] = list(net.state_dict())
    assert keys[False] == keys[True]  # checkpoints are the same either way


def test_a_softmax_the_split_cannot_reach_is_named(planted, caplog):
    # RecBole's BERT4Rec builds its cross-entropy inside calculate_loss: the cold items stay in it
    with caplog.at_level(logging.WARNING):
        _build("BERT4Rec", planted, cold_item_ratio=0.2, cold_seed=0, **SEQ)
    assert "BERT4Rec's loss_fct is not a CrossEntropyLoss; the cold items stay in its softmax" in caplog.text


def test_warm_cold_report_puts_an_id_model_at_the_floor_on_cold_items(planted):
    cold = {}
    for as_negatives in (True, False):
        config, (_, train, valid, test, model) = _build("BPR", planted, cold_item_ratio=0.2, cold_seed=0, epochs=5,
                                                        learning_rate=0.01, cold_negatives=as_negatives, **GENERAL)
        trainer = get_trainer(config["MODEL_TYPE"], "BPR")(config, model)
        trainer.fit(train, valid, saved=False)
        report = evaluate_warm_cold(trainer, test)
        warm, cold[as_negatives] = report["warm"]["recall@20"], report["cold"]["recall@20"]
        chance = 20 / (test.dataset.item_num - 1)
        assert warm > 0.3, report
        overall = trainer.evaluate(test, load_best_model=False)["recall@20"]
        assert cold[as_negatives] < overall < warm
    # a cold item's ID embedding gets no positive signal: drawn as a negative (pushed down) or not
    # (left at its initial weights while warm items' embeddings grow), it ranks below chance
    assert max(cold.values()) < chance * 0.75, (cold, chance)


def test_findrec_scores_cold_items_from_their_features_with_feature_logits(planted):
    # eq. 4's ID table gives a cold item only a negative's training; `feature_logits` adds the
    # item's projected features to its candidate vector, so a cold item that fits the planted
    # walk (its features carry its cluster and phase) is ranked from them
    small = {**SMALL_FINDREC, "warmup_steps": 5, "learning_rate": 0.005, "epochs": 6, "cold_item_ratio": 0.2,
             "cold_seed": 0, **SEQ}
    cold = {}
    for feature_logits in (False, True):
        config, (_, train, valid, test, model) = _build("FindRec", planted, feature_logits=feature_logits, **small)
        trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
        trainer.fit(train, valid, saved=False)
        cold[feature_logits] = evaluate_warm_cold(trainer, test)["cold"]["recall@20"]
    chance = 20 / (test.dataset.item_num - 1)
    assert cold[False] < chance < cold[True], (cold, chance)


def test_mambarec_scores_cold_items_through_its_feature_graph(planted):
    # a cold item's ID embedding never trains, but its modality views reach it over the kNN item
    # graphs built from the features, so MambaRec ranks cold items far above the ID-only floor
    cold = {}
    for model in ("BPR", "MambaRec"):
        config, (_, train, valid, test, net) = _build(model, planted, cold_item_ratio=0.2, cold_seed=0, epochs=5,
                                                      learning_rate=0.01, **GENERAL)
        trainer = get_trainer(config["MODEL_TYPE"], model)(config, net)
        trainer.fit(train, valid, saved=False)
        cold[model] = evaluate_warm_cold(trainer, test)["cold"]["recall@20"]
    chance = 20 / (test.dataset.item_num - 1)
    assert cold["BPR"] < chance < cold["MambaRec"], (cold, chance)


def test_cold_start_probe_recomputes_recbole_warm_and_cold_recall(planted, tmp_path):
    # benchmarks/cold_start_probe.py ranks from the scores itself (to try other cold embeddings):
    # its masks and per-user sets must give exactly what evaluate_warm_cold reports
    probe = load_benchmark_script("cold_start_probe").probe
    root, name = planted
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "probe", "dataset": name, "runs": ["VBPR"], "config": {
        **TINY, "data_path": root, "modalities": ["image", "text"], "metrics": ["Recall"], "topk": [20],
        "valid_metric": "recall@20", "epochs": 2, "cold_item_ratio": 0.2, "cold_seed": 0, **GENERAL}}))
    report, rows, options = probe(argparse.Namespace(suite=str(suite), model="VBPR", out=str(tmp_path), seed=2020, k=[1, 3],
                                            checkpoint=None))
    assert [r["variant"] for r in rows] == ["as trained", "cold items = mean of their 1 nearest warm items",
                                            "cold items = mean of their 3 nearest warm items",
                                            "cold items' ID embedding rows set to 0"]
    for group in ("warm", "cold"):
        assert round(rows[0][f"{group}_recall@20"], 4) == report[group]["recall@20"]
    assert rows[1]["cold_recall@20"] != rows[0]["cold_recall@20"]  # the imputation reached the ranking
    # VBPR's item = gamma_i + E f_i: zero gamma rows change cold items' scores only
    assert rows[3]["warm_recall@20"] == rows[0]["warm_recall@20"] and rows[3]["cold_recall@20"] != rows[0]["cold_recall@20"]
    assert (tmp_path / "probe-VBPR-seed2020-probe.md").is_file()
    # the same weights from the run's checkpoint: the same numbers without training again
    (saved,) = (tmp_path / "checkpoints").glob("VBPR-*.pth")
    again = probe(argparse.Namespace(suite=str(suite), model="VBPR", out=str(tmp_path / "again"), seed=2020, k=[1, 3],
                                     checkpoint=str(saved)))
    assert again[1] == rows and again[2] == options
    # the option through RecBole's evaluator: off = the report, k = the probe's own k-neighbour ranking
    assert [o["k"] for o in options] == [0, 1, 3]
    assert options[0]["cold_recall@20"] == report["cold"]["recall@20"]
    for option, row in zip(options[1:], rows[1:3]):
        assert option["cold_recall@20"] == round(row["cold_recall@20"], 4)
        assert option["warm_recall@20"] == round(row["warm_recall@20"], 4)


@pytest.mark.parametrize("model", ["MGCN", "VBPR", "FREEDOM"])
def test_cold_item_neighbours_give_a_cold_item_its_feature_neighbours_embedding(planted, model):
    # cold_item_neighbours: k: in evaluation an item without training interactions gets the mean
    # final embedding of its k most feature-similar warm items (cosine of the L2-normalised,
    # concatenated features); warm items and training are unchanged
    config, (dataset, train, _, _, net) = _build(model, planted, cold_item_ratio=0.2, cold_seed=0,
                                                 cold_item_neighbours=3, **GENERAL)
    train_items = train.dataset.inter_feat[net.ITEM_ID]
    untrained = torch.bincount(train_items, minlength=net.n_items) == 0
    untrained[0] = False
    assert torch.equal(net.cold_items, untrained.nonzero().squeeze(1))
    assert len(net.cold_items) == round(0.2 * (net.n_items - 1))
    # the neighbours by brute force, in float64
    feats = torch.cat([torch.nn.functional.normalize(dataset.item_features[m].double(), dim=1)
                       for m in sorted(dataset.item_features)], 1)
    feats = torch.nn.functional.normalize(feats, dim=1)
    sim = feats[net.cold_items] @ feats.T
    sim[:, untrained] = -1e9
    sim[:, 0] = -1e9
    assert torch.equal(torch.sort(net.cold_neighbours, 1).values, torch.sort(sim.topk(3, dim=1).indices, 1).values)
    assert "cold_neighbours" not in net.state_dict()  # rebuilt from the data, never checkpointed
    net.eval()
    users = torch.arange(1, 6)
    scores = net.full_sort_predict({net.USER_ID: users}).view(len(users), -1)
    with torch.no_grad():
        user_e, item_e = net.final_embeddings()
    expected = item_e.clone()
    expected[net.cold_items] = item_e[net.cold_neighbours].mean(1)
    torch.testing.assert_close(scores, user_e[users] @ expected.T)
    with pytest.raises(ValueError, match="cold_item_neighbours must be"):
        _build(model, planted, cold_item_neighbours=-1, **GENERAL)


def test_cold_item_neighbours_lift_cold_items_of_a_trained_model(planted):
    # MGCN reaches a cold item only through what its kNN neighbours' views carry back to it; its
    # nearest warm item's trained embedding ranks cold items of the planted clusters far higher
    # (measured: cold Recall@20 0.67 -> 0.86, warm 0.91 -> 0.90)
    config, (_, train, valid, test, net) = _build("MGCN", planted, cold_item_ratio=0.2, cold_seed=0, epochs=5,
                                                  learning_rate=0.01, cold_item_neighbours=1, **GENERAL)
    trainer = get_trainer(config["MODEL_TYPE"], "MGCN")(config, net)
    trainer.fit(train, valid, saved=False)
    with_neighbours = evaluate_warm_cold(trainer, test)
    net.cold_items = None  # the same weights, cold items scored by the model itself
    own = evaluate_warm_cold(trainer, test)
    assert with_neighbours["cold"]["recall@20"] > own["cold"]["recall@20"] + 0.1, (with_neighbours, own)
    assert abs(with_neighbours["warm"]["recall@20"] - own["warm"]["recall@20"]) < 0.05, (with_neighbours, own)
