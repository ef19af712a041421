"""Landmark selection strategies and their registry.

Each strategy is a small frozen object; its name string is the short form accepted by
``nystrom.approximate(strategy=...)``. Any callable with the strategy signature (see
:mod:`nystrom.linalg.landmarks.base`) is accepted too.
"""

from __future__ import annotations

from ..registry import resolve
from .base import Landmarks
from .fps import FPS, farthest_point_sampling
from .kmeans import KMeans
from .norm import Norm, attention_share
from .rpcholesky import RPCholesky, rpcholesky_pivots
from .segment_means import SegmentMeans
from .uniform import Uniform

STRATEGIES = {
    "norm": Norm,
    "fps": FPS,
    "segment_means": SegmentMeans,
    "uniform": Uniform,
    "kmeans": KMeans,
    "rpcholesky": RPCholesky,
}
"""Strategy names accepted by :func:`get_strategy` and ``nystrom.approximate``."""

#: Strategies whose result depends on ``seed``; all others are deterministic functions of the input.
RANDOM_STRATEGIES = frozenset({"uniform", "kmeans", "rpcholesky"})


def get_strategy(strategy):
    """Return a strategy object for a name, an existing strategy object or any callable.

    Parameters
    ----------
    strategy : str or callable
        A name in :data:`STRATEGIES`, giving the default object.

    Returns
    -------
    callable
        ``strategy(Q, K, num_landmarks, *, key_padding_mask, seed, head_axis, features, scale) -> Landmarks``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    TypeError
        For anything that is neither a string nor callable.
    """
    return resolve("strategy", "strategies", STRATEGIES, strategy)


__all__ = [
    "FPS", "KMeans", "Landmarks", "Norm", "RANDOM_STRATEGIES", "RPCholesky", "STRATEGIES", "SegmentMeans",
    "Uniform", "attention_share", "farthest_point_sampling", "get_strategy", "rpcholesky_pivots",
]
