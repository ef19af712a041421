r"""Token structure of pretrained transformers: massive activations, artifact tokens and attention sinks.

FNA (Lu et al. 2025, arXiv 2507.16018) builds on three kinds of outlier tokens in pretrained ViTs, which it
says "mutually suppress one another through the attention mechanism":

* **massive** tokens carry a scalar activation of exceptional size in the residual stream. Sun et al. 2024
  ("Massive Activations in Large Language Models", arXiv 2402.17762) call an activation massive when
  its magnitude exceeds 100 and is about 1000 times the median magnitude of its hidden state;
* **artifact** tokens are patch tokens whose residual norm stands far above the other patches (Darcet et
  al. 2024, "Vision Transformers Need Registers", arXiv 2309.16588: in DINOv2 ViT-L and larger, about 2 %
  of the output tokens have norms above ~150, and the norm histogram is bimodal);
* **sinks** are keys that receive a large share of all attention.

This module holds the three detectors, written once against the array API (numpy or torch):
:func:`detect_massive_activations`, :func:`detect_high_norm_tokens` and :func:`detect_sinks`.
:mod:`nystrom.torch.tokens` applies them layer by layer to a transformers model.

Shapes: ``n`` tokens (padding included), ``D`` hidden width. Token masks are bool with ``True`` for a
real (unpadded) token, as transformers' ``attention_mask`` (bool, or integer 1 = real token).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .numerics import at_least_float32, masked_median, relative_norms, take_along_axis
from .sequence import first_token
from .validation import (
    broadcasts_to,
    check_finite,
    check_positive,
    check_real_floating,
    check_token_mask,
    namespace,
)

__all__ = [
    "MassiveActivations", "detect_high_norm_tokens", "detect_massive_activations", "detect_sinks", "excluded_tokens",
]


@dataclass(frozen=True)
class MassiveActivations:
    """Result of :func:`detect_massive_activations`.

    Attributes
    ----------
    mask : bool array, shape (..., n)
        ``True`` where the token carries at least one massive activation.
    channel : int array, shape (..., n)
        Channel of each token's largest-magnitude activation.
    value : array, shape (..., n)
        That activation, with its sign.
    median : array, shape (...)
        Median magnitude of all activations of the real tokens of each sequence.
    """

    mask: Any
    channel: Any
    value: Any
    median: Any


def _check_tokens(xp, name, hidden, attention_mask, min_ndim):
    """Check ``hidden (..., n, D)`` (or ``(..., n)`` when ``min_ndim`` is 1) and the token mask; return the mask as
    bool (or None)."""
    check_real_floating(xp, name, hidden)
    if hidden.ndim < min_ndim or hidden.shape[-1] == 0 or (min_ndim == 2 and hidden.shape[-2] == 0):
        what = "(..., n, D)" if min_ndim == 2 else "(..., n)"
        raise ValueError(f"{name} must have shape {what} with at least one token, got {tuple(hidden.shape)}")
    # A NaN compares False with every threshold: it would flag nothing, silently.
    check_finite(xp, **{name: hidden})
    if attention_mask is None:
        return None
    return check_token_mask(xp, attention_mask, tuple(hidden.shape[:-1]) if min_ndim == 2 else tuple(hidden.shape))


def detect_massive_activations(hidden, *, abs_threshold=100.0, median_ratio=1000.0, attention_mask=None):
    r"""Tokens carrying a massive scalar activation (Sun et al. 2024).

    An activation :math:`a_{jc}` (token :math:`j`, channel :math:`c`) is massive when

    .. math::

        |a_{jc}| > \alpha \quad\text{and}\quad
        |a_{jc}| \ge \rho\,\mathrm{median}_{i\,\mathrm{real},\,c'} |a_{ic'}|

    with the median over every channel of every real token of the sequence; Sun et al. use
    :math:`\alpha = 100` and :math:`\rho \approx 1000`. Apply it to the residual stream *before* any
    LayerNorm: normalisation divides the outlier away.

    Parameters
    ----------
    hidden : array, shape (..., n, D)
        Hidden states (numpy or torch, real floating).
    abs_threshold : float, default 100
        :math:`\alpha`.
    median_ratio : float, default 1000
        :math:`\rho`.
    attention_mask : bool or integer array, broadcastable to (..., n), optional
        ``True`` for real tokens; padding is never flagged and does not enter the median.

    Returns
    -------
    MassiveActivations

    Raises
    ------
    TypeError
        Non-array or non-floating ``hidden``, non-bool mask, non-real thresholds.
    ValueError
        Wrong shapes, non-positive thresholds.
    """
    xp = namespace(hidden=hidden, attention_mask=attention_mask)
    attention_mask = _check_tokens(xp, "hidden", hidden, attention_mask, 2)
    alpha = check_positive("abs_threshold", abs_threshold)
    rho = check_positive("median_ratio", median_ratio)
    magnitude = xp.abs(hidden)
    # The size, not -1: a reshape cannot infer -1 from an empty batch.
    flat = xp.reshape(magnitude, tuple(hidden.shape[:-2]) + (hidden.shape[-2] * hidden.shape[-1],))
    flat_mask = None
    real = None
    if attention_mask is not None:
        real = attention_mask
        flat_mask = xp.reshape(xp.broadcast_to(real[..., None], tuple(hidden.shape)), tuple(flat.shape))
    median = masked_median(xp, flat, flat_mask)
    channel = xp.argmax(magnitude, axis=-1)
    value = take_along_axis(xp, hidden, channel[..., None])[..., 0]
    # Compared in float32 or wider: thresholds rounded to half precision flagged peaks below them (a review: a bfloat16
    # peak of 1,168 over a median of 1.171875, 0.33 % under 1,000 times it).
    peak, wide_median = at_least_float32(xp, xp.abs(value)), at_least_float32(xp, median)
    mask = (peak > alpha) & (peak >= rho * wide_median[..., None])
    if real is not None:
        mask = mask & real
    return MassiveActivations(mask=mask, channel=channel, value=value, median=median)


def holds_positions(exclude) -> bool:
    """Whether ``exclude`` is a sequence of token positions (else ``None`` or an array); ``TypeError`` for anything
    else (a review: ``exclude=0`` was told to be "an array of an array-API library", positions being the usual form)."""
    if isinstance(exclude, Sequence):
        return True
    if exclude is not None and not array_api_compat.is_array_api_obj(exclude):
        raise TypeError(f"exclude must be a sequence of token positions (such as (0,)) or a bool array, got "
                        f"{type(exclude).__name__}")
    return False


def excluded_tokens(xp, exclude, shape, device, mask=None):
    """Token exclusions of :func:`detect_high_norm_tokens` as a bool array of ``shape``.

    ``exclude`` holds token positions, is a bool array broadcastable to ``shape`` (``True`` = excluded), or is
    ``None`` (no token excluded, as ``()``). With a token ``mask`` (bool, ``shape``) positions count among the real
    tokens of each row (:func:`~nystrom.linalg.sequence.first_token`): 0 is a sequence's [CLS] under left padding
    too, where position 0 is padding, and -1 its last real token; a row with too few real tokens has none there.
    """
    n = shape[-1]
    if exclude is None:
        exclude = ()
    if holds_positions(exclude):
        positions = list(exclude)
        bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not -n <= p < n]
        if bad:
            raise ValueError(f"exclude must hold token positions in [-{n}, {n}), got {positions!r}")
        flags = xp.zeros(shape, dtype=xp.bool, device=device)
        for p in positions:
            flags = flags | first_token(xp, n, int(p), mask, device=device)
        return xp.broadcast_to(flags, shape)
    if not array_api_compat.is_array_api_obj(exclude) or array_api_compat.array_namespace(exclude) is not xp:
        # Before the dtype check, whose message compared a numpy bool with torch.bool (a review).
        raise TypeError(f"exclude must be token positions or a bool array of the inputs' library "
                        f"({xp.__name__.rsplit('.', 1)[-1]}), got {type(exclude).__module__}.{type(exclude).__name__}")
    if exclude.dtype != xp.bool:
        raise TypeError(f"exclude must be a sequence of token positions or a bool array, got dtype {exclude.dtype}")
    # Broadcastable as the docstring says: a 0-d array (its shape[-1] was an IndexError) or a (B, 1) column too.
    if exclude.ndim > len(shape) or any(not broadcasts_to(s, t) for s, t in zip(exclude.shape[::-1], shape[::-1])):
        raise ValueError(f"exclude must be a bool array broadcastable to {shape}, got {tuple(exclude.shape)}")
    return xp.broadcast_to(exclude, shape)


def detect_high_norm_tokens(hidden, *, ratio=4.0, exclude=(0,), attention_mask=None):
    r"""Artifact tokens: patch tokens whose norm is an outlier among the patch tokens (Darcet et al. 2024).

    .. math:: \lVert h_j\rVert > \nu\,\mathrm{median}_{i\,\in\,P} \lVert h_i\rVert, \qquad j \in P

    where :math:`P` are the real tokens not in ``exclude`` (CLS, registers, other special tokens). Darcet
    et al. find a bimodal norm distribution in DINOv2 ViT-L and larger: ~2 % of tokens with norms above ~150.
    The default :math:`\nu = 4` sits well above the spread of a unimodal distribution (at most 2.4 times
    the median in every layer of DINOv2-S, which has no artifacts, over eight natural images at 224 px).

    Parameters
    ----------
    hidden : array, shape (..., n, D)
        Residual-stream hidden states (numpy or torch, real floating).
    ratio : float, default 4
        :math:`\nu`.
    exclude : sequence of int, bool array broadcastable to (..., n), or None, default (0,)
        Tokens that are never artifacts and do not enter the median: positions (``(0,)`` is the CLS token,
        ``()`` or ``None`` none) or a bool mask (``True`` = excluded). With ``attention_mask``, positions count
        among the real tokens, as :class:`~nystrom.linalg.landmarks.Norm`'s ``first`` does: ``0`` is the CLS token
        under left padding too, ``-1`` the last real token (BERT's [SEP]).
    attention_mask : bool or integer array, broadcastable to (..., n), optional
        ``True`` for real tokens; padding is never flagged and does not enter the median.

    Returns
    -------
    bool array, shape (..., n)

    Raises
    ------
    TypeError
        Non-array or non-floating ``hidden``, non-bool masks, non-real ``ratio``.
    ValueError
        Wrong shapes, non-positive ``ratio``, bad positions, or a sequence without any eligible token.
    """
    positions = holds_positions(exclude)
    xp = namespace(hidden=hidden, attention_mask=attention_mask, exclude=None if positions else exclude)
    attention_mask = _check_tokens(xp, "hidden", hidden, attention_mask, 2)
    nu = check_positive("ratio", ratio)
    shape = tuple(hidden.shape[:-1])
    eligible = ~excluded_tokens(xp, exclude, shape, array_api_compat.device(hidden), attention_mask)
    if attention_mask is not None:
        eligible = eligible & attention_mask
    if not bool(xp.all(xp.any(eligible, axis=-1))):
        # Name only what the caller passed: a single-token sequence with the default exclude=(0,) has no mask.
        left, verb = ("exclude", "leaves") if attention_mask is None else ("exclude and attention_mask", "leave")
        detail = f" (exclude={exclude!r}, {shape[-1]} tokens)" if positions else ""
        raise ValueError(f"{left} {verb} a sequence without any token to test{detail}")
    # In float32 at least and in a unit near the largest entry: a float16 sum of squares overflows past norms of 256,
    # a float32 one past entries of 1e19, and an infinite median flags nothing.
    norms = relative_norms(xp, hidden, eligible)
    median = masked_median(xp, norms, eligible)
    return eligible & (norms > nu * median[..., None])


def detect_sinks(attention_share, *, ratio=4.0, attention_mask=None):
    r"""Attention sinks: keys that receive at least ``ratio`` times the uniform share of attention.

    .. math:: a_j \ge \rho / n_v

    with :math:`a_j` the share of attention key :math:`j` receives (summing to 1 over the keys) and
    :math:`n_v` the number of real keys. The default :math:`\rho = 4` is a loose analysis threshold;
    :class:`~nystrom.linalg.landmarks.Norm`, which guarantees sinks as landmarks, uses a stricter
    :math:`\rho = 16` (or an absolute share), so that local attention peaks do not take landmark slots.

    Parameters
    ----------
    attention_share : array, shape (..., n)
        Exact shares (:attr:`TokenAnalysis.attention_share`) or the probe estimate of
        :func:`nystrom.linalg.landmarks.norm.attention_share`.
    ratio : float, default 4
        :math:`\rho`.
    attention_mask : bool or integer array, broadcastable to (..., n), optional
        ``True`` for real keys; padding is never a sink and does not count in :math:`n_v`.

    Returns
    -------
    bool array, shape (..., n)

    Raises
    ------
    TypeError
        Non-array or non-floating ``attention_share``, non-bool mask, non-real ``ratio``.
    ValueError
        Wrong shapes or non-positive ``ratio``.
    """
    xp = namespace(attention_share=attention_share, attention_mask=attention_mask)
    attention_mask = _check_tokens(xp, "attention_share", attention_share, attention_mask, 1)
    rho = check_positive("ratio", ratio)
    # Compared in float32 or wider: a threshold rounded to half precision flagged shares below it, and only without a
    # mask (a review: a float16 share of 0.66650 at rho / n = 2/3); float16 counts overflow past 65,504 keys (every key
    # was then a sink; a review).
    share = at_least_float32(xp, attention_share)
    if attention_mask is None:
        return share >= rho / share.shape[-1]
    real = attention_mask
    n_valid = xp.sum(xp.astype(real, share.dtype), axis=-1, keepdims=True)
    return real & (share >= rho / n_valid)
