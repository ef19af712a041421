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

from ..linalg.attention import check_nystrom_call, nystrom_product
from ..linalg.validation import check_query_chunk_size


def sdpa_attend(q, k, v, mask=None, *, scale, query_chunk_size=None):
    r""":math:`\mathrm{softmax}(\tau q k^\top + M)\,v` by ``scaled_dot_product_attention``, a chunk of queries at
    a time.

    The attention call that :func:`nystrom.linalg.attention.nystrom_product` takes (its inputs are checked).

    Parameters
    ----------
    q : Tensor, shape (..., n_q, d)
    k : Tensor, shape (..., n, d)
    v : Tensor, shape (..., n, d_v)
    mask : bool Tensor, shape broadcastable to (..., n_q, n), optional
        ``True`` where a query may attend to a key (SDPA's boolean ``attn_mask``).
    scale : float
        :math:`\tau`.
    query_chunk_size : int, optional
        Rows of ``q`` per SDPA call; ``None`` does all at once.

    Returns
    -------
    Tensor, shape (..., n_q, d_v)
    """
    n_q = q.shape[-2]
    if query_chunk_size is None or query_chunk_size >= n_q:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    chunks = []
    for i in range(0, n_q, query_chunk_size):
        rows = mask if mask is None or mask.shape[-2] == 1 else mask[..., i:i + query_chunk_size, :]
        chunks.append(F.scaled_dot_product_attention(q[..., i:i + query_chunk_size, :], k, v, attn_mask=rows,
                                                     scale=scale))
    return torch.cat(chunks, dim=-2)


def fna_attention(Q, K, V, landmarks, solver="newton_schulz", *, scale=None, key_padding_mask=None,
                  query_chunk_size=None, check_values=True):
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
    key_padding_mask : bool Tensor, shape (..., n), optional
        ``True`` for real keys.
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
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q, K and V must be torch tensors, got {type(Q).__name__}; "
                        "nystrom.linalg.nystrom_attention takes any array")
    xp, tau, invert, mask = check_nystrom_call(Q, K, V, landmarks, solver, scale, key_padding_mask, check_values)
    attend = functools.partial(sdpa_attend, scale=tau, query_chunk_size=check_query_chunk_size(query_chunk_size))
    return nystrom_product(xp, Q, K, V, landmarks, invert, scale=tau, mask=mask, attend=attend)
