"""Numerically stable (masked) softmax over the last axis, written against the array API."""

from __future__ import annotations

import array_api_compat

from .validation import sum_dtype


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
    the division is safe. Half-precision rows are summed in float32: more than 65,504 terms of up
    to 1 would overflow a float16 sum.
    """
    if mask is not None:
        neg = xp.asarray(-float("inf"), dtype=logits.dtype, device=array_api_compat.device(logits))
        logits = xp.where(mask, logits, neg)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    total = xp.sum(e, axis=-1, keepdims=True, dtype=sum_dtype(xp, e))
    return xp.astype(e / total, logits.dtype, copy=False)

