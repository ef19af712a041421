"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat
import numpy as np

from .base import TokenStrategy, to_host


@dataclass(frozen=True)
class Uniform(TokenStrategy, name="uniform", random=True):
    """Tokens sampled uniformly without replacement among the real (unpadded) keys.

    Each sequence draws its own set. Deterministic for a given ``seed`` (the same seed gives
    the same indices for numpy and torch inputs on any device); ``seed=None`` draws fresh
    randomness. Cost :math:`O(n)` per sequence (a partial selection of random keys on the host).
    """

    def pick(self, selection, X, mask):
        # The m smallest of n i.i.d. uniform keys form a uniformly random m-subset; padded tokens
        # get keys above 1 so they are never among them (m <= real tokens is checked). Keys are
        # drawn and partially selected on the host in O(n): sorting them on the device took 10 ms
        # at n = 65,536, and one seed gives the same tokens on every device.
        m = selection.num_landmarks
        keys = np.random.default_rng(selection.seed).random(tuple(X.shape[:-1]))
        if mask is not None:
            keys = np.where(to_host(mask), keys, 2 + keys)
        idx = np.sort(np.argpartition(keys, m - 1, axis=-1)[..., :m], axis=-1)
        return selection.xp.asarray(idx, device=array_api_compat.device(X))
