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

from ..numerics import put_along_axis, segment_sum
from .base import ClusterStrategy, Grouping, gather_rows, host_view, random_subset, uniform_draws

#: Seed of the clustering strategies when the caller passes none: they are deterministic by default.
DEFAULT_SEED = 0


def sq_distances(xp, X, C):
    """``||x_i - c_j||^2`` for ``X (..., n, D)``, ``C (..., m, D)`` -> ``(..., n, m)``, one matrix product."""
    d = (xp.sum(X * X, axis=-1)[..., :, None] - 2 * (X @ xp.matrix_transpose(C))
         + xp.sum(C * C, axis=-1)[..., None, :])
    return xp.clip(d, min=0)


def kmeans_plus_plus(xp, X, m, mask, u):
    """k-means++ seeds: distinct indices ``(..., m)`` of rows of ``X (..., n, D)``; ``u (..., m)`` are uniform draws.

    Each seed is drawn with probability proportional to the squared distance to the nearest seed so far
    (inverse-CDF sampling), among the eligible rows not yet chosen. A tiny uniform floor on those weights keeps
    the draw defined when every remaining row coincides with a seed (duplicated tokens). One matrix-vector
    product and a handful of elementwise passes per step: the loop is sequential, so its speed is set by the
    number of operations.
    """
    n = X.shape[-2]
    device = array_api_compat.device(X)
    positions = xp.arange(n, device=device)
    sq = xp.sum(X * X, axis=-1)
    available = xp.ones(X.shape[:-1], dtype=xp.bool, device=device) if mask is None else mask
    floor = 1e-12 * (xp.mean(sq, axis=-1, keepdims=True) + 1e-30)
    weight = xp.astype(available, X.dtype)
    best = None
    chosen = []
    for t in range(m):
        cdf = xp.cumulative_sum(weight, axis=-1)
        idx = xp.sum(xp.astype(cdf <= u[..., t:t + 1] * cdf[..., -1:], xp.int64), axis=-1)
        idx = xp.minimum(idx, xp.asarray(n - 1, device=device))
        chosen.append(idx)
        point = xp.take_along_axis(X, idx[..., None, None], axis=-2)
        d = sq - 2 * (X @ xp.matrix_transpose(point))[..., 0] + sq_at(xp, sq, idx)
        best = d if best is None else xp.minimum(best, d)
        available = available & (positions != idx[..., None])
        weight = xp.where(available, xp.clip(best, min=0) + floor, xp.zeros_like(best))
    return xp.stack(chosen, axis=-1)


def sq_at(xp, sq, idx):
    """``sq[..., idx]`` as ``(..., 1)``."""
    return xp.take_along_axis(sq, idx[..., None], axis=-1)


def nearest(xp, X, C, active=None):
    r"""Label ``(..., n)`` of the nearest centroid of ``C (..., m, D)`` for each row of ``X (..., n, D)``, among the
    ``active (..., m)`` ones (default all).

    :math:`\arg\min_j \lVert x - c_j\rVert^2 = \arg\min_j (\lVert c_j\rVert^2 - 2 x^\top c_j)`: one matrix
    product and one pass, without the :math:`\lVert x\rVert^2` term that every :math:`j` shares.
    """
    d = xp.sum(C * C, axis=-1)[..., None, :] - 2 * (X @ xp.matrix_transpose(C))
    if active is not None:
        d = xp.where(active[..., None, :], d, xp.asarray(float("inf"), dtype=d.dtype,
                                                          device=array_api_compat.device(d)))
    return xp.argmin(d, axis=-1)


