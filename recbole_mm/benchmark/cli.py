"""Command line of the benchmark: plan, run what is not finished (one process per run), summarise."""

import argparse
import dataclasses
import json
import multiprocessing
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from recbole_mm.benchmark import worker
from recbole_mm.benchmark.plan import BASE_SEED, Entry, Run, Suite, load_suite, plan_runs
from recbole_mm.benchmark.quick import QUICK_CONFIG, first_users_slice
from recbole_mm.benchmark.report import summarise
from recbole_mm.benchmark.store import append_row, finished_keys
from recbole_mm.config.validate import check_cli_overrides, known_keys
from recbole_mm.registry import resolve_model_name
from recbole_mm.data.locate import find_dataset

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m recbole_mm.benchmark", allow_abbrev=False,
        description="Run models x seeds on one dataset and split, one process per run; resumable.",
        epilog="Any other --key=value is a RecBole config override for every run.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--models", nargs="+", help="model names (each its own label)")
    what.add_argument("--suite", help="a suite YAML file, e.g. benchmarks/suites/findrec-table2-beauty.yaml")
    parser.add_argument("--dataset", "-d", help="dataset name (required with --models; replaces the suite's)")
    parser.add_argument("--seeds", type=int, help=f"seeds per run, counting from {BASE_SEED} (default: the suite's, else 3)")
    parser.add_argument("--split_seed", type=int, default=BASE_SEED, help="seed the data is split under, for every run")
    parser.add_argument("--config_files", help="RecBole config files for every run (space separated)")
    parser.add_argument("--reference", help="label the others are tested against (default: the first)")
    parser.add_argument("--out", help="output folder (default: benchmarks/out/<dataset>/, with --quick .../quick/)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test of the harness, not of the models: tiny models, 1 epoch, the first "
                             "--quick_users users, 1 seed unless --seeds; its metrics mean nothing")
    parser.add_argument("--quick_users", type=int, default=200, help="users kept by --quick (default 200)")
    parser.add_argument("--verbose", action="store_true", help="show RecBole's logs instead of writing them to <out>/logs/")
    parser.add_argument("--only", nargs="+", metavar="LABEL[@SEED]",
                        help="run only these entries of the suite (LABEL@SEED: that seed only); the summary "
                             "covers them and the reference")
    parser.add_argument("--summary_only", action="store_true",
                        help="run nothing: summarise what <out>/results.csv holds for the planned runs")
    parser.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N",
                        help="run only the K-th of every N planned runs; N such processes with the same "
                             "--out share the work (one per core or machine) and one results.csv")
    args, rest = parser.parse_known_args(argv)
    if args.models and not args.dataset:
        parser.error("--models needs --dataset")
    try:  # strings: RecBole's Config converts them
        args.overrides = check_overrides(rest, args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_overrides(rest: List[str], args) -> Dict[str, str]:
    """``--key=value`` settings for every run: each key must be known for at least one of the
    benchmarked models (:func:`recbole_mm.config.validate.check_cli_overrides`)."""
    if args.models:
        models, dataset = [resolve_model_name(m) for m in args.models], args.dataset
    else:
        suite = load_suite(args.suite)
        models, dataset = [e.model for e in suite.entries], args.dataset or suite.dataset
    allowed = set().union(*(known_keys(m, dataset) for m in models))
    return check_cli_overrides(rest, models[0], dataset, allowed)


def _shard(text: str):
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard is K/N, e.g. 1/2; got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N; got {text!r}")
    return k, n


def shard_of(runs: List[Run], k: int, n: int) -> List[Run]:
    """The runs shard ``k`` of ``n`` executes: every n-th, so the shards share out models and seeds."""
    return runs[k - 1::n]


def make_suite(args) -> Suite:
    """The suite of ``--suite``, or the one ``--models`` describes; command-line values win."""
    files = args.config_files.split() if args.config_files else []
    if args.models:
        return Suite(name="quick" if args.quick else "benchmark", dataset=args.dataset,
                     entries=[Entry(m, m) for m in args.models], seeds=args.seeds or (1 if args.quick else 3), reference=args.reference,
                     config_files=[str(Path(f).resolve()) for f in files])
    suite = load_suite(args.suite)
    suite = dataclasses.replace(  # re-validates the reference
        suite, dataset=args.dataset or suite.dataset, seeds=args.seeds or (1 if args.quick else suite.seeds),
        reference=args.reference or suite.reference,
        config_files=suite.config_files + [str(Path(f).resolve()) for f in files])
    if not suite.dataset:
        raise SystemExit(f"{args.suite} names no dataset: pass --dataset")
    return suite


def narrow(suite: Suite, only: Optional[List[str]]) -> Tuple[Suite, Dict[str, Optional[set]]]:
    """``--only``: the suite cut to the named entries plus its reference (the others are tested
    against it, and it pins their protocol, so their config hashes stay those of the whole suite),
    and the seeds asked of each named label (``None``: all of them)."""
    if not only:
        return suite, {}
    labels, wanted = [e.label for e in suite.entries], {}
    for item in only:
        label, _, seed = item.rpartition("@")
        if not (label and seed.isdigit()):  # a bare label (which may hold an "@" itself)
            label, seed = item, ""
        if label not in labels:
            raise ValueError(f"--only {item!r}: no entry labelled {label!r}; the suite's labels: {labels}")
        if not seed:
            wanted[label] = None
        elif wanted.get(label, set()) is not None:
            wanted[label] = wanted.get(label, set()) | {int(seed)}
    keep = set(wanted) | {suite.reference}
    return dataclasses.replace(suite, entries=[e for e in suite.entries if e.label in keep],
                               pairs=[p for p in suite.pairs if set(p) <= keep]), wanted


def chosen_runs(runs: List[Run], wanted: Dict[str, Optional[set]]) -> List[Run]:
    """The planned runs ``--only`` asks for (every run without it)."""
    if not wanted:
        return runs
    for label, seeds in wanted.items():
        planned = {r.seed for r in runs if r.label == label}
        if seeds and not seeds <= planned:
            raise ValueError(f"--only {label!r}: seed(s) {sorted(seeds - planned)} not planned; the suite's seeds: "
                             f"{sorted(planned)} (--seeds N plans {BASE_SEED} to {BASE_SEED}+N-1)")
    return [r for r in runs if r.label in wanted and (wanted[r.label] is None or r.seed in wanted[r.label])]


def _elapsed(start: float) -> str:
    seconds = int(time.perf_counter() - start)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _worker_context():
    """Runs fork from a server that imported the worker module once (seconds of torch and RecBole
    imports saved per run); the server never touches CUDA, so each run starts clean."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["recbole_mm.benchmark.worker"])
    return context


def checkpoint_folder(out: Path, run: Run) -> Path:
    """Where a run keeps its best checkpoint until its row is written: a run interrupted (or
    failed) leaves it there, and the next invocation continues from it (:mod:`worker`)."""
    return out / "checkpoints" / run.stem


def _files(out: Path, run: Run):
    """The run's spec, result (its row, written last by the worker), per-user and log files."""
    logs = out / "logs"
    return (logs / f"{run.stem}.json", logs / f"{run.stem}.result.json", out / "per_user" / f"{run.stem}.npz",
            logs / f"{run.stem}.log")


def collect(run: Run, out: Path) -> Optional[Dict]:
    """The row a finished worker left for ``run``, or ``None``; taking it drops the run's checkpoints.

    Also called before a run starts: a worker that finished after its invoking process was stopped
    (a session's end, a kill) has written its result and per-user files but no row, and its
    training is not repeated."""
    _, result, per_user, _ = _files(out, run)
    if not (result.is_file() and per_user.is_file()):
        return None
    row = json.loads(result.read_text())
    result.unlink()
    shutil.rmtree(checkpoint_folder(out, run), ignore_errors=True)  # the benchmark keeps metrics, not models
    return row


def launch(run: Run, out: Path, verbose: bool, context) -> Optional[Dict]:
    """Run one worker process; its CSV row, or ``None`` when it failed (see its log)."""
    spec, result, per_user, log = _files(out, run)
    spec.parent.mkdir(parents=True, exist_ok=True)
    per_user.parent.mkdir(exist_ok=True)
    spec.write_text(run.to_json())
    result.unlink(missing_ok=True)
    process = context.Process(
        target=worker.run_to_files, name=run.stem,
        args=(str(spec), str(result), str(per_user),
              None if verbose else str(log), str(checkpoint_folder(out, run))))
    process.start()
    process.join()
    return collect(run, out) if process.exitcode == 0 else None


def _log_tail(out: Path, run: Run, lines: int = 15) -> str:
    log = _files(out, run)[3]
    return "\n".join(log.read_text().splitlines()[-lines:]) if log.is_file() else "(no log: ran with --verbose)"


def execute(runs: List[Run], out: Path, verbose: bool = False) -> List[Run]:
    """Run every planned run whose key is not in ``<out>/results.csv``; returns the failed ones.

    The file is read again before each run: other processes with the same ``--out`` (shards, or a
    second suite sharing runs) may have finished it meanwhile."""
    csv_path, start, failed, context = out / "results.csv", time.perf_counter(), [], _worker_context()
    for i, run in enumerate(runs, 1):
        name = f"{run.label} seed={run.seed} [{run.config_hash}]"
        if run.key in finished_keys(csv_path):
            print(f"[{i}/{len(runs)} {_elapsed(start)}] skip  {name}: already in {csv_path.name}", flush=True)
            continue
        row = collect(run, out)
        if row is not None:
            print(f"[{i}/{len(runs)} {_elapsed(start)}] found {name}: finished after an earlier invocation stopped",
                  flush=True)
        else:
            resume = worker.resume_from(checkpoint_folder(out, run))
            print(f"[{i}/{len(runs)} {_elapsed(start)}] "
                  + (f"resume {name} from {resume}" if resume else f"start {name}"), flush=True)
            row = launch(run, out, verbose, context)
        if row is None:
            failed.append(run)
            print(f"[{i}/{len(runs)} {_elapsed(start)}] FAILED {name}; log: {_files(out, run)[3]}\n"
                  f"{_log_tail(out, run)}", flush=True)
            continue
        append_row(csv_path, {**row, "label": run.label})
        shown = ", ".join(f"{k[5:]}={v:.4f}" for k, v in row.items() if k.startswith("test_") and k != "test_users")
        print(f"[{i}/{len(runs)} {_elapsed(start)}] done  {name} in {row['run_s']:.1f}s: {shown}; "
              f"best epoch {row['best_epoch']}", flush=True)
    return failed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        suite, wanted = narrow(make_suite(args), args.only)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out or Path("benchmarks", "out", suite.dataset, *(["quick"] if args.quick else [])))
    out.mkdir(parents=True, exist_ok=True)
    overrides, quick = dict(args.overrides), None
    if args.quick:
        source = find_dataset(suite.dataset, overrides.get("data_path") or suite.config.get("data_path"))
        overrides["data_path"] = str(first_users_slice(source, out / "quick-data", args.quick_users).resolve())
        quick = QUICK_CONFIG
    runs = plan_runs(suite, args.split_seed, overrides, quick)
    try:
        chosen = chosen_runs(runs, wanted)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(f"benchmark {suite.name}: {len(suite.entries)} entries x {suite.seeds} seeds on {suite.dataset} -> {out}"
          + (f"; {len(chosen)} of them chosen by --only" if wanted else ""), flush=True)
    failed = [] if args.summary_only else execute(shard_of(chosen, *args.shard), out, args.verbose)
    summary = summarise(suite, runs, out / "results.csv", out, "python -m recbole_mm.benchmark " + shlex.join(argv))
    print(f"\nresults: {out / 'results.csv'}\nsummary: {summary}\n\n{summary.read_text()}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(f'{r.label} seed={r.seed}' for r in failed)}", flush=True)
    return 1 if failed else 0
