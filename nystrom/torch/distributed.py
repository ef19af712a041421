r"""Sequence-parallel Nyström attention: the token axis sharded across the processes of a ``torch.distributed`` group.

Process :math:`r` of :math:`P` holds the contiguous shard :math:`\mathcal S_r` of :math:`n_r` tokens (shards in
rank order, :math:`n = \sum_r n_r`, sizes free) of ``Q``, ``K`` and ``V`` (self-attention), and gets its shard of

.. math:: \hat O = \mathrm{softmax}(\tau Q \tilde k^\top)\, A^{+}\, \mathrm{softmax}(\tau \tilde q K^\top + M)\, V .

Three steps, each with messages whose size does not grow with :math:`n`.

**Landmarks**, the ones the concatenated sequence gets from the same strategy: the selection reads the token
axis through :class:`ShardedSequence` (:mod:`nystrom.linalg.sequence`). The default ``"norm"`` gathers its
probe queries and the evenly spaced k-means sample from the processes that hold them (an all-reduce of rows
that one process fills and the others leave 0), normalises the probes' attention over all keys with an
all-reduced maximum and sum, finds the sink candidates among each shard's top-k, and adds the per-cluster
sums of ``Q`` and ``K`` over the shards; the clustering itself runs on the gathered sample, identically on
every process.

**Landmark product** :math:`BV = \mathrm{softmax}(\tau\tilde q K^\top + M)V`, split over the shards' keys:
each process reduces its keys to the partial results :math:`(\hat o_r, \lambda_r)` of
:func:`nystrom.linalg.split_keys.partial_attention` (its shard's attention output and log-sum-exp), and with
:math:`\mu = \max_r \lambda_r` (one all-reduce) and :math:`w_r = e^{\lambda_r - \mu} / P` over :math:`P` processes

.. math:: BV = \frac{\sum_r w_r\, \hat o_r}{\sum_r w_r}

(one all-reduce of the stacked numerator and denominator): the exact softmax over all keys.

**Solve and output**: :math:`A` (:math:`m\times m`) and its pseudo-inverse are computed on every process from
the same landmarks, and :math:`\hat O_{\mathcal S_r} = \mathrm{softmax}(\tau Q_{\mathcal S_r} \tilde k^\top)
A^+ (BV)` needs only the shard's queries.

The docs' page "Sequence parallelism" lists the bytes each step sends and how to run it under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pickle
import secrets

import torch
import torch.distributed as dist

from ..linalg.attention import grouped_query_heads, in_query_chunks, nystrom_product
from ..linalg.landmarks.base import STRATEGIES, Selection, Strategy, gather_rows, get_strategy, run_strategy
from ..linalg.numerics import stable_top_k, top_k_candidates, without_padding
from ..linalg.sequence import WholeSequence
from ..linalg.solvers import Solver, get_solver, unchecked
from ..linalg.split_keys import merge_partials, partial_attention
from ..linalg.validation import (
    check_attention_inputs,
    check_bidirectional,
    check_bool,
    check_num_landmarks,
    check_query_chunk_size,
    check_scale,
    check_seed,
    check_unknown_arguments,
    every_key_a_landmark,
)
from .attention import sdpa_attend
from .forward_mode import has_tangent

__all__ = ["ShardedSequence", "Traffic", "sharded_approximate", "traffic"]


@dataclasses.dataclass
class Traffic:
    """Payload of the collectives one process entered, as :func:`traffic` records them.

    Attributes
    ----------
    calls : list of (str, int)
        ``(collective, bytes)`` in call order: the bytes of the tensor this process passed in (for an
        ``all_gather``, its own contribution; for ``all_gather_object``, its pickled object).
    """

    calls: list = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Total payload bytes."""
        return sum(size for _, size in self.calls)


_RECORDERS: list[Traffic] = []


@contextlib.contextmanager
def traffic():
    """Record the collectives of :mod:`nystrom.torch.distributed` on this process while the block runs.

    Yields
    ------
    Traffic

    Examples
    --------
    >>> with traffic() as sent:  # doctest: +SKIP
    ...     out = nystrom.approximate(Q, K, V, group=dist.group.WORLD)
    >>> sent.bytes, len(sent.calls)  # doctest: +SKIP
    """
    record = Traffic()
    _RECORDERS.append(record)
    try:
        yield record
    finally:
        _RECORDERS.remove(record)


