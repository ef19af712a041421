"""Exact softmax attention: the dense reference every approximation is checked against."""

from __future__ import annotations

from .softmax import softmax
from .validation import check_attention_inputs, check_scale


def exact_attention(Q, K, V, scale=None, key_padding_mask=None):
    r"""Exact scaled dot-product attention.

    .. math:: O = \mathrm{softmax}(\tau\, Q K^\top + M)\, V, \qquad \tau = d^{-1/2} \text{ by default}

    where :math:`M_{ij} = -\infty` for padded keys and 0 otherwise.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
        Queries (numpy array or torch tensor).
    K : array, shape (..., n, d)
        Keys.
    V : array, shape (..., n, d_v)
        Values.
    scale : float, optional
        Softmax temperature :math:`\tau`; default ``1/sqrt(d)``.
    key_padding_mask : bool array, shape (..., n), optional
        ``True`` marks real keys; padded keys receive zero attention.

    Returns
    -------
    array, shape (..., n_q, d_v)
        Same library, device and dtype as the inputs.

    Notes
    -----
    Forms the full :math:`n_q \times n` matrix: :math:`O(n_q n)` memory and
    :math:`O(n_q n (d + d_v))` time. Use it as ground truth (in float64) on moderate sizes.
    """
    xp = check_attention_inputs(Q, K, V, key_padding_mask)
    tau = check_scale(scale, Q.shape[-1])
    mask = None if key_padding_mask is None else key_padding_mask[..., None, :]
    weights = softmax(xp, tau * (Q @ xp.matrix_transpose(K)), mask)
    return weights @ V
