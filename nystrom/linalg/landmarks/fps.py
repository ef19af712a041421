r"""Farthest-point sampling (FPS), the landmark rule of the FNA authors' code, and its variants.

Greedy: start from a given point, then repeatedly add the eligible point whose squared Euclidean
distance to the chosen set is largest,

.. math:: s_{t+1} = \arg\max_i \min_{j \le t} \lVert x_i - x_{s_j} \rVert^2 .

Exact (no bucketing or projection), :math:`O(n m D)` time and :math:`O(n)` extra memory, batched
over leading dimensions and deterministic: ties go to the lowest index. FPS is greedy pivoted
Cholesky on an RBF kernel in the small-bandwidth limit (the docs derive the link), which is why it
spreads landmarks over the token distribution and picks isolated outliers (sinks, artifacts) early.

Guaranteed points (CLS) either start the distances, so the farthest points are spread away from them
(``from_guaranteed=True``, the library's default), or stay out of the sampling, which then starts at
the first eligible point (``from_guaranteed=False``: what the FNA authors' ``sample_landmarks`` does,
Astro-85/fast_nystrom_attention @9363d38). :data:`FNA_AUTHORS` reproduces their whole recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import array_api_compat
import numpy as np

from ..numerics import (
    at_least_float32,
    host_view,
    numpy_overflow_ignored,
    put_where,
    single_threaded_numpy_blas,
    take_along_axis,
)
from ..sequence import WHOLE, first_token
from ..solvers import NewtonSchulz
from ..validation import check_bool, check_int, check_real_floating, namespace, per_token
from .base import TokenStrategy, unit_scaled


def farthest_point_sampling(X, num_points, *, mask=None, guarantee_score=None, max_guaranteed=None,
                            from_guaranteed=True, axis=WHOLE):
    r"""Indices chosen by exact farthest-point sampling,
    :math:`s_{t+1} = \arg\max_i \min_{j \le t} \lVert x_i - x_{s_j}\rVert^2`.

    Parameters
    ----------
    X : array, shape (..., n, D)
        Points (one per token), finite (not checked: NaN distances make the choice arbitrary); half precision is
        measured in float32. Distances are measured in units of a power of two set by the eligible points, so points
        near the ends of the dtype's range (about 1e18 and 1e-16 in float32) neither overflow nor tie, and padding
        rows may hold anything finite.
    num_points : int
        How many to choose, ``m <= number of eligible points``.
    mask : bool array, shape (..., n), optional
        Eligible points (``True``); others are never chosen.
    guarantee_score : array, shape (..., n), optional
        Points with a finite score are chosen first, highest score first (e.g. CLS and attention
        sinks); ``-inf`` marks ordinary points.
    max_guaranteed : int, optional
        At most this many points are taken on their guarantee score (the highest scores win);
        the rest of the ``m`` are farthest points. Default: all of them, up to ``m``.
    from_guaranteed : bool
        ``True``: the farthest points are measured from the guaranteed ones too. ``False``: the guaranteed
        points stay out of the sampling, which starts at the first eligible point that is not guaranteed
        and measures distances from the sampled points alone (the FNA authors' rule).
    axis : WholeSequence
        The token axis (:mod:`nystrom.linalg.sequence`). On a sharded one, ``X``, ``mask`` and ``guarantee_score``
        are this process's shard, and every step takes the farthest point of the whole sequence: each shard's
        farthest candidate is gathered (:math:`O(P)` values) and the chosen point's row is sent to every process
        (:math:`O(D)`), two collectives a step, :math:`m` steps, and one for the units. The indices returned are
        global positions.

    Returns
    -------
    int64 array, shape (..., m)
        Chosen indices in selection order. Without guarantees the first is the first eligible
        point.

    Notes
    -----
    Each step is one pass over the :math:`n \times (D + 2)` augmented points, so the loop is bound by
    memory bandwidth and, for arrays in host memory, by the per-operation overhead of the array
    library: there it runs in numpy on a zero-copy DLPack view (timings on the docs' benchmarks
    page). Arrays on an accelerator keep every step on the device (no host synchronisation per
    step). Both paths make the same choices, except between distances equal on paper that they round differently
    (duplicated points: which copy), where the libraries' rounding decides.
    """
    xp = namespace(X=X, mask=mask, guarantee_score=guarantee_score)
    check_real_floating(xp, "X", X)
    if X.ndim < 2 or X.shape[-1] == 0:
        raise ValueError(f"X must have shape (..., n, D) with D >= 1, got {tuple(X.shape)}")
    points = tuple(X.shape[:-1])
    for name, a in (("mask", mask), ("guarantee_score", guarantee_score)):
        if a is not None and not per_token(tuple(a.shape), points):
            raise ValueError(f"{name} must broadcast to X's points {points} (..., n), got {tuple(a.shape)}")
    if mask is not None and mask.dtype != xp.bool:
        raise TypeError(f"mask must be a bool array (True = eligible), got {mask.dtype}")
    if guarantee_score is not None:
        # A bool or integer score has no -inf for "not guaranteed": every token counted as guaranteed (a review).
        check_real_floating(xp, "guarantee_score", guarantee_score)
    check_bool("from_guaranteed", from_guaranteed)
    check_int("num_points", num_points, minimum=1)
    check_int("max_guaranteed", max_guaranteed, minimum=0, optional=True)
    if num_points > axis.length(X.shape[-2]):
        raise ValueError(f"num_points={num_points} exceeds the {axis.length(X.shape[-2])} points")
    if mask is not None and not axis.sharded:
        # Reads the mask (on an accelerator, one host synchronisation): the library's own calls skip this.
        xm = array_api_compat.array_namespace(mask)
        fewest = int(xm.min(xm.sum(xm.astype(mask, xm.int64), axis=-1)))
        if fewest < num_points:
            raise ValueError(f"num_points={num_points} exceeds the eligible points of a row of mask ({fewest})")
    return farthest_points(X, num_points, mask=mask, guarantee_score=guarantee_score, max_guaranteed=max_guaranteed,
                           from_guaranteed=from_guaranteed, axis=axis)


def farthest_points(X, num_points, *, mask=None, guarantee_score=None, max_guaranteed=None, from_guaranteed=True,
                    axis=WHOLE):
    """:func:`farthest_point_sampling` for arguments its callers have checked: no check of its own. A row with
    fewer eligible points than ``num_points`` fills the picks left over with position 0, eligible or not (k-means
    seeding asks for ``m`` seeds where singletons left fewer eligible tokens, and drops the extra ones)."""
    xp = array_api_compat.array_namespace(X)
    # Half precision would round the distances (and overflow them past norms of about 250): float32 at least.
    X = at_least_float32(xp, X)
    host = None if axis.sharded else host_view(X)
    if host is None:
        # In units of a power of two (exact): squared norms past the dtype's range would make the distances NaN.
        return _fps_on_device(xp, unit_scaled(xp, X, mask, axis)[0], num_points, mask, guarantee_score,
                              max_guaranteed, from_guaranteed, axis)
    lead, (n, D) = tuple(X.shape[:-2]), tuple(X.shape[-2:])
    points = np.reshape(host, (-1, n, D))
    rows = points.shape[0]
    eligible = (np.ones((rows, n), dtype=bool) if mask is None
                else np.reshape(np.broadcast_to(host_view(mask), (*lead, n)), (rows, n)))
    score = (None if guarantee_score is None
             else np.reshape(np.broadcast_to(host_view(guarantee_score), (*lead, n)), (rows, n)))
    with single_threaded_numpy_blas():
        chosen = np.stack([
            _fps_host(points[r], num_points, eligible[r], None if score is None else score[r], max_guaranteed,
                      from_guaranteed)
            for r in range(rows)
        ])
    return xp.asarray(np.reshape(chosen, (*lead, num_points)), device=array_api_compat.device(X))


# Transposing in blocks that stay in L2 cache is twice as fast as one strided copy (4.6 vs 8.7 ms
# for 65,536 x 64 float32 on one Zen 3 core).
_TRANSPOSE_ROWS = 1024


def _fps_host(X, m, eligible, score, max_guaranteed, from_guaranteed=True):
    """One sequence, ``X (n, D)`` in numpy: the guaranteed points by score, then farthest points."""
    n, D = X.shape
    guaranteed = np.empty(0, dtype=np.int64)
    if score is not None:
        candidates = np.flatnonzero(eligible & (score > -np.inf))
        # Stable sort: equal scores go to the lowest index, as argmax does.
        guaranteed = candidates[np.argsort(-score[candidates], kind="stable")][:max_guaranteed]
    sq_norms = np.einsum("ij,ij->i", X, X)
    # A distance is at most 4 max ||x||^2. Where the eligible points' squared norms leave the dtype's safe range
    # (overflow into inf - inf = NaN past about 1e18 in float32, ties in subnormals below about 1e-16), the points are
    # measured in unit_scaled's units, as the device path always does: every distance scales exactly, the picks stay.
    info = np.finfo(X.dtype)
    largest = np.max(sq_norms, where=eligible, initial=0.0)
    if not (info.smallest_normal / info.eps <= largest <= info.max / 4):
        X = unit_scaled(array_api_compat.array_namespace(X), X, eligible)[0]
        sq_norms = np.einsum("ij,ij->i", X, X)
    # Transposed and augmented, (D + 2, n): one vector-matrix product per step gives
    # ||x_i||^2 - 2 x_i.p + ||p||^2 for every i, streaming the points once in row order.
    augmented = np.empty((D + 2, n), dtype=X.dtype)
    for start in range(0, n, _TRANSPOSE_ROWS):
        augmented[:D, start:start + _TRANSPOSE_ROWS] = X[start:start + _TRANSPOSE_ROWS].T
    augmented[D] = sq_norms
    augmented[D + 1] = 1
    # Unchosen eligible points start at +inf so the first pick is the first eligible point;
    # chosen and ineligible points sit at -inf and are never picked again.
    dist = np.where(eligible, np.inf, -np.inf).astype(X.dtype)
    if not from_guaranteed:
        dist[guaranteed] = -np.inf
    # (-2p, 1, ||p||^2) for the point p of each step, with the squared norm the distances use (as on the device).
    coeff = np.empty(D + 2, dtype=X.dtype)
    coeff[D] = 1
    d_new = np.empty(n, dtype=X.dtype)
    zero = X.dtype.type(0)
    chosen = np.empty(m, dtype=np.int64)
    # Padding rows may hold anything finite: their distances may overflow (and are never used, see fmin below).
    with numpy_overflow_ignored():
        for step in range(m):
            # The method, not np.argmax: its wrapper costs more than the search of a sample's 1,024 distances.
            idx = int(guaranteed[step]) if step < guaranteed.size else int(dist.argmax())
            chosen[step] = idx
            if step == m - 1:
                break
            if step < guaranteed.size and not from_guaranteed:
                continue
            np.multiply(X[idx], -2, out=coeff[:D])
            coeff[D + 1] = sq_norms[idx]
            np.dot(coeff, augmented, out=d_new)
            np.maximum(d_new, zero, out=d_new)
            # fmin, not minimum: an ineligible row (-inf) stays so whatever it holds; an overflowing padding row's
            # NaN distance must not become the farthest point.
            np.fmin(dist, d_new, out=dist)
            dist[idx] = -np.inf
    return chosen


def _fps_on_device(xp, X, num_points, mask, guarantee_score, max_guaranteed, from_guaranteed=True, axis=WHOLE):
    """The same loop in array-API operations, batched, for arrays outside host memory and sharded sequences."""
    n = X.shape[-2]
    device = array_api_compat.device(X)
    sq_norms = xp.sum(X * X, axis=-1)
    eligible = (xp.ones(X.shape[:-1], dtype=xp.bool, device=device) if mask is None
                else xp.broadcast_to(mask, tuple(X.shape[:-1])))  # a mask may broadcast, as on the host
    neg = xp.full((), -float("inf"), dtype=X.dtype, device=device)
    dist = xp.where(eligible, xp.full((), float("inf"), dtype=X.dtype, device=device), neg)
    order = None
    budget = num_points if max_guaranteed is None else min(max_guaranteed, num_points)
    if guarantee_score is not None and budget > 0:
        pending = eligible & (guarantee_score > -float("inf"))
        # Guaranteed points in the host loop's order: highest score first, ties to the lowest index (stable).
        if axis.sharded:
            order = axis.top_k(xp, xp.where(pending, guarantee_score, neg), budget)
        else:
            key = xp.where(pending, -guarantee_score,
                           xp.full((), float("inf"), dtype=guarantee_score.dtype, device=device))
            order = xp.argsort(key, axis=-1, stable=True)[..., :budget]
        count = axis.sum(xp.sum(xp.astype(pending, xp.int64), axis=-1))
        if not from_guaranteed:
            # The guaranteed points are taken in order below and never sampled: out of the distances now.
            taken = xp.arange(budget, device=device) < count[..., None]
            rows, held = axis.local(xp, order, n)
            taken_here = put_where(xp, xp.zeros(dist.shape, dtype=xp.bool, device=device), rows, taken,
                                   None if held is None else held & taken)
            dist = xp.where(taken_here, neg, dist)
    ones = xp.ones_like(sq_norms)
    # Squared distances to a point x as one product: (-2x, 1, |x|^2) . (x_j, |x_j|^2, 1). Each point's row of
    # coefficients is made once, so that a step gathers one row and issues six operations in all: on a GPU the
    # step is launch-bound (about 10 us per operator eager on an H200), not arithmetic-bound.
    augmented = xp.concat([xp.matrix_transpose(X), sq_norms[..., None, :], ones[..., None, :]], axis=-2)
    coefficients = xp.concat([-2 * X, ones[..., None], sq_norms[..., None]], axis=-1)
    width = coefficients.shape[-1]
    chosen = []
    for step in range(num_points):
        idx = axis.argmax(xp, dist)
        guaranteed_step = None
        if order is not None and step < order.shape[-1]:
            guaranteed_step = step < count
            idx = xp.where(guaranteed_step, order[..., step], idx)
        chosen.append(idx)
        if step == num_points - 1:
            break
        rows, held = axis.local(xp, idx[..., None], n)
        if axis.sharded:
            coeff = axis.gather(xp, coefficients, rows, held)
        else:
            coeff = take_along_axis(xp, coefficients, xp.broadcast_to(rows[..., None], (*rows.shape, width)), axis=-2)
        d_new = xp.clip((coeff @ augmented)[..., 0, :], min=0)
        updated = xp.minimum(dist, d_new)
        if guaranteed_step is not None and not from_guaranteed:
            updated = xp.where(guaranteed_step[..., None], dist, updated)
        # The chosen point (where this process holds it) is never picked again.
        dist = put_where(xp, updated, rows, xp.broadcast_to(neg, tuple(rows.shape)), held)
    return xp.stack(chosen, axis=-1)


@dataclass(frozen=True)
class FPS(TokenStrategy, name="fps", sharded=True):
    """Farthest-point sampling over per-token features.

    Parameters
    ----------
    first : int or None
        Token that is always a landmark, counted among the real tokens (``0``: the CLS token of ViTs and BERT,
        also under left padding, which the FNA authors guarantee in their CLIP experiments; negative: from the
        last real token). ``None`` forces none and starts from the first eligible token.
    from_guaranteed : bool
        ``True`` (default): ``first`` starts the sampling, so the farthest points are spread away from it
        too. ``False``: ``first`` stays out of the sampling, which starts at the first other eligible token
        (token 1 when ``first=0``), as the FNA authors' code does.
    use_queries : bool
        Select on the queries with heads averaged (the FNA authors' CLIP recipe, ``sampling_features="q"``)
        instead of ``features`` or the head-averaged keys.

    Notes
    -----
    Features: the head-averaged queries with ``use_queries``; else ``features`` if passed (e.g. the
    layer's input hidden states, the default of the authors' configuration), else the keys with heads
    averaged when shared. Deterministic. Cost :math:`O(n m D)`. :data:`FNA_AUTHORS` is the authors'
    recipe.
    """

    first: int | None = 0
    from_guaranteed: bool = True
    use_queries: bool = False

    def __post_init__(self):
        check_bool("FPS from_guaranteed", self.from_guaranteed)
        check_bool("FPS use_queries", self.use_queries)
        check_int("FPS first", self.first, minimum=None, optional=True)

    def pick(self, selection, X, mask):
        if self.use_queries and not selection.cross:
            X = selection.query_points
        score = first_token_score(selection.xp, X, self.first, mask, selection.axis)
        return farthest_points(X, selection.num_landmarks, mask=mask, guarantee_score=score,
                               from_guaranteed=self.from_guaranteed, axis=selection.axis)

    def pick_queries(self, selection, X):
        """Cross-attention's landmark queries: ``first`` counts among the queries where they have that many, else no
        query is guaranteed, as a row with too few real tokens has none (a review: ``first=5`` with 4 queries and 10
        keys raised "not a token position for n=4", where ``norm`` took the call)."""
        n_q = selection.axis.length(X.shape[-2])
        if self.first is not None and not -n_q <= self.first < n_q:
            return replace(self, first=None).pick(selection, X, None)
        return self.pick(selection, X, None)


FNA_AUTHORS = MappingProxyType({
    "strategy": FPS(first=0, from_guaranteed=False, use_queries=True),
    "solver": NewtonSchulz(iters=6),
})
"""The FNA authors' recipe (Astro-85/fast_nystrom_attention @9363d38, CLIP notebook) as keyword arguments of
:func:`nystrom.approximate` and :func:`nystrom.fna`: FPS on the head-averaged queries, CLS (token 0) always a
landmark and kept out of the sampling, which starts at token 1, and 6 Newton–Schulz steps with the start
scaled per matrix. One landmark set per sequence shared by the heads, chosen once per forward pass, is the
library's default too. Where the defaults depart from it, and why: the docs' landmark page."""


def first_token_score(xp, X, first, mask=None, axis=WHOLE):
    """A guarantee score that is finite (0) at the ``first``-th real token of each row (:func:`first_token`) only, or
    ``None`` when ``first`` is None."""
    if first is None:
        return None
    device = array_api_compat.device(X)
    hit = first_token(xp, X.shape[-2], first, mask, axis, device)
    score = xp.where(hit, xp.full((), 0.0, dtype=X.dtype, device=device),
                     xp.full((), -float("inf"), dtype=X.dtype, device=device))
    return xp.broadcast_to(score, X.shape[:-1])
