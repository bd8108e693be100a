"""Graphs for graph-based multimodal recommenders (MGCN's multi-view encoder, used by MambaRec).

* Item-item kNN graph per modality (MGCN / FREEDOM style): ``A[i, j] = 1`` iff ``j`` is one of the
  ``k`` items most cosine-similar to ``i`` on the raw features (``j != i``); we symmetrise it
  (``A = max(A, A^T)``), add self-loops and normalise it symmetrically, ``D^-1/2 (A + I) D^-1/2``
  (the GCN operator). MGCN instead keeps the directed kNN (self included, since ``cos(i, i) = 1``
  ranks first) with row-degree normalisation; the symmetric form is a proper symmetric operator
  whatever ``k`` is. Items without features (mask False, and the padding row 0) take no part: their
  rows and columns are empty. The build is block-wise in both directions: a block of rows against
  one block of items at a time with a running top-k, so peak memory is ``O(block_size *
  item_block)`` whatever the catalogue (a 1024-row block against all of a million items would be
  a 4 GB similarity block), never an ``n_items^2`` dense matrix.
* The graph is a constant (frozen) sparse tensor; ``load_or_build_knn_graph`` caches it on disk,
  keyed by a hash of the feature matrix (in internal-id order), ``k`` and the format version, so a
  changed feature file or id mapping is never served from a stale cache.
* Normalised user-item adjacency for LightGCN propagation, ``D^-1/2 [[0, R], [R^T, 0]] D^-1/2`` over
  ``n_users + n_items`` nodes, and its user-item block ``D_u^-1/2 R D_i^-1/2`` (MGCN's user
  side-view aggregation), built with tensor ops only.
* :func:`sparse_matmul`: ``A @ X`` for a constant sparse ``A`` whose forward and backward
  (``A^T @ grad``, with ``A^T`` given, or ``A`` itself for the symmetric graphs above) are CSR
  products. On torch 2.13's CPU this halves the time of the products (two LightGCN layers over 34k nodes and 320k edges plus
  one user-item product, 64 columns, forward + backward, one thread: 0.46 s vs 0.99 s with COO's
  ``torch.sparse.mm``, whose backward transposes and coalesces ``A`` on every call), with
  identical results. On CPU float32 a small C kernel (``csrc/csr_matmul.c``) runs the CSR products
  instead, and can compute a few rows of ``A @ X`` alone.
"""

import ctypes
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from recbole_mm.files import atomic_write
from recbole_mm.model.layers import compiled
from recbole_mm.model.layers.blocks import BlockProduct, merge_topk
from recbole_mm.model.layers.compiled import ADDRESS, I64, ptr

logger = logging.getLogger(__name__)

_KNN_FORMAT = "knn-sym-selfloop-v1"


