"""Exact attention against an independent scipy reference, and the properties of the Nyström formula that the
docs claim."""

import array_api_compat
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nystrom
import nystrom.torch
from nystrom import FPS, PInv, RPCholesky, Uniform, exact_attention
from nystrom.linalg.attention import nystrom_attention

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
    np.testing.assert_allclose(exact_attention(Q, K_pad, V_pad, attn_mask=mask),
                               exact_attention(Q, K[:, :9], V[:, :9]), rtol=RTOL64)


def test_large_logits_do_not_overflow():
    # |q.k| * scale ~ 1e4: a naive exp overflows; the max-shifted softmax must stay finite.
    Q = np.full((1, 3, 2), 100.0)
    K = np.array([[[100.0, 100.0], [-100.0, 0.0], [0.0, 0.0]]])
    V = np.eye(3)[None]
    out = exact_attention(Q, K, V, scale=1.0)
    # Exact: the other logits are 1e4 and 2e4 below the largest, and exp(-1e4) is 0 in float64 (measured bitwise).
    np.testing.assert_array_equal(out, np.tile([1.0, 0.0, 0.0], (1, 3, 1)))


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    out_t = exact_attention(*(torch.from_numpy(x) for x in (Q, K, V)))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), exact_attention(Q, K, V), rtol=RTOL64)


def low_rank_plus_noise(seed, n=128, d=16, rank=4, noise=0.1, strength=1.5):
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, rank))
    Q = strength * U @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))
    K = strength * U @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))
    return Q, K, rng.standard_normal((n, d))


def landmark_kernel_condition(q_landmarks, k_landmarks, scale, log_c=None):
    """The largest condition number over the batch of A = softmax(tau q~ k~^T + log c), in float64."""
    q_landmarks, k_landmarks = np.asarray(q_landmarks, np.float64), np.asarray(k_landmarks, np.float64)
    bias = 0.0 if log_c is None else np.asarray(log_c, np.float64)[..., None, :]
    A = scipy.special.softmax(scale * q_landmarks @ np.swapaxes(k_landmarks, -1, -2) + bias, axis=-1)
    return float(np.max(np.linalg.cond(A)))


REAL_TOKEN_STRATEGIES = [FPS(), Uniform(), RPCholesky()]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), heads=st.integers(1, 3), dtype=st.sampled_from(["float64",
       "float32"]), strategy=st.sampled_from(REAL_TOKEN_STRATEGIES), data=st.data())
def test_interpolation_at_landmark_rows(seed, n, heads, dtype, strategy, data):
    # Docs' Nystrom page, "What it does preserve" (1): for real-token landmarks (FPS, Uniform, RPCholesky) whose query
    # and key positions coincide, row i in S of F is row i of A, so F_i A^{-1} = e_i^T and the landmark rows of the
    # output are exact; with the landmarks shared across heads (landmarks page) this holds in each head.
    # 2 <= m < n: m = 1 makes every row exact (F = A = 1) and m = n every row, hiding a wrong F or A.
    m = data.draw(st.integers(2, n - 1))
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal((2, heads, n, 6)).astype(dtype) for _ in range(3))
    lm = strategy(Q, K, m, seed=seed, head_axis=-3)
    idx = np.asarray(lm.indices)
    assert idx.shape == (2, heads, m) and (idx == idx[:, :1]).all()  # one set of positions for every head
    tau = 6**-0.5
    cond = landmark_kernel_condition(np.take_along_axis(Q, idx[..., None], -2),
                                     np.take_along_axis(K, idx[..., None], -2), tau)
    eps = float(np.finfo(dtype).eps)
    # The identity needs an exact inverse: skip the draws where cond(A) eps > 1e-3 (cond(A) > 8e3 in float32, about
    # a tenth of them; 4e12 in float64), where the rounding of A^{-1} is no longer small.
    assume(cond * eps <= 1e-3)
    out, _ = nystrom_attention(Q, K, V, lm, PInv(rtol=1e-13))
    assert out.dtype == np.dtype(dtype)
    exact = reference(*(x.astype(np.float64) for x in (Q, K, V)), tau)  # on the inputs rounded to the dtype
    # Rounding of A^{-1} times cond(A): |out - exact| at the landmark rows, over 8,100 draws (n, m, heads and the
    # three strategies), was at most 3.8 (float64) and 1.3 (float32) times cond(A) eps max |exact|; 20 leaves
    # margin (float32 at the median cond(A) of 530: 1.3e-3).
    np.testing.assert_allclose(np.take_along_axis(out, idx[..., None], -2),
                               np.take_along_axis(exact, idx[..., None], -2),
                               rtol=0, atol=20 * cond * eps * float(np.abs(exact).max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 20))
