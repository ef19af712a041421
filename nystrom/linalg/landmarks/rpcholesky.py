r"""Randomly pivoted Cholesky (RPCholesky) landmarks (Chen, Epperly, Tropp & Webber, 2023).

On the PSD kernel :math:`\kappa(i, j) = \exp(\tau\, x_i^\top x_j)` (PSD by the Schur product
theorem), pivots are drawn one at a time with probability proportional to the diagonal of the
current Nyström residual :math:`\kappa - \hat\kappa`:

.. math::

    s_t \sim \mathrm{diag}(R_{t-1}), \quad g = R_{t-1}[:, s_t], \quad
    f_t = g / \sqrt{g_{s_t}}, \quad R_t = R_{t-1} - f_t f_t^\top .

Only the :math:`m` pivot columns are evaluated: :math:`O(n m D + n m^2)` time and :math:`O(n m)`
memory, never the :math:`n \times n` kernel. The pivots are the landmarks, and
:func:`nystrom.linalg.bounds.rpcholesky_trace_bound` bounds the expected trace error.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..numerics import take_along_axis
from ..validation import check_int, check_real_floating, check_scale, namespace, per_token
from .base import TokenStrategy, sample_by_weight, uniform_draws


def exp_kernel_shift(xp, X, scale, mask=None):
    r"""Per-row constant :math:`c = \tau \max_i \lVert x_i\rVert^2` over the eligible points, so that
    :math:`e^{\tau x_i^\top x_j - c} \le 1` never overflows among them (Cauchy–Schwarz). Scaling a kernel
    by :math:`e^{-c}` changes no pivot probability and no relative error; the maximum leaves out
    ineligible points (padding), whose contents must not change the kernel of the real ones.

    Parameters
    ----------
    xp
        Array namespace.
    X : array, shape (..., n, D)
    scale : float
        :math:`\tau`.
    mask : bool array, shape (..., n), optional
        Eligible points (every row has one).

    Returns
    -------
    array, shape (...)
    """
    sq = xp.sum(X * X, axis=-1)
    if mask is not None:
        sq = xp.where(mask, sq, xp.zeros_like(sq))
    return scale * xp.max(sq, axis=-1)


def rpcholesky_pivots(X, num_pivots, *, scale, mask=None, u):
    r"""Pivots of randomly pivoted Cholesky on :math:`\kappa_{ij} = \exp(\tau\, x_i^\top x_j)`.

    Parameters
    ----------
    X : array, shape (..., n, D)
    num_pivots : int
        :math:`m`, at most the number of eligible points.
    scale : float
        :math:`\tau`.
    mask : bool array, shape (..., n), optional
        Eligible points.
    u : array, shape (..., m)
        Uniform :math:`[0, 1)` draws, one per pivot (inverse-CDF sampling of the residual diagonal).

    Returns
    -------
    int64 array, shape (..., m)
        Distinct pivots in selection order.

    Raises
    ------
    TypeError, ValueError
        Arguments of the wrong kind or shape, or ``num_pivots`` above the eligible points of a row (a review: it
        returned repeated and masked pivots there); the strategy's own calls skip these checks.
    """
    xp = namespace(X=X, mask=mask, u=u)
    check_real_floating(xp, "X", X)
    if X.ndim < 2 or X.shape[-1] == 0:
        raise ValueError(f"X must have shape (..., n, D) with D >= 1, got {tuple(X.shape)}")
    check_int("num_pivots", num_pivots, minimum=1)
    scale = check_scale(scale, X.shape[-1])
    if mask is not None and (mask.dtype != xp.bool or not per_token(tuple(mask.shape), tuple(X.shape[:-1]))):
        raise ValueError(f"mask must be a bool array broadcastable to {tuple(X.shape[:-1])}, got dtype {mask.dtype} "
                         f"and shape {tuple(mask.shape)}")
    check_real_floating(xp, "u", u)
    if tuple(u.shape) != (*X.shape[:-2], num_pivots):
        raise ValueError(f"u must have shape {(*X.shape[:-2], num_pivots)} (one draw per pivot), got {tuple(u.shape)}")
    if not bool(xp.all((u >= 0) & (u < 1))):
        # NaN fails both comparisons. Out of range, the inverse-CDF draw silently took the last or first eligible
        # point (a review).
        raise ValueError("u must hold uniform draws in [0, 1)")
    eligible = X.shape[-2] if mask is None else int(xp.min(xp.sum(xp.astype(mask, xp.int64), axis=-1)))
    if num_pivots > eligible:
        raise ValueError(f"num_pivots={num_pivots} exceeds the {eligible} eligible points of a row")
    return pivots(X, num_pivots, scale=scale, mask=mask, u=u)


def pivots(X, num_pivots, *, scale, mask=None, u):
    """:func:`rpcholesky_pivots` for arguments its callers have checked."""
    xp = array_api_compat.array_namespace(X)
    n = X.shape[-2]
    device = array_api_compat.device(X)
    positions = xp.arange(n, device=device)
    shift = exp_kernel_shift(xp, X, scale, mask)[..., None]
    residual = xp.exp(scale * xp.sum(X * X, axis=-1) - shift)
    # The residual's rounding, relative to its diagonal: a kernel column's exponent tau x_i.x_s - c carries an error of
    # about D eps c (a product of D terms up to c in size), which exp turns into a relative one, and each of the t
    # updates adds about eps. Below 4 (t + 1 + D c) eps the residual is that rounding: 0. A duplicate of a pivot kept
    # such a residual, which one library's rounding left positive and another's clipped to 0, so that numpy and torch
    # picked differently once the distinct tokens ran out (a review); 16 m eps, a first floor, also zeroed true
    # residuals of smooth float32 kernels (another).
    rounding = (4 * xp.finfo(residual.dtype).eps) * residual
    exponent = X.shape[-1] * xp.abs(shift)
    eligible = xp.ones(X.shape[:-1], dtype=xp.bool, device=device) if mask is None else mask
    minus_one = -xp.ones_like(residual)
    factors = []
    chosen = []
    taken = ~eligible
    for t in range(num_pivots):
        weight = xp.where(taken, minus_one, residual)
        # Once the residual vanishes on every remaining token (rank exhausted), any remaining
        # token is as good as another: fall back to uniform among them.
        exhausted = ~xp.any(weight > 0, axis=-1, keepdims=True)
        weight = xp.where(exhausted & ~taken, xp.ones_like(weight), weight)
        s = sample_by_weight(xp, weight, u[..., t])
        chosen.append(s)
        x_s = take_along_axis(xp, X, xp.broadcast_to(s[..., None, None], (*s.shape, 1, X.shape[-1])), axis=-2)
        g = xp.exp(scale * (X @ xp.matrix_transpose(x_s))[..., 0] - shift)
        for f in factors:
            f_s = take_along_axis(xp, f, s[..., None])
            g = g - f * f_s
        g_s = take_along_axis(xp, g, s[..., None])
        ok = g_s > 0
        f = xp.where(ok, g / xp.sqrt(xp.where(ok, g_s, xp.ones_like(g_s))), xp.zeros_like(g))
        factors.append(f)
        residual = residual - f * f
        residual = xp.where(residual > (t + 1 + exponent) * rounding, residual, xp.zeros_like(residual))
        taken = taken | (positions == s[..., None])
    return xp.stack(chosen, axis=-1)


@dataclass(frozen=True)
class RPCholesky(TokenStrategy, name="rpcholesky", random=True):
    """Randomly pivoted Cholesky on the exponential kernel of the keys; how it draws is in
    :mod:`nystrom.linalg.landmarks.rpcholesky`.

    Deterministic for a given ``seed``. The kernel temperature is the attention's ``scale``
    (default ``1/sqrt(d)``), so the kernel is the unnormalised attention kernel itself.
    """

    def pick(self, selection, X, mask):
        m = selection.num_landmarks
        u = uniform_draws(selection.xp, (*X.shape[:-2], m), selection.seed, X)
        return pivots(X, m, scale=selection.scale, mask=mask, u=u)
