"""Mamba mixer and blocks (recbole_mm.model.layers.mamba): scan vs the plain recurrence,
parameter layout vs mamba-ssm / mambapy, causality, gradients, backend choice and errors."""

import logging

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.layers import mamba as mamba_mod
from recbole_mm.model.layers.mamba import (Mamba, MambaBackendError, MambaEncoder, selective_scan,
                                           selective_scan_reference)

# mamba_ssm.Mamba(d_model=16) (expand 2, d_state 16, d_conv 4): names and shapes from its source
MAMBA_SSM_LAYOUT_D16 = {
    "in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
    "x_proj.weight": (33, 32), "dt_proj.weight": (32, 1), "dt_proj.bias": (32,),
    "A_log": (32, 16), "D": (32,), "out_proj.weight": (16, 32),
}


@pytest.mark.parametrize("block", [1, 2 ** 19], ids=["chunks-of-1", "one-chunk"])
def test_scan_equals_plain_recurrence(monkeypatch, block):
    monkeypatch.setattr(mamba_mod, "_SCAN_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    b, length, d, n = 3, 7, 5, 4
    u, delta = torch.randn(b, length, d, generator=g), F.softplus(torch.randn(b, length, d, generator=g))
    A = -torch.rand(d, n, generator=g) * 3
    B, C, D = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g), torch.randn(d, generator=g)
    fast = selective_scan(u, delta, A, B, C, D)
    ref = selective_scan_reference(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                   C.transpose(1, 2), D).transpose(1, 2)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    # and by hand for the first two steps of one channel/state pair: h1 = dB u, h2 = dA h1 + dB u
    h1 = delta[0, 0, 0] * B[0, 0] * u[0, 0, 0]
    h2 = torch.exp(delta[0, 1, 0] * A[0]) * h1 + delta[0, 1, 0] * B[0, 1] * u[0, 1, 0]
    assert fast[0, 1, 0].item() == pytest.approx((h2 @ C[0, 1] + D[0] * u[0, 1, 0]).item(), rel=1e-5)


def _scan_inputs(dtype, b=2, length=6, d=5, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, d, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(b, length, d, generator=g, dtype=dtype))
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 3
    B, C = torch.randn(b, length, n, generator=g, dtype=dtype), torch.randn(b, length, n, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (u, delta, A, B, C, torch.randn(d, generator=g, dtype=dtype))]


@pytest.mark.parametrize("block", [1, 2 * 6 * 5 * 3, 2 ** 19], ids=["chunks-of-1", "chunks-of-2", "one-chunk"])
def test_scan_backward_is_the_gradient_of_its_forward(monkeypatch, block):
    # the scan works on batch chunks of about `block` expanded elements; every chunking must agree
    monkeypatch.setattr(mamba_mod, "_SCAN_BLOCK_ELEMENTS", block)
    # the hand-written backward against finite differences (float64) ...
    assert torch.autograd.gradcheck(selective_scan, _scan_inputs(torch.float64, b=5))
    # ... and against autograd through the plain recurrence, with a non-trivial upstream gradient
    inputs = _scan_inputs(torch.float32, b=3, length=9, d=6, n=4, seed=2)
    u, delta, A, B, C, D = inputs
    weight = torch.randn(3, 9, 6, generator=torch.Generator().manual_seed(3))
    fast = torch.autograd.grad((selective_scan(*inputs) * weight).sum(), inputs)
    ref_y = selective_scan_reference(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                     C.transpose(1, 2), D).transpose(1, 2)
    ref = torch.autograd.grad((ref_y * weight).sum(), inputs)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D"], fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_parameters_have_mamba_ssm_names_and_shapes():
    layout = {k: tuple(v.shape) for k, v in Mamba(16, backend="torch").state_dict().items()}
    assert layout == MAMBA_SSM_LAYOUT_D16


def test_mixer_matches_mambapy_after_loading_its_checkpoint():
    # mambapy's MambaBlock is an independent implementation with mamba_ssm.Mamba's parameter names
    from mambapy.mamba import MambaBlock as MambapyBlock, MambaConfig

    torch.manual_seed(0)
    other = MambapyBlock(MambaConfig(d_model=16, n_layers=1, d_state=16, d_conv=4, expand_factor=2, pscan=False))
    ours = Mamba(16, backend="torch")
    ours.load_state_dict(other.state_dict())  # strict: same names and shapes
    x = torch.randn(4, 9, 16)
    torch.testing.assert_close(ours(x), other(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or mamba_mod._import_selective_scan_cuda()[0] is None,
                    reason="needs mamba_ssm and a CUDA device")
def test_torch_backend_equals_mamba_ssm_on_cuda():
    from mamba_ssm import Mamba as MambaSSM

    torch.manual_seed(0)
    ref = MambaSSM(d_model=32, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(32, backend="torch").cuda()
    ours.load_state_dict(ref.state_dict())
    ours_cuda = Mamba(32, backend="cuda").cuda()
    ours_cuda.load_state_dict(ref.state_dict())
    x = torch.randn(4, 50, 32, device="cuda")
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_cuda(x), ref(x), rtol=1e-4, atol=1e-4)


def test_encoder_is_causal():
    torch.manual_seed(0)
    enc = MambaEncoder(2, 16, d_state=4, dropout=0.0, backend="torch").eval()
    x = torch.randn(2, 10, 16)
    x2 = x.clone()
    x2[:, 6] = torch.randn(2, 16)  # change a "future" position
    y, y2 = enc(x), enc(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert (y[:, 6] - y2[:, 6]).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    enc = MambaEncoder(2, 16, d_state=4, dropout=0.1, backend="torch")
    enc(torch.randn(3, 6, 16)).pow(2).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert {n for n, _ in enc.named_parameters()} >= {"layers.0.alpha", "layers.1.mixer.A_log"}
    assert enc.layers[0].alpha.item() == 1.0  # learnable scale starts at 1


@pytest.mark.skipif(torch.cuda.is_available() and mamba_mod._import_selective_scan_cuda()[0] is not None,
                    reason="mamba_ssm runs here")
def test_cuda_backend_where_it_cannot_run_raises_a_reasoned_error():
    with pytest.raises(MambaBackendError, match=r"mamba_backend='cuda' cannot run: (mamba_ssm|torch sees no CUDA)"):
        Mamba(16, backend="cuda")
    with pytest.raises(ValueError, match="mamba_backend must be one of"):
        Mamba(16, backend="triton")


def test_auto_on_cpu_logs_one_line_naming_the_torch_backend(caplog, monkeypatch):
    monkeypatch.setattr(mamba_mod, "_logged_backend_lines", set())
    enc = MambaEncoder(2, 16, d_state=4, backend="auto")
    with caplog.at_level(logging.INFO):
        enc(torch.randn(2, 5, 16))
        enc(torch.randn(2, 5, 16))
    lines = [r.getMessage() for r in caplog.records if "Mamba backend" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Mamba backend: torch")