def test_implied_attention_rows_sum_to_one(seed, m):
    # A 1 = 1  =>  A^{-1} 1 = 1  =>  F A^{-1} B 1 = F 1 = 1: with V = ones the output is ones. It holds for any
    # composition of row-stochastic F, A and B, so it checks the normalisations and the solve, not which F, A and B.
    # m >= 2: at m = 1, F = A = 1 and the output is B 1 whatever the solve.
    rng = np.random.default_rng(seed)
    Q, K = rng.standard_normal((30, 5)), rng.standard_normal((30, 5))
    out, info = nystrom.approximate(Q, K, np.ones((30, 2)), strategy="fps", num_landmarks=m,
                                    solver=nystrom.NewtonSchulz(tol=1e-13, max_iters=200), return_info=True)
    # The identity needs the inverse itself: skip the draws where A is so ill-conditioned that Newton-Schulz
    # has not reached its tolerance in 200 steps (seed 838, m = 13: residual 7e-12, rows off by 5e-7).
    assume(float(np.max(info.residual)) <= 1e-13)
    # Z 1 - 1 = (Z A - I) 1, about the residual times cond(A): over 17,000 draws (seeds, m = 2..20) |out - 1| was at
    # most 0.89 times cond(A) * 1e-13 (at most 6.3e-10; cond(A) up to 4.5e4); 10x that.
    cond = landmark_kernel_condition(info.landmarks.queries, info.landmarks.keys, 5**-0.5)
    np.testing.assert_allclose(out, 1.0, rtol=0, atol=10 * cond * 1e-13)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 12), strategy=st.sampled_from(sorted(nystrom.STRATEGIES)),
       cross=st.booleans(), masked=st.booleans())
def test_rows_sum_to_one_with_masks_and_cross_attention(seed, m, strategy, cross, masked):
    # The docs' Nystrom page (2), for every strategy, weighted ones included (A stays row-stochastic with log c), a key
    # mask (sequence 1 keeps 20 of its 30 keys) and cross-attention (7 queries): V = ones gives ones in every row.
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((2, 7 if cross else 30, 5))
    K = rng.standard_normal((2, 30, 5))
    mask = None
    if masked:
        mask = np.ones((2, 30), bool)
        mask[1, 20:] = False
    m = min(m, 6) if cross else m  # at most the 7 queries, below them so that the formula runs
    out, info = nystrom.approximate(Q, K, np.ones((2, 30, 2)), strategy=strategy, num_landmarks=m,
                                    solver=PInv(rtol=1e-13), attn_mask=mask, seed=seed, return_info=True)
    landmarks = info.landmarks
    cond = landmark_kernel_condition(landmarks.queries, landmarks.keys, 5**-0.5, landmarks.log_weights)
    eps = np.finfo(np.float64).eps
    assume(cond * eps <= 1e-6)
    # Z 1 = 1 up to the rounding of the solve times cond(A): over 1,440 draws (60 seeds, every strategy, cross or not,
    # masked or not) |out - 1| was at most 2.6 cond(A) eps; 50 as for the weighted rows below.
    np.testing.assert_allclose(out, 1.0, rtol=0, atol=50 * cond * eps)


