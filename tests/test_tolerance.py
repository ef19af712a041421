"""``approximate(tol=...)``: m grows until the estimated error's upper bound is at most ``tol``."""

import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nystrom
import nystrom.linalg.tolerance
from nystrom.linalg.bounds import ErrorEstimate
from nystrom.linalg.flops import exact_attention_flops, nystrom_attention_flops
from nystrom.linalg.tolerance import (
    EXACT,
    FASTEST_FALL,
    NEAR_MISS,
    SAMPLED_ROWS,
    crossover,
    nystrom_pays,
    search_landmarks,
    search_range,
    solve_flops,
)


def smooth_tokens(seed, side=24, width=48):
    # Tokens on a grid with smooth features: low effective rank, so a modest m reaches a few per cent.
    rng = np.random.default_rng(seed)
    axis = np.linspace(0, 1, side)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    X = np.cos(grid @ (3 * rng.standard_normal((2, width))) + rng.uniform(0, 6.3, width))
    return tuple(X @ rng.standard_normal((width, width)) / 2 for _ in range(3))


def clustered_tokens(seed, n=600, d=32):
    rng = np.random.default_rng(seed)
    X = 2 * rng.standard_normal((12, d))[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, d))
    return tuple(X @ rng.standard_normal((d, d)) / 6 for _ in range(3))


def relative_error(out, Q, K, V, attn_mask=None, real=None):
    # Over the real rows only when ``real`` (a bool key mask (B, 1, 1, n)) is given: padded rows are nobody's output.
    exact = nystrom.exact_attention(Q, K, V, attn_mask=attn_mask)
    keep = 1.0 if real is None else np.asarray(real)[:, :, 0, :, None]
    return float(np.linalg.norm((out - exact) * keep) / np.linalg.norm(exact * keep))


@pytest.mark.parametrize("tokens", [smooth_tokens, clustered_tokens])
@pytest.mark.parametrize("tol", [0.05, 0.1, 0.2])
def test_the_returned_error_is_within_tol(tokens, tol):
    # Measured on these two families, 5 seeds each, tol 0.05 / 0.1 / 0.2: the bound reached tol in all 30 cases
    # and the true error was within tol in all 30; these 12 cases are a deterministic subset. (Gaussian tokens,
    # full rank, never reach 0.2 where Nyström attention pays: the call returns exact attention, as tested below.)
    # The threshold is tol itself, the promise: measured true error at most 0.86 tol over these 12 (0.79 over the other
    # 18). The doubling lands below tol, so an interval half as wide, or of width 0, still passes (at most 0.95 tol); an
    # estimate biased low by 4x fails 4 of the 12 (1.7 tol). Interval widths are tested in test_bounds' coverage tests.
    for seed in (0, 1):
        Q, K, V = tokens(seed)
        out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=tol, seed=seed, return_info=True)
        assert info.tol_steps[-1].estimate.high <= tol
        assert relative_error(out, Q, K, V) <= tol


def test_m_grows_from_num_landmarks_and_stops_at_the_first_bound_within_tol():
    # m doubles, but by sqrt(2) after a step whose estimate is within NEAR_MISS times tol.
    Q, K, V = smooth_tokens(0)
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=0.05, return_info=True)
    ms = [step.m for step in info.tol_steps]
    grown = [round(step.m * (math.sqrt(2) if step.estimate.estimate <= NEAR_MISS * 0.05 else 2))
             for step in info.tol_steps[:-1]]
    assert ms[0] == 8 and ms[1:] == grown and len(ms) > 1
    assert all(step.estimate.high > 0.05 for step in info.tol_steps[:-1])
    assert info.landmarks.keys.shape[-2] == ms[-1]
    # The output is the plain call at the final m.
    np.testing.assert_array_equal(out, nystrom.approximate(Q, K, V, num_landmarks=ms[-1]))


@pytest.mark.parametrize(("near", "expected"), [(1.04, [16, 23, 46]), (1.06, [16, 32, 64])])
def test_a_step_near_tol_grows_m_by_root_2(near, expected):
    # An estimate within NEAR_MISS (1.05) times tol: the doubling would overshoot the m that meets tol, so m grows by
    # sqrt(2) (16 -> 23); one past it doubles. The bound at 23 is still above tol, so the next step doubles again.
    tol = 0.1

    def estimate(m):
        value = {16: near * tol, 23: 1.5 * tol, 32: 1.5 * tol}.get(m, 0.5 * tol)
        return ErrorEstimate(value, value / 1.1, value * 1.1, 0.95, 128)

    _, steps = search_landmarks(lambda m, solver: m, estimate, 16, 128, tol, False, nystrom.NewtonSchulz(),
                                exact=lambda: None, keys=1000)
    assert [step.m for step in steps] == expected


def test_each_step_computes_its_output_at_the_sampled_rows_only(monkeypatch):
    # The whole output, n_q rows, is computed once, for the step returned; every step before it only at the 128 rows
    # of the estimate (about half a step's FLOPs at n_q = n).
    import nystrom.approximation
    import nystrom.linalg.tolerance

    rows = []
    output = nystrom.approximation.nystrom_output

    def counted(xp, Q, factors, attend):
        rows.append(Q.shape[-2])
        return output(xp, Q, factors, attend)

    # The search's steps and approximate's whole output.
    monkeypatch.setattr(nystrom.linalg.tolerance, "nystrom_output", counted)
    monkeypatch.setattr(nystrom.approximation, "nystrom_output", counted)
    Q, K, V = smooth_tokens(0)
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=0.05, return_info=True)
    assert len(info.tol_steps) > 2
    # The step within tol computes its output once more, at its census of largest interpolation weights.
    *step_rows, census_rows, whole = rows
    assert step_rows == [SAMPLED_ROWS] * len(info.tol_steps)
    assert SAMPLED_ROWS < census_rows == info.tol_steps[-1].estimate.num_samples <= SAMPLED_ROWS + SAMPLED_ROWS // 8
    assert whole == Q.shape[-2]
    np.testing.assert_array_equal(out, nystrom.approximate(Q, K, V, num_landmarks=info.tol_steps[-1].m))


