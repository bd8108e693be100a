"""The one registry: recbole-mm's models, datasets and trainers first, RecBole's second.

Every entry point of the package (``run_recbole_mm.py``, :mod:`recbole_mm.quick_start`, the
benchmark and tuning tools) resolves names here. :func:`register_into_recbole` — called once
by ``import recbole_mm`` — is the single, explicit step that makes RecBole's *own* entry points
(``recbole.quick_start.run_recbole``, ``run``, ``objective_function``/``run_hyper.py``,
``load_data_and_model``) find our models too. It does exactly this, nothing else:

1. exposes each of our model modules under RecBole's model namespace
   (``recbole.model.sequential_recommender.findrec``), which is where ``recbole.utils.get_model``
   looks;
2. adds ``<Model>Dataset`` classes to ``recbole.data.dataset`` and ``<Model>Trainer`` classes to
   ``recbole.trainer`` — RecBole's own per-model extension points;
3. binds ``Config``, ``create_dataset``, ``run_recboles`` and ``load_data_and_model`` in
   ``recbole.quick_start`` (and ``recbole.config.Config``) to recbole-mm's versions, so RecBole's
   runs read our YAML defaults, find datasets through our search order, load multimodal features,
   and start DDP workers that import recbole-mm.
"""

import contextlib
import importlib
import logging
import sys

import recbole.data.dataset as recbole_datasets
from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_mm.data.dataset import MMGeneralDataset, MMSequentialDataset

#: our models: name -> module (the class of the same name lives there)
MODELS = {
    "FindRec": "recbole_mm.model.sequential_recommender.findrec",
    "MambaRec": "recbole_mm.model.general_recommender.mambarec",
}
#: our trainers: model name -> "module:Class"; models not listed use RecBole's choice
TRAINERS = {"FindRec": "recbole_mm.trainer.findrec_trainer:FindRecTrainer"}
#: multimodal dataset class per model type
DATASETS = {ModelType.GENERAL: MMGeneralDataset, ModelType.SEQUENTIAL: MMSequentialDataset}
_MODEL_PACKAGE = {ModelType.GENERAL: "general_recommender", ModelType.SEQUENTIAL: "sequential_recommender"}

_registered = False


def model_names():
    return list(MODELS)


def get_model(model_name: str):
    """Model class by name: ours first, then RecBole's (``ValueError`` if neither has it)."""
    if model_name in MODELS:
        return getattr(importlib.import_module(MODELS[model_name]), model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ImportError) as err:
        # RecBole's lookup of an unknown name ends by importing its exlib package, which fails
        # on a missing xgboost/lightgbm instead of saying the name is unknown.
        raise ValueError(f"`model_name` [{model_name}] is not the name of an existing model: not one of "
                         f"recbole-mm's {list(MODELS)} nor found among RecBole's ({err})") from err


def get_trainer(model_type, model_name: str):
    if model_name in TRAINERS:
        module, cls = TRAINERS[model_name].split(":")
        return getattr(importlib.import_module(module), cls)
    return recbole_get_trainer(model_type, model_name)


def get_dataset_class(config):
    """The multimodal class when the model is ours or the data asks for features or a label
    split (so RecBole baselines share our models' exact data and split); else ``None``, meaning
    RecBole's own choice."""
    wants_mm = config["model"] in MODELS or config["modalities"] or config["split_label_field"]
    if not wants_mm:
        return None
    if config["MODEL_TYPE"] not in DATASETS:
        raise ValueError(
            f"{config['model']} is a {config['MODEL_TYPE'].name} model; multimodal features and "
            f"split_label_field are supported for general and sequential models only")
    return DATASETS[config["MODEL_TYPE"]]


@contextlib.contextmanager
def _dataset_class_for(model_name, cls):
    """RecBole's ``create_dataset`` picks ``recbole.data.dataset.<Model>Dataset`` when it exists;
    offer ``cls`` there for the duration of one call (keeps RecBole's saved-dataset logic)."""
    name = f"{model_name}Dataset"
    previous = recbole_datasets.__dict__.get(name)
    setattr(recbole_datasets, name, cls)
    try:
        yield
    finally:
        if previous is None:
            delattr(recbole_datasets, name)
        else:
            setattr(recbole_datasets, name, previous)


def create_dataset(config):
    cls = get_dataset_class(config)
    if cls is None:
        return recbole_create_dataset(config)
    with _dataset_class_for(config["model"], cls):
        return recbole_create_dataset(config)


def register_into_recbole():
    """See the module docstring. Idempotent."""
    global _registered
    if _registered:
        return
    from recbole_mm import quick_start
    from recbole_mm.config import Config

    import recbole.config
    import recbole.quick_start
    import recbole.trainer
    rb_quick_start = sys.modules["recbole.quick_start.quick_start"]

    for name in MODELS:
        cls = get_model(name)
        package = f"recbole.model.{_MODEL_PACKAGE[cls.type]}"
        sys.modules[f"{package}.{name.lower()}"] = sys.modules[cls.__module__]
        setattr(importlib.import_module(package), name, cls)
        setattr(recbole_datasets, f"{name}Dataset", DATASETS[cls.type])
    for name in TRAINERS:
        setattr(recbole.trainer, f"{name}Trainer", get_trainer(None, name))

    recbole.config.Config = Config
    for module in (rb_quick_start, recbole.quick_start):
        module.load_data_and_model = quick_start.load_data_and_model
        module.run_recboles = quick_start.run_recboles
    rb_quick_start.Config = Config
    rb_quick_start.create_dataset = create_dataset
    _registered = True
    logging.getLogger(__name__).debug(f"recbole-mm registered {list(MODELS)} into RecBole")
