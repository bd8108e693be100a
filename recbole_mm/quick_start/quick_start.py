"""Entry points, identical in signature and result to RecBole's ``recbole.quick_start``.

``run`` and ``run_recbole`` are RecBole's own functions: after :func:`recbole_mm.registry.register_into_recbole`
they resolve models, ``Config`` and datasets through recbole-mm's registry. Only two functions
differ from RecBole's:

* :func:`run_recboles` — the ``mp.spawn`` target of ``run(nproc>1)``; it lives here so that each
  worker process imports (and so registers) recbole-mm before it builds a ``Config``;
* :func:`load_data_and_model` — loads the checkpoint with ``weights_only=False`` (RecBole's
  checkpoints pickle their ``Config``; torch >= 2.6 refuses them by default) and onto the CPU
  first, so a checkpoint saved on a GPU opens on a CPU-only machine.
"""

from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.quick_start.quick_start import run, run_recbole
from recbole.utils import init_logger, init_seed

__all__ = ["run", "run_recbole", "run_recboles", "load_data_and_model", "build_data_and_model"]


def run_recboles(rank, *args):
    """Worker of ``run(nproc=N)``: args are ``(model, dataset, config_file_list, kwargs)``."""
    kwargs = dict(args[-1])
    kwargs["config_dict"] = {**(kwargs.get("config_dict") or {}), "local_rank": rank}
    return run_recbole(*args[:3], **kwargs)


def build_data_and_model(config, split_seed=None):
    """RecBole's run order through the registry: the dataset built and split under ``split_seed``
    (default ``config['seed']``), then the model initialised under ``config['seed']``.
    Returns ``dataset, train_data, valid_data, test_data, model``."""
    from recbole_mm.registry import create_dataset, get_model

    init_seed(config["seed"] if split_seed is None else split_seed, config["reproducibility"])
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return dataset, train_data, valid_data, test_data, model


def load_data_and_model(model_file):
    """Like RecBole's: returns ``config, model, dataset, train_data, valid_data, test_data``."""
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    init_logger(config)
    getLogger().info(config)
    dataset, train_data, valid_data, test_data, model = build_data_and_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
