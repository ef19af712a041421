"""The CUDA path, on a GPU: every strategy and dtype on the device, no host synchronisation, patched models.

Skipped without CUDA (the CPU suite proves what it can without one: meta tensors in ``test_approximation.py``).
``python benchmarks/gpu.py`` runs these first on a GPU machine.
"""

import os

import pytest
import torch

import nystrom

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative error against float64 exact attention may exceed the float64 approximation's by the inputs' and the
# kernels' rounding: bf16 keeps 8 bits (2^-8 ~ 4e-3 per element, more after the m x m solve), fp16 11 bits, fp32
# matmuls may use TF32 (10 bits) on recent GPUs.
SLACK = {torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def inputs(dtype, masked, shape=(2, 4, 1024, 64)):
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(shape[0], 1, 1, shape[2], dtype=torch.bool)
        mask[1, ..., 700:] = False
    return Q, K, V, mask


def relative_error(out, ref):
    return float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref))


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_every_strategy_and_dtype_on_the_device(strategy, dtype, masked):
    Q, K, V, mask = inputs(dtype, masked)
    exact = nystrom.exact_attention(Q, K, V, attn_mask=mask)
    reference = relative_error(nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=64, attn_mask=mask,
                                                   seed=0), exact)
    on = [x if x is None else x.cuda() for x in (Q.to(dtype), K.to(dtype), V.to(dtype), mask)]
    out, info = nystrom.approximate(*on[:3], strategy=strategy, num_landmarks=64, attn_mask=on[3], seed=0,
                                    return_info=True)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == V.shape
    assert info.landmarks.keys.device.type == "cuda"
    assert torch.isfinite(out).all()
    assert relative_error(out.cpu(), exact) <= reference + SLACK[dtype]


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
@pytest.mark.parametrize("masked", [False, True])
def test_without_value_checks_nothing_synchronises(strategy, masked):
    # CUDA's sync debug mode raises on every operation that waits for the device (a .item(), a bool(), a copy
    # to the host, nonzero): with check_values=False the whole call must queue its kernels and return.
    Q, K, V, mask = (x if x is None else x.cuda() for x in inputs(torch.bfloat16, masked))
    Q, K, V = (x.to(torch.bfloat16) for x in (Q, K, V))
    nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=64, attn_mask=mask, seed=0, check_values=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=64, attn_mask=mask, seed=0,
                            check_values=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gradients_on_the_device_equal_sdpa_with_every_key_a_landmark():
    Q, K, V, _ = inputs(torch.float64, False, shape=(1, 2, 48, 16))
    Q, K, V = (x.cuda().requires_grad_() for x in (Q, K, V))
    out = nystrom.approximate(Q, K, V, num_landmarks=48, solver=nystrom.PInv(rtol=1e-14))
    grads = torch.autograd.grad(out.square().sum(), (Q, K, V))
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(Q, K, V).square().sum(), (Q, K, V))
    for got, expected in zip(grads, want):
        # float64 with an exact pseudo-inverse: the two differ by the solve's rounding times cond(A).
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-8)


def test_patched_model_runs_on_the_device():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(image_size=56, patch_size=7, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).cuda().eval()
    pixels = torch.randn(2, 3, 56, 56, device="cuda")
    with torch.no_grad():
        exact = model(pixel_values=pixels).last_hidden_state
        with nystrom.fna(model, num_landmarks=32):
            approx = model(pixel_values=pixels).last_hidden_state
    assert approx.device.type == "cuda" and torch.isfinite(approx).all()
    cosine = torch.nn.functional.cosine_similarity(approx.flatten(1), exact.flatten(1)).min()
    assert cosine > 0.9, cosine
