r"""Softmax attention, exact and Nyström, written once against the array API.

Exact attention is :math:`O = \mathrm{softmax}(\tau Q K^\top + M) V`. With landmark queries
:math:`\tilde q` and keys :math:`\tilde k` (:math:`m` of each) the Nyström approximation is

.. math::

    F = \mathrm{softmax}(\tau Q \tilde k^\top) \in \mathbb{R}^{n_q\times m},\quad
    A = \mathrm{softmax}(\tau \tilde q \tilde k^\top) \in \mathbb{R}^{m\times m},\quad
    B = \mathrm{softmax}(\tau \tilde q K^\top + M) \in \mathbb{R}^{m\times n},

.. math:: \hat O = F\, A^{+} (B V).

With landmark weights :math:`c_j` (the number of tokens landmark :math:`j` stands for), :math:`F` and
:math:`A` take :math:`+\log c_j` in every logit against landmark key :math:`j`.

It is evaluated right to left: :math:`BV` (:math:`m\times d_v`) is attention of the :math:`m`
landmark queries over all keys, :math:`v' = A^+ (BV)`, and :math:`\hat O = F v'` is attention of all
queries over the :math:`m` pairs :math:`(\tilde k, v')`. So both products are *attention calls*
(``attend``), which lets a backend substitute its fused kernel (the torch backend passes
``scaled_dot_product_attention``); nothing :math:`n\times n` is formed, and the largest intermediate
is :math:`n \times m`. Time :math:`O((n_q + n) m (d + d_v) + m^3)`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import array_api_compat

from .numerics import (
    at_least_float32,
    carries_derivatives,
    detached,
    holds_values,
    power_of_two_unit,
    quiet_numpy_overflow,
    scaled_logits,
    softmax,
    without_padding,
)
from .solvers import get_solver, unchecked
from .validation import (
    check_attention_inputs,
    check_bidirectional,
    check_bool,
    check_finite_landmarks,
    check_given,
    check_landmark_positions,
    check_landmarks,
    check_scale,
    check_unknown_arguments,
    namespace,
)


def softmax_attention(xp, Q, K, V, mask=None, *, scale):
    r""":math:`\mathrm{softmax}(\tau QK^\top + M)\,V` for checked inputs (the trusted core of :func:`exact_attention`).

    ``mask`` follows ``scaled_dot_product_attention``: a bool mask marks allowed pairs, a floating one
    is added to the logits.

    Parameters
    ----------
    xp
        Array namespace.
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    V : array, shape (..., n, d_v)
    mask : bool or floating array, shape broadcastable to (..., n_q, n), optional
        ``True`` where a query may attend to a key, or an additive logit bias :math:`M`.
    scale : float
        :math:`\tau`.

    Returns
    -------
    array, shape (..., n_q, d_v)
        In ``V``'s dtype.

    Notes
    -----
    Half-precision inputs are computed in float32: a float16 logit :math:`q\cdot k` overflows once the entries
    reach about 50 at :math:`d = 32` (:math:`50^2\cdot 32 > 65{,}504`), and SDPA accumulates in float32 too. The
    output, a convex combination of rows of ``V``, fits ``V``'s dtype.
    """
    Q, K, V_wide = at_least_float32(xp, Q), at_least_float32(xp, K), at_least_float32(xp, V)
    logits = scaled_logits(xp, Q, K, scale)
    if mask is not None and mask.dtype != xp.bool:
        weights = softmax(xp, logits + xp.astype(mask, logits.dtype))
    else:
        weights = softmax(xp, logits, mask)
    return xp.astype(weights @ V_wide, V.dtype, copy=False)


def in_query_chunks(attend, query_chunk_size=None):
    """``attend(q, k, v, mask)`` run on ``query_chunk_size`` rows of ``q`` at a time (``None``: ``attend`` itself).

    Each chunk is an independent attention call, so the result is the same; only the ``chunk x n``
    score buffer is alive at once, which bounds memory for long sequences. A mask with one row per
    query is cut with the queries; a key-only mask ``(..., 1, n)`` is passed whole.
    """
    if query_chunk_size is None:
        return attend

    def chunked(q, k, v, mask=None):
        n_q = q.shape[-2]
        if query_chunk_size >= n_q:
            return attend(q, k, v, mask)
        xp = array_api_compat.array_namespace(q)
        parts = []
        for i in range(0, n_q, query_chunk_size):
            # The last stop clipped: the array API leaves slices past the end unspecified (array_api_strict raises).
            end = min(i + query_chunk_size, n_q)
            rows = mask if mask is None or mask.shape[-2] == 1 else mask[..., i:end, :]
            parts.append(attend(q[..., i:end, :], k, v, rows))
        return xp.concat(parts, axis=-2)

    return chunked


def grouped_query_heads(Q, K, V):
    """``K`` and ``V`` with each of their :math:`H_{kv}` heads (axis -3) repeated for the :math:`H_q / H_{kv}` query
    heads it serves, as SDPA's ``enable_gqa=True``; unchanged when the head counts agree."""
    # Before the checks of the call, which compare the head counts this repeat makes equal: the types first.
    check_given(Q=Q, K=K, V=V)
    xp = namespace(Q=Q, K=K, V=V)
    if min(Q.ndim, K.ndim, V.ndim) < 3 or K.shape[-3] != V.shape[-3] or K.shape[-3] == 0:
        raise ValueError(f"enable_gqa=True needs Q, K and V with a head axis (-3) and as many key as value heads, at "
                         f"least one, got Q {tuple(Q.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}")
    heads, kv_heads = Q.shape[-3], K.shape[-3]
    if heads == kv_heads:
        return K, V
    if heads % kv_heads:
        raise ValueError(f"enable_gqa=True needs the query heads ({heads}) to be a multiple of the key/value heads "
                         f"({kv_heads})")
    return (xp.repeat(K, heads // kv_heads, axis=-3), xp.repeat(V, heads // kv_heads, axis=-3))


@quiet_numpy_overflow
def exact_attention(Q, K, V, attn_mask=None, *, scale=None, is_causal=False, dropout_p=0.0, enable_gqa=False,
                    **unknown):
    r"""Exact scaled dot-product attention.

    .. math:: O = \mathrm{softmax}(\tau\, Q K^\top + M)\, V, \qquad \tau = d^{-1/2} \text{ by default}

    where :math:`M_{ij} = -\infty` for masked keys and 0 otherwise.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
        Queries (numpy array or torch tensor).
    K : array, shape (..., n, d)
        Keys.
    V : array, shape (..., n, d_v)
        Values.
    attn_mask : array, optional
        Key mask, as :func:`nystrom.approximate` takes it (bool ``True`` = attend, integer 1 = real
        token, or additive 0 / ``-inf``; shape ``(..., 1, n)``, ``(n,)`` or ``(B, n)``); masked keys
        receive zero attention. The fourth argument, as in ``torch.nn.functional.scaled_dot_product_attention``.
    scale : float, optional
        Softmax temperature :math:`\tau`; default ``1/sqrt(d)``. Keyword-only, as in SDPA.
    is_causal, dropout_p : bool, float
        SDPA's, accepted at their neutral values (``False``, 0) only, as by :func:`nystrom.approximate`.
    enable_gqa : bool
        SDPA's grouped-query attention: ``K`` and ``V`` with fewer heads than ``Q``, repeated to its heads.

    Returns
    -------
    array, shape (..., n_q, d_v)
        Same library, device and dtype as the inputs.

    Notes
    -----
    As SDPA, it runs on tensors that hold no values (torch's meta device, fake tensors), checking shapes only.
    Forms the full :math:`n_q \times n` matrix: :math:`O(n_q n)` memory and
    :math:`O(n_q n (d + d_v))` time. Use it as ground truth (in float64) on moderate sizes. Array-API code, it
    runs as the array library runs it: under ``torch.autocast`` its products take autocast's dtype;
    :func:`nystrom.exact_attention` keeps the inputs' precision there.
    """
    check_unknown_arguments("exact_attention", unknown)
    check_bidirectional(is_causal, dropout_p)
    if check_bool("enable_gqa", enable_gqa):
        K, V = grouped_query_heads(Q, K, V)
    values = holds_values(Q)
    if (not values and attn_mask is not None and attn_mask.ndim == Q.ndim >= 3 and attn_mask.shape[-2] > 1
            and attn_mask.shape[-2] == Q.shape[-2]):
        # Rows of a per-query mask that hold no values cannot be compared (check_attn_mask reduces equal ones to one
        # row): their shape is what counts, and the first row has it.
        attn_mask = attn_mask[..., :1, :]
    # As SDPA, it runs on tensors without values (meta, fake), of which only the shapes are checked.
    xp, keys = check_attention_inputs(Q, K, V, attn_mask, check_values=values)
    tau = check_scale(scale, Q.shape[-1])
    K, V = without_padding(xp, keys, K, V)
    return softmax_attention(xp, Q, K, V, None if keys is None else keys[..., None, :], scale=tau)


def landmark_kernel(xp, q_landmarks, k_landmarks, scale, log_weights=None):
    r""":math:`A = \mathrm{softmax}(\tau \tilde q \tilde k^\top + \log c)` of shape ``(..., m, m)``, in float32 or
    float64.

    The logits and the normalisation are accumulated in at least float32 so half-precision
    inputs neither overflow in the exponent nor lose the small entries that decide
    :math:`A`'s conditioning.

    Parameters
    ----------
    xp
        Array namespace.
    q_landmarks, k_landmarks : array, shape (..., m, d)
    scale : float
        :math:`\tau`.
    log_weights : array, shape (..., m), optional
        :math:`\log c_j`, added to every logit against landmark key :math:`j` (see :class:`Landmarks`).

    Returns
    -------
    array, shape (..., m, m)
    """
    q, k = at_least_float32(xp, q_landmarks), at_least_float32(xp, k_landmarks)
    logits = scaled_logits(xp, q, xp.astype(k, q.dtype), scale)
    if log_weights is not None:
        logits = logits + xp.astype(log_weights, q.dtype)[..., None, :]
    return softmax(xp, logits)


class NystromFactors(NamedTuple):
    r"""Everything of :math:`\hat O = F v'` but the queries (:func:`nystrom_factors`).

    Attributes
    ----------
    keys : array, shape (..., m, d)
        The landmark keys :math:`\tilde k`.
    values : array, shape (..., m, d_v), dtype of V
        :math:`v' = A^+ (BV)`; for float16 divided by ``rescale``.
    bias : array, shape (..., 1, m), or None
        :math:`\log c_j` of weighted landmarks, added to every logit against landmark key :math:`j`.
    rescale : array, shape (..., 1, 1), or None
        ``None`` except for float16: :math:`c = \max|v'|` per matrix in the solve's dtype (float32 or wider), by
        which the output is multiplied back (:func:`nystrom_product`'s notes).
    solve : SolveResult
        The pseudo-inverse of :math:`A` and its residual.
    """

    keys: Any
    values: Any
    bias: Any
    rescale: Any
    solve: Any


def nystrom_factors(xp, K, V, landmarks, invert, *, scale, mask=None, attend):
    r""":math:`v' = A^+ (BV)` and what else :math:`F v'` takes (:class:`NystromFactors`), for checked inputs.

    Everything in :math:`\hat O = F A^+ (BV)` that does not depend on the queries: with it, the output at any set
    of query rows costs :math:`O(n_q m (d + d_v))` (:func:`nystrom_output`). ``attend`` computes :math:`BV`; the
    other arguments are :func:`nystrom_product`'s.
    """
    q_l, k_l, log_c = landmarks.queries, landmarks.keys, landmarks.log_weights
    if log_c is not None:
        # F adds log c_j in V's dtype (SDPA's additive mask takes the queries'): A takes the same rounded values, so
        # that F and A weigh each landmark alike. Rounded in F only, half precision lost an order of magnitude in the
        # gradients of Q and K (a review: 0.12 against 0.01 for picked tokens in bfloat16).
        log_c = xp.astype(log_c, V.dtype)
    BV = attend(q_l, K, V, mask)
    result = invert(landmark_kernel(xp, q_l, k_l, scale, log_c))
    BV = xp.astype(BV, result.inverse.dtype)
    # In units of a power of two near max |BV| per matrix (exact: the same bits wherever nothing over- or underflows).
    # A^+ (BV) sums terms of about |V| / sigma_min(A) that cancel to about |V|: with values near the dtype's largest
    # (1e37 in float32) they overflowed to inf - inf = NaN where v' itself fits (a review).
    largest = detached(xp.max(xp.abs(BV), axis=(-2, -1), keepdims=True))
    unit = power_of_two_unit(xp, largest)
    vp = result.times(BV * unit) / unit
    # Weighted landmarks: log c_j is added to every logit against landmark key j (an additive SDPA mask).
    bias = None if log_c is None else log_c[..., None, :]
    if V.dtype != getattr(xp, "float16", None):  # the array API has no float16; libraries that have it name it so
        return NystromFactors(k_l, xp.astype(vp, V.dtype), bias, None, result)
    # float16: v' can exceed the format's range (A^+ grows like 1/sigma_min). The product is linear in v', so
    # v' / c with c = max |v'| per matrix runs in float16 and the output is rescaled in float32; no branch
    # on the values, hence no host synchronisation.
    # c carries no gradient: the output, F (v' / c) c, does not depend on it.
    c = detached(xp.max(xp.abs(vp), axis=(-2, -1), keepdims=True))
    c = xp.where(c > 0, c, xp.ones_like(c))
    # v' / c in value; its gradient passes to v' undivided, as nystrom_output's product gets the output's cotangent
    # undivided: a float16 gradient c times larger would not fit where the gradient of v' does.
    return NystromFactors(k_l, xp.astype(with_gradient(vp / c, vp), V.dtype), bias, c, result)


def with_gradient(value, x, factor=1.0):
    r"""``value``, with the gradient that ``x`` gets times ``factor`` (in the dtype of their product):
    :math:`v_0 + (x - x_0)\,c` with :math:`v_0`, :math:`x_0` held constant, whose second term is 0 in value. ``value``
    itself where ``x`` carries no gradient."""
    if not carries_derivatives(x):
        return value
    return detached(value) + (x - detached(x)) * factor


def gradient_times(xp, x, c):
    """``x`` in value and dtype, whose gradient is multiplied by ``c`` on the way back, in ``c``'s dtype
    (:func:`with_gradient`)."""
    return x if not carries_derivatives(x) else xp.astype(with_gradient(x, x, c), x.dtype)


def nystrom_output(xp, Q, factors, attend):
    r""":math:`F v'`: the Nyström output at the queries ``Q``, attention of ``Q`` over the :math:`m` pairs
    :math:`(\tilde k_j, v'_j)` with the logit bias :math:`\log c_j`. Each output row depends on its own query only,
    so ``Q`` may be any subset of the rows. Time :math:`O(n_q m (d + d_v))`.

    Parameters
    ----------
    xp
        Array namespace.
    Q : array, shape (..., n_q, d)
    factors : NystromFactors
        From :func:`nystrom_factors`.
    attend : callable
        As :func:`nystrom_product` takes it.

    Returns
    -------
    array, shape (..., n_q, d_v), dtype of V
    """
    if factors.rescale is None:
        out = attend(Q, factors.keys, factors.values, factors.bias)
        # copy=False: the array API's astype copies by default, and a copy of the (n_q, d_v) output is a fresh
        # allocation whose page faults alone took 15-30 ms at n_q = 65,536, d_v = 64 on the benchmark VM.
        return xp.astype(out, factors.values.dtype, copy=False)
    c = factors.rescale
    # float16 gradients: the float16 product's cotangent would be the output's times c, and overflow where the
    # gradients themselves fit (a review: all NaN with |dL/dO| 1,000 and |V| 30, whose float32 gradients are at most
    # 8.7e3). It gets the output's cotangent unscaled; the gradients of the queries, keys and bias are multiplied
    # by c in float32, and that of v' / c passes to v' undivided (nystrom_factors).
    out = attend(*(None if x is None else gradient_times(xp, x, c) for x in (Q, factors.keys)), factors.values,
                 None if factors.bias is None else gradient_times(xp, factors.bias, c))
    out = xp.astype(out, c.dtype)
    out = with_gradient(out * c, out)
    # The approximation is not a convex combination of V's rows, as exact attention is: where its error is large it
    # can leave float16's range, which exact attention (|O| <= max |V| <= 65,504) never does. Clipping to the range
    # moves no entry away from exact attention, and the cast does not overflow.
    largest = float(xp.finfo(factors.values.dtype).max)
    return xp.astype(xp.clip(out, min=-largest, max=largest), factors.values.dtype)


def nystrom_product(xp, Q, K, V, landmarks, invert, *, scale, mask=None, attend=None, landmark_attend=None):
    r""":math:`F A^+ (B V)` for checked inputs: the trusted core of every Nyström attention call.

    Parameters
    ----------
    xp
        Array namespace.
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    V : array, shape (..., n, d_v)
    landmarks : Landmarks
        ``queries`` and ``keys`` of shape ``(..., m, d)``, keys never on padding.
    invert : callable
        ``invert(A) -> SolveResult`` on the float32-or-wider kernel ``A (..., m, m)``.
    scale : float
        :math:`\tau`.
    mask : bool array, shape broadcastable to (..., 1, n), optional
        ``True`` for real keys; padded rows of ``K`` and ``V`` are zero (see
        :func:`~nystrom.linalg.numerics.without_padding`).
    attend : callable, optional
        ``attend(q, k, v, mask) -> softmax(scale q k^T + M) v`` with a bool or additive ``mask`` (as
        ``scaled_dot_product_attention``); default :func:`softmax_attention`.
    landmark_attend : callable, optional
        The attention call of :math:`BV` (landmark queries over all keys), default ``attend``: a sequence sharded
        across processes merges its shards' partial results here (:mod:`nystrom.torch.distributed`).

    Returns
    -------
    out : array, shape (..., n_q, d_v), dtype of ``V``
    solve : SolveResult

    Notes
    -----
    The two halves are :func:`nystrom_factors` (:math:`v'`, independent of the queries) and
    :func:`nystrom_output` (:math:`F v'`): ``approximate(tol=...)`` evaluates the second only at its sampled rows
    until it has chosen :math:`m`.

    For float16, :math:`v'` can exceed the format's range when :math:`A` is ill-conditioned
    (entries of :math:`A^+` grow like :math:`1/\sigma_{\min}`). The final product is linear in
    :math:`v'`, so it runs on :math:`v'/c` with :math:`c = \max|v'|` per matrix and the output is
    multiplied by :math:`c` in float32, then clipped to the float16 range, in which exact attention lies (so the clip
    never moves an entry away from it): nothing overflows, and no value is read on the host.
    bfloat16 shares float32's range and is not rescaled: only values within a few times of its largest (3.4e38),
    which :math:`A^+` amplifies past it, give ``inf`` or ``NaN`` there (a review: 7 of 100 draws with :math:`|V|` up
    to 0.7 times the largest, where exact attention is finite), as in float32 with one-hot attention and values at
    the largest. Reads no data: on an accelerator the product never synchronises with the host.
    """
    if attend is None:
        attend = functools.partial(softmax_attention, xp, scale=scale)
    factors = nystrom_factors(xp, K, V, landmarks, invert, scale=scale, mask=mask,
                              attend=attend if landmark_attend is None else landmark_attend)
    return nystrom_output(xp, Q, factors, attend), factors.solve


@quiet_numpy_overflow
def nystrom_attention(Q, K, V, landmarks, solver="newton_schulz", *, scale=None, attn_mask=None,
                      check_values=True, **unknown):
    r"""Nyström attention :math:`F A^+ (B V)` for given landmarks.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
    K : array, shape (..., n, d)
    V : array, shape (..., n, d_v)
    landmarks : Landmarks
        From a strategy; ``landmarks.queries`` and ``landmarks.keys`` have shape ``(..., m, d)``.
        Landmark keys must not be padding (the strategies guarantee it).
    solver : str or callable
        Pseudo-inverse solver for :math:`A`, see :mod:`nystrom.linalg.solvers`.
    scale : float, optional
        Softmax temperature :math:`\tau`, default ``1/sqrt(d)``.
    attn_mask : array, optional
        Key mask, as :func:`nystrom.approximate` takes it; masked keys get no weight in :math:`B`.
    check_values : bool
        Run the checks that read the data (see :mod:`nystrom.linalg.validation`).

    Returns
    -------
    out : array, shape (..., n_q, d_v)
        Same dtype as ``V``.
    solve : SolveResult
        The pseudo-inverse and its Moore–Penrose residual.

    Notes
    -----
    Written for any array library, it knows nothing of ``torch.autocast``: under autocast its float32 sections (the
    solve, :math:`A^+ (BV)`) would run in the autocast dtype (a review measured a relative error of 1.0 at
    :math:`m = n` with ``"pinv"`` under CPU bfloat16 autocast). For torch tensors under autocast, call
    :func:`nystrom.torch.fna_attention` or :func:`nystrom.approximate`, which turn it off for their computation.
    """
    check_unknown_arguments("nystrom_attention", unknown)
    xp, tau, invert, mask, K, V = check_nystrom_call(Q, K, V, landmarks, solver, scale, attn_mask, check_values)
    return nystrom_product(xp, Q, K, V, landmarks, invert, scale=tau, mask=mask)


def check_nystrom_call(Q, K, V, landmarks, solver, scale, attn_mask, check_values):
    """The argument checks of :func:`nystrom_attention` and :func:`nystrom.torch.fna_attention`.

    Returns
    -------
    tuple
        ``(xp, scale, invert, mask, K, V)``: the namespace, :math:`\\tau`, the trusted solve, the key mask as
        :func:`nystrom_product` takes it and the keys and values with padded rows zeroed.
    """
    xp, keys = check_attention_inputs(Q, K, V, attn_mask, check_values=check_bool("check_values", check_values))
    check_landmarks(landmarks, K)
    if check_values:
        check_finite_landmarks(xp, landmarks)
        check_landmark_positions(xp, landmarks, K, keys)
    K, V = without_padding(xp, keys, K, V)
    mask = None if keys is None else keys[..., None, :]
    return xp, check_scale(scale, Q.shape[-1]), unchecked(get_solver(solver)), mask, K, V
