"""Trainers of recbole-mm (chosen per model by :mod:`recbole_mm.registry`)."""

from recbole_mm.trainer.findrec_trainer import FindRecTrainer

__all__ = ["FindRecTrainer"]
