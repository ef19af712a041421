"""The math on ``array_api_strict``, the array API's reference library, which offers nothing beyond the standard:
every strategy and solver runs there unchanged and agrees with numpy (``nystrom.linalg`` is written once against
the array API; numpy and torch reach it through array-api-compat, which tolerates more than the standard)."""

import array_api_strict as xps
import numpy as np
import pytest

import nystrom

RNG = np.random.default_rng(0)
Q, K, V = (RNG.standard_normal((2, 2, 40, 8)) for _ in range(3))
#: Padding of the second sequence's last 9 keys.
MASK = np.arange(40)[None, None, None, :] < np.array([40, 31])[:, None, None, None]


def on_both(call, *arrays):
    """``call`` on the numpy arrays and on their array_api_strict copies: (numpy result, strict result as numpy)."""
    strict = call(*(xps.asarray(a) for a in arrays))
    assert isinstance(strict, type(xps.asarray(0.0)))
    return call(*arrays), np.asarray(strict)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("solver", sorted(nystrom.SOLVERS))
@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
def test_every_strategy_and_solver_runs_on_the_standard_alone(strategy, solver, masked):
    # float64 on both sides with the same draws and the same order of operations but for the libraries' kernels:
    # 1e-10 covers the rounding of the solves (condition numbers up to about 1e4 here, cond eps ~ 2e-12) with room.
    # Measured bitwise equal (array_api_strict runs numpy's kernels); so are the float64 checks below.
    def call(q, k, v, *mask):
        return nystrom.approximate(q, k, v, num_landmarks=8, strategy=strategy, solver=solver, seed=0,
                                   attn_mask=mask[0] if mask else None)

    expected, got = on_both(call, Q, K, V, *((MASK,) if masked else ()))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
def test_every_key_a_landmark_is_exact_on_the_standard_alone(strategy):
    def call(q, k, v):
        return nystrom.approximate(q, k, v, num_landmarks=40, strategy=strategy, solver="pinv", seed=0)

    _, got = on_both(call, Q, K, V)
    # float64 at m = n: rounding amplified by cond(A), up to 3.4e4 (worst case cond eps = 7.5e-12); measured at most
    # 1.0e-13 on O(1) outputs; 10x.
    np.testing.assert_allclose(got, nystrom.exact_attention(Q, K, V), rtol=0, atol=1e-12)


def test_tol_cross_attention_and_float32_on_the_standard_alone():
    def searched(q, k, v, mask):
        return nystrom.approximate(q, k, v, num_landmarks=8, tol=0.1, attn_mask=mask)

    np.testing.assert_allclose(*on_both(searched, Q, K, V, MASK), rtol=1e-10, atol=1e-10)

    def cross(q, k, v):
        return nystrom.approximate(q, k, v, num_landmarks=8)

    np.testing.assert_allclose(*on_both(cross, Q[..., :25, :], K, V), rtol=1e-10, atol=1e-10)
    # float32: the same operations in the same precision, up to the kernels' summation order: measured 6.3e-7 (5 ulps)
    # on O(1) outputs; 16x.
    np.testing.assert_allclose(*on_both(cross, *(x.astype(np.float32) for x in (Q, K, V))), rtol=0, atol=1e-5)


def test_arrays_off_the_host_are_estimated_and_searched():
    # array_api_strict's "device1" refuses numpy's __array__ (not part of the standard): the estimate, the tol search
    # and Info's repr raised "Can't convert array on the 'device1' device to a NumPy array".
    device = xps.Device("device1")
    q, k, v = (xps.asarray(x[0, 0], device=device) for x in (Q, K, V))
    out, info = nystrom.approximate(q, k, v, num_landmarks=8, return_info=True)
    assert out.device == device
    estimate = nystrom.estimate_relative_error(q, k, v, out, num_samples=40)
    expected = nystrom.estimate_relative_error(Q[0, 0], K[0, 0], V[0, 0], np.asarray(out.to_device(xps.Device(
        "CPU_DEVICE"))), num_samples=40)
    # float64, the same numpy kernels on the same values (measured equal); 1e-12 for a different summation order.
    assert estimate.estimate == pytest.approx(expected.estimate, rel=1e-12)
    assert info.estimate_error(num_samples=40).estimate == pytest.approx(expected.estimate, rel=1e-12)
    assert "m=8 landmarks" in repr(info)
    searched = nystrom.approximate(q, k, v, num_landmarks=8, tol=0.5)
    assert searched.device == device


