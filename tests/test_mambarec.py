"""MambaRec: DREAM, the graphs, the model's losses / cache / switches, and end-to-end training."""

import logging

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.utils import init_seed
from torch.profiler import ProfilerActivity, profile

from recbole_mm.model.layers import graph as graph_mod
from recbole_mm.model.layers.dream import DREAM, default_dilations, default_map_shape
from recbole_mm.model.layers.graph import (
    build_knn_graph,
    load_or_build_knn_graph,
    normalized_bipartite_adjacency,
    normalized_interaction_matrix,
)

from conftest import planted_paths, torch_threads


# ---------------------------------------------------------------- DREAM


@pytest.mark.parametrize("d, shape", [(48, (3, 4, 4)), (64, (4, 4, 4)), (24, (2, 3, 4)), (12, (1, 3, 4)),
                                      (8, (1, 2, 4)), (7, (1, 1, 7))])
def test_default_map_shape(d, shape):
    assert default_map_shape(d) == shape


def test_default_dilations_fit_the_map():
    assert default_dilations((3, 4, 4)) == (1, 2, 3)
    assert default_dilations((1, 3, 3)) == (1, 2, 2)
    assert default_dilations((48, 1, 1)) == (1, 1, 1)


@pytest.mark.parametrize("map_shape", [None, [48, 1, 1], [1, 6, 8], [12, 2, 2], [3, 4, 4]])
def test_dream_output_shapes(map_shape):
    dream = DREAM(48, 64, map_shape=map_shape)
    assert dream(torch.randn(7, 48)).shape == (7, 64)
    assert dream(torch.randn(2, 5, 48)).shape == (2, 5, 64)
    assert DREAM(48, map_shape=map_shape)(torch.randn(3, 48)).shape == (3, 48)


def test_dream_rejects_bad_layouts():
    with pytest.raises(ValueError, match="C\\*H\\*W"):
        DREAM(48, map_shape=[3, 4, 3])
    with pytest.raises(ValueError, match="C\\*H\\*W"):
        DREAM(48, map_shape=[48, 1])
    with pytest.raises(ValueError, match="three positive"):
        DREAM(48, dilations=[1, 2])


def test_dream_gradients_reach_every_parameter_on_a_spatial_map():
    torch.manual_seed(0)
    dream = DREAM(48, 16)  # 3x4x4, dilations 1, 2, 3
    dream(torch.randn(32, 48)).pow(2).sum().backward()
    for name, p in dream.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _direct_dream(dream, x):
    """DREAM computed literally: five convolutions over the n maps, eq. 6 as F * max(M_c, M_s), the
    1x1 merge conv and the output layer (the reference for the folded forward)."""
    fused = dream.branches(x.reshape(-1, *dream.map_shape))
    m_c = dream.channel_att(fused.mean(dim=(2, 3)))[:, :, None, None]
    m_s = dream.spatial_att(fused.mean(dim=1, keepdim=True))
    return dream.out(dream.merge(fused * torch.maximum(m_c, m_s)).flatten(1)), fused, m_c, m_s


@pytest.mark.parametrize("map_shape", [None, [48, 1, 1], [12, 2, 2], [1, 6, 8]])
def test_folded_dream_equals_the_direct_computation(map_shape):
    torch.manual_seed(0)
    dream = DREAM(48, 16, map_shape=map_shape)
    x = torch.randn(50, 48, requires_grad=True)
    expected, fused, _, _ = _direct_dream(dream, x)
    weight, bias = dream.affine_branches(x)
    assert torch.allclose((x @ weight.flatten(1) + bias.flatten()).view_as(fused), fused, atol=1e-5)
    _assert_same_output_and_gradients(dream, x, expected)


def _assert_same_output_and_gradients(dream, x, expected):
    """``dream(x)`` equals ``expected``, and so do the gradients of every parameter and of ``x``."""
    out = dream(x)
    assert torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *dream.parameters()])
    ref = torch.autograd.grad(expected.pow(2).sum(), [x, *dream.parameters()])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-5)


def _kernel_or_torch(backend: str, monkeypatch, module, what: str) -> str:
    """``backend`` "kernel": keeps ``module``'s compiled kernel (the test skips where it is not built);
    "torch": turns it off for the test, so the torch code it replaces runs."""
    if backend == "kernel":
        lib, why = module.load_kernel()
        if lib is None:
            pytest.skip(f"{what} is not built here: {why}")
    else:
        monkeypatch.setattr(module, "load_kernel", lambda: (None, "off for this test"))
    return backend