def test_the_sink_analysis_runs_once_per_search(monkeypatch):
    # The probes' attention does not depend on m: every step of a search reads the first step's, and the landmarks
    # are still those of a plain call at the returned m (the output is, bit for bit).
    calls = []
    analysis = nystrom.Norm.analysis

    def counted(self, selection):
        calls.append(selection.num_landmarks)
        return analysis(self, selection)

    monkeypatch.setattr(nystrom.Norm, "analysis", counted)
    Q, K, V = (np.stack([x, x[::-1]])[:, None] for x in smooth_tokens(0))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=0.05, return_info=True)
    assert len(info.tol_steps) > 2 and calls == [8]
    np.testing.assert_array_equal(out, nystrom.approximate(Q, K, V, num_landmarks=info.tol_steps[-1].m))
    assert len(calls) == 2


def test_what_the_steps_shared_is_freed_before_the_whole_output(monkeypatch):
    # The memo holds float32 features (a copy of K for half-precision inputs) and the probes' attention: the
    # search's steps share it, the whole output of the returned step does not need it. The selections are those the
    # search resized: a scan of the garbage collector's objects met, in one CI run, a Selection without a memo that an
    # earlier test in the same worker had left half-built (not reproduced with the files in order, alone).
    import nystrom.approximation
    import nystrom.linalg.tolerance
    from nystrom.linalg.landmarks import Selection

    searched, held = [], []
    output, resized = nystrom.approximation.nystrom_output, Selection.resized

    def recorded(self, num_landmarks):
        searched.append(self)
        return resized(self, num_landmarks)

    def counted(xp, Q, factors, attend):
        held.append(sum(len(selection.memo) for selection in searched))
        return output(xp, Q, factors, attend)

    monkeypatch.setattr(Selection, "resized", recorded)
    monkeypatch.setattr(nystrom.linalg.tolerance, "nystrom_output", counted)
    monkeypatch.setattr(nystrom.approximation, "nystrom_output", counted)
    Q, K, V = smooth_tokens(0)
    nystrom.approximate(Q, K, V, num_landmarks=8, tol=0.05)
    assert searched and held[0] > 0 and held[-1] == 0


def test_an_unreachable_tol_warns_or_raises_at_max_landmarks():
    Q, K, V = smooth_tokens(0)
    with pytest.warns(UserWarning, match="tol=0.0001 not reached, max_landmarks=32 reached") as caught:
        out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=1e-4, max_landmarks=32, return_info=True)
    # The warning points at the caller's line, not inside the library.
    assert caught[0].filename == __file__
    # Doubling to the cap with six Newton-Schulz steps, then the escalation (ten steps) at the cap, which fails
    # too and stops the descent; the step with the lowest bound is returned and listed again.
    *tried, returned = info.tol_steps
    assert [step.m for step in tried] == [8, 16, 32, 32]
    assert [step.solver for step in tried] == [nystrom.NewtonSchulz()] * 3 + [nystrom.NewtonSchulz(iters=10)]
    assert returned == min(tried, key=lambda step: step.estimate.high)
    with pytest.raises(RuntimeError, match="tol=0.0001 not reached"):
        nystrom.approximate(Q, K, V, num_landmarks=8, tol=1e-4, max_landmarks=32, strict_tol=True)


