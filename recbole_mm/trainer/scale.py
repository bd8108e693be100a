"""The trainer hook for large catalogues (issue 17): :func:`with_scale_hooks` puts
:class:`~recbole_mm.evaluation.topk.TopKEvalMixin` (blocked exact full ranking, ``topk_eval``) and
:class:`~recbole_mm.trainer.chunked_ce.ChunkedCEMixin` (CE in item slices, ``ce_item_chunk``) in
front of any RecBole ``Trainer`` class. With their config keys at ``recbole`` / ``~`` the
trainer behaves exactly as the class it wraps."""

import functools

from recbole.trainer import Trainer

from recbole_mm.evaluation.topk import TopKEvalMixin
from recbole_mm.trainer.chunked_ce import ChunkedCEMixin


@functools.lru_cache(maxsize=None)
def with_scale_hooks(trainer_cls):
    """``trainer_cls`` with both mixins in front (one class per trainer class); trainers that are
    not RecBole ``Trainer`` subclasses (decision trees) are returned unchanged."""
    if not issubclass(trainer_cls, Trainer) or issubclass(trainer_cls, TopKEvalMixin):
        return trainer_cls
    return type(trainer_cls.__name__, (TopKEvalMixin, ChunkedCEMixin, trainer_cls),
                {"__module__": __name__, "__doc__": trainer_cls.__doc__})
