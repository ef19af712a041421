r"""k-means landmarks: clusters of the tokens, found on a sample, with the cluster sizes as weights.

A landmark is the mean of a cluster in feature space, :math:`\tilde k_j = \frac{1}{c_j}\sum_{i \in C_j} k_i`
and :math:`\tilde q_j = \frac{1}{c_j}\sum_{i \in C_j} q_i`, and it stands for :math:`c_j = |C_j|` tokens: its
keys' logits get :math:`+\log c_j` (proportional attention, derived on the docs' Nyström page).

The clustering is shaped for matrix units and for many cores. k-means++ seeds and a few Lloyd steps
run on a seeded sample of :math:`s = \max(1024, 16m)` tokens (each Lloyd step is one :math:`s\times m`
distance product, an argmin and a scatter-add); one final :math:`n\times m` distance product assigns
every token to its nearest centroid. Cost :math:`O(s m D)` for the sample, :math:`O(n m D)` for the
assignment, :math:`O(n d)` for the means; no :math:`m\times n` membership matrix is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..numerics import segment_sum
from .base import ClusterStrategy, gather_rows, random_subset, sample_by_weight, uniform_draws

#: Seed of the clustering strategies when the caller passes none: they are deterministic by default.
DEFAULT_SEED = 0


def sq_distances(xp, X, C):
    """``||x_i - c_j||^2`` for ``X (..., n, D)``, ``C (..., m, D)`` -> ``(..., n, m)``, one matrix product."""
    d = (xp.sum(X * X, axis=-1)[..., :, None] - 2 * (X @ xp.matrix_transpose(C))
         + xp.sum(C * C, axis=-1)[..., None, :])
    return xp.clip(d, min=0)


def kmeans_plus_plus(xp, X, m, mask, u):
    """k-means++ seeds: indices ``(..., m)`` of rows of ``X (..., n, D)``; ``u (..., m)`` are the uniform draws."""
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
        d = sq_distances(xp, X, point)[..., 0]
        best = d if best is None else xp.minimum(best, d)
        taken = taken | (positions == idx[..., None])
        # D^2 weighting; chosen and ineligible tokens get -1 so they are never drawn again, and a
        # row whose remaining tokens all coincide with chosen ones (weight 0) still finds one.
        remaining = ~taken
        weight = xp.where(remaining, best, -one)
        weight = xp.where(xp.any(weight > 0, axis=-1, keepdims=True) | ~remaining, weight,
                          xp.where(remaining, one, -one))
    return xp.stack(chosen, axis=-1)


def nearest(xp, X, C, active=None):
    """Label ``(..., n)`` of the nearest centroid of ``C (..., m, D)`` for each row of ``X (..., n, D)``, among the
    ``active (..., m)`` ones (default all)."""
    d = sq_distances(xp, X, C)
    if active is not None:
        d = xp.where(active[..., None, :], d, xp.asarray(float("inf"), dtype=d.dtype,
                                                          device=array_api_compat.device(d)))
    return xp.argmin(d, axis=-1)


def sampled_kmeans(xp, X, m, mask=None, *, seed, iters=3, sample_size=None, active=None):
    r"""Cluster labels ``(..., n)`` of the rows of ``X (..., n, D)``: k-means on a sample, then one assignment pass.

    Parameters
    ----------
    xp
        Array namespace.
    X : array, shape (..., n, D)
        Points, float32 or wider.
    m : int
        Clusters, at most the eligible points of every row.
    mask : bool array, shape (..., n), optional
        Points that take part; the others get label ``-1``.
    seed : int
        Seeds the sample and the k-means++ draws.
    iters : int
        Lloyd steps on the sample.
    sample_size : int, optional
        :math:`s`, default :math:`\max(1024, 16m)` (all points when fewer).
    active : bool array, shape (..., m), optional
        Clusters in use per row (default all): rows may use fewer than ``m`` (the others stay empty).

    Returns
    -------
    int64 array, shape (..., n)
        Labels in ``[0, m)``; every active cluster is non-empty; ``-1`` outside ``mask``.
    """
    n = X.shape[-2]
    device = array_api_compat.device(X)
    s = min(n, sample_size or max(1024, 16 * m))
    rows = random_subset(xp, X.shape[:-1], s, [seed, 0], mask, device)
    sample = gather_rows(xp, X, rows)
    in_sample = None if mask is None else xp.take_along_axis(mask, rows, axis=-1)
    seeds = kmeans_plus_plus(xp, sample, m, in_sample, uniform_draws(xp, (*X.shape[:-2], m), [seed, 1], X))
    centroids = gather_rows(xp, sample, seeds)
    for _ in range(iters):
        labels = nearest(xp, sample, centroids, active)
        if in_sample is not None:
            labels = xp.where(in_sample, labels, -xp.ones_like(labels))
        sums = segment_sum(xp, sample, labels, m)
        ones = xp.ones((*labels.shape, 1), dtype=X.dtype, device=device)
        counts = segment_sum(xp, ones, labels, m)
        # A centroid that lost all its points stays where it was.
        centroids = xp.where(counts > 0, sums / xp.maximum(counts, ones[..., :1, :]), centroids)
    labels = nearest(xp, X, centroids, active)
    # Every active cluster keeps its seed: the seeds are distinct tokens, so no cluster ends empty (a cluster whose
    # centroid no token is nearest to, as with duplicated tokens, would be 0/0).
    seed_tokens = xp.take_along_axis(rows, seeds, axis=-1)
    hit = seed_tokens[..., :, None] == xp.arange(n, device=device)
    if active is not None:
        hit = hit & active[..., :, None]
    labels = xp.where(xp.any(hit, axis=-2), xp.argmax(xp.astype(hit, xp.int8), axis=-2), labels)
    return labels if mask is None else xp.where(mask, labels, -xp.ones_like(labels))


@dataclass(frozen=True)
class KMeans(ClusterStrategy, name="kmeans", random=True, weighted=True):
    """Clusters of the tokens (sampled k-means), each landmark weighted by the tokens it stands for.

    Parameters
    ----------
    iters : int
        Lloyd steps on the sample after k-means++ seeding.
    sample_size : int or None
        Tokens in the sample, default :math:`\\max(1024, 16m)`.

    Notes
    -----
    Deterministic for a given ``seed``, and ``seed=None`` means seed 0 (not fresh randomness). With heads
    sharing landmarks, one clustering of the selection features (the head-mean keys, or ``features``) serves
    every head, and each head takes its own means.
    """

    iters: int = 3
    sample_size: int | None = None

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"KMeans iters must be a non-negative int, got {self.iters!r}")
        if self.sample_size is not None and (isinstance(self.sample_size, bool) or not isinstance(
                self.sample_size, int) or self.sample_size < 1):
            raise ValueError(f"KMeans sample_size must be None or a positive int, got {self.sample_size!r}")

    def assign(self, selection, queries):
        X, mask = (selection.query_points, None) if queries else (selection.points, selection.mask)
        seed = DEFAULT_SEED if selection.seed is None else selection.seed
        return sampled_kmeans(selection.xp, X, selection.num_landmarks, mask, seed=seed, iters=self.iters,
                              sample_size=self.sample_size)
