"""The multimodal baselines of FindRec's and MambaRec's Table 2: Mamba4Rec, Mamba4Rec (MM), SASRec (MM),
MMMLP (sequential) and VBPR, FREEDOM (general) — their shared pieces, shapes, gradients, full ranking,
learning on the planted dataset, and (multimodal models) that the features carry the gain."""

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_mm.model.general_recommender.freedom import degree_sensitive_edges, modality_weights
from recbole_mm.model.layers.item_features import ItemFeatureEmbedding, ItemFeatureProjection
from recbole_mm.model.sequential_recommender.mamba4rec import Mamba4RecLayer

from conftest import planted_paths


SEQUENTIAL = ["Mamba4Rec", "Mamba4RecMM", "SASRecMM", "MMMLP"]
GENERAL = ["VBPR", "FREEDOM"]
#: how a multimodal model shows that it needs its features (see the last test). MMMLP scores with the
#: ID embeddings only and its ID stream alone learns the planted successor: trained on shuffled
#: features it measured the same NDCG@10 (0.8467 vs 0.8463, 3 epochs), so its check is that the
#: trained model relies on its feature streams.
FEATURE_CHECK = {"Mamba4RecMM": "train", "SASRecMM": "train", "VBPR": "train", "FREEDOM": "train", "MMMLP": "eval"}

COMMON = {
    "modalities": ["image", "text"], "show_progress": False, "state": "WARNING", "seed": 2025,
    "train_batch_size": 256, "eval_batch_size": 4096, "metrics": ["Recall", "NDCG"], "topk": [10],
}
SEQ = {  # tiny versions of every sequential baseline's own keys
    **COMMON, "hidden_size": 16, "num_layers": 1, "n_layers": 1, "n_heads": 1, "inner_size": 32, "d_state": 4,
    "mamba_backend": "torch", "dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1,
    "MAX_ITEM_LIST_LENGTH": 10, "learning_rate": 0.005, "valid_metric": "NDCG@10",
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
}
GEN = {
    **COMMON, "embedding_size": 16, "knn_k": 5, "learning_rate": 0.01, "valid_metric": "Recall@10",
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"},
}
EPOCHS = 3  # enough on the planted data for every model to pass Pop by a wide margin
METRIC = {**{m: "ndcg@10" for m in SEQUENTIAL}, **{m: "recall@10" for m in GENERAL}}


# tiny models: OpenMP synchronisation between 2 threads costs more than the work
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return planted_paths(tmp_path_factory.mktemp("baselines"))


