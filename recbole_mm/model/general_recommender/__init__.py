"""General (non-sequential) recommenders of recbole-mm."""

from recbole_mm.model.general_recommender.mambarec import MambaRec

__all__ = ["MambaRec"]
