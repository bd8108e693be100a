"""FindRec (KDD'25): Stein estimator and IICM loss, cross-modal attention and expert routing,
the model's switches and masks, its trainer's schedule, and learning on the planted dataset."""

import glob
import logging
import math

import numpy as np
import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_mm.model.layers.cross_modal import CrossModalAttention, CrossModalMoE
from recbole_mm.model.layers.packing import Packing
from recbole_mm.model.loss.gradient_share import DECAY, GradientShare
from recbole_mm.model.loss.stein import IICMLoss, SteinEntropy, gaussian_kl
from recbole_mm.trainer.findrec_trainer import constant_with_warmup, cosine_with_warmup

from conftest import load_benchmark_script, planted_paths


# these models are tiny: with 2 threads, OpenMP synchronisation costs more than the work (an epoch
# took 8.6 s with 2 threads and 1.0 s with 1 on a loaded 2-core machine)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ Stein estimator and IICM


def test_stein_estimator_recovers_the_score_of_a_gaussian():
    # q = N(0, s^2 I): grad log q(x) = -x / s^2. Tolerance: the least-squares slope of the
    # estimate against -x is 1/s^2 within 20 %, and the relative L2 error over the bulk
    # (|x| < 2 s) is below 0.4 (a kernel estimator from 400 samples; seeds 0-7 give 0.2-0.33).
    g = torch.Generator().manual_seed(0)
    s = 2.0
    z = torch.randn(400, 2, generator=g) * s
    est = SteinEntropy(eta=0.1).score(z)
    bulk = z.norm(dim=1) < 2 * s
    slope = -(est * z)[bulk].sum() / (z * z)[bulk].sum()
    assert slope.item() * s**2 == pytest.approx(1.0, abs=0.2)
    true = -z / s**2
    assert ((est - true)[bulk].norm() / true[bulk].norm()).item() < 0.4


def test_stein_kernel_bandwidth_and_score_match_a_hand_computation():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    zn = z.numpy().astype(np.float64)
    dists = [np.linalg.norm(zn[i] - zn[j]) for i in range(4) for j in range(4) if i != j]
    sigma = np.median(dists)  # median heuristic over off-diagonal pairs
    K = np.array([[math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)) for b in zn] for a in zn])
    # <grad, K>_i = sum_j d/dz_j k(z_j, z_i) = sum_j -(z_j - z_i) / sigma^2 k(z_j, z_i)
    grad_k = np.array([sum(-(zn[j] - zn[i]) / sigma**2 * K[j, i] for j in range(4)) for i in range(4)])
    expected = -np.linalg.solve(K + 0.5 * np.eye(4), grad_k)
    got = SteinEntropy(eta=0.5).score(z)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_stein_entropy_gradient_is_the_detached_score_and_raises_entropy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 3, generator=g).requires_grad_(True)
    stein = SteinEntropy(eta=0.1)
    stein(z).backward()
    torch.testing.assert_close(z.grad, stein.score(z) / (200 * 3))  # per sample and dimension
    moved = (z - 60.0 * z.grad).detach()  # one descent step on L_ent spreads the sample out
    assert moved.std() > z.detach().std() * 1.02
    with pytest.raises(ValueError, match="stein_eta"):
        SteinEntropy(eta=0.0)


def test_iicm_alignment_by_hand_with_fixed_and_adaptive_bandwidth():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    pair_d2 = [1.0, 0.0, 4.0]
    fixed = IICMLoss(entropy=None, sigma=2.0)
    assert fixed([a, b], [(0, 1)]).item() == pytest.approx(1 - np.mean([math.exp(-d / 8) for d in pair_d2]), rel=1e-6)
    # adaptive: sigma = median distance over all 9 (a_i, b_j) pairs
    sigma = np.median([np.linalg.norm(x - y) for x in a.numpy() for y in b.numpy()])
    adaptive = IICMLoss(entropy=None)
    expected = 1 - np.mean([math.exp(-d / (2 * sigma**2)) for d in pair_d2])
    assert adaptive([a, b], [(0, 1)]).item() == pytest.approx(expected, rel=1e-6)
    assert adaptive([a, a], [(0, 1)]).item() == pytest.approx(0.0, abs=1e-7)
    # the loss pulls the pair together (the sign of eq. 2 is flipped)
    moving = b.clone().requires_grad_(True)
    adaptive([a, moving], [(0, 1)]).backward()
    assert (a - (moving - moving.grad)).norm() < (a - b).norm()


