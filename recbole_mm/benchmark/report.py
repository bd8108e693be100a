"""Summary of a benchmark: Markdown tables and PNG plots from the results CSV.

Only the planned runs are summarised (matched by ``(model, seed, config_hash)``), under the
plan's labels, so one CSV can hold many suites and stale configurations without mixing them.

* accuracy: mean ± std over seeds of every test metric and of the validation metric the runs were
  selected on (the suite's ``valid_metric``);
* cost: best epoch, epochs run, training seconds per epoch, inference seconds for one
  full-ranking pass over the test users, peak memory (CUDA max allocated on a GPU, else peak
  RSS) and trainable parameters;
* significance against the reference label, and within each of the suite's ``pairs``: relative
  gain of the means over the seeds both have, a paired t-test over those seeds, and a Wilcoxon
  signed-rank test over the users' metric values of the last seed both have (users matched by id);
* the paper's numbers beside ours, when the suite states them, with the order of the labels by
  the first paper metric in both;
* cold-start runs (``cold_item_ratio``; the worker's ``warm_<metric>`` and ``cold_<metric>``
  columns): a "Warm and cold items" table, mean ± std over seeds of every test metric on warm and
  on cold targets, and the warm and cold metrics in the significance tables (paired t over seeds
  only: the per-user values are kept for the whole test set).
"""

import warnings
from pathlib import Path
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from recbole_mm.benchmark.plan import Run, Suite  # noqa: E402

KEY = ["model", "seed", "config_hash"]
COST = {"best_epoch": "best epoch", "epochs_run": "epochs", "train_s_per_epoch": "train s/epoch",
        "inference_s": "inference s", "peak_mem_mb": "peak MB", "params": "params"}


def planned_results(runs: List[Run], csv_path: Path) -> pd.DataFrame:
    """One row per planned run that has finished, labelled as planned, in plan order."""
    plan = pd.DataFrame([{"label": r.label, "model": r.model, "seed": r.seed, "config_hash": r.config_hash}
                         for r in runs])
    if not Path(csv_path).is_file():
        return plan.iloc[:0]
    done = pd.read_csv(csv_path).drop(columns=["label"]).drop_duplicates(KEY, keep="last")
    frame = plan.merge(done, on=KEY, how="inner")
    # a GPU run's memory is what its device holds; on a CPU, the process's peak RSS
    frame["peak_mem_mb"] = frame["peak_cuda_mb"].where(frame["peak_cuda_mb"].notna(), frame["peak_rss_mb"])
    return frame


def _memory_kind(frame: pd.DataFrame) -> str:
    return "peak MB (CUDA max allocated)" if frame["peak_cuda_mb"].notna().any() else "peak MB (RSS)"


def valid_column(frame: pd.DataFrame, suite: Suite) -> List[str]:
    """The validation metric the runs were selected on (the suite's ``valid_metric``), else the first one kept."""
    chosen = f"valid_{str(suite.config.get('valid_metric', '')).lower()}"
    valid = [c for c in frame.columns if c.startswith("valid_")]
    return [chosen] if chosen in valid else valid[:1]


def metric_columns(frame: pd.DataFrame) -> List[str]:
    return [c for c in frame.columns if c.startswith("test_") and c != "test_users"]


def group_columns(frame: pd.DataFrame, group: str) -> List[str]:
    """The ``warm_``/``cold_`` columns of the test metrics that some run of ``frame`` reports."""
    columns = [f"{group}_{m[len('test_'):]}" for m in metric_columns(frame)]
    return [c for c in columns if c in frame and frame[c].notna().any()]


def _metric_name(column: str) -> str:
    """``test_ndcg@10`` -> ``ndcg@10``; ``cold_ndcg@10`` -> ``cold ndcg@10``."""
    group, metric = column.split("_", 1)
    return metric if group == "test" else f"{group} {metric}"