def _prepare(data, model, **overrides):
    from recbole_mm.config import Config
    from recbole_mm.registry import create_dataset

    base = SEQ if model in SEQUENTIAL else GEN
    config = Config(model=model, dataset="planted", config_dict={**base, **data, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    return config, train, valid, test


def _model(data, model, **overrides):
    from recbole_mm.registry import get_model

    config, train, valid, test = _prepare(data, model, **overrides)
    return get_model(model)(config, train._dataset), train


def _total(loss):
    return sum(loss) if isinstance(loss, tuple) else loss


# ------------------------------------------------------------------ shared pieces


def test_item_feature_embedding_is_id_plus_projected_features_and_acts_as_the_table():
    g = torch.Generator().manual_seed(0)
    feats = {"image": torch.randn(5, 3, generator=g), "text": torch.randn(5, 2, generator=g)}
    feats["image"][0] = 0  # padding row
    ids = torch.nn.Embedding(5, 4, padding_idx=0)
    table = ItemFeatureEmbedding(ids, feats)
    w_img, w_txt = (m.weight for m in table.projection.maps)
    expected = ids.weight + feats["image"] @ w_img.T + feats["text"] @ w_txt.T
    torch.testing.assert_close(table.weight, expected)
    seq = torch.tensor([[1, 2, 0], [4, 4, 3]])
    torch.testing.assert_close(table(seq), expected[seq])
    # no bias: an item without a feature row gets nothing from that view
    assert table.projection(torch.tensor([0]))[0].abs().sum() == 0
    assert not any("feature" in k for k in table.state_dict())  # features are not checkpointed
    assert [m.in_features for m in ItemFeatureProjection(feats, 7).maps] == [3, 2]


def test_item_id_dropout_scores_some_items_by_their_features_alone_in_training_only():
    # item_id_dropout: in training each vector is E_id + W f or, with probability p, W f alone
    # (never rescaled); evaluation always uses both parts
    g = torch.Generator().manual_seed(1)
    n, d = 4000, 6
    feats = {"text": torch.randn(n, 3, generator=g)}
    table = ItemFeatureEmbedding(torch.nn.Embedding(n, d), feats, id_dropout=0.3)
    full = table.id_embedding.weight + feats["text"] @ table.projection.maps[0].weight.T
    features_only = full - table.id_embedding.weight
    table.eval()
    torch.testing.assert_close(table.weight, full)
    seq = torch.randint(0, n, (50, 40), generator=g)
    torch.testing.assert_close(table(seq), full[seq])
    table.train()
    torch.manual_seed(0)
    for rows, whole, alone in ((table.weight, full, features_only), (table(seq), full[seq], features_only[seq])):
        rows, whole, alone = rows.reshape(-1, d), whole.reshape(-1, d), alone.reshape(-1, d)
        dropped = torch.isclose(rows, alone, atol=1e-5).all(1)
        assert (dropped | torch.isclose(rows, whole, atol=1e-5).all(1)).all()  # each row is one of the two
        assert abs(dropped.float().mean().item() - 0.3) < 0.03
    rows = table.weight
    rows.sum().backward()  # a dropped row sends no gradient to its ID embedding
    grad = table.id_embedding.weight.grad
    assert ((grad == 0).all(1) == torch.isclose(rows, features_only, atol=1e-5).all(1)).all()
    with pytest.raises(ValueError, match="item_id_dropout must be in"):
        ItemFeatureEmbedding(torch.nn.Embedding(n, d), feats, id_dropout=1.0)


def test_mamba4rec_layer_is_post_norm_and_drops_the_residual_for_a_single_layer():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for residual in (False, True):
        layer = Mamba4RecLayer(8, d_state=4, d_conv=4, expand=2, dropout=0.0, residual=residual, backend="torch").eval()
        mixed = layer.mamba(x)
        h = layer.norm(mixed + x if residual else mixed)
        torch.testing.assert_close(layer(x), layer.ffn_norm(layer.ffn(h) + h))
        # causal: changing the last position changes nothing before it
        y = x.clone()
        y[:, -1] += 1.0
        torch.testing.assert_close(layer(y)[:, :-1], layer(x)[:, :-1])


def test_freedom_modality_weights_and_degree_sensitive_pruning():
    assert modality_weights(1, 0.1) == [1.0]
    assert modality_weights(2, 0.1) == pytest.approx([0.1, 0.9])
    assert modality_weights(3, 0.4) == pytest.approx([0.4, 0.3, 0.3])
    with pytest.raises(ValueError, match="mm_image_weight"):
        modality_weights(2, 1.5)
    weights = torch.tensor([1.0] * 50 + [0.01] * 50)  # 1/sqrt(d_u d_i): low for edges between popular nodes
    g = torch.Generator().manual_seed(0)
    kept = torch.stack([degree_sensitive_edges(weights, 0.2, g) for _ in range(50)])
    assert kept.shape == (50, 20) and all(row.unique().numel() == 20 for row in kept)  # without replacement
    assert (kept < 50).float().mean() > 0.9  # heavy (low-degree) edges are kept, light ones pruned


def test_freedom_prunes_the_user_item_graph_once_per_epoch_and_evaluates_on_the_full_one(data):
    model, train = _model(data, "FREEDOM", edge_dropout=0.5)
    n_edges = model.edge_weights.numel()
    model.train()
    batch = next(iter(train))
    model.calculate_loss(batch)
    first = model.pruned_adj
    assert first._nnz() == 2 * int(n_edges * 0.5)  # kept edges, both directions
    model.calculate_loss(batch)
    assert model.pruned_adj is first  # one graph per epoch
    model.train()  # RecBole's trainer starts every epoch with train()
    model.calculate_loss(batch)
    assert not torch.equal(model.pruned_adj.indices(), first.indices())
    model.eval()
    users, items = model.forward()
    assert model.ui_adj._nnz() == 2 * n_edges and users.shape == (model.n_users, 16)
    no_pruning, _ = _model(data, "FREEDOM", edge_dropout=0.0)
    assert no_pruning.prune_graph() is no_pruning.ui_adj
    with pytest.raises(ValueError, match="edge_dropout"):
        _model(data, "FREEDOM", edge_dropout=1.0)


# ------------------------------------------------------------------ every model


def test_registry_and_yaml_defaults(data):
    from recbole_mm.config import Config
    from recbole_mm.registry import get_model

    for name in SEQUENTIAL + GENERAL:
        assert get_model(name).__name__ == name

    def defaults(model):
        return Config(model=model, dataset="planted", config_dict={**data, "modalities": ["image", "text"]})

    config = defaults("Mamba4Rec")
    assert config["num_layers"] == 1 and config["d_state"] == 32 and config["loss_type"] == "CE"
    assert config["train_neg_sample_args"]["distribution"] == "none"
    assert defaults("Mamba4RecMM")["d_state"] == 32
    config = defaults("SASRecMM")  # SASRec's own defaults, from SASRecMM.yaml
    assert config["n_heads"] == 2 and config["inner_size"] == 256 and config["hidden_act"] == "gelu"
    config = defaults("FREEDOM")
    assert config["knn_k"] == 10 and config["edge_dropout"] == 0.8 and config["mm_image_weight"] == 0.1
    assert defaults("VBPR")["embedding_size"] == 64 and defaults("MMMLP")["loss_type"] == "CE"


@pytest.mark.parametrize("name", SEQUENTIAL + GENERAL)
def test_shapes_and_gradients_reach_every_parameter(data, name):
    model, train = _model(data, name)
    model.train()
    batch = next(iter(train))
    if name in SEQUENTIAL:
        assert model(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]).shape == (len(batch), 16)
    loss = _total(model.calculate_loss(batch))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    # features, graphs and edges are rebuilt from the dataset: checkpoints hold the parameters only
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(batch[:3])
    assert scores.numel() == 3 * model.n_items


@pytest.mark.parametrize("name", SEQUENTIAL + GENERAL)
def test_full_sort_predict_equals_predict_on_all_items(data, name):
    model, train = _model(data, name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _total(model.calculate_loss(next(iter(train)))).backward()
    opt.step()  # away from the initial parameters
    model.eval()
    n = model.n_items
    with torch.no_grad():
        if name in SEQUENTIAL:
            batch = next(iter(train))[:4]
            full = model.full_sort_predict(batch).view(4, n)
            pairs = {model.ITEM_SEQ: batch[model.ITEM_SEQ].repeat_interleave(n, 0),
                     model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN].repeat_interleave(n),
                     model.ITEM_ID: torch.arange(n).repeat(4)}
        else:
            users = torch.arange(1, 5)
            full = model.full_sort_predict({model.USER_ID: users}).view(4, n)
            pairs = {model.USER_ID: users.repeat_interleave(n), model.ITEM_ID: torch.arange(n).repeat(4)}
        torch.testing.assert_close(model.predict(pairs).view(4, n), full, rtol=1e-5, atol=1e-5)
    if name in GENERAL:  # the cached representations are dropped once training resumes
        model.train()
        _total(model.calculate_loss(next(iter(train)))).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model.full_sort_predict({model.USER_ID: users}).view(4, n), full, atol=1e-4)