def test_a_bound_that_stops_falling_returns_the_best_step():
    # A truncated pseudo-inverse (cut-off 3e-2) leaves an error floor of about 2 % here: doubling m past it does
    # not help, and after two doublings without a lower bound the search stops. PInv does not escalate. A budget
    # of m below the real keys rules exact attention out, so the miss warns.
    Q, K, V = smooth_tokens(0, side=32, width=64)
    solver = nystrom.PInv(rtol=3e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = nystrom.approximate(Q, K, V, num_landmarks=16, tol=0.005, solver=solver, max_landmarks=512,
                                        return_info=True)
    assert any("stopped falling after m=" in str(w.message) and "the floor of PInv(rtol=0.03): another cut-off" in
               str(w.message) for w in caught)
    *tried, returned = info.tol_steps
    best = min(tried, key=lambda step: step.estimate.high)
    assert returned == best and tried[-3] == best
    assert all(step.estimate.high >= best.estimate.high for step in tried[-2:])
    assert {step.solver for step in info.tol_steps} == {solver}
    np.testing.assert_array_equal(out, nystrom.approximate(Q, K, V, num_landmarks=best.m, solver=solver))


def test_the_newton_schulz_floor_escalates_to_more_steps():
    # Six Newton-Schulz steps stall at about 2.5 % (bounds 0.024, 0.026, 0.033 at m = 128, 256, 512). Ten steps
    # at the m already tried, from the largest down, reach 0.005 at 512 and 256 but not 128: m = 256 is returned.
    # (A budget of 512 lets m grow past where Nyström attention pays, and makes the search escalate.)
    Q, K, V = smooth_tokens(0, side=32, width=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: tol is met
        out, info = nystrom.approximate(Q, K, V, num_landmarks=16, tol=0.005, max_landmarks=512, return_info=True)
    six, ten = nystrom.NewtonSchulz(), nystrom.NewtonSchulz(iters=10)
    doubling = [step for step in info.tol_steps if step.solver == six]
    escalation = [step for step in info.tol_steps[:-1] if step.solver == ten]
    assert [step.m for step in doubling] == [16, 32, 64, 128, 256, 512]
    assert [step.m for step in escalation] == [512, 256, 128]
    assert all(step.estimate.high > 0.005 for step in doubling)
    assert [step.estimate.high <= 0.005 for step in escalation] == [True, True, False]
    returned = info.tol_steps[-1]
    assert returned == escalation[1] and info.solver_iterations == 10
    assert relative_error(out, Q, K, V) <= 0.005  # the promise; measured 0.0022
    np.testing.assert_array_equal(out, nystrom.approximate(Q, K, V, num_landmarks=256, solver=ten))


def test_tol_counts_only_real_rows_of_padded_sequences():
    Q, K, V = (torch.from_numpy(np.repeat(a[None, None], 2, 0)) for a in smooth_tokens(1))
    mask = torch.ones(2, 1, 1, Q.shape[-2], dtype=torch.bool)
    mask[1, ..., 400:] = False
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=0.1, attn_mask=mask, return_info=True)
    assert info.tol_steps[-1].estimate.high <= 0.1
    exact = nystrom.exact_attention(Q, K, V, attn_mask=mask)
    real = mask[:, 0, 0, :, None]
    assert float(((out - exact) * real).norm() / (exact * real).norm()) <= 0.1  # the promise; measured 0.069


def padded_batch(seed, lengths, side=16):
    # Smooth tokens per sequence (n = side**2), each sequence padded after its own length with junk values.
    rng = np.random.default_rng(seed)
    tokens = [smooth_tokens(seed * 10 + b, side=side) for b in range(len(lengths))]
    Q, K, V = (torch.from_numpy(np.stack([t[i] for t in tokens])[:, None]) for i in range(3))
    mask = torch.zeros(len(lengths), 1, 1, side * side, dtype=torch.bool)
    for b, length in enumerate(lengths):
        mask[b, ..., :length] = True
        K[b, :, length:] = torch.from_numpy(50 * rng.standard_normal((side * side - length, K.shape[-1])))
    return Q, K, V, mask


def test_the_error_is_within_tol_at_the_stated_rate():
    # Property: over families where the exact error is cheap (smooth, clustered and padded smooth tokens, 8 seeds,
    # 3 tols: 72 calls), no call warns (a miss is answered by exact attention), and the true error is within tol at
    # least at the interval's 95 %: 69 of 72 (three misses; binomial std of 72 calls at 95 %: 1.85 calls). Measured:
    # 72 / 72 within tol (true error at most 0.86 tol, median 0.33), 22 of them by exact attention (at most 24: the
    # rest must stay Nyström answers, or this would not test the interval). Since the doubling lands well below tol,
    # only a biased estimate fails the floor (one 4x low: 49 / 72); a narrower interval does not (half as wide or width
    # 0: 72 / 72, 19 and 16 exact answers), which test_bounds' coverage tests catch instead.
    within, exact = 0, 0
    for seed in range(8):
        padded = padded_batch(seed, (256, 200 - 10 * seed))
        cases = [(*smooth_tokens(seed, side=16), None), (*clustered_tokens(seed, n=256), None), padded]
        for Q, K, V, mask in cases:
            for tol in (0.05, 0.1, 0.2):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=tol, attn_mask=mask, seed=seed,
                                                    return_info=True)
                assert info.tol_steps[-1].estimate.high <= tol
                exact += info.tol_steps[-1].solver == "exact"
                within += relative_error(np.asarray(out), *(np.asarray(x) for x in (Q, K, V)),
                                         attn_mask=None if mask is None else np.asarray(mask), real=mask) <= tol
    assert within >= 0.95 * 72 and exact <= 72 / 3


def test_a_heavy_tail_of_row_errors_does_not_pass_tol_unseen():
    # Sharply clustered tokens with norm landmarks: at m = 16 the true error is 0.0534 and ten of 1,024 rows hold 41 %
    # of its square. With tol = 0.05 a sample of 128 rows that misses them put the bound below tol: 9 of 60 seeds
    # answered outside tol before the rows of largest interpolation weights confirmed such a bound (8 of them at
    # m = 16); with the confirmation 1 of 60 (and 1 of these 40, against 6; 0 of these 40 since m grows by sqrt(2)
    # near tol). Pinned at 2 of 40, the interval's 5 %.
    from nystrom.experiments.coverage_report import synthetic_inputs

    Q, K, V, _ = synthetic_inputs()["sharp clusters"]
    exact = torch.nn.functional.scaled_dot_product_attention(Q, K, V)
    outside = 0
    for seed in range(40):
        out = nystrom.approximate(Q, K, V, num_landmarks=16, tol=0.05, seed=seed)
        outside += float(torch.linalg.norm(out - exact) / torch.linalg.norm(exact)) > 0.05
    assert outside <= 2


def test_isolated_tokens_do_not_pass_tol_unseen():
    # A review's family: 10 isolated tokens among 8 tight clusters hold most of the error, and 128 sampled rows miss
    # them all about a quarter of the time: tol = 0.1 answered 0.33-0.76 in 40 of 100 seeds (10 of these 20). With
    # the queries the landmarks do not represent sampled apart, 2 of 100 (1 of these 20, seed 18: 0.45 at m = 16);
    # with the self-attending queries apart too, none of 100 (python docs/scripts/isolated_tokens.py). Pinned at 1 of
    # 20, a margin for another machine's rounding at a bound near tol.
    from nystrom.experiments.coverage_report import isolated_tokens

    outside = 0
    for seed in range(20):
        X, V = isolated_tokens(seed)
        exact = nystrom.exact_attention(X, X, V)
        out = nystrom.approximate(X, X, V, num_landmarks=8, tol=0.1)
        outside += float(np.linalg.norm(out - exact) / np.linalg.norm(exact)) > 0.1
    assert outside <= 1


