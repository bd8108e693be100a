"""Files written by several runs at once (kNN graph caches, dataset views, compiled kernels)."""

import os
from pathlib import Path

import pytest
import torch

from recbole_mm.data.locate import dataset_view
from recbole_mm.files import atomic_write
from recbole_mm.model.layers import compiled
from recbole_mm.model.layers.graph import build_knn_graph, load_or_build_knn_graph


def test_overlapping_writers_of_one_file_both_finish(tmp_path):
    target = tmp_path / "cache.bin"
    with atomic_write(target) as first:
        first.write_text("first")
        with atomic_write(target) as second:  # a second run starts while the first is writing
            assert second != first
            second.write_text("second")
        assert target.read_text() == "second" and first.read_text() == "first"
    assert target.read_text() == "first"  # the last rename wins, whole
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "cache.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_two_runs_building_one_knn_graph_at_once_both_get_it(tmp_path, monkeypatch):
    """The failure seen with two benchmark seeds on one dataset: both found no cached graph, both
    wrote the same ``.tmp``, and the second rename found its file taken by the first."""
    feats = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    real_save = torch.save
    calls = []

    def save_then_let_the_other_run_write(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 1:  # the other run writes and renames before this one renames
            load_or_build_knn_graph(feats, 4, tmp_path, name="image")

    monkeypatch.setattr(torch, "save", save_then_let_the_other_run_write)
    graph = load_or_build_knn_graph(feats, 4, tmp_path, name="image")
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("knn_image_k4_*.pt")]
    assert len(list(tmp_path.iterdir())) == 1
    monkeypatch.undo()
    cached = load_or_build_knn_graph(feats, 4, tmp_path, name="image")
    expected = build_knn_graph(feats, 4).to_dense()
    assert torch.allclose(graph.to_dense(), expected) and torch.allclose(cached.to_dense(), expected)


def test_two_runs_making_one_dataset_view_at_once_both_get_it(tmp_path, monkeypatch):
    source = tmp_path / "raw"
    source.mkdir()
    (source / "beauty.inter").write_text("user_id:token\titem_id:token\n")
    (source / "title_feat.npy").write_bytes(b"x")
    root = tmp_path / "views"
    real_symlink_to = Path.symlink_to
    calls = []

    def link_then_let_the_other_run_link(self, target, *args, **kwargs):
        real_symlink_to(self, target, *args, **kwargs)
        calls.append(self)
        if len(calls) == 1:  # the other run links every file before this one renames its first
            dataset_view("amazon-beauty", source, "beauty", root)

    monkeypatch.setattr(Path, "symlink_to", link_then_let_the_other_run_link)
    folder = dataset_view("amazon-beauty", source, "beauty", root)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["amazon-beauty.inter", "title_feat.npy"]
    assert (folder / "amazon-beauty.inter").resolve() == (source / "beauty.inter").resolve()
    assert (folder / "title_feat.npy").read_bytes() == b"x"


@pytest.mark.skipif(compiled._compiler() is None, reason="no C compiler")
def test_a_kernel_that_does_not_compile_is_reported_and_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(compiled, "CSRC", tmp_path)
    monkeypatch.setenv("RECBOLE_MM_CACHE", str(tmp_path / "cache"))
    lib, why = compiled.library("broken", "BROKEN_TEST")
    assert lib is None and why.startswith("compiling broken.c failed:") and "error" in why
    assert os.listdir(tmp_path / "cache" / "kernels") == []
