"""Strict inputs (docs/design.md §config-validation): unknown or malformed command-line keys,
out-of-range values, mistyped model names and broken data files each stop with a message that
names the key, value, file or row — before any training starts."""

import re
import warnings

import numpy as np
import pytest
import torch

import run_recbole_mm
from recbole_mm import compat
from recbole_mm.config import Config
from recbole_mm.config.validate import ConfigError, check_cli_overrides, known_keys
from recbole_mm.data import FeatureFileError
from recbole_mm.data.synthetic import make_planted_dataset
from recbole_mm.registry import create_dataset, get_model, resolve_model_name
from recbole_mm.utils import CheckpointError, load_checkpoint


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        run_recbole_mm.main(list(argv))
    assert stop.value.code == 2  # argparse's usage error, before any data are loaded
    return capsys.readouterr().err


# ----------------------------------------------------------------- command line


def test_unknown_key_is_refused_with_the_nearest_known_keys(capsys):
    err = cli_error(capsys, "--model=BPR", "--dataset=ml-100k", "--epochz=1")
    assert "unknown key --epochz; did you mean --epochs?" in err and "--free.epochz=1" in err


def test_model_and_dataset_yaml_keys_are_known():
    keys = known_keys("FindRec", "ml-100k")
    # RecBole's overall / sample / quick-start files, ours, the model's, the dataset's
    assert {"epochs", "MAX_ITEM_LIST_LENGTH", "align_dim", "modalities", "text_features", "nproc"} <= keys
    assert "align_dim" not in known_keys("BPR", "ml-100k")
    # a key documented by each model that reads it (a null default included)
    assert all("log_loss_terms" in known_keys(m, "ml-100k") for m in ("FindRec", "MGCN", "MambaRec"))
    with pytest.raises(ConfigError, match=r"unknown key --align_dim"):
        check_cli_overrides(["--align_dim=64"], "BPR", "ml-100k")


def test_free_prefix_passes_a_key_on_purpose(monkeypatch):
    assert check_cli_overrides(["--free.my_key=3", "--epochs=2"], "BPR", "ml-100k") == {"my_key": "3", "epochs": "2"}
    monkeypatch.setattr("sys.argv", ["run_recbole_mm.py", "--free.my_key=3"])
    config = Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert config["my_key"] == 3 and config["free.my_key"] is None


def test_space_separated_value_is_an_error_naming_it(capsys):
    err = cli_error(capsys, "--model=BPR", "--epochs", "1")
    assert "'--epochs 1': write --epochs=1" in err


def test_help_lists_key_value_and_benchmark(capsys):
    with pytest.raises(SystemExit):
        run_recbole_mm.main(["--help"])
    out = capsys.readouterr().out
    assert "--key=value" in out and "--free.KEY=value" in out and "benchmark" in out and "--resume" in out


# ----------------------------------------------------------------- values


@pytest.mark.parametrize("model, key, value, allowed", [
    ("FindRec", "n_layers", -1, "an integer >= 1"),
    ("BPR", "train_batch_size", 0, "an integer >= 1"),
    ("BPR", "epochs", -1, "an integer >= 0"),
    ("FindRec", "embedding_size", 0, "an integer >= 1"),
    ("FindRec", "MAX_ITEM_LIST_LENGTH", 0, "an integer >= 1"),
    ("MambaRec", "knn_k", 0, "an integer >= 1"),
    ("BPR", "modalities", ["image", "image"], "a list without repeats"),
    ("BPR", "learning_rate", 0.0, "a number > 0"),
    ("FindRec", "dropout_prob", 1.0, r"a number in \[0, 1\)"),
    ("BPR", "epochs", 2.5, "an integer >= 0"),
    ("BPR", "topk_eval", "fast", "one of 'auto', 'blocked', 'recbole'"),
    ("SASRec", "eval_item_block", 0, "an integer >= 1"),
    ("SASRec", "ce_item_chunk", 0, "an integer >= 1"),
    ("BPR", "topk_eval_threshold", -1, "a number >= 0"),
    ("BPR", "cold_item_ratio", 1.0, r"a number in \(0, 1\)"),
    ("FindRec", "iicm_normalize", "yes", "true or false"),
    ("FindRec", "use_iicm", 0, "true or false"),
    ("MambaRec", "use_dream", "no", "true or false"),
    ("BPR", "cold_negatives", 1, "true or false"),
    ("FindRec", "output_head", "resid", "one of 'ffn', 'residual'"),
    ("FindRec", "id_input", "sum", "one of 'id', 'fused', 'summed'"),
    ("FindRec", "iicm_entropy", "rbf", "one of 'stein', 'kl'"),
    ("FindRec", "lr_schedule", "linear", "one of 'constant', 'cosine'"),
    ("Mamba4Rec", "mamba_backend", "triton", "one of 'auto', 'cuda', 'torch'"),
    ("MambaRec", "cl_views", "both", "one of 'modalities', 'side_content'"),
    ("MambaRec", "mmd_input", "raw", "one of 'embeddings', 'views'"),
    ("MGCN", "reg_embeddings", "all", "one of 'ego', 'final'"),
    ("MambaRec", "single_modality_side", "third", "one of 'half', 'full'"),
    ("VBPR", "feature_norm", "minmax", "one of 'none', 'l2', 'standard'"),
])
def test_out_of_range_value_names_key_value_and_range(model, key, value, allowed):
    with pytest.raises(ConfigError, match=re.escape(f"{key} = {value!r}: expected ") + allowed):
        Config(model=model, dataset="ml-100k", config_dict={"state": "WARNING", key: value})