@pytest.mark.parametrize("lengths", [(256, 37), (12, 256, 90), (9, 9)])
def test_m_never_exceeds_the_real_keys_of_any_sequence(lengths):
    # A tol no m reaches: without a budget the search ends in exact attention, recorded at m = the real keys of the
    # shortest sequence, and no step tries more; with a budget below them every step, the escalation's included,
    # stays within it, the call warns, and no landmark of a token-picking strategy sits on padding.
    Q, K, V, mask = padded_batch(0, lengths)
    shortest = min(lengths)
    first = min(4, shortest)
    exact = nystrom.exact_attention(Q, K, V, attn_mask=mask)
    real = mask[:, 0, 0, :, None]
    for strategy in ("norm", "fps"):
        out, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=first, tol=1e-6, attn_mask=mask,
                                        return_info=True)
        assert info.tol_steps[-1].solver == "exact" and info.tol_steps[-1].m == shortest
        assert max(step.m for step in info.tol_steps) == shortest and info.landmarks is None
        # float64 exact attention, batched over sequences of other lengths: sums in another order, measured 1.8e-14 at
        # outputs up to 8.4 (10 eps |O|); 2e-13 is 11x (rtol=1e-12, atol=1e-12 before, up to 1e-11 here).
        torch.testing.assert_close(out * real, exact * real, rtol=0, atol=2e-13)
        with pytest.warns(UserWarning, match="not reached"):
            out, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=first, tol=1e-6,
                                            max_landmarks=shortest - 1, attn_mask=mask, return_info=True)
        assert max(step.m for step in info.tol_steps) == shortest - 1
        assert info.landmarks.keys.shape[-2] <= shortest - 1
        if info.landmarks.indices is not None:
            assert bool(torch.all(torch.gather(mask[:, 0, 0], -1, info.landmarks.indices[:, 0])))
        with pytest.raises(ValueError, match="max_landmarks must be between"):
            nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=first, tol=0.1,
                                max_landmarks=shortest + 1, attn_mask=mask)


def test_a_miss_is_answered_by_exact_attention_without_a_warning():
    # Smooth tokens, n = 1,024, d = 64: Nyström attention with six Newton-Schulz steps takes at most half the FLOPs
    # of exact attention up to m = 111, so the doubling may go 16, 32, 64 (128 would cost more). The bound is 0.082
    # at m = 32, 0.044 at 64: 1e-4 is out of reach, and the search gives up at 32 (0.02 below, where it goes on).
    # The answer is exact attention, error 0, with no escalation.
    Q, K, V = smooth_tokens(0, side=32, width=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = nystrom.approximate(Q, K, V, num_landmarks=16, tol=1e-4, return_info=True)
    *tried, returned = info.tol_steps
    assert [(step.m, step.solver) for step in tried] == [(m, nystrom.NewtonSchulz()) for m in (16, 32)]
    assert returned.solver == "exact" and returned.m == 1024 and returned.estimate.high == 0
    assert info.landmarks is None and info.flops["total"] == info.exact_flops
    assert "exact attention" in repr(info)
    # The same exact-attention call: equal (measured; 1e-12 before).
    np.testing.assert_array_equal(out, nystrom.exact_attention(Q, K, V))


@pytest.mark.parametrize("highs, tol, tried", [
    # Falls of 1.25x per doubling: even 2.5x per doubling from 32 leaves 0.064 at 128, so it gives up at 32.
    ((0.5, 0.4, 0.3, 0.2), 0.05, (16, 32)),
    # A 2x fall from 16 to 32: 4x per doubling could reach 0.016 at 128; from 64 (a 4.2x fall) 0.007: it goes on.
    ((0.5, 0.25, 0.06, 0.04), 0.05, (16, 32, 64, 128)),
    # The first step alone says nothing of the fall: never a give-up there.
    ((0.9, 0.05), 0.05, (16, 32)),
])
def test_the_doubling_gives_up_once_tol_is_out_of_reach(highs, tol, tried):
    def estimate(m):
        high = dict(zip((16, 32, 64, 128), highs))[m]
        return ErrorEstimate(high, high, high, 0.95, 128)

    result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 128, tol, False, nystrom.NewtonSchulz(),
                                     exact=lambda: "exact", keys=1000)
    assert tuple(step.m for step in steps if step.solver != EXACT) == tried
    assert result == ("exact" if highs[len(tried) - 1] > tol else tried[-1])
    # With a budget (no exact answer) the doubling never gives up: it runs to the budget, then warns.
    with pytest.warns(UserWarning) if highs[-1] > tol else warnings.catch_warnings():
        _, budgeted = search_landmarks(lambda m, solver: m, estimate, 16, 128, tol, False, nystrom.PInv())
    assert tuple(step.m for step in budgeted) == (16, 32, 64, 128)[:len(highs)]


def test_two_doublings_without_a_lower_bound_stop_the_search():
    # The solver's floor: 32 is the best bound, 64 and 128 do not lower it, so 256 (which would meet tol) is never
    # tried; the best step is returned, listed again, and the warning names where the error stopped falling.
    highs = {16: 0.5, 32: 0.3, 64: 0.35, 128: 0.31, 256: 0.01}

    def estimate(m):
        return ErrorEstimate(highs[m], highs[m], highs[m], 0.95, 128)

    with pytest.warns(UserWarning, match="the error stopped falling after m=32"):
        result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 256, 0.1, False, nystrom.PInv())
    assert [step.m for step in steps] == [16, 32, 64, 128, 32] and result == 32
    # One doubling without a lower bound is no stall: 128 lowers it again, and 256 meets tol.
    highs[128] = 0.29
    result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 256, 0.1, False, nystrom.PInv())
    assert [step.m for step in steps] == [16, 32, 64, 128, 256] and result == 256


