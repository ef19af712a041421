"""Error certificates, estimates and a-priori bounds hold on random inputs."""

import math
import warnings

import array_api_compat
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nystrom
from nystrom import best_rank_trace_floor, estimate_relative_error, nystrom_trace_error, rpcholesky_trace_bound
from nystrom.linalg.bounds import census_and_strata, high_norm_queries, ratio_interval, sample_rows, stratified_rows
from nystrom.linalg.landmarks import rpcholesky_pivots
from nystrom.linalg.landmarks.base import uniform_draws
from nystrom.linalg.validation import check_finite


def clustered_points(seed, n=60, D=4, clusters=5, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D)) * 1.5
    return centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, D))


def dense_kernel(X, scale):
    return np.exp(scale * X @ X.T)


def dense_trace_error(X, idx, scale):
    # The pseudo-inverse's cut-off is the certificate's documented m eps: W spans up to 1e17 in cond here (the
    # exp(tau |x|^2) scale of its diagonal, which costs no accuracy), and a fixed 1e-13 dropped real directions where
    # cond(W) > 1e13 (seed 5097, m = 26: 2.8e-7 off, 4 of 6,000 random draws past 1e-9).
    Kx = dense_kernel(X, scale)
    C = Kx[:, idx]
    return np.trace(Kx - C @ np.linalg.pinv(Kx[np.ix_(idx, idx)], rcond=len(idx) * np.finfo(float).eps) @ C.T), Kx


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 30))
def test_trace_certificate_equals_dense_trace(seed, m):
    X = clustered_points(seed)
    idx = np.random.default_rng(seed).choice(60, m, replace=False)
    cert = nystrom_trace_error(X, idx, scale=0.5)
    dense, Kx = dense_trace_error(X, idx, 0.5)
    # The certificate works in units of exp(-c); relative errors are comparable directly.
    # float64, relative to tr K: measured at most 3.6e-12 over 6,000 random draws (6.1e-12 over 3,000 more against the
    # old cut-off where it dropped nothing), cond(W) from 1 past 1e17 (the error does not grow with it: the diagonal's
    # scale); 1e-10 is 16x the worst. rtol=0: numpy's hidden rtol=1e-7 added up to 3e-8 here.
    np.testing.assert_allclose(float(cert.relative), dense / np.trace(Kx), rtol=0, atol=1e-10)
    # A sum of 60 float64 exponentials, rescaled by exp(c): measured at most 6.4e-15 (29 eps); 1e-13 is 15x.
    np.testing.assert_allclose(float(cert.trace) * np.exp(float(cert.log_scale)), np.trace(Kx), rtol=1e-13)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 20))
def test_residual_is_psd_and_above_the_spectral_floor(seed, m):
    X = clustered_points(seed, n=40)
    idx = np.random.default_rng(seed + 1).choice(40, m, replace=False)
    Kx = dense_kernel(X, 0.5)
    C = Kx[:, idx]
    residual = Kx - C @ np.linalg.pinv(Kx[np.ix_(idx, idx)], rcond=1e-13) @ C.T
    lam_max = np.linalg.eigvalsh(Kx).max()
    # Schur complement >= 0, up to the float64 rounding of C W^+ C^T (entries up to lam_max): its smallest eigenvalue
    # measured -2.4e-13 lam_max (1,100 eps) at worst over 1,500 random draws; -1e-11 lam_max is 41x.
    assert np.linalg.eigvalsh((residual + residual.T) / 2).min() > -1e-11 * lam_max
    cert = nystrom_trace_error(X, idx, scale=0.5)
    floor = best_rank_trace_floor(np.linalg.eigvalsh(Kx), m)
    trace_error = float(cert.trace_error) * np.exp(float(cert.log_scale))
    # Eckart-Young, a theorem: the allowance is the certificate's rounding, <= 6.1e-12 tr K (above) <= 2.4e-10 lam_max
    # (tr K <= 40 lam_max); 1e-9 lam_max is 4x. Measured: the error sits >= 8.2e-4 lam_max above the floor (1,500
    # draws).
    assert trace_error >= floor * (1 - 1e-9) - 1e-9 * lam_max


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_trace_error_is_monotone_in_nested_landmark_sets(seed):
    X = clustered_points(seed)
    order = np.random.default_rng(seed).permutation(60)
    errs = [float(nystrom_trace_error(X, order[:m], scale=0.5).relative) for m in (2, 5, 10, 20, 40)]
    # Two certificates, each within 6.1e-12 of the truth (above): 1e-10 is 8x their sum. Measured: every nested step
    # lowered the error by >= 1.5e-8 over 1,000 random draws.
    assert all(b <= a + 1e-10 for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 8, 16])
def test_rpcholesky_expected_trace_error_within_bound(seed, k):
    # Monte-Carlo mean over 200 runs versus Chen et al.'s bound on the expectation. Measured on these 9 cases: the mean
    # is 0.0003-0.38 of the bound (0.38 at seed 1, k = 3), its standard error <= 4.3 % of it, so the bound itself, no
    # allowance (1.2x before), sits > 30 standard errors above the worst mean. Uniform landmarks instead of RPCholesky's
    # (a wrong sampler) give 0.5-6.4x the bound and fail 7 of the 9 cases.
    X = clustered_points(seed, n=50, D=3)
    scale = 0.7
    eig = np.linalg.eigvalsh(dense_kernel(X, scale))
    errs = []
    for draw in range(200):
        u = uniform_draws(np, (k,), seed * 1000 + draw, X)
        idx = rpcholesky_pivots(X, k, scale=scale, u=u)
        cert = nystrom_trace_error(X, idx, scale=scale)
        errs.append(float(cert.trace_error) * np.exp(float(cert.log_scale)))
    bound = rpcholesky_trace_bound(eig, k)
    assert np.mean(errs) <= bound
    # Each error is >= the floor (a theorem); 1e-9 is rounding only. Measured mean >= 1.7x the floor.
    assert np.mean(errs) >= best_rank_trace_floor(eig, k) * (1 - 1e-9)


def test_rpcholesky_draws_each_pivot_from_the_residual_diagonal():
    # The sampler itself, draw by draw: pivot t is the inverse CDF at u_t of the diagonal of the dense residual
    # R_{t-1} = K - K[:, S] K[S, S]^+ K[S, :] (RPCholesky's law, p_i = R_ii / tr R), on the exact kernel. The
    # Monte-Carlo test above checks only that the mean stays under Chen et al.'s bound, which also a sampler drawing
    # from the wrong law would meet.
    for seed in range(5):
        X = clustered_points(seed, n=40, D=3)
        scale = 0.7
        u = np.random.default_rng(seed).random(12)
        pivots = np.asarray(rpcholesky_pivots(X, 12, scale=scale, u=u))
        residual = dense_kernel(X, scale)
        for t, s in enumerate(pivots):
            diagonal = np.clip(np.diag(residual), 0, None)
            diagonal[pivots[:t]] = 0
            cdf = np.cumsum(diagonal) / diagonal.sum()
            # Round-off between the library's low-rank residual and this dense one may move a draw that falls within
            # 1e-9 of a boundary of the CDF (1e4 x the float64 rounding of a CDF of 40 terms); none of these does: the
            # nearest is 6.8e-5 away.
            assert np.min(np.abs(cdf - u[t])) > 1e-9
            assert s == np.searchsorted(cdf, u[t], side="right"), (seed, t)
            residual = residual - np.outer(residual[:, s], residual[s]) / residual[s, s]


