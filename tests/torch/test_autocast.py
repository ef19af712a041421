"""Under ``torch.autocast`` the library runs as SDPA does there: inputs in the autocast dtype, its own float32
sections kept in float32 (:mod:`nystrom.torch.autocast`)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import nystrom
from nystrom.torch import fna_attention
from nystrom.torch.autocast import autocast_dtype


def smooth_tokens(n=128, d=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, n)[:, None]
    base = torch.cos(x @ (3 * torch.randn(1, 64, generator=generator)) + 6.3 * torch.rand(64, generator=generator))
    return tuple((base @ torch.randn(64, d, generator=generator) / 4)[None, None] for _ in range(3))


def relative_error(out, reference):
    return float(torch.linalg.vector_norm(out.double() - reference) / torch.linalg.vector_norm(reference))


@pytest.mark.parametrize("solver", ["pinv", "newton_schulz", "ridge"])
def test_autocast_gives_the_answer_of_bfloat16_inputs(solver):
    # A review found 1.07 of relative error with pinv at m = n under CPU bfloat16 autocast (the solve and A^+ (B V)
    # ran in bfloat16), against 5e-3 for bfloat16 inputs without autocast. Under autocast the call must be the call
    # on the inputs as autocast gives them to SDPA: bitwise the bfloat16 call.
    Q, K, V = smooth_tokens()
    reference = F.scaled_dot_product_attention(Q.double(), K.double(), V.double())
    plain = nystrom.approximate(Q.bfloat16(), K.bfloat16(), V.bfloat16(), num_landmarks=128, solver=solver)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = nystrom.approximate(Q, K, V, num_landmarks=128, solver=solver)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is restored
    assert under.dtype == torch.bfloat16
    assert torch.equal(under, plain)
    if solver == "pinv":
        # bfloat16 keeps 8 significant bits: its rounding of the inputs alone moves exact attention by about 1e-2.
        assert relative_error(under, reference) < 3e-2


def test_every_path_returns_the_autocast_dtype():
    # Exact attention (a tol search that gives up, cross-attention at m = n) returned SDPA's bfloat16 and the Nyström
    # path float32 under the same autocast.
    Q, K, V = (torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    many = torch.randn(1, 2, 600, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nystrom_out = nystrom.approximate(Q, K, V, num_landmarks=16)
        _, info = nystrom.approximate(Q, K, V, num_landmarks=16, tol=0.02, return_info=True)
        exact_out = nystrom.approximate(Q, K, V, num_landmarks=16, tol=0.02)
        # Cross-attention with every key a landmark (n_q = 600 >= n = 300): exact attention.
        cross, cross_info = nystrom.approximate(many, K, V, num_landmarks=300, return_info=True)
        sdpa = F.scaled_dot_product_attention(Q, K, V)
    assert info.tol_steps[-1].solver == "exact" and cross_info.landmarks is None
    assert {nystrom_out.dtype, exact_out.dtype, cross.dtype, sdpa.dtype} == {torch.bfloat16}


def test_float64_is_left_as_it_is():
    Q, K, V = (x.double() for x in smooth_tokens())
    plain = nystrom.approximate(Q, K, V, num_landmarks=128, solver="pinv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nystrom.approximate(Q, K, V, num_landmarks=128, solver="pinv")
    assert out.dtype == torch.float64
    assert torch.equal(out, plain)


@pytest.mark.parametrize("strategy", ["fps", "kmeans", "norm"])
def test_fna_attention_under_autocast_matches_bfloat16_inputs(strategy):
    # Landmarks chosen from the float32 inputs, inside or outside the autocast block, are float32: they are cast with
    # Q, K and V (a review found a dtype TypeError after the first version of the autocast fix).
    Q, K, V = smooth_tokens()
    landmarks = nystrom.get_strategy(strategy)(Q, K, 32, head_axis=-3)
    cast = dataclasses.replace(landmarks, queries=landmarks.queries.bfloat16(), keys=landmarks.keys.bfloat16())
    plain, _ = fna_attention(Q.bfloat16(), K.bfloat16(), V.bfloat16(), cast, solver="pinv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = fna_attention(Q, K, V, landmarks, solver="pinv")
    assert torch.equal(under, plain)


def test_autocast_dtype_reads_the_callers_state():
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None


def test_patched_layers_compute_without_autocast_and_the_model_keeps_it(monkeypatch):
    pytest.importorskip("transformers")
    from test_capture import tiny_inputs, tiny_model

    import nystrom.torch.patching as patching

    seen = []
    output = patching.nystrom_output

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return output(*args, **kwargs)

    monkeypatch.setattr(patching, "nystrom_output", spy)
    model = tiny_model("bert", dtype=torch.float32)
    inputs = tiny_inputs("bert")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), nystrom.fna(model, num_landmarks=9):
        out = model(**inputs).last_hidden_state
        assert torch.is_autocast_enabled("cpu")
    assert seen and not any(seen)
    assert torch.isfinite(out).all()


def gradients(call, inputs, inside):
    """The gradients of ``call(*inputs)``'s sum under CPU bfloat16 autocast, with backward inside or after the block."""
    for x in inputs:
        x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(*inputs)
        if inside:
            out.float().sum().backward()
    if not inside:
        out.float().sum().backward()
    return [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("solver", ["pinv", "newton_schulz"])
def test_gradients_do_not_depend_on_where_backward_runs(solver):
    # Autocast was off in the forward pass only: a backward inside the block ran the float32 sections' backward in
    # bfloat16 (a review measured gradients 5-70 off with pinv, 0.02-0.29 with Newton-Schulz). As for SDPA, where
    # backward runs must change nothing: bitwise the gradients of the bfloat16 inputs' call.
    inputs = [x.requires_grad_() for x in smooth_tokens()]
    landmarks = nystrom.get_strategy("kmeans")(*(x.detach() for x in inputs[:2]), 32, head_axis=-3)
    calls = {"approximate": lambda q, k, v: nystrom.approximate(q, k, v, num_landmarks=32, solver=solver),
             "fna_attention": lambda q, k, v: fna_attention(q, k, v, landmarks, solver=solver)[0]}
    for name, call in calls.items():
        outside, inside = (gradients(call, inputs, where) for where in (False, True))
        half = [x.detach().bfloat16().requires_grad_() for x in inputs]
        cast = dataclasses.replace(landmarks, queries=landmarks.queries.bfloat16(), keys=landmarks.keys.bfloat16())
        plain = (nystrom.approximate(*half, num_landmarks=32, solver=solver) if name == "approximate"
                 else fna_attention(*half, cast, solver=solver)[0])
        plain.float().sum().backward()
        for got_inside, got_outside, want in zip(inside, outside, half):
            assert torch.equal(got_inside, got_outside), name
            assert torch.equal(got_outside, want.grad.float()), name


def test_a_patched_models_gradients_do_not_depend_on_where_backward_runs():
    pytest.importorskip("transformers")
    from test_capture import tiny_inputs, tiny_model

    model = tiny_model("vit", dtype=torch.float32).eval()
    pixels = tiny_inputs("vit", dtype=torch.float32)["pixel_values"].requires_grad_()
    with nystrom.fna(model, num_landmarks=8):
        outside, inside = (gradients(lambda p: model(pixel_values=p).last_hidden_state, [pixels], where)
                           for where in (False, True))
    assert torch.equal(inside[0], outside[0])


def test_a_retained_graph_runs_backward_again_and_a_second_derivative_is_an_error():
    # The own-graph backward deleted its graph after one use (retain_graph=True then failed with an AttributeError),
    # and a second derivative came out None or raised the same error: it is refused by name now.
    Q, K, V = smooth_tokens()
    q = Q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nystrom.approximate(q, K, V, num_landmarks=32, solver="pinv").float().sum()
    loss.backward(retain_graph=True)
    first = q.grad.clone()
    loss.backward()
    assert torch.equal(q.grad, 2 * first)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nystrom.approximate(q, K, V, num_landmarks=32, solver="pinv")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.float().square().sum(), q, create_graph=True)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_a_call_under_autocast_that_wants_gradients_compiles_into_one_graph():
    # The own-graph backward cannot be traced (Dynamo refused its context's attribute deletion): a traced call is the
    # plain one, as before it.
    Q, K, V = smooth_tokens(n=64, d=16)

    def call(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nystrom.approximate(q, k, v, num_landmarks=16, strategy="uniform", solver="pinv", seed=0,
                                       check_values=False)

    compiled = torch.compile(call, fullgraph=True, backend="eager")(Q.clone().requires_grad_(), K, V)
    assert torch.equal(compiled, call(Q.clone().requires_grad_(), K, V))