def test_the_range_at_the_crossover_and_the_sampled_rows():
    # nystrom_pays's docstring: six Newton-Schulz steps at n = 1,370, d = 64 pay (half of exact attention's FLOPs)
    # up to m = 138, so a search from 16 doubles to 128.
    pays = nystrom_pays(1370, 1370, 64, 64)
    assert crossover(1370, pays, nystrom.NewtonSchulz()) == 138
    assert search_range(16, 1370, 1370, None, pays, nystrom.NewtonSchulz()) == (128, True)
    # At most SAMPLED_ROWS queries: the estimate's exact rows would be all of them, so exact attention answers at once;
    # one query more and the search runs.
    assert search_range(16, 1370, SAMPLED_ROWS, None, pays, nystrom.NewtonSchulz()) == (0, True)
    assert search_range(16, 1370, SAMPLED_ROWS + 1, None, nystrom_pays(SAMPLED_ROWS + 1, 1370, 64, 64),
                        nystrom.NewtonSchulz())[0] > 0
    # A budget below the keys caps m and rules exact attention out.
    assert search_range(16, 1370, 1370, 100, pays, nystrom.NewtonSchulz()) == (100, False)


@pytest.mark.parametrize("highs, answer", [
    # Met at 64 after a miss at 32: the mid-point 45 meets tol too and answers.
    ({16: 0.5, 32: 0.2, 45: 0.09, 64: 0.06}, 45),
    # The mid-point misses: 64 answers, listed again last.
    ({16: 0.5, 32: 0.2, 45: 0.12, 64: 0.06}, 64),
])
def test_refine_tries_the_mid_point_of_the_last_doubling(highs, answer):
    def estimate(m):
        return ErrorEstimate(highs[m], highs[m], highs[m], 0.95, 128)

    result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 128, 0.1, False, nystrom.NewtonSchulz(),
                                     exact=lambda: "exact", keys=1000, refine=True)
    assert result == answer and steps[-1].m == answer
    assert [step.m for step in steps] == [16, 32, 64, 45] + ([64] if answer == 64 else [])
    # Without refine, or where the first step meets tol (no miss below it), no mid-point is tried.
    _, plain = search_landmarks(lambda m, solver: m, estimate, 16, 128, 0.1, False, nystrom.NewtonSchulz(),
                                exact=lambda: "exact", keys=1000)
    assert [step.m for step in plain] == [16, 32, 64]
    _, first = search_landmarks(lambda m, solver: m, estimate, 64, 128, 0.1, False, nystrom.NewtonSchulz(),
                                exact=lambda: "exact", keys=1000, refine=True)
    assert [step.m for step in first] == [64]


