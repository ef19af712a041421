"""``approximate(tol=...)`` on real attention: ``python -m nystrom.experiments.tol_report``.

For every captured layer of the bundled DINOv2-S (518 px, images astronaut, coffee and rocket, all 12 layers)
and all-MiniLM-L6-v2 (the example sentences padded into one batch, layers 0-5), and each ``tol``, one call of
``approximate(Q, K, V, num_landmarks=m0, tol=tol)`` with the default strategy and solver: ``m0 = 16`` for DINOv2
and 4 for MiniLM, whose shortest sentence has 10 tokens (``max_landmarks=10`` there, every real key of that
sentence; one m serves the whole padded batch). The table reports per model and ``tol`` the three numbers of
issue #16's "done when", on the true relative error (float64 exact attention, real rows only):

* how often the true error is within ``tol``, how often the call reached its bound (otherwise it warned), and
  the misses by cause: the interval under-covered (bound within ``tol``, true error above), ``max_landmarks``
  reached, or the error stopped falling (the solver's floor); and how many calls escalated the solver;
* the m chosen over the smallest m that meets ``tol`` (true error) with the solver the call returned, from a sweep
  over a grid of ratio :math:`2^{1/4}` between ``m0`` and ``max_landmarks`` (median and largest, over the cases
  where some m of the grid meets ``tol``);
* the cost of the search over that of one call at the m it returned, in FLOPs (:mod:`nystrom.linalg.flops`:
  every step tried plus the 128 exact rows of the estimate, and without those rows; landmark selection not
  counted) and, with
  ``--timing``, in time (best of 3 :func:`~nystrom.experiments.timing.timed_call` each, one thread).
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.linalg.flops import exact_attention_flops, nystrom_attention_flops
from nystrom.linalg.tolerance import SAMPLED_ROWS
from nystrom.torch.capture import capture_attention

from .pretrained import example_sentences, imagenet_pixel_values, load_dinov2_small, load_minilm, natural_images
from .report import markdown_table
from .stamp import busy_warning, load_average
from .timing import timed_call

TOLS = (0.05, 0.1, 0.2)
IMAGES = ("astronaut", "coffee", "rocket")
CPU = torch.device("cpu")


def best_time(call, repeats=3):
    """Best of ``repeats`` :func:`~nystrom.experiments.timing.timed_call` times of ``call()`` on the CPU, in
    seconds."""
    return min(timed_call(call, CPU) for _ in range(repeats))


def layer_cases(models=("dinov2", "minilm"), images=IMAGES, layers=None):
    """``(model, Q, K, V, scale, attn_mask, real rows, first m, max_landmarks)`` for every captured layer (those in
    ``layers`` only, when given)."""
    if "dinov2" in models:
        model = load_dinov2_small()
        pictures = natural_images()
        for image in images:
            for c in capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[image], 518)},
                                       layers=layers):
                yield "DINOv2-S 518 px", c.query, c.key, c.value, c.scaling, None, None, 16, None
    if "minilm" not in models:
        return
    minilm, tokenizer = load_minilm()
    inputs = dict(tokenizer(example_sentences(), padding=True, return_tensors="pt"))
    shortest = int(inputs["attention_mask"].sum(-1).min())
    for c in capture_attention(minilm, inputs, layers=None if layers is None else [x for x in layers if x < 6]):
        yield "MiniLM", c.query, c.key, c.value, c.scaling, c.attn_mask, c.attention_mask.bool(), 4, shortest


def step_flops(Q, K, V, step):
    """FLOPs of one plain call at a search step's m and solver (as ``Info.flops["total"]``)."""
    iterations = getattr(step.solver, "iters", 0)
    return nystrom_attention_flops(math.prod(Q.shape[:-2]), Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1],
                                   step.m, solve_flops=step.solver.flops(step.m, iterations))["total"]


def search_flops(Q, K, V, steps):
    """FLOPs of a whole search: ``(every step tried, the exact attention of the sampled rows)`` (the returned step
    is listed again when it is not the last, and counted once)."""
    tried = steps[:-1] if steps[-1] in steps[:-1] else steps
    rows = min(SAMPLED_ROWS, Q.shape[-2])
    return (sum(step_flops(Q, K, V, step) for step in tried),
            exact_attention_flops(math.prod(Q.shape[:-2]), rows, K.shape[-2], Q.shape[-1], V.shape[-1]))


def sweep_grid(first, largest):
    """m from ``first`` to ``largest`` on a grid of ratio :math:`2^{1/4}` (every integer where that is finer)."""
    count = int(math.floor(4 * math.log2(largest / first))) + 1
    return sorted({min(largest, round(first * 2 ** (k / 4))) for k in range(count)} | {largest})


