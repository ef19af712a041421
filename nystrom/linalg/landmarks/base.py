r"""What every landmark strategy shares: the :class:`Landmarks` result and the batching helpers.

A strategy is any callable

``strategy(Q, K, num_landmarks, *, key_padding_mask=None, seed=None, head_axis=None, features=None, scale=None)``

returning :class:`Landmarks`. ``scale`` is the softmax temperature of the attention being
approximated (default ``1/sqrt(d)``), for strategies that look at attention or at a kernel.
Shapes follow PyTorch attention: ``Q (..., n_q, d)``, ``K (..., n, d)``;
the leading dimensions are batch/heads. With ``head_axis`` (a negative axis of ``K`` pointing into
the leading dimensions, ``-3`` for ``(B, H, n, d)``) one landmark set is chosen per sequence and
shared by all heads, as FNA does. Selection then runs on the head-mean features
:math:`\bar k_i = \tfrac1H\sum_h k_{h,i}` (FNA's ``sampling_features`` rule), shape ``(..., n, d)``:
a fixed linear map of the concatenated heads that keeps selection at :math:`O(n m d)` whatever
:math:`H`, instead of :math:`O(n m H d)` on the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ..validation import (
    check_finite,
    check_key_padding_mask,
    check_landmarks_fit,
    check_points,
    check_real_floating,
    namespace,
)


@dataclass(frozen=True)
class Landmarks:
    """Landmark queries and keys chosen by a strategy.

    Attributes
    ----------
    queries : array, shape (..., m, d)
        Landmark queries :math:`\\tilde q`.
    keys : array, shape (..., m, d)
        Landmark keys :math:`\\tilde k`.
    indices : int array, shape (..., m), or None
        Positions in ``K`` of the landmark keys when they are real tokens (``None`` for
        centroid strategies such as segment means and k-means).
    query_indices : int array, shape (..., m), or None
        Positions in ``Q`` of the landmark queries; equal to ``indices`` for self-attention.
    """

    queries: Any
    keys: Any
    indices: Any = None
    query_indices: Any = None


def check_strategy_inputs(Q, K, num_landmarks, key_padding_mask, head_axis, features):
    """Validate a strategy call; return ``(xp, m)``. Raises ``TypeError``/``ValueError`` naming the argument."""
    xp = namespace(Q=Q, K=K, key_padding_mask=key_padding_mask, features=features)
    for name, a in (("Q", Q), ("K", K)):
        check_points(name, a, xp)
    if Q.dtype != K.dtype:
        raise TypeError(f"Q and K must share one dtype, got {Q.dtype} and {K.dtype}")
    if Q.shape[-1] != K.shape[-1] or Q.shape[:-2] != K.shape[:-2]:
        raise ValueError(f"Q and K must share leading dimensions and d, got {tuple(Q.shape)} and {tuple(K.shape)}")
    if key_padding_mask is not None:
        check_key_padding_mask(xp, key_padding_mask, K)
    if head_axis is not None:
        if isinstance(head_axis, bool) or not isinstance(head_axis, int) or not (-K.ndim <= head_axis <= -3):
            raise ValueError(
                f"head_axis must be None or a negative int between {-K.ndim} and -3 (a leading axis "
                f"of K with shape {tuple(K.shape)}), got {head_axis!r}"
            )
    m = check_landmarks_fit(xp, num_landmarks, K, key_padding_mask)
    if features is not None:
        check_real_floating(xp, "features", features)
        check_finite(xp, "features", features)
        expected = selection_shape(K, head_axis)[:-1]
        if tuple(features.shape[:-1]) != expected:
            raise ValueError(
                f"features must have shape {expected + ('D',)} (one row per key"
                f"{', heads shared' if head_axis is not None else ''}), got {tuple(features.shape)}"
            )
    return xp, m


def selection_shape(K, head_axis):
    """Shape of the per-token selection features for ``K``: ``(..., n, d)``, without the head axis if shared."""
    shape = list(K.shape)
    if head_axis is not None:
        shape.pop(head_axis)
    return tuple(shape)


def fold_heads(xp, X, head_axis):
    """Selection features: ``(..., H, ..., n, d) -> (..., n, d)``, the mean over the shared head axis,
    in float32 or wider.

    Half-precision distances would round away the differences that farthest points, k-means and
    pivoting compare (bfloat16 keeps 8 significant bits), so selection never runs below float32.
    """
    X = at_least_float32(xp, X)
    if head_axis is None:
        return X
    if X.shape[head_axis] == 1:
        # A mean over one head is a copy of the whole input (4 ms at n = 65,536, d = 64); a view is free.
        return xp.squeeze(X, axis=head_axis)
    return xp.mean(X, axis=head_axis)


def at_least_float32(xp, X):
    """``X`` as float32 when it is a half-precision array, unchanged otherwise."""
    return X if X.dtype in (xp.float32, xp.float64) else xp.astype(X, xp.float32)


def fold_mask(xp, mask, K, head_axis):
    """Broadcast ``mask`` to ``K.shape[:-1]``; with shared heads a key is eligible only if real in every head."""
    if mask is None:
        return None
    mask = xp.broadcast_to(mask, tuple(K.shape[:-1]))
    if head_axis is None:
        return mask
    return xp.all(mask, axis=head_axis + 1)


def unfold_indices(xp, idx, K, head_axis):
    """Broadcast per-sequence indices ``(..., m)`` back over the head axis to ``K.shape[:-2] + (m,)``."""
    if head_axis is None:
        return idx
    idx = xp.expand_dims(idx, axis=head_axis + 1)
    return xp.broadcast_to(idx, (*K.shape[:-2], idx.shape[-1]))


def gather_rows(xp, X, idx):
    """``X[..., idx, :]`` per batch element: ``X (..., n, d)``, ``idx (..., m)`` -> ``(..., m, d)``."""
    idx = xp.broadcast_to(idx[..., None], (*idx.shape, X.shape[-1]))
    return xp.take_along_axis(X, idx, axis=-2)


def landmarks_at(xp, Q, K, idx, query_idx=None) -> Landmarks:
    """Landmarks that are real tokens: keys ``K[idx]`` and queries ``Q[query_idx]`` (default ``idx``)."""
    query_idx = idx if query_idx is None else query_idx
    return Landmarks(gather_rows(xp, Q, query_idx), gather_rows(xp, K, idx), idx, query_idx)


def uniform_draws(xp, shape, seed, like):
    """Uniform ``[0, 1)`` draws of ``shape`` from ``numpy.random.default_rng(seed)``, on ``like``'s device.

    Drawing on the host with numpy makes a given seed give the same landmarks for numpy and
    torch inputs, on CPU and CUDA alike.
    """
    draws = np.random.default_rng(seed).random(shape)
    dtype = xp.float64 if like.dtype == xp.float64 else xp.float32
    return xp.asarray(draws, dtype=dtype, device=array_api_compat.device(like))


def host_view(a):
    """``a`` as a numpy array sharing its memory when it lives in host memory, else ``None``.

    Parameters
    ----------
    a : array
        Any array-API array (numpy, torch, ...).

    Returns
    -------
    numpy.ndarray or None
        A zero-copy DLPack view for host arrays (detached from autograd), ``None`` on accelerators and
        for dtypes numpy lacks.
    """
    if array_api_compat.is_numpy_array(a):
        return a
    if str(array_api_compat.device(a)) != "cpu":
        return None
    try:
        return np.from_dlpack(_detached(a))
    except (BufferError, RuntimeError, TypeError):
        return None  # a dtype numpy does not have (torch.bfloat16): the caller's array-API path handles it


def to_host(a):
    """``a`` as a numpy array, copied to host memory when it lives elsewhere (for small arrays such as masks).

    Parameters
    ----------
    a : array
        Any array-API array.

    Returns
    -------
    numpy.ndarray
        A view of ``a`` in host memory (see :func:`host_view`) or a host copy of it.
    """
    view = host_view(a)
    return view if view is not None else np.from_dlpack(array_api_compat.to_device(_detached(a), "cpu"))


def _detached(a):
    """``a`` without autograd history: arrays that track gradients (torch) refuse DLPack export, and
    selection only produces indices, which carry no gradient."""
    detach = getattr(a, "detach", None)
    return detach() if callable(detach) else a


def select_by_index(xp, Q, K, m, key_padding_mask, head_axis, features, pick, pick_queries=None):
    """Run an index rule ``pick(X, m, mask) -> (..., m)`` for the keys and, when needed, the queries.

    ``X`` are the selection features (``features`` if given, else the keys, heads folded in).
    For self-attention (``n_q == n``) the landmark queries sit at the same positions as the
    landmark keys, which gives the interpolation property. For cross-attention (``n_q != n``)
    ``pick_queries`` (default ``pick``) picks query positions on the queries alone.
    """
    X = at_least_float32(xp, features) if features is not None else fold_heads(xp, K, head_axis)
    mask = fold_mask(xp, key_padding_mask, K, head_axis)
    idx = unfold_indices(xp, pick(X, m, mask), K, head_axis)
    if Q.shape[-2] == K.shape[-2]:
        return landmarks_at(xp, Q, K, idx)
    if m > Q.shape[-2]:
        raise ValueError(f"num_landmarks={m} exceeds the number of queries n_q={Q.shape[-2]}")
    pick_queries = pick if pick_queries is None else pick_queries
    q_idx = unfold_indices(xp, pick_queries(fold_heads(xp, Q, head_axis), m, None), Q, head_axis)
    return landmarks_at(xp, Q, K, idx, q_idx)


def sample_by_weight(xp, weights, u):
    """One index per row drawn with probability proportional to ``weights (..., n) >= 0``.

    ``u (...)`` are uniform ``[0, 1)`` draws (inverse-CDF sampling). Rows whose weights are all 0
    fall back to the largest weight, so callers should give ineligible entries weight ``-1``.
    """
    positive = xp.clip(weights, min=0)
    cdf = xp.cumulative_sum(positive, axis=-1)
    total = cdf[..., -1]
    threshold = u * total
    idx = xp.sum(xp.astype(cdf <= threshold[..., None], xp.int64), axis=-1)
    idx = xp.clip(idx, max=weights.shape[-1] - 1)
    picked = xp.take_along_axis(positive, idx[..., None], axis=-1)[..., 0]
    # Round-off can land on a zero-weight entry next to the boundary; take the heaviest instead.
    return xp.where((total > 0) & (picked > 0), idx, xp.argmax(weights, axis=-1))