@pytest.fixture(params=["kernel", "torch"])
def gate_backend(request, monkeypatch):
    """Runs a test with DREAM's compiled gate (csrc/dream_gate.c) and with the torch ops it replaces."""
    from recbole_mm.model.layers import dream as dream_mod

    return _kernel_or_torch(request.param, monkeypatch, dream_mod, "DREAM's gate kernel")


@pytest.mark.parametrize("keep_bytes", [0, 1 << 26], ids=["recomputed-F", "kept-F"])
@pytest.mark.parametrize("map_shape", [None, [48, 1, 1]])
def test_blockwise_dream_equals_the_direct_computation(monkeypatch, map_shape, keep_bytes, gate_backend):
    """_GatedMerge in blocks of 3 items (the last one shorter), with the compiled gate and without,
    with F recomputed in the backward and kept from the forward: output and every gradient as the
    direct computation's."""
    from recbole_mm.model.layers import dream as dream_mod
    from recbole_mm.model.layers.blocks import row_blocks

    torch.manual_seed(1)
    dream = DREAM(48, 16, map_shape=map_shape)
    c, h, w = dream.map_shape
    monkeypatch.setattr(dream_mod, "_BLOCK_VALUES", 3 * h * w * 5 * dream.point.out_channels)
    monkeypatch.setattr(dream_mod, "_KEEP_BYTES", keep_bytes)
    with torch.no_grad():
        dream.spatial_att[0].bias += 0.9  # at initialisation M_c >= M_s nearly everywhere; let both gates win
    x = torch.randn(50, 48, requires_grad=True)
    expected, _, m_c, m_s = _direct_dream(dream, x)
    assert 0.2 < (m_c >= m_s).float().mean() < 0.8
    with torch_threads(1):  # the block budget is per thread
        assert len(row_blocks(50, h * w * 5 * dream.point.out_channels, dream_mod._BLOCK_VALUES, torch.device("cpu"))) == 17
        _assert_same_output_and_gradients(dream, x, expected)


@pytest.mark.parametrize("keep", [False, True], ids=["recomputed-F", "kept-F"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_merge_gives_tied_gates_gradient_to_channel_attention(dtype, keep, gate_backend):
    """Eq. 6 with M_c >= M_s picking M_c: where the gates tie, M_c gets the gradient, as autograd's
    where(M_c >= M_s, M_c, M_s) would give it (ties forced by gates on a grid of quarters; the
    compiled gate takes float32, float64 runs the torch ops); with F kept from the forward pass
    and recomputed, and a second backward through the kept F (retain_graph) gives the same."""
    from recbole_mm.model.layers.dream import _GatedMerge

    g = torch.Generator().manual_seed(3)
    n, d, p, k, c = 9, 5, 4, 6, 2
    x, weight = torch.randn(n, d, generator=g), torch.randn(d, p * k, generator=g)
    bias = torch.randn(p * k, generator=g)
    m_c = torch.randint(1, 4, (n, k), generator=g) / 4.0
    m_s = torch.randint(1, 4, (n, p), generator=g) / 4.0
    merge_w = torch.randn(c, k, generator=g)
    inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias, m_c, m_s, merge_w)]
    assert (inputs[3][:, None, :] == inputs[4][:, :, None]).sum() > 20  # many ties
    x, weight, bias, m_c, m_s, merge_w = inputs
    gate = torch.where(m_c[:, None, :] >= m_s[:, :, None], m_c[:, None, :], m_s[:, :, None])
    expected = ((x @ weight + bias).view(n, p, k) * gate) @ merge_w.T
    out = _GatedMerge.apply(*inputs, keep)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, expected, atol=tol)
    upstream = torch.randn(n, p, c, generator=g).to(dtype)
    grads = torch.autograd.grad((out * upstream).sum(), inputs, retain_graph=True)
    ref = torch.autograd.grad((expected * upstream).sum(), inputs)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=tol)
    for a, b in zip(torch.autograd.grad((out * upstream).sum(), inputs), grads):
        assert torch.equal(a, b)


