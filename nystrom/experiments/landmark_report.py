"""The measurements behind the default landmark rule: ``python -m nystrom.experiments.landmark_report``.

Three parts, each a table on stdout (the docs' benchmarks page, section "Landmarks that stand for tokens",
quotes them):

``dinov2``
    Relative output error (float64 exact attention as reference, mean over heads) of each strategy on real
    DINOv2-S attention captured at 518 and 1036 px, images astronaut/coffee/rocket, layers 3/6/9/11, m = 64.
``minilm``
    The same on all-MiniLM-L6-v2, all example sentences padded into one batch, layers 1-4, m = 4/6/8, with
    and without ``norm``'s singletons.
``cost``
    Best-of-k wall time at (1, 1, 65,536, 64), m = 64, float32, of exact SDPA, ``uniform``, ``norm``, the
    given-landmarks ceiling and ``norm``'s selection alone, calls interleaved so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.torch.attention import fna_attention
from nystrom.torch.capture import capture_attention

from .pretrained import example_sentences, imagenet_pixel_values, load_dinov2_small, load_minilm, natural_images
from .report import markdown_table
from .stamp import busy_warning, load_average
from .timing import thread_limit, timed_call

IMAGES = ("astronaut", "coffee", "rocket")
LAYERS = (3, 6, 9, 11)
STRATEGIES = ("norm", "kmeans", "fps", "segment_means", "uniform")
#: Issue #13's cost targets at (1, 1, 65,536, 64), m = 64: the default call at most this many times a ``uniform`` call,
#: and selection at most this share of the call, with one thread and with all cores.
COST_RATIO_TARGET = 1.3
SELECTION_SHARE_TARGET = 0.25


def head_mean_error(approx, exact, real=None):
    """Mean over batch and heads of ``||approx - exact||_F / ||exact||_F`` per head, on the real tokens."""
    approx, exact = approx.double(), exact.double()
    if real is not None:
        keep = real[:, None, :, None].to(exact.dtype)
        approx, exact = approx * keep, exact * keep
    return float((torch.linalg.vector_norm(approx - exact, dim=(-2, -1))
                  / torch.linalg.vector_norm(exact, dim=(-2, -1))).mean())


def dinov2_errors(sizes=(518, 1036), strategies=STRATEGIES, num_landmarks=64):
    """Rows ``(px, strategy, error per layer..., mean, worst layer-9, worst layer-11)`` over :data:`IMAGES`."""
    model = load_dinov2_small()
    pictures = natural_images()
    rows = []
    for size in sizes:
        errors = {s: {layer: [] for layer in LAYERS} for s in strategies}
        for name in IMAGES:
            caps = capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[name], size)},
                                     layers=list(LAYERS))
            for c in caps:
                exact = F.scaled_dot_product_attention(c.query.double(), c.key.double(), c.value.double(),
                                                       scale=c.scaling)
                for s in strategies:
                    out = nystrom.approximate(c.query, c.key, c.value, strategy=s, num_landmarks=num_landmarks,
                                              scale=c.scaling, seed=0)
                    errors[s][c.layer].append(head_mean_error(out, exact))
        for s in strategies:
            per_layer = [float(np.mean(errors[s][layer])) for layer in LAYERS]
            rows.append([size, s, *per_layer, float(np.mean(per_layer)), max(errors[s][9]), max(errors[s][11])])
    return rows


def minilm_errors(strategies=("norm", "kmeans", "fps", "segment_means"), landmarks=(4, 6, 8)):
    """Rows ``(strategy, error at each m..., mean)`` on MiniLM layers 1-4; ``norm`` also without singletons."""
    model, tokenizer = load_minilm()
    inputs = dict(tokenizer(example_sentences(), padding=True, return_tensors="pt"))
    caps = capture_attention(model, inputs, layers=[1, 2, 3, 4])
    variants = {s: s for s in strategies}
    variants["norm, no singletons"] = nystrom.Norm(first=None, sink_ratio=1e9, sink_share=1.0)
    rows = []
    for label, strategy in variants.items():
        per_m = []
        for m in landmarks:
            errs = []
            for c in caps:
                real = c.attention_mask
                exact = F.scaled_dot_product_attention(c.query.double(), c.key.double(), c.value.double(),
                                                       attn_mask=c.attn_mask, scale=c.scaling)
                out = nystrom.approximate(c.query, c.key, c.value, strategy=strategy, num_landmarks=m,
                                          scale=c.scaling, attn_mask=c.attn_mask, seed=0)
                errs.append(head_mean_error(out, exact, real))
            per_m.append(float(np.mean(errs)))
        rows.append([label, *per_m, float(np.mean(per_m))])
    return rows


def cost(threads, n=65536, d=64, m=64, repeats=9):
    """Best-of-``repeats`` milliseconds per call of each method, interleaved, with ``threads`` CPU threads (torch's
    and the BLAS libraries', restored on return: a review found torch's left at the last count)."""
    with thread_limit(threads):
        return _timed_calls(n, d, m, repeats)


def _timed_calls(n, d, m, repeats):
    generator = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 1, n, d, generator=generator) for _ in range(3))
    given = nystrom.Uniform()(Q, K, m, seed=0, head_axis=-3)
    norm = nystrom.get_strategy("norm")
    calls = {
        "exact SDPA": lambda: F.scaled_dot_product_attention(Q, K, V),
        "uniform": lambda: nystrom.approximate(Q, K, V, strategy="uniform", num_landmarks=m, seed=0),
        "norm": lambda: nystrom.approximate(Q, K, V, num_landmarks=m),
        "given landmarks": lambda: fna_attention(Q, K, V, given, check_values=False),
        "norm selection": lambda: norm(Q, K, m, head_axis=-3, check_values=False),
    }
    best = dict.fromkeys(calls, float("inf"))
    for r in range(repeats):
        for name, call in calls.items():
            if name == "exact SDPA" and r >= 2:
                continue  # seconds per call at this length; two samples are enough
            best[name] = min(best[name], timed_call(call, torch.device("cpu")))
    return {name: 1e3 * seconds for name, seconds in best.items()}


def _rounded(rows, digits):
    return [[round(x, digits) if isinstance(x, float) else x for x in row] for row in rows]


def main(argv=None):
    """Print the tables of the chosen parts."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.landmark_report", description=__doc__)
    parts = ("dinov2", "minilm", "cost")
    # argparse rejects an empty list against `choices` with nargs="*" (Python 3.11), so the parts are checked here.
    parser.add_argument("parts", nargs="*", help=f"which tables, of {parts} (default all)")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(parts)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {parts}")
    args.parts = args.parts or list(parts)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "dinov2" in args.parts:
        header = ["px", "strategy", *(f"layer {layer}" for layer in LAYERS), "mean", "worst L9", "worst L11"]
        print(markdown_table(header, _rounded(dinov2_errors(), 3)))
    if "minilm" in args.parts:
        print(markdown_table(["strategy", "m = 4", "m = 6", "m = 8", "mean"], _rounded(minilm_errors(), 3)))
    if "cost" in args.parts:
        rows = []
        for threads in (1, os.cpu_count()):
            ms = cost(threads)
            ratio, share = ms["norm"] / ms["uniform"], ms["norm selection"] / ms["norm"]
            # Judged unrounded, printed to three digits: at two, a share of 0.2507 read as the bound met (a review).
            verdict = "met" if ratio <= COST_RATIO_TARGET and share <= SELECTION_SHARE_TARGET else "missed"
            rows.append([threads, *(round(x, 2) for x in ms.values()), f"{ratio:.3f}", f"{share:.3f}", verdict])
        print(f"load average {load_average()}")
        # The cost part times with up to every core: a load above that means shared cores and inflated times.
        warning = busy_warning(os.cpu_count())
        if warning:
            print(f"warning: {warning}")
        print(markdown_table(["threads", "exact SDPA ms", "uniform ms", "norm ms", "given landmarks ms",
                              "norm selection ms", "norm / uniform", "selection share",
                              f"targets (≤ {COST_RATIO_TARGET}, ≤ {SELECTION_SHARE_TARGET})"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
