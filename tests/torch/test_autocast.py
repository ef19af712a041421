"""Under ``torch.autocast`` the library runs as SDPA does there: inputs in the autocast dtype, its own float32
sections kept in float32 (:mod:`nystrom.torch.autocast`)."""

import contextlib
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


def test_the_reference_and_the_error_estimates_keep_the_inputs_precision_under_autocast():
    # exact_attention is the reference and the estimates compare with exact rows: under CPU autocast their products
    # ran in bfloat16 (a review: an estimate of 7.0e-3 for an approximation 8.8e-6 away, and exact_attention 6.9e-3
    # from float32 SDPA). Now the same numbers inside and outside autocast: the same float32 code on the same inputs.
    torch.manual_seed(0)
    Q, K, V = (torch.randn(1, 2, 256, 32) for _ in range(3))
    out, info = nystrom.approximate(Q, K, V, num_landmarks=256, solver="pinv", return_info=True)
    outside = (nystrom.exact_attention(Q, K, V), nystrom.estimate_relative_error(Q, K, V, out, seed=0),
               info.estimate_error(seed=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (nystrom.exact_attention(Q, K, V), nystrom.estimate_relative_error(Q, K, V, out, seed=0),
                  info.estimate_error(seed=0))
    assert inside[0].dtype == torch.float32
    torch.testing.assert_close(inside[0], outside[0], rtol=0, atol=0)
    assert inside[1:] == outside[1:]
    # float32 pinv at m = n: within float32 rounding of exact attention (measured 8.9e-6), far below bfloat16's 4e-3.
    assert inside[2].high < 1e-4


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
    from test_capture import assert_fna_ran, tiny_inputs, tiny_model

    model = tiny_model("vit", dtype=torch.float32).eval()
    pixels = tiny_inputs("vit", dtype=torch.float32)["pixel_values"].requires_grad_()
    with nystrom.fna(model, num_landmarks=8) as handle:
        outside, inside = (gradients(lambda p: model(pixel_values=p).last_hidden_state, [pixels], where)
                           for where in (False, True))
    assert_fna_ran(handle)
    assert torch.equal(inside[0], outside[0])



@pytest.mark.parametrize("precision", ["float16", "autocast"])
def test_returned_attention_weights_carry_their_gradient_in_a_graph_of_its_own(precision):
    # output_attentions=True on an eager model: the weights came back attached to the graph of their own's detached
    # copies, so a loss on them gave the model's weights no gradient in float16 or under autocast (a review: None where
    # float32 gave 0.10). Now each returned tensor differentiates through that graph: the same gradient as the plain
    # float32 call within the precision's rounding.
    pytest.importorskip("transformers")
    from test_capture import assert_fna_ran, tiny_inputs, tiny_model

    def weight_gradient(model, autocast):
        model.zero_grad()
        with nystrom.fna(model, num_landmarks=8, layers=[1]) as handle, torch.autocast("cpu", enabled=autocast):
            attentions = model(**tiny_inputs("bert"), output_attentions=True).attentions
        assert_fna_ran(handle)
        attentions[1].float().pow(2).sum().backward()
        return model.encoder.layer[1].attention.self.query.weight.grad.float()

    reference = weight_gradient(tiny_model("bert", "eager", torch.float32), False)
    model = tiny_model("bert", "eager", torch.float16 if precision == "float16" else torch.float32)
    got = weight_gradient(model, precision == "autocast")
    assert got is not None and bool(torch.isfinite(got).all())
    # Half precision through attention, its softmax and the solve: measured 2.2e-3 (float16) and 1.3e-2 (bfloat16)
    # relative; 4.5x and 2.3x that. Before the fix: no gradient at all.
    assert relative_error(got, reference) < {"float16": 1e-2, "autocast": 3e-2}[precision]

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


def test_given_landmarks_that_depend_on_the_inputs_pass_their_gradient_under_autocast():
    # The own graph took Q, K and V as its inputs and the landmarks as constants: the gradient that reaches Q and K
    # through landmarks chosen from them was dropped.
    Q, K, V = smooth_tokens()
    at = torch.arange(0, 128, 8)

    def gradient(q, k, v, autocast):
        q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
        landmarks = nystrom.Landmarks(queries=q[..., at, :], keys=k[..., at, :])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fna_attention(q, k, v, landmarks)
        return torch.autograd.grad(out.float().sum(), (q, k))

    want = gradient(*(x.bfloat16() for x in (Q, K, V)), False)
    got = gradient(Q, K, V, True)
    for name, a, b in zip("QK", got, want):
        # The same computation on the same bfloat16 values, up to the rounding of the gradients' last cast to
        # bfloat16 (eps 7.8e-3) and of their sums over the landmark slices: 1.3e-3 measured.
        assert relative_error(a, b.double()) < 2e-2, name


@pytest.mark.parametrize("values,cotangent", [(30, 1000), (100, 300), (1000, 30)])
def test_float16_gradients_are_finite_wherever_they_fit(values, cotangent):
    # A review: with |dL/dO| of 1,000 (a loss scale) all float16 gradients were NaN, where the float32 ones are at
    # most 8.7e3. Two causes: the float16 product's cotangent was the output's times c = max |v'|, and the gradients
    # of the landmark means, sums over the tokens each stands for, passed 65,504 (1.6e5 for |dK| at most 2e4).
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 4, 256, 64, generator=g) for _ in range(3))
    V, G = values * V, cotangent * torch.randn(1, 4, 256, 64, generator=g)

    def gradients(dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in (Q, K, V))
        nystrom.approximate(q, k, v, num_landmarks=32).backward(G.to(dtype))
        return [x.grad.float() for x in (q, k, v)]

    for name, half, full in zip("QKV", gradients(torch.float16), gradients(torch.float32)):
        assert float(full.abs().max()) < 65504 / 2, name  # the case is one where they fit
        assert torch.isfinite(half).all(), name
        # float16's eps is 9.8e-4; measured 2.4e-3 at most, through the logits, the softmaxes and three products.
        assert relative_error(half, full.double()) < 2e-2, name


