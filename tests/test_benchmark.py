"""The benchmark harness: a --quick run of 2 models x 2 seeds end to end (CSV, per-user metrics,
summary, plots, resume), the planner's guarantees, the statistics and the suite files."""

import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from conftest import REPO, TINY, Interrupted, interrupted_at_epoch, load_benchmark_script, result_row
from recbole_mm.benchmark import main, worker
from recbole_mm.benchmark.cli import chosen_runs, narrow, parse_args, shard_of
from recbole_mm.benchmark.plan import Entry, Run, Suite, config_hash, load_suite, plan_runs
from recbole_mm.benchmark.quick import first_users_slice
from recbole_mm.benchmark.report import seed_ttest, summarise, user_wilcoxon
from recbole_mm.benchmark.store import append_row, finished_keys

QUICK_USERS = 40


def _benchmark(planted, out):
    root, name = planted
    return main(["--models", "BPR", "MambaRec", "--dataset", name, "--seeds", "2", "--quick",
                 "--quick_users", str(QUICK_USERS), "--out", str(out), f"--data_path={root}",
                 "--modalities=['image','text']", "--reduction_ratio=2",
                 "--train_batch_size=2048"])  # one batch per epoch: MambaRec propagates the whole graph per batch


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_records_summarises_and_resumes(planted, tmp_path, capsys):
    out = tmp_path / "bench"
    assert _benchmark(planted, out) == 0
    rows = _rows(out)
    assert sorted((r["model"], int(r["seed"])) for r in rows) == [
        ("BPR", 2020), ("BPR", 2021), ("MambaRec", 2020), ("MambaRec", 2021)]
    # one protocol for both models: the reference's (BPR: RecBole's five metrics @10)
    metric_columns = [c for c in rows[0] if c.startswith(("test_", "valid_")) and "@" in c]
    assert sorted(metric_columns) == sorted(f"{split}_{m}@10" for split in ("test", "valid")
                                            for m in ("recall", "mrr", "ndcg", "hit", "precision"))
    for row in rows:
        assert all(0.0 <= float(row[c]) <= 1.0 for c in metric_columns)
        assert row["best_epoch"] == "0" and row["epochs_run"] == "1"
        assert int(row["test_users"]) == QUICK_USERS  # the quick slice, applied to every run
        assert float(row["train_s_per_epoch"]) > 0 and float(row["inference_s"]) > 0
        assert float(row["peak_rss_mb"]) > 50 and int(row["params"]) > 0 and row["device"] == "cpu"
        # per-user values saved beside the CSV average to RecBole's metric (rounded to 4 places)
        per_user = np.load(out / "per_user" / f"{row['model']}-seed{row['seed']}-{row['config_hash']}.npz")
        assert len(per_user["user_id"]) == QUICK_USERS == len(set(per_user["user_id"]))
        assert per_user["ndcg@10"].mean() == pytest.approx(float(row["test_ndcg@10"]), abs=6e-5)
    assert len({r["split_hash"] for r in rows}) == 1  # the same valid/test data for every model and seed
    hashes = {m: {r["config_hash"] for r in rows if r["model"] == m} for m in ("BPR", "MambaRec")}
    assert len(hashes["BPR"]) == len(hashes["MambaRec"]) == 1 and hashes["BPR"] != hashes["MambaRec"]

    summary = (out / "quick.md").read_text()
    bpr_ndcg = np.mean([float(r["test_ndcg@10"]) for r in rows if r["model"] == "BPR"])
    assert "| BPR | 2 |" in summary and "| MambaRec | 2 |" in summary and f"{bpr_ndcg:.4f} ±" in summary
    assert "## Against BPR" in summary and "| MambaRec | ndcg@10 |" in summary
    assert "The per-user test compares the last seed's two trained runs" in summary  # how to read its p
    for png in ("quick-metrics.png", "quick-cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000
    assert capsys.readouterr().out.count("] done ") == 4
    assert not any((out / "checkpoints").iterdir())  # a finished run's checkpoint is not kept

    # resume: a second invocation runs nothing and leaves the CSV as it was
    before = (out / "results.csv").read_bytes()
    assert _benchmark(planted, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("] skip ") == 4 and "] start " not in printed
    assert (out / "results.csv").read_bytes() == before

    # a lost row is the only run redone, and (seeded, same split) it reproduces its metrics
    lost = next(r for r in rows if r["model"] == "BPR" and r["seed"] == "2021")
    kept = [r for r in rows if r is not lost]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert _benchmark(planted, out) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if "] start " in line]
    assert len(started) == 1 and "BPR seed=2021" in started[0]
    (redone,) = [r for r in _rows(out) if r["model"] == "BPR" and r["seed"] == "2021"]
    assert redone["config_hash"] == lost["config_hash"] and redone["test_ndcg@10"] == lost["test_ndcg@10"]
    log = (out / "logs" / f"BPR-seed2021-{lost['config_hash']}.log").read_text()
    assert log.count("best valid: ") == 2  # the second run's log follows the first's, nothing lost


def test_an_interrupted_run_continues_from_its_checkpoint_to_the_same_row(planted, tmp_path, monkeypatch):
    root, name = planted
    # a validation score that falls every epoch: the first epoch stays the best, so the best
    # checkpoint is two validations older than the interruption
    from recbole.trainer import Trainer

    valid_epoch = Trainer._valid_epoch

    def falling(self, *args, **kwargs):
        score, result = valid_epoch(self, *args, **kwargs)
        return score - max(self.train_loss_dict), result  # keyed by the epochs trained so far

    monkeypatch.setattr(Trainer, "_valid_epoch", falling)
    settings = {**TINY, "data_path": root, "epochs": 4, "stopping_step": 10}
    (run,) = plan_runs(Suite("s", name, [Entry("BPR", "BPR")], seeds=1, config=settings))
    whole = worker.run(run)["row"]
    assert whole["best_epoch"] == 0

    # cut off after its best epoch: RecBole's checkpoint holds that state, no second copy is written
    early = tmp_path / "early"
    with interrupted_at_epoch(1), pytest.raises(Interrupted):
        worker.run(run, early)
    assert not (early / worker.LAST_CHECKPOINT).exists() and len(list(early.glob("*.pth"))) == 1

    folder = tmp_path / "checkpoints" / run.stem
    with interrupted_at_epoch(3), pytest.raises(Interrupted):
        worker.run(run, folder)
    assert worker.resume_from(folder) == str(folder / worker.LAST_CHECKPOINT)  # epoch 2's state
    assert len(list(folder.glob("*.pth"))) == 2  # and RecBole's best checkpoint (epoch 0)

    resumed = worker.run(run, folder)["row"]
    assert resumed["resumed_at_epoch"] == 3 and "resumed_at_epoch" not in whole  # epochs 0-2 not repeated
    assert resumed["epochs_run"] == whole["epochs_run"] == 4 and resumed["best_epoch"] == whole["best_epoch"]
    metrics = [k for k in whole if k.startswith(("valid_", "test_"))]
    assert {k: resumed[k] for k in metrics} == {k: whole[k] for k in metrics}  # to the last digit

    # the final epoch's state is not saved (resumed from it, fit would have no epoch left): a run cut
    # off during its test repeats that epoch
    assert torch.load(folder / worker.LAST_CHECKPOINT, weights_only=False)["epoch"] == 2

    # the latest state without the best epoch's checkpoint beside it cannot give the final test
    alone = tmp_path / "alone"
    alone.mkdir()
    os.replace(folder / worker.LAST_CHECKPOINT, alone / worker.LAST_CHECKPOINT)
    with pytest.raises(RuntimeError, match="best epoch's checkpoint .* is not beside it"):
        worker.run(run, alone)

    # a checkpoint the run cannot continue from names the folder to delete
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=re.escape(f"delete {folder} to start it afresh")):
        worker.run(run, folder)


