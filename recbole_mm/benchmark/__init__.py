"""Side-by-side benchmark of recbole-mm's and RecBole's models on one dataset and split.

    python -m recbole_mm.benchmark --models FindRec SASRec BERT4Rec GRU4Rec --dataset amazon-beauty --seeds 3
    python -m recbole_mm.benchmark --suite benchmarks/suites/findrec-table2-beauty.yaml
    python -m recbole_mm.benchmark --models BPR MambaRec --dataset tiktok --quick --epochs=1

Every model x seed runs in a process of its own (:mod:`~recbole_mm.benchmark.worker`) through the
registry and RecBole's trainer and full-ranking evaluator; finished runs go to
``<out>/results.csv`` one by one, keyed by ``(model, seed, config_hash)``, so a rerun of the same
command skips them (:mod:`~recbole_mm.benchmark.store`). The plan comes from ``--models`` or a
suite file (:mod:`~recbole_mm.benchmark.plan`); :mod:`~recbole_mm.benchmark.report` writes
``<out>/<suite>.md`` (mean ± std, significance against a reference, the paper's numbers) and
PNG plots; :mod:`~recbole_mm.benchmark.quick` is the ``--quick`` smoke test of the harness.

Runs are forked from a ``multiprocessing`` forkserver, which re-imports the calling program's
main module: call :func:`main` from a script only under ``if __name__ == "__main__":``.
"""

from recbole_mm.benchmark.cli import main

__all__ = ["main"]
