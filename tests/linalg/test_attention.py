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
from nystrom import PInv, Uniform, exact_attention
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
    np.testing.assert_allclose(out, np.tile([1.0, 0.0, 0.0], (1, 3, 1)), atol=1e-12)


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    out_t = exact_attention(*(torch.from_numpy(x) for x in (Q, K, V)))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), exact_attention(Q, K, V), rtol=RTOL64)


EXACT_INV = PInv(rtol=1e-13)


def low_rank_plus_noise(seed, n=128, d=16, rank=4, noise=0.1, strength=1.5):
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, rank))
    Q = strength * U @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))
    K = strength * U @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))
    return Q, K, rng.standard_normal((n, d))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), data=st.data())
def test_interpolation_at_landmark_rows(seed, n, data):
    # Row i in S of F equals row i of A, so F_i A^{-1} = e_i^T: landmark rows are exact.
    m = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    Q, K, V = rng.standard_normal((n, 6)), rng.standard_normal((n, 6)), rng.standard_normal((n, 3))
    lm = Uniform()(Q, K, m, seed=seed)
    out, res = nystrom_attention(Q, K, V, lm, EXACT_INV)
    A = res.inverse
    # The identity needs an exact inverse; skip the rare draws where A is numerically singular.
    if np.linalg.cond(np.linalg.pinv(A)) > 1e8:
        return
    exact = nystrom.exact_attention(Q, K, V)
    np.testing.assert_allclose(out[lm.indices], exact[lm.indices], rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 20))
def test_implied_attention_rows_sum_to_one(seed, m):
    # A 1 = 1  =>  A^{-1} 1 = 1  =>  F A^{-1} B 1 = F 1 = 1: with V = ones the output is ones.
    rng = np.random.default_rng(seed)
    Q, K = rng.standard_normal((30, 5)), rng.standard_normal((30, 5))
    out, info = nystrom.approximate(Q, K, np.ones((30, 2)), strategy="fps", num_landmarks=m,
                                    solver=nystrom.NewtonSchulz(tol=1e-13, max_iters=200), return_info=True)
    # The identity needs the inverse itself: skip the draws where A is so ill-conditioned that Newton-Schulz
    # has not reached its tolerance in 200 steps (seed 838, m = 13: residual 7e-12, rows off by 5e-7).
    assume(float(np.max(info.residual)) <= 1e-13)
    np.testing.assert_allclose(out, 1.0, atol=1e-8)


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
    # (docs' Nyström page). float64 with an exact inverse: 1e-9 covers cond(A) * eps for these small kernels.
    Q, K, V, k, c, q_landmarks = repeated_keys(seed, m, cross=cross)
    exact = exact_attention(Q, K, V)
    weighted = nystrom.Landmarks(q_landmarks, k, log_weights=np.log(c.astype(np.float64)))
    out, _ = nystrom_attention(Q, K, V, weighted, PInv(rtol=1e-13))
    np.testing.assert_allclose(out, exact, rtol=1e-9, atol=1e-9)
    out_t, _ = nystrom.torch.fna_attention(*(torch.from_numpy(x) for x in (Q, K, V)), nystrom.Landmarks(
        torch.from_numpy(q_landmarks), torch.from_numpy(k), log_weights=torch.from_numpy(np.log(c.astype(float)))),
        PInv(rtol=1e-13))
    np.testing.assert_allclose(out_t.numpy(), exact, rtol=1e-9, atol=1e-9)


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
    assert min(errors) > 1e-3, min(errors)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12))
def test_weighted_rows_still_sum_to_one(seed, m):
    # A stays row-stochastic with the log c bias, so A^+ 1 = 1 and F A^+ B 1 = 1 (docs: row sums).
    rng = np.random.default_rng(seed)
    Q, K = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    landmarks = nystrom.Landmarks(Q[:m], K[:m], log_weights=np.log(rng.integers(1, 9, size=m).astype(float)))
    ones = np.ones((40, 1))
    out, _ = nystrom_attention(Q, K, ones, landmarks, PInv(rtol=1e-13))
    np.testing.assert_allclose(out, ones, rtol=1e-8)


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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 10), dtype=st.sampled_from(["float64", "float32", "float16"]),
       weighted=st.booleans())
def test_the_output_at_some_rows_is_those_rows_of_the_whole_output(seed, m, dtype, weighted):
    # approximate(tol=...) evaluates F v' only at its sampled rows until it has chosen m: the factors v' do not
    # depend on the queries, and each output row depends on its own query only. float16 takes the rescaled path.
    from nystrom.linalg.attention import nystrom_factors, nystrom_output, nystrom_product
    from nystrom.linalg.solvers import NewtonSchulz
    from nystrom.torch.attention import sdpa_attend

    rng = np.random.default_rng(seed)
    Q, K, V = (torch.from_numpy(rng.standard_normal((2, 30, 8))).to(getattr(torch, dtype)) for _ in range(3))
    log_c = torch.from_numpy(np.log(rng.integers(1, 9, size=(2, m)).astype(float))) if weighted else None
    landmarks = nystrom.Landmarks(Q[:, :m], K[:, :m], log_weights=log_c)
    xp = array_api_compat.array_namespace(Q)
    attend = lambda q, k, v, mask: sdpa_attend(q, k, v, mask, scale=0.35)  # noqa: E731
    whole, _ = nystrom_product(xp, Q, K, V, landmarks, NewtonSchulz(), scale=0.35, attend=attend)
    rows = torch.from_numpy(rng.choice(30, size=7, replace=False))
    factors = nystrom_factors(xp, K, V, landmarks, NewtonSchulz(), scale=0.35, attend=attend)
    # Only the order of the sums in the fused kernel's blocks of query rows differs: a few ulps of the output's scale.
    ulps = {"float64": 1e-13, "float32": 1e-5, "float16": 4e-3}[dtype] * float(whole.abs().max())
    torch.testing.assert_close(nystrom_output(xp, Q[:, rows], factors, attend), whole[:, rows], rtol=0, atol=ulps)
