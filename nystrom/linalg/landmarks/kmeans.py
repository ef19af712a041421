r"""k-means landmarks: clusters of the tokens, found on a sample, with the cluster sizes as weights.

A landmark is the mean of a cluster in feature space, :math:`\tilde k_j = \frac{1}{c_j}\sum_{i \in C_j} k_i`
and :math:`\tilde q_j = \frac{1}{c_j}\sum_{i \in C_j} q_i`, and it stands for :math:`c_j = |C_j|` tokens: its
keys' logits get :math:`+\log c_j` (proportional attention, derived on the docs' Nyström page).

The clustering is shaped for matrix units and for many cores. Farthest-point seeds and a few Lloyd
steps run on an evenly spaced sample of :math:`s = \max(1024, 16m)` tokens (each Lloyd step is one
:math:`s\times m` distance product, an argmin and a scatter-add), and each sampled token stands for
:math:`n/s` tokens of the sequence. Cost :math:`O(s m D)`, whatever :math:`n`; no :math:`m\times n`
membership matrix is formed. ``assign_all=True`` adds one :math:`n\times m` distance product that
assigns every token to its nearest centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat
import numpy as np

from ..numerics import host_view, put_along_axis, put_where, segment_sum, take_along_axis
from ..sequence import WHOLE
from ..validation import check_bool, check_int
from .base import ClusterStrategy, Grouping, gather_rows, unit_scaled
from .fps import farthest_points


def nearest(xp, X, C, penalty=None):
    r"""Label ``(..., n)`` of the nearest centroid of ``C (..., m, D)`` for each row of ``X (..., n, D)``, among those
    whose ``penalty (..., m)`` is 0 (default all): an inactive centroid has penalty :math:`+\infty` and a zero row
    in ``C`` (:func:`inactive_penalty`).

    :math:`\arg\min_j \lVert x - c_j\rVert^2 = \arg\min_j (\lVert c_j\rVert^2 - 2 x^\top c_j)`: one matrix
    product and one pass, without the :math:`\lVert x\rVert^2` term that every :math:`j` shares. The factor
    :math:`-2` scales the :math:`m` centroids, not the :math:`n \times m` product (exact, a power of two, away from
    overflow and subnormals), and an inactive centroid is :math:`+\infty` in :math:`\lVert c_j\rVert^2` and 0 in
    the product (so that an overflowing product cannot make it :math:`\infty - \infty`): two passes over
    :math:`n\times m` fewer (0.43 against 0.28 ms at n = 1,024, m = D = 64 on one thread), the same labels.
    """
    c2 = xp.sum(C * C, axis=-1)
    if penalty is not None:
        c2 = c2 + penalty
    scores = X @ xp.matrix_transpose(-2 * C)
    # In place: a second (n, m) array is a fresh allocation whose page faults cost more than the addition.
    scores += c2[..., None, :]
    host = host_view(scores)
    if host is not None:
        # numpy's argmin over short rows is the faster one (45 against 120 us for (1, 1,024, 64) on one thread, and
        # 2.7 against 7.7 ms at n = 65,536); ties go to the lowest index in both.
        return xp.asarray(np.argmin(host, axis=-1), device=array_api_compat.device(X))
    return xp.argmin(scores, axis=-1)


def inactive_penalty(xp, C, active):
    """``(C, penalty)`` for :func:`nearest` with only the ``active (..., m)`` centroids of ``C (..., m, D)``: the
    others' rows zeroed and a penalty of :math:`+\\infty` (0 for the active ones), once for every Lloyd step (a
    centroid that no point joins stays where it is, so the zero rows stay zero)."""
    device = array_api_compat.device(C)
    penalty = xp.where(active, xp.zeros((), dtype=C.dtype, device=device),
                       xp.full((), float("inf"), dtype=C.dtype, device=device))
    return xp.where(active[..., None], C, xp.zeros_like(C)), penalty


def repeated_rows(xp, C, active=None):
    r"""Rows ``(..., m)`` of ``C (..., m, D)`` that repeat an earlier row (an ``active (..., m)`` one, default any)
    up to rounding: :math:`\lVert c_i - c_j\rVert^2 \le D\,\varepsilon\,(\lVert c_i\rVert^2 + \lVert c_j\rVert^2)`
    for some :math:`i < j`, from the Gram matrix (:math:`O(m^2 D)`, no :math:`m\times m\times D` array).

    Farthest-point seeds repeat one another where a sequence has fewer distinct tokens than clusters. Equal
    centroids tie for their tokens in value but not in the rounding of :func:`nearest`'s product, which differs with
    the rows it is given (one process's shard or the whole sequence): the tie then broke otherwise on each (a review:
    1.5e-3 between a sharded call and one process). A repeated seed is kept out of the assignment as an inactive
    one (:func:`inactive_penalty`), its cluster its seed alone.
    """
    m, D = C.shape[-2], C.shape[-1]
    device = array_api_compat.device(C)
    norms = xp.sum(C * C, axis=-1)
    both = norms[..., :, None] + norms[..., None, :]
    close = both - 2 * (C @ xp.matrix_transpose(C)) <= (D * float(xp.finfo(C.dtype).eps)) * both
    order = xp.arange(m, device=device)
    close = close & (order[:, None] < order[None, :])
    if active is not None:
        close = close & active[..., :, None]
    return xp.any(close, axis=-2)


def evenly_spaced(xp, shape, k, mask=None, device=None, axis=WHOLE):
    r"""Rows ``(..., k)`` of ``k`` evenly spaced eligible tokens, which of them are real picks ``(..., k)`` and which
    this array holds ``(..., k)``.

    Among the :math:`n_v` eligible tokens of a row (``mask``, default all of ``shape = (..., n)``), rank
    :math:`\lfloor i \max(n_v, k) / k \rfloor` for :math:`i < k`: every eligible token when :math:`n_v \le k`
    (the other picks are marked unreal), a stride of :math:`n_v / k` otherwise. Padding at the end of a sequence
    changes nothing. On a sharded ``axis`` (:mod:`nystrom.linalg.sequence`) the ranks are those of the whole
    sequence, and each process holds the picks in its shard.

    Returns
    -------
    rows : int array, shape (..., k)
        Rows of this array (for picks it does not hold: some row).
    real : bool array, shape (..., k), or None
        Picks that are eligible tokens (``None``: all).
    held : bool array, shape (..., k), or None
        Real picks held by this array (``None``: every real pick, as for a whole sequence).
    """
    n = shape[-1]
    positions = xp.arange(k, dtype=xp.int64, device=device)
    if mask is None:
        total = axis.length(n)
        rows, held = axis.local(xp, xp.broadcast_to((positions * max(total, k)) // k, (*shape[:-1], k)), n)
        return rows, None, held
    filled, before, n_valid = axis.cumulative_count(xp, mask)
    ranks = (positions * xp.maximum(n_valid, xp.full((), k, dtype=xp.int64, device=device))) // k
    real = ranks < n_valid
    rows, held = axis.rows_of_ranks(xp, filled, before, ranks, real)
    return rows, real, held


def sampled_kmeans(xp, X, m, mask=None, *, iters=3, sample_size=None, active=None, assign_all=False, axis=WHOLE):
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
    iters : int
        Lloyd steps on the sample after farthest-point seeding.
    sample_size : int, optional
        :math:`s`, default :math:`\max(1024, 16m)`, at least :math:`m` (all points when fewer).
    active : bool array, shape (..., m), optional
        Clusters in use per row (default all): rows may use fewer than ``m`` (the others stay empty).
    assign_all : bool
        Label every point by one more :math:`n\times m` distance product. By default only the sample is
        labelled, and each sampled point stands for :math:`n_v / s_v` points (eligible points over eligible
        sampled ones): an estimate of the cluster sizes (exact where the sample holds every point), at a cost that
        does not grow with :math:`n` (the docs' landmark page compares the two).

    Returns
    -------
    Grouping
        Labels in ``[0, m)`` (every active cluster non-empty; ``-1`` outside ``mask`` and, by default, for the
        points left out of the sample); by default the sample as the listed tokens, each standing for
        :math:`n_v / s_v` points.
    """
    n = X.shape[-2]
    total = axis.length(n)
    device = array_api_compat.device(X)
    # At least m sampled tokens: k-means cannot make m non-empty clusters of fewer points.
    s = min(total, max(sample_size or max(1024, 16 * m), m))
    rows, in_sample, held = evenly_spaced(xp, X.shape[:-1], s, mask, device, axis)
    sample = axis.gather(xp, X, rows, held)
    # Distances in units where the sample's largest entry is about 1: labels unchanged, no overflow.
    sample, unit = unit_scaled(xp, sample, in_sample)
    # Deterministic throughout: an evenly spaced sample and farthest-point seeds (a random sample with k-means++
    # seeds moved the error on real attention by up to 40 % from one seed to another; docs' landmark page).
    seeds = farthest_points(sample, m, mask=in_sample)
    centroids = gather_rows(xp, sample, seeds)
    repeated = repeated_rows(xp, centroids, active)
    centroids, penalty = inactive_penalty(xp, centroids, ~repeated if active is None else active & ~repeated)
    # One scatter-add per Lloyd step gives the sums and, in an appended column of ones, the counts.
    with_ones = xp.concat([sample, xp.ones((*sample.shape[:-1], 1), dtype=sample.dtype, device=device)], axis=-1)
    for _ in range(iters):
        labels = nearest(xp, sample, centroids, penalty)
        if in_sample is not None:
            labels = xp.where(in_sample, labels, -xp.ones_like(labels))
        sums = segment_sum(xp, with_ones, labels, m)
        counts = sums[..., -1:]
        # A centroid that lost all its points stays where it was.
        centroids = xp.where(counts > 0, sums[..., :-1] / xp.maximum(counts, xp.ones_like(counts)), centroids)
    # Every active cluster keeps its seed: the seeds are distinct tokens, so no cluster ends empty (a cluster whose
    # centroid no point is nearest to, as with duplicated tokens, would be 0/0). Inactive slots rewrite slot 0's
    # seed with slot 0 (always active): the same write twice, so the scatter stays deterministic.
    own = xp.broadcast_to(xp.arange(m, dtype=xp.int64, device=device), seeds.shape)
    if active is not None:
        seeds = xp.where(active, seeds, seeds[..., :1])
        own = xp.where(active, own, xp.zeros_like(own))
    if assign_all or s == total:
        seed_tokens = take_along_axis(xp, rows, seeds)
        seed_held = None if held is None else take_along_axis(xp, held, seeds)
        labels = put_where(xp, nearest(xp, X if unit is None else X * unit, centroids, penalty), seed_tokens, own,
                           seed_held)
        return Grouping(labels if mask is None else xp.where(mask, labels, -xp.ones_like(labels)))
    labels = put_along_axis(xp, nearest(xp, sample, centroids, penalty), seeds, own)
    if in_sample is None:
        stands_for = xp.full((*X.shape[:-2], 1), total / s, dtype=X.dtype, device=device)
    else:
        labels = xp.where(in_sample, labels, -xp.ones_like(labels))
        n_valid = axis.sum(xp.sum(xp.astype(mask, X.dtype), axis=-1, keepdims=True))
        stands_for = n_valid / xp.sum(xp.astype(in_sample, X.dtype), axis=-1, keepdims=True)
    if held is not None:
        # The listed tokens are the picks this array holds (on a sharded axis, the others are summed elsewhere).
        labels = xp.where(held, labels, -xp.ones_like(labels))
    full = put_where(xp, -xp.ones(X.shape[:-1], dtype=labels.dtype, device=device), rows, labels, held)
    return Grouping(full, tokens=rows, token_labels=labels, weights=stands_for)


