"""Landmark selection strategies and their registry.

Each strategy is a small frozen :class:`~nystrom.linalg.landmarks.base.Strategy` subclass that declares
its name and capabilities; :data:`STRATEGIES` and :data:`RANDOM_STRATEGIES` are derived from those
declarations. Any callable with the strategy signature (see :mod:`nystrom.linalg.landmarks.base`)
is accepted too.
"""

from __future__ import annotations

from collections.abc import Set

from .base import (
    CAPABILITIES,
    STRATEGIES,
    ClusterStrategy,
    Grouping,
    Landmarks,
    Selection,
    Strategy,
    TokenStrategy,
    get_strategy,
    require,
)
from .fps import FNA_AUTHORS, FPS, farthest_point_sampling
from .kmeans import KMeans
from .norm import Norm, attention_share
from .rpcholesky import RPCholesky, rpcholesky_pivots
from .segment_means import SegmentMeans
from .uniform import Uniform


class _RandomStrategies(Set):
    """The names in :data:`STRATEGIES` of classes declared ``random``, read at each use: a strategy a user declares
    after the import counts (a frozen set of the built-in ones missed it)."""

    def __contains__(self, name):
        return getattr(STRATEGIES.get(name), "random", False)

    def __iter__(self):
        return iter([name for name, cls in STRATEGIES.items() if cls.random])

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return f"RANDOM_STRATEGIES({sorted(self)})"

    @classmethod
    def _from_iterable(cls, names):
        # What set operations with it return (set(STRATEGIES) - RANDOM_STRATEGIES): a plain frozen set.
        return frozenset(names)


#: Names of the strategies whose result depends on ``seed`` (declared ``random``); the others are
#: deterministic functions of the input.
RANDOM_STRATEGIES = _RandomStrategies()

__all__ = [
    "CAPABILITIES", "FNA_AUTHORS", "FPS", "ClusterStrategy", "Grouping", "KMeans", "Landmarks", "Norm",
    "RANDOM_STRATEGIES", "RPCholesky", "STRATEGIES", "SegmentMeans", "Selection", "Strategy", "TokenStrategy",
    "Uniform", "attention_share", "farthest_point_sampling", "get_strategy", "require", "rpcholesky_pivots",
]
