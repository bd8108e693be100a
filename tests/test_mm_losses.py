"""MMD, InfoNCE and the loss mixins (recbole_mm.model.loss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.loss.infonce import InfoNCELoss
from recbole_mm.model.loss.kernels import exponent_factors, gaussian_kernel, kernel_from_exponent
from recbole_mm.model.loss.mixins import AlignmentLossMixin, BPRLossMixin, EmbRegLossMixin
from recbole_mm.model.loss.mmd import MMDLoss


# the block sizes the tests name hold on one thread (the budget of a block is per thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _mmd_by_hand(x, y, sigma):
    """Unbiased MMD^2 with loops over the samples (Gretton et al. 2012, eq. 3)."""
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))  # noqa: E731
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_gaussian_kernel_equals_the_distance_form():
    g = torch.Generator().manual_seed(9)
    x, y = 3 * torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g)
    bws = [0.5, 1.0, 4.0]
    expected = sum(torch.exp(-torch.cdist(x, y).pow(2) / (2 * s**2)) for s in bws)
    assert torch.allclose(gaussian_kernel(x, y, bws), expected, atol=1e-5)
    assert torch.allclose(gaussian_kernel(x, bandwidth=bws).diagonal(), torch.full((30,), 3.0), atol=1e-5)


def test_mmd_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g) + 0.7
    assert MMDLoss(1.5)(x, y).item() == pytest.approx(_mmd_by_hand(x, y, 1.5), rel=1e-5)


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_mean_shift():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    mmd = MMDLoss([1.0])
    same = mmd(x, y).item()
    shifted = [mmd(x, y + s).item() for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.01
    assert shifted[0] > 10 * abs(same) + 0.01
    assert shifted == sorted(shifted)


def test_mmd_is_unbiased_where_the_papers_v_statistic_is_not():
    # averaged over many pairs of samples of N(0, I), the U-statistic is ~0, while eq. 8's
    # biased form keeps the diagonal k(x, x) = 1 and sits ~ 2/n - (cross term) above it
    g = torch.Generator().manual_seed(2)
    mmd = MMDLoss(1.0)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
        unbiased.append(mmd(x, y).item())
        biased.append((gaussian_kernel(x).mean() + gaussian_kernel(y).mean() - 2 * gaussian_kernel(x, y).mean()).item())
    assert abs(sum(unbiased) / 300) < 0.01
    assert sum(biased) / 300 > 0.05


def _paired_mmd_by_hand(x, y, sigma):
    """Gretton et al. 2012, eq. 3 with loops: mean over i != j of
    k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i) (no k(x_i, y_i) anywhere)."""
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))  # noqa: E731
    n = len(x)
    total = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
                for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def test_paired_mmd_tiny_hand_computed_value():
    # x = (0, 1), y = (2, 5) in one dimension, sigma = 1: the four off-diagonal terms are
    # k(0,1) + k(2,5) - k(0,5) - k(1,2) = e^-0.5 + e^-4.5 - e^-12.5 - e^-0.5, averaged over the
    # 2 ordered pairs i != j (each appears twice, /2 * 2)
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [5.0]])
    expected = math.exp(-4.5) - math.exp(-12.5)
    assert MMDLoss(1.0)(x, y).item() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) + 0.4
    assert MMDLoss(1.3)(x, y).item() == pytest.approx(_paired_mmd_by_hand(x, y, 1.3), rel=1e-5)


def test_paired_mmd_has_expectation_zero_under_equal_marginals():
    # x_i, y_i two correlated views of one item (rho = 0.9) with the same N(0, I) marginal: the
    # cross-term diagonal k(x_i, y_i) is large, and keeping it biases the mean by about -0.018 here.
    # 200 draws of N = 64: the standard error of the mean is ~1.1e-4, so 4 standard errors stay far
    # below that bias and the test can tell the two estimators apart
    g = torch.Generator().manual_seed(0)
    mmd, rho = MMDLoss(1.0), 0.9
    draws = []
    for _ in range(200):
        x = torch.randn(64, 4, generator=g)
        y = rho * x + math.sqrt(1 - rho**2) * torch.randn(64, 4, generator=g)
        draws.append(mmd(x, y).item())
    draws = torch.tensor(draws)
    se = draws.std().item() / math.sqrt(len(draws))
    assert 4 * se < 0.002
    assert abs(draws.mean().item()) < 4 * se


def test_multi_bandwidth_mmd_is_the_sum_over_bandwidths():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 3, generator=g), torch.randn(25, 3, generator=g) + 0.3
    total = MMDLoss([0.5, 1.0, 2.0])(x, y)
    parts = sum(MMDLoss(s)(x, y) for s in (0.5, 1.0, 2.0))
    assert total.item() == pytest.approx(parts.item(), rel=1e-5)


def test_mmd_gradient_step_pulls_the_samples_together():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 2, generator=g)
    y = (torch.randn(50, 2, generator=g) + 1.5).requires_grad_()
    mmd = MMDLoss(1.0)
    before = mmd(x, y)
    before.backward()
    after = mmd(x, y.detach() - 0.5 * y.grad)
    assert after.item() < before.item()


# one block; blocks of one or two rows; of three or four (the within-sample matrices' diagonal squares)
@pytest.mark.parametrize("block_values", [1 << 17, 20, 40])
@pytest.mark.parametrize("m, bandwidth", [(12, [1.0]), (12, [0.7, 1.5, 3.0]), (9, [1.3])])
def test_mmd_gradient_equals_autograd_through_the_distance_form(m, bandwidth, block_values, monkeypatch):
    """The hand-written backward of MMDLoss (paired, m = n, and unpaired) against autograd through
    the kernel written from distances, in float64, with the kernel matrices in one block and in
    many; and torch's numerical gradient check."""
    monkeypatch.setattr("recbole_mm.model.loss.mmd._BLOCK_VALUES", block_values)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64).requires_grad_()
    y = (torch.randn(m, 4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    mmd = MMDLoss(bandwidth)

    def reference(x, y):
        k = lambda a, b: sum(torch.exp(-torch.cdist(a, b).pow(2) / (2 * s**2)) for s in mmd.bandwidth)  # noqa: E731
        off = lambda t: (t.sum() - t.diagonal().sum()) / (t.shape[0] * (t.shape[0] - 1))  # noqa: E731
        return off(k(x, x)) + off(k(y, y)) - 2 * (off(k(x, y)) if m == 12 else k(x, y).mean())

    value, expected = mmd(x, y), reference(x, y)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    grads = torch.autograd.grad(value, [x, y])
    for a, b in zip(grads, torch.autograd.grad(expected, [x, y])):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(mmd, (x, y))


@pytest.mark.parametrize("loss", [MMDLoss([0.8, 2.0]), InfoNCELoss(0.3)], ids=["mmd", "infonce"])
def test_alignment_loss_gradients_come_with_the_value_for_what_needs_them(loss, monkeypatch):
    """Both losses compute their gradients in the forward pass: they must go only to the inputs that
    need them, scale with the gradient that arrives, and leave the value the same with and without
    autograd (no_grad, detached inputs)."""
    monkeypatch.setattr("recbole_mm.model.loss.mmd._BLOCK_VALUES", 40)
    monkeypatch.setattr("recbole_mm.model.loss.infonce._BLOCK_VALUES", 40)
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y0 = torch.randn(10, 4, generator=g, dtype=torch.float64) + 0.3
    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    value = loss(x, y)
    full = torch.autograd.grad(3.5 * value, [x, y])
    with torch.no_grad():
        assert loss(x, y).item() == value.item()
    assert loss(x0, y0).item() == value.item()
    # one side constant: the other side's gradient is unchanged
    only_y = y0.clone().requires_grad_()
    (grad_y,) = torch.autograd.grad(loss(x0, only_y), [only_y])
    assert torch.allclose(3.5 * grad_y, full[1], rtol=1e-12)
    only_x = x0.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(loss(only_x, y0), [only_x])
    assert torch.allclose(3.5 * grad_x, full[0], rtol=1e-12)
    assert full[0].abs().max() > 0 and full[1].abs().max() > 0


def test_gaussian_kernel_slope_is_the_derivative_in_the_exponent():
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    exponent = -torch.cdist(x, y).pow(2) / 2
    for bws in ([1.0], [2.0], [0.5, 1.0, 4.0]):
        left, right, ratios = exponent_factors(x, y, bws)
        assert torch.allclose(left @ right.T, exponent / bws[0] ** 2)
        kernel, slope = kernel_from_exponent(left @ right.T, ratios, slope=True)
        assert torch.allclose(kernel, gaussian_kernel(x, y, bws))
        assert torch.allclose(slope / bws[0] ** 2, sum(torch.exp(exponent / s**2) / s**2 for s in bws))


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="bandwidth"):
        MMDLoss([1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        MMDLoss()(torch.randn(1, 3), torch.randn(4, 3))


def test_infonce_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.1], [0.5, 1.0], [-1.0, 1.0]])
    tau = 0.2

    def cos(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    expected = 0.0
    for i in range(3):
        logits = [cos(a[i], b[j]) / tau for j in range(3)]
        expected -= logits[i] - math.log(sum(math.exp(s) for s in logits))
    assert InfoNCELoss(tau)(a, b).item() == pytest.approx(expected / 3, rel=1e-5)


@pytest.mark.parametrize("block_values", [1 << 17, 20, 40])  # one block; blocks of one or two rows; of three
@pytest.mark.parametrize("tau", [0.2, 0.005])  # 0.005: logits up to 200, exp() would overflow unshifted
def test_infonce_value_and_gradients_equal_cross_entropy_over_the_logits(tau, block_values, monkeypatch):
    # the blocked loss with its hand-written backward against autograd through torch's cross-entropy
    # over the whole logit matrix, in float64; and torch's numerical gradient check
    monkeypatch.setattr("recbole_mm.model.loss.infonce._BLOCK_VALUES", block_values)
    g = torch.Generator().manual_seed(12)
    a = torch.randn(11, 5, generator=g, dtype=torch.float64).requires_grad_()
    b = (torch.randn(11, 5, generator=g, dtype=torch.float64) + a.detach()).requires_grad_()
    loss = InfoNCELoss(tau)

    def reference(a, b):
        logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / tau
        return torch.nn.functional.cross_entropy(logits, torch.arange(a.shape[0]))

    value, expected = loss(a, b), reference(a, b)
    assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=1e-10)
    for mine, theirs in zip(torch.autograd.grad(value, [a, b]), torch.autograd.grad(expected, [a, b])):
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(loss, (a, b))


