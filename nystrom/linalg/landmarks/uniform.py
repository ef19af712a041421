"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_seed
from .base import check_strategy_inputs, select_by_index, uniform_draws


@dataclass(frozen=True)
class Uniform:
    """Tokens sampled uniformly without replacement among the real (unpadded) keys.

    Each sequence draws its own set. Deterministic for a given ``seed`` (the same seed gives
    the same indices for numpy and torch inputs on any device); ``seed=None`` draws fresh
    randomness. Cost :math:`O(n \\log n)` per sequence (a sort of random keys).
    """

    name = "uniform"

    def __call__(self, Q, K, num_landmarks, *, key_padding_mask=None, seed=None, head_axis=None,
                 features=None, scale=None):
        xp, m = check_strategy_inputs(Q, K, num_landmarks, key_padding_mask, head_axis, features)
        seed = check_seed(seed)

        def pick(X, m, mask):
            # Sorting i.i.d. uniform keys gives a uniformly random permutation; padded tokens get
            # keys above 1 so they sort last and are never taken (m <= real tokens is checked).
            keys = uniform_draws(xp, tuple(X.shape[:-1]), seed, X)
            if mask is not None:
                keys = xp.where(mask, keys, 2 + keys)
            return xp.sort(xp.argsort(keys, axis=-1)[..., :m], axis=-1)

        return select_by_index(xp, Q, K, m, key_padding_mask, head_axis, features, pick)
