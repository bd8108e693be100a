"""Mamba mixer and blocks (recbole_mm.model.layers.mamba): scan vs the plain recurrence,
parameter layout vs mamba-ssm / mambapy, causality, gradients, backend choice and errors."""

import logging

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.layers import mamba as mamba_mod
from recbole_mm.model.layers import compiled, scan_kernel
from recbole_mm.model.layers.mamba import (Mamba, MambaBackendError, MambaEncoder, selective_scan,
                                           selective_scan_reference)
from recbole_mm.model.layers.packing import Packing

from conftest import torch_threads

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


def test_encoder_under_cpu_autocast_runs_the_scan_in_float32():
    # RecBole's enable_amp is torch.autocast, bfloat16 on a CPU: the projections then arrive in
    # bfloat16 beside a float32 conv path. The scan must take them in float32 (the compiled
    # kernel read bfloat16 buffers as float32 and corrupted the heap) and match float32 closely
    torch.manual_seed(0)
    enc = MambaEncoder(2, 16, d_state=4, dropout=0.0, backend="torch")
    x = torch.randn(3, 7, 16, requires_grad=True)
    ref = enc(x)
    ref_grad = torch.autograd.grad(ref.pow(2).sum(), x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    grad = torch.autograd.grad(out.float().pow(2).sum(), x)[0]
    assert out.isfinite().all() and grad.isfinite().all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(grad, ref_grad, rtol=0.1, atol=0.1)
    if scan_kernel.available():  # the kernel itself refuses what it cannot read
        u, delta, A, B, C, _ = _scan_inputs(torch.float32)
        with pytest.raises(ValueError, match="contiguous float32 CPU tensors, got torch.bfloat16"):
            scan_kernel.forward(u, delta.bfloat16(), A, B, C)


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
    expected = "compiled for this CPU" if scan_kernel.available() else "compiled CPU scan not used"
    assert expected in lines[0]


needs_kernel = pytest.mark.skipif(not scan_kernel.available(),
                                  reason=f"compiled CPU scan unavailable: {scan_kernel.load()[1]}")


@needs_kernel
def test_compiled_scan_equals_the_torch_scan_forward_and_backward():
    # the PyTorch step loop with its hand-written backward (itself checked against the plain
    # recurrence and gradcheck above) is the reference for the compiled kernel; odd sizes so
    # that vector loops have remainders, 3 threads over 5 rows so the slicing is exercised
    with torch_threads(3):
        inputs = _scan_inputs(torch.float32, b=5, length=11, d=37, n=5, seed=7)
        weight = torch.randn(5, 11, 37, generator=torch.Generator().manual_seed(8))
        outs = []
        for kernel in (True, False):
            y = selective_scan(*inputs, kernel=kernel)
            outs.append((y, torch.autograd.grad((y * weight).sum(), inputs)))
    (y_k, g_k), (y_t, g_t) = outs
    torch.testing.assert_close(y_k, y_t, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D"], g_k, g_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@needs_kernel
def test_compiled_scan_gradient_is_the_same_whichever_slice_finishes_first(monkeypatch):
    # the threads' slices finish in any order; their partial dA must be summed in one fixed order,
    # or a run on three or more threads would not repeat itself bit for bit
    u, delta, A, B, C, _ = (x.detach() for x in _scan_inputs(torch.float32, b=8, length=9, d=33, n=6, seed=3))
    dy = torch.randn(u.shape, generator=torch.Generator().manual_seed(4))

    def sliced(reverse):
        def run(total, work, min_slice=1):  # four slices, one after the other, in a given order
            bounds = [total * i // 4 for i in range(5)]
            for lo, hi in (reversed if reverse else iter)(list(zip(bounds, bounds[1:]))):
                work(lo, hi)
        return run

    grads = []
    for reverse in (False, True):
        monkeypatch.setattr(scan_kernel, "run_sliced", sliced(reverse))
        grads.append(scan_kernel.backward(u, delta, A, B, C, dy))
    for name, first, last in zip(["u", "delta", "A", "B", "C"], *grads):
        assert torch.equal(first, last), f"d{name} depends on the order in which the slices finish"


@pytest.mark.parametrize("rows_multiple", [1, 8], ids=["exact", "spare-rows"])
@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False], ids=["kernel", "step-loop"])
def test_packed_rows_give_the_padded_result(kernel, rows_multiple):
    # sequences of lengths 4, 1, 6 packed end to end: the Mamba mixer (its convolution must not
    # reach into the previous sequence, its scan must restart at each sequence) equals the padded
    # batch at the real positions, output and gradients; 2 threads over 3 sequences so the
    # kernel's slicing by sequence is exercised; with rows_multiple 8 the 11 real rows are followed
    # by 5 spare ones, which change nothing before them
    dtype = torch.float32 if kernel else torch.float64
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4, backend="torch").to(dtype)
    lengths = torch.tensor([4, 1, 6])
    x = torch.randn(3, 7, 8, dtype=dtype)  # right-padded to 7
    packing = Packing(lengths, 7, rows_multiple=rows_multiple)
    real = packing.real
    with torch_threads(2):
        padded = packing.pack(mixer(x))[:real]
        params = list(mixer.parameters())
        g_padded = torch.autograd.grad(padded.square().sum(), params)
        packed = mixer(packing.pack(x), packing)
        g_packed = torch.autograd.grad(packed[:real].square().sum(), params)
    assert real == 11 and packed.shape == (11 if rows_multiple == 1 else 16, 8)
    assert mamba_mod.kernel_runs_on(packed) == kernel
    tol = dict(rtol=1e-5, atol=1e-5) if kernel else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(packed[:real], padded, **tol)
    for (name, _), a, b in zip(mixer.named_parameters(), g_packed, g_padded):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    # the same sequences without their neighbours: nothing crosses a sequence boundary
    alone = mixer(x[2:, :6])[0]
    torch.testing.assert_close(packed[5:real], alone, **tol)


