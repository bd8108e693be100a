"""Trainer for FindRec (KDD'25, sec. 3.3): AdamW without weight decay on the parameters that
mamba-ssm and common practice exempt, a learning-rate schedule with linear warmup, gradient
clipping at norm 1.0.

AdamW and clipping are RecBole's own mechanisms, set in properties/model/FindRec.yaml:
``learner: adamw`` (with ``learning_rate``, ``weight_decay``) and ``clip_grad_norm: {max_norm: 1.0}``.
The schedule is ``lr_schedule``: ``constant`` after the warmup (the default, which early stopping
on the validation metric ends when the model has converged) or ``cosine`` (the paper's: a half
cosine to 0 over ``epochs``, meant to run all of them, e.g. with ``stopping_step`` = ``epochs``; an
earlier stop would end it with the learning rate still high).
"""

import math

import torch.nn as nn
from recbole.trainer import Trainer
from torch.optim.lr_scheduler import LambdaLR


SCHEDULES = ("constant", "cosine")
#: parameter names (last component) that take no weight decay: mamba-ssm marks ``A_log`` and ``D``
#: ``_no_weight_decay``; biases and the blocks' residual scales ``alpha`` are shifts and scales,
#: not weights (LayerNorm parameters are exempt by their module)
NO_DECAY = ("A_log", "D", "bias", "alpha")


def decay_groups(model, weight_decay: float) -> list:
    """AdamW parameter groups: ``weight_decay`` for weights, 0 for :data:`NO_DECAY` names and
    LayerNorm parameters."""
    decay, exempt = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            exempt_it = name in NO_DECAY or isinstance(module, nn.LayerNorm)
            (exempt if exempt_it else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def constant_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor of the 0-based optimizer update ``step``: linear ramp to 1 over ``warmup_steps``, then 1."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor of the 0-based optimizer update ``step``: linear ramp to 1 over ``warmup_steps``
    updates, then a half cosine down to 0 at ``total_steps`` (held at 0 beyond)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FindRecTrainer(Trainer):
    """RecBole's ``Trainer`` with :func:`decay_groups` for the optimizer and a per-step schedule
    (``lr_schedule``: :func:`constant_with_warmup` or :func:`cosine_with_warmup`, ``warmup_steps``)
    over ``epochs * len(train_data)`` updates.

    The schedule is a pure function of the number of optimizer updates taken so far, which
    AdamW keeps in its state (``state[p]["step"]``) and RecBole's checkpoint already saves; so
    :meth:`~recbole.trainer.Trainer.resume_checkpoint` needs no extra scheduler state and a
    resumed run continues the schedule where it stopped. The scheduler is stepped by an
    optimizer post-step hook, so RecBole's ``_train_epoch`` runs unchanged (a step skipped by the
    AMP grad scaler does not advance the schedule either).
    """

    def __init__(self, config, model):
        self.lr_schedule = config["lr_schedule"]
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        self.warmup_steps = int(config["warmup_steps"])
        super().__init__(config, model)
        self.scheduler = None

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", decay_groups(self.model, kwargs.get("weight_decay", self.weight_decay)))
        return super()._build_optimizer(**kwargs)

    def _updates_done(self) -> int:
        steps = [int(state["step"]) for state in self.optimizer.state.values() if "step" in state]
        return max(steps, default=0)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        total_steps = self.epochs * len(train_data)
        done = self._updates_done()
        if self.warmup_steps >= total_steps:
            self.logger.warning(f"warmup_steps={self.warmup_steps} >= epochs * batches = {total_steps}: "
                                "the learning rate never reaches its configured value")
        factor = cosine_with_warmup if self.lr_schedule == "cosine" else constant_with_warmup
        self.scheduler = LambdaLR(self.optimizer, lambda s: factor(
            s + done, warmup_steps=self.warmup_steps, total_steps=total_steps))
        hook = self.optimizer.register_step_post_hook(lambda *_: self.scheduler.step())
        self.logger.info(f"FindRecTrainer: {self.lr_schedule} schedule over {total_steps} updates, "
                         f"{self.warmup_steps} warmup, starting at update {done}")
        try:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            hook.remove()
