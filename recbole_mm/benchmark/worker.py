"""One benchmark run, in a process of its own (:func:`run_to_files`).

A process per run is what makes peak memory a per-run figure and lets a crash cost one run, not
the benchmark. The benchmark forks each run from a server process that has imported this module
once (``multiprocessing``'s forkserver), so a run does not pay the seconds of importing torch and
RecBole; the run's peak RSS therefore includes those imports, as a fresh process's would. The run is RecBole's ``run_recbole`` pipeline — ``Config``,
``create_dataset``, ``data_preparation``, the model's own trainer's ``fit`` and ``evaluate`` —
with three differences:

* the data is built and split under the fixed ``split_seed`` and everything after (model init,
  shuffling, negative sampling) under the run's ``seed``, so a random 8:1:1 split is identical
  for every model and seed (leave-one-out splits do not depend on a seed at all); the worker
  writes a fingerprint of the valid and test interactions (``split_hash``) to prove it;
* the trainer class is the model's own (the registry's choice) extended by :class:`_Measured`,
  which times each training epoch and keeps the per-user ranking data of the last evaluation;
* after RecBole's test evaluation of the best checkpoint, a second full-ranking pass over the
  test users is timed (``inference_s``): the first one warms up, and evaluation caches are
  dropped before the second, so graph models propagate inside the timed pass.

The result is a JSON object (one CSV row) and an ``.npz`` of per-user test metrics.

Given a ``checkpoint_dir`` of its own (the harness gives each run ``<out>/checkpoints/<run>/`` and
deletes it once the row is written), a run that finds a checkpoint there continues from it
(:func:`recbole_mm.utils.resume_training`: the same model, optimizer, generators and
early-stopping state) instead of starting again. RecBole saves only at a new best validation; the
worker also saves after every other validation, to :data:`LAST_CHECKPOINT` in the same folder, so
an interrupted run repeats at most the epochs since its last validation (not all since its best)
and ends exactly as it would have uninterrupted. Its row says so (``resumed_at_epoch``); ``epochs_run`` counts every epoch, while
``train_s_per_epoch`` and ``run_s`` are this process's.

Cold-start runs (``cold_item_ratio`` set, :mod:`recbole_mm.data.cold_start`) add the test metrics
on the interactions whose target item is warm (had training interactions) and on those whose
target is cold, each ranking all items, from the best checkpoint: columns ``warm_<metric>`` and
``cold_<metric>`` beside ``test_<metric>`` (e.g. ``warm_recall@20``, ``cold_recall@20``; ``nan``
for a group without test interactions), plus ``cold_items`` (items held out of training) and
``warm_targets`` / ``cold_targets`` (test interactions of each group). Other runs' rows have none
of these columns.
"""

import hashlib
import inspect
import json
import os
import resource
import sys
import tempfile
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from recbole.evaluator.base_metric import TopkMetric
from recbole.utils import init_logger

import recbole_mm  # noqa: F401  (compat fixes and registration, as for any run)
from recbole_mm.benchmark.plan import Run, build_config, config_hash
from recbole_mm.data.cold_start import cold_targets, evaluate_warm_cold
from recbole_mm.evaluation.topk import TopKCollector
from recbole_mm.utils import build_data_and_model, resume_training
from recbole_mm.registry import get_trainer


class _UserCollector(TopKCollector):
    """The evaluation's collector (RecBole's dense path and the blocked one) that also keeps, for
    the last evaluation, the user of every ranking row and the collected data: per-user metrics
    need both (RecBole only keeps the mean)."""

    def __init__(self, config):
        super().__init__(config)
        self._batch_users = []
        self.users = self.last_struct = None

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        self._keep_users(interaction)

    def eval_topk_collect(self, topk_ids, interaction, positive_u, positive_i, n_items):
        super().eval_topk_collect(topk_ids, interaction, positive_u, positive_i, n_items)
        self._keep_users(interaction)

    def _keep_users(self, interaction):
        """The users of a batch's ranking rows, in row order (either path)."""
        self._batch_users.append(interaction[self.config["USER_ID_FIELD"]].cpu())

    def get_data_struct(self):
        self.last_struct = super().get_data_struct()
        self.users, self._batch_users = torch.cat(self._batch_users).numpy(), []
        return self.last_struct


