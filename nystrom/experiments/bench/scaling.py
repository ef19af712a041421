r"""The ``scaling`` section: time, peak memory and FLOP rate of ``approximate`` and exact SDPA against :math:`n`.

Also the FLOP count of a default call, the log-log slope fit and the call on given landmarks (the ceiling of
every strategy), which the breakdown section and ``benchmarks/`` reuse.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nystrom import NewtonSchulz, approximate, get_strategy
from nystrom.linalg.flops import exact_attention_flops, nystrom_attention_flops
from nystrom.torch import fna_attention

from ..plotting import method_color, swept_axis, value_axis
from ..report import format_ratio, markdown_table
from ..stamp import caption
from ..timing import copy_bandwidth, gemm_flop_rate, measure
from .inputs import random_qkv
from .output import figure, format_mib, format_ms, save
from .plan import (
    CPU_GEMM_FRACTION_TARGET,
    CPU_SLOPE_TARGET,
    CPU_SPEEDUP_TARGETS,
    DEFAULT_SOLVER,
    DEFAULT_STRATEGY,
    EXACT_BACKENDS,
    GIVEN,
    METHODS,
)


def approximate_flops(batch, n, d, m):
    """FLOPs by stage of a default :func:`~nystrom.approximate` call on ``batch`` sequences of ``n`` tokens.

    The default solver, :class:`~nystrom.NewtonSchulz`, runs a fixed number of iterations; landmark
    selection is not counted (see :func:`nystrom.linalg.flops.nystrom_attention_flops`).
    """
    solver = NewtonSchulz()
    return nystrom_attention_flops(batch, n, n, d, d, m, solve_flops=solver.flops(m, solver.iters))


def log_log_slope(ns, times):
    """Least-squares slope of :math:`\\log t` against :math:`\\log n` (``None`` for fewer than two points)."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(times), 1)[0])


def measure_roofline(ctx):
    """GEMM rate and copy bandwidth of the device, measured once per run."""
    plan = ctx.plan
    ctx.roofline = {"gemm_size": plan.gemm_size,
                    "gemm_flops_per_s": gemm_flop_rate(ctx.device, ctx.dtype, plan.gemm_size, 2 * plan.budget_s),
                    "copy_bytes_per_s": copy_bandwidth(ctx.device, plan.copy_bytes, plan.budget_s)}
    return ctx.roofline


def given_landmarks_call(Q, K, V, m):
    """``fn()`` computing :func:`~nystrom.torch.fna_attention` on ``m`` shared landmarks drawn
    beforehand (uniformly, seed 0): the two attention products and the solve, the ceiling of every strategy.
    ``check_values=False`` leaves only the shape checks, which cost microseconds."""
    landmarks = get_strategy("uniform")(Q, K, m, seed=0, head_axis=-3)
    return lambda: fna_attention(Q, K, V, landmarks, solver=DEFAULT_SOLVER, scale=Q.shape[-1] ** -0.5,
                                 check_values=False)


def exact_call(Q, K, V, backend=None):
    """``fn()`` computing exact SDPA, by PyTorch's own choice of kernel or by the named ``backend``."""
    if backend is None:
        return lambda: F.scaled_dot_product_attention(Q, K, V)

    def call():
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(Q, K, V)

    return call


def _scaling_configs(plan):
    """``(H, n, method, m)`` in sweep order; ``method`` is one of :data:`EXACT_BACKENDS` (those of the plan), a
    strategy name or :data:`GIVEN`."""
    configs = []
    for heads, lengths in plan.seq_lens.items():
        for n in lengths:
            if n <= plan.exact_max_n[heads]:
                configs += [(heads, n, exact, None) for exact in plan.exact_methods]
            configs += [(heads, n, s, m) for s in METHODS for m in plan.landmarks if m <= n]
    return configs


