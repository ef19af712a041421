"""``nystrom.approximate`` is the boundary: each argument is checked once, then trusted code runs.

The counts come from ``sys.setprofile``, which sees every Python-level call into the package.
"""

import collections
import os
import sys

import numpy as np
import pytest
import torch

import nystrom

ROOT = os.path.dirname(nystrom.__file__)


def profile(fn):
    """Calls into the package made by ``fn()``: ``{(file relative to nystrom/, function): count}``."""
    calls = collections.Counter()

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(ROOT):
            calls[(os.path.relpath(frame.f_code.co_filename, ROOT), frame.f_code.co_name)] += 1

    sys.setprofile(record)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def masked_call(strategy="norm", **kwargs):
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 3, 96, 16)) for _ in range(3))
    mask = np.ones((2, 1, 1, 96), dtype=bool)
    mask[0, ..., 70:] = False
    return lambda: nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=16, attn_mask=mask,
                                       seed=0, **kwargs)


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
def test_each_argument_is_checked_once(strategy):
    calls = profile(masked_call(strategy, return_info=True))
    by_name = collections.Counter()
    for (_, name), count in calls.items():
        by_name[name] += count
    # Q, K and V are checked for finiteness in one call; the mask, the scale, the landmark count and the names
    # of the strategy and the solver once each.
    for check in ("check_finite", "check_attn_mask", "check_scale", "check_num_landmarks", "namespace",
                  "check_attention_inputs", "get_strategy", "get_solver"):
        assert by_name[check] == 1, (check, by_name[check])


def test_the_default_path_stays_short():
    # The modules a default call crosses (10 before the architecture change), as a regression guard: a new hop
    # shows here first. The checks all run in validation.py, before any of the math. sequence.py is the token
    # axis that selection reads (whole here, sharded across processes with group=).
    calls = profile(masked_call())
    files = {file for file, _ in calls}
    assert files <= {"approximation.py", "linalg/validation.py", "linalg/numerics.py", "linalg/attention.py",
                     "linalg/solvers.py", "linalg/landmarks/base.py", "linalg/landmarks/norm.py",
                     "linalg/landmarks/kmeans.py", "linalg/landmarks/fps.py", "linalg/sequence.py"}, files
    checks = {name for file, name in calls if file != "linalg/validation.py" and name.startswith("check_")}
    assert not checks, checks


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_without_value_checks_nothing_reads_the_data(strategy, dtype, masked):
    # Meta tensors have shapes and dtypes but no values: any read (bool(), int(), .item(), a copy to the host),
    # which on CUDA would be a host synchronisation, raises. With check_values=False the whole call, selection
    # included, must run on them.
    Q, K, V = (torch.empty(2, 4, 256, 32, device="meta", dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, 256, dtype=torch.bool, device="meta") if masked else None
    out = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=16, attn_mask=mask, seed=0,
                              check_values=False)
    assert out.device.type == "meta" and out.shape == V.shape and out.dtype == dtype


def test_value_checks_are_the_reads():
    # The value checks are the only reads before the computation: on torch's meta device, which holds no values, they
    # are what refuses the call (Tensor.item()'s RuntimeError before, now a ValueError that names the way out).
    Q = torch.empty(1, 2, 64, 8, device="meta")
    with pytest.raises(ValueError, match="meta device, whose tensors hold no values"):
        nystrom.approximate(Q, Q, Q, num_landmarks=8)


def test_check_values_false_still_checks_shapes_and_types():
    Q = np.zeros((2, 10, 4))
    with pytest.raises(ValueError, match="Q and K must have the same feature size"):
        nystrom.approximate(Q, Q[..., :3], Q, num_landmarks=4, check_values=False)
    with pytest.raises(TypeError, match="check_values must be a bool"):
        nystrom.approximate(Q, Q, Q, num_landmarks=4, check_values=1)


def test_value_checks_catch_what_they_promise():
    Q = np.random.default_rng(0).standard_normal((2, 10, 4))
    bad = Q.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="K contains NaN"):
        nystrom.approximate(Q, bad, Q, num_landmarks=4)
    # Opting out skips the read, and the NaN reaches the output, as documented.
    assert np.isnan(nystrom.approximate(Q, bad, Q, num_landmarks=4, strategy="uniform", seed=0,
                                        check_values=False)).any()


