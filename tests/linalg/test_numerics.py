"""The numerical primitives of ``nystrom.linalg.numerics`` against brute force."""

import array_api_compat
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nystrom.linalg.numerics import masked_median, mean_over, segment_sum, take_along_axis, top_k


def brute_segment_sum(values, labels, num_segments):
    labels = np.broadcast_to(labels, values.shape[:-1])
    out = np.zeros((*values.shape[:-2], num_segments, values.shape[-1]))
    for row in np.ndindex(values.shape[:-2]):
        for i, j in enumerate(labels[row]):
            if 0 <= j < num_segments:
                out[row][j] += values[row][i]
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.integers(1, 4), n=st.integers(1, 30), segments=st.integers(1, 6),
       shared=st.booleans(), strided=st.booleans())
def test_segment_sum_adds_the_rows_of_each_label(seed, heads, n, segments, shared, strided):
    # Labels shared by every row (the torch path scatters along the token axis in place) or one labelling per row
    # (the flat scatter); -1 and labels past the last segment are dropped; torch values strided as a model's
    # projections (B, n, H, d) seen as (B, H, n, d). Sums of at most 30 float64 terms: rounding only, 1e-12.
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((2, heads, n, 3))
    labels = rng.integers(-1, segments + 2, size=(1, 1, n) if shared else (2, heads, n))
    expected = brute_segment_sum(values, labels, segments)
    out = segment_sum(np, values, labels, segments)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    tensor = torch.from_numpy(values)
    if strided:
        tensor = tensor.transpose(1, 2).contiguous().transpose(1, 2)
    out = segment_sum(array_api_compat.array_namespace(tensor), tensor, torch.from_numpy(labels), segments)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_segment_sum_keeps_half_precision_sums_in_float32():
    # 3,000 ones in one segment: rounded to the half dtype once at the end (float16 holds 3,000 exactly, bfloat16
    # rounds it to 3,008), not after every addition (which stops float16 at 2,048 and bfloat16 at 256).
    xp = array_api_compat.array_namespace(torch.zeros(1))
    for dtype in (torch.float16, torch.bfloat16):
        ones = torch.ones(1, 2, 3000, 1, dtype=dtype)
        out = segment_sum(xp, ones, torch.zeros(1, 1, 3000, dtype=torch.int64), 1)
        assert torch.equal(out, torch.full((1, 2, 1, 1), 3000.0).to(dtype)), (dtype, out.flatten())
        # One row with int32 labels: torch's index_add_ rounds after every addition with an int32 index (a review).
        for values, labels in ((torch.ones(3000, 1, dtype=dtype), torch.zeros(3000, dtype=torch.int32)),
                               (torch.ones(1, 3000, 1, dtype=dtype), torch.zeros(1, 3000, dtype=torch.int16))):
            out = segment_sum(xp, values, labels, 2)
            expected = torch.tensor(3000.0).to(dtype).item()
            assert out.flatten()[0].item() == expected, (dtype, labels.dtype, out.flatten())


def test_segment_sum_takes_labels_that_broadcast_and_narrow_integer_labels():
    xp = array_api_compat.array_namespace(torch.zeros(1))
    values = torch.arange(12.0).reshape(2, 3, 2)
    np.testing.assert_array_equal(segment_sum(xp, values, torch.zeros(1, dtype=torch.int64), 1).numpy(),
                                  values.sum(-2, keepdim=True).numpy())
    np.testing.assert_array_equal(segment_sum(xp, values, torch.tensor([0, 1, 0], dtype=torch.int16), 2).numpy(),
                                  brute_segment_sum(values.numpy(), np.array([0, 1, 0]), 2))


