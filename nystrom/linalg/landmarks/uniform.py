"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from .base import TokenStrategy, random_subset


@dataclass(frozen=True)
class Uniform(TokenStrategy, name="uniform", random=True):
    """Tokens sampled uniformly without replacement among the real (unpadded) keys.

    Each sequence draws its own set. Deterministic for a given ``seed`` (the same seed gives
    the same indices for numpy and torch inputs on any device); ``seed=None`` draws fresh
    randomness. Cost :math:`O(n)` per sequence (a partial selection of random keys on the host).
    """

    def pick(self, selection, X, mask):
        return random_subset(selection.xp, X.shape[:-1], selection.num_landmarks, selection.seed, mask,
                             array_api_compat.device(X))