@pytest.mark.parametrize("seed", range(5))
def test_float16_gradients_overflow_only_where_they_do_not_fit(seed):
    # A review: |V| at most 383 and an upstream gradient of 1; in the backward of B V the landmark queries' gradient,
    # a sum over the keys amplified by A^+, reached 9.3e4, and dQ came out inf in 26-355 entries in 4 of 5 draws where
    # float32's largest was 1.7e4-2.7e4. The backward runs again in float32 where that happens.
    g = torch.Generator().manual_seed(seed)
    Q, K, V = 3 * torch.randn(1, 2, 256, 16, generator=g), 3 * torch.randn(1, 2, 256, 16, generator=g), \
        100 * torch.randn(1, 2, 256, 16, generator=g)

    def gradients(dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in (Q, K, V))
        nystrom.approximate(q, k, v, num_landmarks=16).float().sum().backward()
        return [x.grad.double() for x in (q, k, v)]

    for name, half, full in zip("QKV", gradients(torch.float16), gradients(torch.float64)):
        # inf exactly where float64's gradient is past float16's largest, 65,504 (measured: 2 entries of dK in draw
        # 0, of dQ in draw 2), give or take the rounding at the edge.
        finite = torch.isfinite(half)
        assert bool((full[~finite].abs() > 6e4).all()) and not bool(finite[full.abs() > 7e4].any()), name
        # float16's eps 9.8e-4 through the products, the solve and the float32 recompute: 2.5e-3 measured.
        assert relative_error(half[finite], full[finite]) < 2e-2, name


def test_float16_given_landmarks_pass_their_gradient():
    # The float16 own graph differentiates given landmark tensors too (which the autocast one dropped, above).
    Q, K, V = smooth_tokens()
    at = torch.arange(0, 128, 8)

    def gradient(dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in (Q, K, V))
        landmarks = nystrom.Landmarks(queries=q[..., at, :], keys=k[..., at, :])
        fna_attention(q, k, v, landmarks, "newton_schulz")[0].float().sum().backward()
        return [x.grad.float() for x in (q, k, v)]

    for name, half, full in zip("QKV", gradient(torch.float16), gradient(torch.float32)):
        # float16's eps 9.8e-4 through the products and the solve: 5.2e-3 measured.
        assert relative_error(half, full.double()) < 2e-2, name


