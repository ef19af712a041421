"""Would one m per head pay for ``tol=``? The FLOPs of the best per-head choice against one m per layer.

    .venv/bin/python docs/scripts/per_head_m.py

For every layer of the bundled DINOv2-S at 518 px (images astronaut, coffee, rocket) and each ``tol``, on a grid
of ratio :math:`2^{1/4}` from 16 up to the last m at which Nyström attention takes at most half the FLOPs of exact
attention (``nystrom.linalg.tolerance.nystrom_pays``), with the default strategy and solver and the true error
against float64 exact attention:

* one m per layer: the smallest m of the grid whose layer error (all heads, landmarks shared) is within ``tol``;
* one m per head: for each head alone, the smallest m whose error on that head is within ``tol`` (which keeps the
  layer within ``tol``, since the layer's squared error is the heads' sum).

A layer where no grid m meets ``tol`` is answered by exact attention, as ``approximate(tol=...)`` does, and costs
exact attention's FLOPs; a head likewise. Both choices are the best the grid allows (an oracle, no search), so
the ratio of their FLOPs bounds what per-head m could save. Prints, per ``tol``, how many layers each choice
answers with Nyström attention, and the median and smallest ratio of per-head to per-layer FLOPs.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from nystrom.experiments.tol_report import sweep_grid
from nystrom.linalg.flops import exact_attention_flops, nystrom_attention_flops
from nystrom.linalg.tolerance import crossover, nystrom_pays, solve_flops
from nystrom.torch.capture import capture_attention

TOLS = (0.05, 0.1, 0.2)
IMAGES = ("astronaut", "coffee", "rocket")
FIRST = 16


def flops(n, d, m, solver):
    """FLOPs of one head: Nyström attention at ``m``, or exact attention for ``m = None``."""
    if m is None:
        return exact_attention_flops(1, n, n, d, d)
    return nystrom_attention_flops(1, n, n, d, d, m, solve_flops(solver, m))["total"]


def main():
    torch.set_num_threads(1)
    solver = nystrom.get_solver("newton_schulz")
    model, pictures = load_dinov2_small(), natural_images()
    ratios, layer_nystrom, head_nystrom = ({tol: [] for tol in TOLS} for _ in range(3))
    for image in IMAGES:
        for c in capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[image], 518)}):
            Q, K, V = c.query, c.key, c.value
            heads, n, d = Q.shape[1], Q.shape[-2], Q.shape[-1]
            exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), scale=c.scaling)
            norms = torch.linalg.vector_norm(exact, dim=(-2, -1))[0]
            grid = sweep_grid(FIRST, crossover(n, nystrom_pays(n, n, d, d), solver))
            layer_error, head_error = {}, {}
            for m in grid:
                out = nystrom.approximate(Q, K, V, num_landmarks=m, scale=c.scaling).double()
                layer_error[m] = float(torch.linalg.vector_norm(out - exact) / torch.linalg.vector_norm(exact))
                for h in range(heads):
                    alone = nystrom.approximate(Q[:, h:h + 1], K[:, h:h + 1], V[:, h:h + 1], num_landmarks=m,
                                                scale=c.scaling).double()
                    head_error[h, m] = float(torch.linalg.vector_norm(alone - exact[:, h:h + 1]) / norms[h])
            for tol in TOLS:
                per_layer = next((m for m in grid if layer_error[m] <= tol), None)
                per_head = [next((m for m in grid if head_error[h, m] <= tol), None) for h in range(heads)]
                layer_cost = heads * flops(n, d, per_layer, solver)
                head_cost = sum(flops(n, d, m, solver) for m in per_head)
                ratios[tol].append(head_cost / layer_cost)
                layer_nystrom[tol].append(per_layer is not None)
                head_nystrom[tol].append(sum(m is not None for m in per_head) / heads)
    print("| tol | layers | Nyström layers, one m per layer | Nyström heads, one m per head | per-head / per-layer "
          "FLOPs (median, smallest) |")
    print("|---|---|---|---|---|")
    for tol in TOLS:
        r = np.array(ratios[tol])
        print(f"| {tol} | {r.size} | {sum(layer_nystrom[tol])} | {np.mean(head_nystrom[tol]):.0%} | "
              f"{np.median(r):.2f}, {r.min():.2f} |")
    assert all(math.isfinite(x) for values in ratios.values() for x in values)


if __name__ == "__main__":
    main()