@pytest.mark.parametrize("model", ["BPR", "SASRec"])
def test_per_user_metrics_are_the_same_from_the_blocked_and_the_dense_ranking(model, planted, tmp_path):
    """The blocked top-k path (the default) feeds the harness the same users and per-user values
    as RecBole's dense path, general and sequential models alike."""
    root, name = planted
    results = {}
    for mode in ("blocked", "recbole"):
        settings = {**TINY, "data_path": root, "epochs": 1, "topk_eval": mode}
        (run,) = plan_runs(Suite("s", name, [Entry(model, model)], seeds=1, config=settings))
        results[mode] = worker.run(run)
    blocked, dense = results["blocked"]["per_user"], results["recbole"]["per_user"]
    assert sorted(blocked) == sorted(dense) and "ndcg@10" in blocked
    assert len(blocked["user_id"]) == results["recbole"]["row"]["test_users"] > 20
    order_b, order_d = np.argsort(blocked["user_id"]), np.argsort(dense["user_id"])
    for key in blocked:
        np.testing.assert_array_equal(np.asarray(blocked[key])[order_b], np.asarray(dense[key])[order_d])


def test_plan_gives_every_run_the_reference_protocol_and_refuses_another(planted):
    root, name = planted
    entries = [Entry("MambaRec", "MambaRec"), Entry("BPR", "BPR")]
    settings = {"data_path": root, "modalities": ["image", "text"]}
    runs = plan_runs(Suite("s", name, entries, seeds=2, config=settings))
    assert [(r.label, r.seed) for r in runs] == [("MambaRec", 2020), ("MambaRec", 2021), ("BPR", 2020), ("BPR", 2021)]
    bpr = next(r for r in runs if r.model == "BPR")
    assert bpr.config["topk"] == [10, 20] and bpr.config["valid_metric"] == "Recall@20"  # MambaRec's protocol
    assert runs[0].config_hash == runs[1].config_hash  # the seed is a key of its own
    # a key added later (FindRec's iicm_share) keeps finished runs' hashes while it is off (None),
    # and makes a new run when on
    off, on = (plan_runs(Suite("s", name, [Entry("M", "MambaRec", {"iicm_share": value})], seeds=1, config=settings))[0]
               for value in (None, 0.5))
    assert off.config_hash == runs[0].config_hash != on.config_hash
    # cold_negatives means nothing without cold items (every earlier run keeps its key); with them,
    # true is what cold-start runs did before the key, false (the default) is a new protocol
    def key(**settings):
        return config_hash(SimpleNamespace(final_config_dict={"model": "BPR", **settings}), 2020)
    assert key() == key(cold_negatives=False) == key(cold_negatives=True)
    assert key(cold_item_ratio=0.2) == key(cold_item_ratio=0.2, cold_negatives=True) \
        != key(cold_item_ratio=0.2, cold_negatives=False)
    with pytest.raises(ValueError, match=r"evaluated differently.*topk=\[5\] vs \[10, 20\]"):
        plan_runs(Suite("s", name, entries + [Entry("BPR@5", "BPR", {"topk": [5]})], config=settings))
    # an entry whose override is already the default would be the same run under a second label
    with pytest.raises(ValueError, match="'BPR again' runs exactly the configuration of 'BPR'"):
        plan_runs(Suite("s", name, entries + [Entry("BPR again", "BPR", {"embedding_size": 64})], config=settings))


