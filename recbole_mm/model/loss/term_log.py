"""Each loss term's value and the norm of its gradient at chosen tensors, averaged over an epoch.

A term's weight fixes the scale of its value, not its say in training: what a term does to the
shared representation is its gradient there. FindRec measures at the modality streams' outputs
``z_m`` (beside the cross-entropy), MGCN and MambaRec at the modality embeddings ``h^m`` (beside the
BPR loss), the tensors the terms of their losses meet (docs/design.md §findrec, §mambarec "Loss balance").
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch


class LossTermLog:
    """Running sums of each term's value and gradient norm (all of ``at`` together) over every
    ``every``-th training batch since the last :meth:`summary`.

    Args:
        reference: the term the others' gradient norms are reported as a share of.
        where: the name of the tensors measured at, for the log line.
        every: measure one batch in ``every`` (each measured term costs one extra backward pass).
    """

    def __init__(self, reference: str, where: str, every: int = 1):
        self.reference, self.where, self.every = reference, where, every
        self._sums: Dict[str, list] = {}
        self._seen = 0

    @classmethod
    def from_config(cls, value, reference: str, where: str) -> Optional["LossTermLog"]:
        """The log a model's ``log_loss_terms`` asks for: ``~`` / false = none, true = every batch,
        ``N`` = one batch in ``N``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls(reference, where)
        if isinstance(value, int) and value >= 1:
            return cls(reference, where, every=value)
        raise ValueError(f"log_loss_terms must be true, false, ~ or a positive number of batches, got {value!r}")

    def record(self, terms: Mapping[str, torch.Tensor], at: Sequence[torch.Tensor]) -> None:
        """Adds every term's value and ``|d term / d at|`` when this batch is one of those measured;
        one extra backward pass per term, the graph kept for the training step's own. A term that
        does not reach ``at`` has norm 0."""
        self._seen += 1
        if (self._seen - 1) % self.every:
            return
        for name, value in terms.items():
            norm = value.new_zeros(())
            if value.requires_grad:
                grads = torch.autograd.grad(value, list(at), retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), norm))
            total = self._sums.setdefault(name, [0.0, 0.0, 0])
            total[0] += value.item()
            total[1] += norm.item()
            total[2] += 1

    def report(self) -> Dict[str, Tuple[float, float]]:
        """``{term: (mean value, mean gradient norm)}`` since the last :meth:`summary`."""
        return {name: (v / n, g / n) for name, (v, g, n) in self._sums.items()}

    def summary(self, model_name: str) -> str:
        """The log line of the recorded batches (empty when none), and a reset."""
        report = self.report()
        self._sums.clear()
        if not report:
            return ""
        ref = report.get(self.reference, (0.0, 0.0))[1]
        return (f"{model_name} loss terms (mean value, |grad at {self.where}|, share of {self.reference}'s): "
                + ", ".join(f"{name} {value:.4g} |{grad:.3g}| {grad / ref if ref else float('nan'):.1%}"
                            for name, (value, grad) in report.items()))
