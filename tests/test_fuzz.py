"""Bad-input fuzzing of every public function of the math layer.

Each test draws a *valid* call (random batch shape, n, d, backend, dtype), breaks it in one way
drawn from a catalogue of mutations, and requires a ``ValueError`` or ``TypeError`` whose message
names the offending argument: never a NaN result, a wrong shape, or an exception from deep inside
numpy/torch. The number of calls tried per function is written to ``results/fuzz_counts.json``
(the figure quoted in the docs' reliability page).
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nystrom
from nystrom.linalg.landmarks import STRATEGIES

COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def write_counts():
    yield
    out = Path(__file__).resolve().parents[1] / "results"
    out.mkdir(exist_ok=True)
    (out / "fuzz_counts.json").write_text(json.dumps(dict(sorted(COUNTS.items())), indent=2))


def to_backend(x, backend):
    return torch.from_numpy(np.ascontiguousarray(x)) if backend == "torch" else x


@st.composite
def valid_attention_call(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    n = draw(st.integers(2, 12))
    n_q = draw(st.sampled_from([n, draw(st.integers(1, 12))]))
    d, dv = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    backend = draw(st.sampled_from(["numpy", "torch"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    Q = rng.standard_normal((*batch, n_q, d)).astype(dtype)
    K = rng.standard_normal((*batch, n, d)).astype(dtype)
    V = rng.standard_normal((*batch, n, dv)).astype(dtype)
    m = draw(st.integers(1, min(n, n_q)))
    return dict(Q=to_backend(Q, backend), K=to_backend(K, backend), V=to_backend(V, backend), num_landmarks=m,
                backend=backend, rng=rng)


def with_value(a, index_fn, value):
    """A copy of ``a`` with one entry (chosen by ``index_fn(shape)``) set to ``value``."""
    b = a.clone() if isinstance(a, torch.Tensor) else a.copy()
    b[index_fn(tuple(a.shape))] = value
    return b


def entry(rng):
    return lambda shape: tuple(int(rng.integers(0, s)) for s in shape)


def other_library(a):
    return a.numpy() if isinstance(a, torch.Tensor) else torch.from_numpy(a)


def astype(a, kind):
    np_kind = {"int": np.int64, "bool": np.bool_, "complex": np.complex64}[kind]
    if isinstance(a, torch.Tensor):
        return torch.from_numpy(a.numpy().astype(np_kind))
    return a.astype(np_kind)


def mask_like(call, fill=True, n_delta=0, dtype=None):
    """A key mask in SDPA's form ``(..., 1, n + n_delta)`` for the call's inputs."""
    K = call["K"]
    shape = (*K.shape[:-2], 1, K.shape[-2] + n_delta)
    mask = np.full(shape, fill, dtype=dtype or bool)
    return to_backend(mask, call["backend"])


def per_query_mask(call):
    """A causal mask ``(..., max(n_q, 2), n)``: its rows differ (or, for one query, its query axis is wrong)."""
    rows, n = max(call["Q"].shape[-2], 2), call["K"].shape[-2]
    mask = np.broadcast_to(np.tril(np.ones((rows, n), dtype=bool)), (*call["K"].shape[:-2], rows, n))
    return to_backend(np.array(mask), call["backend"])


def wrong_batch_mask(call):
    lead = tuple(call["K"].shape[:-2])
    shape = (*lead[:-1], lead[-1] + 1 if lead else 2, 1, call["K"].shape[-2])
    return to_backend(np.ones(shape, dtype=bool), call["backend"])


# (description, mutation(call) -> None (edits call in place), the argument the message must name)
TENSOR_MUTATIONS = [
    ("Q rank 1", lambda c: c.update(Q=c["Q"].reshape(-1)), "Q"),
    ("K rank 1", lambda c: c.update(K=c["K"].reshape(-1)), "K"),
    ("V rank 0", lambda c: c.update(V=c["V"].reshape(-1)[0]), "V"),
    ("K extra batch dim", lambda c: c.update(K=c["K"][None]), "K"),
    ("V one token short", lambda c: c.update(V=c["V"][..., :-1, :]), "V"),
    ("K one feature short", lambda c: c.update(K=c["K"][..., :-1]), "K"),
    ("Q no tokens", lambda c: c.update(Q=c["Q"][..., :0, :]), "Q"),
    ("K no tokens", lambda c: c.update(K=c["K"][..., :0, :], V=c["V"][..., :0, :]), "K"),
    ("Q int", lambda c: c.update(Q=astype(c["Q"], "int")), "Q"),
    ("K bool", lambda c: c.update(K=astype(c["K"], "bool")), "K"),
    ("V complex", lambda c: c.update(V=astype(c["V"], "complex")), "V"),
    ("Q NaN", lambda c: c.update(Q=with_value(c["Q"], entry(c["rng"]), math.nan)), "Q"),
    ("K +Inf", lambda c: c.update(K=with_value(c["K"], entry(c["rng"]), math.inf)), "K"),
    ("V -Inf", lambda c: c.update(V=with_value(c["V"], entry(c["rng"]), -math.inf)), "V"),
    ("K other library", lambda c: c.update(K=other_library(c["K"])), "K"),
    ("V a list", lambda c: c.update(V=c["V"].tolist()), "V"),
    ("Q other float dtype", lambda c: c.update(
        Q=c["Q"].double() if isinstance(c["Q"], torch.Tensor) and c["Q"].dtype == torch.float32
        else c["Q"].float() if isinstance(c["Q"], torch.Tensor)
        else c["Q"].astype(np.float64 if c["Q"].dtype == np.float32 else np.float32)), "Q"),
]
MASK_MUTATIONS = [
    ("mask complex", lambda c: c.update(attn_mask=mask_like(c, dtype=np.complex64)), "attn_mask"),
    ("mask short", lambda c: c.update(attn_mask=mask_like(c, n_delta=-1)), "attn_mask"),
    ("mask long", lambda c: c.update(attn_mask=mask_like(c, n_delta=1)), "attn_mask"),
    ("mask hides all", lambda c: c.update(attn_mask=mask_like(c, fill=False)), "attn_mask"),
    ("mask additive hides all", lambda c: c.update(attn_mask=mask_like(c, fill=-math.inf, dtype=np.float32)),
     "attn_mask"),
    ("mask int hides all", lambda c: c.update(attn_mask=mask_like(c, fill=0, dtype=np.int64)), "attn_mask"),
    ("mask int value 2", lambda c: c.update(attn_mask=mask_like(c, fill=2, dtype=np.int64)), "attn_mask"),
    ("mask additive bias", lambda c: c.update(attn_mask=mask_like(c, fill=-0.5, dtype=np.float32)), "attn_mask"),
    ("mask additive NaN", lambda c: c.update(attn_mask=mask_like(c, fill=math.nan, dtype=np.float32)),
     "attn_mask"),
    ("mask extra dim", lambda c: c.update(attn_mask=mask_like(c)[None]), "attn_mask"),
    ("mask per query", lambda c: c.update(attn_mask=per_query_mask(c)), "attn_mask"),
    ("mask wrong batch", lambda c: c.update(attn_mask=wrong_batch_mask(c)), "attn_mask"),
    ("mask other library", lambda c: c.update(attn_mask=other_library(mask_like(c))), "attn_mask"),
    ("mask a list", lambda c: c.update(attn_mask=mask_like(c).tolist()), "attn_mask"),
    ("mask as key_padding_mask", lambda c: c.update(key_padding_mask=mask_like(c)), "key_padding_mask"),
    ("mask as attention_mask", lambda c: c.update(attention_mask=mask_like(c)), "attention_mask"),
]
# SDPA's other arguments, and a per-query mask that only the value checks could tell from a key mask.
SDPA_MUTATIONS = [
    ("is_causal True", lambda c: c.update(is_causal=True), "is_causal"),
    ("is_causal int", lambda c: c.update(is_causal=1), "is_causal"),
    ("dropout_p 0.1", lambda c: c.update(dropout_p=0.1), "dropout_p"),
    ("dropout_p str", lambda c: c.update(dropout_p="0"), "dropout_p"),
    ("mask per query unchecked", lambda c: c.update(attn_mask=per_query_mask(c), check_values=False), "attn_mask"),
]
SCALE_MUTATIONS = [
    (f"scale {v!r}", (lambda v: lambda c: c.update(scale=v))(v), "scale")
    for v in (0.0, -1.0, math.nan, math.inf, "1", 1j, True)
]
LANDMARK_MUTATIONS = [
    (f"num_landmarks {v!r}", (lambda v: lambda c: c.update(num_landmarks=v(c) if callable(v) else v))(v),
     "num_landmarks")
    for v in (0, -1, -100, 2.5, 3.0, True, "4", None, lambda c: c["K"].shape[-2] + 1)
]
APPROXIMATE_MUTATIONS = TENSOR_MUTATIONS + MASK_MUTATIONS + SDPA_MUTATIONS + SCALE_MUTATIONS + LANDMARK_MUTATIONS + [
    ("strategy unknown", lambda c: c.update(strategy="nystromformer"), "strategy"),
    ("strategy int", lambda c: c.update(strategy=3), "strategy"),
    ("solver unknown", lambda c: c.update(solver="cholesky"), "solver"),
    ("solver list", lambda c: c.update(solver=["pinv"]), "solver"),
    ("seed negative", lambda c: c.update(seed=-1), "seed"),
    ("seed float", lambda c: c.update(seed=1.5), "seed"),
    ("seed str", lambda c: c.update(seed="0"), "seed"),
    ("return_info str", lambda c: c.update(return_info="yes"), "return_info"),
    ("share flag int", lambda c: c.update(share_landmarks_across_heads=0), "share_landmarks_across_heads"),
    ("query_chunk_size 0", lambda c: c.update(query_chunk_size=0), "query_chunk_size"),
    ("query_chunk_size float", lambda c: c.update(query_chunk_size=2.5), "query_chunk_size"),
    ("features wrong n", lambda c: c.update(features=c["K"][..., :-1, :]), "features"),
    ("features NaN", lambda c: c.update(features=with_value(c["K"], entry(c["rng"]), math.nan)), "features"),
    ("features int", lambda c: c.update(features=astype(c["K"], "int")), "features"),
    ("tol zero", lambda c: c.update(tol=0), "tol"),
    ("tol negative", lambda c: c.update(tol=-0.1), "tol"),
    ("tol NaN", lambda c: c.update(tol=math.nan), "tol"),
    ("tol str", lambda c: c.update(tol="0.1"), "tol"),
    ("max_landmarks without tol", lambda c: c.update(max_landmarks=c["num_landmarks"]), "max_landmarks"),
    ("max_landmarks below num_landmarks", lambda c: c.update(tol=0.1, max_landmarks=c["num_landmarks"] - 1),
     "max_landmarks"),
    ("max_landmarks above n", lambda c: c.update(tol=0.1, max_landmarks=c["K"].shape[-2] + 1), "max_landmarks"),
    ("max_landmarks float", lambda c: c.update(tol=0.1, max_landmarks=4.0), "max_landmarks"),
    ("strict_tol int", lambda c: c.update(tol=0.1, strict_tol=1), "strict_tol"),
]


def expect_named_error(fn, kwargs, name):
    # The name as a word: a substring check passed "K" for any message holding "Keys", "V" for "Values".
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**kwargs)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", str(info.value)), \
        f"message does not name {name!r}: {info.value}"


def call_args(call, *drop):
    return {k: v for k, v in call.items() if k not in ("backend", "rng", *drop)}


@settings(max_examples=400, deadline=None)
@given(call=valid_attention_call(), mutation=st.sampled_from(APPROXIMATE_MUTATIONS))
def test_approximate_rejects_bad_input(call, mutation):
    _, mutate, name = mutation
    mutate(call)
    expect_named_error(nystrom.approximate, call_args(call), name)
    COUNTS["approximate"] += 1


MASK_FUNCTIONS = {
    "approximate": lambda c: nystrom.approximate(**call_args(c)),
    "exact_attention": lambda c: nystrom.exact_attention(**call_args(c, "num_landmarks")),
    "estimate_relative_error": lambda c: nystrom.estimate_relative_error(**call_args(c, "num_landmarks"),
                                                                         approx=approx_of(c)),
    "strategy": lambda c: nystrom.get_strategy(c.pop("strategy"))(**call_args(c, "V")),
}


@settings(max_examples=300, deadline=None)
@given(call=valid_attention_call(), mutation=st.sampled_from(MASK_MUTATIONS),
       function=st.sampled_from(sorted(MASK_FUNCTIONS)), strategy=st.sampled_from(sorted(STRATEGIES)))
def test_every_function_rejects_bad_masks(call, mutation, function, strategy):
    # The mask forms alone, spread over the four functions that take attn_mask (the per-function tests above
    # draw them among all mutations).
    _, mutate, name = mutation
    if function == "strategy":
        call["strategy"] = strategy
    mutate(call)
    expect_named_error(lambda: MASK_FUNCTIONS[function](call), {}, name)
    COUNTS["mask forms"] += 1


EXACT_MUTATIONS = TENSOR_MUTATIONS + MASK_MUTATIONS + SCALE_MUTATIONS


@settings(max_examples=150, deadline=None)
@given(call=valid_attention_call(), mutation=st.sampled_from(EXACT_MUTATIONS))
def test_exact_attention_rejects_bad_input(call, mutation):
    _, mutate, name = mutation
    mutate(call)
    expect_named_error(nystrom.exact_attention, call_args(call, "num_landmarks"), name)
    COUNTS["exact_attention"] += 1


def approx_of(call):
    Q, V = call["Q"], call["V"]
    shape = (*Q.shape[:-1], V.shape[-1])
    return to_backend(np.zeros(shape, dtype=np.float32 if V.dtype in (np.float32, torch.float32) else np.float64),
                      call["backend"])


ESTIMATE_MUTATIONS = TENSOR_MUTATIONS + MASK_MUTATIONS + [
    ("approx wrong shape", lambda c: c.update(approx=c["approx"][..., :-1]), "approx"),
    ("approx NaN", lambda c: c.update(approx=with_value(c["approx"], entry(c["rng"]), math.nan)), "approx"),
    ("approx int", lambda c: c.update(approx=astype(c["approx"], "int")), "approx"),
    ("approx other library", lambda c: c.update(approx=other_library(c["approx"])), "approx"),
    ("num_samples 1", lambda c: c.update(num_samples=1), "num_samples"),
    ("num_samples float", lambda c: c.update(num_samples=10.0), "num_samples"),
    ("confidence 1", lambda c: c.update(confidence=1.0), "confidence"),
    ("confidence 0", lambda c: c.update(confidence=0), "confidence"),
    ("confidence str", lambda c: c.update(confidence="0.9"), "confidence"),
    ("seed negative", lambda c: c.update(seed=-3), "seed"),
]


@settings(max_examples=150, deadline=None)
@given(call=valid_attention_call(), mutation=st.sampled_from(ESTIMATE_MUTATIONS))
def test_estimate_relative_error_rejects_bad_input(call, mutation):
    _, mutate, name = mutation
    call["approx"] = approx_of(call)
    mutate(call)
    expect_named_error(nystrom.estimate_relative_error, call_args(call, "num_landmarks"), name)
    COUNTS["estimate_relative_error"] += 1


STRATEGY_MUTATIONS = [mu for mu in TENSOR_MUTATIONS if mu[2] != "V"] + MASK_MUTATIONS + LANDMARK_MUTATIONS + [
    (f"head_axis {v!r}", (lambda v: lambda c: c.update(head_axis=v))(v), "head_axis")
    for v in (0, -1, -2, -9, 1.5, True)
]


@settings(max_examples=300, deadline=None)
@given(call=valid_attention_call(), mutation=st.sampled_from(STRATEGY_MUTATIONS),
       strategy=st.sampled_from(sorted(STRATEGIES)))
def test_strategies_reject_bad_input(call, mutation, strategy):
    _, mutate, name = mutation
    mutate(call)
    args = call_args(call, "V")
    m = args.pop("num_landmarks")
    s = nystrom.get_strategy(strategy)
    expect_named_error(lambda **kw: s(kw.pop("Q"), kw.pop("K"), m, **kw), args, name)
    COUNTS[f"strategy {strategy}"] += 1


@st.composite
def valid_matrix(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    m = draw(st.integers(1, 8))
    backend = draw(st.sampled_from(["numpy", "torch"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return dict(A=to_backend(rng.random((*batch, m, m)), backend), rng=rng)


SOLVER_MUTATIONS = [
    ("A not square", lambda c: c.update(A=c["A"][..., :-1] if c["A"].shape[-1] > 1 else c["A"][..., :0]), "A"),
    ("A rank 1", lambda c: c.update(A=c["A"].reshape(-1)), "A"),
    ("A empty", lambda c: c.update(A=c["A"][..., :0, :0]), "A"),
    ("A int", lambda c: c.update(A=astype(c["A"], "int")), "A"),
    ("A complex", lambda c: c.update(A=astype(c["A"], "complex")), "A"),
    ("A NaN", lambda c: c.update(A=with_value(c["A"], entry(c["rng"]), math.nan)), "A"),
    ("A Inf", lambda c: c.update(A=with_value(c["A"], entry(c["rng"]), math.inf)), "A"),
    ("A list", lambda c: c.update(A=c["A"].tolist()), "A"),
]


@settings(max_examples=150, deadline=None)
@given(call=valid_matrix(), mutation=st.sampled_from(SOLVER_MUTATIONS), solver=st.sampled_from(sorted(nystrom.SOLVERS)))
def test_solvers_reject_bad_input(call, mutation, solver):
    _, mutate, name = mutation
    mutate(call)
    expect_named_error(nystrom.get_solver(solver), {"A": call["A"]}, name)
    COUNTS[f"solver {solver}"] += 1


@pytest.mark.parametrize("make,name", [
    (lambda: nystrom.NewtonSchulz(iters=-1), "iters"), (lambda: nystrom.NewtonSchulz(iters=2.0), "iters"),
    (lambda: nystrom.NewtonSchulz(tol=0.0), "tol"), (lambda: nystrom.NewtonSchulz(max_iters=True), "max_iters"),
    (lambda: nystrom.PInv(rtol=-1e-3), "rtol"), (lambda: nystrom.PInv(rtol=1.0), "rtol"),
    (lambda: nystrom.Ridge(lam=-1.0), "lam"), (lambda: nystrom.Ridge(lam=math.nan), "lam"),
    (lambda: nystrom.Ridge(lam=0.0), "lam"),
    (lambda: nystrom.KMeans(iters=-1), "iters"), (lambda: nystrom.Norm(sink_ratio=0), "sink_ratio"),
    (lambda: nystrom.Norm(max_guaranteed_fraction=0), "max_guaranteed_fraction"),
    (lambda: nystrom.Norm(num_probes=0), "num_probes"),
    # Wrong kinds name the option too (they once failed on a bare comparison), as do values that silently broke a
    # call: an infinite ridge (all-NaN output), a token position that is no int, a k-means sample of no token.
    (lambda: nystrom.NewtonSchulz(tol="a"), "tol"), (lambda: nystrom.PInv(rtol="a"), "rtol"),
    (lambda: nystrom.Ridge(lam="a"), "lam"), (lambda: nystrom.Ridge(lam=math.inf), "lam"),
    (lambda: nystrom.Norm(sink_ratio="a"), "sink_ratio"), (lambda: nystrom.Norm(sink_quorum=math.nan), "sink_quorum"),
    (lambda: nystrom.FPS(first="a"), "first"), (lambda: nystrom.FPS(first=1.5), "first"),
    (lambda: nystrom.FPS(first=True), "first"), (lambda: nystrom.Norm(first=0.5), "first"),
    (lambda: nystrom.Norm(sample_size=0), "sample_size"), (lambda: nystrom.Norm(assign_all="no"), "assign_all"),
    (lambda: nystrom.KMeans(assign_all="no"), "assign_all"),
    (lambda: nystrom.KMeans(sample_size=1.5), "sample_size"), (lambda: nystrom.Norm(iters=1.5), "iters"),
    (lambda: nystrom.NewtonSchulz(max_iters=-1), "max_iters"), (lambda: nystrom.FPS(use_queries=1), "use_queries"),
])
def test_object_constructors_reject_bad_options(make, name):
    expect_named_error(make, {}, name)
    COUNTS["constructors"] += 1


@st.composite
def valid_points_call(draw):
    n = draw(st.integers(2, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    backend = draw(st.sampled_from(["numpy", "torch"]))
    m = draw(st.integers(1, n))
    X = to_backend(rng.standard_normal((n, draw(st.integers(1, 4)))), backend)
    idx = to_backend(np.sort(rng.choice(n, m, replace=False)).astype(np.int64), backend)
    return dict(X=X, indices=idx, rng=rng, backend=backend)


TRACE_MUTATIONS = [
    ("X rank 1", lambda c: c.update(X=c["X"].reshape(-1)), "X"),
    ("X NaN", lambda c: c.update(X=with_value(c["X"], entry(c["rng"]), math.nan)), "X"),
    ("X int", lambda c: c.update(X=astype(c["X"], "int")), "X"),
    ("indices float", lambda c: c.update(indices=c["indices"] * 1.0), "indices"),
    ("indices too large", lambda c: c.update(indices=c["indices"] + c["X"].shape[-2]), "indices"),
    ("indices negative", lambda c: c.update(indices=c["indices"] - c["X"].shape[-2] - 1), "indices"),
    ("indices extra dim", lambda c: c.update(indices=c["indices"][None]), "indices"),
    ("indices empty", lambda c: c.update(indices=c["indices"][:0]), "indices"),
    ("indices other library", lambda c: c.update(indices=other_library(c["indices"])), "indices"),
    ("scale negative", lambda c: c.update(scale=-2.0), "scale"),
]


@settings(max_examples=100, deadline=None)
@given(call=valid_points_call(), mutation=st.sampled_from(TRACE_MUTATIONS))
def test_trace_certificate_rejects_bad_input(call, mutation):
    _, mutate, name = mutation
    mutate(call)
    expect_named_error(nystrom.nystrom_trace_error, {k: call[k] for k in call if k not in ("rng", "backend")}, name)
    COUNTS["nystrom_trace_error"] += 1


SPECTRUM_MUTATIONS = [
    ("eigenvalues NaN", lambda c: c.update(eigenvalues=np.array([1.0, math.nan])), "eigenvalues"),
    ("eigenvalues 2-D", lambda c: c.update(eigenvalues=np.ones((2, 2))), "eigenvalues"),
    ("eigenvalues empty", lambda c: c.update(eigenvalues=np.array([])), "eigenvalues"),
    ("eigenvalues negative", lambda c: c.update(eigenvalues=np.array([1.0, -0.5])), "eigenvalues"),
    ("eigenvalues str", lambda c: c.update(eigenvalues="1 2 3"), "eigenvalues"),
    ("num_landmarks 0", lambda c: c.update(num_landmarks=0), "num_landmarks"),
    ("num_landmarks > n", lambda c: c.update(num_landmarks=10_000), "num_landmarks"),
    ("num_landmarks float", lambda c: c.update(num_landmarks=2.0), "num_landmarks"),
]


@settings(max_examples=80, deadline=None)
@given(mutation=st.sampled_from(SPECTRUM_MUTATIONS),
       fn=st.sampled_from([nystrom.best_rank_trace_floor, nystrom.rpcholesky_trace_bound]))
def test_spectral_bounds_reject_bad_input(mutation, fn):
    _, mutate, name = mutation
    call = dict(eigenvalues=np.linspace(3, 0, 6), num_landmarks=2)
    mutate(call)
    expect_named_error(fn, call, name)
    COUNTS[fn.__name__] += 1


@pytest.mark.parametrize("bad,name", [(3, "strategy"), ("x", "strategy"), (None, "strategy")])
def test_registries_reject_bad_names(bad, name):
    expect_named_error(nystrom.get_strategy, {"strategy": bad}, name)
    expect_named_error(nystrom.get_solver, {"solver": bad}, "solver")
    COUNTS["registries"] += 2
