"""Landmark strategies: exactness at m = n, FPS reference, padding, determinism, equivariance."""

import dataclasses
import itertools
import warnings
from fractions import Fraction

import array_api_compat
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_attention import landmark_kernel_condition

import nystrom
from nystrom import FPS, KMeans, NewtonSchulz, Norm, PInv, Ridge, RPCholesky, SegmentMeans, Uniform
from nystrom.linalg.landmarks import STRATEGIES, farthest_point_sampling
from nystrom.linalg.landmarks.base import gather_rows
from nystrom.linalg.landmarks.fps import _fps_on_device
from nystrom.linalg.landmarks.norm import attention_share, quorum_votes
from nystrom.linalg.validation import summary

ALL = sorted(STRATEGIES)
DETERMINISTIC = sorted(set(STRATEGIES) - nystrom.RANDOM_STRATEGIES)


def qkv(seed, shape=(2, 3, 24, 8), dv=5, scale=1.0):
    rng = np.random.default_rng(seed)
    Q, K = scale * rng.standard_normal(shape), scale * rng.standard_normal(shape)
    V = rng.standard_normal((*shape[:-1], dv))
    return Q, K, V


# Converged solvers: with all n tokens as landmarks A is an invertible row-permuted softmax matrix, so a converged
# inverse reproduces exact attention up to the rounding of the solve, cond(A) eps relative to the largest output (Ridge
# adds its bias, at most lam cond(A)^2 in units of sigma_max, so it gets lam = 1e-16).
CONVERGED = {
    "newton_schulz": NewtonSchulz(tol=1e-14, max_iters=100),
    "pinv": PInv(rtol=1e-15),
    "ridge": Ridge(lam=1e-16),
}


@pytest.mark.parametrize("strategy,solver", list(itertools.product(ALL, sorted(CONVERGED))))
def test_all_tokens_as_landmarks_is_exact(strategy, solver):
    Q, K, V = qkv(0, shape=(2, 2, 16, 8))
    exact = nystrom.exact_attention(Q, K, V)
    for share in (True, False):
        out, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=16, solver=CONVERGED[solver], seed=1,
                                        share_landmarks_across_heads=share, return_info=True)
        landmarks = info.landmarks
        cond = landmark_kernel_condition(landmarks.queries, landmarks.keys, 8**-0.5, landmarks.log_weights)
        # Measured at cond(A) = 251: at most 0.18 cond eps for Newton-Schulz and PInv, and 2.4 cond eps (1.3e-13) for
        # Ridge, below its bias term 1e-16 cond^2 = 6.3e-12. 4 cond eps (2.2e-13) catches a stabilising 1e-11 I
        # added to A (3.2e-11; the old rtol 1e-8 let it pass, a review).
        bound = 4 * cond * np.finfo(np.float64).eps + (CONVERGED[solver].lam * cond**2 if solver == "ridge" else 0.0)
        np.testing.assert_allclose(out, exact, rtol=0, atol=bound * np.abs(exact).max())


def brute_force_fps(X, m, first=0):
    chosen = [first]
    for _ in range(m - 1):
        dist = np.min(((X[:, None, :] - X[None, chosen, :]) ** 2).sum(-1), axis=1)
        dist[chosen] = -np.inf
        chosen.append(int(np.argmax(dist)))
    return chosen


def test_nearest_never_labels_an_inactive_centroid():
    # Even where the product with the inactive centroid overflows (+inf - inf would be NaN, which argmin picks).
    from nystrom.linalg.landmarks.kmeans import inactive_penalty, nearest

    for X, C in ((np.array([[2e19]], np.float32), np.array([[0.0], [2e19]], np.float32)),
                 (np.array([[200.0]], np.float16), np.array([[0.0], [200.0]], np.float16))):
        active = np.array([True, False])
        with np.errstate(over="ignore"):  # the overflow is the case under test
            assert nearest(np, X, *inactive_penalty(np, C, active)).tolist() == [0]
        t = torch.from_numpy
        xp = array_api_compat.array_namespace(t(X))
        assert nearest(xp, t(X), *inactive_penalty(xp, t(C), t(active))).tolist() == [0]

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), D=st.integers(1, 8), data=st.data())
def test_fps_matches_brute_force(seed, n, D, data):
    m = data.draw(st.integers(1, n))
    X = np.random.default_rng(seed).standard_normal((n, D))
    assert farthest_point_sampling(X, m).tolist() == brute_force_fps(X, m)


def test_fps_batched_equals_per_row():
    X = np.random.default_rng(1).standard_normal((3, 2, 40, 5))
    batched = farthest_point_sampling(X, 10)
    for i, j in itertools.product(range(3), range(2)):
        assert batched[i, j].tolist() == brute_force_fps(X[i, j], 10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 50), data=st.data())
