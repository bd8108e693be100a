"""The CPU Dropout (recbole_mm/model/layers/dropout.py): the compiled kernel and the 16-bit path
are each held to dropout's contract — drop rate p, kept values scaled by 1/(1-p), the backward
through the same mask, repeatable under torch's seed, no pattern across positions."""

import math

import pytest
import torch

from recbole_mm.model.layers import compiled
from recbole_mm.model.layers import dropout as dropout_mod
from recbole_mm.model.layers.dropout import Dropout

from conftest import torch_threads

kernel_or_not = pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "16-bit"])


@pytest.fixture
def path(monkeypatch):
    def use(kernel: bool):
        if kernel and dropout_mod.load()[0] is None:
            pytest.skip(f"compiled dropout unavailable: {dropout_mod.load()[1]}")
        if not kernel:
            monkeypatch.setattr(dropout_mod, "load", lambda: (None, "off for the test"))
    return use


@kernel_or_not
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_scale(path, kernel, p):
    path(kernel)
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros: a zero output means dropped
    y = Dropout(p).train()(x)
    kept = y != 0
    n = x.numel()
    # the rate within 5 standard deviations of p (binomial), the kept values x / (1 - p)
    assert abs((1 - kept.float().mean().item()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-4, atol=0)


@kernel_or_not
def test_backward_passes_through_the_forward_mask(path, kernel):
    path(kernel)
    torch.manual_seed(1)
    x = (torch.rand(37, 129) + 0.5).requires_grad_()
    weight = torch.randn(37, 129)
    y = Dropout(0.4).train()(x)
    (y * weight).sum().backward()
    scale = (y.detach() / x.detach())  # 0 where dropped, 1/(1-p) where kept
    torch.testing.assert_close(x.grad, weight * scale, rtol=1e-5, atol=1e-6)
    assert 0.3 < (scale == 0).float().mean() < 0.5


@kernel_or_not
def test_repeatable_under_torch_seed_and_fresh_per_call(path, kernel):
    path(kernel)
    layer, x = Dropout(0.5).train(), torch.ones(64, 64)
    torch.manual_seed(5)
    a, b = layer(x), layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), a)
    assert (a != b).float().mean() > 0.3  # a second call draws a new mask


@kernel_or_not
def test_no_pattern_across_positions(path, kernel):
    # masks of neighbouring elements, rows and columns agree as often as independent coins would:
    # 1 - 2 p (1 - p) = 0.5 at p = 0.5
    path(kernel)
    torch.manual_seed(2)
    kept = (Dropout(0.5).train()(torch.ones(512, 512)) != 0).float()
    for a, b in [(kept[:, 1:], kept[:, :-1]), (kept[1:], kept[:-1]), (kept[:, 4:], kept[:, :-4])]:
        assert abs((a == b).float().mean().item() - 0.5) < 0.01


def test_kernel_mask_does_not_depend_on_threads(path):
    path(True)
    x = torch.rand(3 * (1 << 16) + 5) + 0.5
    outs = []
    for n in (1, 3):
        with torch_threads(n):
            torch.manual_seed(3)
            outs.append(Dropout(0.3).train()(x))
    assert torch.equal(outs[0], outs[1])


def test_identity_where_it_should_be_and_noncontiguous_input():
    x = torch.randn(8, 16)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    torch.manual_seed(4)
    t = torch.rand(16, 8).t() + 0.5  # not contiguous
    y = Dropout(0.3).train()(t)
    assert y.shape == t.shape and ((y == 0) | torch.isclose(y, t / 0.7)).all()
    d64 = Dropout(0.3).train()(torch.ones(100, 100, dtype=torch.float64))  # the 16-bit path
    assert d64.dtype == torch.float64 and 0.25 < (d64 == 0).double().mean() < 0.35


def test_switch_keeps_the_kernel_off(monkeypatch):
    monkeypatch.setenv("RECBOLE_MM_DROPOUT_KERNEL", "0")
    assert compiled.library.__wrapped__("dropout", "DROPOUT") == (None, "RECBOLE_MM_DROPOUT_KERNEL=0")