def test_dream_fusion_scales_the_signed_map_by_the_larger_gate():
    """Eq. 6: F * max(M_c, M_s); where F < 0 the literal max(F M_c, F M_s) would take the smaller gate."""
    torch.manual_seed(0)
    dream = DREAM(48, 16)
    x = torch.randn(20, 48)
    expected, fused, m_c, m_s = _direct_dream(dream, x)
    assert (fused < 0).float().mean() > 0.2  # a map with many negative entries
    assert torch.allclose(dream(x), expected, atol=1e-5)
    literal = dream.out(dream.merge(torch.maximum(fused * m_c, fused * m_s)).flatten(1))
    assert not torch.allclose(dream(x), literal, atol=1e-3)


def _off_centre(conv):
    mask = torch.ones_like(conv.weight, dtype=torch.bool)
    mask[:, :, 1, 1] = False
    return mask


def test_on_a_1x1_map_dilated_branches_are_their_centre_tap_1x1_conv(caplog):
    """Documents the degeneracy of the authors' [d, 1, 1] layout (module docstring of dream.py)."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.dream"):
        dream = DREAM(48, 16, map_shape=[48, 1, 1], dilations=[6, 12, 18])
    assert sum("reaches no neighbour" in r.getMessage() for r in caplog.records) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.dream"):
        DREAM(16, 16, map_shape=[16, 1, 1])  # default rates on a 1x1 map: 1, 1, 1, one warning
    assert sum("reaches no neighbour" in r.getMessage() for r in caplog.records) == 1
    x = torch.randn(5, 48, 1, 1)
    for conv in dream.dilated:
        centre = F.conv2d(x, conv.weight[:, :, 1:2, 1:2], conv.bias)
        assert torch.allclose(conv(x), centre, atol=1e-6)
    # the whole module ignores every off-centre weight (and they get no gradient) ...
    inp = torch.randn(5, 48)
    before = dream(inp)
    before.sum().backward()
    for conv in dream.dilated:
        assert conv.weight.grad[_off_centre(conv)].abs().max() == 0
    with torch.no_grad():
        for conv in dream.dilated:
            conv.weight[_off_centre(conv)] += 1.0
    assert torch.allclose(dream(inp), before, atol=1e-6)


def test_on_a_spatial_map_off_centre_taps_matter(caplog):
    # ... while on a 4x4 map with fitting rates they do, and no warning is logged
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="recbole_mm.model.layers.dream"):
        dream = DREAM(48, 16)
    assert not caplog.records
    inp = torch.randn(5, 48)
    before = dream(inp)
    with torch.no_grad():
        for conv in dream.dilated:
            conv.weight[_off_centre(conv)] += 1.0
    assert not torch.allclose(dream(inp), before, atol=1e-3)


# ---------------------------------------------------------------- graphs


def _dense_knn_reference(features, k, valid):
    """Brute force: full similarity matrix, top-k per row, symmetrise, self-loops, D^-1/2 A D^-1/2."""
    n = features.shape[0]
    normed = F.normalize(features, dim=1)
    sim = normed @ normed.T
    sim[:, ~valid] = -float("inf")
    sim.fill_diagonal_(-float("inf"))
    a = torch.zeros(n, n)
    for i in valid.nonzero().flatten().tolist():
        a[i, sim[i].topk(k).indices] = 1.0
    a = torch.maximum(a, a.T) + torch.diag(valid.float())
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * a * inv[None, :]


@pytest.mark.parametrize("block_size, item_block", [(7, 65536), (7, 5), (64, 11)])
def test_knn_graph_equals_dense_brute_force(block_size, item_block):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 6, generator=g)
    feats[0] = 0.0  # padding row: no features
    mask = torch.ones(30, dtype=torch.bool)
    mask[7] = False  # an item whose features are missing
    # several row and item blocks, partial ones, item blocks narrower than k and than a row block
    graph = build_knn_graph(feats, 4, mask=mask, block_size=block_size, item_block=item_block)
    valid = mask & (feats.abs().sum(1) > 0)
    expected = _dense_knn_reference(feats, 4, valid)
    dense = graph.to_dense()
    assert graph.is_sparse and graph.shape == (30, 30)
    assert torch.allclose(dense, expected, atol=1e-6)
    assert torch.equal(dense, dense.T)
    assert dense[0].abs().sum() == 0 and dense[7].abs().sum() == 0


def _peak_cpu_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def test_blockwise_knn_build_peaks_below_the_dense_similarity_matrix():
    n = 3000
    feats = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    blockwise = _peak_cpu_bytes(lambda: build_knn_graph(feats, 10, block_size=256))
    dense = _peak_cpu_bytes(lambda: (F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T).topk(11, dim=1))
    assert dense >= n * n * 4  # the n x n float32 similarity matrix
    assert blockwise < dense / 3


def test_knn_build_peak_is_bounded_by_the_item_block_not_the_catalogue():
    # a catalogue-scale build must not hold one row block against every item (4 GB at 1M items)
    n, rows = 12000, 1024
    feats = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    one_item_block = _peak_cpu_bytes(lambda: build_knn_graph(feats, 2, block_size=rows, item_block=n))
    item_blocks = _peak_cpu_bytes(lambda: build_knn_graph(feats, 2, block_size=rows, item_block=1024))
    assert one_item_block >= rows * n * 4  # the [rows, n] float32 similarity block
    assert item_blocks < rows * n * 4 / 3


def test_knn_graph_cache_is_reused_and_keyed_by_the_features(tmp_path, monkeypatch):
    feats = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    first = load_or_build_knn_graph(feats, 3, tmp_path, name="image")
    files = list(tmp_path.glob("knn_image_k3_*.pt"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cached graph must not be rebuilt")

    monkeypatch.setattr(graph_mod, "build_knn_graph", fail)
    again = load_or_build_knn_graph(feats, 3, tmp_path, name="image")
    assert torch.equal(again.to_dense(), first.to_dense())
    monkeypatch.undo()

    changed = feats.clone()
    changed[3] = -changed[3]
    other = load_or_build_knn_graph(changed, 3, tmp_path, name="image")
    assert len(list(tmp_path.glob("knn_image_k3_*.pt"))) == 2
    assert torch.allclose(other.to_dense(), build_knn_graph(changed, 3).to_dense())
    assert not torch.equal(other.to_dense(), first.to_dense())


def test_normalised_user_item_adjacency():
    users = torch.tensor([0, 0, 1, 2, 2, 2, 0])  # (0, 1) appears twice: counted once
    items = torch.tensor([1, 2, 2, 0, 1, 3, 1])
    r = torch.zeros(3, 4)
    r[users, items] = 1.0
    du, di = r.sum(1), r.sum(0)
    expected = r / du.sqrt()[:, None] / di.sqrt()[None, :]
    mat = normalized_interaction_matrix(users, items, 3, 4).to_dense()
    assert torch.allclose(mat, expected)
    adj = normalized_bipartite_adjacency(users, items, 3, 4).to_dense()
    assert adj.shape == (7, 7)
    assert torch.allclose(adj[:3, 3:], expected) and torch.allclose(adj[3:, :3], expected.T)
    assert adj[:3, :3].abs().sum() == 0 and adj[3:, 3:].abs().sum() == 0


@pytest.fixture(params=["kernel", "torch"])
def sparse_backend(request, monkeypatch):
    """Runs a test with sparse_matmul's compiled products (csrc/csr_matmul.c) and with torch's."""
    from recbole_mm.model.layers import graph as graph_mod

    return _kernel_or_torch(request.param, monkeypatch, graph_mod, "the CSR kernel")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [None, [4, 0, 4, 9]])  # a repeated row, the empty row 9
@pytest.mark.parametrize("symmetric", [False, True])
def test_sparse_matmul_equals_the_dense_product(sparse_backend, rows, symmetric, threads):
    """(A @ X)[rows] and its gradient in X equal the dense computation, for the compiled products
    and torch's, on one thread and on two (where a product over all rows is torch's)."""
    from recbole_mm.model.layers import graph as graph_mod
    from recbole_mm.model.layers.graph import sparse_matmul

    gen = torch.Generator().manual_seed(0)
    shape = (10, 10 if symmetric else 7)
    dense = torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.3)
    if symmetric:
        dense = dense + dense.T
        dense[:, 9] = 0.0
    dense[9] = 0.0
    a = dense.to_sparse().coalesce()
    a_t = None if symmetric else dense.T.to_sparse().coalesce()
    idx = None if rows is None else torch.tensor(rows)
    x = torch.randn(dense.shape[1], 40, generator=gen, requires_grad=True)
    weight = torch.randn(10 if idx is None else idx.numel(), 40, generator=gen)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = sparse_matmul(a, x, a_t, rows=idx)
        (grad,) = torch.autograd.grad((got * weight).sum(), x)
        compiled = graph_mod._kernel_for(a, x, idx) is not None
    finally:
        torch.set_num_threads(old_threads)
    expected = dense @ x if idx is None else (dense @ x)[idx]
    (ref,) = torch.autograd.grad((expected * weight).sum(), x)
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(grad, ref, atol=1e-6)
    if idx is not None:
        assert torch.all(got[3] == 0)  # row 9 has no entries
    assert compiled == (sparse_backend == "kernel" and (idx is not None or threads == 1))


def test_sparse_matmul_rejects_what_the_kernel_would_read_out_of_bounds(sparse_backend):
    """A dense side that does not fit the matrix raises ValueError, a row outside it IndexError."""
    from recbole_mm.model.layers.graph import sparse_matmul

    a = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]).to_sparse().coalesce()
    with pytest.raises(ValueError, match="does not fit"):
        sparse_matmul(a, torch.randn(2, 4))
    for bad in ([0, 2], [-1]):
        with pytest.raises(IndexError, match="rows must lie in"):
            sparse_matmul(a, torch.randn(3, 4), rows=torch.tensor(bad))
    got = sparse_matmul(a, torch.ones(3, 4), rows=torch.tensor([1], dtype=torch.int32))  # any int dtype
    assert torch.equal(got, torch.full((1, 4), 4.0))


def test_sparse_matmul_float64_runs_torchs_product(sparse_backend):
    """The compiled products are float32 only; a float64 product takes torch's, exactly."""
    from recbole_mm.model.layers.graph import sparse_matmul

    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    got = sparse_matmul(dense.to_sparse().coalesce(), x, dense.T.to_sparse().coalesce(), rows=torch.tensor([1]))
    assert got.dtype == torch.float64 and torch.allclose(got, (dense @ x)[1:])


