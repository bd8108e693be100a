"""MambaRec's training cost per step against MGCN and RecBole's LightGCN (issue 15, "Cost").

    python benchmarks/mambarec_cost.py --dataset tiktok --out results/mambarec_cost
    python benchmarks/mambarec_cost.py --dataset amazon-beauty --out results/mambarec_cost --steps 10

Settings: the training settings of ``benchmarks/suites/mambarec-table2-tiktok.yaml`` (batch 2048,
embedding 64, Adam lr 1e-3) with each model's own defaults; LightGCN gets ``n_layers`` = MambaRec's
``n_ui_layers``, so the two propagate over the user-item graph equally often. All models train on the
same batches (the first ``--warmup + --steps`` of one pass of RecBole's training loader, negatives
included, drawn before any timing: sampling is no part of a model's cost). One timed step is what
RecBole's trainer does per batch: ``zero_grad``, ``calculate_loss`` (summed), ``backward``, Adam's
``step``. The models are interleaved step by step in one process (``--threads`` torch threads), so a
change of the machine's load hits them alike; the table gives the median s/step (mean beside it)
and its ratio to LightGCN's median. Writes ``mambarec_cost_<dataset>.csv`` and ``.md`` to ``--out``.
``--parts`` adds MambaRec without DREAM, without the MMD and InfoNCE, and without both (where the
cost over MGCN goes).
"""

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout being measured

SUITE = ROOT / "benchmarks" / "suites" / "mambarec-table2-tiktok.yaml"
MODELS = ("MambaRec", "MGCN", "LightGCN")
#: ``--parts``: MambaRec with what it adds to MGCN switched off, one part at a time and both
PARTS = {"MambaRec w/o DREAM": {"use_dream": False}, "MambaRec w/o MMD+InfoNCE": {"use_mmd": False, "use_cl": False},
         "MambaRec w/o both": {"use_dream": False, "use_mmd": False, "use_cl": False}}
FIELDS = ["dataset", "model", "steps", "median_s_per_step", "mean_s_per_step", "ratio_to_lightgcn",
          "batches_per_epoch", "s_per_epoch", "threads"]


def _build(name: str, dataset: str, overrides: dict):
    from recbole_mm.config import Config
    from recbole_mm.utils.build import build_data_and_model

    settings = yaml.safe_load(SUITE.read_text())["config"]
    saved, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config would read this script's flags
    try:
        config = Config(model=name, dataset=dataset, config_dict={
            **settings, **overrides, "state": "ERROR", "show_progress": False, "use_gpu": False,
            "checkpoint_dir": "/tmp/mambarec_cost_saved"})
    finally:
        sys.argv = saved
    _, train, _, _, model = build_data_and_model(config)
    return config, train, model


def measure(dataset: str, steps: int, warmup: int, threads: int, parts: bool = False) -> list:
    import torch

    torch.set_num_threads(threads)
    import recbole_mm  # noqa: F401  (compat and registration)

    # RecBole 1.2.1's sine.py switches anomaly detection on for the process when imported
    torch.autograd.set_detect_anomaly(False)
    models, train = {}, None
    n_layers = None
    runs = [(name, name, {}) for name in MODELS]
    runs += [(label, "MambaRec", overrides) for label, overrides in PARTS.items()] if parts else []
    for label, name, overrides in runs:
        overrides = {"n_layers": n_layers} if name == "LightGCN" else overrides
        config, loader, model = _build(name, dataset, overrides)
        if label == "MambaRec":
            n_layers, train = config["n_ui_layers"], loader
        model.train()
        models[label] = (model, torch.optim.Adam(model.parameters(), lr=config["learning_rate"]))
    torch.set_num_threads(threads)  # init_seed and the builders may reset it
    batches = []
    for batch in train:
        batches.append(batch)
        if len(batches) == warmup + steps:
            break

    def step(model, optimizer, batch) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        (sum(loss) if isinstance(loss, (tuple, list)) else loss).backward()
        optimizer.step()
        return time.perf_counter() - start

    times = {name: [] for name in models}
    for i, batch in enumerate(batches):
        for name, (model, optimizer) in models.items():
            seconds = step(model, optimizer, batch)
            if i >= warmup:
                times[name].append(seconds)
    base = statistics.median(times["LightGCN"])
    rows = []
    for name in models:
        median = statistics.median(times[name])
        rows.append({"dataset": dataset, "model": name, "steps": len(times[name]), "median_s_per_step": median,
                     "mean_s_per_step": statistics.fmean(times[name]), "ratio_to_lightgcn": median / base,
                     "batches_per_epoch": len(train), "s_per_epoch": median * len(train), "threads": threads})
    return rows


def markdown(rows: list, command: str) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import torch

    lines = [f"# MambaRec training cost per step, {rows[0]['dataset']}", "",
             f"`{command}` — {datetime.datetime.now().isoformat(timespec='minutes')}, "
             f"{platform.machine()}, torch {torch.__version__}, {rows[0]['threads']} torch thread(s), "
             f"{rows[0]['steps']} interleaved steps per model, batch 2048; load average at the end {load}.", "",
             "| model | median s / step | mean s / step | x LightGCN | s / epoch (median x batches) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['median_s_per_step']:.3f} | {r['mean_s_per_step']:.3f} | "
                     f"{r['ratio_to_lightgcn']:.2f} | {r['s_per_epoch']:.1f} ({r['batches_per_epoch']} batches) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="tiktok", help="tiktok or amazon-beauty (any dataset with features)")
    parser.add_argument("--out", required=True, help="folder for mambarec_cost_<dataset>.csv / .md")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--parts", action="store_true", help="also MambaRec without DREAM, without MMD + InfoNCE, without both")
    args = parser.parse_args(argv)
    rows = measure(args.dataset, args.steps, args.warmup, args.threads, args.parts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"mambarec_cost_{args.dataset}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, " ".join(["python", *sys.argv]))
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
