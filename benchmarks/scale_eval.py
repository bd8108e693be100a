"""Full-ranking evaluation at catalogue scale: RecBole's dense path against recbole-mm's blocked
exact top-k (``topk_eval: blocked``), on a synthetic dataset of ``--users`` x ``--items``.

    python benchmarks/scale_eval.py --out results/scale_eval                       # 20k x 1M
    python benchmarks/scale_eval.py --out /tmp/se --users 2000 --items 200000      # reduced

Writes ``<out>/scale_eval.csv`` and ``<out>/scale_eval.md``: per model and path, seconds for one
evaluation of the test users, peak memory above the model's own (:class:`PeakMemory`: CUDA max
allocated on a GPU, the sampled resident set on a CPU), the metrics, and the time of
one matrix product of all test users' vectors with all item vectors (the issue's yardstick:
blocked <= 3x that product). Every (model, path) runs in its own subprocess, so peaks are that
run's and a dense path that runs out of memory is recorded as such, not fatal. Models are
evaluated untrained (no ``fit``): the ranking work does not depend on the weights.

The data: each user has ``--per-user`` interactions with random items (leave-one-out by time for
sequential models, 8:1:1 random per user for general ones), and ``.item`` lists all ``--items``
items, so every item is ranked although most have no interaction. ``--features D`` adds two
modalities (``image_feat.npy``, ``text_feat.npy``: random ``[items, D]`` rows) for the models that
need features (FindRec, MambaRec, the multimodal baselines):

    python benchmarks/scale_eval.py --out DIR --models FindRec --paths blocked --features 32

``--train-steps N`` also times N training steps (optimizer step included; the first one, which
allocates, is not timed) before the evaluation, with the run's ``train_batch_size`` (RecBole's
2048 unless ``--train-batch-size``) and, for cross-entropy models, ``ce_item_chunk`` =
``--ce-item-chunk`` (items per slice of the exact loss; 0 leaves RecBole's ``[batch, n_items]``
logits; the column says 0 where the model does not train on slices): columns
``train_s_per_step`` and ``train_peak_extra_mb`` (peak memory above the model's own over those
steps)::

    python benchmarks/scale_eval.py --out DIR --models SASRec FindRec --paths blocked --features 32 \
        --train-steps 4 --ce-item-chunk 65536
"""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

FIELDS = ["model", "path", "users", "items", "seconds", "matmul_seconds", "ratio_to_matmul", "peak_extra_mb",
          "recall@10", "ndcg@10", "train_batch_size", "ce_item_chunk", "train_s_per_step", "train_peak_extra_mb",
          "status"]
SEQUENTIAL = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
              "train_neg_sample_args": None}
GENERAL = {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}}


MODALITIES = ("image", "text")


def make_data(root: Path, users: int, items: int, per_user: int, features: int = 0, seed: int = 0) -> Path:
    import numpy as np

    folder = root / (f"scale{users}x{items}" + (f"f{features}" if features else ""))
    if (folder / f"{folder.name}.inter").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / f"{folder.name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(users):
            for t, i in enumerate(rng.choice(items, per_user, replace=False)):
                f.write(f"u{u}\ti{i}\t{t}\n")
    with open(folder / f"{folder.name}.item", "w") as f:
        f.write("item_id:token\n" + "".join(f"i{i}\n" for i in range(items)))
    for modality in MODALITIES if features else ():
        np.save(folder / f"{modality}_feat.npy", rng.standard_normal((items, features), dtype=np.float32))
    return folder


