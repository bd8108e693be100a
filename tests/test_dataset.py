"""Multimodal dataset classes: alignment of feature rows to item ids, masks, splits, and the
documented error for every bad input (docs/design.md §data)."""

import numpy as np
import pytest
import torch

from conftest import shared_dataset
from recbole_mm.config import Config
from recbole_mm.data import FeatureFileError, MMGeneralDataset, MMSequentialDataset
from recbole_mm.data.features import read_atomic_columns
from recbole_mm.data.synthetic import make_planted_dataset
from recbole_mm.registry import create_dataset


def build(model, dataset, data_path, **extra):
    config = Config(model=model, dataset=dataset, config_dict={
        "data_path": data_path, "state": "WARNING", "modalities": ["image", "text"],
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, **extra})
    return config, create_dataset(config)


def source_rows(folder, name, modality):
    """token -> feature row, read the plain way from the source files."""
    tokens = read_atomic_columns(folder / f"{name}.item", ["item_id"])["item_id"].tolist()
    feat = np.load(folder / f"{modality}_feat.npy")
    return {t: feat[r] for r, t in enumerate(tokens)}


def assert_aligned(ds, folder, name, modality, tokens):
    rows = source_rows(folder, name, modality)
    for token in tokens:
        iid = ds.token2id(ds.iid_field, token)
        np.testing.assert_allclose(ds.item_features[modality][iid].numpy(), rows[token].astype(np.float32), rtol=0, atol=0)
        assert bool(ds.item_feature_mask[modality][iid])


def test_planted_features_follow_item_file_order(planted, tmp_path):
    root, name = planted
    _, ds = build("BPR", name, root)
    assert isinstance(ds, MMGeneralDataset)
    assert ds.modalities == ["image", "text"]
    for modality, dim in (("image", 32), ("text", 24)):
        feat = ds.item_features[modality]
        assert feat.shape == (ds.item_num, dim) and feat.dtype == torch.float32
        assert torch.all(feat[0] == 0) and not ds.item_feature_mask[modality][0]
        # .item is shuffled, so "row = id - 1" would fail here
        assert_aligned(ds, tmp_path / "data" / name, name, modality, ["i1", "i2", "i57", "i120"])


def test_sequential_class_and_copies_share_features(planted):
    root, name = planted
    config, ds = build("SASRec", name, root)
    assert isinstance(ds, MMSequentialDataset)
    from recbole.data import data_preparation

    train, valid, test = data_preparation(config, ds)
    assert train._dataset.item_features["image"] is ds.item_features["image"]  # no per-split copies


def test_x_label_split_is_used_as_is(tmp_path):
    make_planted_dataset(tmp_path, name="lab", n_users=50, seq_len=6, x_label=True)
    config, ds = build("BPR", "lab", str(tmp_path), split_label_field="x_label",
                       load_col={"inter": ["user_id", "item_id", "rating", "timestamp", "x_label"]})
    train, valid, test = ds.build()
    assert (len(train), len(valid), len(test)) == (50 * 4, 50, 50)
    # each user's test interaction is their last one (t = 5), the valid one the one before
    assert set((test.inter_feat["timestamp"].numpy() % 1000).tolist()) == {5}
    assert set((valid.inter_feat["timestamp"].numpy() % 1000).tolist()) == {4}
    assert len(set(test.inter_feat["user_id"].tolist())) == 50


@pytest.fixture
def broken(tmp_path):
    """A fresh planted dataset to corrupt: returns (root, folder)."""
    make_planted_dataset(tmp_path, name="bad", n_users=40)
    return str(tmp_path), tmp_path / "bad"


def test_error_wrong_row_count(broken):
    root, folder = broken
    np.save(folder / "image_feat.npy", np.load(folder / "image_feat.npy")[:-1])
    with pytest.raises(FeatureFileError, match=r"image_feat.npy: expected shape \(120, dim\).*found \(119, 32\)"):
        build("BPR", "bad", root)


def test_error_wrong_dimension(broken):
    root, _ = broken
    with pytest.raises(FeatureFileError, match=r"modality_dims says 'image' is 64-d but the file has 32 columns"):
        build("BPR", "bad", root, modality_dims={"image": 64})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_error_nan_or_inf(broken, value):
    root, folder = broken
    feat = np.load(folder / "text_feat.npy")
    feat[7, 3] = value
    np.save(folder / "text_feat.npy", feat)
    with pytest.raises(FeatureFileError, match=r"text_feat.npy: 1 rows hold NaN or Inf \(first at row 7\)"):
        build("BPR", "bad", root)


def test_error_missing_modality_file(broken):
    root, _ = broken
    with pytest.raises(FeatureFileError, match=r"modality 'audio' is in the config's modalities but there is no audio_feat.npy"):
        build("BPR", "bad", root, modalities=["image", "audio"])


