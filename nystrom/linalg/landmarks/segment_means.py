r"""Segment means: Nyströmformer's landmarks.

The (unpadded) sequence is cut into :math:`m` contiguous segments and each landmark is a segment's
mean. Token :math:`i` of the :math:`n_v` real tokens (in order) falls in segment
:math:`\lfloor i m / n_v \rfloor`, so :math:`n_v` need not be divisible by :math:`m`: segment sizes
differ by at most one, and every segment is non-empty because :math:`m \le n_v`.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from .base import CentroidStrategy


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
class SegmentMeans(CentroidStrategy, name="segment_means"):
    """Means of contiguous segments (Xiong et al., 2021). Deterministic; :math:`O(n m)` memory for the
    membership matrix, :math:`O(n m d)` time. Padded tokens are left out of every mean.

    Notes
    -----
    Segments mix neighbouring tokens, so under a causal mask they would leak future tokens into
    the past; ``nystrom`` approximates bidirectional attention only.
    """

    def membership(self, selection, queries):
        # Segments depend on positions only: the (head-averaged) features are never computed.
        tokens = selection.Q if queries else selection.K
        mask = None if queries else selection.mask
        return segment_weights(selection.xp, tokens.shape[-2], selection.num_landmarks, mask, tokens)
