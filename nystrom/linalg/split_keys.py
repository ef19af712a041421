r"""Attention split along the key axis, with the blocks merged exactly by their log-sum-exp.

For one query row with logits :math:`\ell_j = \tau\, q^\top k_j + M_j` over keys split into blocks
:math:`\mathcal B_1, \dots, \mathcal B_p`, each block keeps three partial results,

.. math::

    \mu_b = \max_{j\in\mathcal B_b} \ell_j, \qquad
    s_b = \sum_{j\in\mathcal B_b} e^{\ell_j - \mu_b}, \qquad
    o_b = \sum_{j\in\mathcal B_b} e^{\ell_j - \mu_b}\, v_j ,

and with :math:`\mu = \max_b \mu_b` and :math:`w_b = e^{\mu_b - \mu}`

.. math:: \mathrm{softmax}(\ell)^\top V = \frac{\sum_b w_b\, o_b}{\sum_b w_b\, s_b},

exactly (up to rounding): it is the softmax's own shift-invariance, applied per block. A block whose keys
are all masked has :math:`\mu_b = -\infty`, hence :math:`w_b = 0`. The block holding :math:`\mu` has
:math:`w_b = 1` and :math:`s_b \ge 1`, so the denominator is at least 1.

The blocks are independent until the merge, which costs :math:`O(p\, n_q d_v)`. This is what lets the
landmark product :math:`\mathrm{softmax}(\tau\tilde q K^\top + M)V`, which has only :math:`m` query rows,
use many cores or thread blocks (flash-decoding's split-K: :func:`nystrom.torch.attention.split_key_sdpa` on
CPU cores, with PyTorch's flash kernel reducing each block), and what lets it run over a sequence sharded
across processes: each process reduces its own keys to :math:`(\mu_b, s_b, o_b)`, and the merge needs only
their maximum and two sums (:mod:`nystrom.torch.distributed`).
"""

from __future__ import annotations

import math

import array_api_compat

from .numerics import at_least_float32, scaled_logits


def partial_attention(xp, q, k, v, mask=None, *, scale):
    r"""One block's partial results :math:`(o_b, \mu_b, s_b)` of attention of ``q`` over the keys ``k``.

    Parameters
    ----------
    xp
        Array namespace.
    q : array, shape (..., n_q, d)
    k : array, shape (..., n, d)
    v : array, shape (..., n, d_v)
    mask : bool or floating array, shape broadcastable to (..., n_q, n), optional
        ``True`` where a query may attend to a key, or an additive logit bias (as
        ``scaled_dot_product_attention``).
    scale : float
        :math:`\tau`.

    Returns
    -------
    o : array, shape (..., n_q, d_v)
        :math:`\sum_j e^{\ell_j - \mu_b} v_j`, in float32 or wider.
    mu : array, shape (..., n_q, 1)
        :math:`\max_j \ell_j`, ``-inf`` for a row whose keys are all masked.
    s : array, shape (..., n_q, 1)
        :math:`\sum_j e^{\ell_j - \mu_b}` (0 for such a row).
    """
    # Logits and sums in float32 or wider: half-precision exponent sums overflow (float16) or stop growing.
    q = at_least_float32(xp, q)
    logits = scaled_logits(xp, q, xp.astype(k, q.dtype), scale)
    if mask is not None:
        if mask.dtype == xp.bool:
            neg = xp.full((), -math.inf, dtype=logits.dtype, device=array_api_compat.device(logits))
            logits = xp.where(mask, logits, neg)
        else:
            logits = logits + xp.astype(mask, logits.dtype)
    mu = xp.max(logits, axis=-1, keepdims=True)
    # An all-masked row shifts by 0 instead of -inf, so its terms are e^{-inf} = 0 rather than NaN.
    p = xp.exp(logits - xp.where(mu > -math.inf, mu, xp.zeros_like(mu)))
    return p @ xp.astype(v, p.dtype), mu, xp.sum(p, axis=-1, keepdims=True)


def merge_partials(xp, o, mu, s, axis=-3, *, across=None):
    r"""Merge partial results along ``axis`` (the block axis): :math:`\sum_b w_b o_b / \sum_b w_b s_b`,
    :math:`w_b = e^{\mu_b - \max_c \mu_c}`.

    Parameters
    ----------
    xp
        Array namespace.
    o, mu, s : arrays
        Stacked partial results of :func:`partial_attention`, shapes ``(..., p, ..., n_q, d_v)``,
        ``(..., p, ..., n_q, 1)`` and the same, with the blocks along ``axis`` (negative, counted from the end).
        At least one block of every row must hold a key.
    axis : int
        The block axis, when the blocks are stacked here.
    across : object, optional
        The blocks are held by other processes instead (one each, no block axis): an object whose ``max(a)`` and
        ``sum(a)`` reduce over them (:class:`nystrom.torch.distributed.ShardedSequence`, an all-reduce each).
        The maximum is one all-reduce of ``(..., n_q, 1)``, the two sums one of ``(..., n_q, d_v + 1)``.

    Returns
    -------
    array
        ``o``'s shape without the block axis: the attention output.
    """
    if across is None:
        def largest(a):
            return xp.max(a, axis=axis, keepdims=True)

        def total(a):
            return xp.sum(a, axis=axis)
    else:
        largest, total = across.max, across.sum
    w = xp.exp(mu - largest(mu))
    # The numerator and the denominator in one reduction (one message when the blocks are on other processes).
    both = total(xp.concat([w * o, w * s], axis=-1))
    return both[..., :-1] / both[..., -1:]