def test_infonce_prefers_matched_views_and_checks_shapes():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 8, generator=g)
    loss = InfoNCELoss(0.2)
    matched = loss(a, a + 0.05 * torch.randn(16, 8, generator=g))
    shuffled = loss(a, a[torch.randperm(16, generator=g)])
    assert matched.item() < shuffled.item()
    with pytest.raises(ValueError, match="same items"):
        loss(a, a[:4])
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)


class _Model(BPRLossMixin, EmbRegLossMixin, AlignmentLossMixin, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.init_alignment_losses([1.0, 2.0], 0.5)


def test_mixins_bpr_and_embedding_regulariser():
    model = _Model()
    pos, neg = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    expected = -F.logsigmoid(pos - neg).mean()
    assert model.bpr_loss(pos, neg).item() == pytest.approx(expected.item(), rel=1e-5)
    u, i = torch.randn(4, 3), torch.randn(4, 3)
    # RecBole's EmbLoss(require_pow=True): sum of squared norms / (2 * batch)
    assert model.emb_reg_loss(u, i).item() == pytest.approx(((u**2).sum() + (i**2).sum()).item() / 8, rel=1e-5)
    assert list(model.state_dict()) == []  # the losses hold no parameters or buffers


def test_alignment_losses_average_over_modality_pairs():
    model = _Model()
    g = torch.Generator().manual_seed(6)
    views = [torch.randn(10, 4, generator=g) + s for s in (0.0, 0.5, 1.0)]
    mmd, cl = model.alignment_losses(views)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected_mmd = sum(MMDLoss([1.0, 2.0])(views[i], views[j]).item() for i, j in pairs) / 3
    expected_cl = sum(InfoNCELoss(0.5)(views[i], views[j]).item() for i, j in pairs) / 3
    assert mmd.item() == pytest.approx(expected_mmd, rel=1e-5)
    assert cl.item() == pytest.approx(expected_cl, rel=1e-5)
    one_mmd, one_cl = model.alignment_losses(views[:1])
    assert one_mmd.item() == 0.0 and one_cl.item() == 0.0