def _note(op, size):
    for record in _RECORDERS:
        record.calls.append((op, int(size)))


class ShardedSequence(WholeSequence):
    """The token axis sharded across the processes of a group: :class:`~nystrom.linalg.sequence.WholeSequence`'s
    operations as collectives, each of a size independent of :math:`n`.

    Parameters
    ----------
    group : ProcessGroup
        The processes holding the sequence, shards in rank order.
    lengths : sequence of int
        :math:`n_r`, the tokens of each process's shard.
    """

    sharded = True

    def __init__(self, group, lengths):
        self.group = group
        self.lengths = tuple(int(n) for n in lengths)
        self.index = dist.get_rank(group)
        self.offset = sum(self.lengths[:self.index])
        self.total = sum(self.lengths)

    def _reduce(self, a, op):
        a = a.clone(memory_format=torch.contiguous_format)
        _note("all_reduce", a.numel() * a.element_size())
        dist.all_reduce(a, op=op, group=self.group)
        return a

    def _gather(self, a):
        """All processes' ``a`` (equal shapes), in rank order."""
        a = a.contiguous()
        parts = [torch.empty_like(a) for _ in self.lengths]
        _note("all_gather", a.numel() * a.element_size())
        dist.all_gather(parts, a, group=self.group)
        return parts

    def whole(self, a, dim):
        """Every process's ``a`` concatenated along ``dim``, its token axis (``lengths``, one per process)."""
        shape = list(a.shape)
        shape[dim] = max(self.lengths)
        # gloo gathers no bools: as bytes.
        padded = torch.zeros(shape, dtype=torch.uint8 if a.dtype == torch.bool else a.dtype, device=a.device)
        padded.narrow(dim, 0, a.shape[dim]).copy_(a)
        whole = torch.cat([part.narrow(dim, 0, n) for part, n in zip(self._gather(padded), self.lengths)], dim=dim)
        return whole.bool() if a.dtype == torch.bool else whole

    def length(self, n):
        return self.total

    def positions(self, xp, n, device=None):
        return xp.arange(n, device=device) + self.offset

    def sum(self, a):
        return self._reduce(a, dist.ReduceOp.SUM)

    def max(self, a):
        return self._reduce(a, dist.ReduceOp.MAX)

    def softmax(self, xp, logits):
        # Every row has a real key somewhere, so the global maximum is finite; a shard of padding adds 0.
        e = xp.exp(logits - self.max(xp.max(logits, axis=-1, keepdims=True)))
        return e / self.sum(xp.sum(e, axis=-1, keepdims=True))

    def cumulative_count(self, xp, mask):
        filled = xp.cumulative_sum(xp.astype(mask, xp.int64), axis=-1)
        counts = self._gather(filled[..., -1:])
        return filled, sum(counts[:self.index], xp.zeros_like(counts[0])), sum(counts[1:], counts[0])

    def rows_of_ranks(self, xp, filled, before, ranks, real=None):
        local = ranks - before
        held = (local >= 0) & (local < filled[..., -1:])
        if real is not None:
            held = held & real
        rows, _ = super().rows_of_ranks(xp, filled, 0, xp.clip(local, min=0))
        return rows, held

    def local(self, xp, positions, n):
        rows = positions - self.offset
        return xp.clip(rows, min=0, max=n - 1), (rows >= 0) & (rows < n)

    def gather(self, xp, X, rows, held=None):
        picked = gather_rows(xp, X, rows)
        if held is not None:
            picked = xp.where(held[..., None], picked, xp.zeros_like(picked))
        return self.sum(picked)

    def take(self, xp, a, positions):
        if positions.ndim < a.ndim:
            positions = xp.broadcast_to(positions[..., None, :], (*a.shape[:-1], positions.shape[-1]))
        rows, held = self.local(xp, positions, a.shape[-1])
        picked = xp.take_along_axis(a, rows, axis=-1)
        if picked.dtype == xp.bool:
            return self.sum(xp.astype(picked & held, xp.int32)) > 0
        return self.sum(xp.where(held, picked, xp.zeros_like(picked)))

    def argmax(self, xp, values):
        # Each shard's first largest entry as a (value, position) pair; the first shard wins a tie, as the lowest
        # position does in one array.
        best = xp.argmax(values, axis=-1)
        value = xp.take_along_axis(values, best[..., None], axis=-1)[..., 0]
        own = xp.stack([xp.astype(value, xp.float64), xp.astype(best + self.offset, xp.float64)], axis=-1)
        pairs = xp.stack(self._gather(own), axis=-2)
        winner = xp.argmax(pairs[..., 0], axis=-1)
        return xp.astype(xp.take_along_axis(pairs[..., 1], winner[..., None], axis=-1)[..., 0], xp.int64)

    def top_k(self, xp, values, k):
        # Each shard sends its candidates (top_k_candidates: its entries above its k-th largest value t, and the k
        # lowest positions holding t), which hold every entry of the global answer, ties included; the answer is a
        # stable sort of them all, as one process holding the whole sequence makes it (the review of 2026-12-01 found
        # 60 of 1,152 tied cases that picked another position than one process did when shards sent Tensor.topk's
        # picks). One message of (value, position) pairs in float64, exact for both; short shards pad with -inf at
        # position n, which no process holds.
        own = min(k, values.shape[-1])
        value, position = top_k_candidates(xp, values, own)
        position = xp.where(position < values.shape[-1], position + self.offset,
                            xp.full((), self.total, dtype=xp.int64, device=values.device))
        pairs = xp.stack([xp.astype(value, xp.float64), xp.astype(position, xp.float64)], axis=-1)
        if own < k:
            pad = xp.full((*pairs.shape[:-2], 2 * (k - own), 2), -math.inf, dtype=xp.float64, device=values.device)
            pad[..., 1] = self.total
            pairs = xp.concat([pairs, pad], axis=-2)
        pairs = xp.concat(self._gather(pairs), axis=-2)
        return xp.astype(stable_top_k(xp, pairs[..., 0], pairs[..., 1], k), xp.int64)