def run_scaling(ctx):
    """Time and memory of exact SDPA and of ``approximate`` over the plan's grid; see the module docstring."""
    plan, device = ctx.plan, ctx.device
    roof = measure_roofline(ctx)
    configs = _scaling_configs(plan)
    records, inputs = [], None
    with ctx.progress_bar(len(configs), "scaling") as bar, torch.inference_mode():
        for heads, n, method, m in configs:
            shape = (1, heads, n, plan.head_dim)
            if inputs is None or inputs[0].shape != shape:
                inputs = Q = K = V = None  # free the previous size before allocating the next
                inputs = random_qkv(shape, device, ctx.dtype)
            Q, K, V = inputs
            d = plan.head_dim
            if method in EXACT_BACKENDS:
                meas = measure(exact_call(Q, K, V, EXACT_BACKENDS[method]), device, budget_s=plan.budget_s)
                flops = exact_attention_flops(heads, n, n, d, d)
            elif method == GIVEN:
                meas = measure(given_landmarks_call(Q, K, V, m), device, budget_s=plan.budget_s)
                flops = approximate_flops(heads, n, d, m)["total"]
            else:
                meas = measure(lambda: approximate(Q, K, V, strategy=method, num_landmarks=m, seed=0), device,
                               budget_s=plan.budget_s)
                flops = approximate_flops(heads, n, d, m)["total"]
            records.append({
                "heads": heads, "n": n, "d": d, "method": method, "m": m,
                "min_s": meas.min, "median_s": meas.median, "times_s": list(meas.times),
                "peak_bytes": meas.peak_bytes, "flops": flops, "flops_per_s": flops / meas.min,
                "gemm_fraction": flops / meas.min / roof["gemm_flops_per_s"],
                "io_floor_s": 4 * heads * n * d * Q.element_size() / roof["copy_bytes_per_s"],
            })
            bar.update()
    inputs = Q = K = V = None
    stamp = ctx.stamp()
    summary = scaling_summary(records, plan, device)
    payload = {"stamp": stamp, "plan": plan.__dict__, "roofline": roof, "summary": summary, "records": records}
    save(ctx, "scaling", payload=payload, tables=scaling_tables(records, summary, plan, roof, stamp))
    for name, fig in scaling_figures(records, plan, roof, stamp).items():
        save(ctx, name, fig)
    return payload


def _lookup(records, **where):
    for r in records:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def scaling_summary(records, plan, device):
    """Slopes per (H, method, m) and the issue's targets, each with its measured value and verdict."""
    lo, hi = plan.slope_range
    slopes = []
    for heads in plan.seq_lens:
        for method, m in [("exact", None)] + [(s, m) for s in METHODS for m in plan.landmarks]:
            pts = [(r["n"], r["min_s"]) for r in records
                   if r["heads"] == heads and r["method"] == method and r["m"] == m and lo <= r["n"] <= hi]
            if pts:
                slope = log_log_slope(*zip(*pts))
                slopes.append({"heads": heads, "method": method, "m": m, "slope": slope, "points": len(pts)})

    def ratio(heads, n, m=64, method=DEFAULT_STRATEGY):
        exact, approx = _lookup(records, heads=heads, n=n, method="exact"), _lookup(
            records, heads=heads, n=n, method=method, m=m)
        return None if exact is None or approx is None else exact["min_s"] / approx["min_s"]

    def slope_of(heads, method=DEFAULT_STRATEGY, m=64):
        found = _lookup(slopes, heads=heads, method=method, m=m)
        return None if found is None else found["slope"]

    def target(name, value, op, bound):
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        return {"target": name, "value": value, "bound": f"{op} {bound}", "met": met}

    if device.type == "cuda":
        big = _lookup(records, heads=12, n=65536, method=DEFAULT_STRATEGY, m=64)
        targets = [
            target("(1,12,65536,64) m=64: speed-up over SDPA", ratio(12, 65536), ">=", 10),
            target("(1,12,65536,64) m=64: time / (read Q,K,V + write O at copy bandwidth)",
                   None if big is None else big["min_s"] / big["io_floor_s"], "<=", 2),
        ]
    else:
        big = _lookup(records, heads=1, n=65536, method=DEFAULT_STRATEGY, m=64)
        targets = [target(f"(1,1,{n},64) m=64: speed-up over SDPA", ratio(1, n), ">=", bound)
                   for n, bound in CPU_SPEEDUP_TARGETS] + [
            target("(1,1,65536,64) m=64: FLOP rate / GEMM rate", None if big is None else big["gemm_fraction"],
                   ">=", CPU_GEMM_FRACTION_TARGET),
            target(f"(1,1,n,64) m=64: slope of log t vs log n over [{lo}, {hi}]", slope_of(1), "<=",
                   CPU_SLOPE_TARGET),
        ]
    m0 = plan.default_landmarks
    ceiling = []
    for heads, lengths in plan.seq_lens.items():
        for n in lengths:
            exact, given = (_lookup(records, heads=heads, n=n, method="exact"),
                            _lookup(records, heads=heads, n=n, method=GIVEN, m=m0))
            if exact and given:
                ceiling.append({"heads": heads, "n": n, "m": m0, "speedup": exact["min_s"] / given["min_s"],
                                "gemm_fraction": given["gemm_fraction"]})
    return {"slopes": slopes, "targets": targets, "strategy": DEFAULT_STRATEGY, "ceiling": ceiling}


