"""How often the per-user test calls two seeds of one configuration different: a null check for the
Wilcoxon column of a benchmark summary, run on a benchmark's ``--out`` folder.

Two runs of the same label (same config, same split) that differ only by their seed are the same
configuration, so a test of "the configuration matters" should reject at about its level (5% at
p < 0.05). For every label with two or more seeds in ``OUT/results.csv`` and every pair of its seeds,
this prints the change of each test metric and the Wilcoxon signed-rank p over the users
(:func:`recbole_mm.benchmark.report.user_wilcoxon`, the summary's own test), then how many of the
tests fell below 0.05, and per label the mean of ``z^2`` over its tests, ``z`` the normal score of a
two-sided p (``p = 2 (1 - Phi(|z|))``): about 1 if the test measured the configuration, larger by the
factor by which the runs' own randomness inflates it. Rows whose per-user files are missing are left
out.

    python benchmarks/seed_null.py /path/to/out
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

from recbole_mm.benchmark.report import markdown_table, metric_columns, per_user_file, user_wilcoxon  # noqa: E402


def seed_pairs(out: Path, level: float = 0.05):
    """The Markdown table of every same-label seed pair, (tests below ``level``, tests), and the mean
    ``z^2`` of each label's tests (module docstring)."""
    frame = pd.read_csv(out / "results.csv")
    frame = frame[[per_user_file(out / "per_user", r).is_file() for _, r in frame.iterrows()]]
    metrics = [c[len("test_"):] for c in metric_columns(frame)]
    rows, below, tests, inflation = [], 0, 0, {}
    for label, runs in frame.groupby("label", sort=False):
        scores = []
        for (_, a), (_, b) in itertools.combinations(runs.sort_values("seed").iterrows(), 2):
            cells = []
            for m in metrics:
                p = user_wilcoxon(out / "per_user", a, b, m)
                below, tests = below + (p < level), tests + 1
                scores.append(stats.norm.isf(p / 2) ** 2)
                cells.append(f"{a['test_' + m] / b['test_' + m] - 1:+.1%} ({p:.2g})")
            rows.append([label, f"{a.seed} vs {b.seed}"] + cells)
        if scores:
            inflation[label] = float(np.mean(scores))
    return markdown_table(["label", "seeds"] + metrics, rows), (below, tests), inflation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a benchmark's --out folder (results.csv, per_user/)")
    args = parser.parse_args(argv)
    table, (below, tests), inflation = seed_pairs(args.out)
    print(table)
    print(f"\n{below} of {tests} per-user tests between two seeds of one configuration have p < 0.05 "
          f"(about {0.05 * tests:.1f} expected if the test measured the configuration).")
    print("Mean z^2 of each label's tests (about 1 if the test measured the configuration): "
          + ", ".join(f"{label} {value:.2f}" for label, value in inflation.items()) + ".")


if __name__ == "__main__":
    main()