class PeakMemory:
    """Peak memory above the start, in MiB, over a ``with`` block: CUDA max allocated on a GPU; on a
    CPU the resident set sampled every 5 ms (``ru_maxrss`` is a process-lifetime high-water mark,
    usually set by data loading, so it cannot see a later, smaller peak)."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def __enter__(self):
        import threading

        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start, self.top, self.done = self._rss_mb(), 0.0, threading.Event()

        def sample():
            while not self.done.wait(0.005):
                self.top = max(self.top, self._rss_mb())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        else:
            self.done.set()
            self.thread.join()
            self.peak_mb = max(self.top, self._rss_mb()) - self.start
        return False


def run_one(args) -> dict:
    """One (model, path) measurement, in this process."""
    import torch

    import recbole_mm  # noqa: F401
    from recbole_mm import Config
    from recbole_mm.trainer.scale import with_scale_hooks
    from recbole_mm.evaluation.scorers import make_scorer
    from recbole_mm.model.layers.blocks import BlockProduct
    from recbole_mm.quick_start.quick_start import build_data_and_model
    from recbole_mm.registry import get_trainer

    folder = Path(args.data)
    cfg = {"data_path": str(folder.parent), "epochs": 1, "embedding_size": args.dim, "hidden_size": args.dim,
           "inner_size": 2 * args.dim, "n_layers": 1, "n_heads": 1, "show_progress": False, "state": "WARNING",
           "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
           "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "recall@10",
           "eval_batch_size": args.eval_batch_size, "eval_item_block": args.item_block, "topk_eval": args.path,
           "modalities": list(MODALITIES) if args.features else None, "text_features": None,
           "checkpoint_dir": str(folder.parent / "saved"), "feature_cache_dir": str(folder.parent / "cache"),
           "train_batch_size": args.train_batch_size, "ce_item_chunk": args.ce_item_chunk or None}
    config = Config(model=args.model, dataset=folder.name, config_dict=cfg)
    cfg.update(SEQUENTIAL if config["MODEL_TYPE"].name == "SEQUENTIAL" else GENERAL)
    config = Config(model=args.model, dataset=folder.name, config_dict=cfg)
    _, train_data, _, test_data, model = build_data_and_model(config)
    trainer = with_scale_hooks(get_trainer(config["MODEL_TYPE"], args.model))(config, model)
    device = config["device"]
    training = train_steps(trainer, train_data, args.train_steps, device) if args.train_steps else {}
    model.eval()
    # the yardstick: one product of every test user's vector with every item vector
    with torch.no_grad():
        inter = test_data.collate_fn(list(range(min(8, test_data.sample_size))))[0].to(device)
        scorer = make_scorer(model, inter, test_data._dataset.item_num)
        table = getattr(scorer, "item_table", None)
    matmul = float("nan")
    if table is not None:
        users, product = torch.randn(test_data.sample_size, table.shape[1], device=device), BlockProduct()
        start = time.perf_counter()
        # blocked, so the yardstick fits in memory too; into one buffer and without autograd (as
        # evaluation runs), so it is the matmul rate, not the page faults of fresh blocks
        with torch.no_grad():
            for lo in range(0, table.shape[0], args.item_block):
                product(users, table[lo:lo + args.item_block]).max()
        if device.type == "cuda":
            torch.cuda.synchronize()
        matmul = time.perf_counter() - start
        del users
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = trainer.evaluate(test_data, load_best_model=False)
        seconds = time.perf_counter() - start
    return {"model": args.model, "path": args.path, "users": test_data.sample_size,
            "items": test_data._dataset.item_num, "seconds": round(seconds, 2), "matmul_seconds": round(matmul, 3),
            "ratio_to_matmul": round(seconds / matmul, 2) if matmul == matmul else "",
            "peak_extra_mb": round(memory.peak_mb, 1), "recall@10": result["recall@10"],
            "ndcg@10": result["ndcg@10"], **training, "status": "ok"}


def train_steps(trainer, train_data, steps: int, device) -> dict:
    """Seconds per training step (forward, backward, optimizer step) over ``steps`` batches after
    a first untimed one, and the peak memory above the model's own over all of them. The loss is
    the one ``fit`` would train on: ``ce_item_chunk``'s slices where the trainer swaps them in."""
    import torch

    model, chunked = trainer.model, trainer.prepare_chunked_ce(train_data)
    model.train()
    timed, batches = [], iter(train_data)
    with PeakMemory(device) as memory:
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.optimizer.zero_grad()
            loss = model.calculate_loss(next(batches).to(device))
            (sum(loss) if isinstance(loss, tuple) else loss).backward()
            trainer.optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timed.append(time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"train_batch_size": train_data.batch_size,
            "ce_item_chunk": trainer.config["ce_item_chunk"] if chunked else 0,
            "train_s_per_step": round(sum(timed[1:]) / steps, 2), "train_peak_extra_mb": round(memory.peak_mb, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--items", type=int, default=1000000)
    p.add_argument("--per-user", type=int, default=10)
    p.add_argument("--models", nargs="+", default=["BPR", "LightGCN", "SASRec"])
    p.add_argument("--paths", nargs="+", default=["blocked", "recbole"])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=int, default=0, help="dimension of two random modalities (0: none)")
    p.add_argument("--eval-batch-size", type=int, default=4096)
    p.add_argument("--item-block", type=int, default=65536)
    p.add_argument("--train-steps", type=int, default=0, help="time this many training steps too (0: none)")
    p.add_argument("--train-batch-size", type=int, default=2048)
    p.add_argument("--ce-item-chunk", type=int, default=0, help="ce_item_chunk for CE models (0: full logits)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (model, path) run")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one run, JSON out
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out / "data", args.users, args.items, args.per_user, args.features)
    rows = []
    for model in args.models:
        for path in args.paths:
            cmd = [sys.executable, __file__, "--out", str(out), "--one", "--model", model, "--path", path,
                   "--data", str(data), "--dim", str(args.dim), "--eval-batch-size", str(args.eval_batch_size),
                   "--item-block", str(args.item_block), "--features", str(args.features),
                   "--train-steps", str(args.train_steps), "--train-batch-size", str(args.train_batch_size),
                   "--ce-item-chunk", str(args.ce_item_chunk)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=out)
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(found[-1][7:]) if found else \
                    {"model": model, "path": path, "status": f"failed rc={proc.returncode}: "
                                                            f"{proc.stderr.strip().splitlines()[-1:]}"}
            except subprocess.TimeoutExpired:
                row = {"model": model, "path": path, "status": f"timeout after {args.timeout} s"}
            print(row, flush=True)
            rows.append(row)
    with open(out / "scale_eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "scale_eval.md", "w") as f:
        f.write(f"# Full-ranking evaluation, {args.users} users x {args.items} items, dim {args.dim}"
                + (f", two {args.features}-d random modalities" if args.features else "") + "\n\n"
                f"machine: {os.cpu_count()} CPUs; eval_batch_size {args.eval_batch_size}, "
                f"eval_item_block {args.item_block}\n\n| " + " | ".join(FIELDS) + " |\n|"
                + "---|" * len(FIELDS) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(row.get(k, "")) for k in FIELDS) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
