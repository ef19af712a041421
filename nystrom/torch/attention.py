r"""Fast batched Nyström attention for torch tensors, in FNA's evaluation order.

.. math::

    v' = A^+ \bigl(\mathrm{softmax}(\tau\tilde q K^\top + M) V\bigr) \in \mathbb{R}^{m\times d_v},
    \qquad \hat O = \mathrm{softmax}(\tau Q \tilde k^\top)\, v'

Both softmax products run through :func:`torch.nn.functional.scaled_dot_product_attention`: the
first is attention of the :math:`m` landmark queries over all :math:`n` keys, the second is
attention of all queries over :math:`m` "landmark key / value" pairs :math:`(\tilde k, v')`. The
fused kernels never materialise an :math:`n\times n` matrix, and with ``query_chunk_size`` the
:math:`n\times m` one is only formed a chunk at a time, so memory is :math:`O(n (m + d))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linalg.solvers import SolveResult, get_solver


def landmark_kernel(q_landmarks, k_landmarks, scale):
    r""":math:`A = \mathrm{softmax}(\tau \tilde q \tilde k^\top)` of shape ``(..., m, m)``, in float32 or float64.

    The logits and the normalisation are accumulated in at least float32 so half-precision
    inputs neither overflow in the exponent nor lose the small entries that decide
    :math:`A`'s conditioning.

    Parameters
    ----------
    q_landmarks, k_landmarks : Tensor, shape (..., m, d)
    scale : float
        :math:`\tau`.

    Returns
    -------
    Tensor, shape (..., m, m)
    """
    dtype = torch.float64 if q_landmarks.dtype == torch.float64 else torch.float32
    logits = scale * (q_landmarks.to(dtype) @ k_landmarks.to(dtype).transpose(-2, -1))
    return torch.softmax(logits, dim=-1)


def fna_attention(Q, K, V, landmarks, solver="newton_schulz", *, scale, key_padding_mask=None,
                  query_chunk_size=None):
    r"""Nyström attention :math:`\mathrm{softmax}(\tau Q\tilde k^\top)\, A^+ \mathrm{softmax}(\tau \tilde q K^\top) V`.

    Parameters
    ----------
    Q : Tensor, shape (..., n_q, d)
    K : Tensor, shape (..., n, d)
    V : Tensor, shape (..., n, d_v)
    landmarks : Landmarks
        ``queries`` and ``keys`` of shape ``(..., m, d)``, keys never on padding.
    solver : str or callable
        Pseudo-inverse solver; it runs in float32 (float64 for float64 inputs).
    scale : float
        Softmax temperature :math:`\tau`.
    key_padding_mask : bool Tensor, shape (..., n), optional
        ``True`` for real keys.
    query_chunk_size : int, optional
        Process queries in chunks of this many rows, bounding the :math:`n_q \times m` score
        buffer of the final product; ``None`` does all at once.

    Returns
    -------
    out : Tensor, shape (..., n_q, d_v), dtype of ``V``
    solve : SolveResult

    Notes
    -----
    For float16, :math:`v'` can exceed the format's range when :math:`A` is ill-conditioned
    (entries of :math:`A^+` grow like :math:`1/\sigma_{\min}`); the final product then runs in
    float32 instead of overflowing. bfloat16 shares float32's range and needs no such care.
    """
    q_l, k_l = landmarks.queries, landmarks.keys
    mask = None if key_padding_mask is None else key_padding_mask[..., None, :]
    BV = F.scaled_dot_product_attention(q_l, K, V, attn_mask=mask, scale=scale)
    result: SolveResult = get_solver(solver)(landmark_kernel(q_l, k_l, scale))
    vp = result.inverse @ BV.to(result.inverse.dtype)
    work_dtype = V.dtype
    if V.dtype == torch.float16 and not bool(vp.detach().abs().amax() < 0.5 * torch.finfo(torch.float16).max):
        work_dtype = torch.float32
    vp = vp.to(work_dtype)
    k_l = k_l.to(work_dtype)
    n_q = Q.shape[-2]
    chunk = n_q if query_chunk_size is None else query_chunk_size
    if chunk >= n_q:
        out = F.scaled_dot_product_attention(Q.to(work_dtype), k_l, vp, scale=scale)
    else:
        out = torch.cat(
            [F.scaled_dot_product_attention(Q[..., i:i + chunk, :].to(work_dtype), k_l, vp, scale=scale)
             for i in range(0, n_q, chunk)],
            dim=-2,
        )
    return out.to(V.dtype), result
