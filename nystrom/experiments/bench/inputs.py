"""Attention inputs of the benchmarks: random, synthetic with an attention sink, and captured from real models."""

from __future__ import annotations

import math
import sys

import torch

from nystrom.torch.capture import capture_attention

from .. import pretrained


def random_qkv(shape, device, dtype, seed=0):
    """Standard normal ``Q, K, V``, each of ``shape`` (e.g. ``(1, H, n, d)``), drawn on ``device`` from ``seed``.

    Timing depends on the shape alone, so random values serve the scaling and breakdown sections.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))


def sink_inputs(n, d, heads=1, *, clusters=16, seed=0):
    r"""Synthetic attention inputs with an attention sink, float32 ``(1, heads, n, d)``.

    Tokens fall into ``clusters`` groups whose queries and keys share a centre (tokens of a group
    attend to each other more), every query leans towards one direction :math:`u`
    (:math:`\bar q\cdot u = 3`), and token 0 is a sink: its key is :math:`\beta u` with
    :math:`3\tau\beta = \log n + 1`, so that its weight :math:`e^{\tau\beta\, q\cdot u}` matches the other
    keys' together and it takes about half of the attention (44–51 % on average for
    :math:`256 \le n \le 4096`, :math:`d = 64`), while its value is 20 times smaller than the others, as
    for [CLS] in all-MiniLM-L6-v2.
    """
    gen = torch.Generator().manual_seed(seed)
    tau, shift = d**-0.5, 3.0
    centres = 0.5 * torch.randn(heads, clusters, d, generator=gen)
    assign = torch.randint(clusters, (n,), generator=gen)
    u = torch.randn(heads, 1, d, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    Q = centres[:, assign] + torch.randn(heads, n, d, generator=gen) + shift * u
    K = centres[:, assign] + torch.randn(heads, n, d, generator=gen)
    V = torch.randn(heads, n, d, generator=gen)
    K[:, 0] = (math.log(n) + 1) / (tau * shift) * u[:, 0]
    V[:, 0] /= 20
    return Q[None], K[None], V[None]


def _captured(model, model_inputs, layers, dataset):
    """``(dataset, layer, Q, K, V, scale, attn_mask)`` of each chosen layer, from one forward pass; the mask is
    ``(B, 1, 1, n)``, True = real key."""
    for c in capture_attention(model, model_inputs, layers):
        yield dataset, c.layer, c.query, c.key, c.value, c.scaling, c.attn_mask


def _dinov2_inputs(plan):
    """DINOv2-S attention inputs on the ``astronaut`` image at each of ``plan.dinov2_sizes``."""
    model = pretrained.load_dinov2_small()
    image = pretrained.natural_images()["astronaut"]
    for size in plan.dinov2_sizes:
        pixels = pretrained.imagenet_pixel_values(image, size)
        yield from _captured(model, {"pixel_values": pixels}, plan.capture_layers["dinov2"], f"DINOv2-S {size} px")


def _minilm_inputs(plan):
    """all-MiniLM-L6-v2 attention inputs on the example sentences joined into one text."""
    model, tokenizer = pretrained.load_minilm()
    tokens = tokenizer(" ".join(pretrained.example_sentences()), truncation=True, max_length=plan.minilm_tokens,
                       return_tensors="pt")
    yield from _captured(model, dict(tokens), plan.capture_layers["minilm"],
                         f"MiniLM {tokens['input_ids'].shape[-1]} tokens")


def attention_inputs(plan):
    """``[(dataset, layer, Q, K, V, scale, attn_mask)]`` on the CPU in float32: captured, and synthetic.

    A model whose weight package is missing is skipped with a note on stderr.
    """
    inputs = []
    for name, source, wanted in (("DINOv2-S", _dinov2_inputs, plan.dinov2_sizes),
                                 ("MiniLM", _minilm_inputs, plan.minilm_tokens)):
        if not wanted:
            continue
        try:
            inputs += list(source(plan))
        except (ImportError, FileNotFoundError) as err:
            print(f"accuracy: {name} skipped ({err})", file=sys.stderr)
    Q, K, V = sink_inputs(plan.synthetic_n, plan.head_dim, heads=1)
    inputs.append((f"synthetic sink n={plan.synthetic_n}", None, Q, K, V, plan.head_dim**-0.5, None))
    return inputs