def test_compiled_scan_is_chosen_only_where_it_runs(monkeypatch):
    x64 = torch.zeros(1, 2, 3, dtype=torch.float64)
    assert not mamba_mod.kernel_runs_on(x64)
    with pytest.raises(RuntimeError, match="compiled scan takes float32 CPU tensors"):
        selective_scan(*_scan_inputs(torch.float64), kernel=True)
    # a machine without a compiler: no kernel, and the reason is what the backend line reports
    monkeypatch.setattr(compiled, "_compiler", lambda: None)
    assert compiled.library.__wrapped__("selective_scan", "SCAN") == (None, "no C compiler found ($CC, cc, gcc, clang)")
    monkeypatch.setattr(scan_kernel, "load", lambda: (None, "no C compiler found ($CC, cc, gcc, clang)"))
    assert "compiled CPU scan not used: no C compiler found" in mamba_mod._torch_scan_name(torch.zeros(1))


def test_cuda_branch_passes_mamba_ssm_its_arguments(monkeypatch):
    # mamba-ssm's selective_scan_fn(u, delta, A, B, C, D, z=, delta_bias=, delta_softplus=) and the
    # reference recurrence share signature and layout: routing the layer's CUDA branch through the
    # reference on the CPU checks what the GPU path hands the kernel (pre-softplus delta without
    # bias, [b, d, l] / [b, n, l] layouts, the silu(z) gate) against the torch backend
    torch.manual_seed(0)
    layer = Mamba(16, backend="torch")
    x = torch.randn(3, 7, 16)
    expected = layer(x)
    layer._scan_cuda = selective_scan_reference
    monkeypatch.setattr(Mamba, "_use_cuda_kernel", lambda self, x: True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_row_blocks_cover_the_rows_once_in_cache_sized_slices():
    from recbole_mm.model.layers.blocks import row_blocks
    cpu = torch.device("cpu")
    with torch_threads(1):
        blocks = row_blocks(10, 3, 7, cpu)  # 7 // 3 = 2 rows a block
        assert row_blocks(5, 100, 7, cpu) == [slice(i, i + 1) for i in range(5)]  # at least one row
        assert row_blocks(0, 3, 7, cpu) == []
        assert row_blocks(10, 3, 7, torch.device("meta")) == [slice(0, 10)]  # not a CPU: one pass
    assert blocks == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    with torch_threads(2):  # the budget is per thread: 14 // 3 = 4 rows a block
        assert row_blocks(10, 3, 7, cpu) == [slice(0, 4), slice(4, 8), slice(8, 10)]
        assert row_blocks(10, 3, 7, torch.device("meta")) == [slice(0, 10)]