def _sym_normalise(rows: torch.Tensor, cols: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``D_r^-1/2 A D_c^-1/2`` for the binary matrix with ones at ``(rows, cols)`` (duplicates merged)."""
    ones = torch.ones(rows.numel())
    a = torch.sparse_coo_tensor(torch.stack([rows, cols]), ones, size, check_invariants=True).coalesce()
    idx = a.indices()
    deg_r = torch.zeros(size[0]).index_add_(0, idx[0], torch.ones(idx.shape[1]))
    deg_c = torch.zeros(size[1]).index_add_(0, idx[1], torch.ones(idx.shape[1]))
    vals = deg_r[idx[0]].rsqrt() * deg_c[idx[1]].rsqrt()
    return torch.sparse_coo_tensor(idx, vals, size, check_invariants=True).coalesce()


@torch.no_grad()
def build_knn_graph(
    features: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None, block_size: int = 1024,
    item_block: int = 65536,
) -> torch.Tensor:
    """Symmetric-normalised kNN graph ``[n, n]`` (sparse COO, float32) over the rows of ``features``.

    ``mask[i]`` False excludes item ``i``; by default rows that are all zero are excluded. ``k`` is
    capped at the number of other valid items. Similarities are computed ``[block_size,
    item_block]`` at a time.
    """
    feats = features.detach().float().cpu()
    n = feats.shape[0]
    valid = (feats.abs().sum(1) > 0) if mask is None else mask.cpu().bool() & (feats.abs().sum(1) > 0)
    valid_ids = valid.nonzero().squeeze(1)
    k = min(int(k), valid_ids.numel() - 1)
    if k < 1:
        raise ValueError(f"kNN graph needs at least 2 items with features, got {valid_ids.numel()}")
    normed = F.normalize(feats[valid_ids], dim=1)
    n_valid, nbrs, product = normed.shape[0], [], BlockProduct()
    for start in range(0, n_valid, block_size):
        block, best = normed[start : start + block_size], None
        for lo in range(0, n_valid, item_block):
            sim = product(block, normed[lo : lo + item_block])  # [block, item block], one buffer
            own_lo, own_hi = max(start, lo), min(start + block.shape[0], lo + sim.shape[1])
            if own_lo < own_hi:  # the block's own items are in this item block: neighbours are other items
                own = torch.arange(own_lo, own_hi)
                sim[own - start, own - lo] = -float("inf")
            best = merge_topk(best, lo, sim, k)
        nbrs.append(best[1])
    nbr = torch.cat(nbrs)  # [n_valid, k], positions in valid_ids
    src = valid_ids.repeat_interleave(k)
    dst = valid_ids[nbr.flatten()]
    rows = torch.cat([src, dst, valid_ids])  # A, A^T, I
    cols = torch.cat([dst, src, valid_ids])
    return _sym_normalise(rows, cols, (n, n))


def features_digest(features: torch.Tensor) -> str:
    """Content hash of a feature matrix (dtype, shape and values)."""
    arr = features.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype}{tuple(arr.shape)}".encode())
    h.update(arr.numpy().tobytes())
    return h.hexdigest()


def load_or_build_knn_graph(
    features: torch.Tensor,
    k: int,
    cache_dir: Optional[Union[str, Path]] = None,
    name: str = "feat",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``build_knn_graph`` with an on-disk cache ``<cache_dir>/knn_<name>_k<k>_<hash>.pt``.

    The hash covers the features, the mask, ``k`` and the graph format, so any change of input
    builds (and caches) a new graph. No caching when ``cache_dir`` is None.
    """
    if cache_dir is None:
        return build_knn_graph(features, k, mask)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{features_digest(features)}|{k}|{_KNN_FORMAT}".encode())
    if mask is not None:
        h.update(mask.cpu().bool().numpy().tobytes())
    path = Path(cache_dir) / f"knn_{name}_k{k}_{h.hexdigest()}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        size = tuple(saved["size"])
        return torch.sparse_coo_tensor(saved["indices"], saved["values"], size, check_invariants=True).coalesce()
    graph = build_knn_graph(features, k, mask)
    with atomic_write(path) as tmp:  # two runs of one dataset may build the same graph at once
        torch.save({"indices": graph.indices(), "values": graph.values(), "size": list(graph.shape)}, tmp)
    logger.info("kNN graph (%s, k=%d) cached at %s", name, k, path)
    return graph


def _csr(a: torch.Tensor) -> torch.Tensor:
    """``a`` as a torch CSR tensor over its cached arrays (:func:`_csr_arrays`), not converted on every call."""
    with warnings.catch_warnings():  # torch calls CSR "beta" on every CSR tensor; the products are exact
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # valid by construction (from a coalesced COO); a check would cost O(nnz) on every call
        return torch.sparse_csr_tensor(*_csr_arrays(a), a.shape, check_invariants=False)


_FUNCTIONS = tuple((name, (I64, ADDRESS, ADDRESS, ADDRESS, ADDRESS, I64, ADDRESS, ADDRESS))
                   for name in ("csr_matmul_rows", "csr_matmul_rows_t"))


def load_kernel() -> Tuple[Optional[ctypes.CDLL], str]:
    """The compiled CSR products (``csrc/csr_matmul.c``) as
    :func:`~recbole_mm.model.layers.compiled.library` gives them; ``RECBOLE_MM_SPARSE_KERNEL=0``
    keeps them off (torch's CSR products run instead)."""
    return compiled.library("csr_matmul", "SPARSE", _FUNCTIONS)


def _kernel_for(a: torch.Tensor, x: torch.Tensor, rows: Optional[torch.Tensor]) -> Optional[ctypes.CDLL]:
    """The compiled products for ``(a @ x)[rows]`` (CPU float32), else None: torch's CSR products.

    The kernel runs on one thread. A product over all rows with more torch threads is torch's, which
    splits the rows over them: on a random 22k x 12k matrix with 149k entries (amazon-beauty's
    user-item shape), 64 columns, forward + backward took 3.8 ms with torch on two threads (over the
    cached arrays; 4.5-5.2 ms when each call converted the matrix), 3.8-5.5 ms with the kernel on
    one, and 6.8 ms with the kernel's columns split over two Python threads (they contend with
    torch's OpenMP threads); torch on one thread took 7.2-9.2 ms. For 1,900 of the rows: the kernel
    1.2-1.4 ms, torch (the whole product, then the rows) 4.0-4.4 ms on two threads (three runs of a
    one-off script, medians of ten)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or a.dtype != torch.float32:
        return None
    if rows is None and torch.get_num_threads() > 1:
        return None
    return load_kernel()[0]


def _csr_arrays(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indptr, indices, values)`` of the coalesced COO matrix ``a`` in CSR form, for the kernel and
    torch's CSR products alike, kept on ``a`` itself: the graphs are constants, and a plain attribute
    of dense tensors survives the deep copy RecBole makes of the model, where a CSR tensor would not."""
    arrays = getattr(a, "_recbole_mm_csr", None)
    if arrays is None:
        rows, cols = a.indices()
        indptr = torch.zeros(a.shape[0] + 1, dtype=torch.int64, device=rows.device)
        indptr[1:] = torch.bincount(rows, minlength=a.shape[0]).cumsum(0)
        arrays = a._recbole_mm_csr = (indptr, cols.contiguous(), a.values().contiguous())
    return arrays


def _kernel_product(lib: ctypes.CDLL, function: str, a: torch.Tensor, rows: Optional[torch.Tensor],
                    dense: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One of ``csrc/csr_matmul.c``'s products over ``a``'s rows ``rows`` (all when None)."""
    indptr, indices, values = _csr_arrays(a)
    n_rows = a.shape[0] if rows is None else rows.numel()
    getattr(lib, function)(n_rows, ptr(rows), ptr(indptr), ptr(indices), ptr(values), dense.shape[1],
                           ptr(dense), ptr(out))
    return out


class _ConstantSparseMatmul(torch.autograd.Function):
    """``(a @ x)[rows]`` (every row when ``rows`` is None) with ``a`` constant (no gradient);
    ``a_t`` is ``a^T`` (None: ``a`` is symmetric). On CPU float32 the compiled products compute
    only the rows asked for; elsewhere both products are torch's on CSR."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: Optional[torch.Tensor], x: torch.Tensor,
                rows: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.a, ctx.a_t, ctx.rows, ctx.n_x = a, a if a_t is None else a_t, rows, x.shape[0]
        ctx.lib = _kernel_for(a, x, rows)
        if ctx.lib is None:
            out = torch.sparse.mm(_csr(a), x)
            return out if rows is None else out[rows]
        x = x.contiguous()
        n_out = a.shape[0] if rows is None else rows.numel()
        return _kernel_product(ctx.lib, "csr_matmul_rows", a, rows, x, x.new_empty(n_out, x.shape[1]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lib, rows, grad = ctx.lib, ctx.rows, grad.contiguous()
        if lib is None:
            if rows is not None:  # the rows' gradients back in place, as indexing's backward does
                grad = grad.new_zeros(ctx.a.shape[0], grad.shape[1]).index_add_(0, rows, grad)
            return None, None, torch.sparse.mm(_csr(ctx.a_t), grad), None
        if rows is None:  # all rows: a^T's rows, each output row written once
            out = grad.new_empty(ctx.n_x, grad.shape[1])
            return None, None, _kernel_product(lib, "csr_matmul_rows", ctx.a_t, None, grad, out), None
        # a few rows: scatter their entries' products instead of building their transpose
        out = grad.new_zeros(ctx.n_x, grad.shape[1])
        return None, None, _kernel_product(lib, "csr_matmul_rows_t", ctx.a, rows, grad, out), None


def sparse_matmul(a: torch.Tensor, x: torch.Tensor, a_t: Optional[torch.Tensor] = None,
                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ x`` for a constant sparse matrix ``a`` (coalesced COO, as the builders here return it)
    and a dense ``x``, differentiable in ``x``; ``a_t`` is ``a^T`` (coalesced COO), None when ``a`` is
    symmetric. ``rows`` (indices, optional) asks for ``(a @ x)[rows]`` only: on CPU float32 only
    those rows' entries are touched, forward and backward. Raises ``ValueError`` when ``x`` does not
    fit ``a`` and ``IndexError`` for a row outside ``a`` (the kernel would read out of bounds).

    On CPU float32 the products are ``csrc/csr_matmul.c``'s (:func:`load_kernel`), which write each
    output row once where torch's CSR product zero-fills and copies a fresh output first: with the
    user views and the last LightGCN layer for a batch's rows only, a MambaRec step on one thread
    ran 6-15% faster on TikTok and amazon-beauty (docs/results/mambarec-cost.md). Elsewhere
    (float64, GPU, no compiler) torch's CSR products run over the same cached CSR arrays
    (:func:`_csr_arrays`; CSR buffers are no option, since torch cannot deep-copy a CSR tensor and
    RecBole deep-copies the model, ``get_flops``)."""
    if x.dim() != 2 or x.shape[0] != a.shape[1]:
        raise ValueError(f"sparse_matmul: x of shape {tuple(x.shape)} does not fit a {tuple(a.shape)} matrix")
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= a.shape[0]):
            raise IndexError(f"sparse_matmul: rows must lie in [0, {a.shape[0]}), "
                             f"got {int(rows.min())}..{int(rows.max())}")
    return _ConstantSparseMatmul.apply(a, a_t, x, rows)


def normalized_interaction_matrix(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """``D_u^-1/2 R D_i^-1/2`` ``[n_users, n_items]`` for the interactions ``(users[e], items[e])``
    (binary; repeated pairs count once). Equals the user-item block of
    ``normalized_bipartite_adjacency``."""
    return _sym_normalise(users.long().cpu(), items.long().cpu(), (n_users, n_items))


def normalized_bipartite_adjacency(
    users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int
) -> torch.Tensor:
    """LightGCN's ``D^-1/2 A D^-1/2`` with ``A = [[0, R], [R^T, 0]]``, ``[n_users + n_items]^2``;
    item ``i`` is node ``n_users + i``."""
    u, i = users.long().cpu(), items.long().cpu() + n_users
    n = n_users + n_items
    return _sym_normalise(torch.cat([u, i]), torch.cat([i, u]), (n, n))
