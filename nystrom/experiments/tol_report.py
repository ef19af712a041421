"""``approximate(tol=...)`` on real attention: ``python -m nystrom.experiments.tol_report``.

For every captured layer of the bundled DINOv2-S (518 px, images astronaut, coffee and rocket, all 12 layers)
and all-MiniLM-L6-v2 (the example sentences padded into one batch, layers 0-5), and each ``tol``, one call of
``approximate(Q, K, V, num_landmarks=m0, tol=tol)`` with the default strategy, solver and budget (none: a miss is
answered by exact attention): ``m0 = 16`` for DINOv2 and 4 for MiniLM, whose shortest sentence has 10 tokens (one
m serves the whole padded batch). The table reports per model and ``tol`` the numbers of issue #16's "done when",
on the true relative error (float64 exact attention, real rows only):

* how often the true error is within ``tol``; the misses (the bound was within ``tol``, the true error above: the
  interval under-covered); how many calls were answered by exact attention, and of those, how many had a
  cheaper answer (some m up to the crossover below within ``tol``);
* for the Nyström answers, the m chosen over the smallest m that meets ``tol`` (true error) with the solver the
  call returned, from a sweep over a grid of ratio :math:`2^{1/4}` between ``m0`` and the crossover where Nyström
  attention stops taking at most half the FLOPs of exact attention (:func:`~nystrom.linalg.tolerance.nystrom_pays`;
  median and largest, over the cases where some m of the grid meets ``tol``);
* the cost of the search over that of one call at the m it returned (exact attention for an exact answer), in
  FLOPs (:mod:`nystrom.linalg.flops`: every step tried, with its output at the 128 sampled rows only, the census
  of interpolation weights where a step's bound was within ``tol``, the whole output of the returned one, plus the
  exact rows of the estimate and the sample's test for self-attending queries, and without those; landmark selection
  not counted), and over exact attention;
  with ``--timing``, in time (best of 7 :func:`~nystrom.experiments.timing.timed_call` each, one thread).
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.linalg.bounds import SELF_ATTENTION_KEYS
from nystrom.linalg.flops import (
    exact_attention_flops,
    interpolation_census_flops,
    nystrom_attention_flops,
    self_attending_test_flops,
)
from nystrom.linalg.tolerance import EXACT, SAMPLED_ROWS, TolStep, crossover, nystrom_pays, solve_flops
from nystrom.torch.capture import capture_attention

from .evaluate import dinov2, minilm
from .pretrained import example_sentences, imagenet_pixel_values, load_dinov2_small, load_minilm, natural_images
from .report import check_distinct, layers_per_model, markdown_table, positive
from .stamp import busy_warning, load_average
from .timing import best_time

TOLS = (0.05, 0.1, 0.2)
IMAGES = ("astronaut", "coffee", "rocket")
NUM_LAYERS = {"dinov2": dinov2.NUM_LAYERS, "minilm": minilm.NUM_LAYERS}
CPU = torch.device("cpu")
#: Calls behind each time (the fastest counts). With 3, the largest ratio of a run moved by up to 0.5 between two
#: runs on the same code (2.60-2.90 against 3.01-3.16 at the three tols, 2026-11-30, nothing else running).
TIMING_REPEATS = 7


def layer_cases(models=("dinov2", "minilm"), images=IMAGES, layers=None):
    """``(model, Q, K, V, scale, attn_mask, real rows, first m)`` for every captured layer (with ``layers``, a list of
    layer indices, each model those it has: :func:`~nystrom.experiments.report.layers_per_model`)."""
    per_model = layers_per_model("layers", layers, {model: NUM_LAYERS[model] for model in models})
    if "dinov2" in models:
        model = load_dinov2_small()
        pictures = natural_images()
        for image in images:
            for c in capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[image], 518)},
                                       layers=per_model["dinov2"]):
                yield "DINOv2-S 518 px", c.query, c.key, c.value, c.scaling, None, None, 16
    if "minilm" not in models:
        return
    minilm, tokenizer = load_minilm()
    inputs = dict(tokenizer(example_sentences(), padding=True, return_tensors="pt"))
    for c in capture_attention(minilm, inputs, layers=per_model["minilm"]):
        yield "MiniLM", c.query, c.key, c.value, c.scaling, c.attn_mask, c.attention_mask.bool(), 4


def step_flops(Q, K, V, step, queries=None):
    """FLOPs of one plain call at a search step's m and solver (as ``Info.flops["total"]``; exact attention's for an
    exact step), with its output at ``queries`` query rows (default all)."""
    batch, n, d, d_v = math.prod(Q.shape[:-2]), K.shape[-2], Q.shape[-1], V.shape[-1]
    n_q = Q.shape[-2] if queries is None else queries
    if step.solver == EXACT:
        return exact_attention_flops(batch, n_q, n, d, d_v)
    return nystrom_attention_flops(batch, n_q, n, d, d_v, step.m, solve_flops=solve_flops(step.solver, step.m))["total"]


def search_flops(Q, K, V, steps):
    """FLOPs of a whole search: ``(every step tried with its output at the sampled rows, the census of the steps that
    took one (interpolation weights of every row, the output at the census's rows), then the whole output of the
    returned one, sampled rows included, or exact attention; the exact attention of the sampled rows and of the
    census's, and the sample's test for self-attending queries)`` (the returned step is listed again when it is not the
    last, and counted once; no row is sampled when exact attention is the only step). The census's rows are those it
    adds to the sample; the rows drawn again in place of sampled rows it took are not counted (a review: up to a few
    dozen at DINOv2-S's early layers)."""
    tried = steps[:-1] if steps[-1] in steps[:-1] else steps
    sampled = [step for step in tried if step.solver != EXACT]
    rows = min(SAMPLED_ROWS, Q.shape[-2]) if sampled else 0
    last = steps[-1]
    batch, n_q, n, d, d_v = math.prod(Q.shape[:-2]), Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1]
    whole = (exact_attention_flops(batch, n_q, n, d, d_v) if last.solver == EXACT
             else nystrom_attention_flops(batch, n_q, n, d, d_v, last.m)["output_product"])
    # A step whose estimate read more rows than the sample's took the census (the step's bound was within tol).
    census = [step for step in sampled if step.estimate.num_samples > rows]
    census_flops = sum(interpolation_census_flops(batch, n_q, d, step.m)
                       + nystrom_attention_flops(batch, step.estimate.num_samples, n, d, d_v, step.m)["output_product"]
                       for step in census)
    census_rows = sum(step.estimate.num_samples - rows for step in census)
    # The sample's test for self-attending queries, where some rows are drawn (not every query exact).
    test = self_attending_test_flops(batch, n, d, SELF_ATTENTION_KEYS) if 0 < rows < n_q == n else 0
    return (sum(step_flops(Q, K, V, step, rows) for step in sampled) + census_flops + whole,
            exact_attention_flops(batch, rows, n, d, d_v) + exact_attention_flops(batch, census_rows, n, d, d_v) + test)


def sweep_grid(first, largest):
    """m from ``first`` to ``largest`` on a grid of ratio :math:`2^{1/4}` (every integer where that is finer)."""
    count = int(math.floor(4 * math.log2(largest / first))) + 1
    return sorted({min(largest, round(first * 2 ** (k / 4))) for k in range(count)} | {largest})


def run(tols=TOLS, models=("dinov2", "minilm"), images=IMAGES, layers=None, timing=False):
    """One row per (model, tol): see the module docstring."""
    records = {}
    for name, Q, K, V, scale, mask, real, first in layer_cases(models, images, layers):
        exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), attn_mask=mask, scale=scale)
        keep = 1.0 if real is None else real[:, None, :, None].double()
        fewest = Q.shape[-2] if real is None else int(real.sum(-1).min())
        pays = nystrom_pays(Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1])
        swept = {}

        def true_error(out):
            return float(torch.linalg.vector_norm((out.double() - exact) * keep)
                         / torch.linalg.vector_norm(exact * keep))

        def smallest_within(solver, tol):
            # True error over the grid up to the crossover with this solver, once per solver and case; the smallest
            # m within tol (None: no m where Nyström attention pays meets tol).
            if solver not in swept:
                top = crossover(fewest, pays, solver)
                swept[solver] = [] if top < first else [
                    (m, true_error(nystrom.approximate(Q, K, V, num_landmarks=m, solver=solver, scale=scale,
                                                       attn_mask=mask)))
                    for m in sweep_grid(first, top)]
            return next((m for m, error in swept[solver] if error <= tol), None)

        for tol in tols:
            def call():
                return nystrom.approximate(Q, K, V, num_landmarks=first, tol=tol, scale=scale, attn_mask=mask,
                                           return_info=True)

            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # without a budget a miss is exact attention, no warning
                out, info = call()
            error = true_error(out)
            returned = info.tol_steps[-1]
            answered_exactly = returned.solver == EXACT
            ratio, avoidable = None, False
            if answered_exactly:
                # Exact attention where some m at which Nyström attention pays was within tol: a missed cheaper answer.
                avoidable = smallest_within(nystrom.get_solver("newton_schulz"), tol) is not None
            else:
                needed = smallest_within(returned.solver, tol)
                ratio = None if needed is None else returned.m / needed
            seconds = None
            if timing:
                one = ((lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=scale))
                       if answered_exactly else (lambda: nystrom.approximate(
                           Q, K, V, num_landmarks=returned.m, solver=returned.solver, scale=scale, attn_mask=mask)))
                seconds = best_time(call, CPU, TIMING_REPEATS) / best_time(one, CPU, TIMING_REPEATS)
            steps, rows = search_flops(Q, K, V, info.tol_steps)
            one_call = step_flops(Q, K, V, returned)
            records.setdefault((name, tol), []).append(dict(
                within=error <= tol, exact=answered_exactly, avoidable=avoidable,
                m=None if answered_exactly else returned.m, m_ratio=ratio,
                flops_ratio=(steps + rows) / one_call, steps_flops_ratio=steps / one_call,
                exact_ratio=(steps + rows) / step_flops(Q, K, V, TolStep(fewest, None, EXACT)), time_ratio=seconds))
    return [summary(name, tol, cases) for (name, tol), cases in records.items()]


