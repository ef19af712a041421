"""How much attention error the saliency IoU of docs/benchmarks.md tolerates: random noise of a known size.

    .venv/bin/python docs/scripts/saliency_noise.py

Adds Gaussian noise of relative Frobenius norm ``eps`` (per image) to the attention output of layers 6-11 of
the bundled DINOv2-S, the layers ``python -m nystrom eval --model dinov2`` approximates, and prints the IoU of
the top-20 % saliency pixels against the exact model, on the eight natural images at 224 px (three noise
draws each). Random noise is not the structured error of a Nyström approximation, but at equal relative size
the two cost the saliency maps about the same (the page compares them).
"""

import numpy as np
import torch

from nystrom.experiments.metrics import top_fraction_iou
from nystrom.experiments.pretrained import (
    imagenet_pixel_values,
    load_dinov2_saliency_decoder,
    load_dinov2_small,
    natural_images,
)
from nystrom.torch.dispatch import attention_layers

LAYERS = range(6, 12)
SIZES = (0.005, 0.01, 0.02, 0.04, 0.07)


def main():
    torch.set_num_threads(1)
    model, decoder = load_dinov2_small(), load_dinov2_saliency_decoder()
    pixels = torch.cat([imagenet_pixel_values(image, 224) for image in natural_images().values()])
    noise = {"eps": 0.0, "generator": torch.Generator().manual_seed(0)}

    def add_noise(module, args, out):
        context = out[0] if isinstance(out, tuple) else out
        draw = torch.randn(context.shape, generator=noise["generator"])
        # Per image: ||draw|| = eps * ||context||, so every layer's relative error is exactly eps.
        size = noise["eps"] * context.flatten(1).norm(dim=1) / draw.flatten(1).norm(dim=1)
        context = context + draw * size.view(-1, *[1] * (context.ndim - 1))
        return (context, *out[1:]) if isinstance(out, tuple) else context

    blocks = attention_layers(model)
    with torch.inference_mode():
        exact = decoder(model(pixel_values=pixels).last_hidden_state, (224, 224))
        for layer in LAYERS:
            blocks[layer][1].register_forward_hook(add_noise)
        for eps in SIZES:
            noise["eps"] = eps
            ious = [float(top_fraction_iou(decoder(model(pixel_values=pixels).last_hidden_state, (224, 224)),
                                           exact).mean()) for _ in range(3)]
            print(f"relative error {eps}: saliency IoU {np.mean(ious):.4f} "
                  f"(draws {', '.join(f'{v:.4f}' for v in ious)})")


if __name__ == "__main__":
    main()
