"""MGCN: shared pieces with MambaRec, shapes, gradients, kNN graph, cached ranking, training, lr decay."""

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.layers.multiview import ModalityView, ViewFuser
from test_mambarec import _dense_knn_reference, _prepare, planted  # noqa: F401  (planted: the fixture)


def _mgcn(planted, **overrides):
    from recbole_mm.registry import get_model

    config, train, valid, test = _prepare(planted, model="MGCN", **overrides)
    return get_model("MGCN")(config, train._dataset), train


def test_registry_finds_mgcn_and_mambarec_is_mgcn_plus_alignment():
    from recbole_mm.model.general_recommender.mambarec import MambaRec
    from recbole_mm.model.general_recommender.mgcn import MGCN
    from recbole_mm.registry import get_model, get_trainer
    from recbole_mm.trainer.lr_decay_trainer import LRDecayTrainer

    assert get_model("MGCN") is MGCN and issubclass(MambaRec, MGCN)
    assert issubclass(get_trainer(MGCN.type, "MGCN"), LRDecayTrainer)


def test_mgcn_pieces_shapes_and_loss(planted):
    model, train = _mgcn(planted)
    # MGCN's projection: one linear map per modality to the embedding size, then the purifier gate
    assert all(isinstance(v, ModalityView) and isinstance(v.refine, torch.nn.Identity) for v in model.views)
    assert [(v.reduce.in_features, v.reduce.out_features) for v in model.views] == [(32, 16), (24, 16)]
    assert isinstance(model.fuser, ViewFuser) and not hasattr(model, "mmd_loss")
    assert all(isinstance(v.features, torch.nn.Parameter) for v in model.views)  # train_features: true
    assert all(isinstance(v.norm, torch.nn.Identity) and v.dropout.p == 0 for v in model.views)

    model.eval()
    with torch.no_grad():
        users, items, views = model.forward()
    assert users.shape == (model.n_users, 16) and items.shape == (model.n_items, 16)
    assert [v.shape for v in views] == [(model.n_items, 16)] * 2

    model.train()
    batch = next(iter(train))
    losses = model.calculate_loss(batch)
    assert len(losses) == 3 and all(torch.isfinite(t) and t.dim() == 0 for t in losses)
    bpr, cl, reg = losses
    assert bpr.item() > 0 and cl.item() > 0 and reg.item() > 0
    sum(losses).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mgcn_loss_terms_by_hand(planted):
    """BPR on e* = e_id + e_side, InfoNCE(e_side, e_id) on the distinct items + users, L2 on the
    batch's final embeddings (reg_embeddings: final), from a full encoding."""
    model, train = _mgcn(planted)
    model.eval()  # the same graph computation, no dropout anywhere in MGCN anyway
    batch = next(iter(train))
    user, pos, neg = batch[model.USER_ID], batch[model.ITEM_ID], batch[model.NEG_ITEM_ID]
    with torch.no_grad():
        bpr, cl, reg = model.calculate_loss(batch)
        enc = model.encode()
        u, ip, ineg = enc.users[user], enc.items[pos], enc.items[neg]
        exp_bpr = -F.logsigmoid((u * ip).sum(-1) - (u * ineg).sum(-1)).mean()
        exp_reg = (u.pow(2).sum() + ip.pow(2).sum() + ineg.pow(2).sum()) / (2 * len(user))
        items, users = torch.unique(pos), torch.unique(user)
        exp_cl = (model.infonce_loss(enc.side_items[items], enc.content_items[items])
                  + model.infonce_loss(enc.side_users[users], enc.content_users[users]))
    assert bpr.item() == pytest.approx(exp_bpr.item(), rel=1e-5)
    assert reg.item() == pytest.approx(model.reg_weight * exp_reg.item(), rel=1e-5)
    assert cl.item() == pytest.approx(model.cl_weight * exp_cl.item(), rel=1e-5)
    # the side view is e* - e_id, and the fuser run on the batch's rows equals the full one
    assert torch.allclose(enc.users - enc.content_users, enc.side_users)
    rows = torch.unique(torch.cat([pos, neg]))
    with torch.no_grad():
        part = model.encode(users, rows)
    assert torch.allclose(part.items, enc.items[rows], atol=1e-6)
    assert torch.allclose(part.users, enc.users[users], atol=1e-6)