def run(tols=TOLS, models=("dinov2", "minilm"), images=IMAGES, layers=None, timing=False):
    """One row per (model, tol): see the module docstring."""
    records = {}
    for name, Q, K, V, scale, mask, real, first, largest in layer_cases(models, images, layers):
        exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), attn_mask=mask, scale=scale)
        keep = 1.0 if real is None else real[:, None, :, None].double()
        top = largest if largest is not None else Q.shape[-2] // 2
        swept = {}

        def true_error(out):
            return float(torch.linalg.vector_norm((out.double() - exact) * keep)
                         / torch.linalg.vector_norm(exact * keep))

        def smallest_within(solver, tol):
            # True error over the grid with this solver, once per solver and case; the smallest m within tol.
            if solver not in swept:
                swept[solver] = [(m, true_error(nystrom.approximate(Q, K, V, num_landmarks=m, solver=solver,
                                                                    scale=scale, attn_mask=mask)))
                                 for m in sweep_grid(first, top)]
            return next((m for m, error in swept[solver] if error <= tol), None)

        for tol in tols:
            def call():
                return nystrom.approximate(Q, K, V, num_landmarks=first, tol=tol, max_landmarks=largest,
                                           scale=scale, attn_mask=mask, return_info=True)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)  # an unreached tol is counted, not printed
                out, info = call()
            error = true_error(out)
            returned = info.tol_steps[-1]
            reached = returned.estimate.high <= tol
            cause = None
            if error > tol:
                if reached:
                    cause = "under-covered"
                elif any("stopped falling" in str(w.message) for w in caught):
                    cause = "floor"
                else:
                    cause = "cap"
            needed = smallest_within(returned.solver, tol)
            ratio = None
            if timing:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    seconds = best_time(call)
                ratio = seconds / best_time(lambda: nystrom.approximate(
                    Q, K, V, num_landmarks=returned.m, solver=returned.solver, scale=scale, attn_mask=mask))
            records.setdefault((name, tol), []).append(dict(
                within=error <= tol, reached=reached, cause=cause,
                escalated=returned.solver != info.tol_steps[0].solver, m=returned.m,
                m_ratio=None if needed is None else returned.m / needed,
                flops_ratio=sum(search_flops(Q, K, V, info.tol_steps)) / step_flops(Q, K, V, returned),
                steps_flops_ratio=search_flops(Q, K, V, info.tol_steps)[0] / step_flops(Q, K, V, returned),
                time_ratio=ratio))
    return [summary(name, tol, cases) for (name, tol), cases in records.items()]


def summary(name, tol, cases):
    """One table row from the per-case records of ``run``."""
    def median_max(key):
        values = [case[key] for case in cases if case[key] is not None]
        return (None, None) if not values else (round(float(np.median(values)), 2), round(float(max(values)), 2))

    causes = [case["cause"] for case in cases]
    ms = [case["m"] for case in cases]
    m_ratio, flops_ratio, time_ratio = median_max("m_ratio"), median_max("flops_ratio"), median_max("time_ratio")
    steps_ratio = median_max("steps_flops_ratio")
    return [name, tol, len(cases), f"{np.mean([c['within'] for c in cases]):.0%}",
            f"{np.mean([c['reached'] for c in cases]):.0%}",
            " / ".join(str(causes.count(cause)) for cause in ("under-covered", "cap", "floor")),
            sum(case["escalated"] for case in cases), int(np.median(ms)), max(ms),
            f"{m_ratio[0]}, {m_ratio[1]} ({sum(c['m_ratio'] is not None for c in cases)})",
            f"{flops_ratio[0]}, {flops_ratio[1]}", f"{steps_ratio[0]}, {steps_ratio[1]}",
            "to be measured" if time_ratio[0] is None else f"{time_ratio[0]}, {time_ratio[1]}"]


HEADER = ["model", "tol", "layers × inputs", "error within tol", "bound reached",
          "misses: under-covered / cap / floor", "escalated", "median m", "largest m",
          "m / smallest m within tol (median, largest; cases)", "search FLOPs / one call (median, largest)",
          "without the exact rows",
          "search time / one call (median, largest)"]


def main(argv=None):
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.tol_report", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=("dinov2", "minilm"), default=["dinov2", "minilm"])
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES))
    parser.add_argument("--layers", type=int, nargs="+", help="captured layers (default all)")
    parser.add_argument("--tols", type=float, nargs="+", default=list(TOLS))
    parser.add_argument("--timing", action="store_true", help="also time the search against one call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average {load_average()}")
    warning = busy_warning(1)
    if warning:
        print(f"warning: {warning}")
    print(markdown_table(HEADER, run(tols=args.tols, models=args.models, images=args.images, layers=args.layers,
                                     timing=args.timing)))


if __name__ == "__main__":
    main()