def test_fps_host_loop_equals_device_loop(seed, n, data):
    """The numpy loop (host memory) and the array-API loop (accelerators) choose the same points,
    with padding, guarantee scores (ties included) and a guarantee budget."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2, n, 4))
    mask = rng.random((2, n)) < 0.8
    mask[:, 0] = True
    eligible = int(mask.sum(-1).min())
    m = data.draw(st.integers(1, eligible))
    score = np.where(rng.random((2, n)) < 0.3, rng.integers(0, 3, (2, n)).astype(float), -np.inf)
    budget = data.draw(st.sampled_from([None, 1, 2]))
    host = farthest_point_sampling(X, m, mask=mask, guarantee_score=score, max_guaranteed=budget)
    device = _fps_on_device(np, X, m, mask, score, budget)
    assert host.tolist() == device.tolist()
    on_torch = farthest_point_sampling(torch.from_numpy(X), m, mask=torch.from_numpy(mask),
                                       guarantee_score=torch.from_numpy(score), max_guaranteed=budget)
    assert on_torch.tolist() == host.tolist()


def test_fps_accepts_tensors_that_track_gradients():
    X = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    assert farthest_point_sampling(X, 5).tolist() == brute_force_fps(X.detach().numpy(), 5)


def test_fps_on_a_dtype_numpy_lacks_runs_the_array_api_loop():
    # Seeded, and against the loop on the float32 points selection measures (unseeded bfloat16 distances tied
    # differently now and then, an order-dependent failure).
    X = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    xp = array_api_compat.array_namespace(X)
    assert farthest_point_sampling(X, 5).tolist() == _fps_on_device(xp, X.float(), 5, None, None, None).tolist()


def test_fps_picks_distinct_points_even_with_duplicates():
    X = np.zeros((10, 3))
    X[7] = 1.0
    idx = farthest_point_sampling(X, 10)
    assert sorted(idx.tolist()) == list(range(10))
    assert idx[:2].tolist() == [0, 7]


@pytest.mark.parametrize("n,m", [(10, 3), (17, 5), (16, 16), (7, 1)])
def test_segment_means_uneven(n, m):
    X = np.arange(n, dtype=np.float64)[:, None] * np.ones((1, 2))
    lm = SegmentMeans()(X, X, m)
    bounds = [(i * m) // n for i in range(n)]
    expected = [np.mean([i for i in range(n) if bounds[i] == j]) for j in range(m)]
    # float64: sums of small integers are exact, so each side rounds once, in the division (measured equal).
    np.testing.assert_allclose(lm.keys[:, 0], expected, rtol=np.finfo(np.float64).eps, atol=0)
    assert lm.indices is None


@pytest.mark.parametrize("strategy", ALL)
def test_landmarks_never_on_padding(strategy):
    Q, K, V = qkv(2, shape=(3, 2, 20, 4))
    lengths = np.array([20, 11, 6])
    mask = np.arange(20)[None, None, :] < lengths[:, None, None]  # (3, 1, 20)
    K_pad = np.where(mask[..., None], K, 1e6)  # far-away padding: FPS/k-means would love it
    lm = nystrom.get_strategy(strategy)(Q, K_pad, 6, attn_mask=mask[..., None, :], seed=0, head_axis=-3)
    if lm.indices is not None:
        for b in range(3):
            assert (lm.indices[b] < lengths[b]).all()
    else:
        # One padded member among at most 20 would move a mean by 5e4; the real keys are standard normal.
        assert np.abs(lm.keys).max() < 10.0
        for b in range(3):
            assert (np.asarray(lm.grouping.labels)[b, lengths[b]:] == -1).all()


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_deterministic_strategies_ignore_the_seed(strategy):
    # The quickstart's claim: norm, kmeans, fps and segment_means are functions of the input alone.
    Q, K, _ = qkv(24, shape=(2, 2, 300, 8))
    first, second = (nystrom.get_strategy(strategy)(Q, K, 16, seed=seed, head_axis=-3) for seed in (0, 12345))
    for name in ("queries", "keys", "indices", "log_weights"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None and b is None) or np.array_equal(a, b), name


@pytest.mark.parametrize("xp_name", ["numpy", "torch"])
@pytest.mark.parametrize("strategy", [FPS(), KMeans(), KMeans(assign_all=True)])
def test_distance_rules_pick_the_same_under_power_of_two_scaling(strategy, xp_name):
    # Picks and labels depend on distances only, which a power of two scales exactly: keys times 2**64 (about 2e19,
    # where float32's squared norms overflow and once made the distances NaN and the picks repeat) must give the
    # same landmarks as the keys themselves, bit for bit, and 2**-64 too.
    Q, K, _ = qkv(21, (2, 2, 300, 8))
    Q, K = Q.astype(np.float32), K.astype(np.float32)
    if xp_name == "torch":
        Q, K = torch.from_numpy(Q), torch.from_numpy(K)
    plain = strategy(Q, K, 16, head_axis=-3)
    for factor in (2.0**64, 2.0**-64):
        scaled = strategy(Q, K * factor, 16, head_axis=-3)
        if plain.indices is not None:
            np.testing.assert_array_equal(np.asarray(scaled.indices), np.asarray(plain.indices))
        else:
            np.testing.assert_array_equal(np.asarray(scaled.grouping.labels), np.asarray(plain.grouping.labels))
        np.testing.assert_array_equal(np.asarray(scaled.keys), np.asarray(plain.keys * factor))


@pytest.mark.parametrize("dtype, factor", [(torch.float32, 1e-24), (torch.float32, 1.0), (torch.float32, 1e20),
                                           (torch.float16, 1.0)])
def test_fps_host_and_device_paths_pick_alike_at_the_ends_of_the_range(dtype, factor):
    # The host loop rescales only out of its safe range, the device loop always; padded rows holding 1e30 set no
    # scale. Both must pick what the points at scale 1 give (a review found tiny points collapsing to 0, 1, 2, ...
    # on the host, and float16 picks that differed between the paths).
    rng = np.random.default_rng(24)
    X = torch.from_numpy(rng.standard_normal((1, 64, 8)))
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[:, 50:] = False
    reference = farthest_point_sampling(X, 10, mask=mask)
    scaled = (X * factor).to(dtype).masked_fill(~mask[..., None], 1e30 if dtype == torch.float32 else 6e4)
    host = farthest_point_sampling(scaled, 10, mask=mask)
    xp = array_api_compat.array_namespace(scaled)
    from nystrom.linalg.landmarks.base import unit_scaled
    device = _fps_on_device(xp, unit_scaled(xp, scaled.float(), mask)[0], 10, mask, None, None)
    np.testing.assert_array_equal(host, reference)
    np.testing.assert_array_equal(device, reference)


@pytest.mark.parametrize("fill", [1e25, 3e38])
def test_padded_queries_change_nothing_for_the_fna_authors_recipe(fill):
    # FPS on the queries (nystrom.FNA_AUTHORS): padded query rows are not zeroed, and holding huge values they
    # once set the scale (shrinking the real points: error 3.0) or overflowed into a NaN farthest point.
    gen = torch.Generator().manual_seed(5)
    Q, K, V = (torch.randn(2, 2, 40, 8, generator=gen) for _ in range(3))
    real = torch.ones(2, 40, dtype=torch.bool)
    real[1, 30:] = False
    mask, pad = real[:, None, None, :], ~real[:, None, :, None]
    ref = nystrom.approximate(Q.masked_fill(pad, 0.0), K, V, num_landmarks=8, attn_mask=mask, **nystrom.FNA_AUTHORS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = nystrom.approximate(Q.masked_fill(pad, fill), K, V, num_landmarks=8, attn_mask=mask,
                                  **nystrom.FNA_AUTHORS)
    assert torch.equal(out[1, :, :30], ref[1, :, :30])


@pytest.mark.parametrize("strategy", ALL)
def test_huge_finite_keys_are_exact_at_m_equals_n(strategy):
    # Keys of about 1e19 in float32 are finite and float32 SDPA is exact on them (one-hot attention); so must every
    # rule be with every token a landmark (fps, kmeans and norm once gave errors near 1).
    Q, K, V = (torch.from_numpy(x.astype(np.float32)) for x in qkv(22, (1, 2, 24, 8)))
    K = K * 1e19
    out = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=24, solver="pinv", seed=0)
    ref = torch.nn.functional.scaled_dot_product_attention(Q.double(), K.double(), V.double())
    # One-hot rows: the output is a row of V, up to float32 rounding of the product at m = n: measured at most 6.0e-7
    # (5 ulps of max |V| = 2.6); 16x.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ALL)
def test_logits_past_float32_choose_finite_landmarks(strategy):
    # Q and K of about 1e19 in float32: finite, but q.k overflows, and float32 SDPA answers NaN on most rows. Selection
    # must still choose m landmarks, not crash: norm's probe shares were NaN, ranked first by topk and read back as
    # position n (an out-of-bounds gather; on a GPU a device-side assert).
    generator = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 2, 32, 8, generator=generator) for _ in range(3))
    landmarks = nystrom.get_strategy(strategy)(Q * 1e19, K * 1e19, 8, head_axis=-3, seed=0)
    assert landmarks.keys.shape == (1, 2, 8, 8) and torch.isfinite(landmarks.keys).all()
    out = nystrom.approximate(Q * 1e19, K * 1e19, V, strategy=strategy, num_landmarks=8, seed=0)
    assert out.shape == V.shape
    if strategy == "norm":
        # NaN shares pass no sink test: CLS alone is a singleton (norm_singletons is defined below).
        candidates, real, _ = norm_singletons(Q * 1e19, K * 1e19, 8)
        assert candidates[real].tolist() == [0]


@pytest.mark.parametrize("strategy", ["norm", "uniform"])
def test_logits_that_overflow_before_the_scale_are_nan_and_the_folded_scale_is_not(strategy):
    # The reliability page's case: |q.k| up to 4e38 (past float32), scaled logits near 30. SDPA forms q.k before the
    # scale, and so NaN reaches approximate's output; folding the scale into Q, as the page advises, is finite, and
    # exact with every token a landmark.
    generator = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 2, 64, 64, generator=generator) for _ in range(3))
    Q, K = (x / x.norm(dim=-1, keepdim=True) * 3e19 for x in (Q, K))
    scale = 8e-38
    options = dict(num_landmarks=64, strategy=strategy, solver="pinv", seed=0)
    assert torch.isnan(nystrom.approximate(Q, K, V, scale=scale, **options)).any()
    folded = nystrom.approximate(Q * scale, K, V, scale=1.0, **options)
    exact = torch.nn.functional.scaled_dot_product_attention((Q * scale).double(), K.double(), V.double(), scale=1.0)
    # float32 at m = n on peaked logits (near 30): measured 1.2e-5 and 1.3e-5; 8x.
    assert float((folded.double() - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["fps", "norm", "segment_means", "kmeans"])
def test_padding_changes_nothing_for_real_tokens(strategy, side):
    # Left padding too (a batch of sentences padded on the left): the CLS that norm and fps keep is the first real
    # token, not position 0, which is padding there (a review found norm's output off by 1.5 on MiniLM).
    Q, K, V = qkv(3, shape=(1, 2, 13, 4))
    K[..., 0, :] = 3 * Q.mean(axis=-2)  # a sink at CLS, so that norm's singleton matters
    pad = 7
    def padded(X):
        filler = 9.0 * np.ones((1, 2, pad, X.shape[-1]))
        return np.concatenate([X, filler] if side == "right" else [filler, X], axis=2)

    Qp, Kp, Vp = (padded(X) for X in (Q, K, V))
    real = np.arange(13 + pad) < 13 if side == "right" else np.arange(13 + pad) >= pad
    ref = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=5)
    out = nystrom.approximate(Qp, Kp, Vp, strategy=strategy, num_landmarks=5, attn_mask=real[None, None, None, :])
    # The same landmarks, so only the order of float64 sums over the padded keys differs: at most 6.9e-16 measured
    # (3 ulps of max |out| = 1.7) for every strategy and side, on 1, 2 and 16 threads; 1e-14 leaves 14x.
    np.testing.assert_allclose(out[:, :, real], ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("strategy", sorted(nystrom.RANDOM_STRATEGIES))
def test_random_strategies_are_seeded(strategy):
    Q, K, _ = qkv(4)
    s = nystrom.get_strategy(strategy)
    a, b, c = (s(Q, K, 6, seed=seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.keys, b.keys)
    assert not np.array_equal(a.keys, c.keys)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(4))
def test_numpy_and_torch_pick_the_same_past_the_distinct_tokens(seed, dtype):
    # Three copies of 10 tokens: once the 10 are pivots, rpcholesky's residual is rounding, which numpy left at about
    # eps and torch clipped to 0 (or the other way), and the libraries' picks parted (a review). Rounding is 0 now.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((10, [2, 8, 16, 64][seed])) * [0.05, 0.5, 1.5, 3.0][seed]
    X = np.concatenate([X, X, X])[rng.permutation(30)][None, None].astype(dtype)
    s = nystrom.get_strategy("rpcholesky")
    for m in (15, 25, 30):
        picks = s(X, X, m, seed=seed).indices
        assert len(set(picks[0, 0].tolist())) == m
        np.testing.assert_array_equal(s(torch.from_numpy(X), torch.from_numpy(X), m, seed=seed).indices.numpy(), picks)


@pytest.mark.parametrize("strategy", ALL)
def test_numpy_and_torch_select_the_same(strategy):
    Q, K, _ = qkv(5)
    s = nystrom.get_strategy(strategy)
    ref = s(Q, K, 6, seed=3, head_axis=-3)
    got = s(torch.from_numpy(Q), torch.from_numpy(K), 6, seed=3, head_axis=-3)
    # Real-token landmarks are gathered rows, bit for bit; cluster means of at most 24 float64 tokens of size < 4
    # may differ by the summation order, at most 24 eps * 4 = 2e-14. Measured: bit-identical for every strategy (1, 2
    # and 16 threads).
    np.testing.assert_allclose(got.keys.numpy(), ref.keys, rtol=0, atol=2e-14)
    np.testing.assert_allclose(got.queries.numpy(), ref.queries, rtol=0, atol=2e-14)
    if ref.indices is not None:
        np.testing.assert_array_equal(got.indices.numpy(), ref.indices)


@pytest.mark.parametrize("strategy", ["fps"])
def test_permutation_equivariance(strategy):
    # Permuting the tokens (keeping the CLS token, index 0, in front) permutes the output rows.
    Q, K, V = qkv(6, shape=(1, 2, 30, 6))
    perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(29)])
    out = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=8)
    out_p = nystrom.approximate(Q[:, :, perm], K[:, :, perm], V[:, :, perm], strategy=strategy, num_landmarks=8)
    # The same landmarks in the same order; only the order of float64 sums over the keys differs: at most 1.1e-15
    # measured (5 ulps of max |out| = 1.4); 1e-14 leaves 9x.
    np.testing.assert_allclose(out_p, out[:, :, perm], rtol=0, atol=1e-14)


def test_shared_landmarks_are_the_same_in_every_head():
    Q, K, _ = qkv(7, shape=(2, 4, 20, 4))
    for name in ("fps", "uniform", "rpcholesky"):
        idx = nystrom.get_strategy(name)(Q, K, 5, seed=0, head_axis=-3).indices
        assert idx.shape == (2, 4, 5)
        assert (idx == idx[:, :1]).all()
    per_head = FPS()(Q, K, 5).indices
    assert not (per_head == per_head[:, :1]).all()
    # Clusters: one assignment per sequence, each head its own means of that assignment.
    clustered = nystrom.get_strategy("norm")(Q, K, 5, head_axis=-3)
    assert clustered.assignment.shape == (2, 20)
    for h in range(4):
        for j in range(5):
            members = clustered.assignment[0] == j
            # Means of at most 20 keys of size < 4 in another summation order, as in
            # test_numpy_and_torch_select_the_same: at most 20 eps * 4 < 2e-14 (measured equal).
            np.testing.assert_allclose(clustered.keys[0, h, j], K[0, h, members].mean(axis=0), rtol=0, atol=2e-14)



@pytest.mark.parametrize("head_axis", [-3, -4, -5])
@pytest.mark.parametrize("name", ALL)
def test_heads_may_lie_on_any_leading_axis(name, head_axis):
    # 5-D inputs with the shared head axis anywhere check_head_axis allows: every rule returns one landmark set per
    # row, the same along that axis (segment means raised IndexError on -4 and -5 before: its one labelling, of shape
    # (n,), was expanded at the head axis as if it had the selection rows' dimensions).
    Q, K, _ = qkv(3, shape=(2, 3, 2, 12, 4))
    landmarks = nystrom.get_strategy(name)(Q, K, 4, seed=0, head_axis=head_axis)
    # A numpy integer names the axis too (refused before: "must be ... between -5 and -3, got np.int64(-3)").
    same = nystrom.get_strategy(name)(Q, K, 4, seed=0, head_axis=np.int64(head_axis))
    np.testing.assert_array_equal(same.keys, landmarks.keys)
    assert landmarks.keys.shape == (2, 3, 2, 4, 4)
    if landmarks.indices is not None:
        # Indices (..., m): K's head axis h is their axis h + 1.
        assert (landmarks.indices == np.take(landmarks.indices, [0], axis=head_axis + 1)).all()
    # Segment means depend on positions alone: sharing heads changes nothing.
    if name == "segment_means":
        np.testing.assert_array_equal(landmarks.keys, SegmentMeans()(Q, K, 4).keys)

def singletons(landmarks, K):
    """Tokens that are landmarks of their own: weight 1 and the landmark key equal to the token's key."""
    labels = landmarks.assignment
    counts = np.bincount(labels[labels >= 0], minlength=landmarks.keys.shape[-2])
    # A one-member mean is its member's key exactly (numpy's allclose, 1e-5 relative, also took near misses).
    found = [i for i, j in enumerate(labels) if j >= 0 and counts[j] == 1 and np.array_equal(landmarks.keys[j], K[i])]
    # float64 exp(log c): about (log c + 1) eps relative, under 6 eps for c <= 64 (measured 1 ulp).
    np.testing.assert_allclose(np.exp(landmarks.log_weights), counts, rtol=10 * np.finfo(np.float64).eps, atol=0)
    return found


