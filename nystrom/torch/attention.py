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

import functools

import torch
import torch.nn.functional as F

from ..linalg.attention import check_nystrom_call, in_query_chunks, nystrom_product
from ..linalg.validation import check_query_chunk_size, check_unknown_arguments


def sdpa_attend(q, k, v, mask=None, *, scale):
    r""":math:`\mathrm{softmax}(\tau q k^\top + M)\,v` by ``scaled_dot_product_attention``: the attention call that
    :func:`nystrom.linalg.attention.nystrom_product` takes (its inputs are checked).

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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


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
    xp, tau, invert, mask, K, V = check_nystrom_call(Q, K, V, landmarks, solver, scale, attn_mask, check_values)
    attend = in_query_chunks(functools.partial(sdpa_attend, scale=tau), check_query_chunk_size(query_chunk_size))
    return nystrom_product(xp, Q, K, V, landmarks, invert, scale=tau, mask=mask, attend=attend)
