"""FindRec's cross-modal attention (eq. 2 in docs/design.md §findrec numbering) and per-head expert routing
(eq. 3), from "FindRec: Stein-Guided Entropic Flow for Multi-Modal Sequential Recommendation"
(KDD'25, sec. 2.3)."""

import math
from typing import Optional

import torch
import torch.nn as nn

from recbole_mm.model.layers.dropout import Dropout


class CrossModalAttention(nn.Module):
    """Per-head cross-attention from one modality stream's last state to the other stream's
    states, with a residual: ``O^h = q^h + softmax(q^h k^h^T / sqrt(d_h)) k^h`` (keys and values
    are the second stream's hidden states, as in the paper: no projection matrices, so the module
    has no parameters).

    FindRec reads only the last valid position of ``O``, so only that query row is computed
    (``[B, H, 1, L]`` scores instead of ``[B, H, L, L]``). Under the causal mask the last valid
    query sees exactly the real positions of its sequence, so ``key_mask`` (real items that have
    this modality) is the whole mask; a query with no valid key gets no cross-modal term
    (``O = q``).

    Args:
        n_heads: number of heads ``H``; the width must be divisible by it (``d_h = d / H``).
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``query: [B, d]`` (the query stream's last valid state), ``key: [B, L, d]``,
        ``key_mask: [B, L]`` bool (True = a real item of the sequence that has this modality).
        Returns ``O: [B, d]``."""
        batch, length, dim = key.shape
        if dim % self.n_heads:
            raise ValueError(f"width {dim} is not divisible by n_heads={self.n_heads}")
        d_h = dim // self.n_heads
        q = query.view(batch, self.n_heads, 1, d_h)
        k = key.view(batch, length, self.n_heads, d_h).transpose(1, 2)  # [B, H, L, d_h]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_h)  # [B, H, 1, L]
        allowed = key_mask[:, None, None, :]
        attn = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
        attn = attn * allowed.any(-1, keepdim=True)  # a query without any valid key attends nowhere
        return query + (attn @ k).reshape(batch, dim)


class CrossModalMoE(nn.Module):
    """Per-head expert routing (eq. 3): ``g^h = softmax(W_g O^h)`` over ``n_experts`` two-layer MLP
    experts (``d_h -> 4 d_h -> d_h``, GELU), ``E^h = sum_k g_k^h Expert_k(O^h)``,
    ``O_exp = Concat_h(E^h)``. The router and the experts are shared by the heads (the paper
    indexes them by expert only); routing each head's subspace separately is the paper's
    "multi-head subspace decomposition". Routing is dense (soft), as written.

    With ``use_moe=False`` (the paper's "w/o MoE") the block is one linear map ``d -> d``.

    Expert load: while training, the mean router weight and the top-1 share of each expert are
    accumulated over the routed heads; :meth:`expert_load` reads them and :meth:`reset_expert_load`
    clears them. :meth:`balance_loss` is ``n_experts * sum_k mean(g_k)^2`` over the last forward
    (1 for a uniform load, ``n_experts`` when one expert takes everything).
    """

    def __init__(self, dim: int, n_heads: int, n_experts: int, dropout: float = 0.0, use_moe: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"align_dim {dim} is not divisible by n_heads={n_heads}")
        self.n_heads, self.n_experts, self.use_moe = n_heads, n_experts, use_moe
        d_h = dim // n_heads
        if use_moe:
            self.router = nn.Linear(d_h, n_experts)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d_h, 4 * d_h), nn.GELU(), Dropout(dropout), nn.Linear(4 * d_h, d_h))
                for _ in range(n_experts))
            self.register_buffer("_load_sum", torch.zeros(n_experts), persistent=False)
            self.register_buffer("_top1_count", torch.zeros(n_experts), persistent=False)
            self.register_buffer("_n_routed", torch.zeros(()), persistent=False)
        else:
            self.linear = nn.Linear(dim, dim)
        self.last_gates: Optional[torch.Tensor] = None

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        """``o: [..., dim] -> [..., dim]``."""
        if not self.use_moe:
            return self.linear(o)
        heads = o.view(*o.shape[:-1], self.n_heads, -1)  # [..., H, d_h]
        gates = self.router(heads).softmax(-1)  # [..., H, K]
        outputs = torch.stack([expert(heads) for expert in self.experts], dim=-2)  # [..., H, K, d_h]
        mixed = (gates.unsqueeze(-1) * outputs).sum(-2)
        self.last_gates = gates
        if self.training:
            with torch.no_grad():
                flat = gates.reshape(-1, self.n_experts)
                self._load_sum += flat.sum(0)
                self._top1_count += torch.bincount(flat.argmax(-1), minlength=self.n_experts).to(flat.dtype)
                self._n_routed += flat.shape[0]
        return mixed.reshape(o.shape)

    def balance_loss(self) -> torch.Tensor:
        mean_gate = self.last_gates.reshape(-1, self.n_experts).mean(0)
        return self.n_experts * mean_gate.pow(2).sum()

    def expert_load(self):
        """``(mean router weight, top-1 share)`` per expert since the last reset, or ``None`` when
        nothing was routed (or ``use_moe`` is off)."""
        if not self.use_moe or self._n_routed.item() == 0:
            return None
        return self._load_sum / self._n_routed, self._top1_count / self._n_routed

    def reset_expert_load(self) -> None:
        if self.use_moe:
            self._load_sum.zero_()
            self._top1_count.zero_()
            self._n_routed.zero_()
