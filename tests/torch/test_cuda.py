"""The CUDA path, on a GPU: every strategy and dtype on the device, no host synchronisation, patched models.

Skipped without CUDA (the CPU suite proves what it can without one: meta tensors in ``test_approximation.py``).
``python benchmarks/gpu.py`` runs these first on a GPU machine.
"""

import copy
import dataclasses
import os

import pytest
import torch

import nystrom
from nystrom.torch.attention import fna_attention

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The device's output against the float64 product of the same (rounded) inputs with the same landmarks: only the
# device's arithmetic differs. The CPU path in each dtype measured at most 9.3e-7 (float32), 4.6e-3 (bfloat16: the
# output keeps 8 bits, 2^-9 ~ 2e-3 per element) and 7.0e-4 (float16) on these inputs, every strategy, masked or not;
# three times that leaves room for the GPU kernels' other summation orders. A zero output is 1.0 away.
TOLERANCE = {torch.float32: 3e-6, torch.bfloat16: 1.5e-2, torch.float16: 2.5e-3}


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


def on_host_float64(landmarks):
    """The landmarks in float64 on the host (indices kept as integers)."""
    def move(x):
        return None if x is None else (x.cpu().double() if x.is_floating_point() else x.cpu())

    return dataclasses.replace(landmarks, queries=move(landmarks.queries), keys=move(landmarks.keys),
                               log_weights=move(landmarks.log_weights), indices=move(landmarks.indices),
                               query_indices=move(landmarks.query_indices), grouping=None)


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_every_strategy_and_dtype_on_the_device(strategy, dtype, masked):
    Q, K, V, mask = inputs(dtype, masked)
    rounded = [x.to(dtype) for x in (Q, K, V)]
    on = [x.cuda() for x in rounded]
    out, info = nystrom.approximate(*on, strategy=strategy, num_landmarks=64, attn_mask=None if mask is None
                                    else mask.cuda(), seed=0, return_info=True)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == V.shape
    assert info.landmarks.keys.device.type == "cuda"
    assert torch.isfinite(out).all()
    reference, _ = fna_attention(*(x.double() for x in rounded), on_host_float64(info.landmarks), attn_mask=mask)
    assert relative_error(out.cpu(), reference) <= TOLERANCE[dtype]


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


def test_patched_model_on_the_device_computes_what_it_computes_on_the_host():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(image_size=56, patch_size=7, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    on_host = copy.deepcopy(model)
    model = model.cuda()
    pixels = torch.randn(2, 3, 56, 56)
    # cuDNN's convolutions (the patch embedding) run in TF32 by default: 10 bits, far above float32's rounding.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = model(pixel_values=pixels.cuda()).last_hidden_state
            with nystrom.fna(model, num_landmarks=32):
                approx = model(pixel_values=pixels.cuda()).last_hidden_state
            host_exact = on_host(pixel_values=pixels).last_hidden_state
            with nystrom.fna(on_host, num_landmarks=32):
                host = on_host(pixel_values=pixels).last_hidden_state
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert approx.device.type == "cuda" and torch.isfinite(approx).all()
    # The residual stream dominates the hidden states: FNA at m = 32 of 65 tokens moves them by 6e-4 (relative),
    # and zero attention outputs by 0.03. So the check is on what the patch changes, against the host's patched
    # model, whose path the CPU suite tests against float64 references: float32 on both and the same deterministic
    # landmarks, so the two changes differ by the hidden states' rounding (about 1e-6 of them, under 1e-2 of the
    # change).
    change, host_change = (approx - exact).cpu(), host - host_exact
    assert relative_error(change, host_change.double()) <= 1e-2
