"""Entry points with the signatures of RecBole's ``recbole.quick_start``.

* :func:`run_recbole` — RecBole's train-then-test run, plus ``resume`` (continue from a
  checkpoint exactly as the interrupted run would have, see
  :func:`recbole_mm.utils.resume_training`), the log file and checkpoint paths printed when it
  starts, and results as plain numbers (``recall@10 : 0.0734``, dicts of floats);
* :func:`run` — :func:`run_recbole` in this process, or RecBole's own multi-process path;
* :func:`run_recboles` — the ``mp.spawn`` target of ``run(nproc>1)``; it lives here so that each
  worker process imports (and so registers) recbole-mm before it builds a ``Config``;
* :func:`load_data_and_model` — RecBole's, loading onto the CPU first (a GPU checkpoint opens on
  a CPU-only machine), naming the file when it is unreadable and warning when the feature files
  changed since it was saved.
"""

import logging
import os
import sys
from logging import getLogger

import torch.distributed as dist
from recbole.quick_start.quick_start import run as recbole_run
from recbole.utils import dict2str, get_environment, init_logger, set_color

from recbole_mm.config import Config
from recbole_mm.registry import get_trainer
from recbole_mm.utils import build_data_and_model, load_checkpoint, plain, resume_training, warn_if_features_changed

__all__ = ["run", "run_recbole", "run_recboles", "load_data_and_model", "build_data_and_model"]


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip="localhost", port="5678", group_offset=0, resume=None):
    """RecBole's ``run``; a single process runs :func:`run_recbole` (with ``resume``)."""
    if nproc == 1 and world_size <= 0:
        return run_recbole(model, dataset, config_file_list, config_dict, saved, resume=resume)
    if resume:
        raise ValueError("resume is supported for single-process runs only")
    return recbole_run(model, dataset, config_file_list, config_dict, saved, nproc, world_size, ip, port, group_offset)


def _log_file() -> str:
    files = [h.baseFilename for h in getLogger().handlers if isinstance(h, logging.FileHandler)]
    return files[-1] if files else "(none)"


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None,
                resume=None):
    """Train and test one model; returns ``best_valid_score``, ``valid_score_bigger``,
    ``best_valid_result`` and ``test_result`` as plain numbers. ``resume``: a checkpoint of an
    earlier run with the same configuration to continue from."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    _, train_data, valid_data, test_data, model = build_data_and_model(config)
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if resume:
        resume_training(trainer, train_data, resume)
    if config["local_rank"] in (None, 0):
        print(f"recbole-mm: {config['model']} on {config['dataset']}; log {_log_file()}; "
              f"checkpoint {os.path.abspath(trainer.saved_model_file) if saved else '(not saved)'}", flush=True)

    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=saved,
                                                      show_progress=config["show_progress"])
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    result = plain({"best_valid_score": best_valid_score, "valid_score_bigger": config["valid_metric_bigger"],
                    "best_valid_result": best_valid_result, "test_result": test_result})
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(result['best_valid_result'] or {})}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(result['test_result'])}")
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def run_recboles(rank, *args):
    """Worker of ``run(nproc=N)``: args are ``(model, dataset, config_file_list, kwargs)``."""
    kwargs = dict(args[-1])
    kwargs["config_dict"] = {**(kwargs.get("config_dict") or {}), "local_rank": rank}
    return run_recbole(*args[:3], **kwargs)


def load_data_and_model(model_file):
    """Like RecBole's: returns ``config, model, dataset, train_data, valid_data, test_data``."""
    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    init_logger(config)
    getLogger().info(config)
    warn_if_features_changed(checkpoint, config, model_file)
    dataset, train_data, valid_data, test_data, model = build_data_and_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
