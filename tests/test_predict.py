"""``python -m recbole_mm.predict``: top-k from a checkpoint in a fresh process equals the
in-process ranking (full_sort_predict, seen items and padding masked, torch.topk)."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction

from conftest import TINY
from recbole_mm import Config
from recbole_mm.predict import Predictor, main
from recbole_mm.quick_start.quick_start import build_data_and_model
from recbole_mm.registry import get_trainer

SEQ = {"train_neg_sample_args": None, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}}


def _train(model, planted, overrides=None):
    root, name = planted
    cfg = {**TINY, "data_path": root, "modalities": None, "text_features": None, **(overrides or {})}
    config = Config(model=model, dataset=name, config_dict=cfg)
    dataset, train_data, valid_data, _, net = build_data_and_model(config)
    trainer = get_trainer(config["MODEL_TYPE"], model)(config, net)
    trainer.fit(train_data, valid_data, saved=True)
    return config, dataset, net.eval(), trainer.saved_model_file


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "recbole_mm.predict", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(text):
    rows = list(csv.reader(text.splitlines()))
    assert rows[0][0] == "query" and rows[0][1] == "item_1"
    return {row[0]: row[1:] for row in rows[1:]}


def _expected(dataset, net, interaction, seen, k):
    """Hand ranking: the model's dense scores, seen items and padding at -inf, torch.topk."""
    with torch.no_grad():
        scores = net.full_sort_predict(interaction).view(len(interaction), -1).clone()
    scores[:, 0] = -np.inf
    for row, items in enumerate(seen):
        scores[row, items] = -np.inf
    return [list(dataset.id2token(dataset.iid_field, r.numpy())) for r in scores.topk(k, dim=1).indices]


def test_general_checkpoint_ranks_users_in_a_fresh_process(planted, tmp_path):
    config, dataset, net, checkpoint = _train("BPR", planted)
    users = ["u1", "u7", "u42"]
    ids = torch.tensor([dataset.field2token_id[dataset.uid_field][u] for u in users])
    inter = dataset.inter_feat
    seen = [inter[dataset.iid_field][inter[dataset.uid_field] == u] for u in ids]
    expected = _expected(dataset, net, Interaction({dataset.uid_field: ids}), seen, 5)
    assert all(len(s) > 0 for s in seen)

    predictor = Predictor(config, net, dataset)
    assert predictor.recommend_users(users, 5) == expected
    with_seen = predictor.recommend_users(users, 5, include_seen=True)
    assert with_seen != expected  # BPR after an epoch ranks some of the users' own items on top
    config["eval_batch_size"], config["eval_item_block"] = 2, 7  # users in chunks, items in blocks
    assert predictor.recommend_users(users, 5) == expected
    config["eval_batch_size"], config["eval_item_block"] = TINY["eval_batch_size"], None
    assert _rows(_cli(checkpoint, "--users", *users, "--topk", 5)) == dict(zip(users, expected))

    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    main([checkpoint, "--input", str(tmp_path / "users.txt"), "--topk", "5", "--include-seen",
          "--output", str(tmp_path / "top.csv")])
    assert _rows((tmp_path / "top.csv").read_text()) == dict(zip(users, with_seen))


def test_sequential_checkpoint_continues_sequences_in_a_fresh_process(planted, tmp_path):
    config, dataset, net, checkpoint = _train("SASRec", planted, SEQ)
    sequences = [["i3", "i4", "i5"], ["i20", "i21"]]
    ids = [torch.tensor([dataset.field2token_id[dataset.iid_field][t] for t in s]) for s in sequences]
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    seq = torch.zeros(2, max_len, dtype=torch.long)
    for row, s in enumerate(ids):
        seq[row, :len(s)] = s
    interaction = Interaction({net.ITEM_SEQ: seq, net.ITEM_SEQ_LEN: torch.tensor([len(s) for s in ids])})
    expected = _expected(dataset, net, interaction, ids, 4)

    predictor = Predictor(config, net, dataset)
    assert predictor.recommend_sequences(sequences, 4) == expected
    # --users on a sequential model: the user's whole time-ordered history is the sequence
    root, name = planted
    rows = [line.split("\t") for line in open(f"{root}/{name}/{name}.inter").read().splitlines()[1:]]
    history = [item for user, item, *_ in sorted(rows, key=lambda r: float(r[3])) if user == "u5"]
    assert predictor.recommend_users(["u5"], 4) == predictor.recommend_sequences([history], 4)
    keys = [" ".join(s) for s in sequences]
    (tmp_path / "seqs.txt").write_text("\n".join(keys) + "\n")
    out = _cli(checkpoint, "--input", tmp_path / "seqs.txt", "--sequences", "--topk", 4)
    assert _rows(out) == dict(zip(keys, expected))
    main([checkpoint, "--sequence", *sequences[0], "--topk", "4", "--output", str(tmp_path / "one.csv")])
    assert _rows((tmp_path / "one.csv").read_text()) == {keys[0]: expected[0]}


def test_bad_queries_are_refused_and_rows_hold_only_recommendable_items(planted, capsys):
    config, dataset, net, checkpoint = _train("BPR", planted)
    predictor = Predictor(config, net, dataset)
    with pytest.raises(ValueError, match="unknown user_id token"):
        predictor.recommend_users(["nobody"])
    with pytest.raises(ValueError, match="general model"):
        predictor.recommend_sequences([["i1"]])
    with pytest.raises(ValueError, match="k >= 1"):
        predictor.recommend_users(["u1"], 0)
    with pytest.raises(SystemExit):  # user tokens are not item sequences
        main([checkpoint, "--users", "u1", "--sequences"])
    assert "--sequences says how to read --input" in capsys.readouterr().err
    assert main([checkpoint, "--users", "u1", "nobody"]) == 2  # said in one line, no traceback
    assert capsys.readouterr().err.startswith("error: unknown user_id token(s) ['nobody']")
    assert main([checkpoint, "--users", "u1", "--topk", "0"]) == 2
    assert "k >= 1" in capsys.readouterr().err

    # more items asked for than are left: the row holds every unseen real item, and no padding
    inter, uid = dataset.inter_feat, dataset.field2token_id[dataset.uid_field]["u1"]
    seen = set(dataset.id2token(dataset.iid_field, inter[dataset.iid_field][inter[dataset.uid_field] == uid].numpy()))
    items = set(dataset.field2id_token[dataset.iid_field][1:])
    (row,) = predictor.recommend_users(["u1"], dataset.item_num + 5)
    assert seen and len(row) == len(set(row)) and set(row) == items - seen
    (row,) = predictor.recommend_users(["u1"], dataset.item_num + 5, include_seen=True)
    assert len(row) == len(items) and set(row) == items


def test_checkpoint_evaluates_in_a_fresh_process(planted):
    """RecBole's metrics use ``np.float``, which RecBole defines only while building a Config:
    a process that loads a checkpoint (whose Config is unpickled, not built) must still evaluate."""
    _, _, _, checkpoint = _train("BPR", planted)
    code = ("import recbole_mm; from recbole_mm.quick_start import load_data_and_model; "
            "from recbole_mm.registry import get_trainer; import sys; "
            "config, model, dataset, train, valid, test = load_data_and_model(sys.argv[1]); "
            "trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model); "
            "print('RESULT', trainer.evaluate(test, load_best_model=False)['recall@10'])")
    proc = subprocess.run([sys.executable, "-c", code, checkpoint], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT" in proc.stdout
