"""FindRec: Stein-guided entropic flow for multimodal sequential recommendation.

Reference: M. Wang, Y. Xiao, B. Wang, et al., "FindRec: Stein-Guided Entropic Flow for
Multi-Modal Sequential Recommendation", KDD'25. No public code; the paper's text as fixed by
docs/design.md §findrec is the specification.
"""

import logging
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.model.layers.dropout import Dropout
from recbole_mm.model.layers.gather import gather_rows
from recbole_mm.model.layers.item_features import ItemFeatureEmbedding, dataset_features
from recbole_mm.model.layers.cross_modal import CrossModalAttention, CrossModalMoE
from recbole_mm.model.layers.packing import Packing
from recbole_mm.model.layers.mamba import MambaEncoder
from recbole_mm.model.loss.chunked_ce import chunked_cross_entropy, excluded_items
from recbole_mm.model.loss.gradient_share import GradientShare
from recbole_mm.model.loss.stein import IICMLoss
from recbole_mm.model.loss.term_log import LossTermLog


#: what the ID stream reads (``id_input``): the item-ID embeddings, sec. 2.1's concatenation
#: ``e_fused = Concat(e_id, W_m f_m ...)``, or the candidates' own vectors ``e_id + sum_m V_m f_m``
ID_INPUTS = ("id", "fused", "summed")
#: the sequence output (``output_head``): eq. 4's ``FFN(z_final)``, or ``z_ID + FFN(z_final)``
OUTPUT_HEADS = ("ffn", "residual")


