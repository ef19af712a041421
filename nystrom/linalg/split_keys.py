r"""Attention split along the key axis, with the blocks merged exactly by their log-sum-exp.

For one query row with logits :math:`\ell_j = \tau\, q^\top k_j + M_j` over keys split into blocks
:math:`\mathcal B_1, \dots, \mathcal B_p`, each block keeps two partial results, its own attention output and the
log of its mass,

.. math::

    \hat o_b = \sum_{j\in\mathcal B_b} \frac{e^{\ell_j}}{\sum_{i\in\mathcal B_b} e^{\ell_i}}\, v_j, \qquad
    \lambda_b = \log \sum_{j\in\mathcal B_b} e^{\ell_j},

and with :math:`\mu = \max_b \lambda_b` and :math:`w_b = e^{\lambda_b - \mu} / p`

.. math:: \mathrm{softmax}(\ell)^\top V = \frac{\sum_b w_b\, \hat o_b}{\sum_b w_b},

exactly (up to rounding): block :math:`b` holds the share :math:`e^{\lambda_b} / \sum_c e^{\lambda_c}` of the
attention. Every :math:`\hat o_b` is a convex combination of rows of :math:`V` and every :math:`w_b \le 1/p`, so
the numerator stays within :math:`\max_j \lVert v_j\rVert_\infty` and nothing overflows where :math:`V` does not (a
review: the unnormalised sums :math:`\sum_j e^{\ell_j - \mu_b} v_j` of an earlier form reached :math:`n_b \max|V|`,
infinite in float32 for values of 1e36 over 1,000 keys in a sharded call where one process was finite). The block
holding :math:`\mu` has :math:`w_b = 1/p`, so the denominator is at least :math:`1/p`. A block whose keys are all
masked has :math:`\lambda_b = -\infty`, hence :math:`w_b = 0`.

The blocks are independent until the merge, which costs :math:`O(p\, n_q d_v)`. This is what lets the
landmark product :math:`\mathrm{softmax}(\tau\tilde q K^\top + M)V`, which has only :math:`m` query rows,
use many cores or thread blocks (flash-decoding's split-K: :func:`nystrom.torch.attention.split_key_sdpa` on
CPU cores, with PyTorch's flash kernel reducing each block to exactly these two results), and what lets it run over
a sequence sharded across processes: each process reduces its own keys to :math:`(\hat o_b, \lambda_b)`, and the
merge needs only their maximum and one sum (:mod:`nystrom.torch.distributed`).
"""

from __future__ import annotations

import math

import array_api_compat

from .numerics import at_least_float32, scaled_logits


def partial_attention(xp, q, k, v, mask=None, *, scale):
    r"""One block's partial results :math:`(\hat o_b, \lambda_b)` of attention of ``q`` over the keys ``k``.

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
        :math:`\hat o_b`, the block's attention output (0 for a row whose keys are all masked), in float32 or wider.
    lse : array, shape (..., n_q, 1)
        :math:`\lambda_b = \log\sum_j e^{\ell_j}`, ``-inf`` for such a row.
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
    s = xp.sum(p, axis=-1, keepdims=True)
    with_keys = s > 0
    s = xp.where(with_keys, s, xp.ones_like(s))
    # Normalised before the product: the sum of p_j v_j reaches s max|V| (s up to n), past the dtype where V is not.
    p = p / s
    lse = xp.where(with_keys, mu + xp.log(s), xp.full_like(s, -math.inf))
    return p @ xp.astype(v, p.dtype), lse


def merge_partials(xp, o, lse, axis=-3, *, across=None):
    r"""Merge partial results along ``axis`` (the block axis): :math:`\sum_b w_b \hat o_b / \sum_b w_b`,
    :math:`w_b = e^{\lambda_b - \max_c \lambda_c} / p` for :math:`p` blocks.

    Parameters
    ----------
    xp
        Array namespace.
    o, lse : arrays
        Stacked partial results of :func:`partial_attention`, shapes ``(..., p, ..., n_q, d_v)`` and
        ``(..., p, ..., n_q, 1)``, with the blocks along ``axis`` (negative, counted from the end). At least one block
        of every row must hold a key.
    axis : int
        The block axis, when the blocks are stacked here.
    across : object, optional
        The blocks are held by other processes instead (one each, no block axis): an object whose ``max(a)`` and
        ``sum(a)`` reduce over them and whose ``lengths`` has one entry per process
        (:class:`nystrom.torch.distributed.ShardedSequence`, an all-reduce each). The maximum is one all-reduce of
        ``(..., n_q, 1)``, the sums one of ``(..., n_q, d_v + 1)``.

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

        blocks = o.shape[axis]
    else:
        largest, total, blocks = across.max, across.sum, len(across.lengths)
    # At most 1 / p each: the weighted sum of the blocks' outputs stays within V's range.
    w = xp.exp(lse - largest(lse)) / blocks
    # The numerator and the denominator in one reduction (one message when the blocks are on other processes).
    both = total(xp.concat([w * o, w], axis=-1))
    return both[..., :-1] / both[..., -1:]
