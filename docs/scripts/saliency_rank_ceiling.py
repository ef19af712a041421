"""The saliency IoU that no m-landmark approximation can beat: the best rank-m attention matrix in layers 6-11.

    .venv/bin/python docs/scripts/saliency_rank_ceiling.py

Nyström attention with m landmarks replaces the softmax matrix S (n x n, per image and head) by a matrix of rank at
most m: D^-1 F A^+ B, whose row scaling keeps the rank of F A^+ B. Among all matrices of rank m the truncated SVD
S_m is the nearest to S in the Frobenius norm (Eckart-Young), and for values V with independent entries of equal
variance it also gives the smallest expected output error E||(S - P) V||_F^2 = sigma^2 ||S - P||_F^2. It costs an
n x n SVD per head, so no approximation would use it: it is the ceiling that the landmark rules are measured
against. The script runs the bundled DINOv2-S at 224 px (n = 257) on the eight natural images with S_m V in place
of attention in layers 6-11, the layers ``python -m nystrom eval --model dinov2`` approximates, and prints the IoU
of the top-20 % saliency pixels against the exact model, next to ``nystrom.fna`` (``norm``) at the same m, as the
eval command runs it, with its default solve and with ten Newton-Schulz steps. Before that it prints each layer's
relative output error on the exact model's own inputs (captured), for S_m and for ``norm``.
"""

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from nystrom import approximate, fna
from nystrom.experiments.metrics import relative_error, top_fraction_iou
from nystrom.experiments.pretrained import (
    imagenet_pixel_values,
    load_dinov2_saliency_decoder,
    load_dinov2_small,
    natural_images,
)
from nystrom.linalg.solvers import NewtonSchulz
from nystrom.torch.capture import capture_attention
from nystrom.torch.dispatch import attention_layers

LAYERS = range(6, 12)
RANKS = (64, 96, 128, 192)
#: The default solve, and the one the tol search escalates to (more steps, less regularisation).
SOLVERS = {"six Newton-Schulz steps": NewtonSchulz(iters=6), "ten": NewtonSchulz(iters=10)}


def best_rank(query, key, value, scale, m):
    """:math:`S_m V` in float64: the truncated SVD of the softmax matrix (per batch element and head) times ``V``."""
    S = torch.softmax(scale * query.double() @ key.double().transpose(-1, -2), dim=-1)
    U, sigma, Vh = torch.linalg.svd(S)
    return ((U[..., :m] * sigma[..., None, :m]) @ Vh[..., :m, :]) @ value.double()


def main():
    torch.set_num_threads(1)
    model, decoder = load_dinov2_small(), load_dinov2_saliency_decoder()
    pixels = torch.cat([imagenet_pixel_values(image, 224) for image in natural_images().values()])

    print("| m | rule | " + " | ".join(f"layer {layer}" for layer in LAYERS) + " | mean |")
    print("|---|---|" + "---|" * (len(LAYERS) + 1))
    captures = capture_attention(model, {"pixel_values": pixels}, layers=LAYERS)
    for m in RANKS:
        rules = {"best rank m (SVD of S)": lambda c: best_rank(c.query, c.key, c.value, c.scaling, m),
                 "norm": lambda c: approximate(c.query, c.key, c.value, num_landmarks=m, scale=c.scaling,
                                               seed=c.layer, features=c.hidden_states)}
        for name, rule in rules.items():
            errors = [float(relative_error(rule(c), c.output.double())) for c in captures]
            print(f"| {m} | {name} | " + " | ".join(f"{e:.4f}" for e in errors) + f" | {np.mean(errors):.4f} |")

    layer_of = {id(attention): index for index, (_, attention) in enumerate(attention_layers(model))}
    run = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = layer_of[id(module)]
        if layer not in LAYERS:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        # transformers' attention functions return (B, n, H, d_v).
        return best_rank(query, key, value, scaling, run["m"]).to(query.dtype).transpose(1, 2).contiguous(), None

    def saliency():
        return decoder(model(pixel_values=pixels).last_hidden_state, (224, 224))

    AttentionInterface.register("nystrom_rank_ceiling", attention)
    with torch.inference_mode():
        exact = saliency()
        ours = {}
        for m in RANKS:
            for name, solver in SOLVERS.items():
                with fna(model, layers=LAYERS, num_landmarks=m, solver=solver):
                    ours[m, name] = float(top_fraction_iou(saliency(), exact).mean())
        model.set_attn_implementation("nystrom_rank_ceiling")
        for m in RANKS:
            run["m"] = m
            best = float(top_fraction_iou(saliency(), exact).mean())
            print(f"m = {m}: saliency IoU with the best rank-m attention {best:.4f}, with norm "
                  + ", ".join(f"{ours[m, name]:.4f} ({name})" for name in SOLVERS))


if __name__ == "__main__":
    main()