def test_norm_makes_an_attention_sink_that_key_norms_miss_a_singleton():
    # Token 5 is a sink: every query aligns with its key direction, yet its key norm is the median.
    rng = np.random.default_rng(8)
    n, d = 64, 16
    K = rng.standard_normal((n, d))
    K /= np.linalg.norm(K, axis=-1, keepdims=True)
    sink_dir = K[5]
    Q = rng.standard_normal((n, d)) * 0.3 + 20.0 * sink_dir
    share = attention_share(np, Q, K, d**-0.5)
    assert share[5] > 10 / n
    assert singletons(Norm(first=None)(Q, K, 8), K) == [5]


def test_a_local_attention_peak_is_no_sink():
    # Token 9 takes almost all the attention of one probe (its neighbour) and nothing from the others: the quorum
    # keeps it out, where the mean share alone (4x uniform at n = 64) would not.
    rng = np.random.default_rng(11)
    n, d = 64, 16
    K = rng.standard_normal((n, d)) * 0.1
    Q = rng.standard_normal((n, d)) * 0.1
    Q[8] = 60.0 * K[9] / np.linalg.norm(K[9])  # the probe of rank 2 of 16 sits at position 8
    share = attention_share(np, Q, K, d**-0.5)
    assert share[9] > 2 / n  # the mean share alone would flag it at sink_ratio=2
    assert 9 not in singletons(Norm(first=None, sink_ratio=2.0, num_probes=16)(Q, K, 8), K)
    assert 9 in singletons(Norm(first=None, sink_ratio=2.0, num_probes=16, sink_quorum=1 / 16)(Q, K, 8), K)


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 256))
@example(0.5, 8)
@example(0.3, 10)
@example(1 / 3, 3)
def test_the_quorum_is_the_fewest_votes_that_reach_its_fraction(quorum, probes):
    votes = quorum_votes(quorum, probes)
    assert Fraction(votes, probes) >= Fraction(quorum) > Fraction(votes - 1, probes)