def test_public_functions_share_one_contract():
    # The same bad argument gives the same message from every public entry point.
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 10, 3)), rng.standard_normal((2, 10, 4))
    landmarks = nystrom.Landmarks(Q[:, :4], Q[:, :4])
    calls = [
        lambda: nystrom.approximate(Q, K, V, num_landmarks=4),
        lambda: nystrom.exact_attention(Q, K, V),
        lambda: nystrom.linalg.nystrom_attention(Q, K, V, landmarks),
        lambda: nystrom.FPS()(Q, K, 4),
        lambda: nystrom.estimate_relative_error(Q, K, V, V),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Q and K must have the same feature size d"):
            call()


def test_exact_attention_takes_the_mask_fourth_and_scale_by_keyword_only():
    # As SDPA: attn_mask is the fourth argument (keyword-only before, unlike approximate and SDPA: a review), scale a
    # keyword, and a number in the mask's place is refused by name.
    Q = np.ones((4, 2))
    with pytest.raises(TypeError, match="attn_mask must be an array"):
        nystrom.exact_attention(Q, Q, Q, 0.5)
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 6, 4))) for _ in range(3))
    mask = torch.arange(6) < 4
    torch.testing.assert_close(nystrom.exact_attention(q, k, v, mask), nystrom.exact_attention(q, k, v, attn_mask=mask),
                               rtol=0, atol=0)
    # float64, the same mask: SDPA's rows within rounding (summed in another order).
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask[None, None, None])
    torch.testing.assert_close(nystrom.exact_attention(q, k, v, mask), sdpa, rtol=0, atol=1e-14)
    # Equal rows, uniform weights 1/4: the output is 1 up to a rounding of the weights (measured exact).
    np.testing.assert_allclose(nystrom.exact_attention(Q, Q, Q, scale=0.5), Q, rtol=4 * np.finfo(float).eps, atol=0)


def test_exact_attention_takes_sdpas_neutral_keywords_and_grouped_query_heads():
    # is_causal=False, dropout_p=0.0 and enable_gqa were a TypeError (a review), where approximate and SDPA take them:
    # exact_attention was no drop-in for an SDPA call.
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.standard_normal((2, 4, 6, 3)))
    k, v = (torch.from_numpy(rng.standard_normal((2, 2, 6, 3))) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False, dropout_p=0.0, enable_gqa=True)
    ours = nystrom.exact_attention(q, k, v, is_causal=False, dropout_p=0.0, enable_gqa=True)
    torch.testing.assert_close(ours, sdpa, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="is_causal=True is not supported"):
        nystrom.exact_attention(q, k, v, is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout"):
        nystrom.exact_attention(q, q, q, dropout_p=0.1)


def test_solvers_check_their_input_and_the_library_skips_it():
    A = np.eye(3)
    A[0, 0] = np.inf
    with pytest.raises(ValueError, match="A contains NaN"):
        nystrom.NewtonSchulz()(A)
    from nystrom.linalg.solvers import unchecked

    solve = nystrom.PInv(rtol=1e-12)
    assert unchecked(solve) == solve.solve
    # The SVD of 2 I is exact and 1 / 2 too (measured exact); 1 ulp.
    np.testing.assert_allclose(unchecked(solve)(np.eye(3) * 2.0).inverse, np.eye(3) / 2, rtol=np.finfo(float).eps,
                               atol=0)
    # A plain callable runs as given; only the type of what it returns is checked (an array has an ``inverse``
    # method and would fail far from here).
    own = lambda A: nystrom.SolveResult(A, A[..., 0, 0])  # noqa: E731
    identity = np.eye(3)
    assert unchecked(own)(identity).inverse is identity  # run as given: no copy, no cast
    with pytest.raises(TypeError, match="must return a SolveResult"):
        unchecked(np.linalg.pinv)(np.eye(3))


def test_query_chunk_size_is_honoured_for_numpy(monkeypatch):
    # It was silently ignored for numpy inputs; now both backends run the attention calls a chunk of queries at a
    # time (the same products row by row, so the result agrees to round-off of a different blocking).
    import nystrom.approximation as front

    rng = np.random.default_rng(3)
    Q, K, V = (rng.standard_normal((2, 50, 8)) for _ in range(3))
    rows = []
    original = front.softmax_attention

    def counting(xp, q, *args, **kwargs):
        rows.append(q.shape[-2])
        return original(xp, q, *args, **kwargs)

    monkeypatch.setattr(front, "softmax_attention", counting)
    out = nystrom.approximate(Q, K, V, strategy="fps", num_landmarks=8, query_chunk_size=16)
    # The 8 landmark queries fit one chunk; the 50 queries take four (16, 16, 16, 2).
    assert rows == [8, 16, 16, 16, 2]
    monkeypatch.undo()
    # float64 (measured bitwise equal); 1e-12 for a BLAS that blocks the rows differently.
    np.testing.assert_allclose(out, nystrom.approximate(Q, K, V, strategy="fps", num_landmarks=8), rtol=1e-12)


def test_info_holds_no_autograd_graph():
    # The residual is a diagnostic: it required grad, so an Info kept in a training loop kept each call's graph alive
    # (a review). The output still carries its gradient.
    Q, K, V = (torch.randn(1, 2, 20, 4, requires_grad=True) for _ in range(3))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=4, return_info=True)
    assert out.requires_grad and not info.residual.requires_grad
    # The landmarks and the arrays the error estimate reads held it too (another review: 20 Infos of calls without a
    # backward pass, 137 MiB against 63 under no_grad).
    for strategy in ("norm", "fps"):
        out, info = nystrom.approximate(Q, K, V, num_landmarks=4, strategy=strategy, return_info=True)
        held = [info.landmarks.queries, info.landmarks.keys, info.landmarks.log_weights, *info._inputs[1:5]]
        assert out.requires_grad and not any(a.requires_grad for a in held if a is not None)
        assert info.estimate_error(seed=0).estimate > 0
    # Every real key a landmark: answered by exact attention.
    out, info = nystrom.approximate(Q, K, V, num_landmarks=15, return_info=True, attn_mask=torch.arange(20) < 15)
    assert info.landmarks is None and out.requires_grad and not any(a.requires_grad for a in info._inputs[1:5])


