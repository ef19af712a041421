r"""The ``accuracy`` section: relative output error against :math:`m` and against time, per strategy and solver.

Inputs: attention captured from DINOv2-S and all-MiniLM-L6-v2, and a synthetic input with an attention sink
(:mod:`nystrom.experiments.bench.inputs`); the reference is exact attention in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from nystrom import approximate, exact_attention
from nystrom.linalg.landmarks import STRATEGIES
from nystrom.linalg.solvers import SOLVERS

from ..metrics import relative_error
from ..plotting import method_color, swept_axis, value_axis
from ..report import markdown_table
from ..stamp import caption
from ..timing import measure
from .inputs import attention_inputs
from .output import figure, format_ms, save
from .plan import DEFAULT_SOLVER, DEFAULT_STRATEGY


def run_accuracy(ctx):
    """Relative error (float64 reference) and time of every strategy x solver x m on captured and synthetic inputs.

    For multi-head inputs the default strategy also runs with one landmark set per head
    (``share_landmarks_across_heads=False``), which measures what sharing costs in accuracy and saves in time.
    """
    plan, device = ctx.plan, ctx.device
    inputs = attention_inputs(plan)
    configs = [(i, m) for i, item in enumerate(inputs) for m in plan.accuracy_landmarks if m <= item[2].shape[-2]]
    records = []
    with ctx.progress_bar(len(configs), "accuracy") as bar, torch.inference_mode():
        for index, (dataset, layer, Q, K, V, scale, mask) in enumerate(inputs):
            reference = exact_attention(Q.double(), K.double(), V.double(), scale=scale, attn_mask=mask)
            Q, K, V = (x.to(device=device, dtype=ctx.dtype) for x in (Q, K, V))
            mask = None if mask is None else mask.to(device)
            variants = [(s, solver, True) for s in STRATEGIES for solver in SOLVERS]
            if K.shape[-3] > 1:
                variants.append((DEFAULT_STRATEGY, DEFAULT_SOLVER, False))
            for m in [m for i, m in configs if i == index]:
                for strategy, solver, shared in variants:
                    def call():
                        return approximate(Q, K, V, strategy=strategy, num_landmarks=m, solver=solver, scale=scale,
                                           attn_mask=mask, seed=0, share_landmarks_across_heads=shared)

                    # Time is measured for the default solver only: the solve is a small share of the call.
                    meas = measure(call, device, min_calls=2, budget_s=0.05) if solver == DEFAULT_SOLVER else None
                    records.append({
                        "dataset": dataset, "layer": layer, "n": K.shape[-2], "heads": K.shape[-3],
                        "strategy": strategy, "solver": solver, "m": m, "shared": shared,
                        "rel_error": relative_error(call().cpu(), reference),
                        "time_s": None if meas is None else meas.min,
                    })
                bar.update()
    stamp = ctx.stamp()
    payload = {"stamp": stamp, "seed": 0, "records": records}
    save(ctx, "accuracy", payload=payload, tables=accuracy_tables(records, plan, stamp))
    for name, fig in accuracy_figures(records, stamp).items():
        save(ctx, name, fig)
    return payload


def _mean_over_layers(records, shared=True, **where):
    """Mean relative error (and time) over the layers of a dataset, per m."""
    by_m = {}
    for r in records:
        if r["shared"] == shared and all(r[k] == v for k, v in where.items()):
            by_m.setdefault(r["m"], []).append(r)
    return {m: (float(np.mean([r["rel_error"] for r in rs])),
                None if rs[0]["time_s"] is None else float(np.mean([r["time_s"] for r in rs])))
            for m, rs in sorted(by_m.items())}


def accuracy_tables(records, plan, stamp):
    """Markdown: per dataset, mean relative error over the captured layers by strategy x m, and by solver at m=64."""
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    parts = [caption(stamp), "_Relative Frobenius error of the output against exact attention in float64, mean "
             "over the captured layers; random strategies use seed 0._\n"]
    m_solver = 64 if 64 in plan.accuracy_landmarks else plan.accuracy_landmarks[-1]
    for dataset in datasets:
        layers = sorted({r["layer"] for r in records if r["dataset"] == dataset and r["layer"] is not None})
        shape = next((r["heads"], r["n"]) for r in records if r["dataset"] == dataset)
        where = f", layers {layers}" if layers else ""
        parts.append(f"### {dataset} ({shape[0]} heads, n = {shape[1]:,}{where}): error with `{DEFAULT_SOLVER}`\n")
        ms = sorted({r["m"] for r in records if r["dataset"] == dataset})
        rows = []
        for s in STRATEGIES:
            errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=DEFAULT_SOLVER)
            rows.append([f"`{s}`"] + [f"{errors[m][0]:.3g}" if m in errors else None for m in ms])
        parts.append(markdown_table(["strategy"] + [f"m={m}" for m in ms], rows))
        if m_solver in ms:
            parts.append(f"Error by solver at m = {m_solver}:\n")
            rows = []
            for s in STRATEGIES:
                row = [f"`{s}`"]
                for solver in SOLVERS:
                    errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=solver)
                    row.append(f"{errors[m_solver][0]:.3g}")
                rows.append(row)
            parts.append(markdown_table(["strategy"] + [f"`{s}`" for s in SOLVERS], rows))
        per_head = _mean_over_layers(records, shared=False, dataset=dataset)
        if per_head:
            shared = _mean_over_layers(records, dataset=dataset, strategy=DEFAULT_STRATEGY, solver=DEFAULT_SOLVER)
            parts.append(f"Landmarks shared by the {shape[0]} heads (default) or chosen per head, "
                         f"`{DEFAULT_STRATEGY}`: error and time (ms):\n")
            rows = [[m, f"{shared[m][0]:.3g}", f"{per_head[m][0]:.3g}", format_ms(shared[m][1]),
                     format_ms(per_head[m][1])] for m in per_head]
            parts.append(markdown_table(["m", "error, shared", "error, per head", "time, shared",
                                         "time, per head"], rows))
    return "\n".join(parts)


def accuracy_figures(records, stamp):
    """The section's figures by file name: error against m for each solver, and against time (default solver)."""
    figures = {}
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    for name, against_time in (("accuracy_m", False), ("accuracy_time", True)):
        for solver in ((DEFAULT_SOLVER,) if against_time else SOLVERS):
            fig, axes = figure(len(datasets), stamp, width=4.8, height=3.8, rows=1 if len(datasets) < 3 else 2)
            for ax, dataset in zip(axes, datasets):
                for s in STRATEGIES:
                    errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=solver)
                    x = [t for _, t in errors.values()] if against_time else list(errors)
                    ax.plot(x, [e for e, _ in errors.values()], "-o", ms=3, color=method_color(s), label=s)
                ax.set(title=dataset, xlabel="fastest call (s)" if against_time else "m (landmarks)",
                       ylabel="relative error")
                value_axis(ax, "y")
                if against_time:
                    value_axis(ax, "x")
                else:
                    swept_axis(ax, sorted({r["m"] for r in records if r["dataset"] == dataset}))
                ax.grid(True, which="both", alpha=0.3)
            axes[0].legend(fontsize=7, title=f"solver: {solver}", title_fontsize=7)
            figures[name if solver == DEFAULT_SOLVER else f"{name}_{solver}"] = fig
    return figures
