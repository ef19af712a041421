"""Exact attention against an independent scipy reference."""

import numpy as np
import pytest
import scipy.special
import torch

from nystrom import exact_attention

# float64 inputs of O(1) size: the reference and the implementation differ only by rounding in
# sums of n <= 64 terms, so ~1e-15 relative; 1e-12 leaves room for the max-shift reordering.
RTOL64 = 1e-12


def reference(Q, K, V, scale, mask=None):
    logits = scale * Q @ np.swapaxes(K, -1, -2)
    if mask is not None:
        logits = np.where(mask[..., None, :], logits, -np.inf)
    return scipy.special.softmax(logits, axis=-1) @ V


@pytest.mark.parametrize("shape", [(5, 3), (2, 7, 4), (2, 3, 9, 8)])
def test_matches_scipy(shape):
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal(shape) for _ in range(3))
    np.testing.assert_allclose(exact_attention(Q, K, V), reference(Q, K, V, shape[-1] ** -0.5), rtol=RTOL64)


def test_cross_attention_and_scale():
    rng = np.random.default_rng(1)
    Q, K, V = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 11, 4)), rng.standard_normal((2, 11, 3))
    out = exact_attention(Q, K, V, scale=0.3)
    assert out.shape == (2, 5, 3)
    np.testing.assert_allclose(out, reference(Q, K, V, 0.3), rtol=RTOL64)


def test_padding_equals_dropping_padded_keys():
    rng = np.random.default_rng(2)
    Q, K, V = (rng.standard_normal((1, 12, 4)) for _ in range(3))
    mask = np.arange(12)[None] < 9
    K_pad, V_pad = K.copy(), V.copy()
    K_pad[:, 9:] = 1e3  # huge logits on padding must not leak through
    np.testing.assert_allclose(exact_attention(Q, K_pad, V_pad, key_padding_mask=mask),
                               exact_attention(Q, K[:, :9], V[:, :9]), rtol=RTOL64)


def test_large_logits_do_not_overflow():
    # |q.k| * scale ~ 1e4: a naive exp overflows; the max-shifted softmax must stay finite.
    Q = np.full((1, 3, 2), 100.0)
    K = np.array([[[100.0, 100.0], [-100.0, 0.0], [0.0, 0.0]]])
    V = np.eye(3)[None]
    out = exact_attention(Q, K, V, scale=1.0)
    np.testing.assert_allclose(out, np.tile([1.0, 0.0, 0.0], (1, 3, 1)), atol=1e-12)


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    out_t = exact_attention(*(torch.from_numpy(x) for x in (Q, K, V)))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), exact_attention(Q, K, V), rtol=RTOL64)