@pytest.mark.parametrize("device", [None, "device1"])
def test_the_sampled_search_and_its_census_run_on_the_standard_alone(device):
    # More queries than the 128 sampled rows (a review: the tests above have at most 40, where tol answers with exact
    # attention at once), so the row sample, the steps' sampled outputs and the census of interpolation weights run
    # on array_api_strict, on the host and off it. Six tight clusters per head, the second sequence padded.
    rng = np.random.default_rng(3)
    n, d = 300, 16
    centres = rng.standard_normal((2, 2, 6, d))
    tokens = centres[..., rng.integers(0, 6, n), :] + 0.05 * rng.standard_normal((2, 2, n, d))
    values = rng.standard_normal((2, 2, n, d))
    mask = np.ones((2, 1, 1, n), dtype=bool)
    mask[1, ..., 250:] = False
    expected, info = nystrom.approximate(tokens, tokens, values, mask, num_landmarks=4, tol=0.05, return_info=True)
    where = {} if device is None else {"device": xps.Device(device)}
    strict = [xps.asarray(a, **where) for a in (tokens, tokens, values, mask)]
    got, strict_info = nystrom.approximate(*strict, num_landmarks=4, tol=0.05, return_info=True)
    # A miss at m = 4, then m = 8 confirmed with the census's 16 rows as well.
    assert [(step.m, step.estimate.num_samples) for step in info.tol_steps] == [(4, 128), (8, 144)]
    # float64, numpy's kernels under both (measured bitwise equal); 1e-10 for another summation order.
    for mine, theirs in zip(strict_info.tol_steps, info.tol_steps):
        assert mine.m == theirs.m and mine.estimate.high == pytest.approx(theirs.estimate.high, rel=1e-10)
    np.testing.assert_allclose(np.asarray(got.to_device(xps.Device("CPU_DEVICE"))), expected, rtol=1e-10, atol=1e-10)
    assert strict_info.estimate_error(seed=0).high == pytest.approx(info.estimate_error(seed=0).high, rel=1e-10)


def test_query_chunks_that_do_not_divide_the_queries():
    # The last chunk's slice ran past the end, which the standard leaves unspecified (array_api_strict raised).
    def chunked(q, k, v):
        return nystrom.approximate(q, k, v, num_landmarks=8, query_chunk_size=15, seed=0)

    expected, got = on_both(chunked, Q, K, V)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    # Each row's computation is the same in a chunk (measured bitwise equal); 1e-12 for a BLAS that blocks rows apart.
    np.testing.assert_allclose(expected, nystrom.approximate(Q, K, V, num_landmarks=8, seed=0), rtol=1e-12,
                               atol=1e-12)


def test_cluster_means_multiply_one_membership_matrix_per_row(monkeypatch):
    # Without a scatter, the sums by cluster were one block-diagonal one-hot product over every (batch, head) row:
    # (rows (m + 1)) x (rows n) entries, 272 x 3,200 for 16 rows of 200 tokens. One (m + 1) x n matrix per row now.
    array = type(xps.asarray(0.0))
    largest = []
    matmul = array.__matmul__

    def recorded(a, b):
        largest.append(max(a.shape[-2] * a.shape[-1], b.shape[-2] * b.shape[-1]))
        return matmul(a, b)

    monkeypatch.setattr(array, "__matmul__", recorded)
    q, k, v = (xps.asarray(RNG.standard_normal((4, 4, 200, 8))) for _ in range(3))
    for strategy in ("segment_means", "kmeans", "norm"):
        largest.clear()
        nystrom.approximate(q, k, v, num_landmarks=16, strategy=strategy, seed=0)
        assert max(largest) <= 17 * 200, strategy