def test_error_falls_as_landmarks_grow():
    # Expected error over random landmark draws is non-increasing in m on low-rank-plus-noise input.
    errors = []
    for m in (4, 8, 16, 32, 64):
        e = []
        for seed in range(12):
            Q, K, V = low_rank_plus_noise(seed)
            exact = nystrom.exact_attention(Q, K, V)
            out = nystrom.approximate(Q, K, V, strategy="uniform", num_landmarks=m, seed=seed)
            e.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        errors.append(np.mean(e))
    # Measured: each mean at most 0.94 of the one before, the last 0.33 of the first; 2 % is room for the noise of a
    # 12-draw mean, not for a rise.
    assert all(b <= a * 1.02 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("strategy", ["fps", "norm", "rpcholesky"])
def test_structured_strategies_beat_chance_on_low_rank(strategy):
    Q, K, V = low_rank_plus_noise(0, n=256)
    exact = nystrom.exact_attention(Q, K, V)
    err = lambda s: np.linalg.norm(nystrom.approximate(Q, K, V, strategy=s, num_landmarks=32, seed=0) - exact)
    uniform = np.mean([np.linalg.norm(nystrom.approximate(Q, K, V, strategy="uniform", num_landmarks=32, seed=s)
                                      - exact) for s in range(8)])
    assert err(strategy) < uniform


def test_output_dtype_follows_v():
    Q, K, V = (np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32) for _ in range(3))
    assert nystrom.approximate(Q, K, V, num_landmarks=4).dtype == np.float32


def repeated_keys(seed, m, d=6, d_v=3, max_copies=5, cross=False):
    """Keys and values that are copies of m distinct pairs, copy j repeated c_j times; every token has its own query
    (or, with ``cross``, n_q = 7 unrelated queries)."""
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((m, d)), rng.standard_normal((m, d_v))
    c = rng.integers(1, max_copies + 1, size=m)
    group = np.repeat(np.arange(m), c)
    Q = rng.standard_normal((7 if cross else group.size, d))
    return Q, k[group], v[group], k, c, rng.standard_normal((m, d))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 8), cross=st.booleans())
def test_weighted_landmarks_are_exact_on_repeated_keys(seed, m, cross):
    # Keys that are c_j copies of k_j give exact attention softmax(tau q k~^T + log c) v~: with the m distinct keys as
    # landmarks and log c as their log-weights, F A^+ B V is exact for any m landmark queries with A invertible
    # (docs' Nyström page).
    Q, K, V, k, c, q_landmarks = repeated_keys(seed, m, cross=cross)
    exact = exact_attention(Q, K, V)
    weighted = nystrom.Landmarks(q_landmarks, k, log_weights=np.log(c.astype(np.float64)))
    out, _ = nystrom_attention(Q, K, V, weighted, PInv(rtol=1e-13))
    # float64 rounding of A^+ times cond(A): over 1,500 draws (cond(A) up to 3.6e4) at most 4.6 cond(A) eps max |exact|
    # (numpy and torch); 20.
    cond = landmark_kernel_condition(q_landmarks, k, 6**-0.5, weighted.log_weights)
    tol = 20 * cond * np.finfo(np.float64).eps * np.abs(exact).max()
    np.testing.assert_allclose(out, exact, rtol=0, atol=tol)
    out_t, _ = nystrom.torch.fna_attention(*(torch.from_numpy(x) for x in (Q, K, V)), nystrom.Landmarks(
        torch.from_numpy(q_landmarks), torch.from_numpy(k), log_weights=torch.from_numpy(np.log(c.astype(float)))),
        PInv(rtol=1e-13))
    np.testing.assert_allclose(out_t.numpy(), exact, rtol=0, atol=tol)


