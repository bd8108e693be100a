"""``run_hyper.py``: RecBole's tuning command for every registered model.

    python run_hyper.py --model=FindRec --dataset=amazon-beauty --params_file=properties/hyper/FindRec.hyper
    python run_hyper.py --model=MambaRec --dataset=tiktok --params_file=properties/hyper/MambaRec.hyper \\
        --algo=bayes --max_evals=30 --search_seed=7 --output_file=mambarec.json
    python run_hyper.py --model=SASRec --dataset=ml-100k --params_file=p.hyper --tool=Ray --ray_address=auto

RecBole's flags (``--config_files``, ``--params_file``, ``--output_file``, ``--display_file``,
``--tool Hyperopt|Ray``) plus ``--algo exhaustive|random|bayes``, ``--max_evals`` (ignored by
the exhaustive search, which runs the whole grid), ``--early_stop`` (hyperopt: stop after that
many trials without progress), ``--search_seed`` (the search's own seed; RecBole's ``seed`` still
seeds each trial's training), ``--ray_address``, ``--cpus_per_trial``, ``--gpus_per_trial``. Any
other ``--key=value`` is a fixed setting of every trial; it may not name a searched parameter, and
(with ``--model`` and ``--dataset`` given) it must be a known key (``--free.KEY=value`` otherwise,
see :mod:`recbole_mm.config.validate`).
"""

import argparse
import sys

from recbole_mm.config.validate import check_cli_overrides
from recbole_mm.quick_start.tuning import ALGOS, hyperopt_tune, ray_tune, read_params_file
from recbole_mm.registry import resolve_model_name


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", type=str, default=None, help="model name (or set it in a config file)")
    parser.add_argument("--dataset", "-d", type=str, default=None, help="dataset name (or set it in a config file)")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files (space separated)")
    parser.add_argument("--params_file", type=str, required=True, help="search space, RecBole's params format")
    parser.add_argument("--output_file", type=str, default="hyper_result.json", help="JSON: every trial and the best")
    parser.add_argument("--display_file", type=str, default=None, help="plotly HTML of the search (hyperopt)")
    parser.add_argument("--tool", type=str, default="Hyperopt", choices=["Hyperopt", "Ray"], help="tuning tool")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=ALGOS, help="search algorithm")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random/bayes")
    parser.add_argument("--early_stop", type=int, default=10, help="hyperopt: trials without progress before stopping")
    parser.add_argument("--search_seed", type=int, default=2020, help="seed of the search itself")
    parser.add_argument("--ray_address", type=str, default=None, help="a running Ray cluster (default: local Ray)")
    parser.add_argument("--cpus_per_trial", type=float, default=1, help="Ray: CPUs per trial")
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="Ray: GPUs per trial")
    return parser


def fixed_settings(args, extra):
    """``--model``/``--dataset`` and every other ``--key=value`` as one config dict (RecBole's
    ``Config`` converts the strings). A key also searched in the params file is an error:
    RecBole's command-line layer outranks ``config_dict`` and would pin it in every trial."""
    fixed = {k: v for k, v in (("model", args.model), ("dataset", args.dataset)) if v}
    try:
        if args.model:
            fixed["model"] = resolve_model_name(args.model)
        # with the model or dataset only in a config file, only the form --key=value is checked
        known_for = (fixed["model"], args.dataset) if args.model and args.dataset else (None, None)
        fixed.update(check_cli_overrides(extra, *known_for))
    except ValueError as err:
        raise SystemExit(f"run_hyper.py: {err}") from None
    searched = {name for name, _, _ in read_params_file(args.params_file)}
    clash = sorted(searched & set(fixed))
    if clash:
        raise SystemExit(f"run_hyper.py: {clash} are searched in {args.params_file}; do not also fix them on the command line")
    return fixed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = build_parser().parse_known_args(argv)
    fixed = fixed_settings(args, extra)
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.tool == "Ray":
        result = ray_tune(fixed, args.params_file, config_files, algo=args.algo, max_evals=args.max_evals,
                          seed=args.search_seed, output_file=args.output_file, ray_address=args.ray_address,
                          cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
        best = result["best"]
    else:
        best = hyperopt_tune(fixed, args.params_file, config_files, algo=args.algo, max_evals=args.max_evals,
                             early_stop=args.early_stop, seed=args.search_seed, output_file=args.output_file,
                             display_file=args.display_file).best_trial()
    print("best params:", best and best["params"])
    print("best result:", best)
    print("all trials:", args.output_file)
    return best
