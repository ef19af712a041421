r"""What every landmark strategy shares: the :class:`Strategy` base classes, the :class:`Landmarks` result and
the batching helpers.

A strategy is a :class:`Strategy` object, or any callable

``strategy(Q, K, num_landmarks, *, attn_mask=None, seed=None, head_axis=None, features=None, scale=None)``

returning :class:`Landmarks`. ``attn_mask`` is a key mask in the conventions of ``nystrom.approximate``
(plain callables receive it as a bool ``(..., 1, n)`` array, ``True`` = real key). ``scale`` is the softmax
temperature of the attention being approximated (default ``1/sqrt(d)``), for strategies that look at
attention or at a kernel. Shapes follow PyTorch attention: ``Q (..., n_q, d)``, ``K (..., n, d)``;
the leading dimensions are batch/heads. With ``head_axis`` (a negative axis of ``K`` pointing into
the leading dimensions, ``-3`` for ``(B, H, n, d)``) one landmark set is chosen per sequence and
shared by all heads, as FNA does (unless the heads' key masks differ: see :meth:`Selection.of`). Selection
then runs on the head-mean features
:math:`\bar k_i = \tfrac1H\sum_h k_{h,i}` (the FNA code's ``sampling_features="k"``), shape ``(..., n, d)``:
a fixed linear map of the concatenated heads that keeps selection at :math:`O(n m d)` whatever
:math:`H`, instead of :math:`O(n m H d)` on the concatenation.

Calling a strategy checks its arguments once (:func:`nystrom.linalg.validation.check_selection`) and
hands a :class:`Selection` to :meth:`Strategy.select`; library code that has checked the arguments
already (``nystrom.approximate``, model patching) calls :func:`run_strategy`, which skips those checks (and checks
the landmarks of any strategy but the library's own).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from ..numerics import (
    COMPILERS,
    at_least_float32,
    host_view,
    largest_magnitude,
    mean_over,
    power_of_two_unit,
    put_where,
    quiet_numpy_overflow,
    segment_sum,
    take_along_axis,
    without_padding,
)
from ..sequence import WHOLE
from ..solvers import Solver
from ..validation import (
    broadcasts_to,
    check_attention_inputs,
    check_bool,
    check_finite_landmarks,
    check_landmark_positions,
    check_landmarks,
    check_scale,
    check_seed,
    check_selection,
    check_unknown_arguments,
    describe,
    register,
    resolve,
    summary,
)

HOST_COPIES: list = []
"""Copies of host draws to a device that queue the copy rather than wait for it, each with ``handles(like) -> bool``
(does it copy to ``like``'s device?) and ``copy(values, dtype, like)`` (the numpy array ``values`` as an array of
``dtype`` there). A plain ``asarray`` onto a CUDA device copies from pageable memory, which waits for the device;
:mod:`nystrom.torch.transfer` registers the torch one on import."""

STRATEGIES: dict[str, type] = {}
"""Strategy names accepted by :func:`get_strategy` and ``nystrom.approximate``, derived from the
:class:`Strategy` subclasses' declared ``name``."""