def test_rpcholesky_bound_matches_a_grid_search_of_its_definition():
    # min over r of (1 + eps_r) tr(K - [K]_r), eps_r the smallest eps with k >= r/eps + r log(1/(eps eta_r)),
    # capped at tr K: here by a dense grid of eps (relative step 6.9e-6) instead of the function's bisection. The grid's
    # first admissible eps is at most one step above the smallest, so (1 + eps) tail is off by < 6.9e-6 relative;
    # measured 0, 6.3e-7, 4.3e-6. 1e-5 is the step with a 1.45x margin (1e-4 before).
    eps = np.geomspace(1e-6, 1e6, 4_000_001)
    for seed, k in [(0, 3), (1, 8), (2, 16)]:
        eig = np.sort(np.random.default_rng(seed).gamma(0.5, size=40))[::-1]
        total, best = eig.sum(), eig.sum()
        for r in range(1, k + 1):
            tail = eig[r:].sum()
            admissible = eps[k >= r / eps + r * np.log(1 / (eps * tail / total))]
            if admissible.size:
                best = min(best, (1 + admissible[0]) * tail)
        assert rpcholesky_trace_bound(eig, k) == pytest.approx(best, rel=1e-5)


def test_rpcholesky_bound_is_zero_for_low_rank_and_at_most_the_trace():
    eig = np.array([5.0, 2.0, 1.0, 0.0, 0.0])
    assert rpcholesky_trace_bound(eig, 3) == 0.0
    eig = np.linspace(1, 0.5, 40)
    assert rpcholesky_trace_bound(eig, 2) <= eig.sum()


def coverage(Q, K, V, approx, num_samples, draws=200):
    exact = nystrom.exact_attention(Q, K, V)
    truth = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    hits = [(e.low <= truth <= e.high) for e in
            (estimate_relative_error(Q, K, V, approx, num_samples=num_samples, seed=s) for s in range(draws))]
    return np.mean(hits)


def test_error_estimate_covers_at_its_rate_on_gaussian_tokens():
    # Measured over these 200 seeded draws (deterministic): 93.5 % for the nominal 95 % at s = 64, 94.5 % at s = 128
    # (the docs' error-bounds page measures other families). The floors sit 1.5 points
    # under, three draws, so that a BLAS rounding the products otherwise cannot flip the test, while an interval a
    # tenth narrower (measured 91 % and 92 %: interval's log-width scaled by 0.9) fails it, half as wide (66 %, 71.5 %)
    # by far. Binomial spread of 200 draws at the nominal 95 %: 1.5 points; the floors are 2 and 1.3 std under it.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 400, 16)) for _ in range(3))
    approx = nystrom.approximate(Q, K, V, strategy="uniform", num_landmarks=32, seed=0)
    assert coverage(Q, K, V, approx, 64) >= 0.92
    assert coverage(Q, K, V, approx, 128) >= 0.93


@pytest.mark.parametrize("layout", ["block", "scattered"])
def test_high_norm_queries_holding_most_of_the_error_are_computed_with_certainty(layout):
    # 10 of 512 queries scaled by 4 (artifact-like) hold 83 % of the squared error. Drawn at random, the 95 % interval
    # covered the truth in 70 % of draws at 64 rows and 91 % at 128 (review); computed with certainty, in 98-99 % of
    # 200 draws. Pinned at 0.93 (the floor) over these 60 deterministic draws: measured 95 / 98.3 % (block,
    # 64 / 128 rows) and 100 / 98.3 % (scattered); over 400 draws 96.5 / 98.8 and 97 / 99.5 %. Binomial std of 60 draws
    # at 96.5 %: 2.4 points, the floor 1.5 std under it (56 of 60: one miss more than the worst measured). An interval
    # half as wide fails every case (72 / 88 / 80 / 90 % of these 60).
    rng = np.random.default_rng(123)
    n, d = 512, 16
    t = np.linspace(0, 6, n)[:, None]
    Q = np.sin(t * rng.standard_normal((1, d)) + rng.standard_normal((1, d))) * 2 + 0.2 * rng.standard_normal((n, d))
    K = np.sin(t * rng.standard_normal((1, d)) + rng.standard_normal((1, d))) * 2 + 0.2 * rng.standard_normal((n, d))
    V = rng.standard_normal((1, n, 8))
    outliers = np.arange(100, 110) if layout == "block" else np.sort(rng.choice(n, 10, replace=False))
    Q[outliers] *= 4
    approx = nystrom.approximate(Q[None], K[None], V, strategy="uniform", num_landmarks=24, seed=1)
    for rows in (64, 128):
        assert coverage(Q[None], K[None], V, approx, rows, draws=60) >= 0.93
    sample = sample_rows(np, Q[None], K[None], V, num_samples=64, seed=0, scale=0.25)
    assert set(outliers) <= set(sample.rows[sample.certain].tolist()) and sample.certain.sum() == 10


def test_padded_query_rows_never_make_a_position_outlying():
    # The norms of padded rows (which may hold anything) made their positions certain and moved the estimate (review).
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 512, 8)) for _ in range(3))
    keys = np.ones((2, 512), dtype=bool)
    keys[1, 500:] = False
    approx = nystrom.approximate(Q, K, V, num_landmarks=16, strategy="uniform", seed=0, attn_mask=keys[:, None, :])
    garbage = Q.copy()
    garbage[1, 500:] *= 1e3
    estimates = [estimate_relative_error(q, K, V, approx, attn_mask=keys[:, None, :], seed=0) for q in (Q, garbage)]
    # Equal to rounding (the padded rows' exact outputs still set the unit of the squares).
    for field in ("estimate", "low", "high"):
        assert getattr(estimates[0], field) == pytest.approx(getattr(estimates[1], field), rel=1e-12)
    assert sample_rows(np, garbage, K, V, num_samples=64, seed=0, scale=0.35, keys=keys).certain is None