def test_a_patched_float16_model_under_a_loss_scale_keeps_finite_gradients():
    pytest.importorskip("transformers")
    from test_capture import assert_fna_ran, tiny_inputs, tiny_model

    weight = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))

    def gradient(dtype):
        model = tiny_model("vit", dtype=dtype).eval()
        pixels = tiny_inputs("vit", dtype=dtype)["pixel_values"].requires_grad_()
        with nystrom.fna(model, num_landmarks=8) as handle:
            # A loss scale of 2^12: the largest pixel gradient is 1.7e4, within float16's range.
            (2.0**12 * (model(pixel_values=pixels).last_hidden_state.float() * weight).sum()).backward()
        assert_fna_ran(handle)
        return pixels.grad.float()

    half, full = gradient(torch.float16), gradient(torch.float32)
    assert torch.isfinite(half).all()
    # Four layers of float16 (eps 9.8e-4) around FNA: 3.0e-3 measured (1.4e-3 unpatched).
    assert relative_error(half, full.double()) < 2e-2


@pytest.mark.parametrize("dtype, autocast", [(torch.float16, False), (torch.float32, True)])
def test_a_patched_layer_checks_its_call_once_in_a_graph_of_its_own(monkeypatch, dtype, autocast):
    # The float16 and autocast branches re-entered the whole layer call inside their graph: every check and host read
    # (the padding mask, the real-token counts, the exclusion) ran twice per layer and pass.
    pytest.importorskip("transformers")
    from test_capture import tiny_inputs, tiny_model

    import nystrom.torch.patching as patching

    calls = []
    padding = patching.padding_mask_from_attention_mask

    def counted(*args, **kwargs):
        calls.append(1)
        return padding(*args, **kwargs)

    monkeypatch.setattr(patching, "padding_mask_from_attention_mask", counted)
    model = tiny_model("vit", dtype=dtype).eval()
    pixels = tiny_inputs("vit", dtype=dtype)["pixel_values"].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), nystrom.fna(model, layers=[2], num_landmarks=8):
        out = model(pixel_values=pixels).last_hidden_state
    out.float().sum().backward()
    assert len(calls) == 1 and torch.isfinite(pixels.grad).all()


def test_finite_values_past_the_autocast_dtypes_range_are_named_as_such():
    # float32 padding of 1e30 under float16 autocast is infinite in the dtype the call runs in: the message said "K
    # contains NaN or infinite values" of a K that holds none (a review).
    K = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
    K[..., 60:, :] = 1e30
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(ValueError, match="contains NaN or infinite values in torch.float16, the dtype "
                                             "torch.autocast gives SDPA"):
            nystrom.approximate(K, K, K, torch.arange(64) < 60, num_landmarks=8)
    # A caller's own infinity keeps the plain message, cast or not.
    K[0, 0, 0, 0] = float("inf")
    for dtype in (torch.float32, torch.float16):
        with torch.autocast("cpu", dtype=torch.float16):
            with pytest.raises(ValueError, match="contains NaN or infinite values$"):
                nystrom.approximate(K.to(dtype), K.to(dtype), K.to(dtype), num_landmarks=8)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bad", ["numpy", "none", "list"])
def test_keys_or_values_of_another_kind_are_named_in_float16_and_under_autocast(autocast, bad):
    # A fuzzing review: float16 torch queries (or any under autocast) with a numpy V, a list or None reached the
    # graph-of-its-own wrapper, which read .requires_grad: an AttributeError from inside, where float32 gave the
    # argument check's TypeError.
    Q = torch.randn(6, 3, dtype=torch.float32 if autocast else torch.float16)
    V = {"numpy": Q.float().numpy(), "none": None, "list": Q.tolist()}[bad]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, pytest.raises(TypeError, match="V "):
        nystrom.approximate(Q, Q, V, num_landmarks=3)