def test_iicm_entropy_terms():
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)]
    align = IICMLoss(entropy=None)(views, [(0, 1)])
    stein = IICMLoss(entropy="stein", entropy_weight=0.5)(views, [(0, 1)])
    expected = align + 0.5 * (SteinEntropy(0.1)(views[0]) + SteinEntropy(0.1)(views[1])) / 2
    assert stein.item() == pytest.approx(expected.item(), rel=1e-5)

    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    assert gaussian_kl(mu, logvar).item() == pytest.approx(0.5 * (1 + (2 - 1 - math.log(2))) / 2, rel=1e-6)
    assert gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2)).item() == 0
    kl = IICMLoss(entropy="kl", entropy_weight=2.0)([mu, mu], [(0, 1)], [(mu, logvar), (mu, logvar)])
    assert kl.item() == pytest.approx(2.0 * gaussian_kl(mu, logvar).item(), rel=1e-6)  # alignment of equal views = 0
    with pytest.raises(ValueError, match="needs the"):
        IICMLoss(entropy="kl")(views, [(0, 1)])
    with pytest.raises(ValueError, match="iicm_entropy"):
        IICMLoss(entropy="mmd")

def test_iicm_adaptive_alignment_rewards_shrinking_unless_views_are_normalised():
    """With the per-batch (detached) bandwidth, a descent step on the alignment shrinks every
    view, and the next batch's bandwidth shrinks with them: the pull never ends. Normalised
    views make the loss scale-free: the same value at any scale, no radial gradient."""
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(64, 8, generator=g) * 5, torch.randn(64, 8, generator=g) * 5]
    raw = [v.clone().requires_grad_(True) for v in views]
    IICMLoss(entropy=None)(raw, [(0, 1)]).backward()
    assert all(((v * v.grad).sum(1) > 0).float().mean() > 0.9 for v in raw)  # descent points inwards

    loss = IICMLoss(entropy="stein", entropy_weight=0.3, normalize=True)
    scaled = [v.clone().requires_grad_(True) for v in views]
    value = loss(scaled, [(0, 1)])
    assert value.item() == pytest.approx(loss([0.01 * v for v in views], [(0, 1)]).item(), rel=1e-5)
    assert value.item() != pytest.approx(IICMLoss(entropy="stein", entropy_weight=0.3)(views, [(0, 1)]).item(), rel=1e-3)
    value.backward()
    for v in scaled:
        radial = (v * v.grad).sum(1) / v.norm(dim=1)
        assert radial.abs().max() < 1e-6 * v.grad.norm(dim=1).max() * 100
        assert v.grad.norm() > 0


def test_iicm_attached_bandwidth_is_blind_to_contracting_the_batch():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g) + 0.3
    loss = IICMLoss(entropy=None, sigma_attached=True)
    rms = torch.cdist(a, b).pow(2).mean().sqrt()  # all 32 x 32 cross pairs
    expected = 1 - torch.exp(-(a - b).pow(2).sum(1) / (2 * rms**2)).mean()
    torch.testing.assert_close(loss([a, b], [(0, 1)]), expected)
    centre = torch.randn(6, generator=g)
    contracted = [centre + 0.05 * (v - centre) for v in (a, b)]
    torch.testing.assert_close(loss(contracted, [(0, 1)]), expected)
    # no gradient along the contraction (Euler: d/dc L(m + c (z - m)) = 0), where the detached median pulls in
    views = [v.clone().requires_grad_(True) for v in (a, b)]
    loss(views, [(0, 1)]).backward()
    assert abs(sum(((v - centre) * v.grad).sum() for v in views).item()) < 1e-6
    detached = [v.clone().requires_grad_(True) for v in (a, b)]
    IICMLoss(entropy=None)(detached, [(0, 1)]).backward()
    assert sum(((v - centre) * v.grad).sum() for v in detached).item() > 1e-3
    with pytest.raises(ValueError, match="iicm_sigma_attached"):
        IICMLoss(sigma=1.0, sigma_attached=True)


# ------------------------------------------------------------------ cross-modal attention and routing


def test_cross_attention_by_hand_for_one_head_and_position():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    out = CrossModalAttention(n_heads=2)(q, k, torch.tensor([[True, True, True, False]]))
    # head 1 (dims 3..5) attends to the valid key positions 0..2
    qh, kh = q[0, 3:], k[0, :3, 3:]
    w = torch.softmax(kh @ qh / math.sqrt(3), dim=0)
    torch.testing.assert_close(out[0, 3:], qh + w @ kh)


def test_cross_attention_ignores_masked_keys():
    g = torch.Generator().manual_seed(4)
    attn = CrossModalAttention(n_heads=2)
    q, k = torch.randn(2, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)  # 2nd: item 2 has no feature
    base = attn(q, k, mask)
    k3 = k.clone()
    k3[0, 4:] = 100.0  # padding keys of row 0
    k3[1, 2] = 100.0  # masked key of row 1
    torch.testing.assert_close(attn(q, k3, mask), base)
    assert not torch.allclose(attn(q, k3, torch.ones_like(mask)), base)
    # a query with no valid key keeps its own state
    torch.testing.assert_close(attn(q, k, torch.zeros(2, 6, dtype=torch.bool)), q)


