"""Data and model in RecBole's run order, through the registry."""

from logging import getLogger

import numpy as np
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_mm.data.cold_start import keep_out_of_negatives
from recbole_mm.registry import create_dataset, get_model


def build_data(config, split_seed=None):
    """The dataset built through the registry and split under ``split_seed`` (default
    ``config['seed']``). Returns ``dataset, train_data, valid_data, test_data``."""
    init_seed(config["seed"] if split_seed is None else split_seed, config["reproducibility"])
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    warn_about_split(dataset, valid_data, test_data)
    return dataset, train_data, valid_data, test_data


def build_data_and_model(config, split_seed=None):
    """RecBole's run order: :func:`build_data`, then the model initialised under ``config['seed']``.
    Returns ``dataset, train_data, valid_data, test_data, model``."""
    dataset, train_data, valid_data, test_data = build_data(config, split_seed)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    keep_out_of_negatives(train_data, model)
    return dataset, train_data, valid_data, test_data, model


def warn_about_split(dataset, valid_data, test_data) -> None:
    """Warn about what RecBole accepts without a word: users with a single interaction (a
    leave-one-out split has nothing to train on for them), and an empty validation or test part
    (RecBole then skips validation — no early stopping, the last epoch's weights are tested —
    or reports metrics of nothing)."""
    log = getLogger()
    counts = np.bincount(dataset.inter_feat[dataset.uid_field].numpy(), minlength=dataset.user_num)[1:]
    single = int((counts == 1).sum())
    if single:
        log.warning(f"{dataset.dataset_name}: {single} of {len(counts)} users have a single interaction "
                    "(filter them with user_inter_num_interval, e.g. '[2,inf)')")
    for part, data in (("validation", valid_data), ("test", test_data)):
        if data is not None and len(data._dataset) == 0:
            log.warning(f"{dataset.dataset_name}: the {part} part of the split is empty (eval_args: "
                        f"{dataset.config['eval_args']}, split_label_field: {dataset.config['split_label_field']})"
                        + ("; validation, early stopping and best-epoch selection are skipped"
                           if part == "validation" else ""))


def plain(value):
    """A result as plain Python: numpy scalars become floats, (Ordered)dicts dicts, tuples lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
