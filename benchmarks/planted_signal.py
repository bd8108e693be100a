"""FindRec on planted-signal data where the item features carry the signal and a fifth of the items
are cold, with and without feature_logits, each against its twin on noise features, and SASRec and
SASRec (MM) of the same width (the suite template benchmarks/findrec_planted.yaml).

    python benchmarks/planted_signal.py --out benchmarks/out/planted [--seeds 3] [--shard 1/2]

Writes the dataset (``<out>/data/planted``) and its noise twin (``<out>/data_noise/planted``: the
same interactions, each feature file replaced by standard Gaussian noise of the same shape), fills
the suite's ``${DATA}`` / ``${NOISE}``, and runs the benchmark harness on it: ``<out>/results.csv``
and the summary with the paired test over seeds and the per-user test.
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout being measured

SUITE = Path(__file__).resolve().parent / "findrec_planted.yaml"  # a template: ${DATA}, ${NOISE}


def make_data(out: Path, n_users: int, n_items: int, n_clusters: int, dims):
    from recbole_mm.data.synthetic import make_planted_dataset

    data, noise = out / "data", out / "data_noise"
    if not (data / "planted" / "planted.inter").is_file():
        make_planted_dataset(data, name="planted", n_users=n_users, n_items=n_items, n_clusters=n_clusters,
                             seq_len=12, dims=dims)
    if not (noise / "planted" / "planted.inter").is_file():
        shutil.copytree(data / "planted", noise / "planted", dirs_exist_ok=True)
        rng = np.random.default_rng(1)
        for feat in sorted((noise / "planted").glob("*_feat.npy")):
            shape = np.load(feat).shape
            np.save(feat, rng.normal(size=shape).astype(np.float32))
    return data.resolve(), noise.resolve()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-users", type=int, default=600)
    parser.add_argument("--n-items", type=int, default=1200, help="a multiple of --n-clusters")
    parser.add_argument("--n-clusters", type=int, default=60, help="cycles of n_items / n_clusters items")
    parser.add_argument("--dims", type=int, nargs=2, default=(96, 64), metavar=("IMAGE", "TEXT"),
                        help="feature widths; at least n_clusters + 2 keeps the latent factors recoverable")
    args, rest = parser.parse_known_args(argv)
    out = Path(args.out)
    data, noise = make_data(out, args.n_users, args.n_items, args.n_clusters, tuple(args.dims))
    suite = out / SUITE.name
    suite.write_text(SUITE.read_text().replace("${DATA}", str(data)).replace("${NOISE}", str(noise)))
    from recbole_mm.benchmark.cli import main as benchmark

    return benchmark(["--suite", str(suite), "--out", str(out), *rest])


if __name__ == "__main__":
    sys.exit(main())
