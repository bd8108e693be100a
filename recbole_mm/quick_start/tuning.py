"""Hyperparameter search for any model the registry knows (FindRec, MambaRec, RecBole's own).

Two backends read the same params files (RecBole's format, one ``name type values`` per line:
``choice``, ``uniform``, ``quniform``, ``loguniform``; see ``properties/hyper/``):

* hyperopt (RecBole's :class:`recbole.trainer.HyperTuning`): ``exhaustive``, ``random`` or
  ``bayes`` (TPE), one trial after the other in this process. :class:`HyperTuning` adds a seed
  for the search itself (hyperopt's ``rstate``: the same seed proposes the same trials) and a
  JSON result file with every trial and the best;
* Ray Tune (:func:`ray_tune`, optional extra ``[ray]``, imported only there): the same space as
  Ray trials, locally or on a running cluster, with ASHA stopping trials early on the
  validation metric that each epoch reports.

Both run :func:`objective_function`, RecBole's objective through the registry, minus RecBole's
unconditional ``tune.report`` (which raises without Ray) and plus a per-epoch callback.
"""

import json
import math
import os
from logging import getLogger

import numpy as np
from recbole.trainer.hyper_tuning import HyperTuning as RecBoleHyperTuning
from recbole.utils import init_logger

from recbole_mm.config import Config
from recbole_mm.registry import get_trainer
from recbole_mm.utils import build_data_and_model, plain

ALGOS = ("exhaustive", "random", "bayes")