@pytest.mark.parametrize("axis", [-1, -2])
def test_take_along_axis_matches_numpy_for_both_libraries(axis):
    # The torch branch is one Tensor.gather, without array-api-compat's wrapping of negative indices (indices here
    # are non-negative, as every caller's are: positions from argmax, argsort and top_k).
    rng = np.random.default_rng(0)
    array = rng.standard_normal((2, 3, 7, 5))
    size = array.shape[axis]
    indices = rng.integers(0, size, (2, 3, 4, 5) if axis == -2 else (2, 3, 7, 4))
    expected = np.take_along_axis(array, indices, axis=axis)
    assert np.array_equal(take_along_axis(array_api_compat.array_namespace(array), array, indices, axis), expected)
    tensor = torch.from_numpy(array)
    got = take_along_axis(array_api_compat.array_namespace(tensor), tensor, torch.from_numpy(indices), axis)
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize(("array_lead", "indices_lead"), [((1, 3), (2, 3)), ((2, 3), (1, 3)), ((2, 1), (1, 3))])
def test_take_along_axis_broadcasts_like_numpy(array_lead, indices_lead):
    # Tensor.gather alone does not broadcast: a narrower index would silently return fewer rows, a wider one raise
    # (rpcholesky_pivots with a (3, n) mask on (1, n, D) points did, in review).
    rng = np.random.default_rng(1)
    array = rng.standard_normal((*array_lead, 6))
    indices = rng.integers(0, 6, (*indices_lead, 4))
    expected = np.take_along_axis(array, indices, axis=-1)
    got = take_along_axis(array_api_compat.torch, torch.from_numpy(array), torch.from_numpy(indices))
    assert got.shape == expected.shape and np.array_equal(got.numpy(), expected)


def test_masked_median_of_a_row_with_nothing_counted_is_inf_not_an_index_of_minus_one():
    # Outside the contract, but reachable with check_values=False; on a GPU index -1 is a device-side assert.
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_median(array_api_compat.torch, values, mask).tolist() == [1.0, float("inf")]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), levels=st.integers(1, 4), data=st.data())
def test_top_k_breaks_ties_by_the_lowest_position_in_every_library(seed, n, levels, data):
    # A stable sort of the whole row is the reference: numpy's argpartition and torch's topk break ties as they like,
    # so norm's sink candidates on duplicated tokens differed between numpy, torch and a sharded sequence.
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, (3, n)).astype(np.float64)
    values[rng.random((3, n)) < 0.1] = -np.inf
    k = data.draw(st.integers(1, n))
    expected = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    assert np.array_equal(top_k(array_api_compat.array_namespace(values), values, k), expected)
    for dtype in (torch.float32, torch.float64):
        tensor = torch.from_numpy(values).to(dtype)
        got = top_k(array_api_compat.array_namespace(tensor), tensor, k)
        assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("kind", ["numpy", "float32", "bfloat16"])
def test_top_k_returns_positions_of_the_row_with_nan_and_nothing_for_k_zero(kind):
    # bfloat16 has no numpy view: the tie search of accelerators runs, which read a NaN threshold as no entry and
    # returned position n (past the end: a device-side assert on a GPU) before NaN candidates were ranked first.
    rows = np.array([[np.nan, 1.0, 0.0, 1.0], [np.nan, np.nan, np.nan, np.nan], [2.0, np.nan, np.nan, 2.0]])
    values = rows if kind == "numpy" else torch.from_numpy(rows).to(getattr(torch, kind))
    xp = array_api_compat.array_namespace(values)
    for k in range(5):
        got = np.asarray(top_k(xp, values, k))
        assert got.shape == (3, k) and ((0 <= got) & (got < 4)).all()
        assert all(len(set(row)) == k for row in got.tolist())  # distinct positions


@pytest.mark.parametrize("shape", [(2, 1, 5, 3), (2, 4, 5, 3)])
def test_mean_over_one_entry_is_a_view_and_otherwise_the_mean(shape):
    X = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mean = mean_over(torch, X, -3)
    torch.testing.assert_close(mean, X.mean(-3), rtol=0, atol=0)
    assert (mean.data_ptr() == X.data_ptr()) == (shape[-3] == 1)