@pytest.mark.parametrize("cross,masked", [(False, False), (True, False), (False, True), (True, True)])
def test_kmeans_finds_the_repeated_keys_and_is_exact(cross, masked):
    # The same exactness with the landmarks kmeans chooses: its farthest-point seeds take the m distinct keys (every
    # copy of a chosen key is at distance 0) and its clusters are their copies, whose counts are the c_j (all tokens
    # lie in the k-means sample below 1,024; past it the counts are estimates, the docs' landmark page). Padding
    # after the real keys holds other keys.
    for seed in range(5):
        Q, K, V, k, c, _ = repeated_keys(seed, 6, cross=cross)
        order = np.random.default_rng(seed).permutation(K.shape[0])
        K, V = K[order], V[order]
        Q = Q if cross else Q[order]
        exact = exact_attention(Q, K, V)
        mask = None
        if masked:
            rng = np.random.default_rng(seed + 100)
            K = np.concatenate([K, rng.standard_normal((3, K.shape[1]))])
            V = np.concatenate([V, rng.standard_normal((3, 3))])
            Q = Q if cross else np.concatenate([Q, rng.standard_normal((3, Q.shape[1]))])
            mask = np.arange(K.shape[0]) < K.shape[0] - 3
        out, info = nystrom.approximate(Q, K, V, strategy="kmeans", num_landmarks=6, solver=PInv(rtol=1e-13),
                                        attn_mask=mask, return_info=True)
        landmarks = info.landmarks
        assert sorted(np.exp(landmarks.log_weights).round().astype(int).tolist()) == sorted(c.tolist())
        cond = landmark_kernel_condition(landmarks.queries, landmarks.keys, 6**-0.5, landmarks.log_weights)
        rows = slice(None) if cross or not masked else slice(0, -3)
        np.testing.assert_allclose(out[rows], exact, rtol=0,
                                   atol=20 * cond * np.finfo(np.float64).eps * np.abs(exact).max())


def test_unweighted_landmarks_are_not_exact_on_repeated_keys():
    # The same construction without the weights: each landmark counts once, so unequal multiplicities bias every row.
    errors = []
    for seed in range(20):
        Q, K, V, k, c, q_landmarks = repeated_keys(seed, 6)
        if np.all(c == c[0]):
            continue
        out, _ = nystrom_attention(Q, K, V, nystrom.Landmarks(q_landmarks, k), PInv(rtol=1e-13))
        exact = exact_attention(Q, K, V)
        errors.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
    assert min(errors) > 1e-3, min(errors)  # measured 0.022; weighted, at most 2e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 12))
def test_weighted_rows_still_sum_to_one(seed, m):
    # A stays row-stochastic with the log c bias, so A^+ 1 = 1 and F A^+ B 1 = 1 (docs: row sums). m >= 2: at m = 1,
    # F = A = 1 and the output is B 1 whatever the solve.
    rng = np.random.default_rng(seed)
    Q, K = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    log_c = np.log(rng.integers(1, 9, size=m).astype(float))
    landmarks = nystrom.Landmarks(Q[:m], K[:m], log_weights=log_c)
    ones = np.ones((40, 1))
    out, _ = nystrom_attention(Q, K, ones, landmarks, PInv(rtol=1e-13))
    # float64 rounding of the solve times cond(A): over 10,000 draws (seeds, m = 2..12; cond(A) up to 3e6) |out - 1|
    # was at most 7.4 cond(A) eps; 50 leaves margin.
    cond = landmark_kernel_condition(Q[:m], K[:m], 8**-0.5, log_c)
    np.testing.assert_allclose(out, ones, rtol=0, atol=50 * cond * np.finfo(np.float64).eps)


def test_bad_log_weights_are_named():
    Q = np.random.default_rng(0).standard_normal((2, 10, 4))
    landmarks = nystrom.Landmarks(Q[:, :3], Q[:, :3], log_weights=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="landmark log_weights have shape"):
        nystrom_attention(Q, Q, Q, landmarks)


