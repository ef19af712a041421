r"""The Nyström approximation of softmax attention, evaluated right to left.

With landmark queries :math:`\tilde q` and keys :math:`\tilde k` (:math:`m` of each),

.. math::

    F = \mathrm{softmax}(\tau Q \tilde k^\top) \in \mathbb{R}^{n_q\times m},\quad
    A = \mathrm{softmax}(\tau \tilde q \tilde k^\top) \in \mathbb{R}^{m\times m},\quad
    B = \mathrm{softmax}(\tau \tilde q K^\top + M) \in \mathbb{R}^{m\times n},

.. math:: \hat O = F\, A^{+} (B V).

Evaluated as :math:`B V` (:math:`m\times d_v`), then :math:`A^+ (BV)`, then :math:`F(\cdot)`, so the
largest intermediate is :math:`n \times m`; nothing :math:`n\times n` is formed. Time
:math:`O((n_q + n) m (d + d_v) + m^3)`.
"""

from __future__ import annotations

from .softmax import softmax
from .solvers import SolveResult, get_solver
from .validation import check_attention_inputs, check_scale


def nystrom_attention(Q, K, V, landmarks, solver="newton_schulz", *, scale=None, key_padding_mask=None):
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
    key_padding_mask : bool array, shape (..., n), optional
        ``True`` for real keys; padded keys get no weight in :math:`B`.

    Returns
    -------
    out : array, shape (..., n_q, d_v)
        Same dtype as ``V``.
    solve : SolveResult
        The pseudo-inverse and its Moore–Penrose residual.
    """
    xp = check_attention_inputs(Q, K, V, key_padding_mask, finite=False)
    tau = check_scale(scale, Q.shape[-1])
    solve = get_solver(solver)
    q_l, k_l = landmarks.queries, landmarks.keys
    mask = None if key_padding_mask is None else key_padding_mask[..., None, :]
    BV = softmax(xp, tau * (q_l @ xp.matrix_transpose(K)), mask) @ V
    result: SolveResult = solve(softmax(xp, tau * (q_l @ xp.matrix_transpose(k_l))))
    vp = xp.astype(result.inverse @ xp.astype(BV, result.inverse.dtype), V.dtype)
    out = softmax(xp, tau * (Q @ xp.matrix_transpose(k_l))) @ vp
    return out, result