class ModalityStream(nn.Module):
    """One modality's sequence encoder: the item's feature row (looked up by item id in a
    non-persistent buffer, so checkpoints hold no features) -> ``W_m f_m`` (``align_dim``) ->
    dropout -> Mamba blocks. With ``variational`` (IICM's ``kl`` entropy) a linear head turns each
    state into a Gaussian ``(mu, logvar)``; the stream's output is a reparameterised sample while
    training and ``mu`` at evaluation."""

    def __init__(self, features: torch.Tensor, has_feature: torch.Tensor, align_dim: int, n_layers: int,
                 dropout: float, mamba_args: dict, variational: bool):
        super().__init__()
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("has_feature", has_feature, persistent=False)
        self.proj = nn.Linear(features.shape[1], align_dim)
        self.dropout = Dropout(dropout)
        self.encoder = MambaEncoder(n_layers, align_dim, dropout=dropout, **mamba_args)
        self.posterior = nn.Linear(align_dim, 2 * align_dim) if variational else None

    def project(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``W_m f_m`` at every position, ``[B, L, align_dim]`` (no dropout)."""
        # project each distinct item of the batch once, then gather: fewer rows than B*L
        # positions and than the whole item table
        items, where = torch.unique(item_seq, return_inverse=True)
        return gather_rows(self.proj(self.features[items]), where)

    def forward(self, item_seq: torch.Tensor, projected: Optional[torch.Tensor] = None,
                packing: Optional[Packing] = None):
        """``item_seq: [B, L]`` -> ``(states [B, L, align_dim], mu, logvar)`` (``None`` without
        the variational head); ``projected``: :meth:`project`'s result when already computed. With
        ``packing``, ``item_seq`` and the outputs are packed rows (``[N]``, ``[N, align_dim]``)."""
        states = self.encoder(self.dropout(self.project(item_seq) if projected is None else projected), packing)
        if self.posterior is None:
            return states, None, None
        mu, logvar = self.posterior(states).chunk(2, dim=-1)
        if self.training:
            states = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            states = mu
        return states, mu, logvar


class FindRec(SequentialRecommender):
    r"""FindRec (KDD'25), "information flow - control - output" over ID and modality streams.

    - Streams (sec. 2.1): the item-ID embeddings (``embedding_size``) and, per modality ``m``,
      ``W_m f_m`` (``align_dim``) each pass ``n_layers`` Mamba blocks
      ``x + alpha Dropout(Mamba(LN(x)))`` + FFN; the last valid position gives ``z_ID``, ``z_m``.
      With ``id_input: fused`` the ID stream reads sec. 2.1's ``e_fused = Concat(e_id, W_m f_m
      ...)`` (``embedding_size + M align_dim`` wide, the same projections as the modality streams)
      instead of ``e_id`` alone; with ``id_input: summed`` (not in the paper; needs ``feature_logits``)
      it reads the vectors it scores, ``e_id + sum_m V_m f_m``, as Mamba4Rec (MM)'s one stream does
      (docs/design.md §findrec).
    - Cross-modal attention (eq. 2; docs/design.md §findrec): per head, queries from the first modality of a pair
      (the paper's image), keys/values from the second, over positions with causal and padding
      masks (keys also masked where an item has no feature row), residual; last valid position.
    - Expert routing (eq. 3): per-head soft router over ``n_experts`` MLP experts, heads concatenated.
    - Output (eq. 3-4): ``S = FFN(Concat(z_ID, O_exp))`` -> ``embedding_size``; logits
      ``S E_item^T``; cross-entropy over all items. ``output_head: residual`` (not in the paper)
      makes it ``S = z_ID + FFN(...)``: the residual path SASRec's and Mamba4Rec's outputs have, so
      ``S`` starts as the ID stream's state instead of a fresh map of it (docs/design.md §findrec). With ``feature_logits`` (not in the paper) the
      candidates are ``E_item + sum_m V_m f_m`` (docs/design.md §findrec): the features reach the
      logits, and items without interactions (cold) are scored from their features.
    - IICM (eq. 1-2, sec. 2.2): ``1 - mean K(z_a, z_b)`` (RBF, adaptive median bandwidth) per pair,
      plus ``entropy_weight`` x a Stein (or KL) entropy term per modality; total loss
      ``L_CE + iicm_weight * L_IICM`` (eq. 5).

    Modalities are the dataset's (``dataset.modalities``, config order). With one modality the
    cross-modal attention and the IICM alignment are skipped (logged); the router still refines
    that modality's ``z``. With more than two, ``cross_pairs`` (default: the first modality with
    each other one) lists the ``[query, key]`` pairs; each gets its own router/experts and its
    ``O_exp`` is concatenated.

    Choices where the paper is silent (also in properties/model/FindRec.yaml):
    ``use_cross_attn: False`` fuses a pair by ``z_a + z_b`` (the attention's residual with the key
    stream's own last state in place of the attended mix), so the second modality still reaches
    the output; FFNs are ``d -> 4d -> d`` with GELU; the item embedding is initialised
    ``N(0, 0.02^2)`` as RecBole's SASRec, Mamba keeps mamba-ssm's initialisation.

    Expert load: the routers accumulate it over training batches; when the model is switched to
    evaluation (RecBole's trainer does so before each validation) it is logged and reset.

    Hyperparameters: ``embedding_size`` (64), ``align_dim`` (256), ``n_layers`` (2), ``d_state``
    (16), ``d_conv`` (4), ``expand`` (2), ``mamba_backend`` (auto|cuda|torch), ``dropout_prob``
    (0.2), ``n_heads`` (8), ``n_experts`` (4), ``moe_balance_weight`` (0), ``iicm_weight`` (0.01),
    ``iicm_entropy`` (stein|kl), ``entropy_weight``, ``iicm_sigma`` (~ = adaptive), ``stein_eta``,
    ``iicm_normalize`` (false), ``iicm_sigma_attached`` (false), ``iicm_share`` (~: a fixed
    ``iicm_weight``; a number: IICM's gradient at ``z_m`` held at that share of the CE's,
    :class:`~recbole_mm.model.loss.gradient_share.GradientShare`),
    ``cross_pairs``, ``feature_logits`` (false), ``id_input`` (id|fused|summed), ``output_head`` (ffn|residual); switches ``use_cross_attn``, ``use_iicm``, ``use_moe``,
    ``use_entropy``.
    """

    input_type = InputType.POINTWISE
    #: the trainer's ce_item_chunk swap would replace the whole loss and drop IICM: FindRec slices
    #: its CE term itself (recbole_mm/trainer/chunked_ce.py)
    chunks_its_own_ce = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["loss_type"] != "CE":
            raise ValueError(f"FindRec trains with cross-entropy over all items; loss_type must be 'CE', "
                             f"got {config['loss_type']!r}")
        if config["train_neg_sample_args"].get("distribution", "none") != "none":
            raise ValueError("FindRec scores all items with cross-entropy: set train_neg_sample_args: ~ "
                             f"(got {config['train_neg_sample_args']})")
        self.logger = logging.getLogger()
        emb, align = config["embedding_size"], config["align_dim"]
        n_layers, n_heads, dropout = config["n_layers"], config["n_heads"], config["dropout_prob"]
        mamba_args = dict(d_state=config["d_state"], d_conv=config["d_conv"], expand=config["expand"],
                          backend=config["mamba_backend"])
        use_cross_attn, use_iicm, use_moe = config["use_cross_attn"], config["use_iicm"], config["use_moe"]
        entropy = config["iicm_entropy"] if config["use_entropy"] else None
        self.iicm_weight = config["iicm_weight"]
        self.length_groups = config["length_groups"]
        # log_loss_terms: each term's value and gradient at z_m, logged per epoch
        self.term_log = LossTermLog.from_config(config["log_loss_terms"], "ce", "z_m")
        # ce_item_chunk (overall.yaml): the CE term over item slices, no [batch, n_items] logits
        self.ce_item_chunk = config["ce_item_chunk"]
        self.loss_names = ("ce",)
        self.moe_balance_weight = config["moe_balance_weight"] if use_moe else 0.0

        self.modalities = list(dataset.modalities or [])
        if not self.modalities:
            raise ValueError("FindRec needs at least one modality: set `modalities` (e.g. in the dataset YAML)")
        self.pairs = self._cross_pairs(config["cross_pairs"])

        self.id_input = config["id_input"]
        if self.id_input not in ID_INPUTS:
            raise ValueError(f"id_input must be one of {ID_INPUTS}, got {self.id_input!r}")
        if self.id_input == "summed" and not config["feature_logits"]:
            raise ValueError("id_input: summed reads the candidates' vectors e_id + sum_m V_m f_m, which exist "
                             "with feature_logits: true only")
        # the ID stream's width: e_id's (also summed's), or sec. 2.1's e_fused = Concat(e_id, W_m f_m for every m)
        id_width = emb + (align * len(self.modalities) if self.id_input == "fused" else 0)
        self.output_head = config["output_head"]
        if self.output_head not in OUTPUT_HEADS:
            raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {self.output_head!r}")
        if self.output_head == "residual" and id_width != emb:
            raise ValueError("output_head: residual adds z_ID to S, which needs id_input: id "
                             f"(z_ID is {id_width} wide with id_input: {self.id_input}, S {emb})")
        self.item_embedding = nn.Embedding(self.n_items, emb, padding_idx=0)
        self.id_dropout = Dropout(dropout)
        self.id_encoder = MambaEncoder(n_layers, id_width, dropout=dropout, **mamba_args)
        self.streams = nn.ModuleList(
            ModalityStream(dataset.item_features[m], dataset.item_feature_mask[m], align, n_layers, dropout,
                           mamba_args, variational=use_iicm and entropy == "kl")
            for m in self.modalities)
        self.cross_attn = CrossModalAttention(n_heads) if use_cross_attn and self.pairs else None
        # one router/expert set per fused pair; a single modality is routed on its own
        self.moes = nn.ModuleList(CrossModalMoE(align, n_heads, config["n_experts"], dropout, use_moe)
                                  for _ in range(max(len(self.pairs), 1)))
        self.iicm = IICMLoss(entropy, config["entropy_weight"], config["iicm_sigma"],
                             config["stein_eta"], config["iicm_normalize"],
                             config["iicm_sigma_attached"]) if use_iicm else None
        # iicm_share: IICM's weight follows the CE's gradient so IICM keeps its share all through
        # training (docs/design.md §findrec); iicm_weight is then the first step's weight
        self.iicm_share = None
        if use_iicm and config["iicm_share"] is not None:
            if self.iicm_weight <= 0:
                raise ValueError("iicm_share needs iicm_weight > 0: it is the first step's IICM weight, through "
                                 f"which the IICM gradient is first measured (got {self.iicm_weight})")
            self.iicm_share = GradientShare(config["iicm_share"], self.iicm_weight)
        fused = id_width + align * len(self.moes)
        self.output_ffn = nn.Sequential(nn.Linear(fused, 4 * emb), nn.GELU(), Dropout(dropout),
                                        nn.Linear(4 * emb, emb))
        self.loss_fct = nn.CrossEntropyLoss()
        # the candidates E_item + sum_m V_m f_m over the same ID table (the ID stream reads them too
        # with id_input: summed, else its own input); bias-free maps, so the padding item and missing
        # views add 0
        self.item_tower = ItemFeatureEmbedding(self.item_embedding, dataset_features(dataset, "FindRec"),
                                               config["item_id_dropout"]) if config["feature_logits"] else None

        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        if self.item_tower is not None:
            for linear in self.item_tower.projection.maps:
                nn.init.normal_(linear.weight, std=0.02)

    def _cross_pairs(self, cross_pairs: Optional[Sequence[Sequence[str]]]) -> List[Tuple[int, int]]:
        """``[(query view index, key view index)]`` from ``cross_pairs`` (names)."""
        if len(self.modalities) == 1:
            self.logger.warning(f"FindRec with one modality ({self.modalities[0]}): cross-modal attention "
                                "and the IICM alignment are skipped")
            return []
        if cross_pairs is None:
            return [(0, j) for j in range(1, len(self.modalities))]
        pairs = []
        for pair in cross_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or any(m not in self.modalities for m in pair):
                raise ValueError(f"cross_pairs entry {pair!r} must name two different modalities of {self.modalities}")
            pairs.append((self.modalities.index(pair[0]), self.modalities.index(pair[1])))
        if not pairs:
            raise ValueError("cross_pairs is empty; leave it unset (~) for the default pairs")
        return pairs

    def _encode(self, item_seq, item_seq_len):
        """Sequence representation ``S: [B, embedding_size]``, each view's last state ``z_m``,
        and (``kl`` only) each view's last ``(mu, logvar)``.

        Every stream is causal and the head reads the last valid position, so with
        ``length_groups`` (on a CPU) the streams run on the batch's real positions only, packed end
        to end (:class:`~recbole_mm.model.layers.packing.Packing`): the result of the padded batch
        without computing the padding."""
        packing = Packing(item_seq_len, item_seq.shape[1], enabled=self.length_groups)
        z_id, views, posteriors, states, key_masks = self._streams(item_seq, packing)
        head = self.iicm_share.watch(views, GradientShare.REFERENCE) if self._sharing() else views
        fused = []
        if not self.pairs:
            fused.append(self.moes[0](head[0]))
        for (i, j), moe in zip(self.pairs, self.moes):
            if self.cross_attn is not None:
                o = self.cross_attn(head[i], states[j], key_masks[j])
            else:
                o = head[i] + head[j]
            fused.append(moe(o))
        seq_output = self.output_ffn(torch.cat([z_id] + fused, dim=-1))
        if self.output_head == "residual":
            seq_output = z_id + seq_output
        return seq_output, views, posteriors

    def _streams(self, item_seq, packing: Packing):
        """The ID and modality streams: ``(z_id, views, posteriors)`` at the last valid position,
        then each modality's states ``[B, packing.width, align_dim]`` and the cross-attention's
        key masks (which leave out the padded positions)."""
        items = packing.pack(item_seq)
        # summed: the same vectors as the candidates (feature_logits)
        ids = (self.item_tower if self.id_input == "summed" else self.item_embedding)(items)
        projected = [None] * len(self.streams)
        if self.id_input == "fused":  # sec. 2.1: the ID stream reads e_fused; W_m f_m computed once
            projected = [stream.project(items) for stream in self.streams]
            ids = torch.cat([ids, *projected], dim=-1)
        z_id = packing.last(self.id_encoder(self.id_dropout(ids), packing.layout))
        states, views, posteriors = [], [], []
        for stream, proj in zip(self.streams, projected):
            seq, mu, logvar = stream(items, proj, packing.layout)
            states.append(packing.unpack(seq))
            views.append(packing.last(seq))
            if mu is not None:
                posteriors.append((packing.last(mu), packing.last(logvar)))
        # the last valid query attends causally: the real positions up to it that have the modality
        item_seq = item_seq[:, :packing.width]
        key_masks = [packing.mask & stream.has_feature[item_seq] for stream in self.streams]
        return z_id, views, posteriors or None, states, key_masks

    def forward(self, item_seq, item_seq_len):
        return self._encode(item_seq, item_seq_len)[0]

    def calculate_loss(self, interaction):
        """Eq. 5 as the tuple of its terms (RecBole sums them and logs each; :attr:`loss_names`
        names them): ``ce``, ``iicm_align`` and ``iicm_entropy`` (each already times
        ``iicm_weight``), ``moe_balance``."""
        seq_output, views, posteriors = self._encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        target = interaction[self.POS_ITEM_ID]
        if self.ce_item_chunk:
            ce = chunked_cross_entropy(seq_output, self.item_table(), target, self.ce_item_chunk, excluded_items(self))
        else:
            ce = self.loss_fct(seq_output @ self.item_table().t(), target)
        terms = {"ce": ce}
        if self.iicm is not None:
            weight, iicm_views = self.iicm_weight, views
            if self._sharing():
                weight = self.iicm_share.weight()
                iicm_views = self.iicm_share.watch(views, GradientShare.TERM, scale=weight)
            for part, value in self.iicm.terms(iicm_views, self.pairs, posteriors or None).items():
                terms[f"iicm_{part}"] = weight * value
        if self.moe_balance_weight > 0:
            terms["moe_balance"] = self.moe_balance_weight * sum(m.balance_loss() for m in self.moes) / len(self.moes)
        if self.term_log is not None and self.training:
            # the extra backward passes that measure are not iicm_share's measurements
            with self.iicm_share.paused() if self.iicm_share is not None else nullcontext():
                self.term_log.record(terms, views)
        self.loss_names = tuple(terms)
        losses = tuple(terms.values())
        return losses if len(losses) > 1 else losses[0]

    def _sharing(self) -> bool:
        """Whether this pass feeds ``iicm_share``'s gradient measurements (training passes only)."""
        return self.iicm_share is not None and self.training and torch.is_grad_enabled()

    def item_table(self) -> torch.Tensor:
        """The candidates ``[n_items, embedding_size]``: ``E_item`` (eq. 4), plus the projected
        features with ``feature_logits``."""
        return (self.item_tower or self.item_embedding).weight

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * (self.item_tower or self.item_embedding)(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_embeddings(self, interaction):
        """``(S [B, d], candidates [n_items, d])`` with ``full_sort_predict = S @ candidates.T``
        (the blocked full ranking's form, recbole_mm.evaluation.scorers)."""
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]), self.item_table()

    def full_sort_predict(self, interaction):
        seq_output, candidates = self.full_sort_embeddings(interaction)
        return seq_output @ candidates.t()

    def expert_load(self):
        """``{pair name: (mean router weight, top-1 share) per expert}`` accumulated since the last
        reset; empty without MoE or before any training batch."""
        names = [f"{self.modalities[i]}->{self.modalities[j]}" for i, j in self.pairs] or self.modalities[:1]
        return {name: load for name, moe in zip(names, self.moes) if (load := moe.expert_load()) is not None}

    def train(self, mode: bool = True):
        """Switching to evaluation logs the expert load of the training batches since the last
        switch and, with ``log_loss_terms``, each loss term's mean value and gradient norm."""
        if not mode and self.term_log is not None and (line := self.term_log.summary("FindRec")):
            self.logger.info(line)
        if not mode and self.training and self.iicm_share is not None and bool(self.iicm_share.seen.all()):
            self.logger.info(f"FindRec iicm_share {self.iicm_share.share}: IICM weight now {self.iicm_share.weight().item():.4g}")
        if not mode:
            for name, (weight, top1) in self.expert_load().items():
                self.logger.info(f"FindRec expert load [{name}]: mean router weight "
                                 f"{[round(w, 3) for w in weight.tolist()]}, top-1 share {[round(t, 3) for t in top1.tolist()]}")
            for moe in self.moes:
                moe.reset_expert_load()
        return super().train(mode)
