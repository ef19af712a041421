r"""Segment means: Nyströmformer's landmarks.

The (unpadded) sequence is cut into :math:`m` contiguous segments and each landmark is a segment's
mean. Token :math:`i` of the :math:`n_v` real tokens (in order) falls in segment
:math:`\lfloor i m / n_v \rfloor`, so :math:`n_v` need not be divisible by :math:`m`: segment sizes
differ by at most one, and every segment is non-empty because :math:`m \le n_v`.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..sequence import WHOLE
from .base import ClusterStrategy, Grouping


def segment_labels(xp, n, m, mask=None, device=None, axis=WHOLE):
    r"""Segment of each token ``(..., n)``, :math:`\lfloor r m / n_v\rfloor` for the real token of rank :math:`r`;
    ``-1`` for padding. Without a mask, shape ``(n,)``. On a sharded ``axis`` (:mod:`nystrom.linalg.sequence`) the
    ranks are those of the whole sequence and the labels those of this shard's tokens."""
    if mask is None:
        return (axis.positions(xp, n, device) * m) // axis.length(n)
    filled, before, n_valid = axis.cumulative_count(xp, mask)
    rank = before + filled - 1
    return xp.where(mask, (rank * m) // n_valid, -xp.ones_like(rank))


@dataclass(frozen=True)
class SegmentMeans(ClusterStrategy, name="segment_means", sharded=True):
    """Means of contiguous segments (Xiong et al., 2021). Deterministic; :math:`O(n d)` time. Padded tokens are
    left out of every mean. Unweighted, as published: segment sizes differ by at most one.

    Notes
    -----
    Segments mix neighbouring tokens, so under a causal mask they would leak future tokens into
    the past; ``nystrom`` approximates bidirectional attention only.
    """

    def assign(self, selection, queries):
        xp, tokens = selection.xp, selection.Q if queries else selection.K
        mask = None if queries else selection.mask
        labels = segment_labels(xp, tokens.shape[-2], selection.num_landmarks, mask, array_api_compat.device(tokens),
                                selection.axis)
        if mask is None:
            # One labelling for every selection row (the tokens' leading dimensions, less a shared head axis): the
            # group means expand it along that axis, wherever it lies.
            rows = list(tokens.shape[:-1])
            if selection.head_axis is not None:
                rows.pop(selection.head_axis + 1)
            labels = xp.broadcast_to(labels, tuple(rows))
        return Grouping(labels)
