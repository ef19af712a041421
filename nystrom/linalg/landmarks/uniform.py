"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat
import numpy as np

from ..validation import check_seed
from .base import check_strategy_inputs, select_by_index, to_host


@dataclass(frozen=True)
class Uniform:
    """Tokens sampled uniformly without replacement among the real (unpadded) keys.

    Each sequence draws its own set. Deterministic for a given ``seed`` (the same seed gives
    the same indices for numpy and torch inputs on any device); ``seed=None`` draws fresh
    randomness. Cost :math:`O(n)` per sequence (a partial selection of random keys on the host).
    """

    name = "uniform"

    def __call__(self, Q, K, num_landmarks, *, key_padding_mask=None, seed=None, head_axis=None,
                 features=None, scale=None):
        xp, m = check_strategy_inputs(Q, K, num_landmarks, key_padding_mask, head_axis, features)
        seed = check_seed(seed)

        def pick(X, m, mask):
            # The m smallest of n i.i.d. uniform keys form a uniformly random m-subset; padded tokens
            # get keys above 1 so they are never among them (m <= real tokens is checked). Keys are
            # drawn and partially selected on the host in O(n): sorting them on the device took 10 ms
            # at n = 65,536, and one seed gives the same tokens on every device.
            keys = np.random.default_rng(seed).random(tuple(X.shape[:-1]))
            if mask is not None:
                keys = np.where(to_host(mask), keys, 2 + keys)
            idx = np.sort(np.argpartition(keys, m - 1, axis=-1)[..., :m], axis=-1)
            return xp.asarray(idx, device=array_api_compat.device(X))

        return select_by_index(xp, Q, K, m, key_padding_mask, head_axis, features, pick)
