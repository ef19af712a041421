r"""Where the token axis lives: whole in one array (:class:`WholeSequence`), or sharded across processes.

Landmark selection reads the token axis through a handful of operations: the global length, the rank of an
eligible token among all eligible ones, the rows at chosen positions, the softmax over all keys, the largest
entries over all keys, and sums and maxima of per-token reductions. :class:`WholeSequence` implements them
on one array and is what every single-process call uses; the strategies that declare ``sharded``
(:data:`~nystrom.linalg.landmarks.base.CAPABILITIES`) write their selection against these operations only, so
:class:`nystrom.torch.distributed.ShardedSequence` (the same operations over a process group, each a collective
whose size does not grow with :math:`n`) makes them choose, on every process, the landmarks the concatenated
sequence would get.

Positions are *global* (positions in the whole sequence) where an operation says so, and *local* (rows of
this array) otherwise; for a whole sequence the two are the same.
"""

from __future__ import annotations

import array_api_compat

from .numerics import searchsorted_rows, softmax, take_along_axis, top_k


class WholeSequence:
    """The token axis held whole by this array: every operation is the plain single-array one.

    Attributes
    ----------
    sharded : bool
        ``False``: no other process holds tokens of the sequence.
    offset : int
        Global position of this array's first token (0).
    """

    sharded = False
    offset = 0

    def length(self, n: int) -> int:
        """The tokens of the whole sequence, given this array's ``n``."""
        return n

    def positions(self, xp, n: int, device=None):
        """Global positions ``(n,)`` of this array's tokens."""
        return xp.arange(n, device=device)

    def sum(self, a):
        """``a`` summed over the processes holding the sequence (here: ``a``)."""
        return a

    def max(self, a):
        """Elementwise maximum of ``a`` over the processes (here: ``a``)."""
        return a

    def softmax(self, xp, logits):
        """Row softmax ``(..., r, n)`` over the keys of the whole sequence."""
        return softmax(xp, logits)

    def cumulative_count(self, xp, mask):
        """Running count ``(..., n)`` of this array's eligible tokens (``mask``), the eligible tokens before it
        (0 here) and the total ``(..., 1)`` of the sequence."""
        filled = xp.cumulative_sum(xp.astype(mask, xp.int64), axis=-1)
        return filled, 0, filled[..., -1:]

    def rows_of_ranks(self, xp, filled, before, ranks, real=None):
        """Rows ``(..., k)`` of the eligible tokens of ``ranks`` (0-based among all eligible tokens, from
        :meth:`cumulative_count`'s ``filled`` and ``before``) and whether this array holds them (``None``: all
        ``real`` ones, ``real=None``: all). Ranks past the last eligible token give the last row."""
        n = filled.shape[-1]
        last = xp.full((), n - 1, dtype=xp.int64, device=array_api_compat.device(ranks))
        return xp.minimum(searchsorted_rows(xp, filled, ranks), last), real

    def local(self, xp, positions, n: int):
        """Rows ``(..., k)`` of global ``positions`` in this array of ``n`` tokens, and whether it holds them
        (``None``: all)."""
        return positions, None

    def gather(self, xp, X, rows, held=None):
        """``X[..., rows, :]`` ``(..., k, D)`` from the processes that hold them (``held``), the same on every
        process; rows not held by any process are unspecified."""
        from .landmarks.base import gather_rows

        return gather_rows(xp, X, rows)

    def take(self, xp, a, positions):
        """``a (..., n)`` (or ``(..., r, n)`` with ``positions`` broadcast over ``r``) at global ``positions
        (..., k)``, the same on every process."""
        if positions.ndim < a.ndim:
            positions = xp.broadcast_to(positions[..., None, :], (*a.shape[:-1], positions.shape[-1]))
        return take_along_axis(xp, a, positions)

    def argmax(self, xp, values):
        """Global position ``(...)`` of the largest entry of ``values (..., n)`` over the sequence, the first one on
        ties."""
        return xp.argmax(values, axis=-1)

    def top_k(self, xp, values, k: int):
        """Global positions ``(..., k)`` of the ``k`` largest entries of ``values (..., n)`` over the sequence,
        largest first."""
        return top_k(xp, values, k)


WHOLE = WholeSequence()
"""The token axis of every single-process call."""


def first_token(xp, n, first, mask=None, axis=WHOLE, device=None):
    """Where the ``first``-th real token is: a bool array ``(n,)``, or ``(..., n)`` with ``mask (..., n)``, True at
    that token of each row (a negative ``first`` counts from the last real token; a row with too few real tokens
    has none). Without a mask every token is real. Counted among the real tokens, so that token 0 is a sequence's
    [CLS] also under left padding, where position 0 is padding. On a sharded ``axis``, ranks and ``n`` are those
    of the whole sequence and the array is this process's shard."""
    total = axis.length(n)
    if not (-total <= first < total):
        raise ValueError(f"first={first} is not a token position for n={total}")
    if mask is None:
        return axis.positions(xp, n, device) == (first % total)
    filled, before, n_valid = axis.cumulative_count(xp, mask)
    rank = filled + before - 1
    target = first if first >= 0 else n_valid + first
    return mask & (rank == target)
