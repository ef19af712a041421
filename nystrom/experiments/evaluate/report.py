"""The report of an evaluation: markdown tables, how ``norm`` compares with its rivals, and two PNG figures."""

from __future__ import annotations

from pathlib import Path

from ..plotting import footer, strategy_colors, swept_axis, value_axis
from ..report import markdown_table
from ..stamp import caption, figure_stamp

#: Per model, the downstream metrics reported: (key, label, key of the exact model's value or None).
DOWNSTREAM = {
    "dinov2": (("cls_cosine", "CLS cosine", None), ("patch_cosine", "patch cosine", None),
               ("retrieval_recall_at_1", "retrieval R@1", "retrieval_recall_at_1"),
               ("retrieval_agreement", "top-1 agreement", None), ("saliency_iou", "saliency IoU (top 20 %)", None)),
    "minilm": (("embedding_cosine", "embedding cosine", None), ("nn_agreement", "NN agreement", None),
               ("paraphrase_recall_at_1", "paraphrase R@1", "paraphrase_recall_at_1")),
}


def _by(records, **where):
    return [r for r in records if all(r[k] == v for k, v in where.items())]


def markdown_report(result):
    """Markdown tables of one :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2` /
    :func:`~nystrom.experiments.evaluate.minilm.evaluate_minilm` result, and how ``norm`` compares."""
    records, settings, model = result["records"], result["settings"], result["model"]
    tokens = result["tokens"]
    n = f"{tokens['min']}" if tokens["min"] == tokens["max"] else f"{tokens['min']}–{tokens['max']}"
    exact = ", ".join(f"{k} {v:.3f}" for k, v in result["exact"].items())
    parts = [f"### {result['description']}\n", caption(result["stamp"]),
             f"FNA in layers {settings['layers']}, n = {n} tokens; exact model: {exact}. \"m ≥ n\" is the share of "
             "sequences with at least as many landmarks as tokens: every token is a landmark there, and the "
             "model's own attention answers, exactly.\n"]
    metrics = DOWNSTREAM[model]
    header = ["strategy", "solver", "m", "m ≥ n", "mean layer error"] + [label for _, label, _ in metrics]
    rows = [[f"`{r['strategy']}`", f"`{r['solver']}`", r["m"], f"{r['all_tokens_fraction']:.0%}",
             f"{r['mean_layer_error']:.3g}"] + [f"{r[key]:.4f}" for key, _, _ in metrics] for r in records]
    parts.append(markdown_table(header, rows))
    layers = list(records[0]["layer_error"]) if records else []
    parts.append("Relative error of each FNA layer's attention output on exact inputs:\n")
    parts.append(markdown_table(["strategy", "solver", "m"] + [f"layer {layer}" for layer in layers],
                                [[f"`{r['strategy']}`", f"`{r['solver']}`", r["m"]]
                                 + [f"{r['layer_error'][layer]:.3g}" for layer in layers] for r in records]))
    parts.append(_norm_comparison(result))
    return "\n".join(p for p in parts if p)


def _norm_comparison(result):
    """Per solver and m, whether ``norm`` is better than ``segment_means`` and ``uniform`` on each metric."""
    records, settings = result["records"], result["settings"]
    rivals = [s for s in ("segment_means", "uniform") if s in settings["strategies"]]
    if "norm" not in settings["strategies"] or not rivals:
        return ""
    metrics = [("mean_layer_error", "mean layer error", False)] + [
        (key, label, True) for key, label, _ in DOWNSTREAM[result["model"]]]
    if len(rivals) == 1:
        legend = "✓ better, = tied to the 4 digits shown, ✗ worse"
    else:
        legend = "✓ better than both, = tied with the better of them to the 4 digits shown, ✗ worse than one"
    lines = [f"Does `norm` beat {' and '.join(f'`{s}`' for s in rivals)}? ({legend})\n"]
    header = ["solver", "m"] + [label for _, label, _ in metrics]
    rows = []
    for solver in settings["solvers"]:
        for m in settings["num_landmarks"]:
            row = [f"`{solver}`", m]
            for key, _, higher in metrics:
                # Compared as printed: float noise (e.g. in the solver when every token is a landmark) is a tie.
                ours = float(f"{_by(records, strategy='norm', solver=solver, m=m)[0][key]:.4g}")
                theirs = [float(f"{_by(records, strategy=s, solver=solver, m=m)[0][key]:.4g}") for s in rivals]
                best = max(theirs) if higher else min(theirs)
                mark = "=" if ours == best else "✓" if (ours > best) == higher else "✗"
                row.append(f"{mark} {ours:.4g} vs {best:.4g}")
            rows.append(row)
    return lines[0] + "\n" + markdown_table(header, rows)