def test_a_sink_needs_exactly_the_quorum_of_probes():
    # Key 9 takes the threshold share from 8 of 16 probes (positions 0..7 aim at it); at sink_quorum 8/16 it is a sink,
    # at 9/16 it is not: the votes are counted, not averaged in float.
    rng = np.random.default_rng(12)
    n, d = 16, 16
    K = rng.standard_normal((n, d)) * 0.1
    Q = rng.standard_normal((n, d)) * 0.1
    Q[:8] = 60.0 * K[9] / np.linalg.norm(K[9])
    strategy = {"first": None, "sink_ratio": 4.0, "num_probes": 16, "max_singleton_fraction": 0.5}
    assert 9 in singletons(Norm(sink_quorum=0.5, **strategy)(Q, K, 4), K)
    assert 9 not in singletons(Norm(sink_quorum=9 / 16, **strategy)(Q, K, 4), K)


@pytest.mark.parametrize("scale", [1e-25, 1e20, 1e30])
def test_norm_finds_the_same_massive_tokens_at_any_scale_of_the_features(scale):
    # A review: float32 features near 1e-25 or 1e30 had sums of squares that vanished or overflowed, the median norm
    # went to 0 or inf, and every token counted as high-norm (3 singletons became 6). Norms are compared in a unit
    # near the largest entry now.
    rng = np.random.default_rng(9)
    Q, K = rng.standard_normal((64, 8)), rng.standard_normal((64, 8))
    feats = rng.standard_normal((64, 16)).astype(np.float32)
    feats[9] *= 40
    expected = singletons(Norm()(Q, K, 16, features=feats), K)
    assert 9 in expected
    assert singletons(Norm()(Q, K, 16, features=(feats * np.float32(scale)).astype(np.float32)), K) == expected


def test_norm_makes_massive_feature_tokens_and_cls_singletons():
    rng = np.random.default_rng(9)
    Q, K = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    feats = rng.standard_normal((40, 8))
    feats[17] *= 500.0
    assert {0, 17} <= set(singletons(Norm()(Q, K, 6, features=feats), K))
    # Gaussian tokens, nothing stands out: CLS is the one singleton, clusters stand for the other 39 tokens.
    plain = Norm(sink_ratio=1e9)(Q, K, 6)
    assert 0 in singletons(plain, K)
    assert np.exp(plain.log_weights).sum() == 40


@pytest.mark.parametrize("strategy", ALL)
def test_self_attention_rows_at_masked_keys_are_exact_with_every_real_key_a_landmark(strategy):
    # A query at a masked key is no landmark query: its row was exact only through A^+ A = I, which rounding loses
    # (a review: 0.12 relative in those rows in float32 with pinv, 2e-5 in the others). Exact attention answers.
    gen = torch.Generator().manual_seed(31)
    Q, K, V = (torch.randn(128, 64, generator=gen) for _ in range(3))
    keep = torch.ones(128, dtype=torch.bool)
    keep[torch.randperm(128, generator=gen)[:16]] = False
    out, info = nystrom.approximate(Q, K, V, keep, num_landmarks=112, strategy=strategy, solver="pinv", seed=0,
                                    return_info=True)
    ref = torch.nn.functional.scaled_dot_product_attention(Q.double(), K.double(), V.double(), attn_mask=keep[None])
    # float32 SDPA against float64: rounding of 64-term sums of logits and of the 112-key averages, measured 5.5e-7.
    row_errors = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(row_errors.max()) < 1e-5
    assert info.landmarks is None
    # A mask that masks nothing is no mask: the formula answers, as without one (a review: exact attention then,
    # 0.033 from the unmasked call's six Newton-Schulz steps).
    everything = torch.ones(128, dtype=torch.bool)
    masked, info = nystrom.approximate(Q, K, V, everything, num_landmarks=128, strategy=strategy, seed=0,
                                       return_info=True)
    assert info.landmarks is not None
    torch.testing.assert_close(masked, nystrom.approximate(Q, K, V, num_landmarks=128, strategy=strategy, seed=0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("strategy", ALL)
def test_cross_attention_with_every_key_a_landmark_is_exact_attention(strategy, padded, dtype):
    # Peaked cross-attention (logits up to ~90): through the formula m = n keys was exact only through A^+ A = I,
    # which rounding loses (0.16-0.24 of error in float32 with pinv, a review finding); the call answers with exact
    # attention, and Info says so.
    gen = torch.Generator().manual_seed(23)
    Q = torch.randn(2, 2, 50, 16, generator=gen, dtype=dtype)
    K = 20 * torch.randn(2, 2, 32, 16, generator=gen, dtype=dtype)
    V = torch.randn(2, 2, 32, 16, generator=gen, dtype=dtype)
    mask, m = None, 32
    if padded:
        mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
        mask[..., 27:] = False
        m = 27
    out, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=m, attn_mask=mask, solver="pinv",
                                    seed=0, return_info=True)
    ref = torch.nn.functional.scaled_dot_product_attention(Q.double(), K.double(), V.double(), attn_mask=mask)
    # Exact attention in the input's dtype: exp of logits up to ~90 rounds by |logit| eps relative, 5e-6 in float32
    # (measured 5.1e-6 on |V| up to 3; the tolerance allows up to 4e-5 there) and 2e-14 in float64 (measured equal:
    # SDPA's float64 path on both sides).
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert info.landmarks is None and info.flops["total"] == info.exact_flops
    # One real key fewer in one sequence: no longer every key, the formula answers.
    if padded:
        mask[1, ..., 26] = False
        _, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=26, attn_mask=mask, seed=0,
                                      return_info=True)
        assert info.landmarks is not None


def test_cross_attention_landmarks():
    rng = np.random.default_rng(10)
    Q, K, V = rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 21, 4)), rng.standard_normal((2, 21, 3))
    for name in ALL:
        lm = nystrom.get_strategy(name)(Q, K, 5, seed=0)
        assert lm.queries.shape == (2, 5, 4) and lm.keys.shape == (2, 5, 4)
        assert nystrom.approximate(Q, K, V, strategy=name, num_landmarks=5, seed=0).shape == (2, 9, 3)


def test_unknown_strategy_lists_each_candidate_and_what_it_does():
    with pytest.raises(ValueError, match="unknown strategy 'farthest'; candidates are:") as err:
        nystrom.get_strategy("farthest")
    for name, cls in nystrom.STRATEGIES.items():
        assert f"'{name}': {summary(cls)}" in str(err.value)