def test_unknown_items_error_above_tolerance_and_mask_below(broken):
    root, folder = broken
    lines = (folder / "bad.item").read_text().splitlines()
    dropped = lines[1].split("\t")[0]
    (folder / "bad.item").write_text("\n".join([lines[0]] + lines[2:]) + "\n")
    np.save(folder / "image_feat.npy", np.load(folder / "image_feat.npy")[1:])
    np.save(folder / "text_feat.npy", np.load(folder / "text_feat.npy")[1:])
    with pytest.raises(FeatureFileError, match=rf"1 of 120 items \(0.83%\) are not in .*bad.item \(e.g. \['{dropped}'\]\)"):
        build("BPR", "bad", root)
    _, ds = build("BPR", "bad", root, feature_missing_tolerance=0.01)
    iid = ds.token2id(ds.iid_field, dropped)
    assert not ds.item_feature_mask["image"][iid] and torch.all(ds.item_features["image"][iid] == 0)
    assert int(ds.item_feature_mask["image"].sum()) == 119


def test_error_duplicate_item_rows(broken):
    root, folder = broken
    lines = (folder / "bad.item").read_text().splitlines()
    (folder / "bad.item").write_text("\n".join(lines[:-1] + [lines[1]]) + "\n")
    with pytest.raises(FeatureFileError, match="item ids are not unique"):
        build("BPR", "bad", root)


def test_error_bad_split_label(tmp_path):
    make_planted_dataset(tmp_path, name="lab", n_users=20, x_label=True)
    path = tmp_path / "lab" / "lab.inter"
    path.write_text(path.read_text().replace("\t2\n", "\t7\n", 1))
    _, ds = build("BPR", "lab", str(tmp_path), split_label_field="x_label",
                  load_col={"inter": ["user_id", "item_id", "rating", "timestamp", "x_label"]})
    with pytest.raises(FeatureFileError, match=r"x_label must hold only 0/1/2.*'7'"):
        ds.build()


def test_amazon_beauty_rows_match_source_files():
    folder = shared_dataset("amazon-beauty")
    config = Config(model="SASRec", dataset="amazon-beauty", config_dict={"state": "WARNING"})
    assert config["data_path"] == str(folder.resolve())
    assert config["modalities"] == ["title", "attr"]
    ds = create_dataset(config)
    for modality in ("title", "attr"):
        assert ds.item_features[modality].shape == (12102, 384)
        assert_aligned(ds, folder, "amazon-beauty", modality, ["1", "2", "5000", "12101"])
    assert bool(ds.item_feature_mask["title"][1:].all())


def test_ml100k_text_features_are_computed_cached_and_aligned(tmp_path):
    from recbole_mm.data.features import encode_texts

    config = Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    ds = create_dataset(config)
    cache = tmp_path / "dataset" / "ml-100k"
    assert (cache / "title_feat.npy").is_file() and (cache / "genre_feat.npy").is_file()
    toy_story = ds.token2id(ds.iid_field, "1")
    expected = encode_texts(["Toy Story, 1995", "Animation Children's Comedy"])
    np.testing.assert_allclose(ds.item_features["title"][toy_story].numpy(), expected[0], atol=1e-5)
    np.testing.assert_allclose(ds.item_features["genre"][toy_story].numpy(), expected[1], atol=1e-5)
    # unchanged catalogue: the cache is served, not recomputed
    stamp = (cache / "title_feat.npy").stat().st_mtime_ns
    create_dataset(Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"}))
    assert (cache / "title_feat.npy").stat().st_mtime_ns == stamp


def test_mask_file_marks_items_without_features(broken):
    root, folder = broken
    tokens = read_atomic_columns(folder / "bad.item", ["item_id"])["item_id"].tolist()
    mask = np.ones(len(tokens), dtype=bool)
    mask[[0, 5]] = False  # e.g. no image for these two items
    np.save(folder / "image_mask.npy", mask)
    _, ds = build("BPR", "bad", root)
    for r in (0, 5):
        iid = ds.token2id(ds.iid_field, tokens[r])
        assert not ds.item_feature_mask["image"][iid] and torch.all(ds.item_features["image"][iid] == 0)
        assert ds.item_feature_mask["text"][iid]  # other modalities are unaffected
    assert int(ds.item_feature_mask["image"].sum()) == len(tokens) - 2
    np.save(folder / "image_mask.npy", mask.astype(np.int8))
    with pytest.raises(FeatureFileError, match=r"image_mask.npy: expected a bool array of shape \(120,\)"):
        build("BPR", "bad", root)


def test_dataset_view_links_the_source_files_under_its_own_name(tmp_path):
    from recbole_mm.data.locate import dataset_view

    make_planted_dataset(tmp_path / "src", name="planted")
    source = tmp_path / "src" / "planted"
    view = dataset_view("planted-7", source, "planted", tmp_path / "cache")
    assert sorted(p.name for p in view.iterdir()) == ["image_feat.npy", "planted-7.inter", "planted-7.item",
                                                      "text_feat.npy"]
    assert (view / "planted-7.inter").resolve() == (source / "planted.inter").resolve()
    assert dataset_view("planted-7", source, "planted", tmp_path / "cache") == view  # again: unchanged


def test_the_findrec_papers_beauty_is_one_dataset_name():
    # FindRec's Table 1 "Amazon Beauty": 4,323 users, 2,424 items, 60,276 interactions (RecBole
    # counts the padding id in user_num / item_num)
    shared_dataset("amazon-beauty")
    config = Config(model="SASRec", dataset="amazon-beauty-paper", config_dict={"state": "WARNING"})
    assert config["view_of"] == "amazon-beauty" and config["modalities"] == ["title", "attr"]
    dataset = create_dataset(config)
    assert (dataset.user_num, dataset.item_num, dataset.inter_num) == (4323, 2424, 60276)
