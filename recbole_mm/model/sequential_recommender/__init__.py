"""Sequential recommenders of recbole-mm."""

from recbole_mm.model.sequential_recommender.findrec import FindRec

__all__ = ["FindRec"]