def test_capabilities_are_declared_and_registries_derived_from_them():
    assert nystrom.RANDOM_STRATEGIES == {name for name, cls in nystrom.STRATEGIES.items() if cls.random}
    assert nystrom.RANDOM_STRATEGIES == {"uniform", "rpcholesky"}
    token_pickers = {name for name, cls in nystrom.STRATEGIES.items() if cls.picks_tokens}
    assert token_pickers == {"fps", "uniform", "rpcholesky"}
    assert {name for name, cls in nystrom.STRATEGIES.items() if cls.weighted} == {"norm", "kmeans"}
    for cls in nystrom.STRATEGIES.values():
        assert isinstance(cls(), nystrom.Strategy) and nystrom.STRATEGIES[cls.name] is cls


def test_a_strategy_declared_later_joins_the_registries():
    # RANDOM_STRATEGIES was a frozen set of the built-in names, which a user's random rule never joined.
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Shuffled(nystrom.Uniform, name="shuffled_review", random=True):
        pass

    try:
        assert "shuffled_review" in nystrom.RANDOM_STRATEGIES and nystrom.STRATEGIES["shuffled_review"] is Shuffled
        assert sorted(nystrom.RANDOM_STRATEGIES) == ["rpcholesky", "shuffled_review", "uniform"]
    finally:
        del nystrom.STRATEGIES["shuffled_review"]
    assert "shuffled_review" not in nystrom.RANDOM_STRATEGIES and len(nystrom.RANDOM_STRATEGIES) == 2
    with pytest.raises(TypeError, match="unknown strategy capabilities"):
        type("Bad", (nystrom.Strategy,), {}, name="bad", fast=True)


def test_a_name_taken_by_another_class_is_refused_and_an_unnamed_subclass_registers_nothing():
    # A review: `class Shadow(PInv, name="pinv")` silently replaced the built-in for every solver="pinv" (strategies
    # alike), and a helper subclass of a solver without a name was a TypeError.
    for family, base, name, registry in (("strategy", nystrom.Uniform, "fps", nystrom.STRATEGIES),
                                         ("solver", nystrom.PInv, "pinv", nystrom.SOLVERS)):
        before = dict(registry)
        with pytest.raises(ValueError, match=f"the {family} name '{name}' is taken by .*: give Shadow a name"):
            type("Shadow", (base,), {}, name=name)
        helper = type("Helper", (base,), {})
        assert registry == before and helper.name == base.name
    # The same class defined again (a module reloaded) replaces its earlier self.
    first = type("Reloaded", (nystrom.PInv,), {"__module__": "a_module"}, name="reloaded_solver_test")
    again = type("Reloaded", (nystrom.PInv,), {"__module__": "a_module"}, name="reloaded_solver_test")
    assert nystrom.SOLVERS["reloaded_solver_test"] is again is not first
    del nystrom.SOLVERS["reloaded_solver_test"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_declared_capabilities_hold(name):
    # Each declaration is checked against behaviour: random strategies differ between seeds (and repeat for one),
    # token pickers return the positions of their landmarks, masked keys never enter a landmark.
    cls = nystrom.STRATEGIES[name]
    rng = np.random.default_rng(1)
    Q, K = rng.standard_normal((2, 64, 8)), rng.standard_normal((2, 64, 8))
    mask = np.ones((2, 64), dtype=bool)
    mask[:, 40:] = False
    K_poison = np.where(mask[..., None], K, 1e3)
    a, b, c = (cls()(Q, K_poison, 8, seed=s, attn_mask=mask) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.keys, b.keys)
    assert cls.random == (not np.array_equal(a.keys, c.keys))
    assert cls.picks_tokens == (a.indices is not None)
    if cls.picks_tokens:
        assert np.all(a.indices < 40)
        np.testing.assert_array_equal(a.keys, np.take_along_axis(K, a.indices[..., None], axis=-2))
    assert np.abs(a.keys).max() < 100  # a mean that took in a padded key (1e3) would show it


def test_kmeans_and_rpcholesky_objects():
    Q, K, V = qkv(11)
    for s in (KMeans(iters=3), RPCholesky(), Uniform(), SegmentMeans()):
        assert nystrom.approximate(Q, K, V, strategy=s, num_landmarks=6, seed=0).shape == V.shape
    with pytest.raises(ValueError, match="iters"):
        KMeans(iters=-2)


def test_norm_probes_ignore_padding():
    # The sink probes sit among real queries only: extra padding must not move the landmarks.
    rng = np.random.default_rng(1)
    Q, K = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    strategy = Norm(sink_ratio=1.5)
    ref = strategy(Q, K, 16).indices
    for pad in (1, 7, 40):
        Qp, Kp = (np.concatenate([X, rng.standard_normal((pad, 8))]) for X in (Q, K))
        mask = np.arange(40 + pad) < 40
        np.testing.assert_array_equal(strategy(Qp, Kp, 16, attn_mask=mask).indices, ref)


@pytest.mark.parametrize("case", ["per_row", "shared_over_heads", "shared_over_batch", "none", "strided_input"])
def test_gather_rows_takes_the_indexed_rows(case):
    # The torch fast path (index_select on flattened rows) and its fallback (Tensor.gather, for inputs that
    # are not contiguous) must agree with numpy's take_along_axis, and give Tensor.gather's gradients.
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 3, 50, 7))
    idx = {"per_row": rng.integers(0, 50, (2, 3, 9)), "shared_over_heads": rng.integers(0, 50, (2, 1, 9)),
           "shared_over_batch": rng.integers(0, 50, (1, 1, 9)), "none": np.zeros((2, 3, 0), dtype=np.int64),
           "strided_input": rng.integers(0, 25, (2, 3, 9))}[case]
    view = (lambda a: a[:, :, ::2]) if case == "strided_input" else (lambda a: a)
    X = view(base)
    expected = np.take_along_axis(X, np.broadcast_to(idx[..., None], (*X.shape[:-2], idx.shape[-1], 7)), axis=-2)
    np.testing.assert_array_equal(gather_rows(np, X, idx), expected)
    grads = []
    for fast in (True, False):
        Xt = torch.tensor(base, requires_grad=True)
        index = torch.from_numpy(idx)
        if fast:
            out = gather_rows(array_api_compat.array_namespace(Xt), view(Xt), index)
            np.testing.assert_array_equal(out.detach().numpy(), expected)
        else:
            out = view(Xt).gather(-2, index[..., None].expand(*X.shape[:-2], idx.shape[-1], 7))
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads.append(Xt.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("listed", [30, 99, 100, 180])
def test_group_means_over_a_token_list_equal_the_means_of_its_members(library, listed):
    # A token list of fewer than half the tokens is gathered, one of half or more is summed over every token with
    # the others dropped (n = 200 here): both must give the mean of each group's listed members, the weights'
    # sums as log-weights, and ignore entries labelled -1 (a repeat of a listed token among them).
    from nystrom.linalg.landmarks.base import Grouping, grouped_landmarks

    rng = np.random.default_rng(listed)
    heads, n, d, m = 3, 200, 8, 5
    Q, K = rng.standard_normal((2, heads, n, d)), rng.standard_normal((2, heads, n, d))
    tokens = np.stack([rng.choice(n, listed, replace=False) for _ in range(2)])
    labels = np.stack([np.concatenate([np.arange(m), rng.integers(0, m, listed - m)]) for _ in range(2)])
    labels[:, -1], tokens[:, -1] = -1, tokens[:, 0]  # an ignored repeat
    weights = rng.uniform(1, 3, (2, listed))
    xp = array_api_compat.array_namespace(np.empty(0) if library == "numpy" else torch.empty(0))
    as_array = (lambda a: a) if library == "numpy" else torch.from_numpy
    full = -np.ones((2, n), dtype=np.int64)
    grouping = Grouping(as_array(full), tokens=as_array(tokens), token_labels=as_array(labels),
                        weights=as_array(weights))
    landmarks = grouped_landmarks(xp, as_array(Q), as_array(K), grouping, m, head_axis=-3)
    # float64 sums of at most `listed` terms in another order: means off by at most listed eps max |X| (1.6e-13 at 180
    # members of size < 4), the logs of the weights' sums by listed eps absolute; measured 2.2e-16 and 4.4e-16.
    eps = np.finfo(np.float64).eps
    for b in range(2):
        for j in range(m):
            members = tokens[b][labels[b] == j]
            np.testing.assert_allclose(np.asarray(landmarks.keys[b, :, j]), K[b][:, members].mean(axis=1),
                                       rtol=0, atol=listed * eps * np.abs(K).max())
            np.testing.assert_allclose(np.asarray(landmarks.queries[b, :, j]), Q[b][:, members].mean(axis=1),
                                       rtol=0, atol=listed * eps * np.abs(Q).max())
            np.testing.assert_allclose(np.asarray(landmarks.log_weights[b, :, j]),
                                       np.log(weights[b][labels[b] == j].sum()), rtol=0, atol=listed * eps)


@pytest.mark.parametrize("strategy", [nystrom.KMeans(sample_size=1), nystrom.Norm(sample_size=5)])
def test_a_kmeans_sample_below_m_is_widened_to_m(strategy):
    # k-means cannot make m non-empty clusters of fewer than m points: the sample takes at least m tokens, so with
    # every token a landmark the call is still exact (it once left empty clusters, error 0.75 and 2.7).
    generator = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 2, 30, 16, dtype=torch.float64, generator=generator) for _ in range(3))
    out = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=30, solver="pinv")
    exact = nystrom.exact_attention(Q, K, V)
    # float64 at m = n: rounding amplified by cond(A); measured at most 5.9e-14 over 30 draws; 17x.
    assert float((out - exact).norm() / exact.norm()) < 1e-12