def test_hand_made_landmarks_are_checked():
    # Landmarks built by hand (not by a strategy) are checked like Q, K and V: NaN or inf (which came out as a NaN
    # output and residual), None fields, and log_weights of a shape that says what it must be.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 20, 8)) for _ in range(3))
    idx = np.arange(5)
    good = nystrom.Landmarks(Q[:, idx], K[:, idx])
    bad_weights = np.zeros((2, 5))
    bad_weights[0, 1] = np.nan
    bad_keys = K[:, idx].copy()
    bad_keys[1, 2, 3] = np.inf
    for landmarks, error, match in [
        (nystrom.Landmarks(Q[:, idx], K[:, idx], log_weights=bad_weights), ValueError, "log_weights contains NaN"),
        (nystrom.Landmarks(Q[:, idx], bad_keys), ValueError, "landmark keys contains NaN or infinite"),
        (nystrom.Landmarks(None, K[:, idx]), TypeError, "landmark queries must be an array"),
        (nystrom.Landmarks(Q[:, idx], K[:, idx], log_weights=np.zeros(5)), ValueError, r"expected \(2, 5\) with 1"),
        # No landmark, or no landmark axis: a raw reduction error or IndexError from the kernels before.
        (nystrom.Landmarks(Q[:, :0], K[:, :0]), ValueError, r"shape \(\.\.\., m, d\) with m >= 1, got \(2, 0, 8\)"),
        (nystrom.Landmarks(np.ones(8), np.ones(8)), ValueError, r"shape \(\.\.\., m, d\) with m >= 1, got \(8,\)"),
    ]:
        with pytest.raises(error, match=match):
            nystrom_attention(Q, K, V, landmarks)
    # A plain solver callable must return a SolveResult: an array (whose torch twin has an ``inverse`` method)
    # once failed far from here.
    with pytest.raises(TypeError, match="must return a SolveResult"):
        nystrom_attention(Q, K, V, good, solver=np.linalg.pinv)
    with pytest.raises(TypeError, match="must return a SolveResult"):
        nystrom.approximate(torch.from_numpy(Q), torch.from_numpy(K), torch.from_numpy(V), num_landmarks=5,
                            solver=torch.linalg.pinv)
    # ... of A's shape: a wrong one failed in numpy's matmul.
    with pytest.raises(ValueError, match=r"an inverse of the shape of A, \(2, 5, 5\)"):
        nystrom_attention(Q, K, V, good, solver=lambda A: nystrom.linalg.solvers.SolveResult(A[..., :4, :4], None, 0))
    # ... of A's library: a numpy inverse for torch inputs failed in torch's `to` with a message that named no solver.
    with pytest.raises(TypeError, match="solver callable's inverse is a numpy array but A is a torch array"):
        nystrom.approximate(torch.from_numpy(Q), torch.from_numpy(K), torch.from_numpy(V), num_landmarks=5,
                            solver=lambda A: nystrom.SolveResult(A.numpy(), None, 0))


def test_a_strategy_callables_landmarks_are_checked_like_hand_made_ones():
    # approximate(strategy=callable) returned an all-NaN output for NaN landmarks, which nystrom_attention refuses.
    rng = np.random.default_rng(1)
    Q, K, V = (rng.standard_normal((2, 20, 8)) for _ in range(3))

    def nan_strategy(Q, K, m, **options):
        return nystrom.Landmarks(Q[..., :m, :] * np.nan, K[..., :m, :])

    with pytest.raises(ValueError, match="landmark queries contains NaN"):
        nystrom.approximate(Q, K, V, num_landmarks=4, strategy=nan_strategy)
    nystrom.approximate(Q, K, V, num_landmarks=4, strategy=nan_strategy, check_values=False)  # reads no data


