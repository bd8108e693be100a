"""``Config``: RecBole's configurator with recbole-mm's YAML layers and dataset search.

Order, lowest priority first (RecBole's own order, with our files inserted as internal
defaults right after RecBole's):

1. RecBole's internal files (``overall.yaml``, ``model/<M>.yaml``, ``dataset/<ds>.yaml``, and the
   model-type quick-start files such as ``sequential.yaml``);
2. recbole-mm's ``properties/overall.yaml``, ``properties/model/<M>.yaml``,
   ``properties/dataset/<ds>.yaml``;
3. the user's ``config_file_list``, then ``config_dict``, then ``--key=value`` on the command line
   (``--free.KEY=value`` sets ``KEY``: see :mod:`recbole_mm.config.validate`).

Every value is then checked against :mod:`recbole_mm.config.validate`'s table.

A dataset YAML with ``view_of: <source>`` makes a dataset view (:mod:`recbole_mm.data.locate`):
the source's YAML is read before the view's own.

``train_neg_sample_args`` defaults to ``None`` for cross-entropy models (RecBole 1.2.1 refuses
its own default for them). ``data_path`` is then resolved by :func:`recbole_mm.data.locate.find_dataset`, so
``--dataset=amazon-beauty`` is found in ``dataset/`` or ``../shared/data/`` without copying.

Distributed runs (``run(nproc=N)``, ``--world_size``/``--ip``/``--port``/``--group_offset``) use
RecBole's own path; on a machine without CUDA (or with ``use_gpu: False``) the process group is
gloo on the CPU instead of RecBole's hard-coded nccl on ``cuda:<local_rank>``.
"""

import torch
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_mm.config.properties import properties_dir
from recbole_mm.config.validate import FREE_PREFIX, check_values
from recbole_mm.data.locate import cache_root, dataset_view, find_dataset
from recbole_mm.registry import get_model


def _view_source(dataset_file):
    """``view_of`` of a dataset YAML file (``None`` when absent): the dataset it is a view of
    (:func:`recbole_mm.data.locate.dataset_view`)."""
    if not dataset_file.is_file():
        return None
    with open(dataset_file) as f:
        return (yaml.safe_load(f) or {}).get("view_of")


class Config(RecBoleConfig):
    def _load_cmd_line(self):
        # ``--free.KEY=value`` is ``--KEY=value`` that the entry points' strict check lets through
        cmd = super()._load_cmd_line()
        return {k[len(FREE_PREFIX):] if k.startswith(FREE_PREFIX) else k: v for k, v in cmd.items()}

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):  # resolve through the registry: ours first, clear error if unknown
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        dataset_files = [props / "dataset" / f"{dataset}.yaml"]
        source = _view_source(dataset_files[0])
        if source:  # a view reads its source's settings first, then its own
            dataset_files.insert(0, props / "dataset" / f"{source}.yaml")
        for file in (props / "overall.yaml", props / "model" / f"{model}.yaml", *dataset_files):
            if file.is_file():
                loaded = self._update_internal_config_dict(str(file)) or {}
                if file.parent.name == "dataset":
                    # RecBole compares these keys to decide whether a saved dataset is reusable.
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    def _set_default_parameters(self):
        # RecBole 1.2.1's overall.yaml samples one negative per positive, while its CE models
        # (SASRec, BERT4Rec, GRU4Rec, FindRec) refuse any: `run_recbole.py --model=SASRec` fails
        # unless the user passes train_neg_sample_args=None. Do that for them, unless they chose.
        if self.final_config_dict.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()
        user_path = self.external_config_dict.get("data_path")
        source = self.final_config_dict.get("view_of")
        if source:
            folder = dataset_view(self.dataset, find_dataset(source, user_path), source,
                                  cache_root(self.final_config_dict))
        else:
            folder = find_dataset(self.dataset, user_path)
        self.final_config_dict["data_path"] = str(folder)
        check_values(self.final_config_dict, self.model)

    def _init_device(self):
        # RecBole 1.2.1 starts every distributed worker with backend="nccl" on cuda:<local_rank>
        # and asserts one gpu_id per process, so DDP cannot run on a CPU machine at all. There,
        # join the same process group with gloo on the CPU; CUDA runs keep RecBole's own path.
        cfg = self.final_config_dict
        if not torch.cuda.is_available():
            cfg["use_gpu"] = False  # RecBole's default True would be printed on a CPU-only machine
        if "local_rank" not in cfg or (torch.cuda.is_available() and cfg["use_gpu"]):
            return super()._init_device()
        cfg["gpu_id"] = ""  # what RecBole's single-process path reads as "CPU"
        torch.distributed.init_process_group(
            backend="gloo", rank=cfg["local_rank"] + cfg["offset"], world_size=cfg["world_size"],
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}")
        cfg["device"] = torch.device("cpu")
        cfg["single_spec"] = False
        if cfg["local_rank"] != 0:  # as RecBole: only rank 0 logs and shows progress
            cfg.update(state="error", show_progress=False, verbose=False)
