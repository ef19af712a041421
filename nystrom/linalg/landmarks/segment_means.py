r"""Segment means: Nyströmformer's landmarks.

The (unpadded) sequence is cut into :math:`m` contiguous segments and each landmark is a segment's
mean. Token :math:`i` of the :math:`n_v` real tokens (in order) falls in segment
:math:`\lfloor i m / n_v \rfloor`, so :math:`n_v` need not be divisible by :math:`m`: segment sizes
differ by at most one, and every segment is non-empty because :math:`m \le n_v`.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from .base import Landmarks, check_strategy_inputs, fold_mask, unfold_indices


def segment_weights(xp, n, m, mask, like):
    """Row-normalised segment-membership matrix ``(..., m, n)`` (or ``(m, n)`` without a mask)."""
    device = array_api_compat.device(like)
    if mask is None:
        rank = xp.arange(n, device=device)
        n_valid = xp.asarray(n, device=device)
        valid = None
    else:
        valid = mask
        rank = xp.cumulative_sum(xp.astype(mask, xp.int64), axis=-1) - 1
        n_valid = xp.sum(xp.astype(mask, xp.int64), axis=-1, keepdims=True)
    segment = (rank * m) // n_valid
    member = segment[..., None, :] == xp.arange(m, device=device)[:, None]
    if valid is not None:
        member = member & valid[..., None, :]
    W = xp.astype(member, like.dtype)
    return W / xp.sum(W, axis=-1, keepdims=True)


@dataclass(frozen=True)
class SegmentMeans:
    """Means of contiguous segments (Xiong et al., 2021). Deterministic; :math:`O(n m)` memory for the
    membership matrix, :math:`O(n m d)` time. Padded tokens are left out of every mean.

    Notes
    -----
    Segments mix neighbouring tokens, so under a causal mask they would leak future tokens into
    the past; ``nystrom`` approximates bidirectional attention only.
    """

    name = "segment_means"

    def __call__(self, Q, K, num_landmarks, *, key_padding_mask=None, seed=None, head_axis=None,
                 features=None, scale=None):
        xp, m = check_strategy_inputs(Q, K, num_landmarks, key_padding_mask, head_axis, features)
        mask = fold_mask(xp, key_padding_mask, K, head_axis)
        if mask is not None and head_axis is not None:
            mask = unfold_indices(xp, mask, K, head_axis)
        W_k = segment_weights(xp, K.shape[-2], m, mask, K)
        if Q.shape[-2] == K.shape[-2]:
            W_q = W_k
        else:
            if m > Q.shape[-2]:
                raise ValueError(f"num_landmarks={m} exceeds the number of queries n_q={Q.shape[-2]}")
            W_q = segment_weights(xp, Q.shape[-2], m, None, Q)
        return Landmarks(W_q @ Q, W_k @ K)
