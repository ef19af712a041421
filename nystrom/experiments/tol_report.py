"""``approximate(tol=...)`` on real attention: ``python -m nystrom.experiments.tol_report``.

For every captured layer of the bundled DINOv2-S (518 px, images astronaut, coffee and rocket, all 12 layers)
and all-MiniLM-L6-v2 (the example sentences padded into one batch, layers 0-5), and each ``tol``, one call of
``approximate(Q, K, V, num_landmarks=m0, tol=tol)`` with the default strategy and solver: ``m0 = 16`` for DINOv2
and 4 for MiniLM, whose shortest sentence has 10 tokens (``max_landmarks=10`` there, every real key of that
sentence; one m serves the whole padded batch). The table reports
per model and ``tol``: how often the true relative error (float64 exact attention, real rows only) is within
``tol``; how often the call reached its bound (otherwise it warned); the median and largest m chosen; and the
time of the ``tol`` call over that of one plain call at the m it chose (best of 3 each, one thread).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.torch.capture import capture_attention

from .pretrained import example_sentences, imagenet_pixel_values, load_dinov2_small, load_minilm, natural_images
from .report import markdown_table
from .stamp import busy_warning, load_average
from .timing import timed_call

TOLS = (0.05, 0.1, 0.2)
CPU = torch.device("cpu")


def best_time(call, repeats=3):
    """Best of ``repeats`` :func:`~nystrom.experiments.timing.timed_call` times of ``call()`` on the CPU, in
    seconds."""
    return min(timed_call(call, CPU) for _ in range(repeats))


def layer_cases(models=("dinov2", "minilm")):
    """``(model, Q, K, V, scale, attn_mask, real rows, first m, max_landmarks)`` for every captured layer."""
    if "dinov2" in models:
        model = load_dinov2_small()
        pictures = natural_images()
        for image in ("astronaut", "coffee", "rocket"):
            for c in capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[image], 518)}):
                yield "DINOv2-S 518 px", c.query, c.key, c.value, c.scaling, None, None, 16, None
    if "minilm" not in models:
        return
    minilm, tokenizer = load_minilm()
    inputs = dict(tokenizer(example_sentences(), padding=True, return_tensors="pt"))
    shortest = int(inputs["attention_mask"].sum(-1).min())
    for c in capture_attention(minilm, inputs):
        yield "MiniLM", c.query, c.key, c.value, c.scaling, c.attn_mask, c.attention_mask.bool(), 4, shortest


def run(tols=TOLS, models=("dinov2", "minilm")):
    """One row per (model, tol): see the module docstring."""
    records = {}
    for name, Q, K, V, scale, mask, real, first, largest in layer_cases(models):
        exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), attn_mask=mask, scale=scale)
        keep = 1.0 if real is None else real[:, None, :, None].double()
        for tol in tols:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # an unreached tol is counted, not printed

                def call():
                    return nystrom.approximate(Q, K, V, num_landmarks=first, tol=tol, max_landmarks=largest,
                                               scale=scale, attn_mask=mask, return_info=True)

                out, info = call()
                seconds = best_time(call)
            m = info.tol_steps[-1][0]
            plain = best_time(lambda: nystrom.approximate(Q, K, V, num_landmarks=m, scale=scale, attn_mask=mask))
            error = float(torch.linalg.vector_norm((out.double() - exact) * keep)
                          / torch.linalg.vector_norm(exact * keep))
            records.setdefault((name, tol), []).append(
                (error <= tol, info.tol_steps[-1][1].high <= tol, m, seconds / plain))
    rows = []
    for (name, tol), cases in records.items():
        within, reached, ms, ratios = (np.array(column) for column in zip(*cases))
        rows.append([name, tol, len(cases), f"{within.mean():.0%}", f"{reached.mean():.0%}", int(np.median(ms)),
                     int(ms.max()), round(float(np.median(ratios)), 2), round(float(ratios.max()), 2)])
    return rows


def main(argv=None):
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.tol_report", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=("dinov2", "minilm"), default=["dinov2", "minilm"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average {load_average()}")
    warning = busy_warning(1)
    if warning:
        print(f"warning: {warning}")
    print(markdown_table(["model", "tol", "layers × inputs", "error within tol", "bound reached", "median m",
                          "largest m", "time / plain call at that m (median)", "(largest)"], run(models=args.models)))


if __name__ == "__main__":
    main()