def dense_nystrom(Q, K, V, q_landmarks, k_landmarks, scale, log_c=None, keys=None):
    """F A^+ (B V) in float64 from its definition (docs' Nystrom page), independent of the library: F = softmax(tau Q
    k~^T + log c), A = softmax(tau q~ k~^T + log c), B = softmax(tau q~ K^T + M) with M = -inf at padded keys, A^+
    by numpy's SVD. Also returns the largest condition number of A over the batch."""
    Q, K, V, q_landmarks, k_landmarks = (np.asarray(x, dtype=np.float64) for x in (Q, K, V, q_landmarks, k_landmarks))
    bias = 0.0 if log_c is None else np.asarray(log_c, dtype=np.float64)[..., None, :]
    F = scipy.special.softmax(scale * Q @ np.swapaxes(k_landmarks, -1, -2) + bias, axis=-1)
    A = scipy.special.softmax(scale * q_landmarks @ np.swapaxes(k_landmarks, -1, -2) + bias, axis=-1)
    logits = scale * q_landmarks @ np.swapaxes(K, -1, -2)
    if keys is not None:
        logits = np.where(np.asarray(keys)[..., None, :], logits, -np.inf)
    B = scipy.special.softmax(logits, axis=-1)
    return F @ np.linalg.pinv(A) @ (B @ V), float(np.linalg.cond(A).max())


# nystrom_product against dense_nystrom, relative to max |reference|, over 1,200 draws per dtype of the test's inputs
# (cond(A) <= 117): at most 1.5e-14 (float64), 5.1e-6 (float32, the solve and both products in float32) and 2.3e-3
# (float16: B V and F v' rounded to 11 bits, about 2 ulps of the output). The tolerances leave 4-65x margin, and
# stay below 0.038, the least error of the same draws with the log c bias dropped (weighted draws), and 1, that of a
# doubled output.
DENSE_TOL = {"float64": 1e-12, "float32": 5e-5, "float16": 1e-2}
# The output at a subset of rows against those rows of the whole output, relative to max |output|: at most 9.8e-16,
# 5.0e-7 and 2.5e-4 over the same draws (only the order of the sums over query rows differs, a few ulps); 10x.
ROWS_TOL = {"float64": 1e-14, "float32": 5e-6, "float16": 2e-3}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 10), dtype=st.sampled_from(["float64", "float32", "float16"]),
       weighted=st.booleans(), masked=st.booleans())