#: The capabilities a strategy declares (class attributes of :class:`Strategy`) and what each means.
CAPABILITIES = {
    "random": "its choice depends on seed",
    "picks_tokens": "it picks tokens: its landmarks are real tokens, with their positions (else it builds new points)",
    "per_head": "it can choose a separate set per head (head_axis=None)",
    "masks": "it honours attn_mask: padding never enters a landmark",
    "weighted": "it returns landmark weights (the number of tokens each landmark stands for)",
    "sharded": ("it selects over a sequence sharded across processes (approximate(group=...)): the landmarks of the "
                "whole sequence, with communication that does not grow with n"),
}


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
    log_weights : array, shape (..., m), or None
        :math:`\\log c_j`, the log of the number of tokens landmark :math:`j` stands for (cluster
        sizes; 0 for a one-token landmark). Every logit against landmark key :math:`j` gets
        :math:`+\\log c_j`, in :math:`A` and in the output product (proportional attention; the docs'
        Nyström page derives it). ``None``: every landmark stands for itself.
    grouping : Grouping or None
        For strategies that group tokens, how they did it (on the selection rows: heads folded when
        shared); it lets a model reuse one grouping across layers with each layer's own means.
    counts : array, shape (..., m), or None
        :math:`c_j` itself, where a strategy grouped the tokens: whole numbers for groups of every token, the
        sample's estimate otherwise (``exp(log_weights)`` rounds a whole number off it, 4.999999999999999 for 5).
    """

    queries: Any
    keys: Any
    indices: Any = None
    query_indices: Any = None
    log_weights: Any = None
    grouping: Any = None
    counts: Any = None

    @property
    def assignment(self):
        """int array, shape (..., n), or None: the landmark each key belongs to (``-1``: none: padding, or a token
        left out of a sample), from the grouping."""
        return None if self.grouping is None else self.grouping.labels


@dataclass(frozen=True)
class Grouping:
    """How a strategy grouped the tokens into landmarks (on the selection rows).

    Attributes
    ----------
    labels : int array, shape (..., n)
        The landmark each token belongs to, ``-1`` for none (padding, or a token left out of a sample).
    tokens : int array, shape (..., r), or None
        When only some tokens are grouped (a sample): their positions, possibly repeated; the group means
        and sizes are taken over this list. ``None``: every token, with ``labels``.
    token_labels : int array, shape (..., r), or None
        The landmark of each listed token (``-1``: ignore this entry, e.g. a repeated position).
    weights : array, broadcastable to the listed tokens (``(..., r)``, or ``(..., n)`` without a list), or None
        How many tokens each grouped token stands for (a sampled token stands for the tokens the sample
        left out); ``None``: one each.
    """

    labels: Any
    tokens: Any = None
    token_labels: Any = None
    weights: Any = None


class cached:
    """``functools.cached_property`` without its lock (on Python 3.11 the lock is an ``RLock``, which
    ``torch.compile`` cannot trace: a graph break), for a value that does not depend on the number of landmarks:
    it is computed once per :class:`Selection` and the selections derived from it (:meth:`Selection.resized`)."""

    def __init__(self, method):
        self.method = method
        self.name = method.__name__
        self.__doc__ = method.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return instance.once(self.name, lambda: self.method(instance))


@dataclass(frozen=True)
class Selection:
    """One checked strategy call: the inputs and settings every strategy reads.

    Attributes
    ----------
    xp
        Array namespace of the inputs.
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    num_landmarks : int
        :math:`m`, already checked against ``n``, ``n_q`` and the real keys.
    real_keys : bool array, shape (..., n), or None
        The key mask, ``True`` for real keys (leading dimensions may be 1), as
        :func:`~nystrom.linalg.validation.check_attn_mask` returns it from ``attn_mask``.
    seed : int or None
    head_axis : int or None
        The shared head axis of ``K`` (``-3`` for ``(B, H, n, d)``), ``None`` for per-head selection.
    features : array, shape (..., n, D), or None
        Per-token selection features; without head sharing their leading dimensions are ``K``'s, with
        it ``K``'s without the head axis.
    scale : float
        Softmax temperature :math:`\\tau` of the attention being approximated.
    axis : WholeSequence
        Where the token axis lives (:mod:`nystrom.linalg.sequence`): whole in these arrays, or sharded across
        processes, ``Q``, ``K`` and ``real_keys`` then being this process's shard (strategies declared ``sharded``).
    memo : dict
        The values :meth:`once` computed, shared with the selections :meth:`resized` derives (a search over
        :math:`m` selects on the same inputs at each step).
    """

    xp: Any
    Q: Any
    K: Any
    num_landmarks: int
    real_keys: Any = None
    seed: int | None = None
    head_axis: int | None = None
    features: Any = None
    scale: float = 1.0
    axis: Any = WHOLE
    memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, xp, Q, K, num_landmarks, keys=None, seed=None, head_axis=None, features=None, scale=1.0,
           axis=WHOLE):
        """A selection for checked arguments, per head when the heads' key masks differ.

        Shared landmarks must be real keys in every head, and a head whose mask hides keys that another
        head keeps would otherwise get landmarks on its padding or too few of its own real keys. So a key
        mask with more than one row along the shared head axis (``(B, H, 1, n)`` with different rows;
        :func:`~nystrom.linalg.validation.check_attn_mask` reduces equal rows to one) makes each head choose
        its own landmarks among its own real keys, at ``H`` times the selection cost; shared ``features``
        ``(..., n, D)`` are then repeated for every head.
        """
        if head_axis is not None and keys is not None and keys.shape[head_axis + 1] > 1:
            if features is not None:
                features = xp.broadcast_to(xp.expand_dims(features, axis=head_axis),
                                           (*K.shape[:-1], features.shape[-1]))
            head_axis = None
        return cls(xp, Q, K, num_landmarks, keys, seed, head_axis, features, scale, axis)

    def resized(self, num_landmarks):
        """This selection with another :math:`m` (checked by the caller), sharing :attr:`memo`: what does not depend
        on :math:`m` is computed once for every step of a search."""
        return dataclasses.replace(self, num_landmarks=num_landmarks)

    def once(self, key, compute):
        """``compute()``, a value that depends on the inputs but not on :math:`m`, computed once for this selection
        and those :meth:`resized` derives from it, under ``key`` (a tuple of constants that names the value and what
        it depends on)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @cached
    def points(self):
        """Selection features ``(..., n, D)``: ``features`` if given, else the keys with shared heads averaged;
        float32 or wider, zero on padding (the keys' padding is zeroed before selection; padded ``features`` rows may
        hold anything finite, up to 3e38, which would overflow the distances of every rule)."""
        if self.features is not None:
            return without_padding(self.xp, self.mask, at_least_float32(self.xp, self.features))[0]
        return fold_heads(self.xp, self.K, self.head_axis)

    @cached
    def query_points(self):
        """Query features ``(..., n_q, d)`` for cross-attention: the queries with shared heads averaged."""
        return fold_heads(self.xp, self.Q, self.head_axis)

    @cached
    def mask(self):
        """Eligible keys ``(..., n)`` of the selection rows (real in every shared head), or None."""
        return fold_mask(self.xp, self.real_keys, self.K, self.head_axis)

    @property
    def cross(self) -> bool:
        """Whether queries and keys differ in number (cross-attention)."""
        return self.Q.shape[-2] != self.K.shape[-2]


