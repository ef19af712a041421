"""Measure how the pseudo-inverse solver changes Nyström error on real DINOv2-S attention.

For each natural image (518 px, 1370 tokens) and each layer in ``--layers``, the script captures the
layer's queries, keys and values ``(1, 6, 1370, 64)``, approximates attention with ``m`` landmarks
(uniform and FPS, one set shared by the 6 heads) and every solver configuration below, and prints
a Markdown table of the relative output error

    ||O_hat - O||_F / ||O||_F   (O exact, in float64, over all heads and tokens)

as the median over images (and, for uniform landmarks, seeds), with the worst case in brackets:
one table per strategy, then the median over everything.
The inputs are float32 torch tensors, as in a patched model; the solvers then compute in float32.
``--dtype float64`` repeats the measurement with float64 numpy arrays.

Run from the repository root::

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python docs/scripts/solver_table.py

Runtime: 8 to 20 minutes per dtype on a 2-core machine without a GPU, depending on its load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
import torch

import nystrom
from nystrom.experiments.pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from nystrom.torch.capture import capture_attention

# The configurations the docs compare; the library's defaults are NewtonSchulz(iters=6), PInv(rtol=3e-2)
# and Ridge(lam=1e-2), and rtol=1e-1, lam=1e-1 bracket the optimum from above.
SOLVERS = {
    "NewtonSchulz(iters=3)": nystrom.NewtonSchulz(iters=3),
    "NewtonSchulz(iters=6)": nystrom.NewtonSchulz(iters=6),
    "NewtonSchulz(iters=12)": nystrom.NewtonSchulz(iters=12),
    "NewtonSchulz(tol=1e-6)": nystrom.NewtonSchulz(tol=1e-6),
    "PInv(rtol=1e-12)": nystrom.PInv(rtol=1e-12),
    "PInv(rtol=1e-6)": nystrom.PInv(rtol=1e-6),
    "PInv(rtol=1e-3)": nystrom.PInv(rtol=1e-3),
    "PInv(rtol=1e-2)": nystrom.PInv(rtol=1e-2),
    "PInv(rtol=3e-2)": nystrom.PInv(rtol=3e-2),
    "PInv(rtol=1e-1)": nystrom.PInv(rtol=1e-1),
    "Ridge(lam=1e-8)": nystrom.Ridge(lam=1e-8),
    "Ridge(lam=1e-4)": nystrom.Ridge(lam=1e-4),
    "Ridge(lam=1e-2)": nystrom.Ridge(lam=1e-2),
    "Ridge(lam=1e-1)": nystrom.Ridge(lam=1e-1),
}


def relative_error(approx, exact):
    diff = np.asarray(approx, dtype=np.float64) - exact
    return float(np.linalg.norm(diff) / np.linalg.norm(exact))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 11])
    parser.add_argument("--images", nargs="+", default=["astronaut", "chelsea", "coffee", "rocket",
                                                         "motorcycle", "retina"])
    parser.add_argument("--num-landmarks", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the uniform strategy per image")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()

    model = load_dinov2_small()
    images = natural_images()
    strategies = {"uniform": list(range(args.seeds)), "fps": [None]}
    # errors[solver][(strategy, layer)] -> list over images x seeds
    errors = {name: {} for name in SOLVERS}
    for image_name in args.images:
        pixels = imagenet_pixel_values(images[image_name], size=args.size)
        for captured in capture_attention(model, {"pixel_values": pixels}, layers=args.layers):
            layer, scale = captured.layer, captured.scaling
            qkv = (captured.query, captured.key, captured.value)
            q64, k64, v64 = (t.double().numpy() for t in qkv)
            exact = nystrom.exact_attention(q64, k64, v64, scale=scale)
            inputs = qkv if args.dtype == "float32" else (q64, k64, v64)
            for strategy, seeds in strategies.items():
                for seed in seeds:
                    for name, solver in SOLVERS.items():
                        out = nystrom.approximate(*inputs, strategy=strategy, num_landmarks=args.num_landmarks,
                                                  solver=solver, scale=scale, seed=seed)
                        if isinstance(out, torch.Tensor):
                            out = out.double().numpy()
                        errors[name].setdefault((strategy, layer), []).append(relative_error(out, exact))

    print(f"<!-- {datetime.date.today()}, {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.dtype}, m={args.num_landmarks}, {args.size} px, images: {', '.join(args.images)}, "
          f"uniform seeds: {args.seeds} -->")
    for strategy in strategies:
        print(f"\n{strategy} landmarks:\n")
        print("| solver | " + " | ".join(f"layer {layer}" for layer in args.layers) + " | all layers |")
        print("|---|" + "---|" * (len(args.layers) + 1))
        for name in SOLVERS:
            cells = []
            for layer in args.layers:
                e = np.asarray(errors[name][(strategy, layer)])
                cells.append(f"{np.median(e):.3g} ({e.max():.3g})")
            pooled = np.concatenate([errors[name][(strategy, layer)] for layer in args.layers])
            print(f"| `{name}` | " + " | ".join(cells) + f" | {np.median(pooled):.3g} |")
    print("\nmedian over both strategies and all layers:\n")
    print("| solver | median |\n|---|---|")
    for name in SOLVERS:
        pooled = np.concatenate([np.asarray(e) for e in errors[name].values()])
        print(f"| `{name}` | {np.median(pooled):.3g} |")


if __name__ == "__main__":
    main()
