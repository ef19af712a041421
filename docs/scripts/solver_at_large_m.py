"""How the best regularising solve moves when m is a large share of the tokens n.

    .venv/bin/python docs/scripts/solver_at_large_m.py

The solver table of the pseudo-inverse page is measured at m = 64 of n = 1,370, where six Newton-Schulz steps are
at the optimum. Here m grows towards n: the bundled DINOv2-S at 224 px (n = 257, the eight natural images, layers
6-11, the layers the eval command approximates) and at 518 px (n = 1,370, the coffee image, layers 3, 6, 9, 11),
``norm`` landmarks, float64 inputs. Each cell is the relative output error against exact attention, pooled over
images and heads per layer; a table per resolution, a row per (m, solver), the layers' mean last.
"""

import numpy as np
import torch

from nystrom import approximate
from nystrom.experiments.metrics import relative_error
from nystrom.experiments.pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from nystrom.linalg.solvers import NewtonSchulz, PInv
from nystrom.torch.capture import capture_attention

SOLVERS = {f"NewtonSchulz(iters={k})": NewtonSchulz(iters=k) for k in (6, 8, 10, 12)}
SOLVERS.update({f"PInv(rtol={r})": PInv(rtol=r) for r in (1e-2, 1e-3)})
SETTINGS = {  # size: (images, layers, m)
    224: (None, range(6, 12), (64, 128, 192)),
    518: (("coffee",), (3, 6, 9, 11), (128, 256, 512, 1024)),
}


def main():
    torch.set_num_threads(1)
    model = load_dinov2_small()
    pictures = natural_images()
    for size, (names, layers, sizes_m) in SETTINGS.items():
        pixels = torch.cat([imagenet_pixel_values(pictures[name], size) for name in names or pictures])
        captures = capture_attention(model, {"pixel_values": pixels}, layers=layers)
        n = captures[0].key.shape[-2]
        print(f"\n{size} px, n = {n}\n\n| m | solver | " + " | ".join(f"layer {layer}" for layer in layers)
              + " | mean |\n|---|---|" + "---|" * (len(layers) + 1))
        for m in sizes_m:
            for name, solver in SOLVERS.items():
                errors = [float(relative_error(
                    approximate(c.query.double(), c.key.double(), c.value.double(), num_landmarks=m, scale=c.scaling,
                                seed=c.layer, solver=solver), c.output.double())) for c in captures]
                print(f"| {m} | `{name}` | " + " | ".join(f"{e:.4f}" for e in errors) + f" | {np.mean(errors):.4f} |",
                      flush=True)


if __name__ == "__main__":
    main()