def scaling_tables(records, summary, plan, roof, stamp):
    """Markdown: the targets, time and speed-up per n, slopes, and memory at the largest n."""
    parts = [caption(stamp),
             f"Roofline: {roof['gemm_size']}² GEMM at {roof['gemm_flops_per_s'] / 1e9:,.1f} GFLOP/s; "
             f"copy bandwidth {roof['copy_bytes_per_s'] / 1e9:,.1f} GB/s.\n"]

    def verdict(t):
        return "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")

    def fmt(v):
        return None if v is None else f"{v:.3g}"

    parts.append(f"### Targets (strategy `{summary['strategy']}`, default solver)\n")
    parts.append(markdown_table(["target", "measured", "bound", "verdict"],
                                [(t["target"], fmt(t["value"]), t["bound"], verdict(t)) for t in summary["targets"]]))
    if summary["ceiling"]:
        parts.append(f"Ceiling, m = {summary['ceiling'][0]['m']}: with the landmarks given (`{GIVEN}`: the two "
                     "attention products and the m×m solve, no selection, no input checks) no strategy can do "
                     "better than\n")
        parts.append(markdown_table(["shape", "speed-up over exact SDPA", "FLOP rate / GEMM"],
                                    [(f"(1, {c['heads']}, {c['n']:,}, {plan.head_dim})", format_ratio(c["speedup"]),
                                      f"{100 * c['gemm_fraction']:.0f}%") for c in summary["ceiling"]]))
    m = plan.default_landmarks
    for heads, lengths in plan.seq_lens.items():
        parts.append(f"### Time per call (ms, min) and speed-up over exact SDPA: shape (1, {heads}, n, "
                     f"{plan.head_dim}), m = {m}\n")
        rows = []
        for n in lengths:
            exact = _lookup(records, heads=heads, n=n, method="exact")
            row = [f"{n:,}", format_ms(exact and exact["min_s"])]
            for other in plan.exact_methods[1:]:
                r = _lookup(records, heads=heads, n=n, method=other)
                row.append(format_ms(r and r["min_s"]))
            for s in METHODS:
                r = _lookup(records, heads=heads, n=n, method=s, m=m)
                if r is None:
                    row.append(None)
                    continue
                speedup = f" ({format_ratio(exact['min_s'] / r['min_s'])})" if exact else ""
                row.append(f"{format_ms(r['min_s'])}{speedup}")
            rows.append(row)
        parts.append(markdown_table(["n", "exact SDPA"] + [f"SDPA, {EXACT_BACKENDS[e]}" for e in plan.exact_methods[1:]]
                                    + [f"`{s}`" for s in METHODS], rows))
        n_max = lengths[-1]
        parts.append(f"### Shape (1, {heads}, {n_max:,}, {plan.head_dim}): time (ms, min), FLOP rate as % of "
                     f"the GEMM's, peak memory above the inputs (MiB) by m\n")
        rows = []
        exact = _lookup(records, heads=heads, n=n_max, method="exact")
        if exact:
            rows.append(["exact SDPA", "—", format_ms(exact["min_s"]), f"{100 * exact['gemm_fraction']:.0f}%",
                         format_mib(exact["peak_bytes"])])
        for s in METHODS:
            # Not `m`: that is the speed-up tables' m, and a later group of heads read this loop's last one (the
            # 12-head table was published at m = 256 next to the one-head table's 64).
            for size in plan.landmarks:
                r = _lookup(records, heads=heads, n=n_max, method=s, m=size)
                if r:
                    rows.append([f"`{s}`", size, format_ms(r["min_s"]), f"{100 * r['gemm_fraction']:.1f}%",
                                 format_mib(r["peak_bytes"])])
        parts.append(markdown_table(["method", "m", "time (ms)", "FLOP rate / GEMM", "peak memory (MiB)"], rows))
    lo, hi = plan.slope_range
    parts.append(f"### Fitted slope of log(time) vs log(n) over n ∈ [{lo:,}, {hi:,}]\n")
    rows = []
    for method, m in [("exact", None)] + [(s, m) for s in METHODS for m in plan.landmarks]:
        row = ["exact SDPA" if method == "exact" else f"`{method}`", m]
        for heads in plan.seq_lens:
            found = _lookup(summary["slopes"], heads=heads, method=method, m=m)
            row.append(None if found is None or found["slope"] is None else f"{found['slope']:.2f}")
        rows.append(row)
    parts.append(markdown_table(["method", "m"] + [f"H = {heads}" for heads in plan.seq_lens], rows))
    return "\n".join(parts)


