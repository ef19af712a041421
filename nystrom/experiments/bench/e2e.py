"""The ``e2e`` section: DINOv2-S forward passes, exact against FNA in the later half of the layers."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nystrom.torch.patching import fna

from .. import pretrained
from ..plotting import swept_axis, value_axis
from ..report import format_ratio, markdown_table
from ..stamp import caption
from ..timing import measure
from .output import figure, format_mib, format_ms, save
from .plan import DEFAULT_STRATEGY


def run_e2e(ctx):
    """DINOv2-S forward latency, memory and feature agreement, exact vs FNA on the later half of the layers."""
    plan, device = ctx.plan, ctx.device
    try:
        model = pretrained.load_dinov2_small(dtype=ctx.dtype).to(device)
    except (ImportError, FileNotFoundError) as err:
        print(f"e2e: skipped ({err})", file=sys.stderr)
        payload = {"stamp": ctx.stamp(), "skipped": str(err), "records": []}
        save(ctx, "e2e", payload=payload, tables=f"End-to-end benchmark skipped: {err}\n")
        return payload
    image = pretrained.natural_images()["astronaut"]
    depth = model.config.num_hidden_layers
    layers = range(depth // 2, depth)
    records = []
    with ctx.progress_bar(len(plan.e2e_sizes), "e2e") as bar, torch.inference_mode():
        # One untimed pass first: one-time allocations that stay (a GPU's BLAS workspace) would otherwise count in
        # the first measurement's peak memory, exact attention's (a review finding).
        model(pixel_values=pretrained.imagenet_pixel_values(image, plan.e2e_sizes[0]).to(device=device,
                                                                                          dtype=ctx.dtype))
        for size in plan.e2e_sizes:
            pixels = pretrained.imagenet_pixel_values(image, size).to(device=device, dtype=ctx.dtype)
            outputs = {}

            def forward(key):
                # Keeps the timed calls' output: a 1036 px forward is too slow to repeat for the comparison.
                outputs[key] = model(pixel_values=pixels)

            exact = measure(lambda: forward("exact"), device, budget_s=2 * plan.budget_s)
            with fna(model, layers=layers, num_landmarks=plan.e2e_landmarks, strategy=DEFAULT_STRATEGY):
                approx = measure(lambda: forward("fna"), device, budget_s=2 * plan.budget_s)
            exact_out, fna_out = outputs["exact"], outputs["fna"]
            cls = F.cosine_similarity(fna_out.pooler_output.float(), exact_out.pooler_output.float(), dim=-1)
            patches = F.cosine_similarity(fna_out.last_hidden_state[:, 1:].float(),
                                          exact_out.last_hidden_state[:, 1:].float(), dim=-1)
            records.append({
                "size": size, "n": exact_out.last_hidden_state.shape[1], "fna_layers": list(layers),
                "m": plan.e2e_landmarks, "strategy": DEFAULT_STRATEGY,
                "exact_s": exact.min, "fna_s": approx.min, "speedup": exact.min / approx.min,
                "exact_peak_bytes": exact.peak_bytes, "fna_peak_bytes": approx.peak_bytes,
                "cls_cosine": float(cls.mean()), "patch_cosine_mean": float(patches.mean()),
                "patch_cosine_min": float(patches.min()),
            })
            bar.update()
    # After the timings, as the other sections stamp: the load average then is the one the run met (a review: it
    # was taken before the model loaded).
    stamp = ctx.stamp()
    payload = {"stamp": stamp, "records": records}
    rows = [[r["size"], f"{r['n']:,}", format_ms(r["exact_s"]), format_ms(r["fna_s"]), format_ratio(r["speedup"]),
             format_mib(r["exact_peak_bytes"]), format_mib(r["fna_peak_bytes"]), f"{r['cls_cosine']:.4f}",
             f"{r['patch_cosine_mean']:.4f}", f"{r['patch_cosine_min']:.3f}"] for r in records]
    tables = (caption(stamp) + f"_FNA (`{DEFAULT_STRATEGY}`, m = {plan.e2e_landmarks}) in layers "
              f"{layers.start}–{layers.stop - 1} of {depth}; image `astronaut`._\n\n" + markdown_table(
                  ["px", "tokens", "exact (ms)", "FNA (ms)", "speed-up", "exact peak (MiB)", "FNA peak (MiB)",
                   "CLS cosine", "patch cosine (mean)", "patch cosine (min)"], rows))
    save(ctx, "e2e", payload=payload, tables=tables)
    save(ctx, "e2e", e2e_figure(records, stamp))
    return payload


def e2e_figure(records, stamp):
    """Forward latency and feature agreement against the number of tokens, exact against FNA (from the records
    alone, so that saved ones can be redrawn)."""
    fig, axes = figure(2, stamp, width=4.6, height=3.6)
    n = [r["n"] for r in records]
    landmarks = "/".join(str(m) for m in dict.fromkeys(r["m"] for r in records))
    axes[0].plot(n, [r["exact_s"] for r in records], "k-o", ms=3, label="exact")
    axes[0].plot(n, [r["fna_s"] for r in records], "-o", ms=3, label=f"FNA m={landmarks}")
    axes[0].set(title="DINOv2-S forward latency", xlabel="tokens", ylabel="seconds")
    value_axis(axes[0], "y")
    axes[1].plot(n, [r["cls_cosine"] for r in records], "-o", ms=3, label="CLS")
    axes[1].plot(n, [r["patch_cosine_mean"] for r in records], "-o", ms=3, label="patches (mean)")
    axes[1].set(title="feature agreement with exact", xlabel="tokens", ylabel="cosine similarity")
    value_axis(axes[1], "y", log=False)
    for ax in axes:
        swept_axis(ax, n)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig
