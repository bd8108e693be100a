"""DREAM: Dilated REfinement Attention Module (MambaRec, Ren et al., CIKM'25, sec. 4.1).

An item's reduced modality vector (``d`` values, eq. 12-13) is viewed as a ``C x H x W`` map and
refined by five parallel branches with ``C_b`` channels each (eq. 1): a 1x1 convolution, three 3x3
convolutions with dilations ``dilations`` and ``padding = dilation`` (so the map keeps its size), and
global average pooling -> 1x1 convolution -> bilinear upsampling. The ``C' = 5 C_b`` concatenated
channels ``F`` are re-weighted twice: channel attention ``M_c = sigmoid(W2 ReLU(W1 GAP(F)))`` (eq. 2-3) and
spatial attention ``M_s = sigmoid(conv1x1(mean_c F))`` (eq. 4-5); eq. 6 keeps "the more responsive
attention", ``F * max(M_c, M_s)``, which is projected back to ``C`` channels (1x1 conv, i.e. ``d``
values) and then linearly to ``out_dim`` (the embedding size). ``F`` is signed (about half its
entries are negative at initialisation), so the literal ``max(F * M_c, F * M_s)`` would equal
``F * min(M_c, M_s)`` wherever ``F < 0``: it would pick the weaker gate there.

The branches are plain convolutions, as the paper describes them: ASPP's batch norm would make an
item's output depend on the other items of its batch, and a ReLU per branch kills the pooled branch
at initialisation whenever its bias is negative (its input, the mean of a centred vector, is near
zero); the gates and the maximum are the non-linearity.

Cost. The five branches are linear in the input (convolutions, a mean and a constant upsampling),
so ``F = x W + b`` with ``W`` of shape ``[d, C' H W]``: ``W`` and ``b`` are obtained by running the
branches on the ``d`` unit vectors and on zero (``d + 1`` tiny maps, differentiable in the conv
weights), and the ``n`` items then cost one matrix product instead of five convolutions over ``n``
maps (same result up to float rounding; ``branches`` is the direct computation). The means the two
attentions read are affine in the input as well, so they come from averaged ``W`` and ``b`` without
a pass over ``F``; the 1x1 spatial-attention conv is the scalar affine map it is, and the 1x1 merge
is one matrix product on a channels-last ``F``. Forward + backward, one thread on a shared machine:
12k items with d = 48, 0.61 s instead of 1.79 s for the convolutions; 6.7k items with d = 16,
0.26 s instead of 0.84 s.

What is left is ``F`` itself, ``[n, H W, C']`` (16 x 40 values per item at the defaults, 17 MB for
TikTok's 6.7k items), and the gated copy of it; the merge reduces it to ``C`` channels right away.
:class:`_GatedMerge` runs eq. 1, eq. 6 and the merge for a block of items at a time (``F`` is
recomputed in the backward pass, or kept where small: below), so that every pass over a block
stays in the cache, and it takes eq. 6's gradient apart with float arithmetic only (torch's boolean
``where`` / ``>=`` on CPU are several times slower than a multiplication). DREAM forward + backward,
one thread on a loaded machine: 6.7k items with d = 16, 0.05 s instead of 0.13 s with the whole
``F`` at once; 12k items with d = 48, 0.12 s instead of 0.23 s. Between a block's matrix products, the element-wise
work of eq. 6 (the gate, its product with ``F``, the gradient's split between the attentions and
their sums) is one pass of a small C kernel on CPU float32 tensors (``csrc/dream_gate.c``, built and
cached as the selective scan's; ``RECBOLE_MM_DREAM_KERNEL=0`` keeps the torch ops, which run
elsewhere too): DREAM forward + backward, one thread, two training runs beside it, 20 ms instead of
27 ms for TikTok's 6.7k items at d = 16, 65 ms instead of 79 ms for Beauty's 12k at d = 48. (A C
kernel doing the products too, tiled by eight items, was slower than the products in BLAS.)

On a CPU ``F`` is kept from the forward pass for the backward where it holds at most
:data:`_KEEP_BYTES` (64 MB: TikTok's 17 MB, Beauty's 31 MB a modality), so that the backward reads
it instead of recomputing its product; the gate then writes ``F * gate`` into a block-sized buffer,
never into the kept ``F``, so that a second backward (``retain_graph``) reads it unchanged. Larger
maps (and maps on a GPU, where the product is cheap) are recomputed, as above. DREAM forward +
backward, one thread, idle machine: 12k items at d = 48 57.8-60.8 ms instead of 71.1-76.7 ms;
TikTok's 6.7k at d = 16, whose product is short (17 values deep), 20.4-22.8 ms against 20.8-27.9
ms. A Beauty epoch as one two-thread job: 17.7 s instead of 19.6 s; two runs side by side on two
cores gain nothing (docs/results/mambarec-cost.md, "Blocks per thread").

Map layout. ``default_map_shape(d)`` picks the smallest square ``H = W >= 3`` dividing ``d`` (else the
smallest near-square ``3 <= H <= W``), e.g. ``d = 48 -> 3x4x4``, ``64 -> 4x4x4``, ``24 -> 2x3x4``;
``[d, 1, 1]`` reproduces the layout of the authors' code (64 channels of 1x1).

What a 1x1 map does (and, more generally, a dilation ``r >= max(H, W)``): a 3x3 kernel with dilation
``r`` and padding ``r`` reads the taps at offsets ``{-r, 0, r}``; on a map with fewer than ``r + 1``
rows and columns every off-centre tap lands in the zero padding, so the dilated convolution equals
the 1x1 convolution with its centre weights ``w[:, :, 1, 1]`` and the three "multi-scale" branches
become three more 1x1 convolutions. On a 1x1 map moreover the GAP branch is one more 1x1
convolution (pooling and bilinear upsampling are identities), channel attention is an MLP gate on
the vector itself, and spatial attention is one scalar gate per item shared by all channels (no
spatial selectivity). The paper's dilations 6, 12, 18 come from image segmentation (ASPP on 33x33+
maps); on any map an item vector can fill they degenerate the same way, so ``dilations`` defaults to
rates that fit the map (``1, 2, 3`` capped at ``max(H, W) - 1``) and a warning is logged for a rate
that reaches no neighbour.
"""

import ctypes
import logging
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recbole_mm.model.layers import compiled
from recbole_mm.model.layers.blocks import row_blocks
from recbole_mm.model.layers.compiled import ADDRESS, I64, ptr

logger = logging.getLogger(__name__)

MapShape = Tuple[int, int, int]


def default_map_shape(d: int) -> MapShape:
    """``(C, H, W)`` with ``C H W = d``: the most square map with ``3 <= H <= W``, smallest area
    first (so as many channels as possible); ``(1, H, W)`` most square if no such map exists."""
    candidates = [(w - h, h * w, h, w) for h in range(3, d + 1) for w in range(h, d // h + 1) if d % (h * w) == 0]
    if candidates:
        _, area, h, w = min(candidates)
        return d // area, h, w
    h = max(h for h in range(1, int(d**0.5) + 1) if d % h == 0)
    return 1, h, d // h


def default_dilations(map_shape: MapShape) -> Tuple[int, int, int]:
    """Three increasing rates that still reach a neighbour: ``1, 2, 3`` capped at ``max(H, W) - 1``
    (all 1 on a 1x1 map, where nothing can be reached)."""
    reach = max(max(map_shape[1:]) - 1, 1)
    return tuple(min(r, reach) for r in (1, 2, 3))


class DREAM(nn.Module):
    """Multi-scale dilated convolutions with channel and spatial attention on a ``C x H x W`` view.

    Args:
        dim: input size ``d``.
        out_dim: output size (the embedding size); ``dim`` if None.
        map_shape: ``(C, H, W)`` with ``C H W = d``; ``default_map_shape(d)`` if None.
        dilations: the three dilation rates; ``default_dilations(map_shape)`` if None.
        branch_channels: ``C_b``, channels per branch; ``max(C, 8)`` if None, so that on maps with few
            channels (d=48 -> C=3) the branches and the attention bottleneck ``5 C_b / r`` are not
            a handful of units that a ReLU can switch off all at once.
        att_reduction: ``r`` of the channel-attention bottleneck ``C' -> C'/r -> C'``.

    Shape: ``[..., d] -> [..., out_dim]``.
    """

    def __init__(
        self,
        dim: int,
        out_dim: Optional[int] = None,
        map_shape: Optional[Sequence[int]] = None,
        dilations: Optional[Sequence[int]] = None,
        branch_channels: Optional[int] = None,
        att_reduction: int = 4,
    ):
        super().__init__()
        self.map_shape = tuple(int(s) for s in map_shape) if map_shape is not None else default_map_shape(dim)
        if len(self.map_shape) != 3 or self.map_shape[0] * self.map_shape[1] * self.map_shape[2] != dim:
            raise ValueError(f"dream_map_shape {list(self.map_shape)} must be [C, H, W] with C*H*W = d = {dim}")
        c, h, w = self.map_shape
        if dilations is None:
            dilations = default_dilations(self.map_shape)
        self.dilations = tuple(int(r) for r in dilations)
        if len(self.dilations) != 3 or min(self.dilations) < 1:
            raise ValueError(f"dream_dilations must be three positive rates, got {list(self.dilations)}")
        for r in sorted(set(self.dilations)):  # once a rate: a 1x1 map's default rates are 1, 1, 1
            if r >= h and r >= w:
                logger.warning(
                    "DREAM: dilation %d on a %dx%d map reaches no neighbour; the branch reduces to its "
                    "centre-tap 1x1 convolution", r, h, w,
                )
        cb = branch_channels or max(c, 8)
        fused = 5 * cb
        self.out_dim = out_dim or dim
        self.point = nn.Conv2d(c, cb, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(c, cb, 3, padding=r, dilation=r) for r in self.dilations)
        self.pool = nn.Conv2d(c, cb, 1)  # applied to the globally pooled map (branch 5)
        self.channel_att = nn.Sequential(
            nn.Linear(fused, max(fused // att_reduction, 1)),
            nn.ReLU(),
            nn.Linear(max(fused // att_reduction, 1), fused),
            nn.Sigmoid(),
        )
        self.spatial_att = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sigmoid())
        self.merge = nn.Conv2d(fused, c, 1)
        self.out = nn.Linear(dim, self.out_dim)

    def branches(self, fmap: torch.Tensor) -> torch.Tensor:
        """The five branches on maps ``[n, C, H, W]``, concatenated: ``F``, ``[n, C', H, W]`` (eq. 1)."""
        h, w = self.map_shape[1:]
        pooled = self.pool(fmap.mean(dim=(2, 3), keepdim=True))
        parts = [self.point(fmap), *(conv(fmap) for conv in self.dilated)]
        parts.append(F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1)

    def affine_branches(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The branches as the affine map they are: ``F = x W + b`` with ``(W [d, C', H W], b [C', H W])``
        (module docstring), differentiable in the convolutions' weights; dtype / device of ``like``."""
        d = self.map_shape[0] * self.map_shape[1] * self.map_shape[2]
        basis = torch.cat([torch.eye(d, dtype=like.dtype, device=like.device), like.new_zeros(1, d)])
        out = self.branches(basis.view(d + 1, *self.map_shape)).flatten(2)  # [d + 1, C', H W]
        bias = out[-1]
        return out[:-1] - bias, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        weight, bias = self.affine_branches(x)
        weight, bias = weight.transpose(1, 2), bias.T  # channels last: [d, H W, C'], [H W, C']
        # both attentions read means of F, which are affine in x too: W and b averaged
        gap = torch.addmm(bias.mean(0), x, weight.mean(1))  # GAP over H W, [n, C']
        channel_mean = torch.addmm(bias.mean(1), x, weight.mean(2))  # mean over C', [n, H W]
        m_c = self.channel_att(gap)  # eq. 2-3
        conv = self.spatial_att[0]  # a 1x1 conv from one channel to one is a scalar affine map
        m_s = torch.sigmoid(channel_mean * conv.weight.reshape(()) + conv.bias)  # eq. 4-5
        merged = _GatedMerge.apply(x, weight.flatten(1), bias.flatten(), m_c, m_s, self.merge.weight.flatten(1),
                                   torch.is_grad_enabled())
        merged = merged + self.merge.bias  # the 1x1 merge conv's bias, [n, H W, C]
        return self.out(merged.transpose(1, 2).flatten(1)).reshape(*lead, self.out_dim)


#: the largest ``F`` (bytes) that :class:`_GatedMerge` keeps from the forward pass for the backward; a
#: larger one is recomputed there block by block (module docstring, "Cost")
_KEEP_BYTES = 1 << 26

#: values of ``F`` per block of :class:`_GatedMerge` and torch thread (:func:`row_blocks`): 512 KB in
#: float32, a few such maps fit in a core's cache
_BLOCK_VALUES = 1 << 17


class _GatedMerge(torch.autograd.Function):
    """``(F * max(M_c, M_s)) W_m^T`` with ``F = x W + b`` (eq. 1 as one product, eq. 6, the 1x1 merge
    without its bias), one block of rows at a time (module docstring, "Cost").

    ``x [n, d]``, ``weight [d, P K]`` and ``bias [P K]`` (channels last: ``P = H W`` positions of ``K =
    C'`` channels), ``m_c [n, K]``, ``m_s [n, P]``, ``merge_w [C, K]``; output ``[n, P, C]``. Where the
    gates tie, the gradient goes to ``M_c``, the "more responsive" choice of eq. 6 being ``M_c >= M_s``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m_c, m_s, merge_w, grad_enabled):
        # [x, 1] [W; b] = x W + b: the bias rides in the product (no pass over F for it), and the
        # backward's x^T dF yields b's gradient as its last row
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        wb = torch.cat([weight, bias[None]])
        m_c, m_s = m_c.contiguous(), m_s.contiguous()
        n, p, k = x.shape[0], m_s.shape[1], m_c.shape[1]
        blocks = row_blocks(n, p * k, _BLOCK_VALUES, x1.device)
        # F kept for the backward where it is small, on a CPU (module docstring, "Cost")
        keep = grad_enabled and x1.device.type == "cpu" and n * p * k * x1.element_size() <= _KEEP_BYTES
        kept = x1.new_empty(n, p, k) if keep else None
        buffer = _gate_buffer(kept, blocks)
        ctx.save_for_backward(x1, wb, m_c, m_s, merge_w, kept)
        out = x.new_empty(n, p, merge_w.shape[0])
        lib = _kernel_for(x1)
        for rows in blocks:
            fused, gated = _block_of_f(x1, wb, kept, buffer, rows, p, k)
            _gate(lib, fused, m_c[rows], m_s[rows], gated)  # eq. 6: the larger gate scales the signed F
            torch.matmul(gated, merge_w.T, out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        x1, wb, m_c, m_s, merge_w, kept = ctx.saved_tensors
        n, p, k = x1.shape[0], m_s.shape[1], m_c.shape[1]
        grad = grad.contiguous()  # arrives transposed from the output layer's flatten
        grad_x, grad_m_c, grad_m_s = x1.new_empty(n, x1.shape[1] - 1), torch.empty_like(m_c), torch.empty_like(m_s)
        grad_wb, grad_merge = torch.zeros_like(wb), torch.zeros_like(merge_w)
        weight_t = wb[:-1].T
        lib = _kernel_for(x1)
        blocks = row_blocks(n, p * k, _BLOCK_VALUES, x1.device)
        buffer = _gate_buffer(kept, blocks)
        for rows in blocks:
            fused, gated = _block_of_f(x1, wb, kept, buffer, rows, p, k, store=False)
            grad_y = torch.matmul(grad[rows], merge_w)  # [rows, P, K], the gradient at F * gate
            _gate_gradients(lib, fused, gated, grad_y, m_c[rows], m_s[rows], grad_m_c[rows], grad_m_s[rows])
            grad_merge.addmm_(grad[rows].view(-1, grad.shape[-1]).T, gated.view(-1, k))
            grad_fused = grad_y.view(-1, p * k)
            grad_wb.addmm_(x1[rows].T, grad_fused)
            torch.mm(grad_fused, weight_t, out=grad_x[rows])
        return grad_x, grad_wb[:-1], grad_wb[-1], grad_m_c, grad_m_s, grad_merge, None


def _gate_buffer(kept: Optional[torch.Tensor], blocks: List[slice]) -> Optional[torch.Tensor]:
    """Where the gate writes ``F * gate`` for a block when ``F`` is kept (None otherwise: in place), so
    that the kept ``F`` stays as it is; one block's size, which stays in the cache."""
    if kept is None or not blocks:
        return None
    return kept.new_empty(blocks[0].stop - blocks[0].start, *kept.shape[1:])


def _block_of_f(x1: torch.Tensor, wb: torch.Tensor, kept: Optional[torch.Tensor], buffer: Optional[torch.Tensor],
                rows: slice, p: int, k: int, store: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A block of ``F = [x, 1] [W; b]``, ``[rows, P, K]``, and where the gate is to write ``F * gate``:
    computed afresh and gated in place where ``kept`` is None; else ``kept``'s rows (which the
    forward pass, ``store``, computes first) gated into ``buffer``."""
    if kept is None:
        fused = torch.mm(x1[rows], wb).view(-1, p, k)
        return fused, fused
    if store:
        torch.mm(x1[rows], wb, out=kept[rows].view(-1, p * k))
    return kept[rows], buffer[: rows.stop - rows.start]


_FUNCTIONS = (("dream_gate_forward", (I64,) * 3 + (ADDRESS,) * 4),
              ("dream_gate_backward", (I64,) * 3 + (ADDRESS,) * 7))


def load_kernel() -> Tuple[Optional[ctypes.CDLL], str]:
    """The compiled gate (``csrc/dream_gate.c``) as :func:`~recbole_mm.model.layers.compiled.library`
    gives it; ``RECBOLE_MM_DREAM_KERNEL=0`` keeps it off (the torch ops below run instead)."""
    return compiled.library("dream_gate", "DREAM", _FUNCTIONS)


def _kernel_for(x: torch.Tensor) -> Optional[ctypes.CDLL]:
    """The compiled gate for a pass over ``x``'s blocks (CPU float32), else None: the torch ops."""
    return load_kernel()[0] if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _gate(lib: Optional[ctypes.CDLL], fused: torch.Tensor, m_c: torch.Tensor, m_s: torch.Tensor,
          gated: torch.Tensor) -> None:
    """``gated = F * max(M_c, M_s)`` for a block ``F [rows, P, K]`` in ``fused`` (both contiguous;
    ``gated`` may be ``fused``), with the compiled gate ``lib`` (:func:`_kernel_for`) or the torch ops."""
    if lib is not None:
        lib.dream_gate_forward(*fused.shape, ptr(m_c), ptr(m_s), ptr(fused), ptr(gated))
    else:
        torch.mul(fused, torch.maximum(m_c[:, None, :], m_s[:, :, None]), out=gated)


def _gate_gradients(lib: Optional[ctypes.CDLL], fused: torch.Tensor, gated: torch.Tensor, grad_y: torch.Tensor,
                    m_c: torch.Tensor, m_s: torch.Tensor, grad_m_c: torch.Tensor, grad_m_s: torch.Tensor) -> None:
    """Eq. 6 backwards on a block: with ``F`` in ``fused`` and the gradient at ``F * gate`` in
    ``grad_y`` (both ``[rows, P, K]``, contiguous), writes the gates' gradients into ``grad_m_c`` and
    ``grad_m_s``, ``F * gate`` into ``gated`` (which may be ``fused``) and the gradient at ``F`` into
    ``grad_y``. One pass in the compiled kernel (CPU float32: the per-element torch ops below cost
    more than the block's products there: ``lib``, :func:`_kernel_for`); the torch ops elsewhere."""
    if lib is not None:
        lib.dream_gate_backward(*fused.shape, ptr(m_c), ptr(m_s), ptr(fused), ptr(gated), ptr(grad_y), ptr(grad_m_c),
                                ptr(grad_m_s))
        return
    c, s = m_c[:, None, :], m_s[:, :, None]
    gate = torch.maximum(c, s)
    grad_gate = grad_y * fused
    torch.mul(fused, gate, out=gated)
    grad_y.mul_(gate)
    # the gate's gradient goes to M_s where M_s > M_c, to M_c elsewhere; threshold_backward
    # (ReLU's backward: grad where the second argument > 0) does the split in floats
    to_s = torch.ops.aten.threshold_backward(grad_gate, s - c, 0)
    torch.sum(to_s, 2, out=grad_m_s)
    torch.sum(grad_gate.sub_(to_s), 1, out=grad_m_c)
