"""``python -m recbole_mm.prepare``: every conversion on small generated inputs, the loader's
checks before writing, all-or-nothing writes, and the errors for bad inputs."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_mm.config import Config
from recbole_mm.data.features import item_texts, read_atomic_columns
from recbole_mm.data.synthetic import make_planted_dataset
from recbole_mm.prepare.__main__ import main
from recbole_mm.prepare.images import ImageModelError, load_image_encoder
from recbole_mm.prepare.importers import k_core
from recbole_mm.prepare.tables import length_histogram
from recbole_mm.registry import create_dataset


def run_cli(capsys, *argv):
    """Exit code and (stdout, stderr) of one command."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


# ----------------------------------------------------------------------------- MMRec
@pytest.fixture
def mmrec(tmp_path):
    """An MMRec folder: 6 users x 4 interactions (labels 0,0,1,2), 9 items of which item 8 is never
    interacted with; returns (folder, image features, text features, inter frame)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src" / "toy"
    src.mkdir(parents=True)
    rows = [(u, (u + k) % 8, 1.0, 100 * u + k, [0, 0, 1, 2][k]) for u in range(6) for k in range(4)]
    inter = pd.DataFrame(rows, columns=["userID", "itemID", "rating", "timestamp", "x_label"])
    inter[["itemID", "userID", "rating", "timestamp", "x_label"]].to_csv(src / "toy.inter", sep="\t", index=False)
    image, text = rng.normal(size=(9, 5)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
    np.save(src / "image_feat.npy", image)
    np.save(src / "text_feat.npy", text)
    return src, image, text, inter


def test_mmrec_import_keeps_split_and_feature_rows(mmrec, tmp_path, capsys):
    src, image, text, inter = mmrec
    code, out = run_cli(capsys, "mmrec", src, "--out", tmp_path / "data")
    assert code == 0, out.err
    folder = tmp_path / "data" / "toy"
    assert read_atomic_columns(folder / "toy.item", ["item_id"])["item_id"].tolist() == [str(i) for i in range(9)]
    np.testing.assert_array_equal(np.load(folder / "image_feat.npy"), image)
    header = (folder / "toy.inter").read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\trating:float\ttimestamp:float\tx_label:token"
    assert "users 6  items 9 (8 in .inter)  interactions 24" in out.out

    # the real loader reads the result: MMRec's split as is, feature rows by item token
    config = Config(model="BPR", dataset="toy", config_dict={
        "data_path": str(tmp_path / "data"), "state": "WARNING", "modalities": ["image", "text"],
        "split_label_field": "x_label",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp", "x_label"]}})
    ds = create_dataset(config)
    parts = ds.build()
    assert [len(p) for p in parts] == [12, 6, 6]
    test_pairs = {(ds.id2token("user_id", u), ds.id2token("item_id", i))
                  for u, i in zip(parts[2].inter_feat["user_id"].tolist(), parts[2].inter_feat["item_id"].tolist())}
    expected = inter[inter.x_label == 2]
    assert test_pairs == {(str(u), str(i)) for u, i in zip(expected.userID, expected.itemID)}
    for token in ("0", "5", "7"):
        iid = ds.token2id("item_id", token)
        np.testing.assert_array_equal(ds.item_features["image"][iid].numpy(), image[int(token)])
        np.testing.assert_array_equal(ds.item_features["text"][iid].numpy(), text[int(token)])


def corrupt_row_count(src):
    np.save(src / "text_feat.npy", np.load(src / "text_feat.npy")[:7])


def corrupt_nan(src):
    feat = np.load(src / "image_feat.npy")
    feat[4, 1] = np.nan
    np.save(src / "image_feat.npy", feat)


def corrupt_unknown_item(src):
    np.save(src / "image_feat.npy", np.load(src / "image_feat.npy")[:6])
    np.save(src / "text_feat.npy", np.load(src / "text_feat.npy")[:6])


def corrupt_label(src):
    path = src / "toy.inter"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-1] + "7"
    path.write_text("\n".join(lines) + "\n")


def corrupt_item_id(src):
    path = src / "toy.inter"
    lines = path.read_text().splitlines()
    lines[3] = "x9" + lines[3][lines[3].index("\t"):]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_row_count,
     r"text_feat.npy: expected shape \(9, dim\) — one row per data row of toy.item — but found \(7, 3\)"),
    (corrupt_nan, r"image_feat.npy: 1 rows hold NaN or Inf \(first at row 4\)"),
    (corrupt_unknown_item, r"toy.inter: 2 of 8 items \(25.00%\) are not in .*toy.item \(e.g. \['6', '7'\]\)"),
    (corrupt_label, r"x_label must hold only 0/1/2 \(train/valid/test\); found \{'7'\}"),
    (corrupt_item_id, r"toy.inter: itemID must be a feature row number .* found 'x9' on data row 3"),
])
def test_mmrec_bad_input_is_refused_before_writing(mmrec, tmp_path, capsys, corrupt, message):
    src = mmrec[0]
    corrupt(src)
    code, out = run_cli(capsys, "mmrec", src, "--out", tmp_path / "data")
    assert code == 2
    assert out.err.startswith("error: ") and pd.Series([out.err]).str.contains(message).all(), out.err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


# ----------------------------------------------------------------------------- all-or-nothing writes
def test_interrupted_write_leaves_no_folder_and_keeps_an_old_one(mmrec, tmp_path, capsys, monkeypatch):
    src = mmrec[0]
    root = tmp_path / "data"
    real_save = np.save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)  # .inter and .item are written, the features are not
    with pytest.raises(KeyboardInterrupt):
        main(["mmrec", str(src), "--out", str(root)])
    assert list(root.iterdir()) == []  # no toy/, no hidden partial folder

    monkeypatch.setattr(np, "save", real_save)
    assert run_cli(capsys, "mmrec", src, "--out", root)[0] == 0
    before = {p.name: p.read_bytes() for p in (root / "toy").iterdir()}
    code, out = run_cli(capsys, "mmrec", src, "--out", root)
    assert code == 2 and "already exists; pass --force" in out.err

    np.save(src / "image_feat.npy", np.ones((9, 5), dtype=np.float32))
    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["mmrec", str(src), "--out", str(root), "--force"])
    assert {p.name: p.read_bytes() for p in (root / "toy").iterdir()} == before
    assert [p.name for p in root.iterdir()] == ["toy"]

    monkeypatch.setattr(np, "save", real_save)
    assert run_cli(capsys, "mmrec", src, "--out", root, "--force")[0] == 0
    np.testing.assert_array_equal(np.load(root / "toy" / "image_feat.npy"), 1.0)


# ----------------------------------------------------------------------------- Amazon + k-core
def test_k_core_repeats_until_stable():
    inter = pd.DataFrame([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"),
                          ("u3", "b"), ("u3", "c"), ("u4", "c")], columns=["u", "i"])
    # u4 (1 interaction) goes; then c has 1 and goes; then u3 has 1 and goes
    core = k_core(inter, "u", "i", 2, 2)
    assert sorted(zip(core.u, core.i)) == [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]


def test_amazon_import_filters_items_without_meta_and_keeps_columns(tmp_path, capsys):
    src = tmp_path / "amazon-toy"
    src.mkdir()
    pairs = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "b"), ("u3", "c"), ("u4", "c"),
             ("u5", "a"), ("u5", "z")]  # z has no .item row, so u5 keeps 1 interaction
    (src / "amazon-toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t5.0\t{k}\n" for k, (u, i) in enumerate(pairs)))
    (src / "amazon-toy.item").write_text(
        "item_id:token\ttitle:token\tcategories:token_seq\tbrand:token\n"
        "c\tCream\tBeauty\tX\nb\tBrush, soft\tBeauty Tools\tY\nd\tUnused\tBeauty\t\na\tLip 'red'\tBeauty\tZ\n")
    code, out = run_cli(capsys, "amazon", src, "--out", tmp_path / "data", "--name", "toy",
                        "--user-k", 2, "--item-k", 2)
    assert code == 0, out.err
    assert "dropped 1 interactions on items without a .item row" in out.out
    folder = tmp_path / "data" / "toy"
    assert (folder / "toy.item").read_text() == ("item_id:token\ttitle:token\tcategories:token_seq\tbrand:token\n"
                                                 "b\tBrush, soft\tBeauty Tools\tY\na\tLip 'red'\tBeauty\tZ\n")
    assert (folder / "toy.inter").read_text().splitlines()[1:] == ["u1\ta\t5.0\t0", "u1\tb\t5.0\t1",
                                                                   "u2\ta\t5.0\t2", "u2\tb\t5.0\t3"]


# ----------------------------------------------------------------------------- text
def test_item_texts_list_fields_and_joiner(tmp_path):
    item = tmp_path / "x.item"
    item.write_text("item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\n"
                    "1\tRed Lipstick 2 oz\tAcme\tMakeup Lip_Care\n2\t\t\tSkin_Care\n")
    assert item_texts(item, ["title", "brand", "categories:list"], joiner=". ") == [
        "Red Lipstick 2 oz. Acme. Makeup, Lip Care", "Skin Care"]
    assert item_texts(item, ["title", "categories"]) == ["Red Lipstick 2 oz, Makeup Lip_Care", "Skin_Care"]


def test_text_features_are_deterministic_and_cached(tmp_path, capsys):
    folder = tmp_path / "shop"
    folder.mkdir()
    item = folder / "shop.item"
    lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq", "i1\tRed lipstick\tMakeup Lip_Care",
             "i2\tBlue shampoo\tHair_Care", "i3\tGreen tea soap\tBath"]
    item.write_text("\n".join(lines) + "\n")
    args = ["text", folder, "--fields", "title", "categories:list", "--joiner", ". "]
    assert run_cli(capsys, *args)[0] == 0
    feat_file = folder / "text_feat.npy"
    first = np.load(feat_file)
    assert first.shape == (3, 384) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert json.loads((folder / "text_feat.json").read_text())["fields"] == ["title", "categories:list"]

    stamp = feat_file.stat().st_mtime_ns
    assert run_cli(capsys, *args)[0] == 0
    assert feat_file.stat().st_mtime_ns == stamp  # same texts: the cache is served

    item.write_text("\n".join(lines[:3] + ["i3\tGreen tea soap bar\tBath"]) + "\n")
    assert run_cli(capsys, *args)[0] == 0
    second = np.load(feat_file)
    np.testing.assert_allclose(second[:2], first[:2], atol=1e-6)  # unchanged items: the same vectors
    assert float(second[2] @ first[2]) < 0.999  # the edited item was re-encoded


def test_text_refuses_to_replace_shipped_features(tmp_path, capsys):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop.item").write_text("item_id:token\ttitle:token_seq\ni1\tRed lipstick\n")
    np.save(folder / "text_feat.npy", np.zeros((1, 4), dtype=np.float32))
    code, out = run_cli(capsys, "text", folder, "--fields", "title")
    assert code == 2 and "text_feat.npy already exists; pass --force" in out.err
    code, out = run_cli(capsys, "text", folder, "--fields", "nope", "--out", tmp_path / "elsewhere")
    assert code == 2 and "no column(s) ['nope']" in out.err and not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- images
class MeanColour(torch.nn.Module):
    """A 6-channel feature map (the image and its negative); the encoder averages it to
    ``[mean R, G, B, 1 - mean R, G, B]``."""

    def forward(self, x):
        return torch.cat([x, 1 - x], dim=1)


@pytest.fixture
def image_dataset(tmp_path):
    """Items i1..i5 (i3 first in .item); images: i1 red PNG, i2 green JPEG (wider than tall),
    i3 blue PNG, i4 none, i5 a corrupt file; a stray text file. Returns (dataset, images, model)."""
    from PIL import Image

    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop.item").write_text("item_id:token\ni3\ni1\ni2\ni4\ni5\n")
    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (12, 12), (255, 0, 0)).save(images / "i1.png")
    Image.new("RGB", (20, 10), (0, 255, 0)).save(images / "i2.JPG", quality=100)
    Image.new("RGBA", (9, 9), (0, 0, 255, 255)).save(images / "i3.png")
    (images / "i5.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored")
    model = tmp_path / "mean_colour.pt"
    torch.jit.script(MeanColour()).save(str(model))
    return folder, images, model


def test_image_features_from_a_local_torchscript_model(image_dataset, capsys):
    folder, images, model = image_dataset
    code, out = run_cli(capsys, "images", folder, "--images", images, "--weights", model,
                        "--size", 8, "--normalize", "none", "--batch-size", 2)
    assert code == 0, out.err
    feat, mask = np.load(folder / "image_feat.npy"), np.load(folder / "image_mask.npy")
    assert feat.shape == (5, 6) and feat.dtype == np.float32
    assert mask.tolist() == [True, True, True, False, False]  # rows: i3 i1 i2 i4 i5
    np.testing.assert_allclose(feat[0], [0, 0, 1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(feat[1], [1, 0, 0, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(feat[2], [0, 1, 0, 1, 0, 1], atol=0.02)  # JPEG
    assert not feat[3:].any()  # no fake vector for i4 / i5: zeros, and the mask says so
    assert "features for 3/5 items (1 unreadable images)" in out.out

    code, out = run_cli(capsys, "images", folder, "--images", images, "--weights", model)
    assert code == 2 and "image_feat.npy already exists; pass --force" in out.err


def test_image_model_errors_say_what_to_pass(image_dataset, tmp_path, capsys):
    folder, images, _ = image_dataset
    code, out = run_cli(capsys, "images", folder, "--images", images)
    assert code == 2 and "no image model given: pass --weights FILE" in out.err
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)
    with pytest.raises(ImageModelError, match=r"state.pt: not a TorchScript file .*--arch NAME"):
        load_image_encoder(str(state))
    assert not (folder / "image_feat.npy").exists() and not (folder / "image_mask.npy").exists()


def test_torchvision_state_dict_loses_its_classifier(tmp_path, monkeypatch):
    class TinyNet(torch.nn.Module):
        def __init__(self, weights=None):
            super().__init__()
            self.body, self.fc = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    trained = TinyNet()
    path = tmp_path / "tiny.pth"
    torch.save(trained.state_dict(), path)
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(tinynet=TinyNet)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    model = load_image_encoder(str(path), "tinynet")
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(model(x), trained.body(x).mean((2, 3)))  # loaded weights, no head


# ----------------------------------------------------------------------------- stats
def test_length_histogram_bins():
    assert length_histogram(pd.Series([1, 2, 4, 5, 120, 1500])) == {
        "1": 1, "2-4": 2, "5-9": 1, "100-199": 1, "1000+": 1}


def test_stats_of_a_dataset_and_of_a_broken_one(tmp_path, capsys):
    make_planted_dataset(tmp_path, name="p", n_users=30, n_items=12, n_clusters=3, seq_len=6, x_label=True)
    folder = tmp_path / "p"
    mask = np.ones(12, dtype=bool)
    mask[:3] = False
    np.save(folder / "image_mask.npy", mask)
    code, out = run_cli(capsys, "stats", folder, "--json")
    assert code == 0, out.err
    stats = json.loads(out.out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (30, 12, 180)
    assert stats["density"] == pytest.approx(180 / (30 * stats["items_in_inter"]))
    assert stats["sequence_length"]["histogram"] == {"5-9": 30}
    assert stats["split"] == {"0": 120, "1": 30, "2": 30}
    assert stats["modalities"]["image"]["items_with_feature"] == 9
    assert stats["modalities"]["text"]["items_with_feature"] == 12

    np.save(folder / "image_mask.npy", mask[:-1])
    code, out = run_cli(capsys, "stats", folder)
    assert code == 2 and "image_mask.npy: expected a bool array of shape (12,)" in out.err


def test_import_refuses_to_overwrite_its_own_source(tmp_path, capsys):
    src = tmp_path / "amazon-toy"
    src.mkdir()
    (src / "amazon-toy.inter").write_text("user_id:token\titem_id:token\nu1\ta\n")
    (src / "amazon-toy.item").write_text("item_id:token\na\n")
    np.save(src / "title_feat.npy", np.zeros((1, 2), dtype=np.float32))
    code, out = run_cli(capsys, "amazon", src, "--out", tmp_path, "--force")
    assert code == 2 and f"the output {src} would replace the source {src}" in out.err
    assert (src / "title_feat.npy").is_file()  # the source is untouched
    code, out = run_cli(capsys, "mmrec", src, "--out", tmp_path.parent, "--name", tmp_path.name, "--force")
    assert code == 2 and "would replace the source" in out.err


def test_new_dataset_folder_keeps_the_users_umask(mmrec, tmp_path, capsys):
    import os

    src = mmrec[0]
    old = os.umask(0o022)
    try:
        code, out = run_cli(capsys, "mmrec", src, "--out", tmp_path / "data")
    finally:
        os.umask(old)
    assert code == 0, out.err
    assert (tmp_path / "data" / "toy").stat().st_mode & 0o777 == 0o755


def test_stats_accepts_a_dataset_name(tmp_path, capsys, monkeypatch):
    make_planted_dataset(tmp_path / "root", name="named", n_users=10, n_items=12, n_clusters=3, seq_len=4)
    monkeypatch.setenv("RECBOLE_MM_DATA", str(tmp_path / "root"))  # not a folder of the working directory
    code, out = run_cli(capsys, "stats", "named", "--json")
    assert code == 0, out.err
    assert json.loads(out.out)["users"] == 10