def test_the_output_at_some_rows_is_those_rows_of_the_whole_output(seed, m, dtype, weighted, masked):
    # approximate(tol=...) evaluates F v' only at its sampled rows until it has chosen m: the factors v' do not
    # depend on the queries, and each output row depends on its own query only. float16 takes the rescaled path.
    # Both the whole output and the rows are checked against the dense float64 formula written above, on the inputs
    # rounded to the dtype (so only the computation's rounding is measured).
    from nystrom.linalg.attention import nystrom_factors, nystrom_output, nystrom_product
    from nystrom.torch.attention import sdpa_attend

    rng = np.random.default_rng(seed)
    Q, K, V = (rng.standard_normal((2, 30, 8)) for _ in range(3))
    # The landmarks are the first m tokens; their queries lean on their own keys, which keeps A diagonally dominant
    # (cond(A) <= 117 over 1,200 draws), so the tolerances need not scale with cond(A).
    Q[:, :m] = 2 * K[:, :m] + 0.5 * Q[:, :m]
    Q, K, V = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (Q, K, V))
    log_c = torch.from_numpy(np.log(rng.integers(1, 9, size=(2, m)).astype(float))) if weighted else None
    keys = mask = None
    if masked:
        # Key padding at the end of each sequence (never on a landmark); padded rows of K and V are zero, as
        # nystrom_product expects.
        keys = torch.from_numpy(np.arange(30)[None] < rng.integers(m, 31, size=2)[:, None])
        K, V = K * keys[..., None], V * keys[..., None]
        mask = keys[:, None, :]
    landmarks = nystrom.Landmarks(Q[:, :m], K[:, :m], log_weights=log_c)
    reference, cond = dense_nystrom(Q.double(), K.double(), V.double(), Q[:, :m].double(), K[:, :m].double(), 0.35,
                                    None if log_c is None else log_c.double(), keys)
    assume(cond <= 120)  # the range the tolerances were measured on (the rare draw beyond is skipped)
    xp = array_api_compat.array_namespace(Q)
    attend = lambda q, k, v, mask: sdpa_attend(q, k, v, mask, scale=0.35)  # noqa: E731
    whole, _ = nystrom_product(xp, Q, K, V, landmarks, PInv(), scale=0.35, mask=mask, attend=attend)
    assert whole.dtype == getattr(torch, dtype)
    largest = float(np.abs(reference).max())
    np.testing.assert_allclose(whole.double().numpy(), reference, rtol=0, atol=DENSE_TOL[dtype] * largest)
    rows = torch.from_numpy(rng.choice(30, size=7, replace=False))
    factors = nystrom_factors(xp, K, V, landmarks, PInv(), scale=0.35, mask=mask, attend=attend)
    part = nystrom_output(xp, Q[:, rows], factors, attend)
    torch.testing.assert_close(part, whole[:, rows], rtol=0, atol=ROWS_TOL[dtype] * float(whole.abs().max()))
    np.testing.assert_allclose(part.double().numpy(), reference[:, rows.numpy()], rtol=0,
                               atol=DENSE_TOL[dtype] * largest)


@pytest.mark.parametrize("strategy", ["segment_means", "kmeans", "norm"])
def test_group_mean_landmarks_rows_sum_to_one(strategy):
    # Docs' Nyström page: group-mean landmarks are not tokens, so interpolation does not apply, but the rows still sum
    # to one (with norm's and kmeans' log-weights in A and F).
    rng = np.random.default_rng(7)
    Q, K = rng.standard_normal((2, 2, 60, 8)), rng.standard_normal((2, 2, 60, 8))
    ones = np.ones((2, 2, 60, 1))
    out, info = nystrom.approximate(Q, K, ones, strategy=strategy, num_landmarks=12, solver=PInv(rtol=1e-13),
                                    return_info=True)
    lm = info.landmarks
    cond = landmark_kernel_condition(lm.queries, lm.keys, 8**-0.5, lm.log_weights)
    # As in test_weighted_rows_still_sum_to_one: float64 rounding of the solve times cond(A), 50 cond eps.
    np.testing.assert_allclose(out, ones, rtol=0, atol=50 * cond * np.finfo(np.float64).eps)


@pytest.mark.parametrize("iters", [2, 6])
def test_a_regularising_solver_keeps_the_properties_up_to_its_residual(iters):
    # Docs' Nyström page: with Z only approximately A^{-1}, F rows being convex weights, the row sums F Z 1 are off
    # from 1 by at most max |Z 1 - 1|, and a landmark row, A_i Z (B V), from B_i V by at most
    # ||(A Z - I)_i||_1 max |B V|. Both bounds are reached up to rounding; the errors are far above it here.
    from nystrom.linalg.attention import landmark_kernel

    rng = np.random.default_rng(8)
    Q, K, V = (rng.standard_normal((40, 8)) for _ in range(3))
    landmarks = FPS()(Q, K, 10)
    solver = nystrom.NewtonSchulz(iters=iters)
    A = landmark_kernel(np, landmarks.queries, landmarks.keys, 8**-0.5)
    Z = solver.solve(A).inverse
    ones = np.ones((40, 1))
    sums, _ = nystrom_attention(Q, K, ones, landmarks, solver)
    off = np.max(np.abs(Z @ np.ones(10) - 1))
    # The slack 1e-9 (relative) and 1e-12 (absolute) is for float64 rounding, ~1e-15 here; measured at most 0.61 and
    # 0.30 of the bounds, and errors of 0.36 and 0.11 at least, far above the 1e-6 floors.
    assert np.max(np.abs(sums - 1)) <= off * (1 + 1e-9) and off > 1e-6
    out, _ = nystrom_attention(Q, K, V, landmarks, solver)
    S = landmarks.indices
    BV = scipy.special.softmax(8**-0.5 * landmarks.queries @ K.T, axis=-1) @ V
    bound = np.sum(np.abs(A @ Z - np.eye(10)), axis=1)[:, None] * np.max(np.abs(BV))
    exact = reference(Q, K, V, 8**-0.5)
    assert np.all(np.abs(out[S] - exact[S]) <= bound * (1 + 1e-9) + 1e-12)
    assert np.max(np.abs(out[S] - exact[S])) > 1e-6


