"""Numerically stable (masked) softmax over the last axis, written against the array API."""

from __future__ import annotations

import array_api_compat


def softmax(xp, logits, mask=None):
    r"""Row softmax :math:`\mathrm{softmax}(x)_j = e^{x_j - \max x} / \sum_k e^{x_k - \max x}`.

    Parameters
    ----------
    xp
        Array namespace.
    logits : array, shape (..., n)
    mask : bool array, shape broadcastable to (..., n), optional
        ``True`` marks entries that take part; masked entries get weight exactly 0. Every row
        must keep at least one entry (checked by the callers' validation).

    Returns
    -------
    array, shape (..., n)
        Rows summing to 1 (masked entries exactly 0).

    Notes
    -----
    Subtracting the row maximum (over unmasked entries) keeps every exponent :math:`\le 0`, so no
    overflow happens in any dtype; the largest term is exactly 1, so the sum is :math:`\ge 1` and
    the division is safe.
    """
    if mask is not None:
        neg = xp.asarray(-float("inf"), dtype=logits.dtype, device=array_api_compat.device(logits))
        logits = xp.where(mask, logits, neg)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return e / xp.sum(e, axis=-1, keepdims=True)

