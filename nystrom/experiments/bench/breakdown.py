r"""The ``breakdown`` section: where the time of one ``approximate`` call goes, stage by stage.

Stages: input checks (``validation``), landmark selection, the two attention products (:math:`m` landmark
queries over :math:`n` keys, :math:`n` queries over :math:`m` landmark keys), the :math:`m \times m`
pseudo-inverse, and the ``rest`` the named stages do not account for.
"""

from __future__ import annotations

import time
from unittest import mock

import numpy as np
import torch

from nystrom import approximate, get_solver, get_strategy
from nystrom.linalg.landmarks import STRATEGIES
from nystrom.torch import attention

from ..report import markdown_table
from ..stamp import caption
from ..timing import synchronize, timed_call
from .inputs import random_qkv
from .output import figure, format_ms, save
from .plan import DEFAULT_SOLVER
from .scaling import approximate_flops, measure_roofline

STAGES = ("validation", "selection", "landmark_product", "solve", "output_product", "rest")
_BREAKDOWN_CALLS = 3


def _timing_wrapper(inner, stage, seconds, device):
    """``inner`` with its time added to ``seconds[stage]``; ``stage`` is a name or a function of the call's
    first argument."""
    def wrapped(first, *args, **kwargs):
        synchronize(device)
        begin = time.perf_counter()
        result = inner(first, *args, **kwargs)
        synchronize(device)
        seconds[stage(first) if callable(stage) else stage] += time.perf_counter() - begin
        return result

    return wrapped


def stage_times(Q, K, V, strategy, m, device, solver=DEFAULT_SOLVER):
    """Seconds of one ``approximate`` call by stage; ``rest`` is what the stages do not account for.

    The strategy's :meth:`~nystrom.linalg.landmarks.base.Strategy.select` and the solver's
    :meth:`~nystrom.linalg.solvers.Solver.solve` (the trusted methods ``approximate`` calls after its checks) are
    swapped for timed copies on their classes for the call. ``approximate`` checks all its inputs before it
    selects landmarks, so ``validation`` is the time from the start of the call to the strategy's: the
    library's own checks, whatever they are, and nothing else. The torch attention call,
    :func:`nystrom.torch.attention.sdpa_attend`, is swapped for a timed copy too (``approximate`` looks it up on
    its module at each call): the :math:`m` landmark queries over all keys are the "landmark product", all
    queries over the :math:`m` landmark keys the "output product". Only those calls are intercepted, so the
    other stages run at full speed.

    Parameters
    ----------
    Q, K, V : Tensor, shape (..., n, d)
    strategy, solver : str, Strategy or Solver
        Names or library objects (not plain callables: their trusted methods are what is timed).
    m : int
        Landmarks.
    device : torch.device
        Where the inputs live (CUDA work is synchronised around each stage).

    Returns
    -------
    dict of str to float
        Seconds of ``validation``, ``selection``, ``landmark_product``, ``solve``, ``output_product`` and
        ``total`` (the whole call).
    """
    seconds = dict.fromkeys(("validation", "selection", "landmark_product", "solve", "output_product"), 0.0)
    strategy, solver = get_strategy(strategy), get_solver(solver)
    select = _timing_wrapper(type(strategy).select, "selection", seconds, device)
    solve = _timing_wrapper(type(solver).solve, "solve", seconds, device)
    attend = _timing_wrapper(attention.sdpa_attend,
                             lambda q: "landmark_product" if q.shape[-2] == m else "output_product", seconds, device)
    started = []

    def checked_then_select(self, selection):
        synchronize(device)
        seconds["validation"] = time.perf_counter() - started[0]
        return select(self, selection)

    def call():
        synchronize(device)
        started[:] = [time.perf_counter()]
        return approximate(Q, K, V, strategy=strategy, num_landmarks=m, solver=solver, seed=0)

    with (mock.patch.object(attention, "sdpa_attend", attend),
          mock.patch.object(type(strategy), "select", checked_then_select),
          mock.patch.object(type(solver), "solve", solve)):
        seconds["total"] = timed_call(call, device)
    return seconds