def plot_evaluation(result, out):
    """Write ``eval_<model>_error.png`` and ``eval_<model>_downstream.png`` (see :func:`evaluation_figures`) into
    ``out``. Returns the two paths."""
    paths = []
    for name, fig in evaluation_figures(result).items():
        path = Path(out) / f"eval_{result['model']}_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def evaluation_figures(result):
    """The figures of one result: ``"error"`` (per-layer error against m) and ``"downstream"`` (metrics against m).

    Lines: one colour per strategy (as in the benchmark figures), one line style per solver; a dashed black line
    marks the exact model's value where the metric has one. One legend, right of the panels.
    """
    from matplotlib.figure import Figure

    records, settings, model = result["records"], result["settings"], result["model"]
    styles = dict(zip(settings["solvers"], ("-", "--", ":", "-.")))
    colors = strategy_colors(settings["strategies"])
    layers = [str(layer) for layer in settings["layers"]]
    panels = [("mean over layers", "mean_layer_error", None)] + [(f"layer {layer}", None, layer) for layer in layers]
    metrics = DOWNSTREAM[model]
    figures = {}
    for name, count in (("error", len(panels)), ("downstream", len(metrics))):
        cols = min(count, 4)
        rows = -(-count // cols)
        fig = Figure(figsize=(3.6 * cols, 3.0 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        fig.suptitle(f"{result['description']}: FNA in layers {settings['layers']}", fontsize=9)
        footer(fig, figure_stamp(result["stamp"]))
        for ax in axes[count:]:
            ax.set_visible(False)
        for i, ax in enumerate(axes[:count]):
            if name == "error":
                title, key, layer = panels[i]
            else:
                key, title, _ = metrics[i]
            for strategy in settings["strategies"]:
                for solver in settings["solvers"]:
                    rs = _by(records, strategy=strategy, solver=solver)
                    ms = [r["m"] for r in rs]
                    ys = [r[key] if key else r["layer_error"][layer] for r in rs]
                    # Hollow markers of different shapes keep strategies with equal results (norm, fps) visible.
                    index = settings["strategies"].index(strategy)
                    ax.plot(ms, ys, styles[solver], marker="osv^Dx"[index % 6], ms=6 - index % 3, mfc="none",
                            color=colors[strategy],
                            label=strategy if len(styles) == 1 else f"{strategy}, {solver}")
            if name == "error":
                ax.set_ylabel("relative error")
            else:
                ax.set_ylabel(title)
                if metrics[i][2] is not None:
                    ax.axhline(result["exact"][metrics[i][2]], color="k", ls="--", lw=1, label="exact model")
            value_axis(ax, "y", log=name == "error")
            swept_axis(ax, settings["num_landmarks"])
            ax.set(title=title, xlabel="m (landmarks)")
            ax.grid(True, which="both", alpha=0.3)
        # One legend for every panel, outside them: inside one it hid a point (a review).
        handles, labels = axes[0].get_legend_handles_labels()
        exact = [line for ax in axes[:count] for line in ax.get_lines() if line.get_label() == "exact model"][:1]
        fig.legend(handles + exact, labels + [line.get_label() for line in exact], loc="outside right upper",
                   fontsize=7)
        figures[name] = fig
    return figures
