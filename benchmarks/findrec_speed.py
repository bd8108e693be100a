"""FindRec training speed and memory on the CPU, against RecBole's SASRec, and the selective
scans FindRec's PyTorch Mamba backend could use.

    python benchmarks/findrec_speed.py --out results/findrec_speed
    python benchmarks/findrec_speed.py --out /tmp/fs --batch-size 32 --n-batches 3   # small scale

Writes ``<out>/findrec_speed.csv`` and ``<out>/findrec_speed.md`` with two tables:

1. ``model``: seconds for forward + backward + AdamW step over ``--n-batches`` batches (after one
   warm-up batch; the "epoch equivalent") and peak resident memory, for FindRec (paper
   dimensions, ``mamba_backend: torch``) and SASRec (RecBole's defaults, ``hidden_size`` =
   FindRec's ``embedding_size``), at each ``--lengths`` (full sequences of that length). Items and
   features mimic Amazon Beauty (``--n-items`` items, two 384-d views).
2. ``scan``: forward + backward of two Mamba mixers (``d_model`` 64, batch ``--scan-batch``) with
   each selective scan: FindRec's own (chunked, hand-written backward), ``mambapy``'s parallel
   scan, and the reference recurrence — mamba-ssm's ``selective_scan_ref`` when mamba-ssm imports, else (always on a
   machine without CUDA) recbole-mm's ``selective_scan_reference`` (said in the output).

Every measurement runs in its own subprocess, so "peak RSS" (``ru_maxrss``) is that run's and
the increase over the RSS just before the timed batches is reported too. Timings are the best
of ``--repeats`` runs; the load average is recorded because a shared machine skews them.
"""

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

FIELDS = ["table", "name", "length", "batch", "n_batches", "seconds", "seconds_per_batch", "peak_rss_mb",
          "rss_increase_mb", "max_abs_diff_vs_ours", "note"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _quiet_torch():
    import torch

    # RecBole 1.2.1's sine.py turns on autograd anomaly detection for the whole process when
    # recbole.model.sequential_recommender is imported; it would double every backward pass.
    torch.autograd.set_detect_anomaly(False)
    return torch


def _model_worker(args) -> dict:
    import recbole_mm  # noqa: F401  (registers the models)
    from recbole.data.interaction import Interaction

    from recbole_mm.config import Config
    from recbole_mm.data.synthetic import make_planted_dataset
    from recbole_mm.registry import create_dataset, get_model

    torch = _quiet_torch()
    root = tempfile.mkdtemp(prefix="findrec_speed_")
    make_planted_dataset(root, name="bench", n_items=args.n_items, modalities=("title", "attr"), dims=(384, 384))
    common = {"data_path": root, "modalities": ["title", "attr"], "MAX_ITEM_LIST_LENGTH": args.length,
              "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, "state": "ERROR",
              "show_progress": False, "checkpoint_dir": os.path.join(root, "saved"), "use_gpu": False}
    extra = {"mamba_backend": "torch"} if args.name == "FindRec" else {
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "loss_type": "CE"}
    config = Config(model=args.name, dataset="bench", config_dict={**common, **extra})
    dataset = create_dataset(config)
    model = get_model(args.name)(config, dataset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n_items = dataset.item_num

    def batch():
        return Interaction({
            model.ITEM_SEQ: torch.randint(1, n_items, (args.batch_size, args.length), generator=g),
            model.ITEM_SEQ_LEN: torch.full((args.batch_size,), args.length),
            model.POS_ITEM_ID: torch.randint(1, n_items, (args.batch_size,), generator=g)})

    def step(b):
        optimizer.zero_grad()
        loss = model.calculate_loss(b)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()
        optimizer.step()

    model.train()
    batches = [batch() for _ in range(args.n_batches + 1)]
    step(batches[0])  # warm-up
    before = _rss_mb()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for b in batches[1:]:
            step(b)
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "peak_rss_mb": _peak_rss_mb(), "rss_increase_mb": max(0.0, _peak_rss_mb() - before),
            "note": f"{sum(p.numel() for p in model.parameters())} parameters"}


def _scan_worker(args) -> dict:
    from mambapy.pscan import pscan

    from recbole_mm.model.layers import mamba as mamba_mod

    torch = _quiet_torch()
    ours = mamba_mod.selective_scan

    def with_pscan(u, delta, A, B, C, D):
        states = pscan(torch.exp(delta.unsqueeze(-1) * A), (delta * u).unsqueeze(-1) * B.unsqueeze(2))
        return (states @ C.unsqueeze(-1)).squeeze(-1) + u * D

    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as reference
        ref_note = "mamba_ssm selective_scan_ref"
    except Exception as err:  # mamba-ssm's modules import its CUDA extension unconditionally
        reference = mamba_mod.selective_scan_reference
        ref_note = f"recbole-mm selective_scan_reference (mamba_ssm not importable: {type(err).__name__})"

    def with_reference(u, delta, A, B, C, D):
        t = lambda x: x.transpose(1, 2)  # noqa: E731  the reference wants [b, d, l] / [b, n, l]
        return t(reference(t(u), t(delta), A, t(B), t(C), D))

    scans = {"ours": ours, "mambapy_pscan": with_pscan, "reference": with_reference}
    torch.manual_seed(0)
    layers = [mamba_mod.Mamba(64, d_state=16, d_conv=4, expand=2, backend="torch") for _ in range(2)]
    x0 = torch.randn(args.scan_batch, args.length, 64)

    def run(scan):
        mamba_mod.selective_scan = scan
        x = x0.clone().requires_grad_(True)
        h = x
        for layer in layers:
            h = h + layer(h)
        h.square().mean().backward()
        return h.detach()

    expected = run(ours)
    out = run(scans[args.name])
    before = _rss_mb()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(scans[args.name])
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "peak_rss_mb": _peak_rss_mb(), "rss_increase_mb": max(0.0, _peak_rss_mb() - before),
            "max_abs_diff_vs_ours": float((out - expected).abs().max()),
            "note": ref_note if args.name == "reference" else ""}


