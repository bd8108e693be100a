"""Evaluation at catalogue scale: blocked exact top-k ranking (:mod:`.topk`, :mod:`.scorers`)."""

from recbole_mm.evaluation.topk import TopKEvalMixin, blocked_topk, use_blocked

__all__ = ["TopKEvalMixin", "blocked_topk", "use_blocked"]