class Strategy:
    """Base class of landmark strategies: a strategy implements only its choice, :meth:`select`.

    Subclasses declare their registry name and capabilities in the class statement,
    ``class FPS(TokenStrategy, name="fps")``; :data:`STRATEGIES` and :data:`RANDOM_STRATEGIES` are
    derived from those declarations. Capabilities (class attributes, see :data:`CAPABILITIES`):

    * ``random`` -- the choice depends on ``seed`` (deterministic for a given seed);
    * ``picks_tokens`` -- landmarks are real tokens and :attr:`Landmarks.indices` is set;
    * ``per_head`` -- supports ``head_axis=None`` (a separate set per head);
    * ``masks`` -- honours ``attn_mask``;
    * ``weighted`` -- returns landmark weights;
    * ``sharded`` -- selects over a sharded sequence: :meth:`select` reads the token axis only through
      ``selection.axis`` (:mod:`nystrom.linalg.sequence`).
    """

    name: ClassVar[str]
    random: ClassVar[bool] = False
    picks_tokens: ClassVar[bool] = True
    per_head: ClassVar[bool] = True
    masks: ClassVar[bool] = True
    weighted: ClassVar[bool] = False
    sharded: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str | None = None, **capabilities):
        super().__init_subclass__()
        unknown = set(capabilities) - set(CAPABILITIES)
        if unknown:
            raise TypeError(f"unknown strategy capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
        for key, value in capabilities.items():
            setattr(cls, key, bool(value))
        if name is not None:
            cls.name = name
            register(STRATEGIES, name, cls, "strategy")

    # As approximate: padding may hold any finite values, and no numpy overflow warning escapes (a review: a direct
    # RPCholesky call on keys of 1e10 warned of overflow in exp, an error under -W error).
    @quiet_numpy_overflow
    def __call__(self, Q, K, num_landmarks, *, attn_mask=None, seed=None, head_axis=None, features=None,
                 scale=None, check_values=True, **unknown) -> Landmarks:
        """Check the arguments once, then :meth:`select`.

        ``attn_mask`` is a key mask as :func:`nystrom.approximate` takes it (padded keys are never
        landmarks). ``check_values=False`` skips the checks that read the data (finite inputs, mask values,
        a real key per sequence, ``num_landmarks`` within the real keys); see :mod:`nystrom.linalg.validation`.
        """
        check_unknown_arguments(type(self).__name__, unknown)
        check_values = check_bool("check_values", check_values)
        xp, keys = check_attention_inputs(Q, K, None, attn_mask, check_values=check_values, values=False)
        m, _ = check_selection(xp, Q, K, num_landmarks, keys, head_axis, features, check_values=check_values)
        (K,) = without_padding(xp, keys, K)
        head_axis = None if head_axis is None else int(head_axis)  # a numpy integer passes the check too
        return self.select(Selection.of(xp, Q, K, m, keys, check_seed(seed), head_axis, features,
                                        check_scale(scale, K.shape[-1])))

    def select(self, selection: Selection) -> Landmarks:
        """The landmarks for a checked :class:`Selection` (no checks of its own)."""
        raise NotImplementedError


class TokenStrategy(Strategy, picks_tokens=True):
    """A strategy that picks real tokens: it implements :meth:`pick`, an index rule on the selection features.

    For self-attention (``n_q == n``) the landmark queries sit at the positions of the landmark keys,
    which gives the interpolation property. For cross-attention (``n_q != n``) :meth:`pick_queries`
    picks query positions on the head-folded queries alone.
    """

    def select(self, selection):
        xp, Q, K, head_axis = selection.xp, selection.Q, selection.K, selection.head_axis
        idx = unfold_indices(xp, self.pick(selection, selection.points, selection.mask), K, head_axis)
        if not selection.cross:
            return landmarks_at(xp, Q, K, idx, axis=selection.axis)
        q_idx = unfold_indices(xp, self.pick_queries(selection, selection.query_points), Q, head_axis)
        return landmarks_at(xp, Q, K, idx, q_idx)

    def pick(self, selection: Selection, X, mask):
        """Positions ``(..., m)`` of ``selection.num_landmarks`` distinct eligible rows of ``X (..., n, D)``;
        ``mask (..., n)`` marks the eligible ones (None: all)."""
        raise NotImplementedError

    def pick_queries(self, selection: Selection, X):
        """Query positions for cross-attention, on the queries ``X (..., n_q, D)``: :meth:`pick` without a mask."""
        return self.pick(selection, X, None)


class ClusterStrategy(Strategy, picks_tokens=False):
    r"""A strategy that groups the tokens: it implements :meth:`assign`, a label per token.

    Landmark :math:`j` is the mean of its group, :math:`\tilde k_j = \frac1{c_j}\sum_{i\in G_j} k_i` and
    :math:`\tilde q_j = \frac1{c_j}\sum_{i\in G_j} q_i` (per head, with one grouping shared by the heads when
    they share landmarks), computed by a scatter-add in :math:`O(n d)` without a membership matrix for numpy and
    torch (:func:`~nystrom.linalg.numerics.segment_sum`). Declared ``weighted`` strategies also return
    :math:`\log c_j`, the log of the group sizes (proportional attention).
    """

    def select(self, selection):
        xp, Q, K, head_axis, m = selection.xp, selection.Q, selection.K, selection.head_axis, selection.num_landmarks
        grouping = self.assign(selection, queries=False)
        if not selection.cross:
            return grouped_landmarks(xp, Q, K, grouping, m, head_axis, weighted=self.weighted, axis=selection.axis)
        # Cross-attention: the queries are grouped on their own.
        queries = grouped_landmarks(xp, None, Q, self.assign(selection, queries=True), m, head_axis).keys
        keys = grouped_landmarks(xp, None, K, grouping, m, head_axis, weighted=self.weighted)
        return dataclasses.replace(keys, queries=queries)

    def assign(self, selection: Selection, queries: bool) -> Grouping:
        """The :class:`Grouping` of the keys into ``m`` non-empty groups on the selection rows
        (``selection.points``, eligible where ``selection.mask``), or with ``queries`` of the queries
        (``selection.query_points``) for cross-attention."""
        raise NotImplementedError


def grouped_landmarks(xp, Q, K, grouping, m, head_axis=None, *, weighted=True, axis=WHOLE):
    """Landmarks that are the group means of ``Q (..., n, d)`` (``None``: left unset) and ``K`` for a
    :class:`Grouping` on the selection rows (without the head axis when ``head_axis`` is shared), weighted by
    the number of tokens each group stands for when ``weighted``. Model patching uses it to reuse one grouping
    with each layer's own queries and keys.

    The sums run over the listed tokens only (a sample): :math:`O(r d)`, or :math:`O(n d)` for a full grouping or a
    list of at least half the tokens (then every token is read, the unlisted ones dropped).
    On a sharded ``axis`` each process sums the tokens of its shard and the sums are added over the processes
    (:math:`O(m d)` sent per array).
    """
    labels = grouping.labels if grouping.tokens is None else grouping.token_labels
    members = labels
    if grouping.tokens is not None and 2 * grouping.tokens.shape[-1] >= K.shape[-2]:
        # A list of half the tokens or more: summing over every token, the others labelled -1, beats gathering the
        # listed rows of Q and K (at (1, 6, 1,370, 64) with 1,028 listed, 0.86 against 2.9 ms, mostly the page
        # faults of two fresh gathered arrays; about even at a quarter, 0.64 against 0.53 ms at n = 4,096).
        empty = -xp.ones(tuple(grouping.tokens.shape[:-1]) + (K.shape[-2],), dtype=labels.dtype,
                         device=array_api_compat.device(labels))
        members = put_where(xp, empty, grouping.tokens, labels, labels >= 0)
    elif grouping.tokens is not None:
        rows = unfold_indices(xp, grouping.tokens, K, head_axis)
        K = gather_rows(xp, K, rows)
        Q = None if Q is None else gather_rows(xp, Q, rows)
    keys, counts = group_means(xp, K, members, m, head_axis, axis=axis)
    queries = None if Q is None else group_means(xp, Q, members, m, head_axis, counts, axis=axis)[0]
    if not weighted:
        return Landmarks(queries, keys, grouping=grouping)
    if grouping.weights is not None:
        tokens = xp.broadcast_to(xp.astype(grouping.weights, counts.dtype), tuple(labels.shape))
        counts = axis.sum(segment_sum(xp, tokens[..., None], labels, m)[..., 0])
    counts = unfold_indices(xp, xp.astype(counts, xp.float64 if K.dtype == xp.float64 else xp.float32), K, head_axis)
    return Landmarks(queries, keys, log_weights=xp.log(counts), grouping=grouping, counts=counts)


def group_means(xp, X, labels, m, head_axis=None, counts=None, axis=WHOLE):
    """Means ``(..., m, d)`` of the rows of ``X (..., n, d)`` by ``labels`` (on the selection rows: without the head
    axis when ``head_axis`` is shared) and the group sizes ``(..., m)`` of the selection rows (``counts``, when the
    caller has them already from the same labels).

    Sums run in float32 or wider (a half-precision sum of many tokens loses the digits of the mean); a group with
    no member would give 0/0 and counts as one token of value 0 (callers keep every group non-empty). On a sharded
    ``axis`` the sums and sizes are added over the processes before the division.
    """
    wide = at_least_float32(xp, X)
    if counts is None:
        ones = xp.ones((*labels.shape, 1), dtype=wide.dtype, device=array_api_compat.device(X))
        counts = axis.sum(segment_sum(xp, ones, labels, m)[..., 0])
    per_head = counts if head_axis is None else xp.expand_dims(counts, axis=head_axis + 1)
    labels = labels if head_axis is None else xp.expand_dims(labels, axis=head_axis + 1)
    sums = axis.sum(segment_sum(xp, wide, labels, m))
    means = sums / xp.maximum(per_head, xp.ones_like(per_head))[..., None]
    return xp.astype(means, X.dtype), counts


def get_strategy(strategy):
    """Return a strategy object for a name, an existing strategy object or any callable.

    Parameters
    ----------
    strategy : str or callable
        A name in :data:`STRATEGIES`, giving the default object.

    Returns
    -------
    callable
        ``strategy(Q, K, num_landmarks, *, attn_mask, seed, head_axis, features, scale) -> Landmarks``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists each candidate and what it does.
    TypeError
        For anything that is neither a string nor callable.
    """
    return resolve("strategy", STRATEGIES, strategy, Strategy, other=(Solver, "solver"))


def require(strategy, capability: str, purpose: str) -> None:
    """Raise ``ValueError`` unless ``strategy`` declares ``capability`` (see :data:`CAPABILITIES`).

    The message says what ``purpose`` needs and lists every registered strategy with whether it
    qualifies and why. Plain callables declare nothing and pass; their output is checked where it is used.

    Parameters
    ----------
    strategy : callable
        A resolved strategy (:func:`get_strategy`).
    capability : str
        A key of :data:`CAPABILITIES`.
    purpose : str
        What needs it, e.g. ``"guarantee="``.
    """
    if not isinstance(strategy, Strategy) or getattr(strategy, capability):
        return
    listing = describe(STRATEGIES, lambda cls: "yes" if getattr(cls, capability) else f"no ({summary(cls)})")
    raise ValueError(
        f"{purpose} needs a strategy for which {CAPABILITIES[capability]}; {type(strategy).__name__} does not. "
        f"Candidates:\n{listing}"
    )


def run_strategy(strategy, selection: Selection, check_values: bool = False) -> Landmarks:
    """Landmarks for arguments the caller has checked: :meth:`Strategy.select` for a :class:`Strategy`; a plain
    callable is called with the strategy signature. The result of any strategy but the library's own is checked as
    a callable's is: its shapes (and, with ``check_values``, its values: finite, and its ``indices``, where it returns
    them, real keys of this array: :func:`check_landmark_positions`, not on a sharded ``selection.axis``, where they
    are global positions). A subclass written by a user is no more trusted than a function (a review: one that
    picked padding, or m - 1 tokens, was accepted, where the same rule as a function was refused)."""
    keys = selection.real_keys
    if isinstance(strategy, Strategy):
        landmarks = strategy.select(selection)
        if library_strategy(strategy):
            return landmarks
    else:
        landmarks = strategy(selection.Q, selection.K, selection.num_landmarks,
                             attn_mask=None if keys is None else keys[..., None, :], seed=selection.seed,
                             head_axis=selection.head_axis, features=selection.features, scale=selection.scale)
    check_landmarks(landmarks, selection.K, selection.num_landmarks)
    if check_values:
        check_finite_landmarks(selection.xp, landmarks)
        if not selection.axis.sharded:
            check_landmark_positions(selection.xp, landmarks, selection.K, keys)
    return landmarks


def library_strategy(strategy) -> bool:
    """Whether ``strategy`` is one of the library's own, whose landmarks need no check (a user's subclass, or one
    of a library class defined elsewhere, is checked as a callable's are)."""
    return isinstance(strategy, Strategy) and type(strategy).__module__.startswith(f"{__package__}.")


def fold_heads(xp, X, head_axis):
    """Selection features: ``(..., H, ..., n, d) -> (..., n, d)``, the mean over the shared head axis,
    in float32 or wider.

    Half-precision distances would round away the differences that farthest points, k-means and
    pivoting compare (bfloat16 keeps 8 significant bits), so selection never runs below float32.
    """
    X = at_least_float32(xp, X)
    return X if head_axis is None else mean_over(xp, X, head_axis)


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
    """``X[..., idx, :]`` per batch element: ``X (..., n, d)``, ``idx (..., m)`` (leading dimensions broadcastable to
    ``X``'s) -> ``(..., m, d)``."""
    if array_api_compat.is_torch_array(X):
        n, d = X.shape[-2:]
        lead = X.shape[:-2]
        if X.is_contiguous() and idx.ndim == X.ndim - 1 and all(broadcasts_to(i, x) for i, x in zip(idx.shape, lead)):
            # Whole rows copied by index_select on the flattened batch: 14x faster than Tensor.gather (which
            # indexes every element) for (1, 6, 1040) rows of 64, and gather was 11x faster than
            # array-api-compat's take_along_axis.
            # index_select takes int64 (or int32) only; the batch offsets below promoted smaller ints (a review).
            idx = xp.broadcast_to(xp.astype(idx, xp.int64, copy=False), (*lead, idx.shape[-1]))
            if math.prod(lead) > 1:
                # Row j of batch element b is row b n + j of the flattened batch.
                idx = idx + xp.reshape(xp.arange(math.prod(lead), device=idx.device) * n, (*lead, 1))
            rows = xp.reshape(X, (-1, d)).index_select(0, xp.reshape(idx, (-1,)))
            return xp.reshape(rows, (*lead, idx.shape[-1], d))
        return X.gather(-2, xp.broadcast_to(idx[..., None], (*lead, idx.shape[-1], d)))
    return take_along_axis(xp, X, xp.broadcast_to(idx[..., None], (*idx.shape, X.shape[-1])), axis=-2)


def unit_scaled(xp, X, mask=None, axis=WHOLE):
    r"""``(X * u, u)``: the points ``X (..., n, D)`` in units of a power of two :math:`u = 2^{-e}` per row
    ``(..., 1, 1)`` that brings the largest magnitude of its ``mask`` rows (``(..., n)``, default all; the whole
    sequence's on a sharded ``axis``) into about :math:`[1, 2)`, and the rows outside ``mask`` set to 0. :math:`u` is
    1 where that magnitude is not finite (unchecked inputs), and finite for an all-zero row. ``(X, None)`` for points
    in host memory whose magnitudes lie well inside the range, where any unit picks alike.

    Distance rules (farthest points, k-means) square the points: past about 1e18 in float32 the squared norms
    overflow, :math:`\infty - \infty` makes the distances NaN, and the picks repeat (float32 SDPA is exact there);
    below about 1e-16 they underflow, and distinct points tie. A power of two scales every distance exactly (a power
    of four), so the picks and labels are those of the points themselves, bit for bit, short of subnormals. Only the
    rows that may be picked set the scale, and the others, which padding may fill with anything, are zeroed: scaled,
    they could overflow.
    """
    host = None if axis.sharded else host_view(X)
    if host is not None:
        # In host memory the common case costs two reductions and no array operation: points whose largest
        # magnitude lies well inside the range (2**-40 to 2**40, squared norms far from both ends) are left as they
        # are, which gives the same picks as any power of two would.
        where = True if mask is None else host_view(mask)[..., None]
        largest = np.maximum(np.max(host, axis=(-2, -1), where=where, initial=0.0),
                             -np.min(host, axis=(-2, -1), where=where, initial=0.0))
        if np.all((largest >= 2.0**-40) & (largest <= 2.0**40)):
            return X, None
    if mask is not None:
        X = xp.where(mask[..., None], X, xp.zeros_like(X))
    unit = power_of_two_unit(xp, axis.max(largest_magnitude(xp, X)))
    return X * unit, unit


def landmarks_at(xp, Q, K, idx, query_idx=None, axis=WHOLE) -> Landmarks:
    """Landmarks that are real tokens: keys ``K[idx]`` and queries ``Q[query_idx]`` (default ``idx``); on a sharded
    ``axis`` (self-attention), global positions ``idx`` whose rows the processes holding them contribute."""
    if axis.sharded:
        rows, held = axis.local(xp, idx, K.shape[-2])
        return Landmarks(axis.gather(xp, Q, rows, held), axis.gather(xp, K, rows, held), idx, idx)
    query_idx = idx if query_idx is None else query_idx
    return Landmarks(gather_rows(xp, Q, query_idx), gather_rows(xp, K, idx), idx, query_idx)


def uniform_draws(xp, shape, seed, like):
    """Uniform ``[0, 1)`` draws of ``shape`` from ``numpy.random.default_rng(seed)``, on ``like``'s device, in
    float64 for float64 ``like`` and float32 otherwise (:func:`host_draws`)."""
    return host_draws(xp, generator_draws, seed, shape, xp.float64 if like.dtype == xp.float64 else xp.float32, like)


def generator_draws(seed, shape):
    """Uniform ``[0, 1)`` numpy draws of ``shape`` from one stream, ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).random(shape)


def host_draws(xp, draw, seed, shape, dtype, like):
    """``draw(seed, shape)``, numpy draws on the host, as an array of ``dtype`` on ``like``'s device.

    Drawing on the host with numpy makes a given seed give the same draws for numpy and torch inputs, on CPU and
    CUDA alike (the same landmarks too, but where a rule's choice follows rounding: ``rpcholesky`` on an exhausted
    kernel, ``approximate``'s ``seed``); the draws depend on the seed and the shape alone, so on a device they are
    one copy from the host, queued without waiting where a :data:`HOST_COPIES` entry handles the device, and nothing
    is read back.
    While a compiler traces ``like``, its :data:`COMPILERS` entry makes the draw one operation of the graph (for
    ``torch.compile``, a custom operator): ``draw`` must then be a module-level function.
    """
    for compiler in COMPILERS:
        if compiler.tracing(like):
            return compiler.host_draws(draw, seed, shape, dtype, like)
    return to_device(xp, draw(seed, shape), like, dtype)


def to_device(xp, values, like, dtype=None):
    """The numpy array ``values`` as an array (of ``dtype``, default ``values``'s) on ``like``'s device, by the
    :data:`HOST_COPIES` entry that handles it where there is one (a copy that does not wait for the device)."""
    for copier in HOST_COPIES:
        if copier.handles(like):
            return copier.copy(values, dtype, like)
    return xp.asarray(values, dtype=dtype, device=array_api_compat.device(like))


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
    # Not clip(max=n - 1): under torch.compile's dynamic shapes n is symbolic, which array-api-compat's clip can't take.
    last = weights.shape[-1] - 1
    idx = xp.where(idx <= last, idx, xp.zeros_like(idx) + last)
    picked = take_along_axis(xp, positive, idx[..., None])[..., 0]
    # Round-off can land on a zero-weight entry next to the boundary; take the heaviest instead.
    return xp.where((total > 0) & (picked > 0), idx, xp.argmax(weights, axis=-1))