def test_a_callable_strategy_must_return_landmarks():
    Q = np.random.default_rng(0).standard_normal((2, 30, 8))
    with pytest.raises(TypeError, match="landmarks must be Landmarks"):
        nystrom.approximate(Q, Q, Q, num_landmarks=4, strategy=lambda *args, **kwargs: None)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_callable_strategy_that_picks_padding_is_refused(library):
    # A review: a callable that ignored attn_mask and took the last tokens put landmarks on a sequence's padding, and
    # its real rows moved by 0.81 when only the padding changed, silently. Its indices say where its landmarks are.
    from nystrom.linalg.landmarks.base import landmarks_at

    def last_tokens(Q, K, m, **kwargs):
        xp = array_api_compat.array_namespace(K)
        return landmarks_at(xp, Q, K, xp.broadcast_to(xp.arange(K.shape[-2] - m, K.shape[-2]), (*K.shape[:-2], m)))

    def first_tokens(Q, K, m, **kwargs):
        xp = array_api_compat.array_namespace(K)
        return landmarks_at(xp, Q, K, xp.broadcast_to(xp.arange(m), (*K.shape[:-2], m)))

    def beyond(Q, K, m, **kwargs):
        return dataclasses.replace(first_tokens(Q, K, m), indices=first_tokens(Q, K, m).indices + K.shape[-2])

    xp = np if library == "numpy" else torch
    X = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 12, 4)))
    mask = np.ones((2, 1, 1, 12), dtype=bool)
    mask[1, ..., 8:] = False
    mask = xp.asarray(mask)
    with pytest.raises(ValueError, match="landmark indices point at masked keys"):
        nystrom.approximate(X, X, X, attn_mask=mask, num_landmarks=3, strategy=last_tokens)
    with pytest.raises(ValueError, match=r"landmark indices must be positions in K, in \[0, 12\)"):
        nystrom.approximate(X, X, X, num_landmarks=3, strategy=beyond)
    # Without a mask the last tokens are real ones; the first tokens are real in every sequence.
    nystrom.approximate(X, X, X, num_landmarks=3, strategy=last_tokens)
    nystrom.approximate(X, X, X, attn_mask=mask, num_landmarks=3, strategy=first_tokens)
    # check_values=False reads no data: the callable is trusted there.
    nystrom.approximate(X, X, X, attn_mask=mask, num_landmarks=3, strategy=last_tokens, check_values=False)


def test_a_head_axis_for_keys_without_one_is_named_so():
    # K of shape (n, d) has no leading axis: the message offered "a negative int between -2 and -3" (a review).
    X = np.ones((6, 4))
    with pytest.raises(ValueError, match=r"head_axis must be None: K has no leading axis; K has shape \(6, 4\)"):
        nystrom.FPS()(X, X, 3, head_axis=-3)
    with pytest.raises(ValueError, match=r"between -4 and -3 \(a leading axis of K\)"):
        nystrom.FPS()(X[None, None], X[None, None], 3, head_axis=-5)


def test_a_users_strategy_subclass_is_checked_as_a_callable_is():
    # A review: the rule of last_tokens above written as a TokenStrategy subclass, the documented way to write one,
    # put landmarks on padding silently, and one that picked m - 1 tokens left Info's FLOPs counting m; the library's
    # own strategies stay unchecked.
    from nystrom.linalg.landmarks import TokenStrategy

    class LastTokens(TokenStrategy):
        def pick(self, selection, X, mask):
            m, n = selection.num_landmarks, X.shape[-2]
            return np.broadcast_to(np.arange(n - m, n), (*X.shape[:-2], m))

    class TooFew(TokenStrategy):
        def pick(self, selection, X, mask):
            m = selection.num_landmarks - 1
            return np.broadcast_to(np.arange(m), (*X.shape[:-2], m))

    X = np.random.default_rng(0).standard_normal((2, 12, 4))
    mask = np.ones((2, 1, 12), dtype=bool)
    mask[1, :, 8:] = False
    with pytest.raises(ValueError, match="landmark indices point at masked keys"):
        nystrom.approximate(X, X, X, attn_mask=mask, num_landmarks=3, strategy=LastTokens())
    with pytest.raises(ValueError, match=r"landmark queries have shape \(2, 2, 4\), expected \(2, 3, 4\)"):
        nystrom.approximate(X, X, X, num_landmarks=3, strategy=TooFew())
    nystrom.approximate(X, X, X, num_landmarks=3, strategy=LastTokens())


def test_farthest_point_sampling_checks_its_arguments():
    # The public function; the library's own calls go through farthest_points, unchecked (k-means seeding asks for
    # m seeds where singletons left fewer eligible tokens).
    X = np.random.default_rng(0).standard_normal((10, 3))
    mask = np.zeros(10, dtype=bool)
    mask[:3] = True
    for kwargs, match in [(dict(num_points=12), "exceeds the 10 points"), (dict(num_points=0), "at least 1"),
                          (dict(num_points=5, mask=mask), r"eligible points of a row of mask \(3\)"),
                          (dict(num_points=4, max_guaranteed=-1), "max_guaranteed must be at least 0")]:
        with pytest.raises(ValueError, match=match):
            farthest_point_sampling(X, **kwargs)
    assert len(set(farthest_point_sampling(X, 3, mask=mask).tolist())) == 3


