"""Hyperparameter search (recbole_mm.quick_start.tuning, run_hyper.py): hyperopt's exhaustive
and TPE searches and Ray Tune, on the planted dataset with tiny models."""

import json

import pytest

from conftest import TINY
from recbole_mm.quick_start.hyper import main as run_hyper
from recbole_mm.quick_start.tuning import hyperopt_tune, ray_tune

SPLIT = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}
#: per model: fixed settings for a fast trial, and a two-point search
MODELS = {
    "MambaRec": ({"modalities": ["image", "text"], "embedding_size": 8, "reduction_ratio": 4, "knn_k": 3,
                  "use_dream": False, "eval_args": SPLIT, "epochs": 2}, "mmd_weight choice [0.1,0.2]\n"),
    "FindRec": ({"modalities": ["image", "text"], "embedding_size": 8, "align_dim": 8, "n_experts": 2,
                 "MAX_ITEM_LIST_LENGTH": 10, "epochs": 1}, "iicm_weight choice [1e-4,1e-2]\n"),
    "BPR": ({"eval_args": SPLIT, "epochs": 2}, "learning_rate choice [0.001,0.01,0.05]\nembedding_size choice [8,16]\n"),
}


@pytest.fixture
def small_planted(tmp_path):
    from recbole_mm.data.synthetic import make_planted_dataset

    return make_planted_dataset(tmp_path / "data", n_users=60, n_items=30, seed=0)


def _setup(model, data_path, tmp_path):
    try:
        from recbole_mm.registry import get_model

        get_model(model)
    except (ImportError, ValueError, AttributeError) as err:
        pytest.skip(f"{model} is not available yet ({err})")
    settings, space = MODELS[model]
    fixed = {**TINY, "load_col": None, **settings, "model": model, "dataset": "planted", "data_path": data_path}
    params_file = tmp_path / f"{model}.hyper"
    params_file.write_text(space)
    return fixed, str(params_file)


@pytest.mark.parametrize("model", ["MambaRec", "FindRec"])
def test_exhaustive_search_records_every_trial_and_the_best(model, small_planted, tmp_path):
    fixed, params_file = _setup(model, small_planted, tmp_path)
    out = tmp_path / "result.json"
    hyperopt_tune(fixed, params_file, algo="exhaustive", seed=3, output_file=str(out))
    result = json.loads(out.read_text())
    (name,) = {k for t in result["trials"] for k in t["params"]}
    assert sorted(t["params"][name] for t in result["trials"]) == sorted(eval(open(params_file).read().split(" ", 2)[2]))
    for trial in result["trials"]:
        assert set(trial) == {"params", "best_valid_score", "valid_result", "test_result"}
        assert trial["valid_result"] and trial["test_result"]  # RecBole's metric dicts, as floats
        assert all(isinstance(v, float) for v in trial["test_result"].values())
    assert result["best"]["best_valid_score"] == max(t["best_valid_score"] for t in result["trials"])
    assert (result["model"], result["algo"], result["seed"]) == (model, "exhaustive", 3)


def test_same_search_seed_gives_the_same_trials(small_planted, tmp_path):
    fixed, params_file = _setup("BPR", small_planted, tmp_path)

    def search(seed):
        tuner = hyperopt_tune(fixed, params_file, algo="bayes", max_evals=2, seed=seed)
        return [(t["params"], t["test_result"]) for t in tuner.trials]

    first = search(11)
    assert len(first) == 2
    assert search(11) == first  # same proposals (from hyperopt's rstate), same metrics


def test_cli_refuses_to_fix_a_searched_parameter(tmp_path):
    params_file = tmp_path / "p.hyper"
    params_file.write_text("learning_rate choice [0.1,0.01]\n")
    with pytest.raises(SystemExit, match="learning_rate"):
        run_hyper(["--model=BPR", f"--params_file={params_file}", "--learning_rate=0.5"])


def test_cli_refuses_an_unknown_fixed_key(tmp_path):
    params_file = tmp_path / "p.hyper"
    params_file.write_text("learning_rate choice [0.1,0.01]\n")
    with pytest.raises(SystemExit, match=r"unknown key --epochz; did you mean --epochs"):
        run_hyper(["--model=BPR", "--dataset=ml-100k", f"--params_file={params_file}", "--epochz=2"])
    with pytest.raises(SystemExit, match=r"'--epochs 2': write --epochs=2"):
        run_hyper(["--model=BPR", "--dataset=ml-100k", f"--params_file={params_file}", "--epochs", "2"])


def test_ray_tune_runs_the_params_file_as_trials(small_planted, tmp_path):
    from recbole_mm import compat

    try:
        compat.enable_ray()
    except ImportError as err:
        pytest.skip(f"Ray Tune is unusable here: {err}")
    fixed, params_file = _setup("BPR", small_planted, tmp_path)
    (tmp_path / "two.hyper").write_text("learning_rate choice [0.001,0.05]\n")
    out = tmp_path / "ray.json"
    result = ray_tune(fixed, str(tmp_path / "two.hyper"), algo="exhaustive", seed=1, output_file=str(out),
                      num_cpus=2, storage_path=str(tmp_path / "ray"))
    assert json.loads(out.read_text()) == result
    assert sorted(t["params"]["learning_rate"] for t in result["trials"]) == [0.001, 0.05]
    finished = [t for t in result["trials"] if t["completed"]]
    assert finished, "ASHA stops trials only at its rungs; at least the best one runs to the end"
    assert all(t["test_result"] and t["valid_result"] for t in finished)
    assert result["best"]["best_valid_score"] == max(t["best_valid_score"] for t in finished)


def test_ray_backend_explains_a_missing_ray(monkeypatch):
    import sys

    from recbole_mm import compat

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(ImportError, match=r"recbole-mm\[ray\]"):
        ray_tune({"model": "BPR", "dataset": "ml-100k"}, "unused.hyper")
    assert compat  # the message comes from compat.enable_ray, the only importer of ray