@given(st.sampled_from([4, 8, 16]), st.integers(2, 5), st.floats(0.5, 4.0), st.floats(0.2, 1.5), st.data())
@settings(max_examples=60, deadline=None)
def test_refine_overshoots_the_smallest_m_by_under_root_2_on_falling_bounds(first, doublings, scale, power, data):
    # A bound that falls with m, scale * m^-power: where the doubling meets tol at m after a miss at m', the m
    # returned overshoots the smallest integer m* within tol by less than sqrt(m / m') (sqrt 2), not by m / m'.
    def estimate(m):
        high = scale * m ** -power
        return ErrorEstimate(high, high, high, 0.95, 128)

    # tol between the bounds of two successive doublings, so that every example meets it after a miss.
    met = first * 2 ** data.draw(st.integers(1, doublings))
    tol = estimate(met).high + data.draw(st.floats(0.05, 0.95)) * (estimate(met // 2).high - estimate(met).high)
    largest = first * 2**doublings
    # The doubling alone: no step grows by sqrt(2) near tol.
    with mock.patch.object(nystrom.linalg.tolerance, "NEAR_MISS", 0.0):
        result, steps = search_landmarks(lambda m, solver: m, estimate, first, largest, tol, False,
                                         nystrom.NewtonSchulz(), exact=lambda: None, keys=10**6, refine=True)
    tried = [step.m for step in steps]
    # The doubling's steps grow; the mid-point and the returned step listed again come after them.
    doubling = tried[:next((i for i in range(1, len(tried)) if tried[i] <= tried[i - 1]), len(tried))]
    assert doubling[-2:] == [met // 2, met]
    # The smallest integer within tol, exactly: from the rounded root, up while above tol and down while below (no
    # fudge in the rounding, which could set it one too high and loosen the ratio below).
    smallest = max(1, math.ceil((scale / tol) ** (1 / power)))
    while estimate(smallest).high > tol:
        smallest += 1
    while smallest > 1 and estimate(smallest - 1).high <= tol:
        smallest -= 1
    assert result / smallest < math.sqrt(2)
    assert result <= met and estimate(result).high <= tol


def test_a_nan_estimate_is_never_within_tol():
    # A NaN bound (a non-finite output, or exact rows that overflowed) is no evidence: with exact attention allowed
    # the search ends there; with a budget it warns, and a finite step is returned where there is one.
    highs = {16: float("nan"), 32: float("nan"), 64: 0.01}

    def estimate(m):
        return ErrorEstimate(highs[m], highs[m], highs[m], 0.95, 128)

    result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 32, 0.1, False, nystrom.NewtonSchulz(),
                                     exact=lambda: "exact", keys=100)
    assert result == "exact" and steps[-1].solver == EXACT
    result, steps = search_landmarks(lambda m, solver: m, estimate, 16, 64, 0.1, False, nystrom.PInv())
    assert result == 64 and [step.m for step in steps] == [16, 32, 64]
    with pytest.warns(UserWarning, match="tol=0.1 not reached"):
        search_landmarks(lambda m, solver: m, estimate, 16, 32, 0.1, False, nystrom.PInv())


def test_an_exact_answer_to_cross_attention_records_every_real_key():
    # 100 queries over 300 keys: at most 100 landmarks, but exact attention reads all 300 keys.
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((1, 100, 16)), rng.standard_normal((1, 300, 16)), rng.standard_normal((1, 300, 16))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=1e-6, return_info=True)
    assert info.tol_steps[-1].solver == EXACT and info.tol_steps[-1].m == 300
    np.testing.assert_array_equal(out, nystrom.exact_attention(Q, K, V))  # the same call: equal (1e-12 before)


def test_a_cross_attention_budget_below_the_real_keys_rules_exact_attention_out():
    # 100 queries over 300 keys: the budget is at most n_q = 100, below the 300 real keys, so exact attention is out
    # as the docstring says; a budget of n_q was compared with min(real keys, n_q) and answered exactly (review).
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((1, 100, 16)), rng.standard_normal((1, 300, 16)), rng.standard_normal((1, 300, 16))
    for budget in (99, 100):
        with pytest.warns(UserWarning, match="not reached"):
            _, info = nystrom.approximate(Q, K, V, num_landmarks=8, tol=1e-6, max_landmarks=budget, return_info=True)
        assert info.landmarks is not None
        assert all(step.solver != EXACT and step.m <= budget for step in info.tol_steps)


@settings(max_examples=200, deadline=None)
@given(highs=st.lists(st.floats(1e-3, 1.0), min_size=4, max_size=4), tol=st.sampled_from([0.01, 0.05, 0.1, 0.2]))
# A bound that rose over the last doubling: the fall assumed for the rest is FASTEST_FALL itself, not less (0.4 / 2^2
# is within 0.1, so no give-up at 32, and 64 meets tol; an assumed fall of 0.5 * 2 gave up).
@example(highs=[0.2, 0.4, 0.1, 0.05], tol=0.1)
def test_a_give_up_happens_only_where_tol_is_out_of_reach_at_the_fastest_fall(highs, tol):
    # Property of the rule the docs state: the search gives up at step i >= 1 only where
    # h_i / (FASTEST_FALL * max(h_{i-1} / h_i, 1))^k > tol, so a later step within tol means a faster fall than that
    # from i on; without a give-up it returns what the doubling without the rule returns.
    ms = (16, 32, 64, 128)
    bound = dict(zip(ms, highs))

    def estimate(m):
        return ErrorEstimate(bound[m], bound[m], bound[m], 0.95, 128)

    def attempt(m, solver):
        return m

    # The doubling alone: no step grows by sqrt(2) near tol.
    with mock.patch.object(nystrom.linalg.tolerance, "NEAR_MISS", 0.0):
        _, steps = search_landmarks(attempt, estimate, 16, 128, tol, False, nystrom.NewtonSchulz(),
                                    exact=lambda: "exact", keys=1000)
        tried = [step.m for step in steps if step.solver != EXACT]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, full = search_landmarks(attempt, estimate, 16, 128, tol, False, nystrom.NewtonSchulz())
    doubled = [step.m for step in full if step.solver == nystrom.NewtonSchulz()]
    doubled = doubled[:next((i for i in range(1, len(doubled)) if doubled[i] <= doubled[i - 1]), len(doubled))]
    assert tried == doubled[:len(tried)] and len(tried) >= min(2, len(doubled))
    if len(tried) < len(doubled):
        i = len(tried) - 1
        last_fall = FASTEST_FALL * max(highs[i - 1] / highs[i], 1.0)
        assert highs[i] / last_fall ** (len(ms) - 1 - i) > tol
        for j in range(i + 1, len(ms)):
            if highs[j] <= tol:
                assert (highs[i] / highs[j]) ** (1 / (j - i)) > last_fall
    else:
        assert steps[-1].m == full[-1].m or full[-1].estimate.high > tol


@pytest.mark.parametrize("n, num_landmarks", [(6, 6), (20, 8), (200, 64)])
def test_exact_attention_answers_at_once_where_nystrom_cannot_pay(n, num_landmarks):
    # n <= 128: the estimate's 128 exact rows would be every query row, exact attention itself. n = 200, d = 48:
    # Nyström attention with six Newton-Schulz steps takes at most half the FLOPs of exact attention only up to
    # m = 29, below the 64 asked for. Either way the search makes no Nyström step and samples no row.
    Q, K, V = (x[:n] for x in smooth_tokens(0))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=num_landmarks, tol=0.2, return_info=True)
    assert [(step.m, step.solver) for step in info.tol_steps] == [(n, "exact")]
    np.testing.assert_array_equal(out, nystrom.exact_attention(Q, K, V))  # the same call: equal (1e-12 before)


def test_a_padded_batch_of_few_real_rows_is_answered_exactly_at_once():
    # At most 128 real query rows: the estimate's exact rows would be all of them, as for an unpadded input of that
    # length; the padded one ran the Nyström search all the same, and returned an approximation beside the exact rows
    # it had computed (a review).
    Q, K, V, mask = padded_batch(0, (120, 100))
    out, info = nystrom.approximate(Q, K, V, attn_mask=mask, num_landmarks=8, tol=0.2, return_info=True)
    assert [(step.m, step.solver) for step in info.tol_steps] == [(100, "exact")]
    # SDPA against the reference's float64 product, sums in another order: measured 1.2e-14; 2e-13 as above.
    torch.testing.assert_close(out, nystrom.exact_attention(Q, K, V, attn_mask=mask), rtol=0, atol=2e-13)
    # More real rows than the sample: the search runs.
    Q, K, V, mask = padded_batch(0, (200, 100))
    _, info = nystrom.approximate(Q, K, V, attn_mask=mask, num_landmarks=8, tol=0.2, return_info=True)
    assert info.tol_steps[0].m == 8