def test_router_weights_sum_to_one_and_mix_the_experts():
    torch.manual_seed(0)
    moe = CrossModalMoE(dim=8, n_heads=2, n_experts=3).eval()
    o = torch.randn(5, 8)
    out = moe(o)
    gates = moe.last_gates
    assert gates.shape == (5, 2, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 2))
    head = o[1, 4:]  # head 1 of row 1, by hand
    expected = sum(gates[1, 1, k] * moe.experts[k](head) for k in range(3))
    torch.testing.assert_close(out[1, 4:], expected)
    assert moe.expert_load() is None  # nothing is accumulated at evaluation


def test_expert_load_statistics_and_balance_loss():
    torch.manual_seed(0)
    moe = CrossModalMoE(dim=8, n_heads=2, n_experts=4).train()
    moe(torch.randn(10, 8))
    moe(torch.randn(6, 8))
    mean_weight, top1 = moe.expert_load()
    assert mean_weight.sum().item() == pytest.approx(1.0) and top1.sum().item() == pytest.approx(1.0)
    assert moe._n_routed.item() == 32  # 16 rows x 2 heads
    moe.reset_expert_load()
    assert moe.expert_load() is None
    with torch.no_grad():  # a router that sends everything to expert 0 scores n_experts
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([50.0, 0, 0, 0]))
    moe(torch.randn(4, 8))
    assert moe.balance_loss().item() == pytest.approx(4.0, rel=1e-4)
    linear = CrossModalMoE(dim=8, n_heads=2, n_experts=4, use_moe=False)
    assert isinstance(linear.linear, torch.nn.Linear) and linear.expert_load() is None
    with pytest.raises(ValueError, match="divisible"):
        CrossModalMoE(dim=10, n_heads=4, n_experts=2)

# ------------------------------------------------------------------ trainer schedule


