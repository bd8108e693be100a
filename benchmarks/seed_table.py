"""Tables and a plot over seeds from a curated per-seed CSV: for a results page whose runs' rows
are not all in one benchmark folder (runs of several ``--out`` folders, or rows kept only on the
page after their folder was lost), so that every mean and p-value on the page can be recomputed
from a file committed beside it.

The CSV has one row per run: ``label``, ``seed``, the ``test_<metric>`` and ``valid_<metric>``
values as the benchmark's ``results.csv`` holds them (RecBole's 4 digits), and any other columns
(``config_hash``, ``source``), which are ignored. Printed as Markdown:

* mean ± std over seeds of every metric, per label (:func:`recbole_mm.benchmark.report.accuracy_table`);
* each label against ``--reference``: the change on each seed both have, then the change of the
  means over those seeds with the paired t-test over them (:func:`recbole_mm.benchmark.report.significance`,
  without the per-user test: a curated CSV keeps no per-user values).

With ``--plot STEM`` it also writes ``STEM-metrics.png`` (test metrics, mean ± std).

``--pool NAME LABEL LABEL ...`` adds a label ``NAME`` whose run on a seed is the mean of the given
labels' runs on that seed (the seeds they all have): two trainings of one configuration on each seed
(a rerun beside the original) make a steadier reference than either alone, since a rerun on the same
seed after a code change draws other dropout masks and moves the metrics (FindRec on the paper's
Beauty: up to 3.8%, docs/results/findrec-table2-beauty.md).

    python benchmarks/seed_table.py docs/results/findrec-table5-beauty.csv \\
        --pool "FindRec (both runs)" FindRec "FindRec (rerun)" --reference "FindRec (both runs)" \\
        --plot docs/results/findrec-table5-beauty
"""

import argparse
import sys
from pathlib import Path
from typing import List

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

from recbole_mm.benchmark.report import (  # noqa: E402
    accuracy_table, metric_columns, per_seed_changes, plot_metrics, significance)


def value_columns(frame: pd.DataFrame) -> List[str]:
    """The CSV's test metric columns, then its validation ones, that every run has: what is averaged,
    tabled and tested. A column some runs lack (a page that gave one validation metric for its older
    seeds) would mix a mean over some seeds into a table of all, and its per-seed change would read nan."""
    return [c for c in _all_value_columns(frame) if frame[c].notna().all()]


def _all_value_columns(frame: pd.DataFrame) -> List[str]:
    return metric_columns(frame) + [c for c in frame.columns if c.startswith("valid_")]


def pool(frame: pd.DataFrame, name: str, labels: List[str]) -> pd.DataFrame:
    """``frame`` with a label ``name`` added: per seed that every one of ``labels`` has, the mean of their
    metric columns; an unknown label, fewer than two labels or no common seed raises ``ValueError``."""
    unknown = sorted(set(labels) - set(frame.label))
    if unknown or len(set(labels)) < 2:
        raise ValueError(f"--pool needs two or more labels of the CSV, got {labels} (unknown: {unknown})")
    if name in set(frame.label):
        raise ValueError(f"--pool's name {name!r} is already a label of the CSV")
    columns = value_columns(frame)
    runs = frame[frame.label.isin(labels)]
    common = runs.groupby("seed").label.nunique() == len(set(labels))
    if not common.any():
        raise ValueError(f"--pool: the labels {labels} have no seed in common")
    pooled = runs[runs.seed.isin(common[common].index)].groupby("seed", as_index=False)[columns].mean()
    return pd.concat([frame, pooled.assign(label=name)], ignore_index=True)


def report(frame: pd.DataFrame, reference: str) -> str:
    """The three Markdown tables; a reference that is not a label, or a run given twice, raises ``ValueError``."""
    if reference not in set(frame.label):
        raise ValueError(f"--reference {reference!r} is not a label of the CSV: {sorted(set(frame.label))}")
    if frame.duplicated(["label", "seed"]).any():
        raise ValueError("the CSV holds a (label, seed) twice: keep one row per run")
    columns = value_columns(frame)
    left_out = [c for c in _all_value_columns(frame) if c not in columns]
    return "\n\n".join([
        "## Mean ± std over seeds", accuracy_table(frame, columns),
        f"## Change against {reference}, seed by seed", per_seed_changes(frame, reference, columns),
        f"## Against {reference}: change of the means and paired t over seeds",
        significance(frame, reference, frame.label.unique(), columns) or "(no label besides the reference)"]
        + ([f"Left out, as some runs lack them: {', '.join(left_out)}."] if left_out else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--reference", required=True, help="the label every other label is tested against")
    parser.add_argument("--pool", nargs="+", metavar=("NAME", "LABEL"),
                        help="add label NAME: per seed, the mean of the LABELs' runs (two or more)")
    parser.add_argument("--plot", type=Path, help="write STEM-metrics.png")
    args = parser.parse_args(argv)
    frame = pd.read_csv(args.csv)
    if args.pool:
        frame = pool(frame, args.pool[0], args.pool[1:])
    print(report(frame, args.reference))
    if args.plot:
        tested = [c for c in value_columns(frame) if c.startswith("test_")]
        print(f"\n![metrics]({plot_metrics(frame, tested, Path(f'{args.plot}-metrics.png')).name})")


if __name__ == "__main__":
    main()