def test_padding_past_the_longest_sequence_changes_no_search():
    # The cost rule counted padded positions: exact attention's n^2 outgrows Nystrom's n m, so padding to a fixed length
    # let Nystrom attention "pay" at m where the same sequences alone are answered exactly (a review: MiniLM layer 5,
    # m = 32 padded to 376 tokens against exact attention at its own 176). Padded to 3 times their longest, the same
    # two sequences take the same steps and give the same real rows.
    Q, K, V, mask = padded_batch(0, (200, 150))
    longer = [torch.cat([x, torch.zeros(*x.shape[:-2], 2 * x.shape[-2], x.shape[-1], dtype=x.dtype)], dim=-2)
              for x in (Q, K, V)]
    wider = torch.cat([mask, torch.zeros(*mask.shape[:-1], 2 * mask.shape[-1], dtype=torch.bool)], dim=-1)
    # Alone, the search gives up after m = 16 (tol out of reach by the largest m the cost rule allows) and answers
    # exactly; padded, it went on to m = 32 and 64 and answered with those.
    out, info = nystrom.approximate(Q, K, V, attn_mask=mask, num_landmarks=8, tol=0.02, return_info=True)
    padded, padded_info = nystrom.approximate(*longer, attn_mask=wider, num_landmarks=8, tol=0.02, return_info=True)
    assert [step.m for step in padded_info.tol_steps] == [step.m for step in info.tol_steps]
    assert info.tol_steps[-1].solver == "exact"
    real = mask[:, 0, 0, :, None]
    # Exact attention both times, over the same real keys: measured equal; float64 rounding's tolerance.
    torch.testing.assert_close(padded[..., :Q.shape[-2], :] * real, out * real, rtol=0, atol=1e-13)


@pytest.mark.parametrize("case", ["40 tokens", "a padded sequence of 30", "50 queries"])
def test_a_start_above_the_keys_starts_at_the_most_they_allow(case):
    # With tol, num_landmarks is where the search starts, not an m the caller needs: an input with fewer tokens than
    # the default start of 64 answers (within tol, or exactly) instead of raising that 64 exceeds its keys; the padded
    # case reads its mask for that even with check_values=False. Without tol an m above the keys still raises.
    Q, K, V, mask = padded_batch(0, (256, 30))
    if case == "40 tokens":
        Q, K, V, mask = Q[..., :40, :], K[..., :40, :], V[..., :40, :], None
    elif case == "50 queries":
        Q, mask = Q[..., :50, :], None
    out, info = nystrom.approximate(Q, K, V, attn_mask=mask, tol=0.1, check_values=case == "40 tokens",
                                    return_info=True)
    most = {"40 tokens": 40, "a padded sequence of 30": 30, "50 queries": 50}[case]
    assert info.tol_steps[0].m == most or [(step.m, step.solver) for step in info.tol_steps] == [(K.shape[-2], "exact")]
    assert all(step.m <= most for step in info.tol_steps if step.solver != "exact")
    if info.landmarks is None:
        # float64 exact attention, batched over sequences of other lengths: sums in another order, 2e-13 as in
        # test_m_never_exceeds_the_real_keys_of_any_sequence.
        torch.testing.assert_close(out, nystrom.exact_attention(Q, K, V, attn_mask=mask), rtol=0, atol=2e-13)
    else:
        # The padded batch answers at its start, m = 30 (measured: error bound 0.084).
        assert case == "a padded sequence of 30" and len(info.tol_steps) == 1
        assert relative_error(np.asarray(out), *(np.asarray(x) for x in (Q, K, V)), attn_mask=np.asarray(mask),
                              real=mask) <= 0.1
    with pytest.raises(ValueError, match="num_landmarks"):
        nystrom.approximate(Q, K, V, attn_mask=mask, num_landmarks=most + 1)
    if mask is not None:
        # A sequence without a real key: the mask's own error, not "num_landmarks must be at least 1" from a start
        # lowered to its 0 keys (a review), with or without check_values.
        for check_values in (False, True):
            with pytest.raises(ValueError, match="masks every key"):
                nystrom.approximate(Q, K, V, attn_mask=mask & (torch.arange(2) == 0)[:, None, None, None], tol=0.1,
                                    check_values=check_values)


@settings(max_examples=60, deadline=None)
@given(n_q=st.integers(1, 5000), n=st.integers(1, 5000), d=st.integers(1, 256), d_v=st.integers(1, 256),
       fraction=st.sampled_from([0.25, 0.5, 1.0]),
       solver=st.sampled_from([nystrom.NewtonSchulz(), nystrom.NewtonSchulz(iters=10), nystrom.PInv(),
                               nystrom.Ridge(), lambda A: A]))
