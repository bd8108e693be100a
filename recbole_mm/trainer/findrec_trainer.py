"""Trainer for FindRec (KDD'25, sec. 3.3): AdamW, cosine learning-rate schedule with linear
warmup, gradient clipping at norm 1.0.

Only the schedule is new. AdamW and clipping are RecBole's own mechanisms, set in
properties/model/FindRec.yaml: ``learner: adamw`` (with ``learning_rate``, ``weight_decay``) and
``clip_grad_norm: {max_norm: 1.0}``.
"""

import math

from recbole.trainer import Trainer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor of the 0-based optimizer update ``step``: linear ramp to 1 over ``warmup_steps``
    updates, then a half cosine down to 0 at ``total_steps`` (held at 0 beyond)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FindRecTrainer(Trainer):
    """RecBole's ``Trainer`` plus a per-step cosine schedule with warmup (``warmup_steps``,
    default 2000) over ``epochs * len(train_data)`` updates.

    The schedule is a pure function of the number of optimizer updates taken so far, which
    AdamW keeps in its state (``state[p]["step"]``) and RecBole's checkpoint already saves; so
    :meth:`~recbole.trainer.Trainer.resume_checkpoint` needs no extra scheduler state and a
    resumed run continues the schedule where it stopped. The scheduler is stepped by an
    optimizer post-step hook, so RecBole's ``_train_epoch`` runs unchanged (a step skipped by the
    AMP grad scaler does not advance the schedule either).
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.warmup_steps = 2000 if config["warmup_steps"] is None else int(config["warmup_steps"])
        self.scheduler = None

    def _updates_done(self) -> int:
        steps = [int(state["step"]) for state in self.optimizer.state.values() if "step" in state]
        return max(steps, default=0)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        total_steps = self.epochs * len(train_data)
        done = self._updates_done()
        if self.warmup_steps >= total_steps:
            self.logger.warning(f"warmup_steps={self.warmup_steps} >= epochs * batches = {total_steps}: "
                                "the learning rate never reaches its configured value")
        self.scheduler = LambdaLR(self.optimizer, lambda s: cosine_with_warmup(
            s + done, warmup_steps=self.warmup_steps, total_steps=total_steps))
        hook = self.optimizer.register_step_post_hook(lambda *_: self.scheduler.step())
        self.logger.info(f"FindRecTrainer: cosine schedule over {total_steps} updates, {self.warmup_steps} "
                         f"warmup, starting at update {done}")
        try:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            hook.remove()
