"""``Config``: RecBole's configurator with recbole-mm's YAML layers and dataset search.

Order, lowest priority first (RecBole's own order, with our files inserted as internal
defaults right after RecBole's):

1. RecBole's internal files (``overall.yaml``, ``model/<M>.yaml``, ``dataset/<ds>.yaml``, and the
   model-type quick-start files such as ``sequential.yaml``);
2. recbole-mm's ``properties/overall.yaml``, ``properties/model/<M>.yaml``,
   ``properties/dataset/<ds>.yaml``;
3. the user's ``config_file_list``, then ``config_dict``, then ``--key=value`` on the command line.

``train_neg_sample_args`` defaults to ``None`` for cross-entropy models (RecBole 1.2.1 refuses
its own default for them). ``data_path`` is then resolved by :func:`recbole_mm.data.locate.find_dataset`, so
``--dataset=amazon-beauty`` is found in ``dataset/`` or ``../shared/data/`` without copying.

Distributed runs (``run(nproc=N)``, ``--world_size``/``--ip``/``--port``/``--group_offset``) use
RecBole's own path; on a machine without CUDA (or with ``use_gpu: False``) the process group is
gloo on the CPU instead of RecBole's hard-coded nccl on ``cuda:<local_rank>``.
"""

from pathlib import Path

import torch

from recbole.config import Config as RecBoleConfig

from recbole_mm.data.locate import find_dataset


def properties_dir() -> Path:
    """``properties/`` of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "properties", here.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole-mm's properties/ folder is missing (looked in {here} and {here.parent})")


class Config(RecBoleConfig):
    def _get_model_and_dataset(self, model, dataset):
        from recbole_mm.registry import get_model

        if isinstance(model, str):  # resolve through the registry: ours first, clear error if unknown
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        for file in (props / "overall.yaml", props / "model" / f"{model}.yaml", props / "dataset" / f"{dataset}.yaml"):
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
        self.final_config_dict["data_path"] = str(find_dataset(self.dataset, user_path))

    def _init_device(self):
        # RecBole 1.2.1 starts every distributed worker with backend="nccl" on cuda:<local_rank>
        # and asserts one gpu_id per process, so DDP cannot run on a CPU machine at all. There,
        # join the same process group with gloo on the CPU; CUDA runs keep RecBole's own path.
        cfg = self.final_config_dict
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