def test_a_census_of_some_outliers_only_is_never_drawn():
    # Never some high-norm queries with certainty and the others drawn among the rest (which left them rarer still, and
    # the interval worse than none: 21 % coverage in a review's case): up to half the sample all of them are taken,
    # past it they are strata of their own, with half the sample.
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((1, 300, 8))
    Q[0, :24] *= 8
    norms = np.linalg.norm(Q[0], axis=-1)
    outlying = np.flatnonzero(norms >= 3 * np.median(norms))  # the scaled rows, no other
    assert 20 <= outlying.size <= 24 and outlying.max() < 24
    np.testing.assert_array_equal(high_norm_queries(np, Q, np.arange(300), 64), outlying)
    assert high_norm_queries(np, Q, np.arange(300), 300).size == 0  # every row computed anyway
    for num_samples in (64, 128):
        rows, sizes, certain, _ = census_and_strata(np.arange(300), outlying, num_samples, np.random.default_rng(0))
        assert certain.sum() == outlying.size and set(rows[certain]) == set(outlying)
        assert not set(rows[~certain]) & set(outlying)
    rows, sizes, certain, _ = census_and_strata(np.arange(300), outlying, 32, np.random.default_rng(0))
    assert certain is None and rows.size == 32
    # 16 strata of the outlying queries (which they fill, sizes summing to their count), 16 of the others.
    assert set(rows[:16]) <= set(outlying) and sizes[:16].sum() == outlying.size
    assert not set(rows[16:]) & set(outlying) and sizes[16:].sum() == 300 - outlying.size
    # 2 or 3 rows leave them no half: they had no stratum at all (sizes summing to 300 - 24: their error left out of
    # the estimate, 0 with width 0 where they held all of it; a review). Now strata of every position.
    for num_samples in (2, 3):
        rows, sizes, certain, _ = census_and_strata(np.arange(300), outlying, num_samples, np.random.default_rng(0))
        assert certain is None and rows.size == num_samples and sizes.sum() == 300



def test_zero_queries_are_no_outliers():
    # A median query norm of 0 made every query "high-norm" (0 >= 3 * 0), and the empty rest of the sample divided
    # 0 by 0 (a RuntimeWarning, an error under -W error; a review). Only positive norms stand out; all-zero queries
    # (uniform attention, which the estimate then computes exactly) raise nothing.
    rng = np.random.default_rng(0)
    Q, K = np.zeros((1, 300, 4)), rng.standard_normal((1, 300, 4))
    V = K[..., :2].copy()
    assert high_norm_queries(np, Q, np.arange(300), 64).size == 0
    assert nystrom.estimate_relative_error(Q, K, V, nystrom.exact_attention(Q, K, V), num_samples=64).high == 0
    Q[0, 200:] = rng.standard_normal((100, 4))
    np.testing.assert_array_equal(high_norm_queries(np, Q, np.arange(300), 64), np.arange(200, 300))

def test_many_outlying_queries_are_sampled_apart_and_covered():
    # 60 or 100 of 600 smooth queries scaled by 4 (a review's family), more than a quarter of the 128 rows: drawn
    # among the others, the true error was above the interval in 123 of these 1,200 draws (10 %); with half the
    # sample (or all of them) apart, 78 (one instance worse, 61 against 39 of 400; two better, 9 and 8 against 32 and
    # 52). Pinned at 95: measured 78 (61 + 9 + 8) of 1,200, binomial std 8.5 at 6.5 %, so 95 is 2 std above. An
    # interval half as wide misses 229 (107 + 70 + 52) and fails it, as does the old sampling (123).
    above = 0
    for count, seed in ((60, 0), (60, 1), (100, 0)):
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(np.linspace(0, 1, 25), np.linspace(0, 1, 25)), -1).reshape(-1, 2)[:600]
        X = np.cos(grid @ (3 * rng.standard_normal((2, 64))) + rng.uniform(0, 6.3, 64))
        Q, K, V = (X @ rng.standard_normal((64, 16)) / 2 for _ in range(3))
        Q[rng.choice(600, count, replace=False)] *= 4
        out = nystrom.approximate(Q, K, V, num_landmarks=32)
        exact = nystrom.exact_attention(Q, K, V)
        true = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        above += sum(true > estimate_relative_error(Q, K, V, out, seed=s).high for s in range(400))
    assert above <= 95


def test_error_estimate_covers_heavy_tailed_errors_with_enough_rows():
    # Clustered low-rank tokens with FPS landmarks: the largest squared row error is 26x the mean and small
    # samples under-cover (documented: 80/84/92% at s = 32/64/128 over 400 draws; 90.5% over these 200).
    # Pinned 1.5 points (three draws) under the measurement; deterministic seeds. Over 1,000 draws 94 %: binomial std of
    # 200 draws there 1.7 points, the floor 3 std under it. An interval a tenth narrower fails it (88 %), half as wide
    # by far (71.5 %).
    rng = np.random.default_rng(0)
    n = 400
    U = rng.standard_normal((n, 3))
    Q = 1.5 * U @ rng.standard_normal((3, 16)) + 0.2 * rng.standard_normal((n, 16))
    K = 1.5 * U @ rng.standard_normal((3, 16)) + 0.2 * rng.standard_normal((n, 16))
    V = rng.standard_normal((n, 8))
    approx = nystrom.approximate(Q, K, V, strategy="fps", num_landmarks=16)
    assert coverage(Q, K, V, approx, 128) >= 0.89


def test_error_estimate_is_exact_with_all_rows():
    rng = np.random.default_rng(1)
    Q, K, V = (rng.standard_normal((2, 30, 4)) for _ in range(3))
    approx = nystrom.approximate(Q, K, V, num_landmarks=5)
    exact = nystrom.exact_attention(Q, K, V)
    e = estimate_relative_error(Q, K, V, approx, num_samples=30)
    truth = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    # float64, the same sums of squares in another order: measured 2.2e-16 (1 eps) off; 1e-13 is 450x (1e-6 before).
    assert e.low == pytest.approx(truth, rel=1e-13) and e.high == pytest.approx(truth, rel=1e-13)
    assert e.estimate == pytest.approx(truth, rel=1e-13)


def test_info_estimate_and_torch_inputs():
    rng = np.random.default_rng(2)
    Q, K, V = (torch.from_numpy(rng.standard_normal((1, 2, 50, 8))) for _ in range(3))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, return_info=True)
    e = info.estimate_error(num_samples=50)
    truth = float(torch.linalg.norm(out - nystrom.exact_attention(Q, K, V)) / torch.linalg.norm(
        nystrom.exact_attention(Q, K, V)))
    # float64 (every row sampled), as above: measured 4.4e-16 (2 eps); 1e-13 is 225x (1e-9 before).
    assert e.estimate == pytest.approx(truth, rel=1e-13)
    assert info.flops["total"] < info.exact_flops
    assert info.residual.shape == (1, 2)  # one landmark kernel per (batch, head)