def summary(name, tol, cases):
    """One table row from the per-case records of ``run``."""
    def median_max(key):
        values = [case[key] for case in cases if case[key] is not None]
        return "–" if not values else f"{float(np.median(values)):.2f}, {float(max(values)):.2f}"

    ms = [case["m"] for case in cases if case["m"] is not None]
    return [name, tol, len(cases), f"{np.mean([c['within'] for c in cases]):.0%}",
            sum(not c["within"] for c in cases), sum(c["exact"] for c in cases), sum(c["avoidable"] for c in cases),
            int(np.median(ms)) if ms else "–", max(ms) if ms else "–",
            f"{median_max('m_ratio')} ({sum(c['m_ratio'] is not None for c in cases)})",
            median_max("flops_ratio"), median_max("steps_flops_ratio"), median_max("exact_ratio"),
            "to be measured" if all(c["time_ratio"] is None for c in cases) else median_max("time_ratio")]


HEADER = ["model", "tol", "layers × inputs", "error within tol", "misses (bound within tol, error above)",
          "answered by exact attention", "… though a cheaper m was within tol",
          "median m (Nyström answers)", "largest m", "m / smallest m within tol (median, largest; cases)",
          "search FLOPs / one call (median, largest)", "without the exact rows", "search FLOPs / exact attention",
          "search time / one call (median, largest)"]


def main(argv=None):
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.tol_report", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=("dinov2", "minilm"), default=["dinov2", "minilm"])
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES))
    parser.add_argument("--layers", type=int, nargs="+",
                        help="captured layers (default all); each model takes those it has, a negative one from "
                             "its last")
    parser.add_argument("--tols", type=positive(float), nargs="+", default=list(TOLS))
    parser.add_argument("--timing", action="store_true", help="also time the search against one call")
    args = parser.parse_args(argv)
    # Usage errors before any model loads (a review: --layers 20 ran nothing, --tols 0.1 0.1 counted each case twice).
    try:
        check_distinct("--tols", args.tols)
        layers_per_model("--layers", args.layers, {model: NUM_LAYERS[model] for model in args.models})
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    print(f"load average {load_average()}")
    warning = busy_warning(1)
    if warning:
        print(f"warning: {warning}")
    print(markdown_table(HEADER, run(tols=args.tols, models=args.models, images=args.images, layers=args.layers,
                                     timing=args.timing)))
    # And at the end: the load the timings met (a review: only the start's was printed).
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