def test_the_crossover_is_the_last_m_within_the_cost_fraction(n_q, n, d, d_v, fraction, solver):
    pays = nystrom_pays(n_q, n, d, d_v, fraction)
    largest = min(n, n_q)
    m = crossover(largest, pays, solver)
    exact = exact_attention_flops(1, n_q, n, d, d_v)

    def cost(m):
        return nystrom_attention_flops(1, n_q, n, d, d_v, m, solve_flops(solver, m))["total"]

    assert 0 <= m <= largest
    assert m == 0 or cost(m) <= fraction * exact
    assert m == largest or cost(m + 1) > fraction * exact


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tol=0), ValueError, "tol must be a positive finite number"),
    (dict(tol=float("inf")), ValueError, "tol must be a positive finite number"),
    (dict(tol="0.1"), TypeError, "tol must be a real number"),
    (dict(tol=float("nan")), ValueError, "tol must be a number"),
    (dict(max_landmarks=32), ValueError, "max_landmarks only applies with tol"),
    (dict(strict_tol=True), ValueError, "strict_tol only applies with tol"),
    (dict(tol=0.1, max_landmarks=4), ValueError,
     r"max_landmarks must be between the search's start, m=8 \(num_landmarks, .*\), and 576"),
    (dict(tol=0.1, max_landmarks=577), ValueError, "max_landmarks must be between"),
    (dict(tol=0.1, max_landmarks=32.0), TypeError, "max_landmarks"),
    (dict(tol=0.1, strict_tol=1), TypeError, "strict_tol must be a bool"),
])
def test_bad_error_control_is_named(kwargs, error, match):
    Q, K, V = smooth_tokens(0)
    with pytest.raises(error, match=match):
        nystrom.approximate(Q, K, V, num_landmarks=8, **kwargs)


def test_tol_on_meta_tensors_is_refused_by_name():
    # check_values=False lets meta tensors through; the tol search then failed in torch ("Cannot copy out of meta
    # tensor", "Tensor.item() cannot be called on meta tensors"; a review).
    Q = torch.empty(2, 2000, 16, device="meta")
    mask = torch.ones(2000, dtype=torch.bool, device="meta")
    for extra in ({}, {"attn_mask": mask}):
        with pytest.raises(ValueError, match="tol estimates the error from exact rows of the data"):
            nystrom.approximate(Q, Q, Q, check_values=False, tol=0.1, num_landmarks=8, **extra)


def test_a_budget_below_a_clipped_start_names_the_clipping():
    # The start, num_landmarks=64 by default, is clipped to the 50 real keys: the message named num_landmarks=50,
    # which the caller never passed (a review).
    Q = torch.randn(2, 1000, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the search's start, m=50 \(num_landmarks, at most the landmarks these keys "
                                         r"allow\), and 50"):
        nystrom.approximate(Q, Q, Q, tol=0.1, max_landmarks=40, attn_mask=torch.arange(1000) < 50)


def test_a_tol_below_the_dtype_rounding_warns_at_the_call():
    # The reference of the estimate is exact attention in the inputs' dtype: below its eps, tol cannot mean what it
    # says (float16 with tol=1e-4 was answered "exactly", 3e-4 from float64, a review finding).
    Q, K, V = (torch.from_numpy(x).to(torch.float16) for x in smooth_tokens(0))
    with pytest.warns(UserWarning, match=r"tol=0.0001 is below the rounding of exact attention in torch.float16") \
            as caught:
        nystrom.approximate(Q, K, V, num_landmarks=8, tol=1e-4)
    assert caught[0].filename == __file__
    # float32 SDPA accumulates its rounding over the keys: 1.2-3.3 eps from float64 (a review answered tol=2.5e-7, two
    # eps, "exactly" with 3.95e-7 of error, without a word).
    with pytest.warns(UserWarning, match=r"tol=2.5e-07 is below the rounding of exact attention in torch.float32"):
        nystrom.approximate(Q.float(), K.float(), V.float(), num_landmarks=8, tol=2.5e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nystrom.approximate(Q.float(), K.float(), V.float(), num_landmarks=8, tol=1e-2)
        nystrom.approximate(Q.double(), K.double(), V.double(), num_landmarks=8, tol=1e-12)


@pytest.mark.parametrize(("solver", "advice"), [
    (nystrom.NewtonSchulz(), "the floor of 6 Newton-Schulz steps, which leave the landmark kernel's small singular "
                             "values uninverted: more than iters=6 may go lower"),
    (nystrom.NewtonSchulz(tol=1e-3), "the floor of its Newton-Schulz steps, which leave the landmark kernel's small "
                                     "singular values uninverted: a smaller tol or a larger max_iters may go lower"),
    (nystrom.PInv(), "the floor of an exact pseudo-inverse, which amplifies the landmark kernel's small singular "
                     "values: a regularising solver (the default NewtonSchulz(), or PInv(rtol=3e-2)) may go lower"),
    (nystrom.PInv(rtol=1e-10), "the floor of an exact pseudo-inverse, which amplifies the landmark kernel's small "
                               "singular values: a regularising solver (the default NewtonSchulz(), or "
                               "PInv(rtol=3e-2)) may go lower"),
    (nystrom.PInv(rtol=0.03), "the floor of PInv(rtol=0.03): another cut-off may go lower (a lower one inverts more "
                              "of the landmark kernel, a higher one regularises more; 3e-2 was the best on real "
                              "attention)"),
    (nystrom.linalg.solvers.Ridge(lam=0.1), "the floor of Ridge(lam=0.1): another lam may go lower (a smaller one "
                                            "inverts more of the landmark kernel, a larger one regularises more)"),
    (lambda A: None, "the solver's floor"),
])
def test_a_stall_is_explained_by_what_moves_the_solvers_floor(solver, advice):
    # One text for every solver advised more steps or a lower cut-off to an exact pseudo-inverse, whose floor comes from
    # inverting too much, and once solver='pinv' to all (two reviews).
    from nystrom.linalg.tolerance import stall_advice

    assert stall_advice(solver) == advice


def test_a_stall_after_the_escalation_names_both_step_counts():
    # "more than iters=6 may go lower; also with NewtonSchulz(iters=10)" advised more steps right after ten missed too
    # (a review).
    from nystrom.linalg.tolerance import stall_advice

    advice = stall_advice(nystrom.NewtonSchulz(), nystrom.NewtonSchulz(iters=10))
    assert advice.startswith("the floor of 6 and of 10 Newton-Schulz steps") and "exact attention" in advice
