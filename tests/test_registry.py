"""The one registry, the Config layering and RecBole's own entry points after registration."""

import subprocess
import sys

import pytest
import recbole.quick_start
import recbole.trainer
from recbole.utils import ModelType

from conftest import REPO, TINY
from recbole_mm import registry
from recbole_mm.config import Config
from recbole_mm.data.locate import ENV_VAR, DatasetNotFoundError, find_dataset


def test_own_models_first_then_recbole():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert registry.get_model("SASRec") is SASRec
    assert registry.get_model("MambaRec").__module__ == "recbole_mm.model.general_recommender.mambarec"
    with pytest.raises(ValueError, match=r"unknown model 'NoSuchModel'"):
        registry.get_model("NoSuchModel")


def test_recbole_own_lookups_find_our_models():
    from recbole.utils import get_model, get_trainer

    for name in registry.model_names():
        assert get_model(name) is registry.get_model(name)
    assert get_trainer(ModelType.SEQUENTIAL, "SASRec") is recbole.trainer.Trainer
    for name in registry.TRAINERS:
        assert get_trainer(ModelType.SEQUENTIAL, name) is registry.get_trainer(ModelType.SEQUENTIAL, name)


def test_config_layers_in_recbole_order(monkeypatch, tmp_path):
    # RecBole internal (SASRec.yaml: loss_type CE) < ours (ml-100k.yaml: modalities) < file < dict < cmd
    config = Config(model="SASRec", dataset="ml-100k")
    assert config["loss_type"] == "CE" and config["modalities"] == ["title", "genre"]
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE models need none (RecBole 1.2.1 default breaks them)
    yaml_file = tmp_path / "user.yaml"
    yaml_file.write_text("modalities: [genre]\nlearning_rate: 0.5\n")
    config = Config(model="SASRec", dataset="ml-100k", config_file_list=[str(yaml_file)])
    assert config["modalities"] == ["genre"] and config["learning_rate"] == 0.5
    config = Config(model="SASRec", dataset="ml-100k", config_file_list=[str(yaml_file)],
                    config_dict={"learning_rate": 0.25})
    assert config["learning_rate"] == 0.25
    monkeypatch.setattr(sys, "argv", ["prog", "--learning_rate=0.125"])
    config = Config(model="SASRec", dataset="ml-100k", config_file_list=[str(yaml_file)],
                    config_dict={"learning_rate": 0.25})
    assert config["learning_rate"] == 0.125


def test_dataset_search_order(tmp_path, monkeypatch, planted):
    root, name = planted
    with pytest.raises(DatasetNotFoundError) as err:
        find_dataset("nowhere")
    message = str(err.value)
    assert "nowhere.inter" in message and str(tmp_path / "dataset" / "nowhere") in message and "--data_path" in message
    monkeypatch.setenv(ENV_VAR, root)
    assert find_dataset(name) == (tmp_path / "data" / name).resolve()
    # an explicit data_path comes before the environment variable
    other = tmp_path / "other"
    (other / name).mkdir(parents=True)
    (other / name / f"{name}.inter").write_text("user_id:token\titem_id:token\n")
    assert find_dataset(name, str(other)) == (other / name).resolve()
    assert Config(model="BPR", dataset=name, config_dict={"data_path": str(other), "state": "WARNING"})["data_path"] == str((other / name).resolve())
    # ml-100k needs no download: RecBole's bundled copy
    assert find_dataset("ml-100k").name == "ml-100k"


def test_recbole_run_recbole_runs_our_model_and_saves_a_loadable_checkpoint(planted):
    root, name = planted
    result = recbole.quick_start.run_recbole(
        model="MambaRec", dataset=name,
        config_dict={**TINY, "data_path": root, "modalities": ["image", "text"], "reduction_ratio": 2})
    assert 0.0 <= result["test_result"]["recall@10"] <= 1.0
    import glob

    (ckpt,) = glob.glob("saved/MambaRec-*.pth")
    config, model, dataset, train, valid, test = recbole.quick_start.load_data_and_model(ckpt)
    assert type(model).__name__ == "MambaRec" and dataset.modalities == ["image", "text"]


def test_cli_runs_a_recbole_baseline_with_recbole_flags(planted, tmp_path):
    root, name = planted
    out = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_mm.py"), "--model=BPR", f"--dataset={name}",
         f"--data_path={root}", "--epochs=1", "--show_progress=False", "--embedding_size=8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "best valid" in log and "test result" in log and "recall@10" in log