def scaling_figures(records, plan, roof, stamp):
    """The section's figures by file name: time per call by strategy and by m, peak memory, FLOP rate."""
    figures = {}
    by_strategy = [(e, None) for e in plan.exact_methods] + [(s, plan.default_landmarks) for s in METHODS]
    by_landmarks = [("exact", None)] + [(DEFAULT_STRATEGY, m) for m in plan.landmarks]
    for name, lines, key, unit, ylabel, title in (
        ("scaling_time", by_strategy, "min_s", 1, "seconds", "time per call"),
        ("scaling_landmarks", by_landmarks, "min_s", 1, "seconds", "time per call"),
        ("scaling_memory", by_strategy, "peak_bytes", 2**20, "MiB", "peak memory above the inputs"),
        ("roofline", by_strategy, "flops_per_s", 1e9, "GFLOP/s", "achieved FLOP rate"),
    ):
        fig, axes = figure(len(plan.seq_lens), stamp)
        for ax, (heads, lengths) in zip(axes, plan.seq_lens.items()):
            for method, m in lines:
                pts = sorted((r["n"], r[key]) for r in records
                             if (r["heads"], r["method"], r["m"]) == (heads, method, m) and r[key] is not None)
                # Each strategy in its colour of every figure; exact kernels black (the second one grey, squares), the
                # given-landmarks ceiling dashed black. The m sweep of one strategy colours by m instead.
                style = (dict(fmt="-o", color="black") if method == "exact" else
                         dict(fmt="-s", color="0.55") if method in EXACT_BACKENDS else
                         dict(fmt="--", color="black") if method == GIVEN else
                         dict(fmt="-o", color=None) if lines is by_landmarks else
                         dict(fmt="-o", color=method_color(method)))
                # A zero (no measurable growth) cannot sit on a log axis.
                ax.plot([n for n, _ in pts], [v / unit if v > 0 else np.nan for _, v in pts], style["fmt"],
                        color=style["color"], ms=3,
                        label="exact SDPA" if method == "exact" else (
                            f"exact SDPA, {EXACT_BACKENDS[method]}" if method in EXACT_BACKENDS else (
                                f"landmarks given, m={m}" if method == GIVEN else f"{method}, m={m}")))
            if key == "flops_per_s":
                ax.axhline(roof["gemm_flops_per_s"] / unit, color="dimgray", ls="-.",
                           label=f"{roof['gemm_size']}² GEMM")
            ax.set(title=f"{title}, shape (1, {heads}, n, {plan.head_dim})", xlabel="n", ylabel=ylabel)
            # Log for every quantity: the FLOP rates too span decades (a GPU's GEMM at 800 TFLOP/s against the
            # Nyström products' few per cent, which a linear axis drew flat on 0).
            value_axis(ax, "y")
            swept_axis(ax, lengths)
            ax.grid(True, which="both", alpha=0.3)
            # Below the axes: inside, the legend hid the curves where they cross.
            ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        figures[name] = fig
    return figures
