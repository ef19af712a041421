"""The main job: FNA on real attention of the bundled DINOv2-S, against exact attention.

``python -m nystrom demo`` (or ``./run.sh demo``) captures the queries, keys and values of a later
layer of a trained DINOv2-S/14 on a natural image, approximates that attention with every landmark
strategy, and prints the relative error against the model's own exact attention output and the
time against exact ``scaled_dot_product_attention`` on the same tensors.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nystrom
from nystrom.torch.capture import capture_attention

from .pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from .timing import measure


def _best_time(fn, repeats):
    """Fastest of ``repeats`` timed calls after a warm-up (:func:`nystrom.experiments.timing.measure` on the CPU)."""
    return measure(fn, torch.device("cpu"), min_calls=repeats, max_calls=repeats).min


def run_demo(*, image="astronaut", sizes=(518, 1036), layer=9, num_landmarks=64,
             strategies=("norm", "fps", "segment_means", "uniform"), repeats=3, out=print):
    """Print error and speed of Nyström attention on real DINOv2-S attention.

    Parameters
    ----------
    image : str
        A key of :func:`nystrom.experiments.pretrained.natural_images`.
    sizes : tuple of int
        Input resolutions (multiples of 14); ``n = (size/14)^2 + 1`` tokens.
    layer : int
        Encoder layer whose attention is approximated (FNA targets the later layers).
    num_landmarks : int
    strategies : tuple of str
    repeats : int
        Timing repeats (best of).
    out : callable
        Where lines go.

    Returns
    -------
    list of dict
        One row per (size, strategy): ``n``, ``strategy``, ``rel_error``, ``ms``, ``exact_ms``, ``speedup``.
    """
    model = load_dinov2_small()
    picture = natural_images()[image]
    rows = []
    out(f"DINOv2-S/14 (bundled weights), image '{image}', layer {layer}, m = {num_landmarks}, "
        f"{torch.get_num_threads()} CPU threads, float32")
    out(f"{'n':>6} {'strategy':>14} {'rel. error':>11} {'time':>10} {'exact SDPA':>11} {'speed-up':>9}")
    for size in sizes:
        cap = capture_attention(model, {"pixel_values": imagenet_pixel_values(picture, size)}, layers=[layer])[0]
        Q, K, V = cap.query, cap.key, cap.value
        exact_s = _best_time(lambda: F.scaled_dot_product_attention(Q, K, V, scale=cap.scaling), repeats)
        reference = cap.output
        for strategy in strategies:
            approx = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=num_landmarks, scale=cap.scaling,
                                         seed=0)
            err = float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference))
            secs = _best_time(lambda s=strategy: nystrom.approximate(Q, K, V, strategy=s, num_landmarks=num_landmarks,
                                                                     scale=cap.scaling, seed=0), repeats)
            row = dict(n=Q.shape[-2], strategy=strategy, rel_error=err, ms=1e3 * secs, exact_ms=1e3 * exact_s,
                       speedup=exact_s / secs)
            rows.append(row)
            out(f"{row['n']:>6} {strategy:>14} {err:>11.4f} {row['ms']:>8.1f}ms {row['exact_ms']:>9.1f}ms "
                f"{row['speedup']:>8.1f}x")
        _, info = nystrom.approximate(Q, K, V, num_landmarks=num_landmarks, scale=cap.scaling, return_info=True)
        est = info.estimate_error(num_samples=128, seed=0)
        out(f"{'':>6} sampled estimate for 'norm' from 128 exact rows: {est.estimate:.4f} "
            f"(95% interval {est.low:.4f} to {est.high:.4f})")
    return rows


def main(argv=None):
    """``python -m nystrom demo``: parse ``argv`` and run :func:`run_demo`; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m nystrom demo",
                                     description="FNA on real DINOv2-S attention: error and time vs exact")
    parser.add_argument("--image", default="astronaut")
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 1036])
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--num-landmarks", type=int, default=64)
    args = parser.parse_args(argv)
    run_demo(image=args.image, sizes=tuple(args.sizes), layer=args.layer, num_landmarks=args.num_landmarks)
    return 0