@dataclass(frozen=True)
class KMeans(ClusterStrategy, name="kmeans", weighted=True, sharded=True):
    """Clusters of the tokens (sampled k-means), each landmark weighted by the tokens it stands for.

    Parameters
    ----------
    iters : int
        Lloyd steps on the sample after farthest-point seeding.
    sample_size : int or None
        Tokens in the sample, default :math:`\\max(1024, 16m)`, at least :math:`m`.
    assign_all : bool
        Assign every token to its nearest centroid (one :math:`n\\times m` distance product) instead of
        letting the sample stand for the sequence; see :func:`sampled_kmeans`.

    Notes
    -----
    Deterministic (``seed`` is not used). With heads sharing landmarks, one clustering of the selection
    features (the head-mean keys, or ``features``) serves every head, and each head takes its own means.
    """

    iters: int = 3
    sample_size: int | None = None
    assign_all: bool = False

    def __post_init__(self):
        check_int("KMeans iters", self.iters, minimum=0)
        check_int("KMeans sample_size", self.sample_size, minimum=1, optional=True)
        check_bool("KMeans assign_all", self.assign_all)

    def assign(self, selection, queries):
        X, mask = (selection.query_points, None) if queries else (selection.points, selection.mask)
        return sampled_kmeans(selection.xp, X, selection.num_landmarks, mask, iters=self.iters,
                              sample_size=self.sample_size, assign_all=self.assign_all, axis=selection.axis)