def run_breakdown(ctx):
    """Stage times of ``approximate`` for every strategy and m at the plan's breakdown shapes."""
    plan, device = ctx.plan, ctx.device
    roof = ctx.roofline or measure_roofline(ctx)
    d = plan.head_dim
    configs = [(h, n, s, m) for h, n in plan.breakdown for s in STRATEGIES for m in plan.landmarks if m <= n]
    records = []
    with ctx.progress_bar(len(configs), "breakdown") as bar, torch.inference_mode():
        for heads, n in plan.breakdown:
            Q, K, V = random_qkv((1, heads, n, d), device, ctx.dtype)
            for _, _, s, m in [c for c in configs if c[:2] == (heads, n)]:
                warm_up = timed_call(lambda: approximate(Q, K, V, strategy=s, num_landmarks=m, seed=0), device)
                calls = 1 if warm_up >= plan.budget_s else _BREAKDOWN_CALLS
                best = min((stage_times(Q, K, V, s, m, device) for _ in range(calls)), key=lambda t: t["total"])
                products = best["landmark_product"] + best["output_product"]
                flops = approximate_flops(heads, n, d, m)
                product_flops = flops["landmark_products"] + flops["output_product"]
                accounted = best["validation"] + best["selection"] + products + best["solve"]
                records.append({
                    "heads": heads, "n": n, "d": d, "m": m, "strategy": s,
                    **{f"{k}_s": v for k, v in best.items()}, "rest_s": best["total"] - accounted,
                    "selection_share": best["selection"] / best["total"],
                    "products_flops_per_s": product_flops / products,
                    "products_gemm_fraction": product_flops / products / roof["gemm_flops_per_s"],
                })
                bar.update()
    stamp = ctx.stamp()
    payload = {"stamp": stamp, "roofline": roof, "records": records}
    save(ctx, "breakdown", payload=payload, tables=breakdown_tables(records, plan, stamp))
    save(ctx, "breakdown", breakdown_figure(records, stamp))
    return payload


def breakdown_tables(records, plan, stamp):
    """Markdown: per shape, ms by stage for every strategy and m, with the selection share."""
    parts = [caption(stamp), f"_Fastest of {_BREAKDOWN_CALLS} instrumented calls after a warm-up (one call where "
             f"the warm-up took over {plan.budget_s:g} s); `rest` = total minus the named stages (landmark checks, "
             "casts, the m×m softmax, A⁺(BV))._\n"]
    for heads, n in plan.breakdown:
        parts.append(f"### Shape (1, {heads}, {n:,}, {plan.head_dim}): milliseconds by stage\n")
        rows = [[f"`{r['strategy']}`", r["m"], format_ms(r["total_s"])] + [format_ms(r[f"{s}_s"]) for s in STAGES]
                + [f"{100 * r['selection_share']:.0f}%", f"{100 * r['products_gemm_fraction']:.0f}%"]
                for r in records if (r["heads"], r["n"]) == (heads, n)]
        parts.append(markdown_table(["strategy", "m", "total", *STAGES, "selection share",
                                     "products FLOP rate / GEMM"], rows))
    return "\n".join(parts)


def breakdown_figure(records, stamp):
    """Stacked bars of each stage's share of the call, its total time written beside the bar, one panel per
    breakdown shape (from the records alone, so that saved ones can be redrawn).

    Shares rather than milliseconds: totals span three orders of magnitude (2 s for ``rpcholesky`` at m = 256 on a
    GPU, 4 ms for ``uniform``), and on one linear time axis every fast strategy's bar is too short to read.
    """
    shapes = list(dict.fromkeys((r["heads"], r["n"], r["d"]) for r in records))
    bars = max(sum((r["heads"], r["n"], r["d"]) == shape for r in records) for shape in shapes)
    # About 2 inches for the title, legend, axis label and stamp, and a fifth of one per bar: with 0.9 + 0.16 per
    # bar the 12 bars of a smoke run overlapped their labels (a review).
    fig, axes = figure(len(shapes), stamp, width=6.5, height=2.2 + 0.2 * bars)
    for ax, (heads, n, d) in zip(axes, shapes):
        rows = [r for r in records if (r["heads"], r["n"], r["d"]) == (heads, n, d)]
        labels = [f"{r['strategy']} m={r['m']}" for r in rows]
        times = np.array([[max(r[f"{stage}_s"], 0.0) for stage in STAGES] for r in rows])
        totals = times.sum(axis=1)
        shares = 100 * times / np.where(totals > 0, totals, 1.0)[:, None]
        left = np.zeros(len(rows))
        for stage, widths in zip(STAGES, shares.T):
            ax.barh(labels, widths, left=left, label=stage.replace("_", " "))
            left += widths
        for y, total in enumerate(totals):
            ax.text(101, y, format_ms(total), va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"where the time goes, (1, {heads}, {n:,}, {d})", pad=40)
        ax.set(xlabel="share of the call's time (%); total (ms) beside each bar", xlim=(0, 112))
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=3)
    return fig