def test_every_row_sampled_is_the_truth_for_masked_cross_attention():
    # Cross-attention (12 queries over 20 keys) with a key mask: every row sampled gives the true error and an interval
    # of width 0, over every row (Info, as approximate computed them) and over the real rows of a query mask.
    rng = np.random.default_rng(3)
    Q, K, V = rng.standard_normal((2, 12, 8)), rng.standard_normal((2, 20, 8)), rng.standard_normal((2, 20, 3))
    keys = np.ones((2, 20), bool)
    keys[1, 15:] = False
    queries = np.ones((2, 12), bool)
    queries[0, 9:] = False
    out, info = nystrom.approximate(Q, K, V, num_landmarks=6, attn_mask=keys, return_info=True)
    exact = nystrom.exact_attention(Q, K, V, attn_mask=keys)
    for e, real in ((info.estimate_error(num_samples=12), 1.0),
                    (nystrom.estimate_relative_error(Q, K, V, out, num_samples=12, attn_mask=keys, query_mask=queries),
                     queries[..., None])):
        truth = np.linalg.norm((out - exact) * real) / np.linalg.norm(exact * real)
        # float64, the same sums in another order, as above.
        assert e.low == e.high == pytest.approx(truth, rel=1e-13)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(0, 10**6), st.data())
def test_stratified_rows_draw_one_position_per_stratum(population, seed, data):
    s = data.draw(st.integers(2, population))
    positions = np.sort(np.random.default_rng(seed).choice(10 * population, population, replace=False))
    rows, sizes = stratified_rows(positions, s, np.random.default_rng(seed))
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    assert rows.size == s and edges[-1] == population and sizes.min() >= population // s
    assert sizes.max() - sizes.min() <= 1
    for h in range(s):
        assert rows[h] in positions[edges[h]:edges[h + 1]]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(0, 10**6), st.floats(0.5, 0.99))
def test_ratio_interval_brackets_its_estimate_and_widens_with_confidence(s, seed, confidence):
    rng = np.random.default_rng(seed)
    e, o, sizes = rng.random(s) ** 3, 0.5 + rng.random(s), rng.integers(1, 5, s).astype(float)
    sizes[0] = 2.0  # at least one stratum of several positions: a sample, not a census
    ratio, low, high = ratio_interval(e, o, sizes, confidence)
    # The same float64 expression: equal over 20,000 random draws; 1e-15 (4.5 eps) in place of approx's 1e-6.
    assert ratio == pytest.approx((sizes @ e) / (sizes @ o), rel=1e-15)
    assert 0 < low <= ratio <= high
    _, low_99, high_99 = ratio_interval(e, o, sizes, 0.995)
    assert low_99 <= low and high <= high_99
    # A census (one position per stratum) is exact. Sums of <= 40 terms in [0, 2] in another order: at most 40 eps
    # = 8.9e-15 relative, measured 8.9e-16 over 20,000 draws; 1e-14 (approx's 1e-6 before).
    assert ratio_interval(e, o, np.ones(s), confidence)[1:] == (pytest.approx((e.sum()) / o.sum(), rel=1e-14),) * 2


def test_ratio_interval_collapses_an_odd_last_stratum_into_a_triple():
    # s = 3: one group of three, |G| / (|G| - 1) = 3/2, df = s - #G = 2; computed by hand.
    e, o, sizes = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0])
    ratio, low, high = ratio_interval(e, o, sizes, 0.95)
    z = 2 * (e - ratio * o)
    var = 1.5 * np.sum((z - z.mean()) ** 2) / 6.0**2
    spread = np.exp(scipy.stats.t.ppf(0.975, 2) * np.sqrt(var) / ratio)
    # The hand computation repeats the float64 arithmetic: measured equal; 1e-14 (45 eps) for an ordering of the sums
    # (approx's 1e-6 before).
    assert ratio == pytest.approx(7 / 3, rel=1e-14)
    assert (low, high) == (pytest.approx(ratio / spread, rel=1e-14), pytest.approx(ratio * spread, rel=1e-14))


def reference_ratio_interval(e, o, sizes, confidence, certain):
    # The docstring's formula, written out group by group: certain rows in both sums and nowhere else.
    total = sizes @ o
    ratio = (sizes @ e) / total
    z = (sizes * (e - ratio * o))[~certain]
    groups = [z[i:i + 2] for i in range(0, z.size - 3, 2)] if z.size % 2 else [z[i:i + 2] for i in range(0, z.size, 2)]
    if z.size % 2:
        groups.append(z[-3:])
    var = sum(g.size / (g.size - 1) * np.sum((g - g.mean()) ** 2) for g in groups) / total**2
    spread = np.exp(scipy.stats.t.ppf(0.5 + confidence / 2, z.size - len(groups)) * np.sqrt(var) / ratio)
    return ratio, ratio / spread, ratio * spread


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 14), st.integers(0, 6), st.integers(0, 10**6), st.floats(0.5, 0.99))
def test_ratio_interval_is_its_formula_with_certain_rows_out_of_the_variance(drawn, certain_rows, seed, confidence):
    # Every drawn count (pairs, a last triple for odd ones: degrees of freedom s - #G) and certain rows anywhere,
    # whose errors (here 100 times the others') must not widen the interval: they add no variance.
    rng = np.random.default_rng(seed)
    s = drawn + certain_rows
    certain = np.zeros(s, dtype=bool)
    certain[rng.choice(s, certain_rows, replace=False)] = True
    e, o = rng.random(s) ** 3, 0.5 + rng.random(s)
    e[certain] *= 100
    sizes = np.where(certain, 1.0, rng.integers(2, 9, s).astype(float))
    expected = reference_ratio_interval(e, o, sizes, confidence, certain)
    # Sums of <= 20 terms in another order: 1e-13 relative (measured equal to 4 eps).
    assert ratio_interval(e, o, sizes, confidence, certain if certain_rows else None) == pytest.approx(expected,
                                                                                                      rel=1e-13)


def test_queries_at_the_high_norm_ratio_are_taken_apart():
    # The ratio is 2: a query 2.5 times the median norm is taken with certainty (at 3 such queries, each aimed at one
    # key, were left to the draw and the interval covered 43-64 %), one at 1.9 times is not.
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((1, 300, 8))
    Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
    Q[0, [10, 200]] *= 2.5
    Q[0, 100] *= 1.9
    np.testing.assert_array_equal(high_norm_queries(np, Q, np.arange(300), 64), [10, 200])


def test_outlying_queries_past_an_even_half_of_the_sample_get_strata():
    # 6 rows: their half is 2 rows (even, so that ratio_interval's pairs stay within one group), so 3 outlying queries
    # get 2 strata of their own and the others 4, never a census of 3 and 3 strata (a triple mixing both groups).
    outlying = np.array([5, 50, 95])
    rows, sizes, certain, _ = census_and_strata(np.arange(300), outlying, 6, np.random.default_rng(0))
    assert certain is None and set(rows[:2]) <= set(outlying) and sizes[:2].sum() == 3
    assert not set(rows[2:]) & set(outlying) and sizes[2:].sum() == 297
    # 2 of them fit the half of 6 rows: a census.
    rows, sizes, certain, _ = census_and_strata(np.arange(300), outlying[:2], 6, np.random.default_rng(0))
    assert certain.sum() == 2 and set(rows[certain]) == {5, 50}