# ---------------------------------------------------------------- model (needs the foundation)

BASE = {
    "modalities": ["image", "text"],
    "embedding_size": 16,
    "reduction_ratio": 2,  # planted dims (32, 24) -> d = 12 -> a 1x3x4 map
    "knn_k": 5,
    "train_batch_size": 256,
    "learning_rate": 0.01,
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"},
    "show_progress": False,
    "state": "WARNING",
    "seed": 2025,
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_paths(tmp_path_factory.mktemp("mambarec"))


def _prepare(planted, model="MambaRec", **overrides):
    from recbole_mm.config import Config
    from recbole_mm.registry import create_dataset

    config = Config(model=model, dataset="planted", config_dict={**BASE, **planted, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    return config, train, valid, test


def _model(planted, **overrides):
    from recbole_mm.registry import get_model

    config, train, valid, test = _prepare(planted, **overrides)
    return get_model("MambaRec")(config, train._dataset), train


def test_registry_finds_mambarec():
    from recbole_mm.model.general_recommender import MambaRec
    from recbole_mm.registry import get_model

    assert get_model("MambaRec") is MambaRec


def test_reduction_dream_and_loss_terms(planted):
    model, train = _model(planted)
    assert [v.reduce.out_features for v in model.views] == [12, 12]  # floor(min(32, 24) / 2)
    assert [v.reduce.in_features for v in model.views] == [32, 24]
    dreams = [v.refine for v in model.views]
    assert all(isinstance(m, DREAM) for m in dreams) and dreams[0] is not dreams[1]
    assert dreams[0].map_shape == (1, 3, 4)
    assert not any(k.startswith("views.0.features") or "item_graph" in k for k in model.state_dict())

    model.train()
    batch = next(iter(train))
    losses = model.calculate_loss(batch)
    assert len(losses) == 4 and all(torch.isfinite(t) and t.dim() == 0 for t in losses)
    bpr, cl, mmd, reg = losses
    assert cl.item() != 0 and mmd.item() != 0 and reg.item() > 0
    sum(losses).backward()
    one = model.calculate_loss(batch[:1])  # a last batch of one interaction: no alignment terms
    assert one[1].item() == 0 and one[2].item() == 0 and torch.isfinite(one[0])
    for name in ("user_embedding.weight", "item_embedding.weight", "views.0.refine.dilated.0.weight",
                 "views.1.reduce.weight", "fuser.query.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_switches(planted):
    model, train = _model(planted, use_dream=False, use_mmd=False, dream_shared=True)
    assert all(isinstance(v.refine, torch.nn.Linear) for v in model.views)
    model.train()
    _, cl, mmd, _ = model.calculate_loss(next(iter(train)))
    assert mmd.item() == 0 and cl.item() != 0

    shared, _ = _model(planted, dream_shared=True, dream_map_shape=[12, 1, 1])
    assert shared.views[0].refine is shared.views[1].refine
    assert shared.views[0].refine.map_shape == (12, 1, 1)

    single, train = _model(planted, modalities=["image"], cl_views="modalities")
    assert len(single.views) == 1 and single.views[0].reduce.out_features == 16  # floor(32 / 2)
    single.train()
    _, cl, mmd, _ = single.calculate_loss(next(iter(train)))
    assert cl.item() == 0 and mmd.item() == 0
    # reduced_dim keeps the full model's d in the single-modality ablation
    kept, _ = _model(planted, modalities=["image"], reduced_dim=12)
    assert kept.views[0].reduce.out_features == 12 and kept.views[0].refine.map_shape == (1, 3, 4)
    trained, _ = _model(planted, train_features=True)
    assert all(isinstance(v.features, torch.nn.Parameter) for v in trained.views)
    assert "views.0.features" in trained.state_dict()


def test_loss_terms_are_logged_with_their_gradient_at_the_modality_embeddings(planted, caplog):
    """``log_loss_terms``: each term's value and |d term / d h^m| (both modalities together), by
    hand from a second encoding of the same batch (no dropout: the same values)."""
    model, train = _model(planted, modality_dropout=0.0, log_loss_terms=True)
    model.train()
    batch = next(iter(train))
    losses = model.calculate_loss(batch)
    report = model.term_log.report()
    assert list(report) == list(model.loss_names) == ["bpr", "cl", "mmd", "reg"]
    assert [v for v, _ in report.values()] == pytest.approx([t.item() for t in losses])
    _, enc, items = model.loss_terms(batch)
    sets = [F.normalize(h[items], dim=-1) for h in enc.embeddings]
    mmd, cl = model.alignment_losses(sets)
    for name, term in (("mmd", model.mmd_weight * mmd), ("cl", model.cl_weight * cl)):
        grads = torch.autograd.grad(term, enc.embeddings, retain_graph=True)
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        assert expected > 0 and report[name][1] == pytest.approx(expected, rel=1e-4), name
    assert report["bpr"][1] > 0 and report["reg"][1] == 0  # the ego L2 does not reach h^m
    with caplog.at_level(logging.INFO):
        model.eval()
    assert "MambaRec loss terms (mean value, |grad at h^m|, share of bpr's): bpr " in caplog.text
    assert model.term_log.report() == {}
    assert _model(planted)[0].term_log is None  # off unless asked
    with pytest.raises(ValueError, match="log_loss_terms must be"):
        _model(planted, log_loss_terms=0)


def test_loss_terms_logged_on_one_batch_in_n(planted):
    model, train = _model(planted, modality_dropout=0.0, log_loss_terms=3)
    model.train()
    batches = list(train)[:4]
    assert len(batches) == 4
    values = [model.calculate_loss(b)[0].item() for b in batches]  # BPR per batch
    # batches 1 and 4 measured, 2 and 3 not
    assert model.term_log.report()["bpr"][0] == pytest.approx((values[0] + values[3]) / 2)


def test_cached_full_sort_equals_predict_and_is_cleared_on_train(planted):
    model, train = _model(planted)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sum(model.calculate_loss(next(iter(train)))).backward()
    opt.step()  # move away from the initial parameters
    model.eval()
    n_users, n_items = model.n_users, model.n_items
    users = torch.arange(n_users)
    full = model.full_sort_predict({model.USER_ID: users}).view(n_users, n_items)
    assert model.restore_user_e is not None and model.restore_item_e is not None
    pairs = {model.USER_ID: users.repeat_interleave(n_items), model.ITEM_ID: torch.arange(n_items).repeat(n_users)}
    assert torch.allclose(model.predict(pairs).view(n_users, n_items), full, atol=1e-5)
    with torch.no_grad():
        u, i, _ = model.forward()
    assert torch.allclose(full, u @ i.T, atol=1e-5)

    # a checkpoint holds the parameters only (features and graphs are rebuilt from the dataset)
    reloaded, _ = _model(planted)
    reloaded.load_state_dict(model.state_dict())
    reloaded.eval()
    assert torch.allclose(reloaded.full_sort_predict({model.USER_ID: users}).view(n_users, n_items), full, atol=1e-5)

    model.train()
    assert model.restore_user_e is None and model.restore_item_e is None
    sum(model.calculate_loss(next(iter(train)))).backward()
    opt.step()
    model.eval()
    after = model.full_sort_predict({model.USER_ID: users}).view(n_users, n_items)
    assert not torch.allclose(after, full, atol=1e-4)  # a stale cache would return the old scores


def test_training_beats_untrained_and_popularity(planted, tmp_path, monkeypatch):
    from recbole_mm.registry import get_model, get_trainer

    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes ./log_tensorboard
    config, train, valid, test = _prepare(planted, epochs=4, stopping_step=10)
    model = get_model("MambaRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "MambaRec")(config, model)
    untrained = trainer.evaluate(test, load_best_model=False, show_progress=False)["recall@10"]
    trainer.fit(train, valid, saved=False, show_progress=False)
    trained = trainer.evaluate(test, load_best_model=False, show_progress=False)["recall@10"]

    pop = get_model("Pop")(config, train._dataset)
    for batch in train:  # Pop's "training" counts the positive items
        pop.calculate_loss(batch)
    popular = get_trainer(config["MODEL_TYPE"], "Pop")(config, pop).evaluate(
        test, load_best_model=False, show_progress=False)["recall@10"]
    assert trained > untrained + 0.2, (trained, untrained)
    assert trained > popular + 0.2, (trained, popular)


# ---------------------------------------------------------------- feature normalisation, gate norm, CL views


def test_normalize_features_modes():
    from recbole_mm.model.layers.multiview import normalize_features

    torch.manual_seed(0)
    feats = torch.randn(9, 5) * 7 + 3
    feats[0] = 0  # padding row
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False  # an item without features
    assert torch.equal(normalize_features(feats, "none", mask), feats)

    std = normalize_features(feats, "standard", mask)
    valid = torch.tensor([i not in (0, 4) for i in range(9)])
    assert torch.allclose(std[valid].mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(std[valid].std(0, unbiased=False), torch.ones(5), atol=1e-5)
    assert std[0].abs().sum() == 0 and std[4].abs().sum() == 0

    l2 = normalize_features(feats, "l2", mask)
    assert torch.allclose(l2[valid].norm(dim=1), torch.ones(int(valid.sum())), atol=1e-5)
    assert l2[0].abs().sum() == 0 and l2[4].abs().sum() == 0
    with pytest.raises(ValueError, match="feature_norm"):
        normalize_features(feats, "zscore", mask)


def test_feature_norm_option_reaches_the_model(planted):
    model, _ = _model(planted, feature_norm="standard")
    for view in model.views:
        rows = view.features[view.features.abs().sum(1) > 0]
        assert torch.allclose(rows.mean(0), torch.zeros(rows.shape[1]), atol=1e-4)
        assert torch.allclose(rows.std(0, unbiased=False), torch.ones(rows.shape[1]), atol=1e-4)
    with pytest.raises(ValueError, match="feature_norm"):
        _model(planted, feature_norm="bogus")


def test_side_content_cl_and_modality_layernorm(planted):
    model, train = _model(planted, cl_views="side_content", modality_layernorm=True, modality_dropout=0.2)
    assert all(isinstance(v.norm, torch.nn.LayerNorm) for v in model.views)
    model.train()
    batch = next(iter(train))
    bpr, cl, mmd, reg = model.calculate_loss(batch)
    assert cl.item() > 0 and torch.isfinite(cl)
    cl.backward()
    for name in ("user_embedding.weight", "item_embedding.weight", "views.0.gate.weight", "views.1.norm.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name

    single, train = _model(planted, modalities=["image"], cl_views="side_content")
    single.train()
    assert single.calculate_loss(next(iter(train)))[1].item() > 0  # needs no second modality
    with pytest.raises(ValueError, match="cl_views"):
        _model(planted, cl_views="bogus")


def test_mmd_on_normalised_modality_embeddings(planted):
    model, train = _model(planted, mmd_input="embeddings", use_cl=False)
    model.train()
    _, cl, mmd, _ = model.calculate_loss(next(iter(train)))
    assert cl.item() == 0 and mmd.item() != 0
    mmd.backward()
    assert model.get_parameter("views.0.reduce.weight").grad.abs().sum() > 0
    assert model.get_parameter("item_embedding.weight").grad is None  # h^m does not involve the ID table
    with pytest.raises(ValueError, match="mmd_input"):
        _model(planted, mmd_input="bogus")


def test_alignment_losses_share_their_sets_and_switch(planted):
    model, _ = _model(planted)
    torch.manual_seed(0)
    sets = [torch.randn(6, 4), torch.randn(6, 4) + 1]
    mmd, cl = model.alignment_losses(sets)
    assert torch.allclose(mmd, model.mmd_loss(*sets)) and torch.allclose(cl, model.infonce_loss(*sets))
    mmd2, cl2 = model.alignment_losses(sets, with_cl=False)
    assert torch.allclose(mmd2, mmd) and cl2.item() == 0
    mmd3, cl3 = model.alignment_losses(sets, with_mmd=False)
    assert mmd3.item() == 0 and torch.allclose(cl3, cl)


@pytest.mark.parametrize("mmd_input", ["embeddings", "views"])
def test_default_infonce_contrasts_the_sets_the_mmd_compares(planted, monkeypatch, mmd_input):
    """Eq. 7-10: InfoNCE and MMD on the same two sets; by default the L2-normalised modality
    embeddings h^m of the batch's distinct positive items, row i = the same item in both."""
    model, train = _model(planted, mmd_input=mmd_input, modality_dropout=0.0)  # no dropout: sets reproducible
    assert model.cl_views == "modalities"
    seen = {}
    for name in ("mmd_loss", "infonce_loss"):
        module = getattr(model, name)
        monkeypatch.setattr(module, "forward", lambda a, b, n=name, f=module.forward: seen.setdefault(n, (a, b)) and f(a, b))
    model.train()
    batch = next(iter(train))
    _, cl, mmd, _ = model.calculate_loss(batch)
    assert cl.item() != 0 and mmd.item() != 0
    for a, b in zip(seen["mmd_loss"], seen["infonce_loss"]):
        assert torch.equal(a, b)
    items = torch.unique(batch[model.ITEM_ID])
    with torch.no_grad():
        if mmd_input == "embeddings":
            expected = [F.normalize(view.modality_embeddings()[items], dim=-1) for view in model.views]
        else:
            expected = [v[items] for v in model.forward()[2]]
    for got, want in zip(seen["infonce_loss"], expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_switched_off_alignment_terms_are_not_computed(planted, monkeypatch):
    """"w/o GA" and MGCN's side-vs-content InfoNCE leave the MMD / the modality InfoNCE out of the step."""
    model, train = _model(planted, use_mmd=False, cl_views="modalities")
    monkeypatch.setattr(model.mmd_loss, "forward", lambda *a: pytest.fail("MMD computed with use_mmd false"))
    model.train()
    _, cl, mmd, _ = model.calculate_loss(next(iter(train)))
    assert mmd.item() == 0 and cl.item() > 0

    model, train = _model(planted, use_mmd=False, cl_views="side_content")
    monkeypatch.setattr(model.mmd_loss, "forward", lambda *a: pytest.fail("MMD computed with use_mmd false"))
    original = model.infonce_loss.forward
    calls = []
    monkeypatch.setattr(model.infonce_loss, "forward", lambda a, b: calls.append(a.shape) or original(a, b))
    model.train()
    batch = next(iter(train))
    _, cl, mmd, _ = model.calculate_loss(batch)
    assert mmd.item() == 0 and cl.item() > 0
    assert len(calls) == 2  # side vs content, items and users; none between modality views


def _reference_mmd(mmd, x, y):
    """Unbiased MMD^2 through autograd from the distance form of the kernel (the reference for
    MMDLoss's hand-written backward)."""
    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s**2)) for s in mmd.bandwidth)

    def off_diagonal_mean(k):
        return (k.sum() - k.diagonal().sum()) / (k.shape[0] * (k.shape[0] - 1))

    return off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y)) - 2 * off_diagonal_mean(kernel(x, y))


def test_fast_paths_give_the_reference_loss_and_gradients(planted, monkeypatch):
    """The whole training step with the blockwise DREAM and the hand-written MMD backward against the
    direct DREAM and an autograd MMD: the same four loss terms and the same gradient of every parameter."""
    from recbole_mm.model.loss.mmd import MMDLoss

    model, train = _model(planted)
    model.train()
    batch = next(iter(train))

    def step():
        torch.manual_seed(7)  # the same dropout masks
        model.zero_grad()
        losses = model.calculate_loss(batch)
        sum(losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.stack(losses).detach(), grads

    losses, grads = step()
    monkeypatch.setattr(DREAM, "forward", lambda self, x: _direct_dream(self, x)[0])
    monkeypatch.setattr(MMDLoss, "forward", _reference_mmd)
    ref_losses, ref_grads = step()
    assert losses[2] != 0 and torch.allclose(losses, ref_losses, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-8)
        assert ((grad - ref_grads[name]).abs().max() / scale) < 1e-4, name