def test_shards_split_the_plan_and_share_one_results_file(planted, tmp_path):
    root, name = planted
    entries = [Entry("MambaRec", "MambaRec"), Entry("BPR", "BPR"), Entry("LightGCN", "LightGCN")]
    runs = plan_runs(Suite("s", name, entries, seeds=2, config={"data_path": root, "modalities": ["image", "text"]}))
    shards = [shard_of(runs, k, 2) for k in (1, 2)]
    assert sorted(r.key for s in shards for r in s) == sorted(r.key for r in runs)  # each run exactly once
    assert {r.seed for r in shards[0]} == {2020} and {r.seed for r in shards[1]} == {2021}
    assert parse_args(["--models", "BPR", "-d", name, "--shard", "2/3"]).shard == (2, 3)
    for bad in ("3/2", "0/2", "2", "a/b"):
        with pytest.raises(SystemExit):
            parse_args(["--models", "BPR", "-d", name, "--shard", bad])
    # two shard processes appending at once: every row lands, under one header, even when each row
    # brings a new column (another metric list), which rewrites the whole file
    import multiprocessing
    csv_path = tmp_path / "results.csv"

    def append_many(seed):
        for i in range(25):
            append_row(csv_path, {"model": f"M{i}", "seed": seed, "config_hash": "h", f"metric_{seed}_{i}": repr(i / 7)})

    procs = [multiprocessing.get_context("fork").Process(target=append_many, args=(s,)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(finished_keys(csv_path)) == 50 and len(_rows(tmp_path)) == 50


def test_only_narrows_the_suite_to_named_entries_and_seeds_and_keeps_the_reference(planted):
    root, name = planted
    suite = Suite("s", name, [Entry("MambaRec", "MambaRec"), Entry("BPR", "BPR"),
                              Entry("BPR (d32)", "BPR", {"embedding_size": 32})],
                  seeds=3, config={"data_path": root, "modalities": ["image", "text"]}, pairs=[("BPR", "BPR (d32)")])
    whole = {r.key for r in plan_runs(suite)}
    narrowed, wanted = narrow(suite, ["BPR (d32)@2021", "BPR (d32)@2022"])
    assert [e.label for e in narrowed.entries] == ["MambaRec", "BPR (d32)"] and narrowed.pairs == []
    runs = plan_runs(narrowed)
    assert [(r.label, r.seed) for r in chosen_runs(runs, wanted)] == [("BPR (d32)", 2021), ("BPR (d32)", 2022)]
    assert {r.key for r in runs} <= whole  # the reference still pins the protocol: the same config hashes
    narrowed, wanted = narrow(suite, ["BPR", "BPR (d32)@2020", "BPR@2021"])  # a bare label takes every seed
    assert narrowed.pairs == [("BPR", "BPR (d32)")]
    assert [(r.label, r.seed) for r in chosen_runs(plan_runs(narrowed), wanted)] == [
        ("BPR", 2020), ("BPR", 2021), ("BPR", 2022), ("BPR (d32)", 2020)]
    assert narrow(suite, None) == (suite, {}) and chosen_runs(runs, {}) == runs
    with pytest.raises(ValueError, match="no entry labelled 'LightGCN'"):
        narrow(suite, ["LightGCN@2020"])
    with pytest.raises(ValueError, match=r"seed\(s\) \[2030\] not planned"):
        chosen_runs(runs, narrow(suite, ["BPR (d32)@2030"])[1])


def test_summary_only_runs_nothing_and_says_what_is_missing(planted, tmp_path, monkeypatch):
    from recbole_mm.benchmark import cli

    def no_run(*args, **kwargs):
        raise AssertionError("--summary_only trained something")

    monkeypatch.setattr(cli, "execute", no_run)
    root, name = planted
    out = tmp_path / "bench"
    args = ["--models", "BPR", "LightGCN", "-d", name, "--seeds", "1", "--out", str(out), f"--data_path={root}"]
    assert main(args + ["--summary_only"]) == 0
    assert "Not finished (rerun the same command to resume): BPR seed 2020, LightGCN seed 2020." in (
        out / "benchmark.md").read_text()
    with pytest.raises(SystemExit, match="no entry labelled 'SASRec'"):
        main(args + ["--only", "SASRec", "--summary_only"])


def test_a_run_another_process_finished_meanwhile_is_skipped(tmp_path, monkeypatch):
    # processes sharing --out read results.csv before each run, not only at their start
    from recbole_mm.benchmark import cli
    from recbole_mm.benchmark.plan import Run

    runs = [Run("A", "A", "d", 2020, 2020, (), {}, "h"), Run("B", "B", "d", 2020, 2020, (), {}, "h")]
    launched = []

    def fake_launch(run, out, verbose, context):
        launched.append(run.model)
        if run.model == "A":  # meanwhile another process finishes B
            append_row(out / "results.csv", {"model": "B", "seed": 2020, "config_hash": "h", "label": "B"})
        return {"run_s": 1.0, "best_epoch": 1, "model": run.model, "seed": run.seed, "config_hash": run.config_hash}

    monkeypatch.setattr(cli, "launch", fake_launch)
    monkeypatch.setattr(cli, "_worker_context", lambda: None)
    assert cli.execute(runs, tmp_path) == []
    assert launched == ["A"] and len(finished_keys(tmp_path / "results.csv")) == 2


def test_a_run_finished_after_its_invocation_stopped_is_collected_not_retrained(tmp_path, monkeypatch, capsys):
    # the worker wrote its per-user metrics and result, then the invoking process was killed before
    # it wrote the row: the next invocation takes that result and trains nothing
    from recbole_mm.benchmark import cli
    from recbole_mm.benchmark.plan import Run

    done, cut = Run("A", "A", "d", 2020, 2020, (), {}, "h"), Run("B", "B", "d", 2020, 2020, (), {}, "h")
    (tmp_path / "logs").mkdir()
    (tmp_path / "per_user").mkdir()
    row = {"run_s": 9.0, "best_epoch": 3, "model": "A", "seed": 2020, "config_hash": "h", "test_ndcg@10": 0.25}
    (tmp_path / "logs" / f"{done.stem}.result.json").write_text(json.dumps(row))
    np.savez(tmp_path / "per_user" / f"{done.stem}.npz", user_id=np.arange(3))
    (cli.checkpoint_folder(tmp_path, done)).mkdir(parents=True)
    (cli.checkpoint_folder(tmp_path, done) / "A.pth").write_bytes(b"x")
    # B's worker died before its per-user file: its stale result is not taken, B is trained again
    (tmp_path / "logs" / f"{cut.stem}.result.json").write_text(json.dumps({**row, "model": "B"}))
    launched = []

    def fake_launch(run, out, verbose, context):
        launched.append(run.model)
        return {**row, "model": run.model, "test_ndcg@10": 0.5}

    monkeypatch.setattr(cli, "launch", fake_launch)
    monkeypatch.setattr(cli, "_worker_context", lambda: None)
    assert cli.execute([done, cut], tmp_path) == []
    assert launched == ["B"] and "found A seed=2020 [h]" in capsys.readouterr().out
    rows = {r["model"]: r for r in _rows(tmp_path)}
    assert rows["A"]["test_ndcg@10"] == "0.25" and rows["A"]["label"] == "A" and rows["B"]["test_ndcg@10"] == "0.5"
    assert not (tmp_path / "logs" / f"{done.stem}.result.json").exists()
    assert not cli.checkpoint_folder(tmp_path, done).exists()


def test_quick_slice_keeps_the_first_users_and_links_the_rest(planted, tmp_path):
    root, name = planted
    target = first_users_slice(Path(root) / name, tmp_path / "slice", 7) / name
    lines = (target / f"{name}.inter").read_text().splitlines()
    source = (Path(root) / name / f"{name}.inter").read_text().splitlines()
    users = list(dict.fromkeys(line.split("\t")[0] for line in source[1:]))[:7]
    assert lines == [source[0]] + [line for line in source[1:] if line.split("\t")[0] in users]
    assert (target / "image_feat.npy").is_symlink() and (target / f"{name}.item").is_symlink()


def test_significance_tests(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"label": ["A"] * 3 + ["B"] * 3, "seed": [1, 2, 3] * 2,
                          "test_ndcg@10": [0.30, 0.32, 0.35, 0.20, 0.25, 0.21]})
    assert seed_ttest(frame, "A", "B", "test_ndcg@10") == pytest.approx(
        stats.ttest_rel([0.30, 0.32, 0.35], [0.20, 0.25, 0.21]).pvalue)
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    users = np.arange(50)
    np.savez(tmp_path / "M-seed1-h.npz", user_id=users, **{"ndcg@10": a})
    np.savez(tmp_path / "R-seed1-h.npz", user_id=users[::-1], **{"ndcg@10": b[::-1]})  # another user order
    run, ref = (pd.Series({"model": m, "seed": 1, "config_hash": "h"}) for m in ("M", "R"))
    assert user_wilcoxon(tmp_path, run, ref, "ndcg@10") == pytest.approx(stats.wilcoxon(a - b).pvalue)
    assert user_wilcoxon(tmp_path, run, run, "ndcg@10") == 1.0


def test_summary_shows_the_validation_metric_the_runs_were_selected_on(tmp_path):
    # the worker keeps every validation metric; the page's column is the suite's valid_metric, not the first
    rows = [result_row("A", 2020 + i, **{"valid_ndcg@5": 0.1 + i / 100, "valid_ndcg@10": v, "test_ndcg@5": 0.2,
                                         "test_ndcg@10": 0.3}) for i, v in enumerate([0.40, 0.44])]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    runs = [Run("A", "A", "d", 2020 + i, 2020, (), {}, "h") for i in range(2)]
    suite = Suite("s", "d", [Entry("A", "A")], config={"valid_metric": "NDCG@10"})
    summary = summarise(suite, runs, tmp_path / "results.csv", tmp_path).read_text()
    std = np.std([0.40, 0.44], ddof=1)
    assert "| label | n | ndcg@5 | ndcg@10 | valid ndcg@10 |" in summary
    assert f"| A | 2 | 0.2000 ± 0.0000 | 0.3000 ± 0.0000 | 0.4200 ± {std:.4f} |" in summary


def test_a_label_of_fewer_seeds_is_compared_on_its_own_seeds(tmp_path):
    # B ran seed 2020 only; the reference's 3-seed mean would mix its seeds' levels into B's gain
    values = {"R": [0.30, 0.20, 0.22], "B": [0.27]}
    rows = [result_row(label, 2020 + i, **{"valid_ndcg@10": v, "test_ndcg@10": v})
            for label, vs in values.items() for i, v in enumerate(vs)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    runs = [Run(r["label"], r["model"], "d", r["seed"], 2020, (), {}, "h") for r in rows]
    suite = Suite("s", "d", [Entry("R", "R"), Entry("B", "B")], config={"valid_metric": "NDCG@10"})
    summary = summarise(suite, runs, tmp_path / "results.csv", tmp_path).read_text()
    assert "| B | ndcg@10 | 0.2700 | 0.3000 | -10.0% | – |" in summary  # not +12.5% against the mean 0.24


def test_suite_files_state_runs_and_paper_numbers_consistently():
    files = sorted((REPO / "benchmarks" / "suites").glob("*.yaml"))
    assert len(files) >= 5
    for file in files:
        suite = load_suite(file)
        labels = {e.label for e in suite.entries}
        paper = yaml.safe_load(file.read_text())["paper"]
        assert paper["source"], file
        if not paper["metrics"]:  # the papers report nothing comparable: the source must say so
            assert "no" in paper["source"].lower(), file
            continue
        assert set(paper["metrics"]) <= labels and suite.reference in paper["metrics"], file
        protocol = {f"{m.lower()}@{k}" for m in suite.config["metrics"] for k in suite.config["topk"]}
        for label, numbers in paper["metrics"].items():
            # a run may compute more than the paper reports (FindRec's paper has no Hit), never less
            assert numbers and set(numbers) <= protocol and all(0 < v < 1 for v in numbers.values()), (file, label)


def test_a_preset_is_read_into_the_entry_beneath_its_own_keys_and_keeps_the_hash(planted, tmp_path):
    root, name = planted
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.yaml").write_text("embedding_size: 8\nlearning_rate: 0.01\n")
    (tmp_path / "presets" / "list.yaml").write_text("- embedding_size\n")
    head = f"dataset: {name}\nseeds: 1\nconfig: {{data_path: {root}, modalities: [image, text]}}\npaper: {{source: no, metrics: {{}}}}\n"
    (tmp_path / "s.yaml").write_text(head + "runs:\n"
                                     "  - {label: A, model: BPR, preset: presets/small.yaml, config: {learning_rate: 0.02}}\n"
                                     "  - {label: B, model: BPR, config: {embedding_size: 8, learning_rate: 0.03}}\n")
    suite = load_suite(tmp_path / "s.yaml")
    assert suite.entries[0].config == {"embedding_size": 8, "learning_rate": 0.02}  # the entry's own key wins
    inline = plan_runs(Suite("s", name, [Entry("A", "BPR", {"embedding_size": 8, "learning_rate": 0.02})], seeds=1,
                             config=suite.config))
    assert plan_runs(suite)[0].config_hash == inline[0].config_hash  # the effective settings are hashed
    for preset, error in (("presets/missing.yaml", "not found"), ("presets/list.yaml", "is not a YAML mapping")):
        (tmp_path / "bad.yaml").write_text(head + f"runs:\n  - {{model: BPR, preset: {preset}}}\n")
        with pytest.raises(ValueError, match=error):
            load_suite(tmp_path / "bad.yaml")


def test_run_recbole_mm_routes_the_benchmark_subcommand(capsys):
    import run_recbole_mm

    with pytest.raises(SystemExit) as exit_:
        run_recbole_mm.main(["benchmark", "--help"])
    assert exit_.value.code == 0 and "--models" in capsys.readouterr().out


def test_per_user_breakdown_buckets_users_by_history_and_test_item_popularity():
    script = load_benchmark_script("per_user_breakdown")
    assert script.bucket_labels([5, 10]) == ["<5", "5-9", ">=10"]
    assert script.bucket_labels([1, 2, 3]) == ["<1", "1", "2", ">=3"]
    assert script.quantile_edges(np.arange(100)) == [20, 40, 60, 80]  # 20 users a bucket
    # ties: half the users at the minimum; no empty bucket below it
    assert script.quantile_edges(np.array([1] * 50 + [2] * 30 + [5] * 20)) == [2, 3]

    # users 1-4 train on items 1-3; user 1 and 2 are tested on item 1 (3 training interactions),
    # user 3 on items 2 and 3 (2 and 1: mean 1.5), user 4 on item 4 (none)
    def part(users, items):
        inter = {"user_id": torch.tensor(users), "item_id": torch.tensor(items)}
        return SimpleNamespace(dataset=SimpleNamespace(uid_field="user_id", iid_field="item_id", user_num=5,
                                                       item_num=5, inter_feat=inter))
    train = part([1, 1, 1, 2, 3, 4], [1, 2, 3, 1, 1, 2])
    test = part([1, 2, 3, 3, 4], [1, 1, 2, 3, 4])
    keys = script.user_keys(train, test)
    assert keys["history"].to_dict() == {1: 3, 2: 1, 3: 1, 4: 1}
    assert keys["popularity"].to_dict() == {1: 3.0, 2: 3.0, 3: 1.5, 4: 0.0}

    # label A: two seeds, averaged per bucket after averaging over the bucket's users
    a = [pd.Series([1.0, 0.0, 0.5, 0.25], index=[1, 2, 3, 4]), pd.Series([0.0, 0.0, 1.0, 0.75], index=[4, 3, 2, 1])]
    b = [pd.Series([0.6, 0.4, 0.2], index=[3, 2, 1])]  # no user of the first bucket: a gap, not a reorder
    table = script.breakdown({"A": a, "B": b}, keys["popularity"], [1, 3])  # <1: user 4; 1-2: 3; >=3: 1, 2
    assert list(table.index) == ["<1", "1-2", ">=3"] and table["users"].tolist() == [1, 1, 2]
    assert table["A"].tolist() == pytest.approx([(0.25 + 0.0) / 2, (0.5 + 0.0) / 2, ((1.0 + 0.0) / 2 + (0.75 + 1.0) / 2) / 2])
    assert table["B"].tolist() == pytest.approx([float("nan"), 0.6, 0.3], nan_ok=True)


def test_seed_table_recomputes_a_pages_means_changes_and_paired_t_from_a_curated_csv(tmp_path, capsys):
    script = load_benchmark_script("seed_table")
    ref, abl, short = [0.30, 0.32, 0.35], [0.20, 0.25, 0.21], [0.33]
    rows = ([{"label": "R", "seed": s, "test_ndcg@10": v, "valid_ndcg@10": v + 0.1, "source": "page"}
             for s, v in zip([1, 2, 3], ref)]
            + [{"label": "A", "seed": s, "test_ndcg@10": v, "valid_ndcg@10": v, "source": "results.csv"}
               for s, v in zip([1, 2, 3], abl)]
            + [{"label": "B", "seed": 2, "test_ndcg@10": short[0], "valid_ndcg@10": 0.4, "source": "page"}])
    path = tmp_path / "curated.csv"
    # a metric the page gave for one run only is left out of every table, not averaged over that run
    pd.DataFrame(rows).assign(valid_hit=[0.5] + [None] * 6).to_csv(path, index=False)
    script.main([str(path), "--reference", "R", "--plot", str(tmp_path / "t5")])
    out = capsys.readouterr().out
    assert "valid_hit" not in out.split("Left out")[0] and "nan" not in out
    assert "Left out, as some runs lack them: valid_hit." in out
    assert f"| A | 3 | {np.mean(abl):.4f} ± {np.std(abl, ddof=1):.4f} |" in out
    assert "| A | 1, 2, 3 | -33.3% / -21.9% / -40.0% |" in out  # per seed, a / b - 1
    assert "| B | 2 | +3.1% |" in out  # only the seed B has
    p = stats.ttest_rel(abl, ref).pvalue
    gain = np.mean(abl) / np.mean(ref) - 1
    assert f"| A | ndcg@10 | {np.mean(abl):.4f} | {np.mean(ref):.4f} | {gain:+.1%} | {p:.3f} |\n" in out  # no per-user column
    assert "| B | ndcg@10 | 0.3300 | 0.3200 | +3.1% | – |\n" in out  # one seed: no test
    assert "per-user test" not in out  # nor its caution
    assert (tmp_path / "t5-metrics.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not a label"):
        script.report(pd.DataFrame(rows), "Z")
    with pytest.raises(ValueError, match="twice"):
        script.report(pd.DataFrame(rows + rows[:1]), "R")


def test_seed_table_pools_two_runs_of_a_configuration_per_seed_into_one_reference(tmp_path, capsys):
    script = load_benchmark_script("seed_table")
    first, rerun, abl = [0.30, 0.32, 0.35], [0.34, 0.30], [0.20, 0.25, 0.21]  # the rerun lacks seed 3
    rows = ([{"label": "R", "seed": s, "test_ndcg@10": v} for s, v in zip([1, 2, 3], first)]
            + [{"label": "R2", "seed": s, "test_ndcg@10": v} for s, v in zip([1, 2], rerun)]
            + [{"label": "A", "seed": s, "test_ndcg@10": v} for s, v in zip([1, 2, 3], abl)])
    path = tmp_path / "curated.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    script.main([str(path), "--pool", "R both", "R", "R2", "--reference", "R both"])
    out = capsys.readouterr().out
    both = [(0.30 + 0.34) / 2, (0.32 + 0.30) / 2]  # seeds 1 and 2 only: the seeds both labels have
    assert f"| R both | 2 | {np.mean(both):.4f} ± {np.std(both, ddof=1):.4f} |" in out
    p = stats.ttest_rel(abl[:2], both).pvalue
    assert f"| A | ndcg@10 | {np.mean(abl[:2]):.4f} | {np.mean(both):.4f} | {np.mean(abl[:2]) / np.mean(both) - 1:+.1%} | {p:.3f} |" in out
    frame = pd.DataFrame(rows)
    for bad, match in [(["R", "Z"], "unknown"), (["R"], "two or more"), (["R", "R"], "two or more")]:
        with pytest.raises(ValueError, match=match):
            script.pool(frame, "P", bad)
    with pytest.raises(ValueError, match="already a label"):
        script.pool(frame, "A", ["R", "R2"])
    with pytest.raises(ValueError, match="no seed in common"):
        script.pool(pd.DataFrame(rows[:1] + rows[4:5]), "P", ["R", "R2"])


def test_seed_null_tests_every_pair_of_seeds_of_a_label_per_user(tmp_path, capsys):
    script = load_benchmark_script("seed_null")
    rng = np.random.default_rng(0)
    users = np.arange(200)
    base = rng.random(200)  # seed 2 ranks every user higher than seed 1; seed 3 like seed 1 plus noise
    per_user = {1: base, 2: base + 0.1, 3: base + rng.normal(0, 0.01, 200)}
    rows = []
    (tmp_path / "per_user").mkdir()
    for seed, values in per_user.items():
        rows.append({"label": "A", "model": "M", "seed": seed, "config_hash": "h", "test_ndcg@10": values.mean(),
                     "test_users": 200})
        np.savez(tmp_path / "per_user" / f"M-seed{seed}-h.npz", user_id=users, **{"ndcg@10": values})
    rows.append({"label": "B", "model": "M", "seed": 1, "config_hash": "g", "test_ndcg@10": 0.5, "test_users": 200})
    rows.append({"label": "C", "model": "M", "seed": 1, "config_hash": "k", "test_ndcg@10": 0.5, "test_users": 200})
    rows.append({"label": "C", "model": "M", "seed": 2, "config_hash": "k", "test_ndcg@10": 0.5, "test_users": 200})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)  # B: one seed; C: no per-user files
    script.main([str(tmp_path)])
    out = capsys.readouterr().out
    p12, p13, p23 = (stats.wilcoxon(per_user[a] - per_user[b]).pvalue for a, b in [(1, 2), (1, 3), (2, 3)])
    gain = per_user[1].mean() / per_user[2].mean() - 1
    assert f"| A | 1 vs 2 | {gain:+.1%} ({p12:.2g}) |" in out
    assert f"({p13:.2g}) |" in out and f"({p23:.2g}) |" in out
    assert "| B |" not in out and "| C |" not in out
    below = sum(p < 0.05 for p in (p12, p13, p23))
    assert f"{below} of 3 per-user tests" in out and "(about 0.2 expected" in out  # 5% of 3
    z2 = np.mean([stats.norm.isf(p / 2) ** 2 for p in (p12, p13, p23)])
    assert f"Mean z^2 of each label's tests (about 1 if the test measured the configuration): A {z2:.2f}." in out