def _fmt(value, digits=4) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(values: pd.Series, digits=4) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "–"
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return _fmt(values.mean(), digits) + ("" if np.isnan(std) else f" ± {_fmt(std, digits)}")


def _counts(values: pd.Series) -> str:
    """The distinct counts of a column (one, unless an entry changes the split or the draw)."""
    return ", ".join(str(int(v)) for v in sorted(values.dropna().unique())) or "–"


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def seed_ttest(frame: pd.DataFrame, label: str, reference: str, column: str) -> float:
    """Two-sided paired t-test of ``column`` between two labels over their common seeds."""
    pair = frame[frame.label.isin([label, reference])].pivot(index="seed", columns="label", values=column).dropna()
    if len(pair) < 2 or label not in pair or reference not in pair:
        return float("nan")
    with warnings.catch_warnings():  # identical values: scipy warns and returns nan, which we print as –
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(pair[label], pair[reference]).pvalue)


def per_user_file(per_user_dir: Path, row: pd.Series) -> Path:
    """Where the harness saved a result row's per-user metrics."""
    return Path(per_user_dir) / f"{row.model}-seed{row.seed}-{row.config_hash}.npz"


def user_wilcoxon(per_user_dir: Path, run: pd.Series, ref: pd.Series, metric: str) -> float:
    """Two-sided Wilcoxon signed-rank test of one metric over the users of two runs."""
    files = [per_user_file(per_user_dir, r) for r in (run, ref)]
    if not all(f.is_file() for f in files):
        return float("nan")
    a, b = (np.load(f) for f in files)
    if metric not in a or metric not in b:
        return float("nan")
    _, ia, ib = np.intersect1d(a["user_id"], b["user_id"], return_indices=True)
    diff = a[metric][ia] - b[metric][ib]
    if not np.any(diff):  # every user scores the same: no evidence of a difference
        return 1.0
    return float(stats.wilcoxon(diff).pvalue)


def accuracy_table(frame: pd.DataFrame, columns: List[str]) -> str:
    """Mean ± std over seeds of each of ``columns`` for each label, in the frame's order."""
    groups = frame.groupby("label", sort=False)
    return markdown_table(["label", "n"] + [_metric_name(c) for c in columns],
                          [[label, len(g)] + [_mean_std(g[c]) for c in columns] for label, g in groups])


def significance(frame, reference, labels, metrics, per_user_dir: Optional[Path] = None) -> Optional[str]:
    """Every one of ``labels`` (other than ``reference``) tested against ``reference``; without
    ``per_user_dir`` (rows whose per-user files are not kept) over the seeds only."""
    ref = frame[frame.label == reference]
    if ref.empty:
        return None
    rows = []
    for label in labels:
        mine = frame[frame.label == label]
        if label == reference or mine.empty:
            continue
        common = sorted(set(mine.seed) & set(ref.seed))
        last = common[-1] if common else None
        # a run of fewer seeds is compared on its own seeds: a seed's own level is not the label's effect
        mine_c, ref_c = (m[m.seed.isin(common)] if common else m for m in (mine, ref))
        for column in metrics:
            a, b = mine_c[column].mean(), ref_c[column].mean()
            gain = a / b - 1 if b else float("nan")
            row = [label, _metric_name(column), _fmt(a), _fmt(b), "–" if not np.isfinite(gain) else f"{gain:+.1%}",
                   _fmt(seed_ttest(frame, label, reference, column), 3)]
            if per_user_dir is not None:  # per-user values exist for the whole test set only (warm/cold: seeds only)
                p_user = None if last is None or not column.startswith("test_") else user_wilcoxon(
                    per_user_dir, mine[mine.seed == last].iloc[0], ref[ref.seed == last].iloc[0], column[len("test_"):])
                row.append("–" if p_user is None else f"{_fmt(p_user, 3)} (seed {last})")
            rows.append(row)
    header = ["label", "metric", "mean", f"{reference}", "gain", "p, paired t (seeds)"]
    if per_user_dir is not None:
        header.append("p, Wilcoxon (users, last seed)")
    note = "Means and gain over the seeds both labels have."
    if per_user_dir is not None:  # measured: two seeds of one configuration differ per user at p < 0.05 often
        note += (" The per-user test compares the last seed's two trained runs, so it also fires between two"
                 " seeds of one configuration; judge a configuration by the test over seeds.")
    return (markdown_table(header, rows) + "\n\n" + note) if rows else None