def _measure(args, table, name, length) -> dict:
    cmd = [sys.executable, __file__, "--worker", table, "--name", name, "--length", str(length),
           "--batch-size", str(args.batch_size), "--n-batches", str(args.n_batches), "--n-items", str(args.n_items),
           "--scan-batch", str(args.scan_batch), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    batch, n = (args.batch_size, args.n_batches) if table == "model" else (args.scan_batch, 1)
    row.update(table=table, name=name, length=length, batch=batch, n_batches=n, seconds_per_batch=row["seconds"] / n)
    print(f"{table:5s} {name:14s} L={length:<4d} {row['seconds']:8.2f} s  peak {row['peak_rss_mb']:8.0f} MB  "
          f"{row.get('note', '')}", flush=True)
    return row


def _markdown(rows, args) -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"# FindRec speed (CPU)", "",
             f"`{' '.join(sys.argv)}` — torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{platform.processor() or platform.machine()}, load average at the end {load}.", "",
             f"## Training: forward + backward + AdamW step over {args.n_batches} batches of {args.batch_size}", "",
             "| model | max length | seconds | s / batch | peak RSS (MB) | RSS increase (MB) | note |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['length']} | {r['seconds']:.2f} | {r['seconds_per_batch']:.3f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_increase_mb']:.0f} | {r['note']} |" for r in rows if r["table"] == "model"]
    lines += ["", f"## Selective scan: forward + backward, 2 Mamba layers, d_model 64, batch {args.scan_batch}", "",
              "| scan | length | seconds | peak RSS (MB) | max abs diff vs ours | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['length']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['max_abs_diff_vs_ours']:.1e} | {r['note']} |" for r in rows if r["table"] == "scan"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for findrec_speed.csv / .md")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (paper: 128)")
    parser.add_argument("--n-batches", type=int, default=10, help="timed batches per model run")
    parser.add_argument("--n-items", type=int, default=12000, help="items (Amazon Beauty: 12,101)")
    parser.add_argument("--scan-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions; the best is kept")
    parser.add_argument("--skip-scans", action="store_true")
    parser.add_argument("--worker", choices=["model", "scan"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps((_model_worker if args.worker == "model" else _scan_worker)(args)))
        return
    if not args.out:
        parser.error("--out is required")
    rows = [_measure(args, "model", name, length) for length in args.lengths for name in ("FindRec", "SASRec")]
    if not args.skip_scans:
        rows += [_measure(args, "scan", name, length) for length in args.lengths
                 for name in ("ours", "mambapy_pscan", "reference")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "findrec_speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "findrec_speed.md").write_text(_markdown(rows, args))
    print(f"wrote {out / 'findrec_speed.csv'} and {out / 'findrec_speed.md'}")


if __name__ == "__main__":
    main()