def objective_function(config_dict=None, config_file_list=None, saved=True, callback_fn=None):
    """Train and test one configuration; returns RecBole's objective result
    (``model``, ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``). ``callback_fn(epoch_idx, valid_score)`` runs after every validation."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    logger = getLogger()
    for handler in logger.handlers[:]:  # one log file per trial, not one more handler per trial
        logger.removeHandler(handler)
    init_logger(config)
    _, train_data, valid_data, test_data, model = build_data_and_model(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=False, saved=saved, callback_fn=callback_fn)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


class FixedObjective:
    """The objective with fixed settings (model, dataset, overrides) under every trial's
    parameters; picklable, so Ray can ship it to its workers."""

    def __init__(self, fixed_config=None):
        self.fixed_config = dict(fixed_config or {})

    def __call__(self, params, config_file_list=None, callback_fn=None):
        return objective_function({**self.fixed_config, **params}, config_file_list, callback_fn=callback_fn)


def write_result(output_file, trials, best, **header):
    """Write ``{**header, "trials": [...], "best": {...}}`` as JSON; returns the dict."""
    result = plain({**header, "trials": trials, "best": best})
    with open(output_file, "w") as f:
        json.dump(result, f, indent=2)
    return result


class HyperTuning(RecBoleHyperTuning):
    """RecBole's HyperTuning (hyperopt 0.2.5) with a repeatable search and a complete record.

    ``seed`` seeds hyperopt's ``rstate``, which draws the exhaustive search's order, the random
    search and TPE's proposals: the same seed and space give the same trials (and, with RecBole's
    ``reproducibility``, the same metrics). ``trials`` lists every trial in order, duplicates
    included (RecBole's ``params2result`` keeps one entry per distinct parameter string).
    """

    def __init__(self, objective_function, seed=2020, show_progress=False, **kwargs):
        super().__init__(objective_function, **kwargs)
        self.seed = seed
        self.show_progress = show_progress
        self.trials = []

    def trial(self, params):
        outcome = super().trial(params)
        result = self.params2result[self.params_list[-1]]
        self.trials.append({"params": dict(params), "best_valid_score": result["best_valid_score"],
                            "valid_result": result["best_valid_result"], "test_result": result["test_result"]})
        return outcome

    def run(self):
        from hyperopt import fmin

        fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals, early_stop_fn=self.early_stop_fn,
             rstate=np.random.RandomState(self.seed), show_progressbar=self.show_progress)
        if self.display_file is not None:
            self.plot_hyper()

    def best_trial(self):
        """The first trial with the best validation score (RecBole's ``best_params``)."""
        return next(t for t in self.trials if t["params"] == self.best_params)

    def export_result(self, output_file=None, **header):
        """JSON: ``{**header, "seed", "trials": [{params, best_valid_score, valid_result,
        test_result}, ...], "best": <the best trial>}``."""
        return write_result(output_file, self.trials, self.best_trial(), seed=self.seed, **header)


def hyperopt_tune(fixed_config, params_file, config_file_list=None, algo="exhaustive", max_evals=100,
                  early_stop=10, seed=2020, output_file=None, display_file=None):
    """Run the hyperopt search; returns the :class:`HyperTuning` (its result in ``output_file``)."""
    tuner = HyperTuning(FixedObjective(fixed_config), seed=seed, algo=algo, max_evals=max_evals,
                        early_stop=early_stop, params_file=params_file,
                        fixed_config_file_list=config_file_list, display_file=display_file)
    tuner.run()
    if output_file:
        tuner.export_result(output_file, tool="hyperopt", algo=algo, model=fixed_config.get("model"),
                            dataset=fixed_config.get("dataset"))
    return tuner


# ---------------------------------------------------------------- Ray Tune


def read_params_file(params_file):
    """``[(name, type, value_text), ...]`` of a RecBole params file (lines with fewer than three
    fields are skipped, as RecBole does)."""
    entries = []
    with open(params_file) as f:
        for line in f:
            fields = line.strip().split(" ")
            if len(fields) >= 3:
                entries.append((fields[0], fields[1], "".join(fields[2:])))
    return entries


def ray_param_space(tune, params_file, algo):
    """The params file as a Ray Tune space: ``choice`` becomes ``grid_search`` for the exhaustive
    algorithm (Ray then runs every combination once) and ``choice`` otherwise; ``loguniform``
    bounds are logs, as in hyperopt and RecBole's files."""
    space = {}
    for name, kind, text in read_params_file(params_file):
        if kind == "choice":
            values = eval(text)  # RecBole's format: a Python list literal
            space[name] = tune.grid_search(values) if algo == "exhaustive" else tune.choice(values)
            continue
        bounds = [float(v) for v in text.split(",")]
        if kind == "uniform":
            space[name] = tune.uniform(*bounds)
        elif kind == "quniform":
            space[name] = tune.quniform(*bounds)
        elif kind == "loguniform":
            space[name] = tune.loguniform(math.exp(bounds[0]), math.exp(bounds[1]))
        else:
            raise ValueError(f"Illegal param type [{kind}] for {name} in {params_file}")
    return space


class RayTrial:
    """A Ray Tune function trainable: reports ``valid_score`` after every validation (what ASHA
    compares) and the final ``best_valid_result`` / ``test_result``."""

    def __init__(self, objective, config_file_list=None):
        self.objective = objective
        self.config_file_list = config_file_list

    def __call__(self, params):
        from ray.air import session

        def report(epoch_idx, valid_score):
            session.report({"valid_score": float(valid_score), "epoch": epoch_idx})

        result = self.objective(params, self.config_file_list, callback_fn=report)
        session.report({"valid_score": float(result["best_valid_score"]), "completed": True,
                        "best_valid_result": plain(result["best_valid_result"]),
                        "test_result": plain(result["test_result"])})


def _absolute(path):
    return os.path.abspath(path) if path else path


def ray_tune(fixed_config, params_file, config_file_list=None, algo="exhaustive", max_evals=100, seed=2020,
             output_file=None, ray_address=None, num_cpus=None, cpus_per_trial=1, gpus_per_trial=0,
             grace_period=1, reduction_factor=2, storage_path="./ray_log"):
    """Run the search as Ray Tune trials with ASHA early stopping on the validation metric.

    ``ray_address`` joins a running cluster (every node needs recbole-mm and the dataset at the
    same path); ``None`` starts a local Ray. Trials run in their own folders, so the dataset
    path and config files are made absolute here. Returns the JSON-ready result dict.
    """
    from recbole_mm import compat

    tune = compat.enable_ray()  # ImportError with the reason when ray is missing or broken
    import ray
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.hyperopt import HyperOptSearch

    config_file_list = [_absolute(f) for f in config_file_list] if config_file_list else None
    config = Config(config_dict=fixed_config, config_file_list=config_file_list)
    # config["data_path"] is the dataset's own folder; data_path names the folder holding it
    fixed_config = {**fixed_config, "model": config["model"], "dataset": config["dataset"],
                    "data_path": os.path.dirname(_absolute(config["data_path"]))}
    mode = "max" if config["valid_metric_bigger"] else "min"
    if algo == "bayes":  # TPE over RecBole's own hyperopt space
        space = RecBoleHyperTuning._build_space_from_file(params_file)
        search_alg = HyperOptSearch(space, metric="valid_score", mode=mode, random_state_seed=seed)
        param_space, num_samples = {}, max_evals
    elif algo in ("exhaustive", "random"):
        search_alg = BasicVariantGenerator(random_state=seed)
        param_space = ray_param_space(tune, params_file, algo)
        num_samples = 1 if algo == "exhaustive" else max_evals
    else:
        raise ValueError(f"Illegal algo [{algo}]: one of {ALGOS}")
    scheduler = ASHAScheduler(metric="valid_score", mode=mode, max_t=max(config["epochs"], 1) + 1,
                              grace_period=grace_period, reduction_factor=reduction_factor)

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_address, num_cpus=num_cpus if ray_address is None else None, include_dashboard=False,
                 runtime_env=_ray_runtime_env(local=ray_address is None))
    try:
        analysis = tune.run(RayTrial(FixedObjective(fixed_config), config_file_list), config=param_space,
                            num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                            resources_per_trial={"cpu": cpus_per_trial, "gpu": gpus_per_trial},
                            storage_path=_absolute(storage_path), verbose=0, raise_on_failed_trial=False)
    finally:
        if started_here:
            ray.shutdown()
    trials = [_ray_trial_record(t) for t in analysis.trials]
    finished = [t for t in trials if t["completed"]]
    best = (max if mode == "max" else min)(finished, key=lambda t: t["best_valid_score"]) if finished else None
    header = dict(tool="ray", algo=algo, model=config["model"], dataset=config["dataset"], seed=seed)
    if output_file:
        return write_result(output_file, trials, best, **header)
    return plain({**header, "trials": trials, "best": best})


def _ray_runtime_env(local):
    """Ray workers run ``compat.ray_worker_setup_hook`` first. A local Ray also gets this
    process's recbole_mm on its ``PYTHONPATH``, so a source checkout works without installing;
    the nodes of a remote cluster need recbole-mm installed."""
    from recbole_mm import compat

    env = {"worker_process_setup_hook": compat.ray_worker_setup_hook()}
    if local:
        import recbole_mm

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(recbole_mm.__file__)))
        paths = [checkout] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["env_vars"] = {"PYTHONPATH": os.pathsep.join(paths)}
    return env


def _ray_trial_record(trial):
    """One Ray trial in the layout of :meth:`HyperTuning.export_result`; ``completed`` is false
    for trials ASHA stopped early (their score is the last validation they reported)."""
    last = trial.last_result or {}
    return {"params": {k: v for k, v in trial.config.items()}, "status": trial.status,
            "completed": bool(last.get("completed")), "best_valid_score": last.get("valid_score"),
            "valid_result": last.get("best_valid_result"), "test_result": last.get("test_result")}