def per_seed_changes(frame: pd.DataFrame, reference: str, columns: List[str]) -> str:
    """Each label's relative change against ``reference`` on every seed both have, ``a / b / c``."""
    ref = frame[frame.label == reference].set_index("seed")
    rows = []
    for label, g in frame[frame.label != reference].groupby("label", sort=False):
        mine = g.set_index("seed")
        seeds = sorted(set(mine.index) & set(ref.index))
        rows.append([label, ", ".join(map(str, seeds))]
                    + [" / ".join(f"{mine.at[s, c] / ref.at[s, c] - 1:+.1%}" for s in seeds) for c in columns])
    return markdown_table(["label", "seeds"] + [_metric_name(c) for c in columns], rows)


def _paper(frame, suite) -> Optional[str]:
    paper = (suite.paper or {}).get("metrics") or {}
    if not paper:  # a suite may state that the papers report nothing comparable
        return f"No paper numbers: {suite.paper['source']}" if (suite.paper or {}).get("source") else None
    metrics = list(next(iter(paper.values())))
    rows = []
    for label, values in paper.items():
        mine = frame[frame.label == label]
        ours = [mine[f"test_{m}"].mean() if f"test_{m}" in mine else float("nan") for m in metrics]
        rows.append([label] + [f"{_fmt(values.get(m))} / {_fmt(o)}" for m, o in zip(metrics, ours)])
    first = metrics[0]
    order_paper = sorted(paper, key=lambda lbl: -paper[lbl].get(first, float("-inf")))
    means = frame.groupby("label")[f"test_{first}"].mean() if f"test_{first}" in frame else pd.Series(dtype=float)
    order_ours = [lbl for lbl in means.sort_values(ascending=False).index if lbl in paper]
    text = markdown_table(["label"] + [f"{m}: paper / ours" for m in metrics], rows)
    return (f"{text}\n\nOrder by {first}: paper {' > '.join(order_paper)}; "
            f"ours {' > '.join(order_ours) or '(no runs yet)'}.\n\nSource: {suite.paper.get('source', '?')}")