@pytest.mark.parametrize("n_ui_layers", [0, 1, 3])
def test_content_view_is_lightgcn_over_the_whole_adjacency(planted, n_ui_layers):
    """The content view from the two user-item blocks equals LightGCN's mean of layers over the
    dense normalised adjacency D^-1/2 [[0, R], [R^T, 0]] D^-1/2, values and gradients, for all rows
    and for a batch's rows."""
    from recbole_mm.model.layers.graph import normalized_bipartite_adjacency

    model, train = _mgcn(planted, n_ui_layers=n_ui_layers)
    inter = train._dataset.inter_matrix(form="coo")
    adj = normalized_bipartite_adjacency(torch.from_numpy(inter.row), torch.from_numpy(inter.col),
                                         model.n_users, model.n_items).to_dense()
    layer = torch.cat([model.user_embedding.weight, model.item_embedding.weight])
    layers = [layer]
    for _ in range(n_ui_layers):
        layers.append(adj @ layers[-1])
    expected = torch.split(torch.stack(layers).mean(0), [model.n_users, model.n_items])
    got = model._content_view()
    weight = torch.randn(model.n_users + model.n_items, 16)
    tables = [model.user_embedding.weight, model.item_embedding.weight]
    grads = torch.autograd.grad((torch.cat(got) * weight).sum(), tables)
    ref = torch.autograd.grad((torch.cat(expected) * weight).sum(), tables, retain_graph=True)
    for a, b in zip([*got, *grads], [*expected, *ref]):
        assert torch.allclose(a, b, atol=1e-6)
    # at a batch's users and items (the last layer computed at those rows only), with repeats
    users, items = torch.tensor([3, 0, 3, model.n_users - 1]), torch.tensor([1, 5, 2, 5])
    got = model._content_view(users, items)
    grads = torch.autograd.grad((torch.cat(got) * weight[:8]).sum(), tables)
    picked = (expected[0][users], expected[1][items])
    ref = torch.autograd.grad((torch.cat(picked) * weight[:8]).sum(), tables)
    for a, b in zip([*got, *grads], [*picked, *ref]):
        assert torch.allclose(a, b, atol=1e-6)


def test_mgcn_knn_graph_equals_brute_force(planted):
    model, _ = _mgcn(planted, feature_norm="none")
    for view in model.views:
        feats = view.features.detach()
        valid = feats.abs().sum(1) > 0
        expected = _dense_knn_reference(feats, 5, valid)
        assert torch.allclose(view.item_graph.to_dense(), expected, atol=1e-6)


def test_mgcn_cached_full_sort_equals_predict(planted):
    model, train = _mgcn(planted)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sum(model.calculate_loss(next(iter(train)))).backward()
    opt.step()
    model.eval()
    n_users, n_items = model.n_users, model.n_items
    users = torch.arange(n_users)
    full = model.full_sort_predict({model.USER_ID: users}).view(n_users, n_items)
    pairs = {model.USER_ID: users.repeat_interleave(n_items), model.ITEM_ID: torch.arange(n_items).repeat(n_users)}
    assert torch.allclose(model.predict(pairs).view(n_users, n_items), full, atol=1e-5)
    # trainable features are parameters, so a checkpoint restores them
    reloaded, _ = _mgcn(planted)
    reloaded.load_state_dict(model.state_dict())
    reloaded.eval()
    assert torch.allclose(reloaded.full_sort_predict({model.USER_ID: users}).view(n_users, n_items), full, atol=1e-5)


def test_mgcn_options(planted):
    ego, train = _mgcn(planted, reg_embeddings="ego", train_features=False)
    assert not any(isinstance(v.features, torch.nn.Parameter) for v in ego.views)
    ego.train()
    batch = next(iter(train))
    reg = ego.calculate_loss(batch)[2]
    user, pos, neg = batch[ego.USER_ID], batch[ego.ITEM_ID], batch[ego.NEG_ITEM_ID]
    expected = ego.emb_reg_loss(ego.user_embedding(user), ego.item_embedding(pos), ego.item_embedding(neg))
    assert reg.item() == pytest.approx(ego.reg_weight * expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reg_embeddings"):
        _mgcn(planted, reg_embeddings="bogus")


@pytest.mark.parametrize("side, scale", [("half", 0.5), ("full", 1.0)])
def test_single_modality_side_view(planted, side, scale):
    """One modality: the specific part is zero, so e_side is the item view times 1/2 (MGCN's
    divisor M + 1) or times 1; with two modalities the key changes nothing."""
    model, _ = _mgcn(planted, modalities=["image"], single_modality_side=side)
    model.eval()
    with torch.no_grad():
        enc = model.encode()
    assert torch.allclose(enc.side_items, scale * enc.item_views[0], atol=1e-6)
    torch.manual_seed(0)
    views, content = [torch.randn(5, 16), torch.randn(5, 16)], torch.randn(5, 16)
    two = ViewFuser(16, 2, side)
    reference = ViewFuser(16, 2)
    reference.load_state_dict(two.state_dict())
    assert torch.equal(two(views, content), reference(views, content))
    with pytest.raises(ValueError, match="single_modality_side"):
        ViewFuser(16, 1, "double")


def test_mgcn_training_beats_popularity_and_decays_the_learning_rate(planted, tmp_path, monkeypatch):
    from recbole_mm.registry import get_model, get_trainer

    monkeypatch.chdir(tmp_path)
    config, train, valid, test = _prepare(planted, model="MGCN", epochs=4, stopping_step=10, lr_decay=[0.5, 2])
    model = get_model("MGCN")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "MGCN")(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    trained = trainer.evaluate(test, load_best_model=False, show_progress=False)["recall@10"]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** (3 / 2))  # last epoch: 3

    pop = get_model("Pop")(config, train._dataset)
    for batch in train:
        pop.calculate_loss(batch)
    popular = get_trainer(config["MODEL_TYPE"], "Pop")(config, pop).evaluate(
        test, load_best_model=False, show_progress=False)["recall@10"]
    assert trained > popular + 0.2, (trained, popular)
    with pytest.raises(ValueError, match="lr_decay"):
        get_trainer(config["MODEL_TYPE"], "MGCN")(
            _prepare(planted, model="MGCN", lr_decay=[1.5, 2])[0], model)
