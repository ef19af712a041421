"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat
import numpy as np

from .base import TokenStrategy, host_view


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
        # drawn on the host, so one seed gives the same tokens on every device. Host arrays take an
        # O(n) partial selection (sorting took 10 ms at n = 65,536); accelerator arrays sort on the
        # device, so the mask is never read back to the host.
        xp, m = selection.xp, selection.num_landmarks
        keys = np.random.default_rng(selection.seed).random(tuple(X.shape[:-1]))
        host_mask = None if mask is None else host_view(mask)
        if mask is None or host_mask is not None:
            if host_mask is not None:
                keys = np.where(host_mask, keys, 2 + keys)
            idx = np.sort(np.argpartition(keys, m - 1, axis=-1)[..., :m], axis=-1)
            return xp.asarray(idx, device=array_api_compat.device(X))
        keys = xp.asarray(keys, dtype=xp.float64, device=array_api_compat.device(X))
        keys = xp.where(mask, keys, 2 + keys)
        return xp.sort(xp.argsort(keys, axis=-1)[..., :m], axis=-1)
