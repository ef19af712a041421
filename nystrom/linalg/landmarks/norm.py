r"""The library's default rule ``"norm"``, FNA's structure on weighted clusters: outlier tokens are one-token
landmarks, and weighted k-means clusters stand for every other token.

Pretrained transformers route much of their attention to a few *sink* tokens (CLS in BERT takes
about half of all attention in middle layers) and carry *massive* / *artifact* tokens whose
residual-stream norm dwarfs the others. A cluster mean would blur such a token into its neighbours,
so each becomes a landmark of its own (weight 1); the rest of the sequence is clustered
(:mod:`.kmeans`), and each cluster mean stands for its :math:`c_j` members (weight :math:`c_j`,
proportional attention). Without weights a one-token landmark next to clusters of about :math:`n/m`
tokens would be over-counted about :math:`n/m`-fold.

**Sinks** are found by what makes them sinks, the attention a key receives, from :math:`s` probe
queries spread over the sequence in :math:`O(s n d)`. Key :math:`j` is a sink when at least a
``sink_quorum`` fraction of the probes give it

.. math:: \mathrm{softmax}(\tau\, q_p K^\top)_j \ge \min(\rho / n_v,\ \alpha)

(:math:`n_v` real keys; :math:`\rho` is "times the uniform share", and the absolute share :math:`\alpha`
lets short sequences, where no key can reach :math:`\rho/n_v`, still have sinks). The quorum is what
separates a sink from a local peak: in early ViT layers attention is local, and a patch next to one
probe takes a large share from that probe only.

**Massive and artifact tokens** are found by their norm: when per-token ``features`` are passed (the
residual stream, where massive activations live; :func:`nystrom.torch.patching.patch` passes the block's
input hidden states by default), tokens with :math:`\lVert f_j\rVert \ge \nu\cdot
\mathrm{median}_i \lVert f_i\rVert` are singletons. The block input is the residual stream in pre-LN blocks
(ViTs, DINOv2) only: in post-LN blocks (BERT, MiniLM) it is a LayerNorm's output, where massive activations no
longer show (MiniLM's [CLS] at 0.67–0.84× the median norm there, docs' tokens page), so the test flags no token
and [CLS] is a singleton through ``first``. The *key* norm is no sink test: in all-MiniLM-L6-v2 the [CLS] sink
takes about half of the attention in layers 1–4 while its head-mean key norm is 0.72–1.25× the median (the 60
example sentences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_compat

from ..numerics import (
    at_least_float32,
    masked_median,
    mean_over,
    put_where,
    relative_norms,
    softmax,
    take_along_axis,
)
from ..sequence import WHOLE, first_token
from ..validation import (
    check_bool,
    check_int,
    check_positive,
    check_real,
    check_real_floating,
    check_token_mask,
    namespace,
)
from .base import ClusterStrategy, Grouping
from .kmeans import sampled_kmeans


def probe_logits(xp, Q, K, scale, mask=None, num_probes=16, axis=WHOLE):
    r"""Attention logits of evenly spaced probe queries, :math:`\tau\, q_p K^\top + M`.

    Parameters
    ----------
    xp
        Array namespace of the inputs.
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    scale : float
    mask : bool array, shape broadcastable to (..., n), optional
        Real keys. For self-attention (``n_q == n``) it also marks the real queries, and the probes
        are spread over those only, so padding never changes the estimate.
    num_probes : int
        Probe queries :math:`s`: ranks :math:`\lfloor i (n_v - 1)/(s - 1)\rfloor`, :math:`i < s`, among the
        :math:`n_v` real queries (deterministic; a sequence with fewer real queries repeats some).
    axis : WholeSequence
        The token axis (:mod:`nystrom.linalg.sequence`): on a sharded one, ``Q``, ``K`` and ``mask`` are this
        process's shard, the probes are those of the whole sequence (gathered from the processes that hold them,
        :math:`O(s d)` sent) and the logits are those of the shard's keys.

    Returns
    -------
    array, shape (..., s, n)
        One row of logits per probe (``-inf`` on padding), in float32 or wider.
    """
    # Shares of a few percent must be resolved: accumulate in float32 or wider.
    Q, K = at_least_float32(xp, Q), at_least_float32(xp, K)
    device = array_api_compat.device(Q)
    n_q = Q.shape[-2]
    total = axis.length(n_q)
    real_queries = mask is not None and n_q == K.shape[-2]
    if real_queries:
        mask = xp.broadcast_to(mask, tuple(K.shape[:-1]))
        filled, before, n_valid = axis.cumulative_count(xp, mask)
    else:
        n_valid = xp.full(tuple(Q.shape[:-2]) + (1,), total, dtype=xp.int64, device=device)
    # The probe count never depends on the data: no host synchronisation.
    s = min(num_probes, total)
    ranks = (xp.arange(s, device=device) * (n_valid - 1)) // max(s - 1, 1)
    if real_queries:
        # Row of the real query of rank r: the number of rows holding at most r real ones.
        rows, held = axis.rows_of_ranks(xp, filled, before, ranks)
    else:
        rows, held = axis.local(xp, ranks, n_q)
    probes = scale * axis.gather(xp, Q, rows, held)
    # The orientation that, with the softmax that follows, runs fastest (torch, 8 probes, d = 64). One sequence (one
    # matrix or several heads): (s q) K^T, whose (s, n) logits the softmax reads contiguously (the whole norm selection
    # at (1, 6, 5,477) in the (B, n, H, d) memory of a model's projections: 21.8 -> 18.0 ms on one thread, 16.5 -> 14.6
    # ms on two; (1, 12, 16,384): 37.0 -> 31.0 and 23.3 -> 21.3 ms). For one matrix the CPUs disagree: on an Intel
    # Xeon (family 6, model 167) the product and softmax took 1.25 against 1.62 ms at (1, 1, 65,536) on two threads,
    # 3.5 against 4.3 on one, and 0.27 against 0.38 / 6.9 against 9.4 ms at 16,384 / 262,144 keys on two (cold
    # caches; the whole selection 7.0-7.2 against 7.6-7.7 ms); on an AMD EPYC faster at 16,384, even at 65,536 and
    # slower at 262,144 on two threads. Several sequences in that memory: K (s q)^T, which spares a copy of K.
    if math.prod(K.shape[:-3]) == 1:
        logits = probes @ xp.matrix_transpose(K)
    else:
        logits = xp.matrix_transpose(K @ xp.matrix_transpose(probes))
    if mask is not None:
        logits = xp.where(mask[..., None, :], logits, xp.full((), -float("inf"), dtype=logits.dtype, device=device))
    return logits


def quorum_votes(quorum, num_probes):
    r"""The probes a sink needs: the fewest :math:`c` with :math:`c / s \ge` ``quorum``, :math:`\lceil q s\rceil`, in
    exact integer arithmetic on the float ``quorum`` as it is stored (``fractions.Fraction`` would break a
    ``torch.compile`` graph)."""
    numerator, denominator = quorum.as_integer_ratio()
    return -(-numerator * num_probes // denominator)


def attention_share(xp, Q, K, scale, mask=None, num_probes=16):
    r"""Estimated share of attention each key receives: the mean of the probes' attention rows,
    :math:`\hat a_j = \frac1s\sum_p \mathrm{softmax}(\tau\, q_p K^\top)_j`.

    Parameters
    ----------
    xp
        Array namespace of the inputs.
    Q, K, scale, mask, num_probes
        As for :func:`probe_logits`: 16 probes by default, a finer estimate for analysis than the 8 of the ``norm``
        rule's sink test (:attr:`Norm.num_probes`); pass ``num_probes=8`` to reproduce the rule's estimate.

    Returns
    -------
    array, shape (..., n)
        :math:`\hat a_j`, summing to 1 over the keys of each sequence.

    Raises
    ------
    TypeError, ValueError
        Naming the argument: ``Q`` and ``K`` not floating arrays of one library with the same leading dimensions and
        feature size, a ``mask`` that is not bool or 0/1 of shape ``(..., n)`` with ``K``'s leading dimensions (or 1;
        a transformers ``(B, n)`` mask of ``(B, H, n, d)`` inputs is ambiguous when ``B = H`` and refused: give it
        ``mask[:, None, :]``), a non-positive ``scale`` or ``num_probes``.
    """
    # The inputs' own namespace, whatever xp was given (torch itself has no astype).
    xp = namespace(Q=Q, K=K, mask=mask)
    for name, a in (("Q", Q), ("K", K)):
        check_real_floating(xp, name, a)
    if Q.ndim < 2 or K.ndim != Q.ndim or Q.shape[:-2] != K.shape[:-2] or Q.shape[-1] != K.shape[-1]:
        raise ValueError(f"Q and K must be (..., n_q, d) and (..., n, d) with the same leading dimensions and d, got "
                         f"Q {tuple(Q.shape)} and K {tuple(K.shape)}")
    check_positive("scale", scale)
    check_int("num_probes", num_probes, minimum=1)
    if mask is not None:
        mask = check_token_mask(xp, mask, tuple(K.shape[:-1]), "mask")
    return xp.mean(softmax(xp, probe_logits(xp, Q, K, scale, mask, num_probes)), axis=-2)


@dataclass(frozen=True)
class Norm(ClusterStrategy, name="norm", weighted=True, sharded=True):
    """High-norm tokens, attention sinks and CLS as one-token landmarks; weighted k-means clusters for the rest.

    Parameters
    ----------
    sink_ratio : float
        :math:`\\rho`: a key is a sink for a probe when it takes at least ``sink_ratio`` times the uniform
        share :math:`1/n_v` of that probe's attention ...
    sink_share : float
        ... or at least this absolute share :math:`\\alpha`.
    sink_quorum : float
        ... in at least this fraction of the probes. The defaults were chosen by measurement on the
        bundled DINOv2-S and MiniLM (docs' landmark page, "Sinks").
    norm_ratio : float
        :math:`\\nu`: a token whose ``features`` norm is at least ``norm_ratio`` times the median is a
        singleton (only when ``features`` are passed).
    max_singleton_fraction : float
        At most this fraction of the ``m`` landmarks (at least one, and never all) are singletons: ``first``,
        then high-norm tokens, then sinks (those that pass the quorum), each by attention share.
    num_probes : int
        Probe queries for the sink test.
    first : int or None
        A token that is always a singleton, counted among the real tokens (``0``: CLS, also under left padding;
        negative: from the last real token); ``None`` for none.
    iters, sample_size, assign_all
        Of the k-means behind the clusters (:class:`~nystrom.linalg.landmarks.KMeans`).

    Notes
    -----
    Deterministic (``seed`` is not used). Cost :math:`O(s n d)` for the probes, :math:`O(s_k m D)` per Lloyd
    step on the k-means sample of :math:`s_k = \\max(1024, 16m)` tokens (:math:`O(n m D)` with ``assign_all``),
    and for the means :math:`O(s_k d)`, or :math:`O(n d)` where the sample holds at least half the tokens.
    """

    sink_ratio: float = 16.0
    sink_share: float = 0.25
    sink_quorum: float = 0.5
    norm_ratio: float = 10.0
    max_singleton_fraction: float = 0.25
    num_probes: int = 8
    first: int | None = 0
    iters: int = 2
    sample_size: int | None = None
    assign_all: bool = False

    def __post_init__(self):
        for field in ("sink_ratio", "sink_share", "norm_ratio"):
            if not (check_real(f"Norm {field}", getattr(self, field)) > 0):
                raise ValueError(f"Norm {field} must be positive, got {getattr(self, field)!r}")
        for field in ("sink_quorum", "max_singleton_fraction"):
            if not (0 < check_real(f"Norm {field}", getattr(self, field)) <= 1):
                raise ValueError(f"Norm {field} must be in (0, 1], got {getattr(self, field)!r}")
        check_int("Norm num_probes", self.num_probes, minimum=1)
        check_int("Norm iters", self.iters, minimum=0)
        check_int("Norm first", self.first, minimum=None, optional=True)
        check_int("Norm sample_size", self.sample_size, minimum=1, optional=True)
        check_bool("Norm assign_all", self.assign_all)

    def assign(self, selection, queries):
        xp, m = selection.xp, selection.num_landmarks
        if queries:
            # Cross-attention: sinks and outliers are keys; query landmarks are plain clusters.
            return sampled_kmeans(xp, selection.query_points, m, None, iters=self.iters,
                                  sample_size=self.sample_size, assign_all=self.assign_all)
        X, mask = selection.points, selection.mask
        device = array_api_compat.device(X)
        budget = min(max(1, int(self.max_singleton_fraction * m)), m - 1)
        axis = selection.axis
        if budget == 0:
            return sampled_kmeans(xp, X, m, mask, iters=self.iters, sample_size=self.sample_size,
                                  assign_all=self.assign_all, axis=axis)
        candidates, real = self.singletons(selection, budget)
        # Real singletons come first among the candidates, so row r has g_r of them, and they take the last g_r
        # slots while k-means fills the first m - g_r: no row waits for another.
        count = xp.sum(xp.astype(real, xp.int64), axis=-1, keepdims=True)
        slot = xp.where(real, (m - count) + xp.arange(budget, device=device), -xp.ones_like(candidates))
        # The candidates are global positions; rows of this array, and whether it holds them (None: all).
        rows, held = axis.local(xp, candidates, X.shape[-2])
        single = put_where(xp, xp.zeros(X.shape[:-1], dtype=xp.bool, device=device), rows, real, held)
        eligible = ~single if mask is None else mask & ~single
        active = xp.arange(m, device=device) < (m - count)
        clusters = sampled_kmeans(xp, X, m, eligible, iters=self.iters, sample_size=self.sample_size,
                                  active=active, assign_all=self.assign_all, axis=axis)
        labels = put_where(xp, clusters.labels, rows, slot, real if held is None else real & held)
        if clusters.tokens is None:
            return Grouping(labels)
        ones = xp.ones(candidates.shape, dtype=X.dtype, device=device)
        if held is not None:
            slot = xp.where(held, slot, -xp.ones_like(slot))
        return Grouping(labels, tokens=xp.concat([clusters.tokens, rows], axis=-1),
                        token_labels=xp.concat([clusters.token_labels, slot], axis=-1),
                        weights=xp.concat([xp.broadcast_to(clusters.weights, clusters.tokens.shape), ones], axis=-1))

    def singletons(self, selection, budget):
        r"""The ``budget`` candidate singletons ``(..., budget)`` of the selection rows and which of them are real
        ``(..., budget)``, real ones first: ``first``, high-norm tokens, then sinks (the tokens that pass the quorum),
        by attention share.

        The probes' attention is one :math:`s\times n` product and one softmax, and the quorum one comparison of it
        (:meth:`analysis`, once per search over :math:`m`).
        """
        xp, axis = selection.xp, selection.axis
        # Keyed by the class (a subclass may analyse otherwise) and what the analysis reads of this rule, as
        # constants, which a compiler traces as such.
        key = (type(self).__qualname__ + ".analysis", self.num_probes, self.norm_ratio, self.first, self.sink_ratio,
               self.sink_share, self.sink_quorum)
        single, priority = selection.once(key, lambda: self.analysis(selection))
        candidates = axis.top_k(xp, priority, budget)
        real = axis.take(xp, single, candidates)
        order = xp.argsort(xp.astype(~real, xp.int64), axis=-1, stable=True)
        return take_along_axis(xp, candidates, order), take_along_axis(xp, real, order)

    def analysis(self, selection):
        """What the singleton choice reads, whatever the number of landmarks: the tokens that are singletons when
        the budget allows (``first``, high-norm tokens and sinks, ``(..., n)``) and their priority ``(..., n)``:
        ``first``, then high-norm tokens, then sinks, then the others, each by its share of the probes' attention
        (heads averaged when shared), padding last.

        A sink passes the quorum: in at least ``sink_quorum`` of the probes it takes the threshold share. The quorum
        is tested on every token before the ranking, so a local peak (a large mean share from a few probes) never
        takes the place of a sink (a review: it did when the quorum read only the top candidates by share)."""
        xp, K, mask, head_axis = selection.xp, selection.K, selection.mask, selection.head_axis
        padding = selection.real_keys
        padding = None if padding is None else xp.broadcast_to(padding, tuple(K.shape[:-1]))
        axis = selection.axis
        attention = axis.softmax(xp, probe_logits(xp, selection.Q, K, selection.scale, padding, self.num_probes, axis))
        if head_axis is not None:
            attention = mean_over(xp, attention, head_axis)
        share = xp.mean(attention, axis=-2)
        # Logits past the dtype's range (float32 keys of about 1e19: float32 SDPA is NaN there too) make NaN shares,
        # which torch's top-k ranks first, above CLS: they count as no share (and the quorum, a comparison, gives NaN
        # rows no vote).
        device, dtype = array_api_compat.device(share), share.dtype
        share = xp.where(xp.isnan(share), xp.zeros((), dtype=dtype, device=device), share)
        n = axis.length(share.shape[-1])
        if mask is None:
            # A Python number: the array library would copy it to the device as a tensor of its own.
            threshold = min(self.sink_ratio / n, self.sink_share)
        else:
            n_valid = axis.sum(xp.sum(xp.astype(mask, dtype), axis=-1, keepdims=True))
            threshold = xp.minimum(self.sink_ratio / n_valid, xp.full((), self.sink_share, dtype=dtype,
                                                                        device=device))[..., None]
        # Votes counted in int8 rather than averaged in the shares' dtype: a quarter of the memory over s x n; and
        # summed in it too (int16 past 127 probes): the default sum widened them to int64 first (0.33 against 0.15 ms
        # for 8 x 65,536 on two threads).
        count = xp.int8 if attention.shape[-2] <= 127 else xp.int16
        votes = xp.sum(xp.astype(attention >= threshold, count), axis=-2, dtype=count)
        sinks = votes >= quorum_votes(self.sink_quorum, attention.shape[-2])
        forced = xp.zeros(share.shape, dtype=xp.bool, device=device)
        if selection.features is not None:
            norms = relative_norms(xp, selection.points, mask)
            # Positive norms only: with a median of 0 (most features zero) every token passed (a review).
            forced = (norms >= self.norm_ratio * masked_median(xp, norms, mask)[..., None]) & (norms > 0)
        priority = share + xp.astype(sinks, dtype) + 2 * xp.astype(forced, dtype)
        if self.first is not None:
            is_first = first_token(xp, share.shape[-1], self.first, mask, axis, device)
            forced = forced | is_first
            priority = xp.where(is_first, xp.full((), 4.0, dtype=dtype, device=device), priority)
        single = forced | sinks
        if mask is not None:
            single = single & mask
            priority = xp.where(mask, priority, xp.full((), -1.0, dtype=dtype, device=device))
        return single, priority
