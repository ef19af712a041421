"""The torch backend: agreement with the numpy reference, dtypes, autograd, compile, devices."""

import array_api_compat
import numpy as np
import pytest
import torch

import nystrom
import nystrom.torch
from nystrom import NewtonSchulz, PInv
from nystrom.linalg.attention import landmark_kernel

STRATEGIES = nystrom.STRATEGIES
SOLVERS = nystrom.SOLVERS
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def qkv_np(seed=0, shape=(2, 3, 48, 16), dv=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal((*shape[:-1], dv))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_matches_numpy_reference(strategy, solver):
    # Same float64 math on both sides (the torch side goes through SDPA's math path): only the summation order
    # differs, amplified by the solve. Measured: at most 3.1e-14 of max |ref| (pinv, whose exact inverse makes the
    # output reach 30; 3e-15 with the other solvers), on 1 and 2 threads; 1e-12 of max |ref| leaves 30x.
    Q, K, V = qkv_np()
    ref = nystrom.approximate(Q, K, V, strategy=strategy, solver=solver, num_landmarks=12, seed=4)
    got = nystrom.approximate(*(torch.from_numpy(x) for x in (Q, K, V)), strategy=strategy, solver=solver,
                              num_landmarks=12, seed=4)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12 * float(np.abs(ref).max()))


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_reproduce_exact_attention(device):
    Q, K, V = (torch.from_numpy(x).to(device) for x in qkv_np(1, shape=(1, 2, 20, 8)))
    out = nystrom.approximate(Q, K, V, num_landmarks=20, solver=PInv(rtol=1e-14))
    # float64 with every token a landmark: the rounding of A^{-1} bounds the error by cond(A) eps max |O|, with
    # cond(A) = 1.9e3 here: 5e-13. Measured on the CPU: 1.2e-14.
    torch.testing.assert_close(out, nystrom.exact_attention(Q, K, V), rtol=0, atol=5e-13)


