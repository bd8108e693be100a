"""Run any recbole-mm or RecBole model: RecBole's run_recbole.py flags plus --key=value settings.

    python run_recbole_mm.py --model=FindRec --dataset=amazon-beauty
    python run_recbole_mm.py --model=SASRec --dataset=amazon-beauty --epochs=5
    python run_recbole_mm.py --model=LightGCN --dataset=tiktok --config_files="a.yaml b.yaml"
    python run_recbole_mm.py --model=SASRec --dataset=ml-100k --resume=saved/SASRec-Dec-01-2026_05-00-00.pth

Any other ``--key=value`` sets a configuration key (the highest-priority layer, as in RecBole).
The key must be one that RecBole's, recbole-mm's, the model's or the dataset's YAML files know:
an unknown one stops the run with the nearest known keys; ``--free.KEY=value`` sets ``KEY``
anyway. ``--resume=<checkpoint>`` continues a run from its checkpoint.

    python run_recbole_mm.py benchmark --models SASRec GRU4Rec --dataset amazon-beauty --seeds 3

runs the side-by-side benchmark instead (``python run_recbole_mm.py benchmark --help``).
"""

import argparse
import sys

from recbole_mm.config.validate import ConfigError, check_cli_overrides
from recbole_mm.quick_start import run
from recbole_mm.registry import resolve_model_name

EPILOG = """\
configuration:
  --key=value           set any configuration key RecBole, recbole-mm, the model or the dataset
                        knows (e.g. --epochs=5 --learning_rate=1e-3 --modalities="['image']");
                        unknown keys are refused with the nearest known ones
  --free.KEY=value      set KEY even though no configuration file knows it

subcommand:
  benchmark ...         models side by side on one split (run_recbole_mm.py benchmark --help)

Logs go to ./log/<model>/ and checkpoints to checkpoint_dir (default ./saved/); both paths are
printed when the run starts."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="BPR", help="name of models")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of datasets")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space separated)")
    parser.add_argument("--resume", type=str, default=None, metavar="CHECKPOINT",
                        help="continue the run saved in CHECKPOINT (same configuration)")
    parser.add_argument("--nproc", type=int, default=1, help="the number of process in this group")
    parser.add_argument("--ip", type=str, default="localhost", help="the ip of master node")
    parser.add_argument("--port", type=str, default="5678", help="the port of master node")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of jobs")
    parser.add_argument("--group_offset", type=int, default=0, help="the global rank offset of this group")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["benchmark"]:
        from recbole_mm.benchmark import main as benchmark

        raise SystemExit(benchmark(argv[1:]))
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        args.model = resolve_model_name(args.model)
        check_cli_overrides(rest, args.model, args.dataset)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    try:
        return run(args.model, args.dataset, config_file_list=config_file_list, nproc=args.nproc,
                   world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset,
                   resume=args.resume)
    except ConfigError as err:  # a value out of range, from any layer: raised as the Config is built
        parser.error(str(err))


if __name__ == "__main__":
    main()