def test_cosine_schedule_with_warmup():
    f = [cosine_with_warmup(s, warmup_steps=4, total_steps=12) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[8] == pytest.approx(0.5) and f[12] == pytest.approx(0.0) and f[13] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert [constant_with_warmup(s, warmup_steps=2, total_steps=5) for s in range(6)] == [0.5, 1, 1, 1, 1, 1]

# ------------------------------------------------------------------ the model (needs the foundation)

BASE = {
    "modalities": ["image", "text"],
    "embedding_size": 16, "align_dim": 16, "n_heads": 2, "n_experts": 2, "n_layers": 1, "d_state": 4,
    "mamba_backend": "torch", "dropout_prob": 0.1, "MAX_ITEM_LIST_LENGTH": 10,
    "train_batch_size": 256, "eval_batch_size": 4096, "learning_rate": 0.005, "warmup_steps": 5,
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
    "show_progress": False, "state": "WARNING", "seed": 2025,
}


@pytest.fixture(scope="module")
def planted3(tmp_path_factory):
    return planted_paths(tmp_path_factory.mktemp("findrec"), modalities=("image", "text", "audio"), dims=(32, 24, 8))


def _prepare(planted3, **overrides):
    from recbole_mm.config import Config
    from recbole_mm.registry import create_dataset

    config = Config(model="FindRec", dataset="planted", config_dict={**BASE, **planted3, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    return config, train, valid, test


def _model(planted3, **overrides):
    from recbole_mm.registry import get_model

    config, train, valid, test = _prepare(planted3, **overrides)
    return get_model("FindRec")(config, train._dataset), train


def test_registry_and_paper_defaults(planted3):
    from recbole_mm.model.sequential_recommender import FindRec
    from recbole_mm.registry import get_model, get_trainer
    from recbole_mm.trainer import FindRecTrainer

    assert get_model("FindRec") is FindRec
    assert issubclass(get_trainer(None, "FindRec"), FindRecTrainer)
    config, *_ = _prepare(planted3)
    assert config["learner"] == "adamw" and config["weight_decay"] == 0.01
    assert config["clip_grad_norm"] == {"max_norm": 1.0} and config["iicm_weight"] == 0.01
    assert config["train_neg_sample_args"]["distribution"] == "none"
    assert config["eval_args"]["order"] == "TO"  # leave-one-out by time


def test_losses_gradients_and_checkpoint_layout(planted3):
    model, train = _model(planted3)
    assert [m.features.shape[1] for m in model.streams] == [32, 24]
    assert not any("features" in k or "has_feature" in k for k in model.state_dict())
    model.train()
    batch = next(iter(train))
    ce, align, entropy = model.calculate_loss(batch)
    assert model.loss_names == ("ce", "iicm_align", "iicm_entropy")
    assert all(torch.isfinite(x) for x in (ce, align, entropy)) and align.item() != 0 and entropy.item() != 0
    (ce + align + entropy).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert model.calculate_loss(batch[:1])[0].isfinite()  # a last batch of one sequence


def test_later_and_padding_items_do_not_change_the_representation(planted3):
    model, train = _model(planted3)
    model.eval()
    batch = next(iter(train))
    seq, lengths = batch[model.ITEM_SEQ].clone(), batch[model.ITEM_SEQ_LEN]
    base = model(seq, lengths)
    noisy = seq.clone()
    pad = torch.arange(seq.shape[1])[None, :] >= lengths[:, None]
    noisy[pad] = torch.randint(1, model.n_items, (int(pad.sum()),))
    torch.testing.assert_close(model(noisy, lengths), base)  # items after the last valid one are ignored
    shorter = (lengths - 1).clamp_min(1)
    assert not torch.allclose(model(seq, shorter), base)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_positions_give_the_padded_loss_and_gradients(planted3, dtype):
    # computing only the real positions (packed end to end; float32 runs the compiled scan on
    # them, float64 the step loop on the unpacked batch) must equal the computation over the
    # padded batch: loss and every gradient

    model, train = _model(planted3, dropout_prob=0.0)
    model.to(dtype).train()
    batch = next(iter(train))
    lengths = batch[model.ITEM_SEQ_LEN]
    assert len(set(lengths.tolist())) > 3 and lengths.max() < batch[model.ITEM_SEQ].shape[1]
    packing = Packing(lengths, batch[model.ITEM_SEQ].shape[1])
    assert len(packing.position) > packing.real  # rounded up with spare rows, which change nothing
    results = []
    for packed in (True, False):
        model.length_groups = packed
        model.zero_grad()
        loss = sum(model.calculate_loss(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_g, grads_g), (loss_p, grads_p) = results
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_g, loss_p, **tol)
    for name in grads_p:
        torch.testing.assert_close(grads_g[name], grads_p[name], **tol, msg=lambda m: f"{name}: {m}")


def test_packing_keeps_the_real_positions_in_batch_order():
    lengths = torch.tensor([3, 1, 4])
    seq = torch.arange(1, 19).view(3, 6)  # right-padded to 6
    packing = Packing(lengths, 6, rows_multiple=1)
    assert packing.layout is packing and packing.width == 4
    assert packing.pack(seq).tolist() == [1, 2, 3, 7, 13, 14, 15, 16]
    assert packing.offsets.tolist() == [0, 3, 4, 8] and packing.position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert packing.last(packing.pack(seq)).tolist() == [3, 7, 16]
    rows = packing.pack(seq).double().requires_grad_()
    unpacked = packing.unpack(rows)
    assert unpacked.tolist() == [[1, 2, 3, 0], [7, 0, 0, 0], [13, 14, 15, 16]]
    unpacked.sum().backward()
    assert rows.grad.tolist() == [1.0] * 8  # differentiable


def test_packing_rounds_the_rows_up_with_a_sequence_of_padding():
    lengths = torch.tensor([3, 1, 4])
    seq = torch.arange(1, 19).view(3, 6)
    packing = Packing(lengths, 6, rows_multiple=5)  # 8 real rows -> 10: the first two padded positions
    assert packing.pack(seq).tolist() == [1, 2, 3, 7, 13, 14, 15, 16, 4, 8]
    assert packing.offsets.tolist() == [0, 3, 4, 8, 10]  # the spare rows are a sequence of their own
    assert packing.position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1]
    assert packing.last(packing.pack(seq)).tolist() == [3, 7, 16]
    rows = packing.pack(seq).double().requires_grad_()
    unpacked = packing.unpack(rows)
    assert unpacked.tolist() == [[1, 2, 3, 0], [7, 0, 0, 0], [13, 14, 15, 16]]
    unpacked.sum().backward()
    assert rows.grad.tolist() == [1.0] * 8 + [0.0] * 2  # nothing reads the spare rows
    # no more spare rows than the batch has padded positions (4 within the longest sequence)
    assert Packing(lengths, 6, rows_multiple=64).pack(seq).shape == (12,)


def test_packing_without_the_cpu_or_enabled_is_the_padded_batch():
    lengths = torch.tensor([3, 1, 4])
    seq = torch.arange(1, 19).view(3, 6)
    # disabled, or off the CPU (the meta device standing for a GPU): the padded batch as it is
    for padded in (Packing(lengths, 6, enabled=False), Packing(lengths.to("meta"), 6)):
        assert padded.layout is None and padded.width == 6 and padded.mask.shape == (3, 6)
    padded = Packing(lengths, 6, enabled=False)
    assert padded.mask.sum(1).tolist() == [3, 1, 4] and not padded.mask[:, 4:].any()
    assert padded.pack(seq) is seq and padded.unpack(seq) is seq and padded.last(seq).tolist() == [3, 7, 16]


@pytest.mark.parametrize("feature_logits", [False, True])
def test_full_sort_equals_predict(planted3, feature_logits):
    model, train = _model(planted3, feature_logits=feature_logits)
    model.eval()
    batch = next(iter(train))[:4]
    full = model.full_sort_predict(batch)
    n = model.n_items
    pairs = {model.ITEM_SEQ: batch[model.ITEM_SEQ].repeat_interleave(n, 0),
             model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN].repeat_interleave(n), model.ITEM_ID: torch.arange(n).repeat(4)}
    torch.testing.assert_close(model.predict(pairs).view(4, n), full, rtol=1e-5, atol=1e-5)


def test_feature_logits_score_candidates_from_their_features(planted3):
    # eq. 4 scores against the ID table only: an item's features reach its own score only when it
    # is in the history. With feature_logits the candidate is E_item + sum_m V_m f_m, so changing
    # the features of an item outside every history changes its score and nobody else's
    from recbole_mm.evaluation.scorers import make_scorer

    for feature_logits in (False, True):
        model, train = _model(planted3, feature_logits=feature_logits)
        model.eval()
        batch = next(iter(train))[:8]
        outside = int(torch.tensor([i for i in range(1, model.n_items) if not (batch[model.ITEM_SEQ] == i).any()][0]))
        before = model.full_sort_predict(batch)
        for stream in model.streams:
            stream.features[outside] += 1.0
        if model.item_tower is not None:
            for k in range(len(model.item_tower.projection.maps)):
                getattr(model.item_tower.projection, f"feature_{k}")[outside] += 1.0
        after = model.full_sort_predict(batch)
        others = torch.arange(model.n_items) != outside
        torch.testing.assert_close(after[:, others], before[:, others])
        assert (after[:, outside] != before[:, outside]).all() == feature_logits
        scorer = make_scorer(model, batch, model.n_items)  # the blocked ranking multiplies the same tables
        assert scorer.name == "full_sort_embeddings"
    model.train()
    sum(model.calculate_loss(next(iter(train)))).backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in model.item_tower.projection.maps)