class _Measured:
    """Mixin over the model's own trainer: per-epoch training time and per-user test metrics."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = _UserCollector(config)
        self.epoch_seconds = []

    def _train_epoch(self, *args, **kwargs):
        start = _clock(self.device)
        loss = super()._train_epoch(*args, **kwargs)
        self.epoch_seconds.append(_clock(self.device) - start)
        return loss

    def per_user_metrics(self):
        """``{'ndcg@10': array over users, ...}`` for the top-k metrics of the last evaluation."""
        struct, values = self.eval_collector.last_struct, {}
        for name, metric in self.evaluator.metric_class.items():
            if not isinstance(metric, TopkMetric):
                continue
            pos_index, pos_len = metric.used_info(struct)
            # Hit/MRR/Precision take the hit matrix only; NDCG/Recall/MAP also the positives' count
            args = (pos_index, pos_len)[:len(inspect.signature(metric.metric_info).parameters)]
            table = metric.metric_info(*args)
            values.update({f"{name}@{k}": table[:, k - 1] for k in metric.topk})
        return values


def _clock(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait before reading the time
    return time.perf_counter()


def split_hash(config, *loaders) -> str:
    """Fingerprint of the (user, item) pairs of the given evaluation loaders."""
    digest = hashlib.sha256()
    for loader in loaders:
        inter = loader._dataset.inter_feat
        for field in (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]):
            digest.update(inter[field].numpy().tobytes())
    return digest.hexdigest()[:12]


def _drop_eval_caches(model):
    # RecBole's graph models keep propagated embeddings in `restore_*` attributes and even restore
    # them from the checkpoint; without them the timed pass computes from the weights, as a
    # model serving fresh requests would, the same for every model.
    for name in list(vars(model)):
        if name.startswith("restore_"):
            setattr(model, name, None)


def _peaks(device):
    """Peak resident set size of this process and (on a GPU) peak allocated CUDA memory, in MB."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else float("nan")
    return rss_mb, cuda_mb


def _warm_cold_columns(trainer, test_data) -> dict:
    """The cold-start columns of the row (module docstring), from the weights the trainer holds."""
    dataset = test_data._dataset
    is_cold = cold_targets(dataset)
    report = evaluate_warm_cold(trainer, test_data)
    columns = {"cold_items": len(dataset.cold_items), "warm_targets": int((~is_cold).sum()),
               "cold_targets": int(is_cold.sum())}
    metrics = next(v for v in report.values() if v is not None)  # a split has targets in some group
    for group, result in report.items():
        columns.update({f"{group}_{k}": float(result[k]) if result else float("nan") for k in metrics})
    return columns


def run(spec: Run, checkpoint_dir=None) -> dict:
    """Train and test one run; returns the CSV row and the per-user test metrics. Without a
    ``checkpoint_dir`` the best checkpoint lives in a temporary folder as long as the run."""
    config = build_config(spec)
    digest = config_hash(config, spec.split_seed)
    if digest != spec.config_hash:  # resume matches rows by this hash: it must be reproducible
        raise RuntimeError(f"config hash {digest} differs from the planned {spec.config_hash}: "
                           "the effective config is not deterministic")
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        config["checkpoint_dir"] = str(checkpoint_dir)
        return _train_and_test(spec, config, resume_from(checkpoint_dir), keep_last=True)
    with tempfile.TemporaryDirectory(prefix="recbole-mm-bench-") as folder:
        config["checkpoint_dir"] = folder
        return _train_and_test(spec, config)


#: the run's state after its latest validation, beside RecBole's best-epoch checkpoint
LAST_CHECKPOINT = "last.pth"


def resume_from(checkpoint_dir):
    """The newest checkpoint an interrupted run left in its own folder (:data:`LAST_CHECKPOINT`
    once a validation has followed the best one), or ``None``."""
    saved = sorted(Path(checkpoint_dir).glob("*.pth"), key=lambda path: path.stat().st_mtime)
    return str(saved[-1]) if saved else None


def _save_last(trainer, epoch) -> None:
    """The trainer's whole state after ``epoch``'s validation, to :data:`LAST_CHECKPOINT` through a
    temporary file, so that a crash while saving leaves the previous one whole."""
    last = Path(trainer.saved_model_file).with_name(LAST_CHECKPOINT)
    partial = last.with_suffix(".partial")  # not *.pth: resume_from never picks it
    trainer._save_checkpoint(epoch, verbose=False, saved_model_file=str(partial))
    os.replace(partial, last)