def plot_metrics(frame: pd.DataFrame, metrics: List[str], path: Path) -> Path:
    """Bars of each label's test ``metrics``, mean ± std over seeds, grouped by metric."""
    labels = list(frame.label.unique())
    stats_ = frame.groupby("label", sort=False)[metrics].agg(["mean", "std"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * len(labels) ** 0.5), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        x = np.arange(len(metrics)) + i * width
        ax.bar(x, [stats_.loc[label, (m, "mean")] for m in metrics], width, label=label,
               yerr=[np.nan_to_num(stats_.loc[label, (m, "std")]) for m in metrics], capsize=3)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(labels) - 1) / 2, [m[len("test_"):] for m in metrics])
    ax.set_ylabel("test metric (mean ± std over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot(frame: pd.DataFrame, metrics: List[str], stem: Path) -> List[Path]:
    """``<stem>-metrics.png`` (test metrics) and ``<stem>-cost.png`` (time, memory), mean ± std."""
    labels = list(frame.label.unique())
    panels = ["train_s_per_epoch", "inference_s", "peak_mem_mb"]
    stats_ = frame.groupby("label", sort=False)[panels].agg(["mean", "std"])
    paths = [plot_metrics(frame, metrics, Path(f"{stem}-metrics.png")), Path(f"{stem}-cost.png")]

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, column in zip(axes, panels):
        ax.bar(range(len(labels)), [stats_.loc[lbl, (column, "mean")] for lbl in labels],
               yerr=[np.nan_to_num(stats_.loc[lbl, (column, "std")]) for lbl in labels], capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        ax.set_title(_memory_kind(frame) if column == "peak_mem_mb" else COST[column])
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def summarise(suite: Suite, runs: List[Run], csv_path: Path, out_dir: Path, command: str = "") -> Path:
    """Write ``<out>/<suite>.md`` and its plots; returns the Markdown file."""
    out_dir = Path(out_dir)
    frame = planned_results(runs, csv_path)
    stem, markdown = out_dir / suite.name, out_dir / f"{suite.name}.md"
    missing = [f"{r.label} seed {r.seed}" for r in runs
               if not ((frame.model == r.model) & (frame.seed == r.seed) & (frame.config_hash == r.config_hash)).any()]
    parts = [f"# {suite.title or suite.name}"]
    if command:
        parts.append(f"Command: `{command}`")
    if missing:
        parts.append("Not finished (rerun the same command to resume): " + ", ".join(missing) + ".")
    if frame.empty:
        markdown.write_text("\n\n".join(parts) + "\n")
        return markdown

    parts.append(f"Dataset `{suite.dataset}`, seeds {', '.join(map(str, sorted(frame.seed.unique())))}, one split "
                 f"for all (fingerprint of valid+test: {', '.join(sorted(frame.split_hash.unique()))}).")
    metrics = metric_columns(frame)
    valid = valid_column(frame, suite)
    groups = list(frame.groupby("label", sort=False))
    parts += ["## Accuracy (mean ± std over seeds)", accuracy_table(frame, metrics + valid)]
    parts += ["## Cost (mean ± std over seeds)", markdown_table(
        ["label", "device"] + [_memory_kind(frame) if c == "peak_mem_mb" else h for c, h in COST.items()],
        [[label, ", ".join(g.device.unique())] + [_mean_std(g[c], 1 if c in ("best_epoch", "epochs_run") else 3)
                                                   for c in list(COST)[:-1]] + [f"{int(g.params.iloc[0]):,}"]
         for label, g in groups]),
              "Train s/epoch: training only (validation excluded). Inference s: one full-ranking pass over the "
              "test users with the best weights (after a warm-up pass). Peak RSS includes the ~0.4 GB of torch "
              "and RecBole themselves."]
    warm, cold = group_columns(frame, "warm"), group_columns(frame, "cold")
    if warm or cold:
        parts += ["## Warm and cold items (test, mean ± std over seeds)", markdown_table(
            ["label", "n", "cold items", "warm / cold targets"] + [_metric_name(c) for c in warm + cold],
            [[label, len(g), _counts(g.cold_items), f"{_counts(g.warm_targets)} / {_counts(g.cold_targets)}"]
             + [_mean_std(g[c]) for c in warm + cold] for label, g in groups]),
                  "Warm targets: test interactions with an item that has training interactions; cold: with one "
                  "of the items held out of training entirely (`cold_item_ratio`). Both rank all items. An "
                  "ID-only model's cold items got no positive signal: it is the floor there."]
    tested = metrics + warm + cold
    against_reference = significance(frame, suite.reference, frame.label.unique(), tested, out_dir / "per_user")
    if against_reference:
        parts += [f"## Against {suite.reference}", against_reference]
    for label, against in suite.pairs:
        pair = significance(frame, against, [label], tested, out_dir / "per_user")
        if pair:
            parts += [f"## {label} against {against}", pair]
    paper = _paper(frame, suite)
    if paper:
        parts += ["## Paper vs ours", paper]
    if suite.notes:
        parts += ["## Notes", suite.notes.strip()]
    metrics_png, cost_png = plot(frame, metrics, stem)
    parts += [f"![metrics]({metrics_png.name})", f"![cost]({cost_png.name})"]
    markdown.write_text("\n\n".join(parts) + "\n")
    return markdown