def test_ratio_interval_of_all_zero_exact_rows():
    # V = 0 on the sampled rows: the relative error is 0 where the approximation is 0 too, else unbounded; no
    # division by zero (it once returned inf with a NaN interval and RuntimeWarnings).
    sizes, zero = np.full(4, 3.0), np.zeros(4)
    with np.errstate(all="raise"):
        assert ratio_interval(zero, zero, sizes, 0.95) == (0.0, 0.0, 0.0)
        assert ratio_interval(np.array([0, 1.0, 0, 0]), zero, sizes, 0.95) == (math.inf,) * 3


def test_sampling_options_take_numpy_scalars_and_name_wrong_kinds():
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 60, 8)) for _ in range(3))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, return_info=True)
    # 16 drawn rows and the census of 16 // 8 rows of largest interpolation weights.
    assert info.estimate_error(num_samples=np.int64(16), confidence=np.float32(0.9)).num_samples == 16 + 2
    with pytest.raises(TypeError, match="num_samples must be an int"):
        info.estimate_error(num_samples=16.0)
    with pytest.raises(TypeError, match="confidence must be a real number"):
        info.estimate_error(confidence="0.9")


def test_trace_error_of_half_precision_points_is_computed_in_float32():
    # No SVD takes half precision (it raised NotImplementedError): the kernel is built from the points widened.
    X = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)).half()
    idx = torch.arange(0, 50, 5)
    for dtype in (torch.float16, torch.bfloat16):
        half = nystrom_trace_error(X.to(dtype), idx)
        # The same float32 computation on the same widened points: equal (measured; approx's 1e-6 before).
        assert float(half.relative) == float(nystrom_trace_error(X.to(dtype).float(), idx).relative)


def test_complex_eigenvalues_are_refused():
    # Bools and objects too: they ended in an AttributeError from array-api-compat's finfo.
    for eigenvalues in (np.array([1 + 1j, 2.0]), torch.tensor([1 + 1j, 2.0]), np.array([True, False]),
                        torch.tensor([True, False]), np.array(["a", "b"], dtype=object),
                        # numpy parses numeric strings and bytes: they were read as 3, 2, 1 (a review).
                        ["3", "2", "1"], np.array([b"3", b"2"]), [3, "2", 1.0], np.array([1.0, 2.0], dtype=object)):
        with pytest.raises(TypeError, match="real numbers"):
            best_rank_trace_floor(eigenvalues, 1)
        with pytest.raises(TypeError, match="real numbers"):
            rpcholesky_trace_bound(eigenvalues, 1)


def test_the_rpcholesky_bound_is_never_more_than_the_trace():
    # To the bit: scaled back from units of the largest eigenvalue, the bound of one pivot rounded 1-2 ulp past the
    # trace on 65 of these 200 spectra (a review).
    for seed in range(200):
        cubed = np.sort(np.abs(np.random.default_rng(seed).standard_normal(30)))[::-1] ** 3
        assert rpcholesky_trace_bound(cubed, 1) <= cubed.sum()


def test_the_rpcholesky_bound_scales_with_the_spectrum():
    # The bound is homogeneous of degree 1 in the eigenvalues; at 1e308 their sum overflowed and a ZeroDivisionError
    # came from log(1 / (eps eta)) with eta = 0.
    lam = np.array([3.0, 2.0, 1.0, 0.5, 0.1])
    base = rpcholesky_trace_bound(lam, 2)
    # float64: the scaled eigenvalues round at 1 ulp; measured 2.2e-16 off; 1e-13 is 450x (1e-12 before).
    for unit in (1e-300, 1e300):
        assert rpcholesky_trace_bound(lam * unit, 2) == pytest.approx(base * unit, rel=1e-13)
    assert rpcholesky_trace_bound([1e308, 1e308], 1) == np.inf  # the trace itself overflows
    # A tail below float64's range next to the largest eigenvalue: no eps meets the condition there, so the bound is
    # the trace (the rescaling first returned 0, as for an exact rank), and a subnormal tail is no ZeroDivisionError.
    assert rpcholesky_trace_bound([1e300, 1e-30], 1) == pytest.approx(1e300, rel=1e-14)  # measured equal (1e-12 before)
    assert 0 < rpcholesky_trace_bound([1.0, 1.0, 5e-324], 2) <= 2.0


def test_a_float32_spectrum_of_a_psd_kernel_is_accepted():
    # float32 eigvalsh rounds at about n eps of the largest eigenvalue: a fixed -1e-8 relative floor rejected real
    # PSD kernels at n = 1,000 (minimum -1.3e-7 of the largest; a review finding). The floor follows the dtype.
    X = np.random.default_rng(0).standard_normal((1000, 2))
    eigenvalues = torch.linalg.eigvalsh(torch.exp(torch.tensor(X @ X.T / 2**0.5, dtype=torch.float32)))
    assert eigenvalues.min() < 0  # round-off below zero, as measured
    assert best_rank_trace_floor(eigenvalues, 30) >= 0
    with pytest.raises(ValueError, match="PSD"):
        best_rank_trace_floor(np.array([1.0, 0.5, -1e-3]), 1)


def test_the_estimate_holds_at_the_ends_of_float64_and_at_any_confidence():
    # Squares of outputs near 1e-170 underflowed to a claimed exact 0, near 1e160 overflowed to NaN; two rows at a
    # confidence near 1 overflowed math.exp (review findings). The ratio does not depend on the outputs' scale.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((1, 64, 8)) for _ in range(3))
    out = nystrom.approximate(Q, K, V, num_landmarks=4)
    plain = estimate_relative_error(Q, K, V, out, num_samples=64, seed=0)
    # float64: V * factor rounds each entry at 1 ulp; measured 1.1e-16 off; 1e-14 is 90x (1e-12 before).
    for factor in (1e-170, 1e160):
        scaled = estimate_relative_error(Q, K, V * factor, out * factor, num_samples=64, seed=0)
        assert math.isclose(scaled.estimate, plain.estimate, rel_tol=1e-14)
        assert math.isclose(scaled.high, plain.high, rel_tol=1e-14)
    wide = estimate_relative_error(Q, K, V, out, num_samples=2, confidence=0.999999, seed=0)
    assert wide.low <= wide.estimate <= wide.high and math.isfinite(wide.estimate)


@pytest.mark.parametrize("big", [1e150, 1e170, 1e200])
def test_the_estimate_of_a_huge_error_is_finite_and_right(big):
    # An approximation of 1e170 against exact rows near 1: the squared differences overflowed, the estimate was inf
    # and its lower end NaN (review). Every row sampled: the estimate is the true error, to rounding.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((64, 8)) for _ in range(3))
    exact = nystrom.exact_attention(Q, K, V)
    approx = exact.copy()
    approx[5] = big
    truth = np.linalg.norm((approx - exact) / big) * big / np.linalg.norm(exact)
    every = estimate_relative_error(Q, K, V, approx, num_samples=64, seed=0)
    # float64, both in units of the large row: measured equal; 1e-13 (450 eps) for an ordering (1e-9 before).
    assert every.estimate == pytest.approx(truth, rel=1e-13)
    assert every.low == pytest.approx(truth, rel=1e-13) and every.high == pytest.approx(truth, rel=1e-13)
    some = estimate_relative_error(Q, K, V, approx, num_samples=16, seed=0)
    assert np.isfinite([some.low, some.estimate, some.high]).all() and some.low <= some.estimate <= some.high


