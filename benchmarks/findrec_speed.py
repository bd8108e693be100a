"""FindRec's training cost on the CPU (or a GPU) against its floors and against RecBole's SASRec.

    python benchmarks/findrec_speed.py --out results/findrec_speed                  # everything
    python benchmarks/findrec_speed.py --out /tmp/fs --max-batches 20 --skip scan      # a quick look
    python benchmarks/findrec_speed.py --out /tmp/fs --device cuda --max-batches 40 --sample-batches 40 \
        --skip padded                            # on a GPU (where FindRec computes the padded batch anyway)

Data: the FindRec paper's Amazon Beauty (Table 1: 4,323 users, 2,424 items, 60,276
interactions), the dataset ``amazon-beauty-paper``, with RecBole's leave-one-out split and training
loader (batch 128 unless ``--batch-size``).
Every measurement runs in a subprocess of its own (``ru_maxrss`` is that run's peak), all with
``--threads`` torch threads. Writes ``findrec_speed.csv`` and ``findrec_speed.md`` with four tables:

1. ``paper``: one training epoch of FindRec at the paper's dimensions (``properties/model/FindRec.yaml``)
   — forward, backward, gradient clipping and the AdamW step over every batch (or the first
   ``--max-batches``, extrapolated and said so), with the padded-batch computation beside it
   (``length_groups: false``, ``--sample-batches`` extrapolated).
2. ``equal-width``: FindRec (``embedding_size`` = ``align_dim`` = 64) against SASRec (``hidden_size``
   64), 2 layers each, at ``MAX_ITEM_LIST_LENGTH`` 50 and 200: s/epoch and peak memory.
3. ``scan``: forward + backward of one selective scan at the paper's size (batch 128, length 50,
   ``d_inner`` 512, ``d_state`` 16): the compiled kernel, the PyTorch step loop it replaces, and
   ``mambapy``'s parallel scan.
4. ``floor`` (in each row of 1-2): the real (non-padding) positions x FLOPs per position of the
   model's position-wise matrix products (forward + backward = 3x forward), plus the per-sequence
   output products, divided by this machine's fp32 matmul rate measured in the same run.
"""

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

from recbole_mm.benchmark.worker import _clock  # noqa: E402  (the harness's device-synchronised clock)