def test_residual_output_head_adds_the_id_state(planted3):
    # output_head: residual is S = z_ID + FFN(Concat(z_ID, O_exp)); ffn (eq. 4) is the FFN alone
    model, train = _model(planted3, output_head="residual", dropout_prob=0.0)
    ffn_model, _ = _model(planted3, dropout_prob=0.0)
    ffn_model.load_state_dict(model.state_dict())  # the same parameters: only the head's sum differs
    model.eval(), ffn_model.eval()
    batch = next(iter(train))[:8]
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    z_id = model._streams(seq, Packing(lengths, seq.shape[1]))[0]
    torch.testing.assert_close(model(seq, lengths), z_id + ffn_model(seq, lengths))
    model.train()
    sum(model.calculate_loss(next(iter(train)))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="needs id_input: id"):
        _model(planted3, output_head="residual", id_input="fused")
    with pytest.raises(ValueError, match="output_head = 'sum': expected one of 'ffn', 'residual'"):
        _model(planted3, output_head="sum")


def test_fused_id_input_reads_the_features_in_the_id_stream(planted3):
    # id_input: fused runs the ID stream over sec. 2.1's e_fused = Concat(e_id, W_m f_m): its width
    # is embedding_size + M align_dim and its last state moves with a history item's features,
    # which the ID stream over e_id alone never sees; the projections are the modality streams' own
    for id_input in ("id", "fused"):
        model, train = _model(planted3, id_input=id_input, dropout_prob=0.0)
        width = 16 + (2 * 16 if id_input == "fused" else 0)
        assert model.id_encoder.norm.normalized_shape == (width,)
        assert model.output_ffn[0].in_features == width + 16
        model.eval()
        batch = next(iter(train))[:8]
        seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
        z_id = model._streams(seq, Packing(lengths, seq.shape[1]))[0]
        model.streams[0].features[seq[0, 0]] += 1.0
        moved = model._streams(seq, Packing(lengths, seq.shape[1]))[0]
        assert torch.allclose(moved[1:][(seq[1:] != seq[0, 0]).all(1)], z_id[1:][(seq[1:] != seq[0, 0]).all(1)])
        assert torch.allclose(moved[0], z_id[0]) == (id_input == "id")
    model.train()
    model.zero_grad()
    sum(model.calculate_loss(next(iter(train)))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="id_input"):
        _model(planted3, id_input="both")