def test_a_landmark_count_past_the_spectrum_is_named_as_such():
    # The message was approximate's ("at most the number of keys ... exact_attention costs no more").
    for bound in (best_rank_trace_floor, rpcholesky_trace_bound):
        with pytest.raises(ValueError, match=r"at most the number of eigenvalues \(2\), got 3"):
            bound(np.array([1.0, 1.0]), 3)
        with pytest.raises(ValueError, match="num_landmarks"):
            bound(np.array([1.0, 1.0]), 0)


def test_padded_rows_at_the_largest_float32_are_left_out_of_the_estimate():
    # Padding may hold up to float32's largest values: the padded query rows of approximate's output are then
    # non-finite, and estimate_relative_error refused that output ("approx contains NaN"), whose real rows are fine;
    # the finiteness check's overflowing sum warned (an error under -W error).
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 70, 8)).astype(np.float32) for _ in range(3))
    real = np.arange(70)[None, :] < np.array([[60], [52]])
    for X in (Q, K, V):
        X[~real] = 3e38
    out = nystrom.approximate(Q, K, V, num_landmarks=16, attn_mask=real)
    assert np.isfinite(out[real]).all() and not np.isfinite(out[~real]).all()
    clean = np.where(real[..., None], out, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_finite(np, K=K)
    for num_samples in (16, 60):
        estimate = estimate_relative_error(Q, K, V, out, attn_mask=real, num_samples=num_samples, seed=0)
        assert estimate == estimate_relative_error(Q, K, V, clean, attn_mask=real, num_samples=num_samples, seed=0)
        assert 0 < estimate.estimate < 1


def test_a_differentiable_spectrum_is_read_like_any_other():
    # The complex test converted through numpy first, which a tensor that requires grad refuses (a review:
    # RuntimeError). The same bounds as for its detached values.
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    lam = torch.linalg.eigvalsh(A @ A.T)
    assert best_rank_trace_floor(lam, 2) == best_rank_trace_floor(lam.detach().numpy(), 2)
    assert rpcholesky_trace_bound(lam, 3) == rpcholesky_trace_bound(lam.detach().numpy(), 3)


def test_a_spectrum_off_the_host_or_of_bools_is_read_by_its_own_library():
    # The dtype tests went through numpy (np.iscomplexobj converts the array, which array_api_strict refuses off its
    # host device: a RuntimeError) or a string ("array_api_strict.bool" passed as a spectrum of 0s and 1s; a review).
    xps = pytest.importorskip("array_api_strict")
    values = np.linspace(1, 0, 10)
    off_host = xps.asarray(values, device=xps.Device("device1"))
    assert best_rank_trace_floor(off_host, 3) == best_rank_trace_floor(values, 3)
    assert rpcholesky_trace_bound(off_host, 3) == rpcholesky_trace_bound(values, 3)
    for bools in (np.array([True, False]), xps.asarray(np.array([True, False]))):
        with pytest.raises(TypeError, match="got bools"):
            best_rank_trace_floor(bools, 1)


def test_query_mask_counts_every_real_query_of_cross_attention_of_equal_lengths():
    # Cross-attention whose query and key lengths are equal, with padded keys: by default the rows at padded keys
    # count as padded queries (self-attention's rule), and an error held by those rows was estimated as 0 with an
    # interval of width 0 (a review). query_mask says which query rows are real.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 16, 4)) for _ in range(3))
    keys = np.ones((2, 16), dtype=bool)
    keys[1, 6:] = False
    exact = nystrom.exact_attention(Q, K, V, attn_mask=keys)
    approx = exact.copy()
    approx[1, 10:] += 1.0
    truth = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    everything = estimate_relative_error(Q, K, V, approx, attn_mask=keys, num_samples=16, seed=0,
                                         query_mask=np.ones((2, 16), dtype=bool))
    assert everything.estimate == pytest.approx(truth, rel=1e-12) and everything.low == everything.high
    assert estimate_relative_error(Q, K, V, approx, attn_mask=keys, num_samples=16, seed=0).estimate == 0.0
    with pytest.raises(ValueError, match="query_mask must have shape"):
        estimate_relative_error(Q, K, V, approx, attn_mask=keys, query_mask=np.ones((2, 15), dtype=bool))
    # NaN at a real query row is refused once the mask says it is real.
    approx[1, 12] = np.nan
    with pytest.raises(ValueError, match="approx"):
        estimate_relative_error(Q, K, V, approx, attn_mask=keys, query_mask=np.ones((2, 16), dtype=bool))


def test_interpolation_weights_are_the_norms_of_f_times_the_inverse(monkeypatch):
    # ||F_i A^+||^2 summed over the batch, F_i = softmax(tau q_i k~^T + log c): the dense formula in float64, the
    # function in blocks of 7 queries (7 x 6 matrices x 5 landmarks of logits: blocks smaller than n_q, and one past its
    # end); padded rows count 0.
    import nystrom.linalg.bounds as bounds

    monkeypatch.setattr(bounds, "CENSUS_BLOCK", 7 * 6 * 5)
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((2, 3, 30, 8))
    keys, log_c = rng.standard_normal((2, 3, 5, 8)), rng.standard_normal((2, 3, 1, 5))
    inverse = rng.standard_normal((2, 3, 5, 5))
    logits = 0.3 * Q @ np.swapaxes(keys, -1, -2) + log_c
    F = np.exp(logits - logits.max(-1, keepdims=True))
    W = F / F.sum(-1, keepdims=True) @ inverse
    dense = (W**2).sum(-1).reshape(6, 30)
    real = rng.random((6, 30)) < 0.8
    # float64 throughout, the same products blocked: rounding only (measured 0 and 2e-16 relative).
    np.testing.assert_allclose(bounds.interpolation_weight_norms(np, Q, keys, log_c, inverse, 0.3),
                               dense.sum(0), rtol=1e-13)
    np.testing.assert_allclose(bounds.interpolation_weight_norms(np, Q, keys, log_c, inverse, 0.3, real),
                               np.where(real, dense, 0).sum(0), rtol=1e-13)


def replayed(positions, outlying, num_samples, seed):
    """A RowSample of census_and_strata's rows whose exact rows are the positions themselves (one column)."""
    from nystrom.linalg.bounds import RowSample

    rng = np.random.default_rng(seed)
    rows, sizes, certain, strata = census_and_strata(positions, outlying, num_samples, rng)
    return RowSample(rows, rows, sizes, 1.0, rows[:, None].astype(float), certain, strata, rng=rng,
                     exact_rows=lambda at: np.asarray(at)[:, None].astype(float))


@settings(max_examples=80, deadline=None)
@given(st.integers(4, 200), st.integers(2, 64), st.integers(0, 40), st.integers(0, 5), st.integers(0, 10**6),
       st.integers(0, 80), st.integers(1, 12))
def test_a_census_leaves_every_position_stood_for_once(population, num_samples, census_size, outliers, seed,
                                                        group_size, group_rows):
    # After the census every position is stood for exactly once in expectation: a certain row for itself (size 1),
    # every other by one drawn row of its stratum, which lies in it and outside the census; the exact rows follow
    # the positions (here each row's exact output is its position). A group (the queries the landmarks do not
    # represent) is taken with certainty where it fits its rows, else in strata of its own, each drawing within it.
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(1000, population, replace=False))
    num_samples = min(num_samples, population)
    outlying = np.sort(rng.choice(positions, min(outliers, population), replace=False))
    census = np.sort(rng.choice(positions, min(census_size, population), replace=False))
    group = np.sort(rng.choice(positions, min(group_size, population), replace=False))
    base = replayed(positions, outlying, num_samples, seed)
    sample = base.with_census(census, group, group_rows)
    certain = np.zeros(sample.rows.size, dtype=bool) if sample.certain is None else sample.certain
    assert set(census) <= set(sample.rows[certain]) and (sample.sizes[certain] == 1).all()
    fixed = np.concatenate([census, base.rows[base.certain] if base.certain is not None else census[:0]])
    left = np.setdiff1d(group, fixed)
    # Never more thinly than the strata it leaves: at least its share of them.
    base_order, base_edges = base.strata
    group_rows = max(group_rows, -(-left.size * (base_edges.size - 1) // max(base_order.size, 1)))
    if left.size <= group_rows:
        assert set(left) <= set(sample.rows[certain])
    else:
        # group_rows strata of the group, last, each drawing within it.
        drawn = sample.rows[~certain][-group_rows:]
        assert set(drawn) <= set(left) and sample.sizes[~certain][-group_rows:].sum() == left.size
    order, edges = sample.strata
    assert np.array_equal(np.diff(edges), sample.sizes[~certain])
    for start, end, row in zip(edges[:-1], edges[1:], sample.rows[~certain], strict=True):
        assert row in order[start:end] and row not in census
    # Every position once: the certain rows and the strata partition them.
    assert np.array_equal(np.sort(np.concatenate([sample.rows[certain], order])), positions)
    assert sample.sizes.sum() == population
    np.testing.assert_array_equal(sample.exact[:, 0], sample.rows)


def test_a_census_keeps_the_stratified_total_unbiased():
    # E[sum_h N_h' e_h] = sum_i e_i: a drawn row kept or drawn again stands for its stratum without the census.
    # Heavy rows (a tenth of the positions hold 90 % of the total), 12 of them and 60 light ones in the census;
    # 4,000 seeds: the mean is within 4 standard errors of the truth (measured 1.1), where weighing a kept row by its
    # stratum's size before the census is 23 off and a census row left as its stratum's draw 28 off.
    rng = np.random.default_rng(0)
    e = rng.exponential(size=300)
    heavy = rng.choice(300, 30, replace=False)
    e[heavy] *= 80
    census = np.sort(np.concatenate([heavy[:12], rng.choice(np.setdiff1d(np.arange(300), heavy), 60, replace=False)]))
    totals = []
    for seed in range(4000):
        sample = replayed(np.arange(300), np.arange(0), 40, seed).with_census(census)
        totals.append(sample.sizes @ e[sample.rows])
    totals = np.array(totals)
    assert abs(totals.mean() - e.sum()) < 4 * totals.std() / np.sqrt(totals.size)


def test_queries_the_landmarks_do_not_represent_are_sampled_apart():
    # A review's family: 10 isolated tokens among 8 tight clusters, each attending mostly to itself. Their rows hold
    # 57 % of the exact outputs' squared norm, the ratio's denominator, and, where no landmark stands for them, most of
    # the error; neither their norms nor their interpolation weights single them out. unrepresented_queries holds every
    # row above 1 % of the error, and self_attending_queries exactly the ten. Coverage at 128 rows (1,000 seeds, the
    # coverage report) with neither: 52 % (norm), 98 % (uniform), 68 % (fps) with unrepresented strata alone, and
    # with both 96.0, 99.9 and 100 %. Pinned over 200 seeds at 3 binomial std (1.5 points) under 95 %, where all three
    # were under it with the high-norm census alone.
    from nystrom.experiments.coverage_report import coverage, row_errors, synthetic_inputs
    from nystrom.linalg.bounds import self_attending_queries, unrepresented_queries

    Q, K, V, m = synthetic_inputs()["isolated tokens"]
    # The isolated ones: far from every other token (a cluster's spread is 0.05 per coordinate, 0.4 across).
    distances = torch.cdist(Q[0, 0], Q[0, 0]) + torch.diag(torch.full((1024,), math.inf, dtype=Q.dtype))
    isolated = np.flatnonzero((distances.min(-1).values > 2).numpy())
    assert isolated.size == 10
    xp = array_api_compat.array_namespace(Q)
    np.testing.assert_array_equal(self_attending_queries(xp, Q, K, np.arange(1024), 128, 32**-0.5), isolated)
    for strategy in ("norm", "uniform", "fps"):
        e, o, outlying, weights, alone = row_errors(Q, K, V, strategy, m)
        assert set(np.flatnonzero(e > 0.01 * e.sum())) <= set(alone)
        np.testing.assert_array_equal(outlying(128), isolated)

        def by_norm(s):
            return high_norm_queries(xp, Q, np.arange(1024), s)

        with_them = coverage(e, o, outlying, weights, 128, replications=200, alone=alone)[0][0]
        without = coverage(e, o, by_norm, weights, 128, replications=200)[0][0]
        assert with_them >= 0.93 and without < 0.9, (strategy, with_them, without)
    # Cross-attention has no own key; padded rows never count.
    keys = Q[..., :4, :]
    assert unrepresented_queries(xp, Q[..., :100, :], K, keys, None, 0.2) is None
    found = unrepresented_queries(xp, Q, K, keys, None, 0.2)
    real = np.ones((2, 1024), dtype=bool)
    real[:, found] = False
    assert found.size and unrepresented_queries(xp, Q, K, keys, None, 0.2, real).size == 0
    assert self_attending_queries(xp, Q[..., :100, :], K, np.arange(100), 16, 0.2).size == 0
    real[:, isolated] = False
    assert self_attending_queries(xp, Q, K, np.arange(1024), 128, 32**-0.5, real=real).size == 0


def test_self_attending_queries_with_one_key_head_and_unread_positions():
    # Multi-query attention (one key head for four query heads), as patch(tol=...) passes a model's keys, with a key
    # mask: the flags are those of the keys repeated to every head (a review: a reshape of the sampled keys' mask to
    # the queries' batch failed). And only the positions asked for: padded query rows that look self-attending (their
    # query aimed at their own zeroed key's neighbours) are not returned.
    from nystrom.linalg.bounds import sample_rows, self_attending_queries

    g = torch.Generator().manual_seed(0)
    Q = 3 * torch.randn(2, 4, 300, 16, generator=g, dtype=torch.float64)
    K, V = (torch.randn(2, 1, 300, 16, generator=g, dtype=torch.float64) for _ in range(2))
    K[:, :, :40] = Q[:, :1, :40]  # forty queries near their own key in head 0
    keys = torch.ones(2, 1, 300, dtype=torch.bool)
    keys[1, :, 200:] = False
    K, V = (torch.where(keys[..., None], a, torch.zeros((), dtype=a.dtype)) for a in (K, V))
    xp = array_api_compat.array_namespace(Q)
    one = self_attending_queries(xp, Q, K, np.arange(300), 64, 0.25, keys)
    repeated = self_attending_queries(xp, Q, K.expand(2, 4, 300, 16), np.arange(300), 64, 0.25, keys)
    np.testing.assert_array_equal(one, repeated)
    assert set(one) >= set(range(40))
    # At most half of 128 rows: all with certainty.
    sample = sample_rows(xp, Q, K.expand(2, 4, 300, 16), V.expand(2, 4, 300, 16), num_samples=128, seed=0,
                         scale=0.25, keys=keys)
    assert set(range(40)) <= set(sample.rows[sample.certain].tolist())
    assert self_attending_queries(xp, Q, K, np.arange(20), 8, 0.25, keys).max() < 20


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), short=st.integers(1, 128), spread=st.floats(0.5, 4.0))
def test_self_attending_queries_are_exact_where_every_real_key_is_sampled(seed, short, spread):
    # Sequences of at most SELF_ATTENTION_KEYS = 128 real keys are sampled whole: the test is then the exact one, the
    # own key's share of the softmax above one half. One sequence of the batch is longer (its keys sampled), the other
    # padded to `short` real keys; only the short one's positions are compared.
    from nystrom.linalg.bounds import SELF_ATTENTION_KEYS, query_positions, self_attending_queries

    g = torch.Generator().manual_seed(seed)
    n, s = 160, 16
    assert SELF_ATTENTION_KEYS == 128
    Q, K = (spread * torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    K[1] = Q[1] + 0.3 * torch.randn(3, n, 8, generator=g, dtype=torch.float64)  # some queries near their own key
    keys = torch.ones(2, 1, n, dtype=torch.bool)
    keys[1, :, short:] = False
    K = torch.where(keys[..., None], K, torch.zeros((), dtype=K.dtype))
    real, positions = query_positions(Q, K, keys)
    logits = 0.4 * Q[1] @ K[1].mT + torch.where(keys[1], 0.0, -math.inf)[:, None, :]
    share = torch.softmax(logits, -1).diagonal(dim1=-2, dim2=-1)[:, :short]
    assume(float((share - 0.5).abs().min()) > 1e-9)  # rounding decides a tie
    only_short = real.copy()
    only_short[:3] = False
    found = self_attending_queries(array_api_compat.array_namespace(Q), Q, K, positions, s, 0.4, keys, only_short)
    np.testing.assert_array_equal(found, np.flatnonzero((share > 0.5).any(0).numpy()))


def test_info_estimate_takes_the_rows_of_largest_interpolation_weights():
    from nystrom.linalg.bounds import CENSUS_SHARE

    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((2, 200, 8)) for _ in range(3))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=12, return_info=True)
    weights = info.interpolation_weights()
    assert weights.shape == (200,) and (weights > 0).all()
    estimate = info.estimate_error(num_samples=64, seed=0)
    assert estimate.num_samples == 64 + 64 // CENSUS_SHARE
    # With every row sampled the estimate is the truth, census or not (float64 sums in another order).
    exact = nystrom.exact_attention(Q, K, V)
    truth = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert info.estimate_error(num_samples=200).estimate == pytest.approx(truth, rel=1e-13)
    # An exact answer (every real key a landmark, 20 keys masked) has no weights.
    real = np.arange(200) < 180
    assert nystrom.approximate(Q, K, V, num_landmarks=180, attn_mask=real, return_info=True)[1].landmarks is None
    assert nystrom.approximate(Q, K, V, num_landmarks=180, attn_mask=real,
                               return_info=True)[1].interpolation_weights() is None