def norm_singletons(Q, K, m, features=None, **settings):
    """Norm's candidate singletons of one call and which of them are real, as its assign step sees them."""
    from nystrom.linalg.landmarks.base import Selection

    rule = Norm(**settings)
    budget = min(max(1, int(rule.max_singleton_fraction * m)), m - 1)
    selection = Selection.of(array_api_compat.array_namespace(K), Q, K, m, head_axis=-3, features=features,
                             scale=Q.shape[-1] ** -0.5)
    candidates, real = rule.singletons(selection, budget)
    return np.asarray(candidates), np.asarray(real), budget


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 40), percent=st.integers(1, 100), high=st.integers(0, 40))
@example(seed=0, m=40, percent=100, high=40)  # never all: m - 1 singletons
@example(seed=0, m=12, percent=1, high=40)  # at least one
@example(seed=0, m=40, percent=25, high=40)  # the default fraction
def test_norm_singletons_stay_within_their_fraction_of_m(seed, m, percent, high):
    # Docs' landmark page, Norm (4): at most max_singleton_fraction of the m slots are singletons, at least one, never
    # all, CLS first; the singletons take the last slots. Here CLS and `high` high-norm tokens (features 100x the
    # others, so past norm_ratio = 10 times the median) are the candidates, and the sink test is off (no key takes
    # a share of 1): the call makes min(budget, 1 + high) singletons, the budget min(max(1, floor(f m)), m - 1).
    # Read from the returned Landmarks, in every sequence and head: a singleton has weight 1 (log-weight 0), and
    # every cluster weighs at least 360/100 (sample_size=100 of the 360 or more tokens left: each sampled token
    # stands for n_v / s_v of them), so log_weights == 0 marks exactly the one-token landmarks.
    fraction = percent / 100  # int(fraction * m) == percent * m // 100 for every m <= 40 and percent <= 100
    budget = min(max(1, percent * m // 100), m - 1)
    Q, K, _ = qkv(seed, shape=(2, 2, 400, 8))
    rng = np.random.default_rng([seed, 1])  # a stream apart from qkv's
    features = rng.standard_normal((2, 400, 16))
    outliers = [rng.choice(np.arange(1, 400), size=high, replace=False) for _ in range(2)]
    for b in range(2):
        features[b, outliers[b]] *= 100
    rule = Norm(max_singleton_fraction=fraction, sample_size=100, sink_ratio=1e9, sink_share=1.0)
    landmarks = rule(Q, K, m, features=features, head_axis=-3)
    log_weights = np.asarray(landmarks.log_weights)
    assert log_weights.shape == (2, 2, m)
    expected = min(budget, 1 + high)
    one_token = log_weights == 0
    assert (one_token.sum(-1) == expected).all(), (one_token.sum(-1), expected, budget)
    assert one_token[..., m - expected:].all()  # the last slots
    assert (log_weights[~one_token] >= np.log(3.6)).all()
    for b, h in itertools.product(range(2), range(2)):
        singles = np.asarray(landmarks.keys)[b, h, m - expected:]
        allowed = np.concatenate([[0], outliers[b]])
        # Each singleton's key is the key of CLS or of a high-norm token; CLS is always one.
        matches = np.all(singles[:, None, :] == K[b, h, allowed][None, :, :], axis=-1)
        assert matches.any(axis=1).all() and matches[:, 0].any()


def test_norm_absolute_sink_share_makes_sinks_in_short_sequences():
    # With 12 real keys no key can take sink_ratio / n = 16/12 of a probe's attention: the absolute share alpha
    # (sink_share, default 0.25) is what lets a short sequence have a sink at all.
    Q, K, _ = qkv(26, shape=(1, 1, 12, 8))
    K[..., 5, :] = 10 * Q.mean(axis=-2)
    share = np.asarray(attention_share(array_api_compat.array_namespace(Q), Q, K, 8 ** -0.5, num_probes=8))
    assert share[0, 0, 5] > 0.25
    candidates, real, _ = norm_singletons(Q, K, 8, first=None)
    assert 5 in candidates[0][real[0]]
    candidates, real, _ = norm_singletons(Q, K, 8, first=None, sink_share=0.99)
    assert 5 not in candidates[0][real[0]]


def test_uniform_draws_every_subset_equally_often():
    # The landmarks page: every m-subset of the real tokens is equally likely. Seeds 0..2999 (deterministic) of 2 of 6
    # tokens, one padded away: 10 subsets of the 5 real ones, 300 draws expected each; chi-square with 9 degrees of
    # freedom, p above 0.001 (a rule that favoured low positions, as a sort of fewer keys than tokens would, fails).
    import scipy.stats

    Q, K, _ = qkv(27, shape=(1, 1, 6, 4))
    mask = np.arange(6) != 3
    counts = {}
    for seed in range(3000):
        picked = tuple(sorted(np.asarray(Uniform()(Q, K, 2, attn_mask=mask[None, None, None, :], seed=seed).indices)
                              .ravel().tolist()))
        counts[picked] = counts.get(picked, 0) + 1
    assert set(counts) == set(itertools.combinations([0, 1, 2, 4, 5], 2))
    assert scipy.stats.chisquare(list(counts.values())).pvalue > 1e-3  # measured 0.19


def test_the_host_fps_loop_keeps_numpy_blas_on_one_thread(monkeypatch):
    # OpenBLAS's workers spin after each product, and a flash-attention call right after the loop ran at half speed
    # on a 2-core machine (26 against 15 ms). Inside the loop numpy's BLAS has one thread; after it, what it had.
    from threadpoolctl import ThreadpoolController

    from nystrom.linalg.landmarks import fps

    blas = ThreadpoolController().select(user_api="blas")
    before = [lib["num_threads"] for lib in blas.info()]
    seen = []
    loop = fps._fps_host

    def recording(*args, **kwargs):
        seen.append([lib["num_threads"] for lib in ThreadpoolController().select(user_api="blas").info()])
        return loop(*args, **kwargs)

    monkeypatch.setattr(fps, "_fps_host", recording)
    farthest_point_sampling(torch.randn(2, 300, 8), 10)
    assert seen and all(threads == [1] * len(before) for threads in seen)
    assert [lib["num_threads"] for lib in ThreadpoolController().select(user_api="blas").info()] == before


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_kmeans_past_its_sample_is_the_same_without_a_mask_and_with_an_all_true_one(library):
    # Past the sample (s = 1,024 of 3,000 tokens) the unmasked path weights every sampled token by n / s itself, and
    # no test reached it: it must give the landmarks of an all-true mask bit for bit, and weights summing to n.
    rng = np.random.default_rng(0)
    Q, K = (rng.standard_normal((1, 2, 3000, 16)) for _ in range(2))
    mask = np.ones((1, 1, 1, 3000), dtype=bool)
    if library == "torch":
        Q, K, mask = (torch.from_numpy(x) for x in (Q, K, mask))
    plain, masked = KMeans()(Q, K, 32), KMeans()(Q, K, 32, attn_mask=mask)
    for name in ("queries", "keys", "log_weights"):
        np.testing.assert_array_equal(np.asarray(getattr(plain, name)), np.asarray(getattr(masked, name)))
    # float64: 32 weights of 3000/1024 each, summed; 1e-12 is a hundred times their rounding.
    np.testing.assert_allclose(np.exp(np.asarray(plain.log_weights)).sum(-1), 3000, rtol=1e-12)


def test_farthest_point_sampling_names_what_does_not_fit():
    # The public function read X, mask and guarantee_score unchecked: a 1-D X was an IndexError, D = 0 or a mask of
    # another length or dtype numpy's own errors, from_guaranteed=0 passed as False (a review).
    X = np.random.default_rng(0).standard_normal((2, 10, 3))
    for kwargs, error, match in [
        (dict(X=X[0, 0]), ValueError, r"X must have shape \(\.\.\., n, D\) with D >= 1, got \(3,\)"),
        (dict(X=X[..., :0]), ValueError, "D >= 1"),
        (dict(mask=np.ones(9, bool)), ValueError, r"mask must broadcast to X's points \(2, 10\)"),
        (dict(mask=np.ones(10, int)), TypeError, "mask must be a bool array"),
        (dict(guarantee_score=np.zeros((3, 10))), ValueError, "guarantee_score must broadcast"),
        (dict(from_guaranteed=0), TypeError, "from_guaranteed must be a bool"),
    ]:
        args = {"X": X, **kwargs}
        with pytest.raises(error, match=match):
            farthest_point_sampling(args.pop("X"), 3, **args)
    # A mask that broadcasts over the batch is taken.
    np.testing.assert_array_equal(farthest_point_sampling(X, 3, mask=np.ones((1, 10), bool)),
                                  farthest_point_sampling(X, 3))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8])
