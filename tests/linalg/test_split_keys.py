"""Attention split along the key axis (``nystrom.linalg.split_keys``): the log-sum-exp merge of the blocks is exact.

The merge across processes (``merge_partials(across=...)``) runs in ``tests/torch/test_distributed.py``."""

import array_api_compat
import numpy as np
import pytest
import torch

from nystrom.linalg.attention import softmax_attention
from nystrom.linalg.split_keys import merge_partials, partial_attention

# float64 throughout: the merge reorders sums of at most n terms, a few units of 1e-16 each.
TIGHT = {"rtol": 1e-13, "atol": 1e-14}


def split_key_attention(xp, q, k, v, mask=None, *, scale, blocks):
    """Attention over ``blocks`` contiguous key blocks (the last may be shorter), merged along a stacked block axis."""
    n = k.shape[-2]
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    parts = [partial_attention(xp, q, k[..., a:b, :], v[..., a:b, :], None if mask is None else mask[..., a:b],
                               scale=scale) for a, b in zip(edges, edges[1:])]
    return merge_partials(xp, *(xp.stack(x, axis=-3) for x in zip(*parts)), axis=-3)


def inputs(seed=0, shape=(2, 3, 50, 8), n_q=7):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*shape[:-2], n_q, shape[-1]))
    k, v = rng.standard_normal(shape), rng.standard_normal(shape)
    return q, k, v


@pytest.mark.parametrize("blocks", [1, 2, 3, 7, 50])
def test_split_equals_one_block(blocks):
    q, k, v = inputs()
    np.testing.assert_allclose(split_key_attention(np, q, k, v, scale=0.4, blocks=blocks),
                               softmax_attention(np, q, k, v, scale=0.4), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_with_a_mask_equals_one_block_in_torch(dtype):
    q, k, v = (torch.as_tensor(a, dtype=dtype) for a in inputs(1))
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., 20:] = False  # blocks 3 to 6 of 7 hold only padding for the first sequence
    xp = array_api_compat.array_namespace(q)
    got = split_key_attention(xp, q, k, v, mask, scale=0.3, blocks=7)
    ref = softmax_attention(xp, q, k, v, mask, scale=0.3)
    # float32: the same reordered sums, a few ulps of O(1) outputs (measured 1.5e-7); about 10x. float64 measured 1e-15.
    tol = TIGHT if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(got.numpy(), ref.numpy(), **tol)


def test_an_all_masked_block_contributes_nothing():
    q, k, v = inputs(2)
    o, lse = partial_attention(np, q, k[..., :10, :], v[..., :10, :], np.zeros((1, 10), dtype=bool), scale=1.0)
    assert np.all(lse == -np.inf) and np.all(o == 0)
    whole = partial_attention(np, q, k, v, scale=1.0)
    merged = merge_partials(np, *(np.stack([a, b], axis=-3) for a, b in zip((o, lse), whole)), axis=-3)
    np.testing.assert_allclose(merged, softmax_attention(np, q, k, v, scale=1.0), **TIGHT)


def test_a_blocks_partial_results_are_its_attention_and_log_sum_exp():
    q, k, v = inputs(3)
    o, lse = partial_attention(np, q, k, v, scale=0.7)
    logits = 0.7 * q @ np.swapaxes(k, -1, -2)
    np.testing.assert_allclose(o, softmax_attention(np, q, k, v, scale=0.7), **TIGHT)
    top = logits.max(axis=-1, keepdims=True)
    np.testing.assert_allclose(lse, top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)), **TIGHT)


@pytest.mark.parametrize("blocks", [1, 4, 16])
@pytest.mark.parametrize("size", [1e36, 3e38])
def test_values_near_the_dtypes_largest_do_not_overflow_the_merge(blocks, size):
    # A review: the unnormalised block sums reached n_b max|V|, infinite in float32 for values of 1e36 over 1,000 keys
    # of near-uniform attention, where SDPA and one block of the normalised form are finite. At 3e38, 0.9 of float32's
    # largest, a merge whose weights were not divided by the number of blocks summed past it (a review).
    rng = np.random.default_rng(4)
    q = torch.as_tensor(rng.standard_normal((1, 3, 4)) * 0.01, dtype=torch.float32)
    k = torch.as_tensor(rng.standard_normal((1, 1024, 4)) * 0.01, dtype=torch.float32)
    v = torch.as_tensor(size * (1 - 0.01 * np.abs(rng.standard_normal((1, 1024, 2)))), dtype=torch.float32)
    got = split_key_attention(array_api_compat.array_namespace(q), q, k, v, scale=1.0, blocks=blocks)
    ref = softmax_attention(np, q.double().numpy(), k.double().numpy(), v.double().numpy(), scale=1.0)
    # float32 against float64: the outputs, about 1e36, to a few float32 ulps of reordered sums (measured 2e-7).
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