def test_values_from_the_command_line_are_checked_too(monkeypatch):
    monkeypatch.setattr("sys.argv", ["run_recbole_mm.py", "--n_heads=0"])
    with pytest.raises(ConfigError, match=r"n_heads = 0: expected an integer >= 1"):
        Config(model="FindRec", dataset="ml-100k", config_dict={"state": "WARNING"})


def test_a_bad_value_on_the_command_line_stops_before_the_data_are_loaded(capsys, monkeypatch):
    def load(*_):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr("recbole_mm.quick_start.quick_start.build_data_and_model", load)
    argv = ["--model=FindRec", "--dataset=ml-100k", "--output_head=resid"]
    monkeypatch.setattr("sys.argv", ["run_recbole_mm.py", *argv])  # RecBole's Config reads sys.argv
    err = cli_error(capsys, *argv)
    assert "output_head = 'resid': expected one of 'ffn', 'residual'" in err


def test_zero_epochs_warns_that_nothing_is_trained(caplog):
    # allowed (it evaluates the initial weights, as tests/test_distributed.py does), but said
    Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING", "epochs": 0})
    assert "epochs = 0: nothing is trained" in caplog.text


def test_valid_values_pass_and_none_means_automatic():
    config = Config(model="FindRec", dataset="ml-100k",
                    config_dict={"state": "WARNING", "n_layers": 1, "iicm_sigma": None, "topk": [5, 10]})
    assert config["n_layers"] == 1 and config["iicm_sigma"] is None


# ----------------------------------------------------------------- model names


def test_unknown_model_offers_the_nearest_names_not_lightgbm():
    with pytest.raises(ValueError, match=r"unknown model 'FooRec': did you mean .*FindRec") as err:
        get_model("FooRec")
    assert "lightgbm" not in str(err.value)
    with pytest.raises(ValueError, match=r"did you mean SASRec"):
        get_model("SASRek")


def test_model_names_resolve_ignoring_case(capsys):
    assert resolve_model_name("findrec") == "FindRec" and resolve_model_name("sasrec") == "SASRec"
    assert Config(model="findrec", dataset="ml-100k", config_dict={"state": "WARNING"})["model"] == "FindRec"
    err = cli_error(capsys, "--model=FooRec")
    assert "did you mean" in err and "FindRec" in err


# ----------------------------------------------------------------- data files


@pytest.fixture
def bad(tmp_path):
    make_planted_dataset(tmp_path, name="bad", n_users=40)
    return str(tmp_path), tmp_path / "bad"


def build(model, root, **extra):
    config = Config(model=model, dataset="bad", config_dict={
        "data_path": root, "state": "WARNING", "modalities": ["image", "text"],
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, **extra})
    return create_dataset(config)


