"""Suggestions for a name the user mistyped (a config key, a model, a dataset)."""

import difflib
from typing import Iterable, List


def nearest(word: str, candidates: Iterable[str], n: int = 5) -> List[str]:
    """The ``candidates`` closest to ``word``, ignoring case, best first."""
    by_lower = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    return [by_lower[c] for c in difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)]