def sampled_kmeans(xp, X, m, mask=None, *, seed, iters=3, sample_size=None, active=None, assign_all=False):
    r"""Cluster labels ``(..., n)`` of the rows of ``X (..., n, D)`` by k-means on a sample, and the number of tokens
    each labelled row stands for.

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
    assign_all : bool
        Label every point by one more :math:`n\times m` distance product. By default only the sample is
        labelled, and each sampled point stands for :math:`n_v / s_v` points (eligible points over eligible
        sampled ones): an unbiased estimate of the cluster sizes, at a cost that does not grow with :math:`n`
        (the docs' landmark page compares the two).

    Returns
    -------
    Grouping
        Labels in ``[0, m)`` (every active cluster non-empty; ``-1`` outside ``mask`` and, by default, for the
        points left out of the sample); by default the sample as the listed tokens, each standing for
        :math:`n_v / s_v` points.
    """
    n = X.shape[-2]
    device = array_api_compat.device(X)
    s = min(n, sample_size or max(1024, 16 * m))
    rows = random_subset(xp, X.shape[:-1], s, [seed, 0], mask, device)
    sample = gather_rows(xp, X, rows)
    in_sample = None if mask is None else xp.take_along_axis(mask, rows, axis=-1)
    seeds = _seeds(xp, sample, m, in_sample, uniform_draws(xp, (*X.shape[:-2], m), [seed, 1], X))
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
    # Every active cluster keeps its seed: the seeds are distinct tokens, so no cluster ends empty (a cluster whose
    # centroid no point is nearest to, as with duplicated tokens, would be 0/0).
    own = xp.broadcast_to(xp.arange(m, dtype=xp.int64, device=device), seeds.shape)
    if assign_all or s == n:
        labels = nearest(xp, X, centroids, active)
        seed_tokens = xp.take_along_axis(rows, seeds, axis=-1)
        if active is not None:
            own = xp.where(active, own, xp.take_along_axis(labels, seed_tokens, axis=-1))
        labels = put_along_axis(xp, labels, seed_tokens, own)
        return Grouping(labels if mask is None else xp.where(mask, labels, -xp.ones_like(labels)))
    labels = nearest(xp, sample, centroids, active)
    if active is not None:
        own = xp.where(active, own, xp.take_along_axis(labels, seeds, axis=-1))
    labels = put_along_axis(xp, labels, seeds, own)
    if in_sample is None:
        stands_for = xp.full((*X.shape[:-2], 1), n / s, dtype=X.dtype, device=device)
    else:
        labels = xp.where(in_sample, labels, -xp.ones_like(labels))
        n_valid = xp.sum(xp.astype(mask, X.dtype), axis=-1, keepdims=True)
        stands_for = n_valid / xp.sum(xp.astype(in_sample, X.dtype), axis=-1, keepdims=True)
    full = put_along_axis(xp, -xp.ones(X.shape[:-1], dtype=labels.dtype, device=device), rows, labels)
    return Grouping(full, tokens=rows, token_labels=labels, weights=stands_for)


def _seeds(xp, sample, m, mask, u):
    """:func:`kmeans_plus_plus` on the sample: its m strictly sequential steps are bound by the array library's
    per-operation overhead, so samples in host memory run them in numpy on a zero-copy view (the same code)."""
    host = host_view(sample)
    if host is None:
        return kmeans_plus_plus(xp, sample, m, mask, u)
    np_xp = array_api_compat.array_namespace(host)
    seeds = kmeans_plus_plus(np_xp, host, m, None if mask is None else host_view(mask), host_view(u))
    return xp.asarray(seeds, device=array_api_compat.device(sample))


@dataclass(frozen=True)
class KMeans(ClusterStrategy, name="kmeans", random=True, weighted=True):
    """Clusters of the tokens (sampled k-means), each landmark weighted by the tokens it stands for.

    Parameters
    ----------
    iters : int
        Lloyd steps on the sample after k-means++ seeding.
    sample_size : int or None
        Tokens in the sample, default :math:`\\max(1024, 16m)`.
    assign_all : bool
        Assign every token to its nearest centroid (one :math:`n\\times m` distance product) instead of
        letting the sample stand for the sequence; see :func:`sampled_kmeans`.

    Notes
    -----
    Deterministic for a given ``seed``, and ``seed=None`` means seed 0 (not fresh randomness). With heads
    sharing landmarks, one clustering of the selection features (the head-mean keys, or ``features``) serves
    every head, and each head takes its own means.
    """

    iters: int = 3
    sample_size: int | None = None
    assign_all: bool = False

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
                              sample_size=self.sample_size, assign_all=self.assign_all)