FIELDS = ["table", "name", "max_length", "threads", "batches", "batches_timed", "seconds_timed", "s_per_epoch",
          "peak_rss_mb", "real_positions", "padded_positions", "gflop_per_epoch", "floor_s", "note"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _torch(threads):
    import torch

    torch.set_num_threads(threads)
    # RecBole 1.2.1's sine.py turns on anomaly detection for the whole process when its
    # sequential models are imported; it would double every backward pass.
    torch.autograd.set_detect_anomaly(False)
    return torch


def _position_flops(model) -> tuple:
    """Forward FLOPs per position of the position-wise ``nn.Linear`` maps inside the sequence
    encoders, and per sequence of everything after them (routers, experts, output FFN, logits)."""
    import torch.nn as nn

    per_position = per_sequence = 0
    encoders = [m for name, m in model.named_modules() if name.endswith(("encoder", "streams", "trm_encoder"))]
    positional = {id(lin) for enc in encoders for lin in enc.modules() if isinstance(lin, nn.Linear)}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
            if id(module) in positional:
                per_position += flops
            else:
                per_sequence += flops
    per_sequence += 2 * model.item_embedding.weight.numel()  # the logits over all items
    return per_position, per_sequence


def _epoch_worker(args) -> dict:
    torch = _torch(args.threads)
    import recbole_mm  # noqa: F401  (compat and registration)
    from recbole_mm.config import Config
    from recbole_mm.quick_start.quick_start import build_data_and_model

    overrides = json.loads(args.overrides)
    config = Config(model=args.name, dataset=args.dataset, config_dict={
        "MAX_ITEM_LIST_LENGTH": args.length, "train_batch_size": args.batch_size,
        "state": "ERROR", "show_progress": False, "use_gpu": args.device == "cuda",
        "checkpoint_dir": "/tmp/findrec_speed_saved",
        **overrides})
    dataset, train, valid, test, model = build_data_and_model(config)
    torch = _torch(args.threads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    per_position, per_sequence = _position_flops(model)
    model.train()
    timed, seconds, real, padded, sequences = 0, 0.0, 0, 0, 0
    for i, batch in enumerate(train):
        if args.max_batches and timed >= args.max_batches:
            break
        batch = batch.to(model.device)
        start = _clock(model.device)
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        end = _clock(model.device)
        if i == 0 and args.max_batches:
            continue  # warm-up (first-call allocations) when extrapolating from a sample
        seconds += end - start
        timed += 1
        lengths = batch[model.ITEM_SEQ_LEN]
        real += int(lengths.sum())
        padded += lengths.numel() * batch[model.ITEM_SEQ].shape[1]
        sequences += lengths.numel()
    scale = len(train) / timed
    gflop = 3 * (real * per_position + sequences * per_sequence) * scale / 1e9
    return {"batches": len(train), "batches_timed": timed, "seconds_timed": seconds, "s_per_epoch": seconds * scale,
            "peak_rss_mb": _peak_rss_mb(), "real_positions": round(real * scale), "padded_positions": round(padded * scale),
            "gflop_per_epoch": gflop, "note": f"{dataset.user_num - 1} users, {dataset.item_num - 1} items"}


def _scan_worker(args) -> dict:
    torch = _torch(args.threads)
    from recbole_mm.model.layers import mamba as mamba_mod

    g = torch.Generator().manual_seed(0)
    b, length, d, n = args.batch_size, args.length, 512, 16
    u = torch.randn(b, length, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g) - 2)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C, D = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g), torch.ones(d)
    inputs = [x.requires_grad_() for x in (u, delta, A, B, C, D)]
    dy = torch.randn(b, length, d, generator=g)

    def mambapy_scan(u, delta, A, B, C, D):
        from mambapy.pscan import pscan

        states = pscan(torch.exp(delta.unsqueeze(-1) * A), (delta * u).unsqueeze(-1) * B.unsqueeze(2))
        return (states @ C.unsqueeze(-1)).squeeze(-1) + u * D

    scans = {"compiled kernel": lambda *x: mamba_mod.selective_scan(*x, kernel=True),
             "PyTorch step loop (before)": lambda *x: mamba_mod.selective_scan(*x, kernel=False),
             "mambapy pscan": mambapy_scan}
    scan = scans[args.name]
    reference = torch.autograd.grad((mamba_mod.selective_scan(*inputs, kernel=False) * dy).sum(), inputs)
    best = float("inf")
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        grads = torch.autograd.grad((scan(*inputs) * dy).sum(), inputs)
        best = min(best, time.perf_counter() - start)
    diff = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(grads, reference))
    return {"seconds_timed": best, "peak_rss_mb": _peak_rss_mb(), "note": f"max relative gradient difference {diff:.1e}"}


def _matmul_worker(args) -> dict:
    torch = _torch(args.threads)
    a, b = torch.randn(2048, 2048, device=args.device), torch.randn(2048, 2048, device=args.device)
    best = float("inf")
    for _ in range(5):
        start = _clock(args.device)
        a @ b
        best = min(best, _clock(args.device) - start)
    return {"seconds_timed": best, "note": f"{2 * 2048 ** 3 / best / 1e9:.1f} GFLOP/s"}


def _run(args, table, name, length=50, overrides=None, max_batches=None) -> dict:
    worker = table if table in ("scan", "matmul") else "epoch"
    max_batches = args.max_batches if max_batches is None else max_batches
    cmd = [sys.executable, __file__, "--worker", worker, "--name", name, "--length", str(length),
           "--batch-size", str(args.batch_size), "--max-batches", str(max_batches), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--dataset", args.dataset, "--device", args.device, "--overrides", json.dumps(overrides or {})]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(table=table, name=name + (f" {json.dumps(overrides)}" if overrides else ""), max_length=length,
               threads=args.threads)
    print(json.dumps(row), flush=True)
    return row


