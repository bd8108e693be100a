"""Cold-start items in the benchmark harness: a run with ``cold_item_ratio`` reports test metrics on
warm and on cold targets beside the overall ones (worker), the summary shows them and tests the
cold ones against the reference (report); a run without it is unchanged."""

import csv

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import result_row
from recbole_mm.benchmark import main
from recbole_mm.benchmark.plan import Entry, Run, Suite, build_config
from recbole_mm.benchmark.report import summarise
from recbole_mm.data.cold_start import evaluate_warm_cold
from recbole_mm.registry import get_trainer
from recbole_mm.utils import build_data_and_model

PROTOCOL = ["--metrics=['Recall','NDCG']", "--topk=[10,20]", "--valid_metric=Recall@20"]
METRICS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]


def _benchmark(planted, out, models, *flags):
    root, name = planted
    # the quick slice keeps every user of the planted data; 5 epochs at lr 0.01 learn it (test_cold_start)
    return main(["--models", *models, "--dataset", name, "--seeds", "1", "--quick", "--quick_users", "300",
                 "--out", str(out), f"--data_path={root}", "--modalities=['image','text']", *PROTOCOL, *flags])


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def test_cold_run_reports_warm_and_cold_metrics_as_evaluate_warm_cold_does(planted, tmp_path):
    out = tmp_path / "cold"
    assert _benchmark(planted, out, ["BPR", "VBPR"], "--cold_item_ratio=0.2", "--cold_seed=3",
                      "--epochs=5", "--learning_rate=0.01") == 0
    rows = _rows(out)
    bpr = rows["BPR"]
    for row in rows.values():
        assert {f"{g}_{m}" for g in ("warm", "cold") for m in METRICS} <= set(row)
        assert row["cold_items"] == str(round(0.2 * 120)) and int(row["cold_targets"]) > 0
    warm, cold, overall = (float(bpr[f"{g}_recall@20"]) for g in ("warm", "cold", "test"))
    assert cold < overall < warm  # BPR never saw a cold item as a positive: the floor there
    assert float(rows["VBPR"]["cold_recall@20"]) > 2 * cold  # VBPR scores cold items from their features

    # the same run in this process: its warm/cold report is the row's
    spec = Run.from_json((out / "logs" / f"BPR-seed2020-{bpr['config_hash']}.json").read_text())
    config = build_config(spec)
    config["checkpoint_dir"] = str(tmp_path / "saved")
    _, train, valid, test, model = build_data_and_model(config, split_seed=spec.split_seed)
    trainer = get_trainer(config["MODEL_TYPE"], "BPR")(config, model)
    trainer.fit(train, valid, show_progress=False)
    assert trainer.evaluate(test, load_best_model=True)["recall@20"] == pytest.approx(float(bpr["test_recall@20"]))
    report = evaluate_warm_cold(trainer, test)
    for group in ("warm", "cold"):
        for metric in METRICS:
            assert float(bpr[f"{group}_{metric}"]) == pytest.approx(report[group][metric]), (group, metric)
    assert int(bpr["warm_targets"]) + int(bpr["cold_targets"]) == len(test.dataset.inter_feat)

    summary = (out / "quick.md").read_text()
    table = summary.split("## Warm and cold items")[1].split("##")[0]
    assert "| cold items | warm / cold targets | warm recall@10 |" in table and "| cold ndcg@20 |" in table
    assert f"| BPR | 1 | 24 | {bpr['warm_targets']} / {bpr['cold_targets']} | {float(bpr['warm_recall@10']):.4f} |" in table
    against = summary.split("## Against BPR")[1]
    assert all(f"| VBPR | {m} |" in against for m in ("recall@20", "warm recall@20", "cold recall@20"))


def test_run_without_cold_items_has_no_warm_or_cold_columns(planted, tmp_path):
    out = tmp_path / "plain"
    assert _benchmark(planted, out, ["BPR"]) == 0
    row = _rows(out)["BPR"]
    assert "test_recall@20" in row
    assert not [c for c in row if c.startswith(("warm_", "cold_"))]
    assert "Warm and cold" not in (out / "quick.md").read_text()


