"""Run any recbole-mm or RecBole model: the same flags as RecBole's run_recbole.py.

    python run_recbole_mm.py --model=FindRec --dataset=amazon-beauty
    python run_recbole_mm.py --model=SASRec --dataset=amazon-beauty --epochs=5
    python run_recbole_mm.py --model=LightGCN --dataset=tiktok --config_files="a.yaml b.yaml"

Any other ``--key=value`` is read by RecBole's ``Config`` as a parameter override.

    python run_recbole_mm.py benchmark --models SASRec GRU4Rec --dataset amazon-beauty --seeds 3

runs the side-by-side benchmark instead (``python -m recbole_mm.benchmark --help``).
"""

import argparse
import sys

from recbole_mm.quick_start import run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["benchmark"]:
        from recbole_mm.benchmark import main as benchmark

        raise SystemExit(benchmark(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", type=str, default="BPR", help="name of models")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of datasets")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space separated)")
    parser.add_argument("--nproc", type=int, default=1, help="the number of process in this group")
    parser.add_argument("--ip", type=str, default="localhost", help="the ip of master node")
    parser.add_argument("--port", type=str, default="5678", help="the port of master node")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of jobs")
    parser.add_argument("--group_offset", type=int, default=0, help="the global rank offset of this group")
    args, _ = parser.parse_known_args(argv)

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    return run(args.model, args.dataset, config_file_list=config_file_list, nproc=args.nproc,
               world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)


if __name__ == "__main__":
    main()