def test_summed_id_input_reads_the_candidates_vectors(planted3):
    # id_input: summed runs the ID stream over e_id + sum_m V_m f_m, the vectors the logits score
    # (feature_logits), as Mamba4Rec (MM)'s one stream: the stream's input is exactly the item
    # tower's output, and changing the feature maps moves both that input and the candidates
    model, train = _model(planted3, id_input="summed", feature_logits=True, output_head="residual", dropout_prob=0.0)
    assert model.id_encoder.norm.normalized_shape == (16,)
    model.eval()
    batch = next(iter(train))[:8]
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    inputs = []
    model.id_encoder.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    packing = Packing(lengths, seq.shape[1])
    z_id = model._streams(seq, packing)[0]
    torch.testing.assert_close(inputs[-1], model.item_tower(packing.pack(seq)))  # the real positions
    item = seq[0, 0]
    before = model.item_table()[item].clone()
    model.item_tower.projection.maps[0].weight.data += 0.5
    moved = model._streams(seq, packing)[0]
    assert not torch.allclose(moved[0], z_id[0])
    torch.testing.assert_close(inputs[-1], model.item_tower(packing.pack(seq)))
    assert not torch.allclose(model.item_table()[item], before)
    model.train()
    sum(model.calculate_loss(next(iter(train)))).backward()
    assert model.item_tower.projection.maps[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_logits: true"):
        _model(planted3, id_input="summed")


def test_switches_and_modality_counts(planted3, caplog):
    model, train = _model(planted3, use_cross_attn=False, use_moe=False, use_iicm=False)
    assert model.cross_attn is None and isinstance(model.moes[0].linear, torch.nn.Linear) and model.iicm is None
    model.train()
    assert model.calculate_loss(next(iter(train))).dim() == 0  # CE only

    kl, train = _model(planted3, iicm_entropy="kl")
    assert all(s.posterior is not None for s in kl.streams)
    kl.eval()
    batch = next(iter(train))
    torch.testing.assert_close(kl(batch[kl.ITEM_SEQ], batch[kl.ITEM_SEQ_LEN]),
                               kl(batch[kl.ITEM_SEQ], batch[kl.ITEM_SEQ_LEN]))  # the mean at evaluation
    no_ent, _ = _model(planted3, iicm_entropy="kl", use_entropy=False)
    assert all(s.posterior is None for s in no_ent.streams) and no_ent.iicm.entropy is None

    with caplog.at_level(logging.WARNING):
        single, train = _model(planted3, modalities=["text"])
    assert "one modality (text)" in caplog.text
    assert single.pairs == [] and single.cross_attn is None and len(single.moes) == 1
    single.train()
    ce, entropy = single.calculate_loss(next(iter(train)))  # entropy only
    assert single.loss_names == ("ce", "iicm_entropy") and torch.isfinite(entropy)

    three, train = _model(planted3, modalities=["image", "text", "audio"])
    assert three.pairs == [(0, 1), (0, 2)] and len(three.moes) == 2
    chosen, _ = _model(planted3, modalities=["image", "text", "audio"], cross_pairs=[["audio", "text"]])
    assert chosen.pairs == [(2, 1)] and chosen.output_ffn[0].in_features == 16 + 16
    with pytest.raises(ValueError, match="cross_pairs entry"):
        _model(planted3, cross_pairs=[["image", "image"]])
    with pytest.raises(ValueError, match="loss_type must be 'CE'"):
        _model(planted3, loss_type="BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 1})


def test_loss_terms_are_logged_with_their_gradient_norms(planted3, caplog):
    model, train = _model(planted3, dropout_prob=0.0, log_loss_terms=True)
    model.train()
    batch = next(iter(train))
    ce, align, entropy = model.calculate_loss(batch)
    report = model.term_log.report()
    assert list(report) == ["ce", "iicm_align", "iicm_entropy"]
    assert report["iicm_align"][0] == pytest.approx(align.item())
    # the gradient norm at the streams' last states, by hand for the alignment and the entropy
    _, views, _ = model._encode(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    parts = model.iicm.terms(views, model.pairs)
    for name, part in (("iicm_align", parts["align"]), ("iicm_entropy", parts["entropy"])):
        grads = torch.autograd.grad(model.iicm_weight * part, views)
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        assert report[name][1] == pytest.approx(expected, rel=1e-4)
    assert report["ce"][1] > 0
    with caplog.at_level(logging.INFO):
        model.eval()
    assert "FindRec loss terms (mean value, |grad at z_m|, share of ce's): ce " in caplog.text
    assert model.term_log.report() == {}


def _share_step(share, x, a, b):
    """One step of ``a.x + w b.x`` with the weight ``w`` of :class:`GradientShare`; returns ``w``."""
    weight = share.weight()
    (ref,), (term,) = share.watch([x], share.REFERENCE), share.watch([x], share.TERM, scale=weight)
    ((a * ref).sum() + weight * (b * term).sum()).backward()
    return weight


def test_gradient_share_weight_by_hand():
    x = torch.zeros(4, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([0.0, 0.5, 0.0, 0.0])
    share = GradientShare(0.1, initial=0.02)
    assert _share_step(share, x, a, b).item() == pytest.approx(0.02)  # nothing measured yet
    assert torch.equal(x.grad, a + 0.02 * b)  # the probes pass the gradient unchanged
    # constant norms: the debiased EMAs are the norms themselves, |a| = 5 and |b| = 0.5
    assert _share_step(share, x, a, b).item() == pytest.approx(0.1 * 5 / 0.5)
    # the reference's norm doubles: EMA 0.95 (0.95 * 0.05 * 5 + 0.05 * 5) + 0.05 * 10, debiased
    _share_step(share, x, 2 * a, b)
    ema = (DECAY * (DECAY * (1 - DECAY) * 5 + (1 - DECAY) * 5) + (1 - DECAY) * 10) / (1 - DECAY ** 3)
    assert share.weight().item() == pytest.approx(0.1 * ema / 0.5, rel=1e-6)
    with share.paused():
        _share_step(share, x, 100 * a, b)
    assert share.seen.tolist() == [3, 3]
    with pytest.raises(ValueError, match="share must be positive"):
        GradientShare(0.0, 0.01)
    with pytest.raises(ValueError, match="initial weight must be positive"):
        GradientShare(0.1, 0.0)


def test_iicm_share_holds_the_alignment_at_its_share_of_the_ce_gradient(planted3, caplog):
    model, train = _model(planted3, dropout_prob=0.0, log_loss_terms=True, use_entropy=False, iicm_share=0.25)
    model.train()
    batch = next(iter(train))
    first_ce, first_align = model.calculate_loss(batch)
    _, views, _ = model._encode(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    raw = model.iicm.terms(views, model.pairs)["align"]
    assert first_align.item() == pytest.approx(model.iicm_weight * raw.item(), rel=1e-5)  # iicm_weight first
    model.zero_grad()
    (first_ce + first_align).backward()
    model.term_log.summary("FindRec")  # resets the sums
    # the same batch again (no dropout): the alignment's gradient at z_m is 25% of the CE's
    ce, align = model.calculate_loss(batch)
    report = model.term_log.report()
    assert report["iicm_align"][1] / report["ce"][1] == pytest.approx(0.25, rel=1e-4)
    assert align.item() == pytest.approx(model.iicm_share.weight().item() * raw.item(), rel=1e-5)
    assert model.iicm_share.seen.tolist() == [1, 1]  # log_loss_terms' extra passes are not counted
    with caplog.at_level(logging.INFO):
        model.eval()
    assert "FindRec iicm_share 0.25: IICM weight now" in caplog.text
    with torch.no_grad():  # evaluation passes measure nothing
        model.calculate_loss(batch)
    assert model.iicm_share.seen.tolist() == [1, 1]
    assert {"iicm_share.ema", "iicm_share.seen"} <= set(model.state_dict())  # a checkpoint resumes them
    with pytest.raises(ValueError, match="iicm_share needs iicm_weight > 0"):
        _model(planted3, iicm_share=0.1, iicm_weight=0.0)


def test_expert_load_is_logged_when_switching_to_evaluation(planted3, caplog):
    model, train = _model(planted3)
    model.train()
    model.calculate_loss(next(iter(train)))
    assert set(model.expert_load()) == {"image->text"}
    with caplog.at_level(logging.INFO):
        model.eval()
    assert "FindRec expert load [image->text]: mean router weight" in caplog.text
    assert model.expert_load() == {}


def _record_lrs(trainer):
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


def test_trainer_schedule_and_resume(planted3):
    from recbole_mm.registry import get_model, get_trainer

    config, train, valid, test = _prepare(planted3, epochs=2, warmup_steps=3, lr_schedule="cosine")
    n = len(train)
    model = get_model("FindRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    lrs = _record_lrs(trainer)
    trainer.fit(train, valid, saved=True, show_progress=False)
    assert lrs == pytest.approx([0.005 * cosine_with_warmup(s, 3, 2 * n) for s in range(2 * n)])

    # resume from the best epoch's checkpoint with a longer budget: the schedule continues from
    # the update count kept in the optimizer state and is stretched over the new total
    resumed = get_trainer(config["MODEL_TYPE"], "FindRec")(config, get_model("FindRec")(config, train._dataset))
    resumed.resume_checkpoint(trainer.saved_model_file)
    done = resumed._updates_done()
    assert done == resumed.start_epoch * n and done > 0
    resumed.epochs = 3
    lrs = _record_lrs(resumed)
    resumed.fit(train, valid, saved=False, show_progress=False)
    assert lrs == pytest.approx([0.005 * cosine_with_warmup(s, 3, 3 * n) for s in range(done, 3 * n)])


def test_weight_decay_spares_what_mamba_ssm_spares(planted3):
    from recbole_mm.registry import get_model, get_trainer

    config, train, valid, test = _prepare(planted3)
    model = get_model("FindRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = ({names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0]
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert {"id_encoder.layers.0.mixer.A_log", "id_encoder.layers.0.mixer.D", "id_encoder.layers.0.alpha",
            "id_encoder.layers.0.norm.weight", "id_encoder.norm.bias", "output_ffn.0.bias"} <= spared
    assert {"item_embedding.weight", "id_encoder.layers.0.mixer.in_proj.weight", "streams.0.proj.weight",
            "output_ffn.0.weight"} <= decayed
    with pytest.raises(ValueError, match="lr_schedule = 'linear': expected one of 'constant', 'cosine'"):
        get_trainer(config["MODEL_TYPE"], "FindRec")(
            _prepare(planted3, lr_schedule="linear")[0], model)


def test_training_through_quick_start_beats_untrained_and_popularity(planted3):
    from recbole_mm.quick_start import load_data_and_model, run_recbole
    from recbole_mm.registry import get_model, get_trainer

    result = run_recbole(model="FindRec", dataset="planted", config_dict={**BASE, **planted3, "epochs": 4},
                         saved=True)
    trained = result["test_result"]["ndcg@10"]

    config, model, _, train, _, test = load_data_and_model(sorted(glob.glob(f"{planted3['checkpoint_dir']}/FindRec-*.pth"))[-1])
    trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
    assert trainer.evaluate(test, load_best_model=False)["ndcg@10"] == pytest.approx(trained)  # checkpoint round trip

    init_seed(config["seed"], config["reproducibility"])
    untrained = get_trainer(config["MODEL_TYPE"], "FindRec")(config, get_model("FindRec")(config, train._dataset))
    untrained_ndcg = untrained.evaluate(test, load_best_model=False)["ndcg@10"]
    pop = get_model("Pop")(config, train._dataset)
    for batch in train:  # Pop's "training" counts the positive items
        pop.calculate_loss(batch)
    popular = get_trainer(config["MODEL_TYPE"], "Pop")(config, pop).evaluate(test, load_best_model=False)["ndcg@10"]
    print(f"planted NDCG@10: FindRec {trained:.4f}, untrained {untrained_ndcg:.4f}, Pop {popular:.4f}")
    assert trained > untrained_ndcg + 0.1, (trained, untrained_ndcg)
    assert trained > popular + 0.1, (trained, popular)


@pytest.mark.parametrize("feature_logits", [False, True])
def test_ce_item_chunk_gives_the_same_loss_terms_and_gradients(planted3, feature_logits, caplog):
    """With ``ce_item_chunk`` FindRec computes its CE term over item slices (no [batch, n_items]
    logits) and keeps IICM: every term and every parameter's gradient as without it; the trainer
    does not replace its loss."""
    from recbole_mm.registry import get_trainer

    losses, grads = [], []
    for chunk in (None, 7):
        model, train = _model(planted3, feature_logits=feature_logits, ce_item_chunk=chunk)
        model.eval()  # no dropout: the two passes see the same network
        batch = next(iter(train))
        terms = model.calculate_loss(batch)
        sum(terms).backward()
        losses.append(torch.stack(terms))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "item_embedding.weight" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name
    config, *_ = _prepare(planted3, ce_item_chunk=7, epochs=1)
    trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
    with caplog.at_level(logging.INFO):
        trainer._use_chunked_ce(train, 7)
    assert "FindRec computes its cross-entropy in slices of 7 items" in caplog.text
    assert "calculate_loss" not in vars(model)


def test_view_probe_flattens_the_modality_streams_and_reads_a_checkpoint(planted3):
    from recbole_mm.registry import get_model, get_trainer

    script = load_benchmark_script("findrec_view_probe")
    stats = script.view_stats([torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])])
    assert stats["norm"] == pytest.approx(2.0)
    assert stats["spread"] == pytest.approx(math.sqrt(2))  # median of the pairwise distances 0, 0, 1.41 x 4
    assert stats["direction"] == pytest.approx(math.sqrt(5) / 3)

    config, train, valid, test = _prepare(planted3, epochs=1)
    model = get_model("FindRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "FindRec")(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    model.eval()
    assert model.length_groups is True  # packed: the means run over the real positions only
    batch = next(iter(train))
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        out, views, _ = model._encode(seq, lengths)
        with script.flattened_streams(model):
            flat_out, flat_views, _ = model._encode(seq, lengths)
        again = model._encode(seq, lengths)[0]
    assert all(torch.equal(v, v[:1].expand_as(v)) and not torch.equal(w, w[:1].expand_as(w))
               for v, w in zip(flat_views, views))
    assert not torch.allclose(flat_out, out) and torch.equal(again, out)  # the streams reach the output; restored

    row = script.probe(trainer.saved_model_file)
    assert row["valid"] == pytest.approx(trainer.best_valid_score) and row["valid_flat"] != row["valid"]
    assert (row["init_spread"], row["init_direction"]) != (row["spread"], row["direction"])  # weights reset
    assert "| streams flattened |" in script.report(["a"], [row])
