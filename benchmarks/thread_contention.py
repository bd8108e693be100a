"""A training step's time when another busy process shares the cores, under OpenMP's wait settings.

    RECBOLE_MM_DATA=../shared/data python benchmarks/thread_contention.py --out DIR \
        [--models FindRec@amazon-beauty SASRec@amazon-beauty MambaRec@tiktok LightGCN@tiktok] \
        [--threads 2] [--busy 0 1] [--busy-kind train] [--same-session] [--policies libgomp package spin1k passive]
        [--steps 8]

torch's CPU build runs its intra-op work on OpenMP (libgomp), whose threads by default spin for a
while at every barrier before they sleep. With as many torch threads as cores and another busy
process beside them, a spinning thread can hold the core that the thread it waits for needs. This
script measures what that costs: for each ``MODEL@DATASET`` (built as ``run_recbole_mm.py`` builds
it, from the model's and dataset's YAML defaults) it times ``--steps`` training steps (forward,
backward, Adam; after ``--warmup`` untimed ones) with ``--threads`` torch threads, once for each
number of busy processes in ``--busy`` started beside it. ``--busy-kind``: ``train``, another
training at one thread (``run_recbole_mm.py --model=MambaRec --dataset=tiktok``, as a second
benchmark run; timing starts once it has loaded); ``torch``, a loop of one-thread matrix products;
``python``, a pure Python loop. Each busy process runs in a session of its own, as a job started
from another terminal, ``nohup``/``setsid`` or a job scheduler does (``--same-session``: in this one).
That matters on Linux with ``sched_autogroup_enabled``: the scheduler shares the cores fairly between
sessions first, so a run's two threads get one core's worth between them while the other session
runs, and a thread spinning at a barrier spends that share while its partner waits for a core.

Each policy runs in a process of its own, because libgomp reads its variables when torch is
imported: ``libgomp`` (``GOMP_SPINCOUNT=300000``, libgomp's own default: a waiting thread spins
300,000 times before it sleeps), ``package`` (none set: what ``import recbole_mm`` chooses,
``GOMP_SPINCOUNT=10000``, recbole_mm/__init__.py), ``spin1k`` (``GOMP_SPINCOUNT=1000``), ``passive``
(``OMP_WAIT_POLICY=PASSIVE``: it sleeps at once). Writes ``thread_contention.csv`` and
``thread_contention.md`` (medians, and each row against the same model idle under ``libgomp``).
"""

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout being measured

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
POLICIES = {"libgomp": {"GOMP_SPINCOUNT": "300000"}, "package": {}, "spin1k": {"GOMP_SPINCOUNT": "1000"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
# What each busy process runs, and how long it takes to load before it is busy
BUSY = {
    "train": ([str(ROOT / "run_recbole_mm.py"), "--model=MambaRec", "--dataset=tiktok", "--epochs=1000",
               "--show_progress=False", "--state=ERROR"], 45),
    "torch": (["-c", "import torch; torch.set_num_threads(1); a = torch.randn(256, 256)\nwhile True: a @ a"], 5),
    "python": (["-c", "while True: pass"], 0),
}
FIELDS = ["model", "dataset", "policy", "threads", "busy", "busy_kind", "steps", "median_s_per_step",
          "min_s_per_step", "max_s_per_step", "x_idle_libgomp"]


def _start_busy(kind: str, count: int, same_session: bool) -> list:
    """``count`` single-threaded busy processes of ``kind``, loaded and running."""
    args, load_seconds = BUSY[kind]
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    processes = [subprocess.Popen([sys.executable, *args], env=env, cwd=tempfile.gettempdir(),
                                  start_new_session=not same_session,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    if processes:
        time.sleep(load_seconds)
    return processes


def _worker(args) -> list:
    """Runs in the policy's own process: every model, idle and with each busy count."""
    import recbole_mm  # noqa: F401  (first, as run_recbole_mm.py: it chooses the spin count before torch loads)
    import torch
    from recbole_mm.config import Config
    from recbole_mm.quick_start.quick_start import build_data_and_model

    rows = []
    for spec in args.models:
        name, dataset = spec.split("@")
        config = Config(model=name, dataset=dataset, config_dict={
            "state": "ERROR", "show_progress": False, "use_gpu": False, "checkpoint_dir": "/tmp/thread_contention"})
        _, train, _, _, model = build_data_and_model(config)
        torch.set_num_threads(args.threads)  # after init_seed, which may reset it
        torch.autograd.set_detect_anomaly(False)  # RecBole 1.2.1's sine.py turns it on at import
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        batches = []
        for batch in train:
            batches.append(batch)
            if len(batches) == args.warmup + args.steps:
                break
        for busy in args.busy:
            processes = _start_busy(args.busy_kind, busy, args.same_session)
            try:
                times = []
                for i, batch in enumerate(batches):
                    start = time.perf_counter()
                    optimizer.zero_grad()
                    loss = model.calculate_loss(batch)
                    (sum(loss) if isinstance(loss, (tuple, list)) else loss).backward()
                    optimizer.step()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
            finally:
                for p in processes:
                    p.kill()
                    p.wait()
            rows.append({"model": name, "dataset": dataset, "policy": args.policy, "threads": args.threads,
                         "busy": busy, "busy_kind": args.busy_kind, "steps": len(times),
                         "median_s_per_step": statistics.median(times), "min_s_per_step": min(times),
                         "max_s_per_step": max(times)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list, command: str) -> str:
    import torch

    lines = ["# A training step with busy processes beside it, by OpenMP wait policy", "",
             f"`{command}` — {datetime.datetime.now().isoformat(timespec='minutes')}, {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}. Median over the timed steps (min-max); "
             "x = against the same model idle under libgomp's default.", "",
             "| model | dataset | policy | torch threads | busy processes (kind) | s / step | min-max | x idle libgomp |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['policy']} | {r['threads']} | {r['busy']} ({r['busy_kind']}) | "
                     f"{r['median_s_per_step']:.3f} | {r['min_s_per_step']:.3f}-{r['max_s_per_step']:.3f} | "
                     f"{r['x_idle_libgomp']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for thread_contention.csv / .md")
    parser.add_argument("--models", nargs="+", default=["FindRec@amazon-beauty", "SASRec@amazon-beauty",
                                                        "MambaRec@tiktok", "LightGCN@tiktok"],
                        help="MODEL@DATASET, built with its YAML defaults")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: the cores)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes beside it")
    parser.add_argument("--busy-kind", default="train", choices=list(BUSY), help="what each busy process runs")
    parser.add_argument("--same-session", action="store_true",
                        help="start the busy processes in this session instead of one of their own each")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model and condition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--policy", choices=list(POLICIES), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.policy:
        print(json.dumps(_worker(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
        env.update(POLICIES[policy])
        command = [sys.executable, __file__, "--out", str(out), "--policy", policy, "--threads", str(args.threads),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--models", *args.models,
                   "--busy", *map(str, args.busy), "--busy-kind", args.busy_kind] + ["--same-session"] * args.same_session
        result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(result.stdout.strip().splitlines()[-1])
    base = {(r["model"], r["dataset"]): r["median_s_per_step"] for r in rows
            if r["policy"] == "libgomp" and r["busy"] == 0}
    for r in rows:
        key = (r["model"], r["dataset"])
        r["x_idle_libgomp"] = r["median_s_per_step"] / base[key] if key in base else float("nan")
    with open(out / "thread_contention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, "python benchmarks/thread_contention.py " + " ".join(sys.argv[1:] if argv is None else argv))
    (out / "thread_contention.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