def _device_name(device) -> str:
    if device == "cpu":
        return "CPU"
    import torch

    return torch.cuda.get_device_name()


def _fmt(x, spec):
    return "" if x in (None, "") else format(x, spec)


def _markdown(rows, args, rate) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"# FindRec training cost ({_device_name(args.device)})", "",
             f"`{' '.join(sys.argv)}` — {platform.processor() or platform.machine()}, {args.threads} torch threads, "
             f"fp32 matmul {rate:.1f} GFLOP/s (2048^3, same run), load average at the end {load}.", "",
             "| table | model | max length | s / epoch | floor s / epoch | x floor | real / padded positions | "
             "peak RSS (MB) | batches timed | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["table"] in ("paper", "equal-width"):
            lines.append(f"| {r['table']} | {r['name']} | {r['max_length']} | {r['s_per_epoch']:.1f} | {r['floor_s']:.1f} | "
                         f"{r['s_per_epoch'] / r['floor_s']:.1f} | {r['real_positions']:,} / {r['padded_positions']:,} | "
                         f"{r['peak_rss_mb']:.0f} | {r['batches_timed']} of {r['batches']} | {r['note']} |")
    lines += ["", "| scan (batch 128, length 50, d_inner 512, d_state 16) | forward + backward s | note |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['seconds_timed']:.3f} | {r['note']} |" for r in rows if r["table"] == "scan"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for findrec_speed.csv / .md")
    parser.add_argument("--dataset", default="amazon-beauty-paper", help="default: FindRec's Table 1 data")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (paper: 128)")
    parser.add_argument("--max-batches", type=int, default=0,
                        help="paper table: time this many batches and extrapolate (0: the whole epoch)")
    parser.add_argument("--sample-batches", type=int, default=60,
                        help="padded and equal-width rows: batches timed and extrapolated (0: whole epochs)")
    parser.add_argument("--paper-length", type=int, default=50,
                        help="MAX_ITEM_LIST_LENGTH of the paper rows (the paper: 50 on Beauty, 100 on ML-100K)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model trains (cuda: the scan table is skipped, its kernel is the CPU's)")
    parser.add_argument("--repeats", type=int, default=3, help="scan timings: the best of this many")
    parser.add_argument("--skip", nargs="*", default=[], choices=["paper", "padded", "equal-width", "scan"])
    parser.add_argument("--worker", choices=["epoch", "scan", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=50, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps({"epoch": _epoch_worker, "scan": _scan_worker, "matmul": _matmul_worker}[args.worker](args)))
        return
    if not args.out:
        parser.error("--out is required")
    rate = float(_run(args, "matmul", "matmul")["note"].split()[0])
    rows = []
    if "paper" not in args.skip:
        rows.append(_run(args, "paper", "FindRec", args.paper_length))
    if "padded" not in args.skip:
        rows.append(_run(args, "paper", "FindRec", args.paper_length, {"length_groups": False},
                         max_batches=args.sample_batches))
    if "equal-width" not in args.skip:
        for length in (50, 200):
            rows.append(_run(args, "equal-width", "FindRec", length, {"embedding_size": 64, "align_dim": 64},
                             max_batches=args.sample_batches))
            rows.append(_run(args, "equal-width", "SASRec", length, {
                "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "loss_type": "CE",
                "train_neg_sample_args": None}, max_batches=args.sample_batches))
    for row in rows:
        row["floor_s"] = row["gflop_per_epoch"] / rate
    if "scan" not in args.skip and args.device == "cpu":
        rows += [_run(args, "scan", name) for name in ("compiled kernel", "PyTorch step loop (before)", "mambapy pscan")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "findrec_speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "findrec_speed.md").write_text(_markdown(rows, args, rate))
    print(f"wrote {out / 'findrec_speed.csv'} and {out / 'findrec_speed.md'}")


if __name__ == "__main__":
    main()
