"""Where the models of a benchmark differ: their per-user test metrics by bucket of the user's
history length and of the test items' training popularity.

A suite's mean hides where a model wins and loses. A multimodal model should gain most on items
with few training interactions (their ID embeddings learn little; their features are as good as
anyone's); a sequence model on long histories. This script reads what ``python -m
recbole_mm.benchmark`` wrote (``results.csv`` and ``per_user/*.npz`` of one or more ``--out``
folders run with the same suite or subsets of it: the runs are matched by their config hashes),
rebuilds the suite's split as the harness does (the reference entry's config, the split seed; the
fingerprint of the valid and test interactions must equal the runs' ``split_hash``), and writes,
per bucket (about a fifth of the test users each), each label's metric averaged over the bucket's
users and then over its seeds.

* history: the user's training interactions;
* popularity: the mean training interactions of the user's test items (leave-one-out: its one
  test item).

    RECBOLE_MM_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/per_user_breakdown.py \\
        --suite benchmarks/suites/findrec-beauty-w64.yaml --out DIR [DIR ...] [--metric ndcg@10] \\
        [--report FILE.md]
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

BUCKETS = 5


def quantile_edges(values: np.ndarray, buckets: int = BUCKETS) -> List[int]:
    """Integer bucket edges at the ``buckets``-quantiles of ``values`` (fewer where they tie), so
    that each bucket holds about as many users whatever the dataset's spread."""
    cuts = np.ceil(np.quantile(values, np.arange(1, buckets) / buckets)).astype(int)
    return sorted({int(c) for c in cuts if c > np.min(values)})  # an edge at the minimum opens an empty bucket


def bucket_labels(edges: List[int]) -> List[str]:
    """``<e0``, ``e0-(e1-1)`` (``e0`` alone where ``e1 = e0 + 1``), ..., ``>=e_last``: the integer
    ranges that ``np.digitize(x, edges)`` numbers 0, 1, ..."""
    inner = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{edges[0]}"] + inner + [f">={edges[-1]}"]


def breakdown(per_user: Dict[str, List[pd.Series]], key: pd.Series, edges: List[int]) -> pd.DataFrame:
    """Rows = buckets of ``key`` (indexed by user id), columns = labels: the metric's mean over the
    bucket's users, averaged over the label's seeds (each a per-user Series indexed by user id)."""
    bins = pd.Series(np.digitize(key.to_numpy(), edges), index=key.index)
    table = {"users": bins.value_counts()}
    for label, seeds in per_user.items():
        table[label] = pd.concat([s.groupby(bins.reindex(s.index)).mean() for s in seeds], axis=1).mean(axis=1)
    names = bucket_labels(edges)
    return pd.DataFrame(table).sort_index().rename(index=lambda b: names[b])  # buckets in order, then named


def user_keys(train, test) -> pd.DataFrame:
    """Per test user: training interactions (``history``) and the mean training interactions of
    their test items (``popularity``)."""
    dataset = train.dataset
    uid, iid = dataset.uid_field, dataset.iid_field
    history = np.bincount(dataset.inter_feat[uid].numpy(), minlength=dataset.user_num)
    popularity = np.bincount(dataset.inter_feat[iid].numpy(), minlength=dataset.item_num)
    tests = pd.DataFrame({"user": test.dataset.inter_feat[uid].numpy(),
                          "pop": popularity[test.dataset.inter_feat[iid].numpy()]})
    keys = tests.groupby("user")["pop"].mean().to_frame("popularity")
    keys["history"] = history[keys.index]
    return keys


def load_runs(suite, outs: List[Path], metric: str) -> Tuple[Dict[str, List[pd.Series]], Set[str]]:
    """Per label, one per-user Series of ``metric`` per finished seed, over every ``--out``; and
    the split fingerprints of those runs."""
    from recbole_mm.benchmark.plan import plan_runs
    from recbole_mm.benchmark.report import per_user_file, planned_results

    runs, found, splits = plan_runs(suite), {}, set()
    for out in outs:
        for _, row in planned_results(runs, out / "results.csv").iterrows():
            path = per_user_file(out / "per_user", row)
            if path.is_file() and row.seed not in {s.name for s in found.get(row.label, [])}:
                data = np.load(path)
                found.setdefault(row.label, []).append(pd.Series(data[metric], index=data["user_id"], name=row.seed))
                splits.add(row.split_hash)
    return found, splits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--out", nargs="+", required=True, type=Path, help="the benchmark's output folders")
    parser.add_argument("--metric", default="ndcg@10", help="a per-user metric the runs saved (default ndcg@10)")
    parser.add_argument("--report", type=Path, help="write the tables to this Markdown file too")
    args = parser.parse_args(argv)

    from recbole_mm.benchmark.plan import build_config, load_suite, plan_runs
    from recbole_mm.benchmark.worker import split_hash
    from recbole_mm.utils import build_data

    suite = load_suite(args.suite)
    runs, splits = load_runs(suite, args.out, args.metric)
    if not runs:
        raise SystemExit(f"no finished run of {args.suite} with per-user files in {[str(o) for o in args.out]}")
    reference = next(r for r in plan_runs(suite) if r.label == suite.reference)
    config = build_config(reference)
    _, train, valid, test = build_data(config, split_seed=reference.split_seed)
    here = split_hash(config, valid, test)
    if splits != {here}:
        raise SystemExit(f"the runs' split fingerprints {sorted(splits)} differ from the rebuilt split's {here}")
    keys = user_keys(train, test)

    seeds = ", ".join(f"{label} {len(s)}" for label, s in runs.items())
    lines = [f"Test {args.metric} per user, mean over the bucket's users, then over seeds ({seeds}); "
             f"suite {suite.name}, split {here}.", ""]
    for title, column in (("user's training interactions", "history"),
                          ("test item's training interactions", "popularity")):
        table = breakdown(runs, keys[column], quantile_edges(keys[column].to_numpy()))
        lines += [f"| {title} | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
        lines += [f"| {name} | {int(row['users'])} | " + " | ".join(f"{v:.4f}" for v in row.iloc[1:]) + " |"
                  for name, row in table.iterrows()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