def test_gather_rows_takes_any_integer_index_for_one_sequence(dtype):
    # index_select takes int64 or int32 only: one sequence, with no batch offset to promote the index, refused int16
    # (a review, through nystrom_trace_error).
    from nystrom.linalg.landmarks.base import gather_rows

    X = torch.randn(1, 20, 4)
    idx = torch.tensor([[3, 0, 7]], dtype=dtype)
    xp = array_api_compat.array_namespace(X)
    torch.testing.assert_close(gather_rows(xp, X, idx), X[:, [3, 0, 7]], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_pivots=4, mask=np.arange(10) < 3, u=np.full(4, 0.5)), ValueError, "num_pivots=4 exceeds the 3 eligible"),
    (dict(num_pivots=3, u=np.full(2, 0.5)), ValueError, r"u must have shape \(3,\)"),
    (dict(num_pivots=3, u=np.full(3, 0.5), X=np.ones((10, 3), dtype=np.int64)), TypeError, "X must have dtype"),
    (dict(num_pivots=0, u=np.full(0, 0.5)), ValueError, "num_pivots"),
    # Draws outside [0, 1) silently took the first or last eligible point (a review).
    (dict(num_pivots=3, u=np.array([0.5, 5.0, 0.5])), ValueError, r"u must hold uniform draws in \[0, 1\)"),
    (dict(num_pivots=3, u=np.array([0.5, -0.1, 0.5])), ValueError, "u must hold uniform draws"),
    (dict(num_pivots=3, u=np.array([0.5, np.nan, 0.5])), ValueError, "u must hold uniform draws"),
])
def test_rpcholesky_pivots_checks_its_arguments(kwargs, error, match):
    # A review: more pivots than eligible points came back repeated and masked ([..., 0, 0]), a short u was an
    # IndexError, and integer points were taken.
    from nystrom.linalg.landmarks import rpcholesky_pivots

    X = kwargs.pop("X", np.random.default_rng(0).standard_normal((10, 3)))
    with pytest.raises(error, match=match):
        rpcholesky_pivots(X, scale=0.5, **kwargs)


def test_a_strategy_called_directly_warns_of_no_numpy_overflow():
    # A review: RPCholesky on keys of 1e10 (float64) warned of overflow in exp and of an invalid divide, an error
    # under -W error, where approximate() on the same inputs is quiet.
    Q = np.random.default_rng(0).standard_normal((1, 20, 4)) * 1e10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in sorted(STRATEGIES):
            nystrom.get_strategy(name)(Q, Q, 3, seed=0)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("distinct", [5, 12])
def test_kmeans_gives_a_repeated_seed_only_itself(library, distinct):
    # Fewer distinct tokens than clusters: farthest-point seeds repeat one another, and equal centroids tied for their
    # tokens, a tie that the product's rounding broke otherwise for a shard's rows than for the whole sequence's (a
    # review: 1.5e-3 between a sharded call and one process). Now a repeated seed's cluster is that seed alone, and
    # every other token joins the first cluster of its value, whatever rows the product saw.
    from nystrom.linalg.landmarks.kmeans import repeated_rows, sampled_kmeans

    rng = np.random.default_rng(distinct)
    values = rng.standard_normal((distinct, 8))
    X = values[rng.permutation(np.arange(96) % distinct)]
    if library == "torch":
        X = torch.from_numpy(X)
    xp = array_api_compat.array_namespace(X)
    labels = np.asarray(sampled_kmeans(xp, X, 16, iters=2).labels)
    assert sorted(np.unique(labels)) == list(range(16))
    sizes = np.bincount(labels, minlength=16)
    X = np.asarray(X)
    first_of_value = {}
    for j in range(16):
        value = X[labels == j][0].tobytes()
        assert all(row.tobytes() == value for row in X[labels == j])
        if value in first_of_value:
            assert sizes[j] == 1, (j, sizes)
        first_of_value.setdefault(value, j)
    assert len(first_of_value) == distinct and sizes.sum() == 96
    centroids = xp.asarray(X[[0, 1, 0, 2, 1]])
    assert np.asarray(repeated_rows(xp, centroids)).tolist() == [False, False, True, False, True]
    active = xp.asarray([False, True, True, True, True])
    assert np.asarray(repeated_rows(xp, centroids, active)).tolist() == [False, False, False, False, True]


def test_a_local_peak_never_takes_a_sinks_singleton_slot():
    # Key 20 is a local peak: the whole attention of 3 of the 8 probes (it fails the quorum of half), a mean share of
    # 0.38; key 40 is a sink, about 0.42 of 5 of the 8 probes (it passes), a smaller mean share. With m = 8 the budget
    # is 2: CLS and the sink. When the quorum read only the top candidates by share, the peak took the slot, failed,
    # and the sink was left to the clusters (a review).
    n, d = 64, 16
    g = torch.Generator().manual_seed(0)
    K = 0.1 * torch.randn(1, 1, n, d, generator=g)
    K[..., 20, :], K[..., 40, :] = 0, 0
    K[..., 20, 0], K[..., 40, 1] = 1, 1
    Q = 0.1 * torch.randn(1, 1, n, d, generator=g)
    Q[..., 1] += 16.0
    for rows in (range(7, 12), range(16, 21), range(25, 30)):
        Q[..., list(rows), :] = 0.1 * torch.randn(1, 1, len(rows), d, generator=g)
        Q[..., list(rows), 0] = 40.0
    candidates, real, budget = norm_singletons(Q, K, 8)
    assert budget == 2 and sorted(candidates[real].tolist()) == [0, 40]


def test_features_of_median_norm_zero_force_only_the_nonzero_tokens():
    # Most feature rows 0 (a median of 0): every token passed norm >= ratio * median, zeros included, ahead of the
    # sinks (a review). Only positive norms stand out: the 3 nonzero rows, then CLS first.
    n = 64
    g = torch.Generator().manual_seed(0)
    Q, K = (torch.randn(1, 1, n, 8, generator=g) for _ in range(2))
    features = torch.zeros(1, n, 16)
    features[0, [5, 17, 33]] = torch.randn(3, 16, generator=g)
    candidates, real, budget = norm_singletons(Q, K, 32, features=features)
    assert budget == 8 and sorted(candidates[real].tolist()) == [0, 5, 17, 33]


def test_attention_share_checks_its_arguments_by_name():
    # The public probe estimate had no checks (a review): a transformers (B, n) mask of (B, H, n, d) inputs with
    # B == H was read with B as the head axis (0.34 of a head's share on padding), others failed inside torch.
    from nystrom.linalg.landmarks import attention_share

    g = torch.Generator().manual_seed(0)
    Q, K = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(2))
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 6\) .* is ambiguous"):
        attention_share(torch, Q, K, 0.5, mask=mask)
    share = attention_share(torch, Q, K, 0.5, mask=mask[:, None, :].long())  # torch itself as xp; a 0/1 mask
    assert float(share[0, :, 4:].abs().max()) == 0 and torch.allclose(share.sum(-1), torch.ones(2, 2))
    for call, error, match in [
        (lambda: attention_share(torch, Q, K[..., :3], 0.5), ValueError, "Q and K must be"),
        (lambda: attention_share(torch, Q, K.long(), 0.5), TypeError, "K must have dtype"),
        (lambda: attention_share(torch, Q, K, 0.0), ValueError, "scale"),
        (lambda: attention_share(torch, Q, K, 0.5, num_probes=0), ValueError, "num_probes"),
        (lambda: attention_share(torch, Q, K, 0.5, mask=torch.ones(2, 1, 5, dtype=torch.bool)), ValueError,
         "mask must have shape"),
    ]:
        with pytest.raises(error, match=match):
            call()


def test_fps_first_past_the_queries_of_cross_attention_guarantees_no_query():
    # first counts among the keys and, for the landmark queries of cross-attention, among the queries: with 4 queries
    # first=5 guarantees none of them (as norm, which never guarantees a query) instead of raising "not a token
    # position for n=4" (a review).
    g = torch.Generator().manual_seed(0)
    Q, K = torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g)
    landmarks = nystrom.FPS(first=5)(Q, K, 3, head_axis=-3)
    assert 5 in landmarks.indices.tolist()[0][0]
    torch.testing.assert_close(landmarks.query_indices, nystrom.FPS(first=None)(Q, K, 3, head_axis=-3).query_indices)
    # Within the queries it still counts among them.
    assert nystrom.FPS(first=2)(Q, K, 3, head_axis=-3).query_indices[0, 0, 0] == 2
