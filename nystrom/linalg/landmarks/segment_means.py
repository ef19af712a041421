r"""Segment means: Nyströmformer's landmarks.

The (unpadded) sequence is cut into :math:`m` contiguous segments and each landmark is a segment's
mean. Token :math:`i` of the :math:`n_v` real tokens (in order) falls in segment
:math:`\lfloor i m / n_v \rfloor`, so :math:`n_v` need not be divisible by :math:`m`: segment sizes
differ by at most one, and every segment is non-empty because :math:`m \le n_v`.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from .base import ClusterStrategy, Grouping


def segment_labels(xp, n, m, mask=None, device=None):
    r"""Segment of each token ``(..., n)``, :math:`\lfloor r m / n_v\rfloor` for the real token of rank :math:`r`;
    ``-1`` for padding. Without a mask, shape ``(n,)``."""
    if mask is None:
        return (xp.arange(n, device=device) * m) // n
    rank = xp.cumulative_sum(xp.astype(mask, xp.int64), axis=-1) - 1
    n_valid = xp.sum(xp.astype(mask, xp.int64), axis=-1, keepdims=True)
    return xp.where(mask, (rank * m) // n_valid, -xp.ones_like(rank))


@dataclass(frozen=True)
class SegmentMeans(ClusterStrategy, name="segment_means"):
    """Means of contiguous segments (Xiong et al., 2021). Deterministic; :math:`O(n d)` time. Padded tokens are
    left out of every mean. Unweighted, as published: segment sizes differ by at most one.

    Notes
    -----
    Segments mix neighbouring tokens, so under a causal mask they would leak future tokens into
    the past; ``nystrom`` approximates bidirectional attention only.
    """

    def assign(self, selection, queries):
        tokens = selection.Q if queries else selection.K
        mask = None if queries else selection.mask
        return Grouping(segment_labels(selection.xp, tokens.shape[-2], selection.num_landmarks, mask,
                                       array_api_compat.device(tokens)))
