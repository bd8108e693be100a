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

    python benchmarks/seed_table.py docs/results/findrec-table5-beauty.csv --reference "FindRec" \\
        --plot docs/results/findrec-table5-beauty
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

from recbole_mm.benchmark.report import (  # noqa: E402
    accuracy_table, metric_columns, per_seed_changes, plot_metrics, significance)


def report(frame: pd.DataFrame, reference: str) -> str:
    """The three Markdown tables; a reference that is not a label, or a run given twice, raises ``ValueError``."""
    if reference not in set(frame.label):
        raise ValueError(f"--reference {reference!r} is not a label of the CSV: {sorted(set(frame.label))}")
    if frame.duplicated(["label", "seed"]).any():
        raise ValueError("the CSV holds a (label, seed) twice: keep one row per run")
    columns = metric_columns(frame) + [c for c in frame.columns if c.startswith("valid_")]
    return "\n\n".join([
        "## Mean ± std over seeds", accuracy_table(frame, columns),
        f"## Change against {reference}, seed by seed", per_seed_changes(frame, reference, columns),
        f"## Against {reference}: change of the means and paired t over seeds",
        significance(frame, reference, frame.label.unique(), columns) or "(no label besides the reference)"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--reference", required=True, help="the label every other label is tested against")
    parser.add_argument("--plot", type=Path, help="write STEM-metrics.png")
    args = parser.parse_args(argv)
    frame = pd.read_csv(args.csv)
    print(report(frame, args.reference))
    if args.plot:
        print(f"\n![metrics]({plot_metrics(frame, metric_columns(frame), Path(f'{args.plot}-metrics.png')).name})")


if __name__ == "__main__":
    main()
