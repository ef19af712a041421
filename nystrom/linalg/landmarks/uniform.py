"""Uniform landmarks: ``m`` distinct real tokens drawn uniformly at random."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..numerics import compiling, host_view
from ..sequence import WHOLE
from .base import TokenStrategy, host_draws, to_device


def random_subset(xp, X, k, seed, mask=None, axis=WHOLE):
    """Positions ``(..., k)``, ascending, of ``k`` distinct rows of ``X (..., n, D)`` drawn uniformly among the
    eligible ones, on ``X``'s device (only its shape and device matter).

    ``mask (..., n)`` marks the eligible rows (at least ``k`` per row of the batch, or the subset runs into
    ineligible ones). The ``k`` smallest of ``n`` i.i.d. uniform keys form a uniformly random ``k``-subset, and
    ineligible rows get keys above 1. Keys are drawn on the host, so one seed gives the same tokens on every
    device; host arrays take an O(n) partial selection (sorting took 10 ms at n = 65,536), accelerator arrays sort
    on the device, so the mask is never read back to the host, and so do tensors that ``torch.compile`` traces
    (numpy cannot enter its graph). With a seed, each batch row draws from its own stream, so padding at the end
    of a sequence leaves the keys of its real tokens, and the subset, unchanged.

    On a sharded ``axis`` (:mod:`nystrom.linalg.sequence`; ``seed`` then required, the same on every process)
    each process draws the keys of the whole row and keeps those of its shard: the global positions of the ``k``
    smallest come from each shard's ``k`` smallest, :math:`O(pk)` sent.
    """
    shape = tuple(X.shape[:-1])
    if axis.sharded:
        n = shape[-1]
        keys = row_draws(seed, (*shape[:-1], axis.length(n)))[..., axis.offset:axis.offset + n]
        keys = to_device(xp, keys, X, xp.float64)
        if mask is not None:
            keys = xp.where(mask, keys, 2 + keys)
        return xp.sort(axis.top_k(xp, -keys, k), axis=-1)
    host_mask = None if mask is None else host_view(mask)
    if host_mask is not None or (mask is None and not compiling(X)):
        keys = row_draws(seed, shape)
        if host_mask is not None:
            keys = np.where(host_mask, keys, 2 + keys)
        return to_device(xp, np.sort(np.argpartition(keys, k - 1, axis=-1)[..., :k], axis=-1), X)
    keys = host_draws(xp, row_draws, seed, shape, xp.float64, X)
    if mask is not None:
        keys = xp.where(mask, keys, 2 + keys)
    return xp.sort(xp.argsort(keys, axis=-1)[..., :k], axis=-1)


def row_draws(seed, shape):
    """Uniform ``[0, 1)`` host draws of ``shape`` ``(..., n)``: with a seed, row ``r`` (flattened leading index) comes
    from its own stream ``default_rng([*seed, r])``, so its first draws do not depend on ``n``."""
    if seed is None:
        return np.random.default_rng().random(tuple(shape))
    base = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    rows = [np.random.default_rng([*base, r]).random(shape[-1]) for r in range(math.prod(shape[:-1]))]
    return np.reshape(np.stack(rows), tuple(shape))


@dataclass(frozen=True)
class Uniform(TokenStrategy, name="uniform", random=True, sharded=True):
    """Tokens sampled uniformly without replacement among the real (unpadded) keys.

    Each sequence draws its own set. Deterministic for a given ``seed`` (the same seed gives
    the same indices for numpy and torch inputs on any device); ``seed=None`` draws fresh
    randomness. Cost :math:`O(n)` per sequence (a partial selection of random keys on the host).
    """

    def pick(self, selection, X, mask):
        return random_subset(selection.xp, X, selection.num_landmarks, selection.seed, mask, selection.axis)