def test_truncated_npy_names_the_file(bad):
    root, folder = bad
    data = (folder / "image_feat.npy").read_bytes()
    (folder / "image_feat.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match=r"image_feat.npy: truncated: its header promises \(120, 32\) float"):
        build("BPR", root)


def test_text_file_named_npy_names_the_file(bad):
    root, folder = bad
    (folder / "image_feat.npy").write_text("0.1 0.2 0.3\n")
    with warnings.catch_warnings(record=True) as caught:
        with pytest.raises(FeatureFileError, match=r"image_feat.npy: not a .npy file"):
            build("BPR", root)
    assert not [w for w in caught if "pickle" in str(w.message)]  # numpy's warning, without the file


def test_object_dtype_names_the_file(bad):
    root, folder = bad
    np.save(folder / "image_feat.npy", np.array([[1, "a"]] * 120, dtype=object), allow_pickle=True)
    with pytest.raises(FeatureFileError, match=r"image_feat.npy: holds an object array"):
        build("BPR", root)


def test_integer_features_warn_naming_the_file(bad, caplog):
    root, folder = bad
    np.save(folder / "image_feat.npy", np.load(folder / "image_feat.npy").round().astype(np.int64))
    ds = build("BPR", root)
    assert ds.item_features["image"].dtype == torch.float32
    assert any("image_feat.npy: int64 features, read as float32" in r.getMessage() for r in caplog.records)


def _rewrite_inter(folder, edit):
    path = folder / "bad.inter"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def test_missing_timestamp_for_a_sequential_model(bad):
    root, folder = bad
    _rewrite_inter(folder, lambda lines: ["\t".join(line.split("\t")[:3]) for line in lines])
    with pytest.raises(FeatureFileError, match=r"bad.inter: SASRec is sequential and orders .* by TIME_FIELD "
                                               r"'timestamp', but the header has \['user_id', 'item_id', 'rating'\]"):
        build("SASRec", root, load_col={"inter": ["user_id", "item_id", "rating"]})


def test_non_numeric_timestamp_names_file_and_row(bad):
    root, folder = bad

    def edit(lines):
        fields = lines[5].split("\t")
        fields[3] = "yesterday"
        return lines[:5] + ["\t".join(fields)] + lines[6:]

    _rewrite_inter(folder, edit)
    with pytest.raises(FeatureFileError, match=r"bad.inter, data row 5: timestamp is 'yesterday', not a number"):
        build("BPR", root)


def test_header_only_inter(bad):
    root, folder = bad
    _rewrite_inter(folder, lambda lines: lines[:1])
    with pytest.raises(FeatureFileError, match=r"bad.inter: a header and no interactions"):
        build("BPR", root)


def test_inter_row_with_extra_columns_names_the_line(bad):
    root, folder = bad
    _rewrite_inter(folder, lambda lines: lines[:3] + [lines[3] + "\textra"] + lines[4:])
    with pytest.raises(FeatureFileError, match=r"bad.inter, line 4: 5 fields but the header has 4"):
        build("BPR", root)


def test_corrupted_checkpoint_names_its_path(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"config": {}, "state_dict": {}}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pth")


# ----------------------------------------------------------------- noise


def test_foreign_future_warnings_are_silenced_ours_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        compat.silence_foreign_warnings()
        for module in ("recbole.data.dataset.dataset", "pandas.core.frame", "recbole_mm.data.dataset"):
            warnings.warn_explicit("future", FutureWarning, "x.py", 1, module=module)
    assert [w.filename for w in caught] == ["x.py"] and len(caught) == 1


def test_use_gpu_is_false_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})["use_gpu"] is False


# ----------------------------------------------------------------- unusual splits


def test_single_interaction_users_and_an_empty_validation_part_are_reported(tmp_path, caplog):
    from recbole_mm.utils import build_data_and_model

    make_planted_dataset(tmp_path, name="lab", n_users=30, seq_len=6, x_label=True)
    path = tmp_path / "lab" / "lab.inter"
    lines = path.read_text().splitlines()
    # no validation labels at all, and user u1 keeps one (test) interaction
    kept = [lines[0]] + [line[:-1] + "0" if line.endswith("\t1") else line for line in lines[1:]
                         if line.split("\t")[0] != "u1" or line.endswith("\t2")]
    path.write_text("\n".join(kept) + "\n")
    config = Config(model="BPR", dataset="lab", config_dict={
        "data_path": str(tmp_path), "state": "WARNING", "modalities": None, "split_label_field": "x_label",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp", "x_label"]}})
    build_data_and_model(config)
    assert "lab: 1 of 30 users have a single interaction" in caplog.text
    assert "lab: the validation part of the split is empty" in caplog.text
    assert "the test part" not in caplog.text