def _shard_attend(xp, axis, q, k, v, mask=None, *, scale):
    """:math:`\\mathrm{softmax}(\\tau q K^\\top + M) V` over the keys of every shard: this shard's partial results,
    merged over the group by :func:`~nystrom.linalg.split_keys.merge_partials`."""
    o, lse = partial_attention(xp, q, k, v, mask, scale=scale)
    return xp.astype(merge_partials(xp, o, lse, across=axis), v.dtype)


def sharded_approximate(Q, K, V, *, group, strategy="norm", num_landmarks=64, solver="newton_schulz", scale=None,
                        attn_mask=None, seed=None, share_landmarks_across_heads=True, query_chunk_size=None,
                        check_values=True, unsupported=None, is_causal=False, dropout_p=0.0, enable_gqa=False,
                        **unknown):
    r"""Nyström attention of a sequence sharded along its token axis across ``group``: this process's shard of
    :func:`nystrom.approximate`'s output on the concatenated shards.

    ``nystrom.approximate(Q, K, V, group=group, ...)`` calls it. Every process of ``group`` must call it, with
    the same settings; the result equals that of one process holding the whole sequence up to rounding (the
    landmarks are the same; sums over the shards are added in another order).

    Parameters
    ----------
    Q, K, V : Tensor, shapes (..., n_r, d), (..., n_r, d), (..., n_r, d_v)
        This process's shard (self-attention: queries sharded like the keys), on the device its backend
        communicates from (CPU for gloo, the process's GPU for NCCL). Shards are in rank order; :math:`n_r \ge 1`
        may differ between processes, the leading dimensions, :math:`d`, :math:`d_v` and the dtype may not.
    group : ProcessGroup
        The processes holding the sequence (``torch.distributed.group.WORLD`` for all).
    strategy : str or Strategy
        A strategy declared ``sharded``: ``"norm"`` (default), ``"kmeans"``, ``"segment_means"``, ``"uniform"``,
        ``"fps"`` or such an object (``"rpcholesky"`` is not).
    num_landmarks, solver, scale, seed, share_landmarks_across_heads, query_chunk_size, check_values
        As for :func:`nystrom.approximate`; ``num_landmarks`` is checked against the whole sequence. Without a
        ``seed``, ``"uniform"`` uses process 0's fresh one on every process. With a mask and every real key a
        landmark (``num_landmarks`` the real keys of every sequence) the answer is exact attention, as
        ``approximate``'s, over the shards' keys and values gathered (:math:`O(n (d + d_v))` sent).
    attn_mask : Tensor, optional
        This shard's key mask ``(..., 1, n_r)`` (or ``(n_r,)``, transformers' ``(B, n_r)``), as
        :func:`nystrom.approximate` takes it; a shard may be all padding, the sequence may not.
    unsupported : dict, optional
        :func:`nystrom.approximate`'s arguments that a sharded call does not take, by name, as given.
    is_causal, dropout_p
        SDPA's, accepted at ``False`` and 0 only, as by :func:`nystrom.approximate`.
    enable_gqa : bool
        SDPA's: repeat each of the shard's key/value heads for the query heads it serves, as
        :func:`nystrom.approximate` does.

    Returns
    -------
    Tensor, shape (..., n_r, d_v)
        This process's shard of the output.

    Raises
    ------
    TypeError, ValueError
        As :func:`nystrom.approximate`, on every process when any process's arguments are wrong (its message says
        which process and why) or when the processes' shapes or settings disagree; ``ValueError`` also for a
        strategy that cannot select over shards (the message lists those that can) and for the arguments a
        sharded call does not take (``return_info``, ``features``, ``tol``) and for inputs that require grad while
        autograd records. No process is left waiting, provided every process passes the same ``group``: the group
        is what the processes compare their arguments over, so one process with another group (or none) leaves the
        others waiting in that comparison until the backend's timeout.
    RuntimeError
        Without an initialised ``torch.distributed``.

    Notes
    -----
    Sent per process and call (payload into the collectives; :func:`traffic` records them): a settings check of a
    few hundred bytes, then for ``"norm"``, with :math:`B` sequences of :math:`H` heads sharing landmarks and
    :math:`b` bytes per element (float32 or wider), about

    .. math:: B H s_p (d + 2 + k)\, b + 36 B k + (8 + b) B + B s d\, b + 2 B (H d + 1) m\, b + B H m (d_v + 2)\, b

    bytes: the :math:`s_p = 8` probe queries, their softmax, the :math:`k` sink candidates (their columns, pairs and
    flags), the ranks and the eligible count, the k-means sample of :math:`s = \min(n, \max(1024, 16m))` tokens, the
    landmarks' sums and cluster sizes, and the landmark product (187,180 bytes at :math:`(B, H, d, m) = (1, 4, 32,
    32)` in float32, as :func:`traffic` records). Nothing grows with
    :math:`n` beyond :math:`s`; the docs' page "Sequence parallelism" lists every strategy. Forward only:
    ``torch.distributed``'s collectives carry no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()):
        # No collective can run: this process's own error is safe to raise alone, and says more.
        _check_tensors(Q, K, V)
        raise RuntimeError("group= needs torch.distributed initialised (torch.distributed.init_process_group)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"group: this process (rank {dist.get_rank()}) is not a member of the group it was given "
                         "(torch.distributed.new_group returns a placeholder to the other processes); call "
                         "approximate with group= on the group's members only")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD), got "
                        f"{type(group).__name__}")
    size = dist.get_world_size(group)
    try:
        check_unknown_arguments("approximate", unknown)
        check_bidirectional(is_causal, dropout_p)
        kv_heads = K.shape[-3] if getattr(K, "ndim", 0) >= 3 else None
        grouped = check_bool("enable_gqa", enable_gqa)
        if grouped:
            K, V = grouped_query_heads(Q, K, V)
        checked = _check_shard(Q, K, V, strategy, num_landmarks, solver, scale, attn_mask, seed,
                               share_landmarks_across_heads, query_chunk_size, check_values, unsupported or {})
        # Shards that repeat different key/value head counts to the same shape are still different inputs.
        checked["report"]["settings"].update(enable_gqa=grouped, kv_heads=kv_heads)
        error = None
    except Exception as exc:  # noqa: BLE001 - whatever this process's checks raise, the others must hear of it
        checked, error = None, exc
    report = {"error": None if error is None else f"{type(error).__name__}: {error}", "rank": dist.get_rank()}
    if checked is not None:
        report.update(checked["report"])
    reports = [None] * size
    _note("all_gather_object", len(pickle.dumps(report)))
    dist.all_gather_object(reports, report, group=group)
    _agree(reports, error)
    xp, keys, tau, select, solve, m, head_axis, chunk = (checked[name] for name in (
        "xp", "keys", "tau", "select", "solve", "m", "head_axis", "chunk"))
    axis = ShardedSequence(group, [r["n"] for r in reports])
    seed = reports[0]["seed"]
    if keys is not None:
        rows = tuple(max(r["mask_rows"][i] for r in reports) for i in range(len(reports[0]["mask_rows"])))
        keys = xp.broadcast_to(keys, (*rows, keys.shape[-1]))
        real = axis.sum(xp.sum(xp.astype(keys, xp.int64), axis=-1))
        fewest = int(xp.min(real)) if check_values else None
        if check_values and fewest == 0:
            raise ValueError("attn_mask masks every key of at least one sequence (over all shards); each needs a "
                             "real key")
    else:
        fewest = None
    check_num_landmarks(m, axis.total, fewest)
    K, V = without_padding(xp, keys, K, V)
    if every_key_a_landmark(m, axis.total, False, keys is not None, fewest, lambda: int(xp.max(real))):
        # Every real key a landmark, as approximate answers it: exact attention (the queries at masked keys are no
        # landmark queries, exact through the formula only by A^+ A = I; a review: 0.15 off the single process). The
        # shards' keys and values are gathered: O(n (d + d_v)) sent, what the landmarks themselves send at this m.
        attend = in_query_chunks(functools.partial(sdpa_attend, scale=tau), chunk)
        return attend(Q, axis.whole(K, -2), axis.whole(V, -2), axis.whole(keys, -1)[..., None, :])
    selection = Selection.of(xp, Q, K, m, keys, seed, head_axis, None, tau, axis=axis)
    # A user's sharded subclass is checked as on one process (a review: one that returned m - 1 landmarks was refused
    # there and accepted here).
    landmarks = run_strategy(select, selection, check_values)
    attend = in_query_chunks(functools.partial(sdpa_attend, scale=tau), chunk)
    out, _ = nystrom_product(xp, Q, K, V, landmarks, unchecked(solve), scale=tau,
                             mask=None if keys is None else keys[..., None, :], attend=attend,
                             landmark_attend=functools.partial(_shard_attend, xp, axis, scale=tau))
    return out


def _check_tensors(Q, K, V):
    """``TypeError`` unless ``Q``, ``K`` and ``V`` are torch tensors."""
    for name, a in (("Q", Q), ("K", K), ("V", V)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor with group=, got {type(a).__name__}")


def _check_shard(Q, K, V, strategy, num_landmarks, solver, scale, attn_mask, seed, share_landmarks_across_heads,
                 query_chunk_size, check_values, unsupported):
    """This process's checks of a sharded call (no communication); returns the checked values and the report
    that the processes compare."""
    # "is", not "in (None, False)": a tensor compared with == is no bool, and 0 is a value given.
    given = sorted(name for name, value in unsupported.items() if value is not None and value is not False)
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used with group= (a sharded sequence); leave them out")
    check_values = check_bool("check_values", check_values)
    _check_tensors(Q, K, V)
    if (torch.is_grad_enabled() and any(a.requires_grad for a in (Q, K, V))) or any(has_tangent(a) for a in (Q, K, V)):
        raise ValueError("group= computes the forward pass only (torch.distributed's collectives carry no gradient), "
                         "and Q, K or V requires grad or carries a forward-mode tangent; call it under "
                         "torch.no_grad() or pass detached tensors")
    if K.ndim >= 2 and K.shape[-2] == 0:
        raise ValueError(f"with group=, every process's shard needs at least one token; this one's K has shape "
                         f"{tuple(K.shape)} (split the sequence over fewer processes, or pad each shard, masking the "
                         "padding)")
    xp, keys = check_attention_inputs(Q, K, V, attn_mask, check_values=check_values, shard=True)
    if Q.shape[-2] != K.shape[-2]:
        raise ValueError(f"group= takes self-attention shards (the queries sharded like the keys), got {Q.shape[-2]} "
                         f"queries and {K.shape[-2]} keys")
    check_bool("share_landmarks_across_heads", share_landmarks_across_heads)
    chunk = check_query_chunk_size(query_chunk_size)
    tau = check_scale(scale, Q.shape[-1])
    seed = check_seed(seed)
    select = get_strategy(strategy)
    if not (isinstance(select, Strategy) and select.sharded):
        names = ", ".join(repr(name) for name, cls in STRATEGIES.items() if cls.sharded)
        raise ValueError(f"strategy {strategy!r} cannot select over a sharded sequence; those that can: {names} "
                         "(or such a strategy object)")
    solve = get_solver(solver)
    m = check_num_landmarks(num_landmarks, None)
    head_axis = -3 if (share_landmarks_across_heads and K.ndim >= 4) else None
    report = {
        "n": K.shape[-2], "lead": tuple(K.shape[:-2]), "d": Q.shape[-1], "d_v": V.shape[-1], "dtype": str(Q.dtype),
        "mask_rows": None if keys is None else tuple(keys.shape[:-1]),
        # A callable solver's repr holds its address, different on every process: its name stands for it, as does
        # the class's for a strategy object without a repr of its own (dataclasses have one, of their parameters).
        "settings": {"strategy": repr(select) if type(select).__repr__ is not object.__repr__
                     else f"{type(select).__module__}.{type(select).__qualname__}",
                     "solver": repr(solve) if isinstance(solve, Solver) else getattr(solve, "__qualname__", ""),
                     "num_landmarks": m, "scale": tau, "share_landmarks_across_heads": head_axis is not None,
                     "check_values": check_values, "seed": seed},
        # Without a seed the random strategies take process 0's fresh one.
        "seed": secrets.randbelow(2**63) if seed is None else seed,
    }
    return {"xp": xp, "keys": keys, "tau": tau, "select": select, "solve": solve, "m": m, "head_axis": head_axis,
            "chunk": chunk, "report": report}


def _agree(reports, error):
    """Raise on every process when any process's arguments were wrong or the processes disagree."""
    def process(rank):
        # The rank in the group, and in the world where they differ: a subgroup's rank 1 may be the world's rank 2
        # (a review: the message read like an accusation of the world's rank 1).
        world = reports[rank]["rank"]
        return f"process {rank} of the group" + ("" if world == rank else f" (global rank {world})")

    failed = [(rank, r["error"]) for rank, r in enumerate(reports) if r["error"] is not None]
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise ValueError(f"{process(rank)} rejected its arguments: {message}")
    first = reports[0]
    for field, what in (("lead", "leading (batch/head) dimensions"), ("d", "feature size d"),
                        ("d_v", "value size d_v"), ("dtype", "dtype")):
        values = [r[field] for r in reports]
        if any(v != values[0] for v in values):
            raise ValueError(f"the processes of the group must agree on the {what}, got {values} (in rank order)")
    # Named, and only the settings that differ: a whole settings tuple per process was hundreds of characters to
    # compare by eye.
    settings = [r["settings"] for r in reports]
    differ = [name for name in settings[0] if any(other[name] != settings[0][name] for other in settings)]
    if differ:
        raise ValueError("the processes of the group must agree on " + "; ".join(
            f"{name}, got {[other[name] for other in settings]}" for name in differ) + " (in rank order)")
    given = [rank for rank, r in enumerate(reports) if r["mask_rows"] is not None]
    if 0 < len(given) < len(reports):
        raise ValueError(f"attn_mask must be given on every process of the group or on none, got it on "
                         f"{', '.join(map(process, given))} of {len(reports)}")
    if first["mask_rows"] is not None and len({len(r["mask_rows"]) for r in reports}) > 1:
        raise ValueError(f"the key masks' shapes differ between processes: {[r['mask_rows'] for r in reports]}")