def _shuffle_features(dataset, seed=0):
    """Permute the feature rows over the real items: every item keeps a feature row, but not its own."""
    perm = torch.cat([torch.zeros(1, dtype=torch.long),
                      1 + torch.randperm(dataset.item_num - 1, generator=torch.Generator().manual_seed(seed))])
    dataset.item_features = {m: f[perm] for m, f in dataset.item_features.items()}


def _train_and_test(data, name, shuffled=False):
    """Train ``name`` on the planted data (its feature rows shuffled over the items when
    ``shuffled``); returns the test metric, and what a second evaluation needs."""
    from recbole_mm.registry import get_model, get_trainer

    config, train, valid, test = _prepare(data, name, epochs=EPOCHS, stopping_step=10)
    if shuffled:
        _shuffle_features(train._dataset)
    model = get_model(name)(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    return _evaluate(config, model, test, name), (config, model, train, test)


def _evaluate(config, model, test, name):
    from recbole_mm.registry import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    return trainer.evaluate(test, load_best_model=False, show_progress=False)[METRIC[name]]


def _popularity(config, train, test, metric):
    from recbole_mm.registry import get_model, get_trainer

    pop = get_model("Pop")(config, train._dataset)
    for batch in train:  # Pop's "training" counts the positive items
        pop.calculate_loss(batch)
    return get_trainer(config["MODEL_TYPE"], "Pop")(config, pop).evaluate(
        test, load_best_model=False, show_progress=False)[metric]


@pytest.mark.parametrize("name", SEQUENTIAL + GENERAL)
def test_trained_beats_popularity_and_multimodal_models_need_their_features(data, name, tmp_path, monkeypatch):
    from recbole_mm.registry import get_model

    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes ./log_tensorboard
    trained, (config, model, train, test) = _train_and_test(data, name)
    popular = _popularity(config, train, test, METRIC[name])
    print(f"planted {METRIC[name]}: {name} {trained:.4f}, Pop {popular:.4f}")
    assert trained > popular + 0.1, (trained, popular)
    if FEATURE_CHECK.get(name) == "train":  # the features carry the gain: trained on shuffled ones it is worse
        shuffled, _ = _train_and_test(data, name, shuffled=True)
        print(f"planted {METRIC[name]}: {name} trained on shuffled features {shuffled:.4f}")
        assert trained > shuffled + 0.05, (trained, shuffled)
    elif FEATURE_CHECK.get(name) == "eval":  # the trained model uses them: shuffled at evaluation it is worse
        _shuffle_features(train._dataset)
        same = get_model(name)(config, train._dataset)  # features are rebuilt from the dataset, not checkpointed
        same.load_state_dict(model.state_dict())
        shuffled = _evaluate(config, same, test, name)
        print(f"planted {METRIC[name]}: {name} evaluated on shuffled features {shuffled:.4f}")
        assert trained > shuffled + 0.05, (trained, shuffled)