def test_interpolation_weights_of_padded_rows_count_zero():
    # Padded query rows may hold anything (here 1e30): their weights are 0, the census never takes them, and the
    # estimate is that of the clean inputs.
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 120, 8)) for _ in range(3))
    real = np.arange(120)[None, :] < np.array([[120], [90]])
    garbage = np.where(real[..., None], Q, 1e30)
    estimates = []
    for q in (Q, garbage):
        out, info = nystrom.approximate(q, K, V, num_landmarks=16, attn_mask=real, return_info=True)
        weights = info.interpolation_weights()
        assert np.isfinite(weights).all()
        estimates.append(info.estimate_error(seed=0))
    assert estimates[0] == estimates[1]


def test_the_census_adds_its_rows_beside_the_high_norm_queries():
    # 10 of 512 queries scaled by 4 are taken with certainty as outlying norms, and are among the largest
    # interpolation weights too: the census chooses among the other positions, so that its 64 // 8 rows are all
    # added (a review: 6-8 of 16 fell on the high-norm rows, 65-67 rows in all at s = 64).
    rng = np.random.default_rng(123)
    n, d = 512, 16
    t = np.linspace(0, 6, n)[:, None]
    Q, K = (np.sin(t * rng.standard_normal((1, d)) + rng.standard_normal((1, d))) * 2
            + 0.2 * rng.standard_normal((n, d)) for _ in range(2))
    Q[np.sort(rng.choice(n, 10, replace=False))] *= 4
    V = rng.standard_normal((1, n, 8))
    _, info = nystrom.approximate(Q[None], K[None], V, strategy="uniform", num_landmarks=32, seed=1, return_info=True)
    high = high_norm_queries(np, Q[None], np.arange(n), 64)
    assert high.size == 10 and len(set(np.argsort(-info.interpolation_weights())[:16]) & set(high)) >= 4
    for num_samples in (64, 128):
        assert info.estimate_error(num_samples=num_samples, seed=0).num_samples == num_samples + num_samples // 8


def test_interpolation_weights_of_huge_padding_raise_no_warning():
    # Padded query rows may hold up to float32's largest values: their weights count 0, without a warning, as
    # estimate_error is (a review: overflow and invalid-value RuntimeWarnings, errors under -W error).
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 70, 8)).astype(np.float32) for _ in range(3))
    real = np.arange(70)[None, :] < np.array([[60], [52]])
    Q[~real] = 3e38
    _, info = nystrom.approximate(Q, K, V, num_landmarks=16, attn_mask=real, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = info.interpolation_weights()
    assert np.isfinite(weights).all() and (weights[52:60] > 0).all()
