r"""Error certificates, estimates and bounds for Nyström approximations.

Three kinds, each derived on the docs' error-bounds page:

* :func:`nystrom_trace_error` — an *exact*, cheap certificate for a symmetric PSD kernel
  :math:`\mathcal K`: the Nyström residual :math:`\mathcal K - \hat{\mathcal K}` is PSD (a Schur
  complement), so its trace norm equals its trace, :math:`\sum_i (\mathcal K_{ii} - \hat{\mathcal K}_{ii})`,
  computable from the :math:`m` landmark columns in :math:`O(n m d + n m^2)`.
* :func:`estimate_relative_error` — an a-posteriori estimate of the relative error of an
  approximate *attention output* from :math:`s` exactly computed query rows, with a confidence
  interval, in :math:`O(s n d)`.
* :func:`best_rank_trace_floor` and :func:`rpcholesky_trace_bound` — a-priori statements in
  terms of the kernel's spectrum: no choice of :math:`m` landmarks beats the tail
  :math:`\sum_{i>m}\lambda_i`, and RPCholesky comes within :math:`(1+\varepsilon)` of a rank-:math:`r`
  tail in expectation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np
import scipy.stats

from .attention import grouped_query_heads, softmax_attention
from .landmarks.base import gather_rows
from .landmarks.kmeans import evenly_spaced
from .landmarks.rpcholesky import exp_kernel_shift
from .numerics import (
    at_least_float32,
    detached,
    float64_numpy,
    quiet_numpy_overflow,
    without_padding,
)
from .solvers import PInv
from .validation import (
    check_attention_inputs,
    check_bool,
    check_finite,
    check_given,
    check_int,
    check_positions,
    check_real,
    check_real_floating,
    check_scale,
    check_seed,
    check_token_mask,
    check_unknown_arguments,
    namespace,
    real_key_counts,
)


@dataclass(frozen=True)
class TraceCertificate:
    r"""Result of :func:`nystrom_trace_error`.

    Attributes
    ----------
    trace_error : array, shape (...)
        :math:`\mathrm{tr}(\mathcal K - \hat{\mathcal K}) = \lVert \mathcal K - \hat{\mathcal K}\rVert_*`,
        in units of :math:`e^{-c}` (``log_scale`` :math:`= c`; see Notes of :func:`nystrom_trace_error`).
    trace : array, shape (...)
        :math:`\mathrm{tr}\,\mathcal K` in the same units.
    relative : array, shape (...)
        ``trace_error / trace``, independent of the units.
    log_scale : array, shape (...)
        :math:`c`; the kernel in its own units is ``exp(log_scale) *`` the values above.
    """

    trace_error: Any
    trace: Any
    relative: Any
    log_scale: Any


def check_points(name: str, X, xp=None):
    """Validate a ``(..., n, D)`` real floating, finite, non-empty array; return its namespace."""
    xp = xp or namespace(**{name: X})
    check_real_floating(xp, name, X)
    if X.ndim < 2 or any(size == 0 for size in X.shape):
        raise ValueError(f"{name} must have shape (..., n, D) with no empty dimension, got {tuple(X.shape)}")
    check_finite(xp, **{name: X})
    return xp


def check_eigenvalues(eigenvalues):
    """Validate a 1-D finite real spectrum; return it as float64 numpy, sorted decreasingly, clipped at 0.

    Small negative values are round-off of a PSD matrix's spectrum and are clipped; a clearly
    negative one (below ``-max(1e-8, n eps)`` times the largest magnitude, ``eps`` of the eigenvalues' own dtype:
    a float32 ``eigvalsh`` rounds at about ``n eps`` of the largest) means the matrix is not PSD.
    """
    dtype = getattr(eigenvalues, "dtype", None)
    # The array library's own dtype tests: numpy's convert the array to numpy first, which a torch tensor that
    # requires grad and an array off the host refuse, and a string test of the dtype missed array_api_strict's bool
    # (reviews). A list is numpy's to judge.
    xp = array_api_compat.array_namespace(eigenvalues) if array_api_compat.is_array_api_obj(eigenvalues) else np
    kind = dtype if dtype is not None else np.asarray(eigenvalues).dtype
    try:
        eps = float(xp.finfo(kind).eps)
    except (TypeError, ValueError, AttributeError):
        eps = float(np.finfo(np.float64).eps)  # a dtype of no floating kind (bool, integers)
    if xp.isdtype(kind, "complex floating"):
        raise TypeError("eigenvalues must be a 1-D array of real numbers, got complex ones")
    if xp.isdtype(kind, "bool"):
        raise TypeError("eigenvalues must be a 1-D array of real numbers, got bools")
    if not xp.isdtype(kind, ("integral", "real floating")):
        # numpy would parse strings ("3" as 3.0, a review) and read objects one by one: numbers only.
        raise TypeError(f"eigenvalues must be a 1-D array of real numbers, got dtype {kind}")
    try:
        lam = float64_numpy(eigenvalues)
    except (TypeError, ValueError):
        raise TypeError(f"eigenvalues must be a 1-D array of real numbers, got {type(eigenvalues).__name__}"
                        f"{'' if dtype is None else f' of dtype {dtype}'}") from None
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contains NaN or infinite values")
    if lam.min() < -max(1e-8, lam.size * eps) * np.abs(lam).max():
        raise ValueError(f"eigenvalues must be those of a PSD matrix (>= 0), got minimum {lam.min():.3g}")
    return np.sort(np.clip(lam, 0, None))[::-1]


def check_spectrum_rank(num_landmarks, size):
    """Validate the landmark count of a spectrum bound: ``1 <= num_landmarks <= size`` (its eigenvalues)."""
    m = check_int("num_landmarks", num_landmarks, minimum=1)
    if m > size:
        raise ValueError(f"num_landmarks must be at most the number of eigenvalues ({size}), got {m}")
    return m


def exp_kernel(xp, X, Y, scale, shift):
    r"""The shifted exponential kernel :math:`\kappa_{ij} = \exp(\tau\, x_i^\top y_j - c)`.

    Parameters
    ----------
    xp
        Array namespace.
    X : array, shape (..., n, D)
    Y : array, shape (..., p, D)
    scale : float
        :math:`\tau`.
    shift : array, shape (...)
        :math:`c`, see :func:`nystrom.linalg.landmarks.rpcholesky.exp_kernel_shift`.

    Returns
    -------
    array, shape (..., n, p)
    """
    return xp.exp(scale * (X @ xp.matrix_transpose(Y)) - shift[..., None, None])


def nystrom_trace_error(X, indices, *, scale=None):
    r"""Exact trace-norm error of the Nyström approximation of the kernel :math:`\exp(\tau\, x_i^\top x_j)`.

    .. math::

        \hat{\mathcal K} = C W^+ C^\top,\quad C = \mathcal K[:, S],\ W = \mathcal K[S, S],\qquad
        \lVert \mathcal K - \hat{\mathcal K}\rVert_* = \sum_i \bigl(\mathcal K_{ii} - c_i^\top W^+ c_i\bigr)

    where :math:`c_i^\top` is row :math:`i` of :math:`C`. The equality holds because the residual is
    the Schur complement :math:`\mathcal K / W \succeq 0`. It also bounds the spectral and
    Frobenius errors: :math:`\lVert\cdot\rVert_2 \le \lVert\cdot\rVert_F \le \lVert\cdot\rVert_*`.

    Parameters
    ----------
    X : array, shape (..., n, D)
        Points; for attention keys the kernel is the unnormalised attention kernel of the keys.
    indices : int array, shape (..., m)
        Landmark positions :math:`S`.
    scale : float, optional
        :math:`\tau`, default ``1/sqrt(D)``.

    Returns
    -------
    TraceCertificate

    Notes
    -----
    The kernel is evaluated as :math:`e^{\tau x_i^\top x_j - c}` with
    :math:`c = \tau\max_i\lVert x_i\rVert^2`, so that every entry is at most 1 (Cauchy–Schwarz) and never
    overflows; the relative error does not depend on :math:`c`. It is exact up to rounding, with a floor of about
    :math:`\varepsilon\,\mathrm{cond}(W)` times the trace (docs' bounds page). :math:`W^+` is an SVD
    pseudo-inverse with cutoff :math:`m\,\varepsilon_{\text{dtype}}` (directions below it are
    numerically in the null space, where the residual is counted in full). Cost
    :math:`O(n m D + n m^2 + m^3)`, memory :math:`O(n m)`.
    """
    xp = namespace(X=X, indices=indices)
    check_points("X", X, xp)
    if indices.ndim < 1 or indices.shape[-1] == 0 or tuple(indices.shape[:-1]) != tuple(X.shape[:-2]):
        raise ValueError(f"indices must have shape {tuple(X.shape[:-2]) + ('m',)} with m >= 1, got "
                         f"{tuple(indices.shape)}")
    check_positions(xp, "indices", indices, X.shape[-2], "X")
    tau = check_scale(scale, X.shape[-1])
    # The kernel and its SVD in float32 at least: no SVD takes half precision, and exp(tau x.y) needs the range.
    X = at_least_float32(xp, X)
    shift = exp_kernel_shift(xp, X, tau)
    landmarks = gather_rows(xp, X, indices)
    C = exp_kernel(xp, landmarks, X, tau, shift)  # (..., m, n)
    W = exp_kernel(xp, landmarks, landmarks, tau, shift)
    eps = float(np.finfo(np.float64 if X.dtype == xp.float64 else np.float32).eps)
    W_pinv = PInv(rtol=W.shape[-1] * eps).solve(W).inverse
    diag = xp.exp(tau * xp.sum(X * X, axis=-1) - shift[..., None])
    diag_hat = xp.sum(C * (xp.astype(W_pinv, C.dtype) @ C), axis=-2)
    error = xp.sum(xp.clip(diag - diag_hat, min=0), axis=-1)
    trace = xp.sum(diag, axis=-1)
    return TraceCertificate(error, trace, error / trace, shift)


@dataclass(frozen=True)
class ErrorEstimate:
    r"""Result of :func:`estimate_relative_error`.

    Attributes
    ----------
    estimate : float
        Estimated :math:`\lVert \hat O - O\rVert_F / \lVert O\rVert_F`.
    low, high : float
        Confidence interval for it at level ``confidence``.
    confidence : float
    num_samples : int
        Query rows computed exactly.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    num_samples: int


@quiet_numpy_overflow
def estimate_relative_error(Q, K, V, approx, *, num_samples=128, confidence=0.95, seed=None, scale=None,
                            attn_mask=None, query_mask=None, enable_gqa=False, **unknown):
    r"""Estimate the relative Frobenius error of an approximate attention output from sampled rows.

    The query positions are split into :math:`s` contiguous strata of near-equal size :math:`N_h`, and one
    position is drawn uniformly from each (:func:`stratified_rows`); those rows are computed exactly. With
    :math:`e_i = \sum_{\text{batch}}\lVert \hat O_i - O_i\rVert^2` and
    :math:`o_i = \sum_{\text{batch}}\lVert O_i\rVert^2`, the squared relative error
    :math:`R = \sum_i e_i / \sum_i o_i` is estimated by

    .. math:: \hat R = \frac{\sum_h N_h e_h}{\sum_h N_h o_h},

    with a collapsed-strata variance and a log-scale Student interval (:func:`ratio_interval`). The
    function reports square roots, i.e. an estimate and interval for
    :math:`\lVert\hat O - O\rVert_F/\lVert O\rVert_F`. With :math:`s = n_q` the estimate is exact and the
    interval has width 0. Strata follow the sequence order, so neighbouring tokens (an image region, a
    span of text), whose errors are alike, are all represented.

    Parameters
    ----------
    Q, K, V : arrays, shapes (..., n_q, d), (..., n, d), (..., n, d_v)
    approx : array, shape (..., n_q, d_v)
        The approximate output to assess.
    num_samples : int
        :math:`s`, clipped to :math:`n_q`; at least 2.
    confidence : float
        Level of the interval, in (0, 1).
    seed : int, optional
        Seed of the row sample.
    scale : float, optional
    attn_mask : array, optional
        Key mask, as :func:`nystrom.approximate` takes it. For self-attention (``n_q == n``) the padded
        positions are padded queries too: only real query rows are sampled, and the error is that of the
        real rows (:math:`e_i` and :math:`o_i` sum over the sequences in which row :math:`i` is real,
        :math:`n_q` counts the positions real in some sequence); ``approx`` may hold anything at the padded
        rows, NaN included.
    query_mask : bool or 0/1 array, shape (..., n_q), optional
        The real query rows, in place of the rule above: for cross-attention whose query and key lengths happen to
        be equal, pass it (all ``True`` where every query is real), or the rows at padded keys are left out as
        padded queries (a review: an error of 1.21 estimated as 0 with an interval of width 0).
    enable_gqa : bool
        SDPA's grouped-query attention, as :func:`nystrom.approximate` takes it: ``K`` and ``V`` with fewer heads than
        ``Q``, repeated to its heads.

    Returns
    -------
    ErrorEstimate

    Notes
    -----
    The coverage is asymptotic in :math:`s`. Row errors of Nyström attention are heavy-tailed
    (rows near landmarks are almost exact, isolated rows far off), and small samples under-cover. The
    coverage measured on synthetic and real attention at :math:`s` = 64, 128 and 256 is on the docs'
    error-bounds page (``python -m nystrom.experiments.coverage_report``), and ``tests/linalg/test_bounds.py``
    pins it. This function assesses any approximation and knows no landmarks: the rows of largest interpolation
    weights, which ``Info.estimate_error`` of a Nyström output takes with certainty as well
    (:func:`interpolation_census`), are left to the strata here, where on sharply clustered tokens the interval
    covered 79.8 % at :math:`s = 128` against 93.2 % with them. Use :math:`s \ge 128` where the interval matters.
    Under ``torch.autocast`` the exact rows take autocast's dtype here (array-API code, run as the array library
    runs it); :func:`nystrom.estimate_relative_error` and ``Info.estimate_error`` compute them in the inputs'
    precision.
    """
    check_unknown_arguments("estimate_relative_error", unknown)
    if check_bool("enable_gqa", enable_gqa):
        K, V = grouped_query_heads(Q, K, V)
    xp, keys = check_attention_inputs(Q, K, V, attn_mask, no_values_hint="the estimate computes exact rows of the "
                                      "data: pass tensors that hold values")
    check_given(approx=approx)
    namespace(Q=Q, approx=approx)
    tau = check_scale(scale, Q.shape[-1])
    if tuple(approx.shape) != (*Q.shape[:-1], V.shape[-1]):
        raise ValueError(f"approx must have shape {(*Q.shape[:-1], V.shape[-1])}, got {tuple(approx.shape)}")
    check_real_floating(xp, "approx", approx)
    if query_mask is not None:
        namespace(Q=Q, query_mask=query_mask)
        queries = check_token_mask(xp, query_mask, tuple(Q.shape[:-1]), "query_mask")
    else:
        queries = None if keys is None or Q.shape[-2] != K.shape[-2] else keys
    check_finite(xp, approx=approx if queries is None else xp.where(
        queries[..., None], approx, xp.zeros((), dtype=approx.dtype, device=array_api_compat.device(approx))))
    K, V = without_padding(xp, keys, K, V)
    return sampled_relative_error(xp, Q, K, V, approx, **check_sampling(num_samples, confidence, seed), scale=tau,
                                  keys=keys, queries=queries)


def check_sampling(num_samples, confidence, seed) -> dict:
    """Validate the sampling settings of :func:`estimate_relative_error`; return them as keyword arguments."""
    num_samples = check_int("num_samples", num_samples, minimum=2)
    confidence = check_real("confidence", confidence)
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return {"num_samples": num_samples, "confidence": confidence, "seed": check_seed(seed)}


def sampled_relative_error(xp, Q, K, V, approx, *, num_samples, confidence, seed, scale, keys=None, queries=None):
    """:func:`estimate_relative_error` for checked arguments (no checks of its own); ``keys (..., n)`` is the
    checked key mask, and the rows of ``K`` and ``V`` at padded keys are zero; ``queries (..., n_q)``, where given,
    the real query rows (:func:`query_positions`)."""
    sample = sample_rows(xp, Q, K, V, num_samples=num_samples, seed=seed, scale=scale, keys=keys, queries=queries)
    return sample.estimate(xp.take(approx, sample.at, axis=-2), confidence)


@dataclass(frozen=True)
class RowSample:
    """Exact attention rows of a stratified sample of query positions, reusable for any approximation of the
    same attention (``approximate(tol=...)`` assesses every m it tries on one sample).

    Attributes
    ----------
    rows : int ndarray, shape (s,)
        Sampled query positions (:func:`census_and_strata`).
    at : int array, shape (s,)
        The same positions as an index array of the inputs' library, on their device.
    sizes : float ndarray, shape (s,)
        Positions each sampled row stands for.
    weight : float or bool ndarray, shape (B, s)
        1, or for padded self-attention which of the flattened batch rows are real at each position.
    exact : float64 ndarray, shape (..., s, d_v)
        Exact attention output at the sampled rows.
    certain : bool ndarray, shape (s,), or None
        Rows taken with certainty (the high-norm and self-attending queries, :func:`outlying_queries`, and a census,
        :meth:`with_census`): they stand for themselves and add nothing to the variance. ``None``: none.
    strata : tuple of int ndarrays ``(order, edges)``
        The positions each drawn (not certain) row was drawn from, in the order of those rows: the :math:`h`-th from
        ``order[edges[h]:edges[h + 1]]`` (:func:`census_and_strata`).
    real : bool ndarray, shape (B, n_q), or None
        Which flattened batch rows are real at each position (:func:`query_positions`); ``None``: all.
    rng : numpy.random.Generator, optional
        The generator of the draw, for the rows :meth:`with_census` draws again.
    exact_rows : callable, optional
        ``exact_rows(at)``: the exact output at the positions ``at`` (an index array of the inputs' library), float64,
        shaped as :attr:`exact` with ``len(at)`` rows (:meth:`with_census`).
    """

    rows: Any
    at: Any
    sizes: Any
    weight: Any
    exact: Any
    certain: Any = None
    strata: Any = None
    real: Any = None
    rng: Any = None
    exact_rows: Any = field(default=None, repr=False, compare=False)

    def estimate(self, approx_rows, confidence) -> ErrorEstimate:
        """The :class:`ErrorEstimate` of an approximation from its output at these rows, ``approx_rows (..., s, d_v)``
        (:func:`ratio_interval`)."""
        s = self.rows.size
        # In units of the largest exact entry (the ratio does not change): squares of outputs near 1e-170 or 1e160
        # would underflow to a claimed exact 0, or overflow to NaN.
        unit = float(np.max(np.abs(self.exact), initial=0.0)) or 1.0
        exact = self.exact / unit
        approx = float64_numpy(approx_rows)
        if not isinstance(self.weight, float):
            # A padded query row may hold anything, infinities included (its inputs may): out of both sums.
            approx = np.where(np.reshape(self.weight, approx.shape[:-1])[..., None], approx, 0.0)
        diff = approx / unit - exact
        # The differences in units of their own largest (the interval scales with them: its square roots are
        # multiplied back): an approximation of 1e170 against exact rows near 1 would square to inf (low = NaN).
        differences = float(np.max(np.abs(diff), initial=0.0))
        differences = differences if 0 < differences < math.inf else 1.0
        diff = diff / differences
        # Per sampled position, summed over the batch/head dimensions (over the sequences where it is real).
        e = ((diff * diff).sum(axis=-1).reshape(-1, s) * self.weight).sum(axis=0)
        o = ((exact * exact).sum(axis=-1).reshape(-1, s) * self.weight).sum(axis=0)
        ratio, low, high = ratio_interval(e, o, self.sizes, confidence, certain=self.certain)
        return ErrorEstimate(estimate=differences * math.sqrt(ratio), low=differences * math.sqrt(low),
                             high=differences * math.sqrt(high), confidence=confidence, num_samples=s)

    def with_census(self, census, group=None, group_rows=0):
        r"""This sample with the positions ``census`` (int ndarray) taken with certainty as well, and the positions
        ``group`` in strata of their own.

        Each stratum loses the census positions it held and stands for the rest, :math:`N_h' = |P_h \setminus C|`.
        Its drawn row, uniform over :math:`P_h`, is uniform over :math:`P_h \setminus C` where it is not in the
        census, and is kept; where it is, a row is drawn again from :math:`P_h \setminus C` (about
        :math:`s|C|/n_q` of them); a stratum that the census takes whole is gone. The estimator stays that of a
        stratified sample (:func:`ratio_interval`), with up to :math:`s` strata and :math:`|C|` more rows. (Where the
        high-norm queries had strata of their own, a stratum of theirs taken whole can leave an odd number of them,
        and one collapsed pair then mixes the two groups: a wider interval, not a biased one.) A ``group`` leaves the
        strata in the same way; where it holds at most ``group_rows`` positions they are taken with certainty, else
        ``group_rows`` contiguous strata of it (in sequence order) draw one row each: the group is sampled at
        ``group_rows`` over its size instead of the sample's :math:`s/n_q`, and never below that (``group_rows`` is
        raised to the group's share of the strata). Exact rows computed: the census, the group's rows, and one for
        each stratum whose drawn row fell in either (drawn again).

        Parameters
        ----------
        census : int ndarray
            Query positions, among those the sample draws from; :attr:`exact_rows` computes those it lacks, and the
            rows drawn, in one call.
        group : int ndarray, optional
            Query positions, as ``census``, to stratify apart (:func:`unrepresented_queries`).
        group_rows : int
            The rows the group takes.

        Returns
        -------
        RowSample
        """
        certain = np.zeros(self.rows.size, dtype=bool) if self.certain is None else self.certain
        census = np.setdiff1d(census, self.rows[certain])
        group = census[:0] if group is None else np.setdiff1d(group, np.concatenate([self.rows[certain], census]))
        order, edges = self.strata
        # Never sampled more thinly than the strata it leaves: a group of most positions took the place of strata
        # whose rows it removed, with fewer rows than they had (a review: 80 rows in all against 144).
        group_rows = max(group_rows, -(-group.size * (edges.size - 1) // max(order.size, 1)))
        if group.size <= group_rows:
            census, group = np.union1d(census, group), group[:0]
        if not census.size and not group.size:
            return self
        outside = ~np.isin(order, np.concatenate([census, group]))
        # Per stratum, the positions left outside the census and the group; a stratum left with none is gone.
        left = np.add.reduceat(outside.astype(np.int64), edges[:-1]) if edges.size > 1 else np.zeros(0, np.int64)
        rows = self.rows[~certain]
        for h in np.flatnonzero(~np.isin(rows, order[outside]) & (left > 0)):
            rest = order[edges[h]:edges[h + 1]][outside[edges[h]:edges[h + 1]]]
            rows[h] = rest[int(self.rng.random() * rest.size)]
        rows, sizes, order = rows[left > 0], left[left > 0], order[outside]
        if group.size:
            group_edges = split_edges(group.size, group_rows)
            drawn, _ = draw_strata(group, group_edges, self.rng)
            rows, sizes, order = (np.concatenate([rows, drawn]), np.concatenate([sizes, np.diff(group_edges)]),
                                  np.concatenate([order, group]))
        fixed = int(certain.sum()) + census.size
        positions = np.concatenate([self.rows[certain], census, rows])
        # The exact rows of the positions this sample lacks, in one call; each position's index among all known.
        missing = np.setdiff1d(positions, self.rows)
        known = np.concatenate([self.rows, missing])
        exact = self.exact
        if missing.size:
            fresh = self.zero_padded(self.exact_rows(self.index_array(missing)), missing)
            exact = np.concatenate([exact, fresh], axis=-2)
        index = np.argsort(known, kind="stable")[np.searchsorted(np.sort(known, kind="stable"), positions)]
        return RowSample(
            rows=positions, at=self.index_array(positions), sizes=np.concatenate([np.ones(fixed), sizes]),
            weight=1.0 if self.real is None else self.real[:, positions], exact=exact[..., index, :],
            certain=np.arange(positions.size) < fixed,
            strata=(order, np.concatenate([[0], np.cumsum(sizes)])),
            real=self.real, rng=self.rng, exact_rows=self.exact_rows)

    def zero_padded(self, exact, positions):
        """``exact`` rows at ``positions``, zero at the padded query rows, whose queries may overflow the logits."""
        if self.real is None:
            return exact
        return np.where(np.reshape(self.real[:, positions], exact.shape[:-1])[..., None], exact, 0.0)

    def index_array(self, positions):
        """``positions`` as an index array of the inputs' library, on their device."""
        return array_api_compat.array_namespace(self.at).asarray(positions, device=array_api_compat.device(self.at))


def query_positions(Q, K, keys=None, queries=None):
    """``(real, positions)``: which flattened batch rows are real at each query position (bool ``(B, n_q)``, ``None``
    for all) and the positions real in some row, those the row sample draws from: ``queries (..., n_q)`` where given,
    else, for self-attention with a key mask, the real keys (a padded key is a padded query, whose output nobody
    reads). Reads the mask (one host read)."""
    n_q = Q.shape[-2]
    if queries is None and (keys is None or n_q != K.shape[-2]):
        return None, np.arange(n_q)
    real = np.broadcast_to(float64_numpy(keys if queries is None else queries) > 0,
                           tuple(Q.shape[:-1])).reshape(-1, n_q)
    return real, np.flatnonzero(real.any(axis=0))


def sample_rows(xp, Q, K, V, *, num_samples, seed, scale, keys=None, attend=None, queries=None) -> RowSample:
    r"""Draw :func:`stratified_rows` among the real query positions and compute their exact attention, for checked
    arguments; ``keys (..., n)`` is the checked key mask, and the rows of ``K`` and ``V`` at padded keys are zero
    (:func:`~nystrom.linalg.numerics.without_padding`). Cost :math:`O(s\, n\, d)` per batch element.

    ``attend(q, k, v, mask)`` computes the rows' attention, as :func:`~nystrom.linalg.attention.nystrom_product`
    takes it (default :func:`~nystrom.linalg.attention.softmax_attention`; the torch backend's fused kernel took
    5.0 against 8.3 ms for 128 rows of DINOv2-S layer 7 at (1, 6, 1370, 64) on one thread)."""
    real, positions = query_positions(Q, K, keys, queries)
    num_samples = min(num_samples, positions.size)
    census = outlying_queries(xp, Q, K, positions, num_samples, scale, keys, real)
    rng = np.random.default_rng(seed)
    rows, sizes, certain, strata = census_and_strata(positions, census, num_samples, rng)
    at = xp.asarray(rows, device=array_api_compat.device(Q))
    mask = None if keys is None else keys[..., None, :]
    if attend is None:
        attend = functools.partial(softmax_attention, xp, scale=scale)

    def exact_rows(at):
        return float64_numpy(attend(xp.take(Q, at, axis=-2), K, V, mask))

    sample = RowSample(rows, at, sizes, 1.0 if real is None else real[:, rows], None, certain, strata, real, rng,
                       exact_rows)
    return dataclasses.replace(sample, exact=sample.zero_padded(exact_rows(at), rows))


def strata_of(positions, outlying, num_samples):
    """``(certain, order, edges)``: the positions taken with certainty and the strata of a sample of ``num_samples``
    among ``positions``, stratum :math:`h` holding ``order[edges[h]:edges[h + 1]]`` (:func:`census_and_strata`)."""
    # Even, so that the collapsed pairs of ratio_interval stay within one group.
    half = 2 * (num_samples // 4)
    if not outlying.size or not half:
        # Fewer than 4 rows leave them no half of their own: strata of every position, theirs among them (a review:
        # with 2 or 3 rows they had no stratum at all, and the estimate left them out, 0 with an interval of width 0).
        return positions[:0], positions, split_edges(positions.size, num_samples)
    rest = np.setdiff1d(positions, outlying, assume_unique=True)
    if outlying.size > half:
        drawn = min(rest.size, num_samples - half)
        return (positions[:0], np.concatenate([outlying, rest]),
                np.concatenate([split_edges(outlying.size, num_samples - drawn),
                                split_edges(rest.size, drawn, outlying.size)[1:]]))
    return outlying, rest, split_edges(rest.size, num_samples - outlying.size)


def split_edges(count, parts, offset=0):
    r"""Edges of ``parts`` contiguous strata of near-equal size over ``count`` positions from ``offset``:
    :math:`\text{edges}_h = \text{offset} + \lfloor h N/s\rfloor`."""
    return offset + (np.arange(parts + 1) * count) // max(parts, 1)


def draw_strata(order, edges, rng):
    """One position drawn uniformly from each stratum ``order[edges[h]:edges[h + 1]]``: ``(rows, sizes)``."""
    sizes = np.diff(edges)
    return order[edges[:-1] + (rng.random(sizes.size) * sizes).astype(np.int64)], sizes.astype(np.float64)


def census_and_strata(positions, outlying, num_samples, rng):
    """The rows of a sample of ``num_samples`` among ``positions``, of which the ``outlying`` ones
    (:func:`outlying_queries`) are apart: when they are at most half the sample, all of them with certainty and
    :func:`stratified_rows` of the others; when more, strata of their own, which take half the sample, and strata of
    the others, the other half; below 4 rows, strata of all positions. Never some of them with certainty and the rest
    among the others, where they would be rarer still (a review: 21 % coverage with 8 of 10 taken at 64 rows).
    Returns ``(rows, sizes, certain, strata)``; ``certain`` marks the rows taken with certainty (``None`` without any),
    each of size 1, and ``strata = (order, edges)`` holds the positions the other rows were drawn from, the
    :math:`h`-th of them from ``order[edges[h]:edges[h + 1]]`` (:func:`strata_of`)."""
    certain, order, edges = strata_of(positions, outlying, num_samples)
    rows, sizes = draw_strata(order, edges, rng)
    if not certain.size:
        return rows, sizes, None, (order, edges)
    return (np.concatenate([certain, rows]), np.concatenate([np.ones(certain.size), sizes]),
            np.arange(num_samples) < certain.size, (order, edges))


#: A query whose norm is at least this many times the median query norm is sampled apart by the row sample
#: (:func:`high_norm_queries`, :func:`census_and_strata`). At 3 (before 2026-12-02), 16 of 1,024 queries of 2.9
#: times the median norm, each aimed at one key, were left to the draw: a 95 % interval covered 43-64 % from 64 and
#: 128 rows, and tol answers missed in 8 of 14 calls (a review); at 2, 94-99 % (docs' error-bounds page).
HIGH_NORM_RATIO = 2.0


def outlying_queries(xp, Q, K, positions, num_samples, scale, keys=None, real=None):
    """The query positions a row sample of ``num_samples`` takes apart (:func:`census_and_strata`), in order: the
    :func:`high_norm_queries` and the :func:`self_attending_queries`, whose arguments these are."""
    return np.union1d(high_norm_queries(xp, Q, positions, num_samples, real),
                      self_attending_queries(xp, Q, K, positions, num_samples, scale, keys, real))


def high_norm_queries(xp, Q, positions, num_samples, real=None):
    r"""The query positions the row sample takes apart (:func:`census_and_strata`): those whose norm (the largest over
    the batch and heads) is positive and at least :data:`HIGH_NORM_RATIO` times the median over ``positions`` (none
    when every position is sampled anyway). ``real`` (flattened leading dimensions by :math:`n_q`, bool) marks the
    rows whose norms count: a padded query row, which may hold anything, never makes its position outlying.

    A few high-norm queries (a ViT's artifact tokens, a sink's query) can carry most of the error: their softmax
    is the sharpest, and the landmarks stand least for what they attend to. Drawn at random among :math:`n_q`,
    they are in the sample or not, and the interval of the ratio estimate, which assumes errors spread over the
    strata, under-covered (a review measured 70 % at 64 rows and 91 % at 128 for a 95 % interval, with 10 of 512
    queries scaled by 4 holding 83 % of the squared error). Computed with certainty they add no variance; where
    they are too many for that, strata of their own with half the sample give them their weight (with 60 of 600
    queries scaled by 4, a review measured 84-89 % coverage when they were drawn among the others).
    """
    if num_samples >= positions.size:
        return np.empty(0, dtype=np.int64)
    norms = float64_numpy(xp.sqrt(xp.sum(at_least_float32(xp, Q) ** 2, axis=-1)))
    norms = np.reshape(norms, (-1, Q.shape[-2]))
    if real is not None:
        norms = np.where(real, norms, 0.0)
    norms = np.max(norms, axis=0)[positions]
    # Positive norms only: where most queries are zero (a median of 0) the zero ones are no outliers.
    return positions[np.flatnonzero((norms >= HIGH_NORM_RATIO * np.median(norms)) & (norms > 0))]


#: Keys per sequence behind :func:`self_attending_queries`, whatever the sample's rows: with 64 (a sample of 64 rows
#: once read as many), the noise of the estimated attention mass flagged 52 instead of 18 of DINOv2-S's 1,370
#: queries in a layer, and taking them apart cost coverage elsewhere (coverage report at 64 rows: DINOv2-S layer 11
#: with ``norm`` 91.9 against 92.6 %, layer 9 91.5 against 93.9 %).
SELF_ATTENTION_KEYS = 128


def self_attending_queries(xp, Q, K, positions, num_samples, scale, keys=None, real=None):
    r"""For self-attention, the query positions whose own key takes more than half of their attention, estimated from
    :math:`s` = :data:`SELF_ATTENTION_KEYS` evenly spaced real keys of each sequence: where, in some batch row,

    .. math:: \tau\, q_i \cdot k_i \;>\; \log \frac{n_v}{s_v} \sum_{j \in S,\, j \neq i} e^{\tau q_i \cdot k_j},

    :math:`S` the :math:`s_v = \min(n_v, s)` sampled keys of the row's :math:`n_v` real keys, each standing for
    :math:`n_v / s_v` of them (every real key where they are at most :math:`s`: the test is then exact). The row
    sample takes these queries apart with the high-norm ones (:func:`census_and_strata`), once, whatever the
    approximation it assesses. Such a query's exact output is about its own value row, of full norm, where the others
    average many rows: a few of them can hold most of :math:`\sum_i \lVert o_i\rVert^2`, the denominator of the
    ratio, and most of its numerator where no landmark stands for them. On isolated tokens among tight clusters (10 of
    1,024, 57 % of the denominator) the 95 % interval covered 52-68 % at 128 rows without them, its misses above the
    truth where the draw left them out (docs' error-bounds page). No position for cross-attention (``Q`` and ``K`` of
    different lengths) or where every position is sampled anyway. Time :math:`O(n\, s\, d)` per batch element.

    Parameters
    ----------
    xp
        Array namespace.
    Q, K : arrays, shapes (..., n, d)
        Padded rows of ``K`` zeroed.
    positions : int ndarray
        The positions the sample draws from (:func:`query_positions`).
    num_samples : int
        The rows of the sample (none are flagged where it holds every position).
    scale : float
    keys : bool array, shape (..., n), optional
        The key mask.
    real : bool ndarray, shape (B, n), optional
        The real query rows (:func:`query_positions`): the others never count.

    Returns
    -------
    int ndarray
        The positions, among ``positions``, in order.
    """
    n = K.shape[-2]
    if Q.shape[-2] != n or num_samples >= positions.size:
        return positions[:0]
    device = array_api_compat.device(K)
    lead = tuple(K.shape[:-1])
    mask = None if keys is None else xp.broadcast_to(keys, lead)
    rows, picked, _ = evenly_spaced(xp, lead, min(SELF_ATTENTION_KEYS, n), mask, device)
    rows = xp.broadcast_to(rows, (*lead[:-1], rows.shape[-1]))
    # Each sampled key stands for n_v / s_v keys of its sequence: the log of that, a bias on its logit.
    if mask is None:
        bias = xp.full((*lead[:-1], 1, rows.shape[-1]), math.log(n / rows.shape[-1]), dtype=xp.float32,
                       device=device)
    else:
        count = xp.astype(real_key_counts(xp, mask), xp.float32)[..., None]
        sampled = xp.astype(real_key_counts(xp, picked), xp.float32)[..., None]
        bias = xp.where(picked, xp.log(count / xp.maximum(sampled, xp.ones_like(sampled))),
                        xp.full((), -math.inf, dtype=xp.float32, device=device))[..., None, :]
    sample = gather_rows(xp, K, rows)
    # The sampled keys' own queries have their own key in that sum, n_v / s_v times: those rows again, the s sampled
    # queries over the s sampled keys with the own one masked. log 0 = -inf where a row has no other real key.
    own = xp.arange(rows.shape[-1], device=device)
    without_own = xp.where(own[:, None] == own[None, :], xp.full((), -math.inf, dtype=xp.float32, device=device),
                           xp.zeros((), dtype=xp.float32, device=device))
    with np.errstate(divide="ignore"):
        gaps = landmark_logit_reads(xp, Q, sample, bias, scale, K=K)[1]
        again = landmark_logit_reads(xp, gather_rows(xp, Q, rows), sample, bias + without_own, scale, K=sample)[1]
    # The sampled rows and which are real picks, over the queries' batch rows (K may have fewer heads: one for MQA).
    lead_q = (*Q.shape[:-2], again.shape[-1])
    rows = np.broadcast_to(float64_numpy(rows).astype(np.int64), lead_q).reshape(again.shape)
    held = (np.ones(again.shape, dtype=bool) if picked is None
            else np.broadcast_to(float64_numpy(picked) > 0, lead_q).reshape(again.shape))
    batch = np.broadcast_to(np.arange(again.shape[0])[:, None], again.shape)
    gaps[batch[held], rows[held]] = again[held]
    flagged = positions_outweighed(gaps, False, rows.shape[-1], real)
    return flagged[np.isin(flagged, positions)]


#: A row sample of :math:`s` rows takes the :math:`\lfloor s/8\rfloor` query rows of largest interpolation weights
#: (:func:`interpolation_weight_norms`) with certainty as well, where it assesses a Nyström approximation
#: (:func:`interpolation_census`). In a replay of 34 families (certain rows among the s, 400 seeds), 1/16 and 1/12 of
#: the rows left a family at 92.5 and 92.2 % coverage of a 95 % interval at 128 rows, 1/6 and 1/8 none below 93.2 %
#: (docs' error-bounds page): 1/8 is the fewest rows with none below 93 %.
CENSUS_SHARE = 8

#: Entries of the logits of one block of :func:`interpolation_weight_norms` (queries x landmarks over the batch): its
#: float32 intermediates stay near 64 MiB each, whatever the batch.
CENSUS_BLOCK = 2**24


def interpolation_weight_norms(xp, Q, keys, bias, inverse, scale, real=None):
    r"""Per query position, :math:`\sum_{\text{batch}}\lVert w_i\rVert^2` with :math:`w_i = F_i A^+`, the weights
    by which the Nyström output :math:`\hat o_i = w_i (BV)` combines the landmark rows :math:`BV`.

    :math:`F_i = \mathrm{softmax}(\tau q_i \tilde k^\top + \log c)` is the query's attention over the landmark
    keys and :math:`A^+` the solver's pseudo-inverse. Where :math:`q_i` is like a landmark query, :math:`w_i` is
    near a unit vector; where the query's attention mixes landmarks that :math:`A^+` pulls apart, its weights are
    large and cancel, and an error in :math:`BV` reaches the output amplified: on sharply clustered tokens the ten
    rows of largest squared error (41 % of it) ranked 1-9 and 13 of 1,024 by this norm (docs' error-bounds page).
    Time :math:`O(n_q m (d + m))` per batch element, in blocks of queries of :data:`CENSUS_BLOCK` logits.

    Parameters
    ----------
    xp
        Array namespace.
    Q : array, shape (..., n_q, d)
    keys : array, shape (..., m, d)
        The landmark keys :math:`\tilde k`.
    bias : array, shape (..., 1, m), or None
        :math:`\log c`.
    inverse : array, shape (..., m, m)
        :math:`A^+`.
    scale : float
    real : bool ndarray, shape (B, n_q), optional
        The real query rows (:func:`query_positions`): the others count 0.

    Returns
    -------
    float64 ndarray, shape (n_q,)
    """
    return summed_weight_norms(landmark_logit_reads(xp, Q, keys, bias, scale, inverse=inverse)[0], real)


def landmark_logit_reads(xp, Q, keys, bias, scale, inverse=None, K=None):
    r"""What a census reads of the landmark logits :math:`l_i = \tau q_i \tilde k^\top + \log c`, in one pass over
    blocks of :data:`CENSUS_BLOCK` logits: ``(norms, gaps)``, float64 of shape (flattened batch rows, :math:`n_q`),
    ``None`` where not asked for.

    ``norms`` (with ``inverse``, :math:`A^+`): :math:`\lVert \mathrm{softmax}(l_i) A^+\rVert^2`
    (:func:`interpolation_weight_norms`); ``gaps`` (with ``K`` of as many rows as ``Q``, self-attention as
    :func:`query_positions` takes it; otherwise ``None``): :math:`\tau q_i\cdot k_i - \log\sum_j e^{l_{ij}}`
    (:func:`unrepresented_queries`). Both in the inverse's precision, float32 or wider."""
    n_q = Q.shape[-2]
    if K is not None and K.shape[-2] != n_q:
        K = None
    dtype = at_least_float32(xp, detached(inverse if inverse is not None else Q)).dtype
    # The scale on the m landmark keys, not on the n_q x m block, whose other passes are in place: each pass over it
    # costs about as much as the product that makes it.
    k = scale * xp.astype(detached(keys), dtype)
    inverse = None if inverse is None else xp.astype(detached(inverse), dtype)
    rows = max(1, CENSUS_BLOCK // (math.prod(Q.shape[:-2]) * k.shape[-2]))
    norms, gaps = [], []
    for start in range(0, n_q, rows):
        # The stop within the axis: the array API leaves slices past it unspecified.
        stop = min(start + rows, n_q)
        q = xp.astype(detached(Q[..., start:stop, :]), dtype, copy=False)
        weights = q @ xp.matrix_transpose(k)
        if bias is not None:
            weights += xp.astype(detached(bias), dtype)
        top = xp.max(weights, axis=-1, keepdims=True)
        # A row without a finite logit (every key masked) has no mass: total 0, and its own key outweighs it.
        top = xp.where(top == -math.inf, xp.zeros_like(top), top)
        weights -= top
        weights = xp.exp(weights)
        total = xp.sum(weights, axis=-1)
        if inverse is not None:
            # F_i A^+ is the attention of q_i over the pairs (landmark key j, row j of A^+), with the bias log c_j.
            # Divided before it is squared: (n_q x m times A^+)^2 would overflow float32 up to m^2 times sooner.
            w = weights @ inverse
            w /= total[..., None]
            w *= w
            norms.append(float64_numpy(xp.sum(w, axis=-1)).reshape(-1, stop - start))
        if K is not None:
            # Not xp.vecdot: torch's took 0.64 against 0.37 ms at (1, 6, 1,370, 64) in the (B, n, H, d) memory of a
            # model's projections.
            own = scale * xp.sum(q * xp.astype(detached(K[..., start:stop, :]), dtype, copy=False), axis=-1)
            gaps.append(float64_numpy(own - top[..., 0] - xp.log(total)).reshape(-1, stop - start))
    return (np.concatenate(norms, axis=-1) if norms else None, np.concatenate(gaps, axis=-1) if gaps else None)


def summed_weight_norms(norms, real=None):
    """:func:`interpolation_weight_norms` from the per-row ``norms`` of :func:`landmark_logit_reads`."""
    if real is not None:
        norms = np.where(real, norms, 0.0)
    # A NaN or infinite weight (an overflowed solve) is no ranking; such a row is as likely as any other.
    return np.nan_to_num(norms, nan=0.0, posinf=0.0).sum(axis=0)


def interpolation_census(sample, weights):
    r"""The positions :meth:`RowSample.with_census` takes: the :math:`\lfloor s/8\rfloor` (:data:`CENSUS_SHARE`)
    of largest ``weights`` (:func:`interpolation_weight_norms`) among those ``sample``'s strata stand for (not its rows
    taken with certainty already), with :math:`s` its rows.

    Row errors of Nyström attention are heavy-tailed, and where a handful of rows holds most of the squared error
    a sample that misses them under-covers: on sharply clustered tokens with ``norm`` landmarks the interval covered
    79.8 % at 128 rows (95 % nominal), and 93.2 % with these rows taken with certainty as well (docs' error-bounds
    page). Their norms rank the heavy rows where their error comes from the interpolation, not from the landmarks
    missing what a query attends to (for that, the high-norm and self-attending queries, :func:`outlying_queries`)."""
    count = sample.rows.size // CENSUS_SHARE
    # Among the positions the strata stand for: rows already certain (outlying queries) would take a place and add
    # none (a review: 6-8 of 16 with 10 artifact-like queries of 512).
    order, _ = sample.strata
    return np.sort(order[np.argsort(-weights[order], kind="stable")[:count]])


#: Where a Nyström output of self-attention is assessed, the queries the landmarks do not represent
#: (:func:`unrepresented_queries`) take :math:`s/2` rows (their share of the strata where that is more): all of them
#: with certainty where they are at most that many, else strata of their own (:meth:`RowSample.with_census`). On
#: isolated tokens among tight clusters (``python docs/scripts/isolated_tokens.py``) ``tol=0.1`` answered above it in
#: 40 of 100 seeds without them, 5 with :math:`s/4` and 2 with :math:`s/2` (before :func:`self_attending_queries`, which
#: brought it to 0); on the coverage report's other 34 families either moved a family's coverage by at most -2.3
#: points.
UNREPRESENTED_SHARE = 2


def unrepresented_queries(xp, Q, K, keys, bias, scale, real=None):
    r"""For self-attention, the query positions whose own key outweighs everything the landmarks stand for: where,
    in some batch row,

    .. math:: \tau\, q_i \cdot k_i \;>\; \log \sum_j c_j\, e^{\tau q_i \cdot \tilde k_j},

    the right side the log of the attention mass the weighted landmark keys give query :math:`i` (:math:`c_j = n/m`
    for unweighted landmarks, :math:`n` the batch row's real keys). A token far from every landmark (an isolated
    token among clusters) attends mostly to itself, which no landmark stands for: its row can hold most of the error
    while neither its norm nor its interpolation weights single it out (a review: 10 such rows of 1,024 held 99.9 % of
    it, and ``tol=0.1`` answered 0.33-0.76 in 40 of 100 seeds, docs' error-bounds page). Rows of tight clusters give
    about :math:`-\log c_j`. ``None`` unless ``Q`` and ``K`` have as many rows (self-attention, as
    :func:`query_positions` takes it). Time :math:`O(n_q m d)` per batch element, in blocks of :data:`CENSUS_BLOCK`
    logits.

    Parameters
    ----------
    xp
        Array namespace.
    Q, K : arrays, shapes (..., n, d)
    keys : array, shape (..., m, d)
        The landmark keys :math:`\tilde k`.
    bias : array, shape (..., 1, m), or None
        :math:`\log c`.
    scale : float
    real : bool ndarray, shape (B, n), optional
        The real query rows (:func:`query_positions`): the others never count.

    Returns
    -------
    int ndarray or None
        The positions, in order.
    """
    gaps = landmark_logit_reads(xp, Q, keys, bias, scale, K=K)[1]
    return None if gaps is None else positions_outweighed(gaps, bias is None, keys.shape[-2], real)


def positions_outweighed(gaps, unweighted, m, real=None):
    """:func:`unrepresented_queries` from the per-row ``gaps`` of :func:`landmark_logit_reads`: for ``unweighted``
    landmarks each of the ``m`` stands for :math:`n/m` keys, :math:`n` the row's real keys."""
    if unweighted:
        real_keys = np.full((gaps.shape[0], 1), gaps.shape[-1]) if real is None else real.sum(axis=1, keepdims=True)
        gaps = gaps - np.log(np.maximum(real_keys, 1) / m)
    outside = gaps > 0 if real is None else (gaps > 0) & real
    return np.flatnonzero(np.any(outside, axis=0))


def with_interpolation_census(xp, sample, Q, K, keys, bias, inverse, scale):
    """``sample`` with the rows of largest interpolation weights taken with certainty too (:func:`interpolation_census`
    of :func:`interpolation_weight_norms`, whose arguments these are, on the sample's real rows), and, for
    self-attention, the :func:`unrepresented_queries` in :math:`s/2` rows of their own, or their share of the strata
    where that is more (:data:`UNREPRESENTED_SHARE`)."""
    # One pass over the landmark logits for both (a review: each built them, an n_q x m product twice).
    norms, gaps = landmark_logit_reads(xp, Q, keys, bias, scale, inverse=inverse, K=K)
    alone = None if gaps is None else positions_outweighed(gaps, bias is None, keys.shape[-2], sample.real)
    return sample.with_census(interpolation_census(sample, summed_weight_norms(norms, sample.real)), alone,
                              sample.rows.size // UNREPRESENTED_SHARE)


def stratified_rows(positions, num_samples, rng):
    r"""One position drawn uniformly from each of ``num_samples`` contiguous strata of ``positions``.

    Stratum :math:`h` holds ``positions[edges[h]:edges[h+1]]`` with :math:`\text{edges}_h = \lfloor h N/s\rfloor`
    (:math:`N` positions, sizes :math:`N_h \in \{\lfloor N/s\rfloor, \lceil N/s\rceil\}`).

    Parameters
    ----------
    positions : int ndarray, shape (N,)
        Query positions to sample, in sequence order.
    num_samples : int
        :math:`s \le N`.
    rng : numpy.random.Generator

    Returns
    -------
    rows : int ndarray, shape (s,)
        The drawn positions, one per stratum, in order.
    sizes : float ndarray, shape (s,)
        :math:`N_h`, the positions each drawn row stands for.
    """
    return draw_strata(positions, split_edges(positions.size, num_samples), rng)


@functools.lru_cache(maxsize=64)
def student_t_quantile(level, df):
    """The ``level`` quantile of Student's t distribution with ``df`` degrees of freedom, cached: scipy's ``ppf``
    took 0.6 ms per call, a tenth of a ``tol=`` step at DINOv2-S's shape, for the same few values every time."""
    return float(scipy.stats.t.ppf(level, df=df))


def ratio_interval(e, o, sizes, confidence, certain=None):
    r"""Estimate and interval of :math:`R = \sum_i e_i / \sum_i o_i` from one row per stratum (docs' error-bounds
    page, "A-posteriori estimate").

    :math:`\hat R = \sum_h N_h e_h / \sum_h N_h o_h`. With :math:`z_h = N_h (e_h - \hat R o_h)`, the variance
    of :math:`\hat R` is estimated by collapsing adjacent strata into groups :math:`G` of two (three for the last
    when :math:`s` is odd): :math:`\widehat{\mathrm{Var}} = \sum_G \frac{|G|}{|G|-1}\sum_{h\in G}(z_h -
    \bar z_G)^2 / (\sum_h N_h o_h)^2`, which over-estimates rather than under-estimates when neighbouring
    strata differ. The interval is :math:`\hat R \exp(\pm t\, \hat\sigma / \hat R)` with :math:`t` of
    Student's distribution at :math:`s - \#G` degrees of freedom. With every :math:`N_h = 1` (all rows
    computed) it is exact, of width 0; so is it where every sampled row is exact (:math:`\hat R = 0`), which only
    says that no sampled row showed an error (a single wrong row outside the sample goes unseen).

    Parameters
    ----------
    e, o : float ndarrays, shape (s,)
        Squared error and squared norm of each drawn row; :math:`s \ge 2`.
    sizes : float ndarray, shape (s,)
        :math:`N_h`.
    confidence : float
    certain : bool ndarray, shape (s,), optional
        Rows taken with certainty (:math:`N_h = 1`, no stratum drawn): in both sums, not in the variance, whose
        strata are the others'.

    Returns
    -------
    tuple of float
        :math:`(\hat R, \text{low}, \text{high})`.
    """
    total = sizes @ o
    if total == 0:
        # The exact rows are all zero (V = 0 on them): the error is 0 where the approximation is too, else unbounded.
        ratio = 0.0 if sizes @ e == 0 else math.inf
        return ratio, ratio, ratio
    ratio = float(sizes @ e / total)
    drawn = np.ones(sizes.shape, dtype=bool) if certain is None else ~certain
    if np.all(sizes[drawn] == 1) or ratio <= 0:
        return ratio, ratio, ratio
    if drawn.sum() < 2:
        return ratio, 0.0, math.inf  # one drawn stratum: no variance to estimate, so no bound
    z = (sizes * (e - ratio * o))[drawn]
    s = z.size
    paired = s - 3 if s % 2 else s
    pairs = z[:paired].reshape(-1, 2)
    var = 2 * np.sum((pairs - pairs.mean(axis=1, keepdims=True)) ** 2)
    if s % 2:
        var += 1.5 * np.sum((z[-3:] - z[-3:].mean()) ** 2)
    var /= total**2
    t = student_t_quantile(0.5 + confidence / 2, s - paired // 2 - s % 2)
    # Past float64's range (few rows at a confidence near 1) the interval is unbounded above, not an OverflowError.
    exponent = t * math.sqrt(var) / ratio
    spread = math.exp(exponent) if exponent < 700 else math.inf
    return ratio, ratio / spread, ratio * spread


def best_rank_trace_floor(eigenvalues, num_landmarks):
    r"""The trace error no set of ``m`` landmarks can beat: :math:`\sum_{i>m}\lambda_i`.

    For any :math:`S` with :math:`|S| = m`, :math:`\hat{\mathcal K}` has rank :math:`\le m` and
    :math:`\hat{\mathcal K} \preceq \mathcal K`, so :math:`\lambda_i(\hat{\mathcal K}) \le \lambda_i(\mathcal K)`
    and :math:`\mathrm{tr}(\mathcal K - \hat{\mathcal K}) \ge \sum_{i>m}\lambda_i(\mathcal K)`.

    Parameters
    ----------
    eigenvalues : array_like, shape (n,)
        Eigenvalues of the PSD kernel (any order; negatives from round-off are clipped to 0).
    num_landmarks : int

    Returns
    -------
    float
    """
    lam = check_eigenvalues(eigenvalues)
    m = check_spectrum_rank(num_landmarks, lam.size)
    return float(lam[m:].sum())


def rpcholesky_trace_bound(eigenvalues, num_landmarks):
    r"""Expected trace error bound of RPCholesky with ``k`` pivots (Chen et al., 2023, Thm. 3.1).

    For every rank :math:`r` and :math:`\varepsilon > 0` with
    :math:`k \ge r/\varepsilon + r \log(1/(\varepsilon\eta_r))`, where
    :math:`\eta_r = \mathrm{tr}(\mathcal K - [\![\mathcal K]\!]_r)/\mathrm{tr}\,\mathcal K`,

    .. math:: \mathbb E\,\mathrm{tr}(\mathcal K - \hat{\mathcal K}^{(k)}) \le (1+\varepsilon)\,
              \mathrm{tr}(\mathcal K - [\![\mathcal K]\!]_r).

    This function returns the smallest such right-hand side over :math:`r = 1, \dots, k`, each
    with the smallest admissible :math:`\varepsilon` (found by bisection, the condition being
    monotone in :math:`\varepsilon`), and never more than :math:`\mathrm{tr}\,\mathcal K`.

    Parameters
    ----------
    eigenvalues : array_like, shape (n,)
    num_landmarks : int
        :math:`k`, the number of pivots.

    Returns
    -------
    float
    """
    lam = check_eigenvalues(eigenvalues)
    k = check_spectrum_rank(num_landmarks, lam.size)
    if lam[0] == 0:
        return 0.0
    # In units of the largest eigenvalue: a sum of eigenvalues near float64's largest would overflow to inf (and
    # eta to 0, whose logarithm the condition takes). The bound scales with the spectrum.
    unit = float(lam[0])
    scaled = lam / unit
    total = float(scaled.sum())
    best = total
    for r in range(1, k + 1):
        if not np.any(lam[r:] > 0):
            # Rank <= r <= k: RPCholesky recovers the matrix exactly (almost surely).
            return 0.0
        tail = float(scaled[r:].sum())
        eta = tail / total
        if eta == 0:
            # A positive tail below float64's range in these units: log(1 / (eps eta)) is infinite, no eps meets the
            # condition at this r.
            continue
        log_eta = math.log(eta)

        def needed(eps, r=r, log_eta=log_eta):
            # log(1 / (eps eta)) as a difference of logarithms: the product of a small eps and a subnormal eta is 0.
            return r / eps - r * (math.log(eps) + log_eta)

        lo, hi = 1e-12, 1.0
        while needed(hi) > k:
            hi *= 2
            if hi > 1e12:
                break
        if needed(hi) > k:
            continue
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if needed(mid) <= k:
                hi = mid
            else:
                lo = mid
        best = min(best, (1 + hi) * tail)
    # Multiplied back, a bound of the whole trace in these units rounded up to 2 ulp past lam.sum() (a review: 65 of
    # 200 cubed Gaussian spectra at k = 1); the trace itself overflows to inf past float64's range, as the bound does.
    with np.errstate(over="ignore"):
        return min(best * unit, float(np.sum(lam)))
