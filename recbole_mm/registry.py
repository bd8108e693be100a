"""The one registry: recbole-mm's models, datasets and trainers first, RecBole's second.

Pure lookups: every entry point of the package (``run_recbole_mm.py``,
:mod:`recbole_mm.quick_start`, the benchmark and tuning tools) resolves names here, and
:func:`recbole_mm.compat.register_into_recbole` reads these tables to let RecBole's own entry
points find our models too. Nothing here changes RecBole's modules (``docs/design.md``
§package).
"""

import importlib
from functools import lru_cache
from pathlib import Path

from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_mm import compat
from recbole_mm.data.dataset import MMGeneralDataset, MMSequentialDataset, check_interaction_file
from recbole_mm.names import nearest
from recbole_mm.trainer.scale import with_scale_hooks

#: our models: name -> module (the class of the same name lives there)
MODELS = {
    "FindRec": "recbole_mm.model.sequential_recommender.findrec",
    "MambaRec": "recbole_mm.model.general_recommender.mambarec",
    "MGCN": "recbole_mm.model.general_recommender.mgcn",
    # baselines of FindRec's and MambaRec's Table 2
    "Mamba4Rec": "recbole_mm.model.sequential_recommender.mamba4rec",
    "Mamba4RecMM": "recbole_mm.model.sequential_recommender.mamba4recmm",
    "SASRecMM": "recbole_mm.model.sequential_recommender.sasrecmm",
    "MMMLP": "recbole_mm.model.sequential_recommender.mmmlp",
    "VBPR": "recbole_mm.model.general_recommender.vbpr",
    "FREEDOM": "recbole_mm.model.general_recommender.freedom",
}
#: our trainers: model name -> "module:Class"; models not listed use RecBole's choice
TRAINERS = {"FindRec": "recbole_mm.trainer.findrec_trainer:FindRecTrainer",
            "MambaRec": "recbole_mm.trainer.lr_decay_trainer:LRDecayTrainer",
            "MGCN": "recbole_mm.trainer.lr_decay_trainer:LRDecayTrainer"}
#: multimodal dataset class per model type
DATASETS = {ModelType.GENERAL: MMGeneralDataset, ModelType.SEQUENTIAL: MMSequentialDataset}
#: RecBole's package for each model type (where ``recbole.utils.get_model`` looks)
MODEL_PACKAGES = {ModelType.GENERAL: "general_recommender", ModelType.SEQUENTIAL: "sequential_recommender"}


def model_names():
    return list(MODELS)


@lru_cache(maxsize=1)
def recbole_model_names():
    """RecBole's model names: one ``properties/model/<Model>.yaml`` per model."""
    import recbole

    return sorted(p.stem for p in (Path(recbole.__file__).resolve().parent / "properties" / "model").glob("*.yaml"))


def resolve_model_name(model_name: str) -> str:
    """``model_name`` as spelled by its class: exact, else the one name equal ignoring case
    (``findrec`` -> ``FindRec``); ``ValueError`` offering the nearest names when none matches."""
    names = list(MODELS) + [n for n in recbole_model_names() if n not in MODELS]
    if model_name in names:
        return model_name
    same = [n for n in names if n.lower() == model_name.lower()]
    if len(same) == 1:
        return same[0]
    try:  # a RecBole model without a YAML file (Random)
        recbole_get_model(model_name)
        return model_name
    except (ValueError, ImportError, AttributeError):
        pass
    close = nearest(model_name, names)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model '{model_name}': {hint}recbole-mm's models are {list(MODELS)}; "
                     f"RecBole's are the names in recbole/properties/model/ ({len(recbole_model_names())} models)")


def get_model(model_name: str):
    """Model class by name (see :func:`resolve_model_name`): ours first, then RecBole's."""
    model_name = resolve_model_name(model_name)
    if model_name in MODELS:
        return getattr(importlib.import_module(MODELS[model_name]), model_name)
    return recbole_get_model(model_name)


def get_trainer(model_type, model_name: str):
    """The model's trainer (ours from :data:`TRAINERS`, else RecBole's choice) with the
    large-catalogue hooks in front (:func:`recbole_mm.trainer.scale.with_scale_hooks`: blocked
    top-k evaluation and chunked CE, each off unless its config key asks for it)."""
    if model_name in TRAINERS:
        module, cls = TRAINERS[model_name].split(":")
        trainer = getattr(importlib.import_module(module), cls)
    else:
        trainer = recbole_get_trainer(model_type, model_name)
    return with_scale_hooks(trainer)


def get_dataset_class(config):
    """The multimodal class when the model is ours or the data asks for features, a label split
    or cold-start items (so RecBole baselines share our models' exact data and split); else
    ``None``, meaning RecBole's own choice."""
    wants_mm = (config["model"] in MODELS or config["modalities"] or config["split_label_field"]
                or config["cold_item_ratio"])
    if not wants_mm:
        return None
    if config["MODEL_TYPE"] not in DATASETS:
        raise ValueError(
            f"{config['model']} is a {config['MODEL_TYPE'].name} model; multimodal features and "
            f"split_label_field are supported for general and sequential models only")
    return DATASETS[config["MODEL_TYPE"]]


def create_dataset(config):
    """RecBole's ``create_dataset`` after checking the atomic files, with our multimodal class
    offered where :func:`get_dataset_class` chooses it."""
    check_interaction_file(config)
    cls = get_dataset_class(config)
    if cls is None:
        return recbole_create_dataset(config)
    with compat.offered_dataset_class(config["model"], cls):
        return recbole_create_dataset(config)
