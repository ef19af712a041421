r"""k-means landmarks: cluster centroids of the keys (k-means++ seeding, then Lloyd steps).

Like segment means, a landmark is a mean of tokens, but the groups are clusters in feature space
instead of contiguous runs: :math:`\tilde k_j = \frac{1}{|C_j|}\sum_{i \in C_j} k_i` and
:math:`\tilde q_j = \frac{1}{|C_j|}\sum_{i \in C_j} q_i` with the same clusters :math:`C_j`.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from .base import CentroidStrategy, sample_by_weight, uniform_draws


def _sq_distances(xp, X, C):
    """``||x_i - c_j||^2`` for ``X (..., n, D)``, ``C (..., m, D)`` -> ``(..., n, m)``."""
    d = (xp.sum(X * X, axis=-1)[..., :, None] - 2 * (X @ xp.matrix_transpose(C))
         + xp.sum(C * C, axis=-1)[..., None, :])
    return xp.clip(d, min=0)


def kmeans_plus_plus(xp, X, m, mask, u):
    """k-means++ seeds: indices ``(..., m)``; ``u (..., m)`` are the uniform draws."""
    n = X.shape[-2]
    device = array_api_compat.device(X)
    positions = xp.arange(n, device=device)
    eligible = xp.ones(X.shape[:-1], dtype=xp.bool, device=device) if mask is None else mask
    one = xp.ones(X.shape[:-1], dtype=X.dtype, device=device)
    weight = xp.where(eligible, one, -one)
    best = None
    taken = ~eligible
    chosen = []
    for t in range(m):
        idx = sample_by_weight(xp, weight, u[..., t])
        chosen.append(idx)
        point = xp.take_along_axis(X, xp.broadcast_to(idx[..., None, None], (*idx.shape, 1, X.shape[-1])), axis=-2)
        d = _sq_distances(xp, X, point)[..., 0]
        best = d if best is None else xp.minimum(best, d)
        taken = taken | (positions == idx[..., None])
        # D^2 weighting; chosen and ineligible tokens get -1 so they are never drawn again, and a
        # row whose remaining tokens all coincide with chosen ones (weight 0) still finds one.
        remaining = ~taken
        weight = xp.where(remaining, best, -one)
        weight = xp.where(xp.any(weight > 0, axis=-1, keepdims=True) | ~remaining, weight,
                          xp.where(remaining, one, -one))
    return xp.stack(chosen, axis=-1)


@dataclass(frozen=True)
class KMeans(CentroidStrategy, name="kmeans", random=True):
    """Centroids of k-means clusters of the keys.

    Parameters
    ----------
    iters : int
        Lloyd iterations after k-means++ seeding.

    Notes
    -----
    Random through the seeding; deterministic for a given ``seed``. A cluster that empties
    keeps its seed token as its only member. Cost :math:`O(n m D)` per iteration and
    :math:`O(n m)` memory.
    """

    iters: int = 10

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"KMeans iters must be a non-negative int, got {self.iters!r}")

    def membership(self, selection, queries):
        xp, m = selection.xp, selection.num_landmarks
        X, mask = (selection.query_points, None) if queries else (selection.points, selection.mask)
        n = X.shape[-2]
        device = array_api_compat.device(X)
        seeds = kmeans_plus_plus(xp, X, m, mask, uniform_draws(xp, (*X.shape[:-2], m), selection.seed, X))
        seed_member = xp.astype(seeds[..., :, None] == xp.arange(n, device=device), X.dtype)
        W = seed_member
        for _ in range(self.iters):
            C = W @ X
            nearest = xp.argmin(_sq_distances(xp, X, C), axis=-1)
            member = nearest[..., None, :] == xp.arange(m, device=device)[:, None]
            if mask is not None:
                member = member & mask[..., None, :]
            member = xp.astype(member, X.dtype)
            counts = xp.sum(member, axis=-1, keepdims=True)
            member = xp.where(counts > 0, member, seed_member)
            W = member / xp.sum(member, axis=-1, keepdims=True)
        return W