def _train_and_test(spec: Run, config, resume=None, keep_last=False) -> dict:
    started = time.perf_counter()
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    _, train_data, valid_data, test_data, model = build_data_and_model(config, split_seed=spec.split_seed)
    trainer_class = get_trainer(config["MODEL_TYPE"], config["model"])
    trainer = type(f"Measured{trainer_class.__name__}", (_Measured, trainer_class), {})(config, model)
    if resume:
        try:
            resume_training(trainer, train_data, resume)
        except Exception as err:  # unreadable, or saved by model code whose parameters have changed
            raise RuntimeError(f"cannot continue this run from {resume} ({type(err).__name__}: {err}); delete "
                               f"{Path(resume).parent} to start it afresh") from err
        logger.info(f"resumed from {resume} at epoch {trainer.start_epoch}")

    validated = []

    def after_validation(epoch, score):  # RecBole calls it once early stopping has counted the epoch
        validated.append(epoch)
        # not after a new best (cur_step 0): RecBole's own checkpoint, just written, holds that state
        # and is the newer file; nor after the run's final validation: resumed from there, fit would
        # have no epoch left to report (best_epoch) or would train one past the stop, so the resumed
        # run repeats that epoch
        final = trainer.cur_step > trainer.stopping_step or epoch + 1 >= trainer.epochs
        if keep_last and trainer.cur_step > 0 and not final:
            _save_last(trainer, epoch)

    _, best_valid = trainer.fit(train_data, valid_data, show_progress=config["show_progress"],
                                callback_fn=after_validation)
    test_result = trainer.evaluate(test_data, load_best_model=True)
    # before the timed pass: the per-user metrics are those of the last evaluation, all test users
    warm_cold = _warm_cold_columns(trainer, test_data) if config["cold_item_ratio"] else {}
    _drop_eval_caches(model)
    start = _clock(config["device"])
    trainer.evaluate(test_data, load_best_model=False)
    inference_s = _clock(config["device"]) - start
    logger.info(f"best valid: {best_valid}  test: {test_result}")

    rss_mb, cuda_mb = _peaks(config["device"])
    row = {
        "label": spec.label, "model": spec.model, "dataset": spec.dataset, "seed": spec.seed,
        "config_hash": spec.config_hash, "split_hash": split_hash(config, valid_data, test_data),
        "device": str(config["device"]),
        # RecBole's own rule ("best eval result in epoch ..."): early stopping counts validations since the best
        "best_epoch": validated[-1] - trainer.cur_step * trainer.eval_step if validated else None,
        "epochs_run": trainer.start_epoch + len(trainer.epoch_seconds),
        "train_s_per_epoch": float(np.mean(trainer.epoch_seconds)),
        "inference_s": inference_s, "peak_rss_mb": rss_mb, "peak_cuda_mb": cuda_mb,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "test_users": len(trainer.eval_collector.users), "run_s": time.perf_counter() - started,
        **{f"valid_{k}": float(v) for k, v in (best_valid or {}).items()},
        **{f"test_{k}": float(v) for k, v in test_result.items()},
        **warm_cold,
        **({"resumed_at_epoch": trainer.start_epoch} if resume else {}),
    }
    return {"row": row, "per_user": {"user_id": trainer.eval_collector.users, **trainer.per_user_metrics()}}


def run_to_files(spec_file, result_file, per_user_file, log_file=None, checkpoint_dir=None):
    """Run the spec in ``spec_file``; write the CSV row (JSON) and the per-user metrics (.npz).
    With ``log_file``, everything the process prints (RecBole's log, tracebacks) is appended there:
    a resumed run's log continues the interrupted one's."""
    if log_file:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # file descriptors, not sys.stdout: C extensions and child loggers too
        os.dup2(fd, 2)
        os.close(fd)
    with open(spec_file) as f:
        result = run(Run.from_json(f.read()), checkpoint_dir)
    np.savez(per_user_file, **result["per_user"])
    # written last, whole or not at all: its presence means the run finished (cli.collect)
    partial = f"{result_file}.partial"
    with open(partial, "w") as f:
        json.dump(result["row"], f)
    os.replace(partial, result_file)


if __name__ == "__main__":  # rerun one planned run by hand: worker <out>/logs/<run>.json RESULT.json PER_USER.npz
    run_to_files(*sys.argv[1:4])