def test_info_repr_is_a_summary():
    Q = torch.randn(2, 4, 128, 16)
    _, info = nystrom.approximate(Q, Q, Q, num_landmarks=16, return_info=True)
    text = repr(info)
    assert len(text) < 300 and "m=16" in text and "tensor" not in text


def test_grouped_query_attention_follows_sdpa():
    # SDPA's enable_gqa=True: 6 query heads served by 3 key/value heads, each by 2 consecutive query heads. A review
    # found the keyword refused and the error's hint (K.expand(...)) raising for any group above 1.
    generator = torch.Generator().manual_seed(0)
    Q = torch.randn(2, 6, 40, 8, dtype=torch.float64, generator=generator)
    K, V = (torch.randn(2, 3, 40, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    reference = torch.nn.functional.scaled_dot_product_attention(Q, K, V, enable_gqa=True)
    out = nystrom.approximate(Q, K, V, num_landmarks=40, solver=nystrom.PInv(rtol=0.0), enable_gqa=True)
    # float64 at m = n: rounding amplified by cond(A), up to 2.5e4 (cond eps = 5.5e-12); measured 1.4e-13 on outputs
    # up to 1.3; 7x.
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    hint = "repeat_interleave"
    with pytest.raises(ValueError, match=hint):
        nystrom.approximate(Q, K, V, num_landmarks=8)
    # The hint's recipe is the same call, the same operations: bitwise.
    torch.testing.assert_close(nystrom.approximate(Q, K.repeat_interleave(2, -3), V.repeat_interleave(2, -3),
                                                   num_landmarks=8), nystrom.approximate(Q, K, V, num_landmarks=8,
                                                                                         enable_gqa=True),
                               rtol=0, atol=0)
    assert nystrom.approximate(Q[:, :3], K, V, num_landmarks=8, enable_gqa=False).shape == (2, 3, 40, 8)
    # As many query as key/value heads: enable_gqa changes nothing, bit for bit (as in SDPA).
    torch.testing.assert_close(nystrom.approximate(Q[:, :3], K, V, num_landmarks=8, enable_gqa=True),
                               nystrom.approximate(Q[:, :3], K, V, num_landmarks=8), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        nystrom.approximate(Q[:, :5], K, V, num_landmarks=8, enable_gqa=True)
    with pytest.raises(TypeError, match="enable_gqa"):
        nystrom.approximate(Q, K, V, num_landmarks=8, enable_gqa="yes")
    # The estimate of an output takes it too (a review: a TypeError, where Info.estimate_error worked): the same rows.
    out, info = nystrom.approximate(Q, K, V, num_landmarks=8, enable_gqa=True, return_info=True)
    estimate = nystrom.estimate_relative_error(Q, K, V, out, enable_gqa=True, seed=0)
    assert estimate == nystrom.estimate_relative_error(Q, K.repeat_interleave(2, -3), V.repeat_interleave(2, -3), out,
                                                       seed=0)
    assert 0 < estimate.estimate < 1


def test_the_mask_may_be_passed_by_position_as_to_sdpa():
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((1, 2, 12, 4)) for _ in range(3))
    mask = np.arange(12) < 9
    np.testing.assert_array_equal(nystrom.approximate(Q, K, V, mask, num_landmarks=4),
                                  nystrom.approximate(Q, K, V, attn_mask=mask, num_landmarks=4))