# Relative Frobenius error of m = n against exact attention in float64, measured on the CPU (these inputs; in brackets
# the largest over ten more seeds): float32 3.9e-6 [1.1e-5], cond(A) times eps32; float16 5.5e-4 [5.6e-4] and
# bfloat16 3.6e-3 [4.2e-3], about what exact attention itself makes in those dtypes (4.3e-4 and 3.3e-3: the inputs
# and outputs rounded to 11 and 8 bits). Newton-Schulz stopped at its 6 fixed steps, unconverged, is off by 0.022.
# The tolerances leave 5x (float32), 2.7x (float16) and 2.2x (bfloat16, one ulp of the format at 1) over the
# measurement and stay 3x or more below 0.022. CUDA (a GPU's SDPA kernels round otherwise) was not measured here and
# keeps the bounds these replaced, 10 ulps of the output format.
DTYPE_TOL = {"cpu": {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3},
             "cuda": {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_m_equals_n(dtype, device):
    Q, K, V = (torch.from_numpy(x) for x in qkv_np(2, shape=(1, 2, 24, 16)))
    exact = nystrom.exact_attention(Q, K, V)
    out = nystrom.approximate(*(x.to(device, dtype) for x in (Q, K, V)), num_landmarks=24,
                              solver=NewtonSchulz(tol=1e-6, max_iters=100))
    assert out.dtype == dtype and out.device.type == device
    err = torch.linalg.norm(out.double().cpu() - exact) / torch.linalg.norm(exact)
    assert err < DTYPE_TOL[device][dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits_stay_finite(dtype):
    # |q.k| * scale up to ~50: exp would overflow float16 (max 65504 ~ e^11) without the max shift.
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(1, 2, 64, 16, generator=g) * 7
    K = torch.randn(1, 2, 64, 16, generator=g) * 7
    V = torch.randn(1, 2, 64, 16, generator=g)
    out = nystrom.approximate(Q.to(dtype), K.to(dtype), V.to(dtype), num_landmarks=16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("solver", ["pinv", "newton_schulz"])
def test_float16_never_overflows_where_exact_attention_is_finite(solver):
    # v' = A^+ B V is not an average of V: A^+ amplifies, and with V near float16's largest value (65,504) v' leaves
    # the format (the rescaled path). The output itself may leave it too where the approximation is poor (pinv here,
    # float32 output up to 1.1e5 against exact attention's 2.1e4; a review found 83 of 144 such float16 calls inf).
    # Exact attention stays within the range, so clipping to it moves no entry away from exact attention.
    g = torch.Generator().manual_seed(2)
    Q, K = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(2))
    V = (torch.randn(1, 2, 64, 8, generator=g) * 3e4).clamp(-6e4, 6e4)
    Q, K, V = (x.half().float() for x in (Q, K, V))  # the same inputs in both precisions
    landmarks = nystrom.get_strategy("norm")(Q, K, 16, head_axis=-3)
    A = landmark_kernel(array_api_compat.torch, landmarks.queries.double(), landmarks.keys.double(), 0.25,
                        landmarks.log_weights.double())
    vp = torch.linalg.pinv(A) @ nystrom.exact_attention(landmarks.queries.double(), K.double(), V.double())
    assert vp.abs().max() > 65504  # the case of the rescaled path
    exact = nystrom.exact_attention(Q.double(), K.double(), V.double())
    single = nystrom.approximate(Q, K, V, num_landmarks=16, solver=solver).double()
    half = nystrom.approximate(Q.half(), K.half(), V.half(), num_landmarks=16, solver=solver)
    assert torch.isfinite(half).all()
    # No farther from exact attention than float32 is, up to float16's rounding (2^-11 relative per entry).
    slack = 1e-3 * torch.linalg.norm(exact)
    assert torch.linalg.norm(half.double() - exact) <= torch.linalg.norm(single - exact) + slack


# The docs' pseudo-inverse page: Ridge and fixed-step Newton-Schulz are differentiated exactly, through weighted
# landmarks (kmeans, norm: the means and log c_j), key masks and cross-attention (n_q != n) too.
GRADCHECK_CASES = [("segment_means", "newton_schulz", 10, False), ("fps", "newton_schulz", 10, False),
                   ("norm", "newton_schulz", 10, True), ("kmeans", "ridge", 7, True), ("uniform", "ridge", 10, True)]


@pytest.mark.parametrize("strategy,solver,n_q,masked", GRADCHECK_CASES)
def test_gradients_flow_and_match_finite_differences(strategy, solver, n_q, masked):
    g = torch.Generator().manual_seed(1)
    Q = torch.randn(2, 2, n_q, 3, generator=g, dtype=torch.float64, requires_grad=True)
    K, V = (torch.randn(2, 2, 10, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        mask[1, ..., 8:] = False

    def f(q, k, v):
        return nystrom.approximate(q, k, v, attn_mask=mask, strategy=strategy, num_landmarks=4, solver=solver, seed=0)

    # float64 central differences with a step of 1e-6 round by about eps |f| / 1e-6 = 2e-10 per evaluation:
    # measured 2-3e-9 at most; 10x. rtol=0: gradcheck's default 1e-3 alone passed 0.1 % off.
    assert torch.autograd.gradcheck(f, (Q, K, V), eps=1e-6, atol=3e-8, rtol=0)


def test_query_chunking_changes_nothing():
    Q, K, V = (torch.from_numpy(x).float() for x in qkv_np(3, shape=(1, 2, 100, 16)))
    full = nystrom.approximate(Q, K, V, num_landmarks=16)
    # float32; a chunk changes only how SDPA blocks the query rows: at most 2.1e-7 measured (chunks of 1 and 7; 0 for
    # 64 and more), 2.4 ulps of max |out| = 0.73; 1e-6 leaves 5x.
    for chunk in (1, 7, 64, 100, 1000):
        torch.testing.assert_close(nystrom.approximate(Q, K, V, num_landmarks=16, query_chunk_size=chunk), full,
                                   rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile():
    # Inductor's generated code, in one graph (fullgraph=True raises at a graph break; every strategy is traced in
    # tests/torch/test_device.py with the cheaper eager backend). segment_means has the fewest operations to compile.
    Q, K, V = (torch.from_numpy(x).float() for x in qkv_np(4, shape=(1, 2, 32, 8)))

    def f(q, k, v):
        return nystrom.approximate(q, k, v, strategy="segment_means", num_landmarks=8, check_values=False)

    compiled = torch.compile(f, fullgraph=True)
    # Fused kernels reassociate the float32 sums (softmax, the products, six Newton-Schulz steps): rounding, a few
    # units in the last place of the output, well inside 1e-5.
    torch.testing.assert_close(compiled(Q, K, V), f(Q, K, V), rtol=1e-5, atol=1e-6)


def test_inputs_are_not_modified():
    Q, K, V = (torch.from_numpy(x) for x in qkv_np(5))
    copies = [x.clone() for x in (Q, K, V)]
    for s in STRATEGIES:
        nystrom.approximate(Q, K, V, strategy=s, num_landmarks=8, seed=0)
    for x, c in zip((Q, K, V), copies):
        assert torch.equal(x, c)


def test_per_head_and_shared_landmarks():
    Q, K, V = (torch.from_numpy(x) for x in qkv_np(6))
    _, shared = nystrom.approximate(Q, K, V, num_landmarks=8, return_info=True)
    _, per_head = nystrom.approximate(Q, K, V, num_landmarks=8, return_info=True, share_landmarks_across_heads=False)
    # One clustering per sequence when shared (B, n); one per head otherwise (B, H, n).
    assert shared.landmarks.assignment.shape == (2, 48)
    assert per_head.landmarks.assignment.shape == (2, 3, 48)
    assert not (per_head.landmarks.assignment == per_head.landmarks.assignment[:, :1]).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    Q, K, V = (torch.from_numpy(x).float() for x in qkv_np(7))
    cpu = nystrom.approximate(Q, K, V, num_landmarks=12)
    gpu = nystrom.approximate(Q.cuda(), K.cuda(), V.cuda(), num_landmarks=12)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("moved", ["Q", "K", "V", "attn_mask"])
def test_device_mismatch_is_an_error(moved):
    # A tensor on the 'meta' device (shapes only, no data) differs from the CPU like a GPU one: the check names it,
    # before any computation reads it.
    args = dict(Q=torch.zeros(1, 4, 2), K=torch.zeros(1, 4, 2), V=torch.zeros(1, 4, 2),
                attn_mask=torch.ones(1, 4, dtype=torch.bool))
    args[moved] = args[moved].to("meta")
    expected = "K is on device cpu but Q is on meta" if moved == "Q" else f"{moved} is on device meta but Q is on cpu"
    with pytest.raises(ValueError, match=expected):
        nystrom.approximate(args["Q"], args["K"], args["V"], attn_mask=args["attn_mask"], num_landmarks=2)
    Q, K, V = (torch.zeros(1, 4, 2) for _ in range(3))
    landmarks = nystrom.FPS()(Q, K, 2)
    with pytest.raises(ValueError, match="landmark queries is on device meta but K is on cpu"):
        nystrom.torch.fna_attention(Q, K, V, nystrom.Landmarks(landmarks.queries.to("meta"), landmarks.keys))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_with_cuda_is_an_error():
    Q, K, V = (torch.zeros(1, 4, 2) for _ in range(3))
    with pytest.raises(ValueError, match=r"K is on device cuda(:\d+)? but Q is on cpu"):
        nystrom.approximate(Q, K.cuda(), V, num_landmarks=2)


def test_fna_attention_checks_like_approximate():
    # The public torch kernel has the array-API contract: a wrong d is named, not a matmul error deep inside.
    Q, K, V = (torch.from_numpy(x) for x in qkv_np(2, shape=(1, 2, 16, 8)))
    landmarks = nystrom.FPS()(Q, K, 4)
    with pytest.raises(ValueError, match="Q and K must have the same feature size d"):
        nystrom.torch.fna_attention(Q, K[..., :7], V, landmarks)
    with pytest.raises(TypeError, match="must be torch tensors"):
        nystrom.torch.fna_attention(Q.numpy(), K.numpy(), V.numpy(), landmarks)
    with pytest.raises(ValueError, match="landmark queries have shape"):
        nystrom.torch.fna_attention(Q, K, V, nystrom.Landmarks(landmarks.queries, landmarks.keys[..., :3, :]))
    with pytest.raises(ValueError, match="K contains NaN"):
        nystrom.torch.fna_attention(Q, K.clone().fill_(float("nan")), V, landmarks)
    with pytest.raises(ValueError, match="query_chunk_size"):
        nystrom.torch.fna_attention(Q, K, V, landmarks, query_chunk_size=0)
    for wrong in (None, "fps", landmarks.keys):
        with pytest.raises(TypeError, match="landmarks must be Landmarks"):
            nystrom.torch.fna_attention(Q, K, V, wrong)


def test_fna_attention_equals_the_array_api_product():
    Q, K, V = (torch.from_numpy(x) for x in qkv_np(3, shape=(2, 2, 24, 8)))
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., 18:] = False
    landmarks = nystrom.FPS()(Q, K, 6, attn_mask=mask, head_axis=-3)
    fused, _ = nystrom.torch.fna_attention(Q, K, V, landmarks, attn_mask=mask, query_chunk_size=5)
    reference, _ = nystrom.linalg.nystrom_attention(Q, K, V, landmarks, attn_mask=mask)
    # float64 on both sides; only the summation order differs (measured 1.2e-15).
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)


# float32: the blocks and their merge change only the summation order over n ~ 4e3 keys, ~ sqrt(n) * eps (measured
# 1.9e-7); bfloat16: the kernel's output is rounded to 8 bits of mantissa, 2^-8 ~ 4e-3 of outputs below 1, per block
# (measured 6.0e-4 on outputs up to 0.18).
SPLIT_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=4e-3)}


@pytest.mark.parametrize("dtype", list(SPLIT_TOLERANCE))
@pytest.mark.parametrize("n", [4096, 4099])
@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_split_key_sdpa_equals_sdpa(dtype, n, blocks, masked):
    from nystrom.torch.attention import split_key_sdpa

    g = torch.Generator().manual_seed(n + blocks)
    q, k, v = (torch.randn(2, 3, rows, 8, generator=g).to(dtype) for rows in (16, n, n))
    mask = None
    if masked:
        mask = torch.rand(2, 1, 1, n, generator=g) > 0.3
        # The whole first half of sequence 0 masked: whole blocks with no key, whose weight must be 0.
        mask[0, ..., : n // 2] = False
    got = split_key_sdpa(q, k, v, mask, scale=0.3, blocks=blocks)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                             scale=0.3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **SPLIT_TOLERANCE[dtype])


def test_key_blocks_gives_every_thread_a_task(monkeypatch):
    from nystrom.torch.attention import MIN_KEYS_PER_BLOCK, key_blocks

    n = 16 * MIN_KEYS_PER_BLOCK
    k = torch.empty(1, 1, n, 64)

    def blocks(threads, heads=1, m=32, dtype=torch.float32, width=64, grad=False):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        q = torch.empty(1, heads, m, 64, dtype=dtype, requires_grad=grad)
        return key_blocks(q, k.to(dtype), torch.empty(1, 1, n, width, dtype=dtype))

    assert blocks(1) == 1
    assert blocks(2) == 2 and blocks(16) == 16
    assert blocks(16, m=64) == 8  # two tasks of 32 queries per head already
    assert blocks(16, heads=12) == 2 and blocks(8, heads=12) == 1
    assert blocks(64) == 16  # never fewer than MIN_KEYS_PER_BLOCK keys per block
    # The cases the split does not serve: float64 (the kernel is ~1e-9 off), values of another width, gradients.
    assert blocks(16, dtype=torch.float64) == 1 and blocks(16, width=32) == 1 and blocks(16, grad=True) == 1
    assert blocks(16, m=32, heads=1) == 16
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert key_blocks(torch.empty(1, 1, 32, 64), torch.empty(1, 1, 100, 64), torch.empty(1, 1, 100, 64)) == 1


def test_approximate_is_the_same_with_split_keys(monkeypatch):
    # The landmark product of one head, m = 16, over n = 16,384 keys splits in 2 blocks with 2 threads.
    import nystrom.torch.attention as attention

    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 1, 16384, 32, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 1, 16384, dtype=torch.bool)
    mask[..., 5000:] = False
    calls = []
    split = attention.split_key_sdpa
    monkeypatch.setattr(attention, "split_key_sdpa", lambda *a, **kw: calls.append(kw["blocks"]) or split(*a, **kw))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    got = nystrom.approximate(Q, K, V, num_landmarks=16, attn_mask=mask)
    assert calls == [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    want = nystrom.approximate(Q, K, V, num_landmarks=16, attn_mask=mask)
    assert len(calls) == 1
    # Same landmarks; the split changes only the summation order of the landmark product (see SPLIT_TOLERANCE),
    # which the 16 x 16 solve can amplify by cond(A) = 6e3. Measured bitwise equal.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_solve_is_returned_without_autograd_history(dtype):
    # Diagnostics, alike in every dtype: a float16 call's inverse and residual came from its graph of its own, which
    # they kept alive while passing no gradient to the inputs (a float32 call's did pass one; a review).
    Q, K, V = (torch.randn(1, 2, 20, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    out, solve = nystrom.torch.fna_attention(Q, K, V, nystrom.Landmarks(Q[..., :4, :], K[..., :4, :]))
    assert out.requires_grad
    assert not solve.inverse.requires_grad and not solve.residual.requires_grad and solve.product is None


def _layouts(g, n, d):
    """Equal values of K (and V) in layouts other than contiguous: transposed storage, an expanded feature axis."""
    transposed = torch.randn(1, 1, d, n, generator=g).transpose(-1, -2)
    expanded = torch.randn(1, 1, n, 1, generator=g).expand(1, 1, n, d)
    return {"transposed": transposed, "expanded": expanded}


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_split_key_sdpa_reads_inputs_of_any_strides(layout, which):
    # The CPU kernel reads the feature axis as unit-stride whatever the strides say: a transposed K gave an answer
    # 1.31 away from its contiguous copy's, and a strided q values near 1e27 (a review).
    from nystrom.torch.attention import split_key_sdpa

    g = torch.Generator().manual_seed(0)
    n, d = 4096, 8
    inputs = dict(q=torch.randn(1, 1, 16, d, generator=g), k=torch.randn(1, 1, n, d, generator=g),
                  v=torch.randn(1, 1, n, d, generator=g))
    rows = inputs[which].shape[-2]
    inputs[which] = _layouts(g, rows, d)[layout]
    assert inputs[which].stride(-1) != 1
    got = split_key_sdpa(*inputs.values(), scale=0.3, blocks=2)
    want = torch.nn.functional.scaled_dot_product_attention(*(x.double() for x in inputs.values()), scale=0.3)
    torch.testing.assert_close(got.double(), want, **SPLIT_TOLERANCE[torch.float32])


def test_approximate_with_split_keys_reads_a_transposed_key_matrix(monkeypatch):
    g = torch.Generator().manual_seed(1)
    n, d = 16384, 8
    Q, V = torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g)
    K = torch.randn(1, 1, d, n, generator=g).transpose(-1, -2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    got = nystrom.approximate(Q, K, V, num_landmarks=8)
    want = nystrom.approximate(Q, K.contiguous(), V, num_landmarks=8)
    # The same products on the same values whatever K's strides: measured bit for bit; 1e-5 (outputs up to 0.05)
    # leaves a BLAS that sums a strided K in another order its float32 rounding. The defect was 1.31 off.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("boolean", [True, False])
def test_split_key_sdpa_gives_a_query_row_with_no_key_zero_as_sdpa_does(boolean):
    from nystrom.torch.attention import split_key_sdpa

    g = torch.Generator().manual_seed(2)
    n = 4096
    q, k, v = (torch.randn(1, 1, rows, 8, generator=g) for rows in (8, n, n))
    mask = torch.ones(1, 1, 8, n, dtype=torch.bool)
    mask[..., 3, :] = False
    if not boolean:
        mask = torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)
    got = split_key_sdpa(q, k, v, mask, scale=0.3, blocks=3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.equal(got[..., 3, :], torch.zeros_like(got[..., 3, :]))
    torch.testing.assert_close(got, want, **SPLIT_TOLERANCE[torch.float32])


def test_sdpa_attend_differentiates_a_floating_mask_with_any_thread_count(monkeypatch):
    # The split kernel takes no gradient to its mask: a bias requiring grad raised "not differentiable" with two
    # threads (a review).
    from nystrom.torch.attention import sdpa_attend

    g = torch.Generator().manual_seed(3)
    n = 16384
    q, k, v = (torch.randn(1, 1, rows, 8, generator=g) for rows in (8, n, n))
    grads = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        bias = torch.zeros(1, 1, 8, n, requires_grad=True)
        sdpa_attend(q, k, v, bias, scale=0.3).square().sum().backward()
        grads.append(bias.grad)
    torch.testing.assert_close(grads[0], grads[1])
