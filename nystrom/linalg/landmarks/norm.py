r"""The library's default, FNA-style rule ``"norm"``: high-norm tokens, sinks and CLS first, farthest points
for the rest.

Pretrained transformers route much of their attention to a few *sink* tokens (CLS in BERT takes
about half of all attention in middle layers) and carry *massive* / *artifact* tokens whose
residual-stream norm dwarfs the others. An approximation that misses such a token misrepresents
a large share of every attention row, so they are always landmarks; farthest-point sampling
(:mod:`.fps`) fills the remaining slots.

Sinks are found by what makes them sinks, the attention share a key receives, estimated from
:math:`s` probe queries in :math:`O(s n d)`:

.. math:: \hat a_j = \frac{1}{s}\sum_{p} \mathrm{softmax}(\tau\, q_p K^\top)_j,
          \qquad j \text{ is a sink if } \hat a_j \ge \min(\rho / n_v,\ \alpha)

(:math:`n_v` real keys, so :math:`\rho` is "times the uniform share"; the absolute share
:math:`\alpha` lets short sequences, where no key can reach :math:`\rho/n_v`, still have sinks).
Token norms find the massive and artifact tokens: when per-token ``features`` are passed (the
residual stream, where massive activations live; :func:`nystrom.torch.patching.patch` passes the
block's input hidden states by default), tokens with :math:`\lVert f_j\rVert \ge \nu\cdot
\mathrm{median}_i \lVert f_i\rVert` are guaranteed. The *key* norm is no sink test: in
all-MiniLM-L6-v2 the [CLS] sink takes ~50 % of the attention while its key norm is only
0.85–0.95× the median, hence the attention-share estimate above.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat

from ..numerics import at_least_float32, masked_median
from .base import TokenStrategy
from .fps import farthest_point_sampling


def attention_share(xp, Q, K, scale, mask=None, num_probes=16):
    r"""Estimated share of attention each key receives, from evenly spaced probe queries.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    scale : float
    mask : bool array, shape broadcastable to (..., n), optional
        Real keys. For self-attention (``n_q == n``) it also marks the real queries, and the probes
        are spread over those only, so padding never changes the estimate.
    num_probes : int
        Probe queries :math:`s`: ranks :math:`\lfloor i (n_v - 1)/(s - 1)\rfloor`, :math:`i < s`, among the
        :math:`n_v` real queries (deterministic).

    Returns
    -------
    array, shape (..., n)
        :math:`\hat a_j`, summing to 1 over the keys of each sequence.
    """
    # Shares of a few percent must be resolved: accumulate in float32 or wider.
    Q, K = at_least_float32(xp, Q), at_least_float32(xp, K)
    device = array_api_compat.device(Q)
    n_q = Q.shape[-2]
    real_queries = mask is not None and n_q == K.shape[-2]
    if real_queries:
        mask = xp.broadcast_to(mask, tuple(K.shape[:-1]))
        filled = xp.cumulative_sum(xp.astype(mask, xp.int64), axis=-1)
        n_valid = filled[..., -1:]
    else:
        n_valid = xp.full(tuple(Q.shape[:-2]) + (1,), n_q, dtype=xp.int64, device=device)
    # Sequences with fewer real queries than probes repeat some (a weighted mean of the same rows), so the
    # probe count never depends on the data: no host synchronisation.
    s = min(num_probes, n_q)
    ranks = (xp.arange(s, device=device) * (n_valid - 1)) // max(s - 1, 1)
    if real_queries:
        # Position of the real query of rank r: the number of positions holding at most r real ones.
        positions = xp.sum(xp.astype(filled[..., None, :] <= ranks[..., :, None], xp.int64), axis=-1)
    else:
        positions = ranks
    probes = xp.take_along_axis(Q, xp.broadcast_to(positions[..., None], (*positions.shape, Q.shape[-1])), axis=-2)
    logits = (scale * probes) @ xp.matrix_transpose(K)
    if mask is not None:
        logits = xp.where(mask[..., None, :], logits, xp.asarray(-float("inf"), dtype=logits.dtype, device=device))
    # The mean of s softmax rows is one weighted sum of their unnormalised exponentials: the
    # normalisation and the mean fold into an (s,) @ (s, n) product, two passes fewer over s x n.
    e = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
    weights = 1 / (s * xp.sum(e, axis=-1))
    return (weights[..., None, :] @ e)[..., 0, :]


@dataclass(frozen=True)
class Norm(TokenStrategy, name="norm"):
    """High-norm (massive/artifact) tokens, attention sinks and CLS always; farthest-point sampling for the rest.

    Parameters
    ----------
    sink_ratio : float
        :math:`\\rho`: a key is a sink when its estimated attention share is at least ``sink_ratio``
        times the uniform share :math:`1/n_v` ...
    sink_share : float
        ... or at least this absolute share :math:`\\alpha`. Both defaults were chosen by
        measurement on the bundled DINOv2-S and MiniLM (docs' landmark page, "Sinks").
    norm_ratio : float
        :math:`\\nu`: a token whose ``features`` norm is at least ``norm_ratio`` times the median is
        guaranteed (only when ``features`` are passed).
    max_guaranteed_fraction : float
        At most this fraction of the ``m`` landmarks (at least one) is taken by sinks and
        outliers, highest attention share first, so FPS keeps covering the sequence.
    num_probes : int
        Probe queries for the attention-share estimate.
    first : int or None
        A token that is always a landmark (``0``: CLS); ``None`` for none.

    Notes
    -----
    Deterministic. When no token stands out it reduces to :class:`~nystrom.linalg.landmarks.FPS`
    started at ``first``. Cost :math:`O(s n d + n m D)`.
    """

    sink_ratio: float = 16.0
    sink_share: float = 0.25
    norm_ratio: float = 10.0
    max_guaranteed_fraction: float = 0.25
    num_probes: int = 16
    first: int | None = 0

    def __post_init__(self):
        for field in ("sink_ratio", "sink_share", "norm_ratio"):
            if not (getattr(self, field) > 0):
                raise ValueError(f"Norm {field} must be positive, got {getattr(self, field)!r}")
        if not (0 < self.max_guaranteed_fraction <= 1):
            raise ValueError(f"Norm max_guaranteed_fraction must be in (0, 1], got {self.max_guaranteed_fraction}")
        if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"Norm num_probes must be a positive int, got {self.num_probes!r}")

    def pick(self, selection, X, mask):
        m = selection.num_landmarks
        budget = max(1, int(self.max_guaranteed_fraction * m))
        return farthest_point_sampling(X, m, mask=mask, guarantee_score=self.guarantee_score(selection),
                                       max_guaranteed=budget)

    def pick_queries(self, selection, X):
        # Cross-attention: sinks and outliers are keys; query landmarks come from plain FPS.
        return farthest_point_sampling(X, selection.num_landmarks)

    def guarantee_score(self, selection):
        """Per-token priority ``(..., n)`` of the selection rows: finite for guaranteed tokens (higher first),
        ``-inf`` otherwise."""
        xp, K, mask, features = selection.xp, selection.K, selection.mask, selection.features
        padding = selection.key_padding_mask
        padding = None if padding is None else xp.broadcast_to(padding, tuple(K.shape[:-1]))
        share = attention_share(xp, selection.Q, K, selection.scale, padding, self.num_probes)
        if selection.head_axis is not None:
            share = xp.mean(share, axis=selection.head_axis + 1)
        n_valid = K.shape[-2] if mask is None else xp.sum(xp.astype(mask, share.dtype), axis=-1, keepdims=True)
        threshold = xp.minimum(self.sink_ratio / n_valid, xp.asarray(self.sink_share, dtype=share.dtype,
                                                                        device=array_api_compat.device(share)))
        flagged = share >= threshold
        if features is not None:
            features = selection.points
            norms = xp.sqrt(xp.sum(features * features, axis=-1))
            median = masked_median(xp, norms, mask)[..., None]
            flagged = flagged | (norms >= self.norm_ratio * median)
        # Ranks: the `first` token (CLS), then flagged tokens by attention share.
        score = xp.where(flagged, 1 + share, xp.asarray(-float("inf"), dtype=share.dtype,
                                                           device=array_api_compat.device(share)))
        if self.first is not None:
            n = share.shape[-1]
            if not (-n <= self.first < n):
                raise ValueError(f"first={self.first} is not a token position for n={n}")
            is_first = xp.arange(n, device=array_api_compat.device(share)) == (self.first % n)
            score = xp.where(is_first, xp.asarray(3.0, dtype=share.dtype,
                                                  device=array_api_compat.device(share)), score)
        if mask is not None:
            score = xp.where(mask, score, xp.asarray(-float("inf"), dtype=share.dtype,
                                                     device=array_api_compat.device(share)))
        return score

