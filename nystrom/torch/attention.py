r"""Nyström attention for torch tensors through fused attention kernels, in FNA's evaluation order.

.. math::

    v' = A^+ \bigl(\mathrm{softmax}(\tau\tilde q K^\top + M) V\bigr) \in \mathbb{R}^{m\times d_v},
    \qquad \hat O = \mathrm{softmax}(\tau Q \tilde k^\top)\, v'

The product is :func:`nystrom.linalg.attention.nystrom_product`, written once for every backend; this
module supplies its attention call, :func:`torch.nn.functional.scaled_dot_product_attention`. The first
call is attention of the :math:`m` landmark queries over all :math:`n` keys, the second attention of
all queries over :math:`m` "landmark key / value" pairs :math:`(\tilde k, v')`. The fused kernels never
materialise an :math:`n\times n` matrix, and with ``query_chunk_size`` the :math:`n\times m` one is only
formed a chunk at a time, so memory is :math:`O(n (m + d))`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import array_api_compat.torch
import torch
import torch.nn.functional as F

from ..linalg.attention import check_nystrom_call, in_query_chunks, nystrom_product
from ..linalg.landmarks.base import Landmarks
from ..linalg.split_keys import merge_partials
from ..linalg.validation import check_query_chunk_size, check_unknown_arguments
from .autocast import autocast_cast, autocast_dtype, with_own_precision
from .forward_mode import has_tangent

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# A CPU flash-attention task is one (batch, head, block of queries): 32 query rows below 192 queries. Measured
# (docs/scripts/split_key_crossover.py, one head over 65,536 keys, 1 -> 2 threads): m = 32 takes 12.3 -> 12.5 ms
# (one task), m = 64 takes 25.0 -> 12.7 ms (two tasks).
_CPU_QUERY_ROWS_PER_TASK = 32
# The split's extra call and merge cost ~0.15 ms: with 2 threads, 2 blocks win from 8,192 keys per block up (m = 16,
# 16,384 keys: 1.56 ms split vs 1.85 ms whole; 8,192 keys: 0.90 vs 0.80 ms), same script.
MIN_KEYS_PER_BLOCK = 8192


def key_blocks(q, k, v, mask=None):
    r"""The number :math:`p` of key blocks :func:`sdpa_attend` splits attention of ``q`` over ``k`` into.

    PyTorch's CPU flash kernel runs one task per (batch, head, block of 32 queries): the landmark product of
    one head with :math:`m \le 32` queries is one task on one core, however many threads there are. Splitting
    the :math:`n` keys into :math:`p` blocks makes :math:`p` times as many tasks; :math:`p` is the smallest
    count that gives every thread a task, and 1 on CUDA, when derivatives are needed (the kernel's log-sum-exp
    carries no gradient, it takes none to a floating ``mask``, and it has no forward mode: a dual tensor of
    ``torch.func.jvp``, which does not require grad, raised there, a review), in float64, when values and keys differ in
    width (the kernel takes one head size), when a block would hold fewer than :data:`MIN_KEYS_PER_BLOCK` keys, or
    while ``torch.compile`` traces (the thread count is a run-time setting that Dynamo cannot put in a graph,
    ``torch.get_num_threads`` being a graph break, and the compiled kernels divide the work among threads
    themselves).

    Parameters
    ----------
    q : Tensor, shape (..., n_q, d)
    k : Tensor, shape (..., n, d)
    v : Tensor, shape (..., n, d_v)
    mask : Tensor, optional
        As :func:`sdpa_attend` takes it.

    Returns
    -------
    int
    """
    # The kernel's float64 results are off by ~1e-9 (measured against SDPA in float64), too far for the library's
    # float64 reference results.
    if (q.device.type != "cpu" or q.dtype == torch.float64 or v.shape[-1] != q.shape[-1]
            or torch.compiler.is_compiling()):
        return 1
    tasks = math.prod(q.shape[:-2]) * -(-q.shape[-2] // _CPU_QUERY_ROWS_PER_TASK)
    threads = torch.get_num_threads()
    if tasks >= threads:
        return 1
    blocks = max(1, min(-(-threads // tasks), k.shape[-2] // MIN_KEYS_PER_BLOCK))
    # Last, where a split is at stake: a forward-mode test per tensor on every call of the common case cost time.
    if blocks > 1 and any(x is not None and ((torch.is_grad_enabled() and x.requires_grad) or has_tangent(x))
                          for x in (q, k, v, mask)):
        return 1
    return blocks


def sdpa_attend(q, k, v, mask=None, *, scale):
    r""":math:`\mathrm{softmax}(\tau q k^\top + M)\,v` by ``scaled_dot_product_attention``: the attention call that
    :func:`nystrom.linalg.attention.nystrom_product` takes (its inputs are checked).

    When :func:`key_blocks` finds too few parallel tasks (the landmark product, :math:`m` queries over :math:`n`
    keys, on a CPU with more threads than heads), the keys are split into blocks that run in parallel and are
    merged exactly by their log-sum-exp (:func:`split_key_sdpa`).

    Parameters
    ----------
    q : Tensor, shape (..., n_q, d)
    k : Tensor, shape (..., n, d)
    v : Tensor, shape (..., n, d_v)
    mask : bool or floating Tensor, shape broadcastable to (..., n_q, n), optional
        ``True`` where a query may attend to a key, or an additive bias (SDPA's ``attn_mask``).
    scale : float
        :math:`\tau`.

    Returns
    -------
    Tensor, shape (..., n_q, d_v)
    """
    blocks = key_blocks(q, k, v, mask)
    if blocks > 1:
        return split_key_sdpa(q, k, v, mask, scale=scale, blocks=blocks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def split_key_sdpa(q, k, v, mask=None, *, scale, blocks):
    r"""Attention with the keys split into ``blocks`` contiguous blocks, each reduced by PyTorch's CPU flash kernel,
    which also returns the block's log-sum-exp :math:`\lambda_b`, and merged exactly:

    .. math:: O = \sum_b \mathrm{softmax}_b(\lambda)\, O_b

    (the merge of :mod:`nystrom.linalg.split_keys`, whose partial results are these :math:`O_b` and
    :math:`\lambda_b`). A block with no allowed key gets :math:`\lambda_b = -\infty`, hence weight 0 (the kernel
    reports :math:`\lambda_b = 0` and :math:`O_b = 0` for it); a query row with no allowed key at all gets 0, as
    from ``scaled_dot_product_attention``.

    Parameters
    ----------
    q, k, v, mask, scale
        As :func:`sdpa_attend`; CPU tensors, ``v`` as wide as ``k``. A floating ``mask`` holds ``-inf`` where a
        key is masked.
    blocks : int
        :math:`p`; :math:`\lfloor n/p\rfloor` keys per block, the :math:`n \bmod p` left over in one more.

    Returns
    -------
    Tensor, shape (..., n_q, d_v)
        In the dtype of ``v``.

    Notes
    -----
    No gradient: the kernel's log-sum-exp output is not differentiable (:func:`key_blocks` never splits when
    one is needed).
    """
    # The kernel reads the feature axis as unit-stride, whatever the strides say (scaled_dot_product_attention copies
    # first): a transposed or expanded K gave another answer than its contiguous copy, 1.31 apart (a review).
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    n_q, n, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    size = n // blocks
    cut = size * blocks
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
        mask = mask.to(q.dtype).expand(*lead, mask.shape[-2], n)

    def reduce(first, stop, count):
        # (lead, count blocks, ...) flattened to the kernel's 4-D (batch, block, rows, features).
        def blocked(x, width):
            return x.expand(*lead, n, width)[..., first:stop, :].reshape(-1, count, (stop - first) // count, width)

        rows = None
        if mask is not None:
            rows = mask[..., first:stop].reshape(-1, mask.shape[-2], count, (stop - first) // count).transpose(1, 2)
        qb = q.expand(*lead, n_q, d).reshape(-1, 1, n_q, d).expand(-1, count, n_q, d)
        out, lse = _FLASH_CPU(qb, blocked(k, d), blocked(v, d_v), attn_mask=rows, scale=scale)
        if rows is not None:
            lse = lse.masked_fill(~torch.isfinite(rows).any(dim=-1), -math.inf)
        return out, lse

    parts = [reduce(0, cut, blocks)]
    if cut < n:
        parts.append(reduce(cut, n, 1))
    out, lse = (torch.cat(x, dim=1) for x in zip(*parts))
    # The kernel's outputs are already normalised per block, with the mass in lse: nothing to rescale before the merge.
    merged = merge_partials(array_api_compat.torch, out.float(), lse[..., None], axis=-3)
    # A row with no allowed key in any block merges 0 / 0.
    merged = merged.masked_fill(torch.isneginf(lse).all(dim=1)[..., None], 0)
    return merged.reshape(*lead, n_q, d_v).to(v.dtype)


def fna_attention(Q, K, V, landmarks, solver="newton_schulz", *, scale=None, attn_mask=None,
                  query_chunk_size=None, check_values=True, **unknown):
    r"""Nyström attention :math:`\mathrm{softmax}(\tau Q\tilde k^\top)\, A^+ \mathrm{softmax}(\tau \tilde q K^\top) V`.

    The torch counterpart of :func:`nystrom.linalg.nystrom_attention`, with the same contract: the
    arguments are checked once here, then the fused product runs.

    Parameters
    ----------
    Q : Tensor, shape (..., n_q, d)
    K : Tensor, shape (..., n, d)
    V : Tensor, shape (..., n, d_v)
    landmarks : Landmarks
        ``queries`` and ``keys`` of shape ``(..., m, d)``, keys never on padding.
    solver : str or callable
        Pseudo-inverse solver; it runs in float32 (float64 for float64 inputs).
    scale : float, optional
        Softmax temperature :math:`\tau`, default ``1/sqrt(d)`` (as SDPA).
    attn_mask : Tensor, optional
        Key mask, as :func:`nystrom.approximate` takes it.
    query_chunk_size : int, optional
        Process queries in chunks of this many rows, bounding the :math:`n_q \times m` score
        buffer of the final product; ``None`` does all at once.
    check_values : bool
        Run the checks that read the data (see :mod:`nystrom.linalg.validation`).

    Returns
    -------
    out : Tensor, shape (..., n_q, d_v), dtype of ``V``
    solve : SolveResult
        The solve's diagnostics, without autograd history (the inverse and residual of a float16 or autocast call,
        computed in a graph of its own, would otherwise keep that graph alive and pass no gradient to the inputs).

    Raises
    ------
    TypeError, ValueError
        As :func:`nystrom.approximate` for the inputs; ``TypeError`` also for numpy arrays (use
        :func:`nystrom.linalg.nystrom_attention`), ``ValueError`` for landmarks of the wrong shape.
    """
    check_unknown_arguments("fna_attention", unknown)
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q, K and V must be torch tensors, got {type(Q).__name__}; "
                        "nystrom.linalg.nystrom_attention takes any array")
    # The landmark tensors are inputs of the call's graph too (they may depend on Q and K), under autocast and for
    # float16, whose backward differentiates a graph of its own; anything else is left to the checks.
    fields = [name for name in ("queries", "keys", "log_weights")
              if isinstance(landmarks, Landmarks) and isinstance(getattr(landmarks, name), torch.Tensor)]
    dtype = autocast_dtype(Q.device)
    if dtype is not None and fields:
        # The landmarks too, as autocast gives Q and K: chosen from the same float32 inputs they would not match them.
        landmarks = dataclasses.replace(landmarks, queries=autocast_cast(landmarks.queries, dtype),
                                        keys=autocast_cast(landmarks.keys, dtype))

    def run(q, k, v, *parts):
        given = dataclasses.replace(landmarks, **dict(zip(fields, parts))) if fields else landmarks
        xp, tau, invert, mask, k, v = check_nystrom_call(q, k, v, given, solver, scale, attn_mask, check_values)
        attend = in_query_chunks(functools.partial(sdpa_attend, scale=tau), check_query_chunk_size(query_chunk_size))
        return nystrom_product(xp, q, k, v, given, invert, scale=tau, mask=mask, attend=attend)

    out, solve = with_own_precision(run, Q, K, V, *(getattr(landmarks, name) for name in fields))
    return out, dataclasses.replace(solve, inverse=solve.inverse.detach(),
                                    residual=None if solve.residual is None else solve.residual.detach(), product=None)