def _fake_row(label, seed, cold_recall):
    """A finished cold-start run's CSV row as the worker writes it, with made-up values."""
    return result_row(label, seed, peak_rss_mb=500.0, **{"valid_recall@20": 0.3, "test_recall@20": 0.3,
                      "cold_items": 24, "warm_targets": 250, "cold_targets": 50, "warm_recall@20": 0.35,
                      "cold_recall@20": cold_recall})


def test_summary_tests_cold_metrics_over_seeds(tmp_path):
    cold = {"A": [0.10, 0.14, 0.12], "B": [0.02, 0.03, 0.05]}
    pd.DataFrame([_fake_row(label, 2020 + i, v) for label, values in cold.items() for i, v in enumerate(values)]
                 ).to_csv(tmp_path / "results.csv", index=False)
    suite = Suite("s", "d", [Entry("A", "A"), Entry("B", "B")], reference="B",
                  paper={"source": "no paper reports cold-start numbers", "metrics": {}})
    runs = [Run(label, label, "d", 2020 + i, 2020, (), {}, "h") for label in cold for i in range(3)]
    summary = summarise(suite, runs, tmp_path / "results.csv", tmp_path).read_text()
    a = np.array(cold["A"])
    assert f"| A | 3 | 24 | 250 / 50 | 0.3500 ± 0.0000 | {a.mean():.4f} ± {a.std(ddof=1):.4f} |" in summary
    p = stats.ttest_rel(cold["A"], cold["B"]).pvalue
    gain = a.mean() / np.mean(cold["B"]) - 1
    # no per-user values of the cold targets: the Wilcoxon column stays empty
    assert f"| A | cold recall@20 | {a.mean():.4f} | {np.mean(cold['B']):.4f} | {gain:+.1%} | {p:.3f} | – |" in summary
    # a suite without paper numbers says why instead of showing an empty table
    assert "## Paper vs ours\n\nNo paper numbers: no paper reports cold-start numbers" in summary


def test_summary_tests_the_suites_pairs_on_warm_and_cold_metrics(tmp_path):
    # a strict run against its twin with cold items as negatives, besides both against the reference
    cold = {"R": [0.01, 0.02, 0.01], "S": [0.30, 0.36, 0.33], "N": [0.12, 0.15, 0.11]}
    warm = {"R": [0.40, 0.41, 0.42], "S": [0.34, 0.35, 0.33], "N": [0.36, 0.38, 0.37]}
    rows = []
    for label in cold:
        for i in range(3):
            rows.append({**_fake_row(label, 2020 + i, cold[label][i]), "warm_recall@20": warm[label][i]})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    entries = [Entry(label, label) for label in cold]
    runs = [Run(label, label, "d", 2020 + i, 2020, (), {}, "h") for label in cold for i in range(3)]
    suite = Suite("s", "d", entries, reference="R", pairs=[["S", "N"]],
                  paper={"source": "no paper reports cold-start numbers", "metrics": {}})
    summary = summarise(suite, runs, tmp_path / "results.csv", tmp_path).read_text()
    pair = summary[summary.index("## S against N"):]
    for group, values in (("warm", warm), ("cold", cold)):
        s, n = np.mean(values["S"]), np.mean(values["N"])
        p = stats.ttest_rel(values["S"], values["N"]).pvalue
        assert f"| S | {group} recall@20 | {s:.4f} | {n:.4f} | {s / n - 1:+.1%} | {p:.3f} | – |" in pair
    assert "\n| N |" not in pair and "| S | warm recall@20 |" in summary[:summary.index("## S against N")]
    for bad in (["S", "S"], ["S", "X"], ["S"]):
        with pytest.raises(ValueError, match="a pair is two different labels"):
            Suite("s", "d", entries, pairs=[bad])
