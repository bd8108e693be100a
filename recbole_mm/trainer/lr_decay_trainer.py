"""RecBole's trainer with the learning-rate decay of MMRec (the code base of MGCN and of MambaRec's
authors): ``lr(epoch) = learning_rate * gamma ** (epoch / step)``, MMRec's
``LambdaLR(lambda epoch: 0.96 ** (epoch / 50))``.

Config ``lr_decay``: ``[gamma, step]`` (MMRec: ``[0.96, 50]``) or ``~`` (constant rate, RecBole's
behaviour). The rate is set from the epoch index before each epoch, so a resumed run continues the
schedule where it stopped.
"""

from recbole.trainer import Trainer


class LRDecayTrainer(Trainer):
    """:class:`recbole.trainer.Trainer` plus the ``lr_decay`` schedule (module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        decay = config["lr_decay"]
        if decay is not None and (len(decay) != 2 or not 0 < decay[0] <= 1 or decay[1] <= 0):
            raise ValueError(f"lr_decay must be [gamma, step] with 0 < gamma <= 1 and step > 0, got {decay!r}")
        self.lr_decay = tuple(float(v) for v in decay) if decay is not None else None

    def learning_rate_at(self, epoch_idx: int) -> float:
        if self.lr_decay is None:
            return self.learning_rate
        gamma, step = self.lr_decay
        return self.learning_rate * gamma ** (epoch_idx / step)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate_at(epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