def test_padded_rows_of_huge_values_raise_no_numpy_warning():
    # Padding may hold anything finite; exact_attention was quiet on it, nystrom_attention warned of an overflow in
    # its float32 matmul (the test suite makes RuntimeWarnings errors; a review). The real rows are unaffected.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 10, 4)).astype(np.float32) for _ in range(3))
    mask = np.broadcast_to(np.arange(10) < 7, (2, 10))
    landmarks = nystrom.Landmarks(Q[:, :3], K[:, :3])
    clean = nystrom_attention(Q, K, V, landmarks, attn_mask=mask)[0]
    Q[0, -3:] = 3e38
    out = nystrom_attention(Q, K, V, landmarks, attn_mask=mask)[0]
    np.testing.assert_array_equal(out[:, :7], clean[:, :7])


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_exact_attention_takes_logits_up_to_the_dtypes_largest(library):
    # A review: float32 logits of up to 3.2e38 fit, but the unscaled product q.k, sqrt(d) = 2 times larger, overflowed
    # first and exact attention, the library's reference, was NaN where SDPA was finite. The scale goes on the
    # queries first, as SDPA's does.
    rng = np.random.default_rng(21)
    Q, K, V = (rng.standard_normal((1, 12, 4)) for _ in range(3))
    Q, K, V = (Q * 1e19).astype(np.float32), (K * 1e19).astype(np.float32), V.astype(np.float32)
    assert np.abs(Q[0].astype(np.float64) @ K[0].T.astype(np.float64)).max() > np.finfo(np.float32).max
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (Q, K, V))).numpy()
    args = (Q, K, V) if library == "numpy" else tuple(torch.from_numpy(x) for x in (Q, K, V))
    out = np.asarray(nystrom.exact_attention(*args))
    # float32 logits of 1e38 round to 2e31: the softmax of such logits is one-hot or a tie broken alike in both.
    np.testing.assert_allclose(out, sdpa, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 10])
def test_query_chunks_cut_a_mask_with_a_row_per_query_and_pass_a_key_mask_whole(rows):
    # Chunks of 3 of 10 queries, the last one short: each chunk gets its own rows of a per-query mask, and the one
    # row of a key mask.
    from functools import partial

    from nystrom.linalg.attention import in_query_chunks, softmax_attention

    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 7, 4)), rng.standard_normal((2, 7, 3))
    mask = rng.random((2, rows, 7)) < 0.7
    mask[..., 0] = True
    attend = partial(softmax_attention, np, scale=0.5)
    whole = attend(Q, K, V, mask)
    want = scipy.special.softmax(np.where(mask, 0.5 * Q @ np.swapaxes(K, -1, -2), -np.inf), axis=-1) @ V
    np.testing.assert_allclose(whole, want, rtol=RTOL64)
    # The chunks' products round otherwise than the whole one's (another BLAS blocking): RTOL64, not bit for bit.
    np.testing.assert_allclose(in_query_chunks(attend, 3)(Q, K, V, mask), whole, rtol=RTOL64)
