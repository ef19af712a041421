"""PNG figures of the token analyses of :mod:`nystrom.torch.tokens`.

Each function draws one figure from a :class:`~nystrom.torch.tokens.TokenAnalysis` or
:class:`~nystrom.torch.tokens.SuppressionResult` and writes it to ``path``. Figures are built on
:class:`matplotlib.figure.Figure` and rendered by Agg, so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from nystrom.torch import SuppressionResult, TokenAnalysis

from .plotting import log_ticks, value_axis

__all__ = ["plot_attention_share", "plot_suppression", "plot_token_norms"]

# (kind, marker, colour, size): hollow markers around the cell for token norms, a cross inside it for sinks;
# colours that stand out on both ends of viridis.
_KINDS = (("massive", "o", "deeppink", 170), ("artifact", "s", "cyan", 110), ("sink", "x", "red", 45))


def _png_path(path) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must name a .png file, got {str(path)!r}")
    return path


def _check(name, value, kind):
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_token_norms(analysis: TokenAnalysis, path, *, sequence=0, labels=None) -> Path:
    r"""Heat map of residual-stream token norms, layer by token, with the detected tokens marked.

    Parameters
    ----------
    analysis : TokenAnalysis
    path : str or os.PathLike
        Output ``.png`` file.
    sequence : int, default 0
        Which sequence of the batch to draw (its real tokens only).
    labels : sequence of str, optional
        Token labels (e.g. ``tokenizer.convert_ids_to_tokens``) for the x axis, one per token of the
        sequence including padding; shown when there are at most 64 real tokens.

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    Colours are :math:`\lVert r_{l,j}\rVert` on a log scale (the pre-LayerNorm residual of
    :class:`~nystrom.torch.tokens.TokenAnalysis`); circles mark massive activations, squares artifact
    tokens, crosses attention sinks.
    """
    _check("analysis", analysis, TokenAnalysis)
    path = _png_path(path)
    batch = analysis.token_mask.shape[0]
    if isinstance(sequence, bool) or not isinstance(sequence, int | np.integer) or not 0 <= sequence < batch:
        raise ValueError(f"sequence must be an index in [0, {batch}), got {sequence!r}")
    real = np.flatnonzero(analysis.token_mask[sequence])
    if labels is not None and len(labels) != analysis.token_mask.shape[1]:
        raise ValueError(f"labels must have one entry per token ({analysis.token_mask.shape[1]}), got {len(labels)}")
    norms = analysis.residual_norms[:, sequence, real]
    fig = Figure(figsize=(min(4 + 0.25 * len(real), 16), 2.5 + 0.35 * analysis.num_layers), layout="constrained")
    ax = fig.subplots()
    low, high = max(norms.min(), 1e-6), norms.max()
    # Under a decade a log colour bar would label no tick.
    log = high >= 10 * low
    image = ax.imshow(norms, aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=(LogNorm if log else Normalize)(vmin=low, vmax=high))
    bar = fig.colorbar(image, ax=ax, label="residual norm (pre-LayerNorm)")
    if log:
        log_ticks(bar.ax.yaxis, low, high)
    for kind, marker, color, size in _KINDS:
        layer, token = np.nonzero(getattr(analysis, kind)[:, sequence, real])
        style = dict(color=color) if marker == "x" else dict(facecolors="none", edgecolors=color)
        ax.scatter(token, layer, marker=marker, s=size, linewidths=2, label=f"{kind} ({len(layer)})", **style)
    if labels is not None and len(real) <= 64:
        ax.set_xticks(range(len(real)), [labels[j] for j in real], rotation=90, fontsize=8)
    else:
        ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_yticks(range(analysis.num_layers))
    ax.set_title(f"Token norms per layer (sequence {sequence})")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, facecolor="lightgray", title=_settings(analysis),
               title_fontsize=7)
    return _save(fig, path)


def _settings(analysis):
    """The detection settings of ``analysis`` as two lines of a legend title (``None`` when it recorded none)."""
    t = analysis.thresholds
    if not t:
        return None
    return (f"massive: |activation| ≥ {t['massive_threshold']:g} and ≥ {t['massive_ratio']:g}× the median\n"
            f"artifact: norm ≥ {t['artifact_ratio']:g}× the median; sink: share ≥ {t['sink_ratio']:g}× uniform")


def _sink_split(analysis):
    """Per layer, batch means of the share taken by token 0, by the other sinks, and their uniform shares."""
    share, sink = analysis.attention_share, analysis.sink.copy()
    sink[:, :, 0] = False
    uniform = analysis.uniform_share
    return (share[:, :, 0].mean(axis=1), (share * sink).sum(axis=-1).mean(axis=1),
            np.full(analysis.num_layers, uniform.mean()), (sink.sum(axis=-1) * uniform).mean(axis=1))


def plot_attention_share(analysis: TokenAnalysis, path) -> Path:
    """Per layer, the attention share of the first token (CLS), of the other sinks and of the rest.

    Stacked bars, averaged over the sequences of the batch; the number above each bar is the share of CLS and the
    other sinks over what they would receive under uniform attention (:math:`1/n_v` per real token), which a
    linear axis cannot show (0.004 at 257 tokens).

    Parameters
    ----------
    analysis : TokenAnalysis
    path : str or os.PathLike
        Output ``.png`` file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    _check("analysis", analysis, TokenAnalysis)
    path = _png_path(path)
    cls, sinks, cls_uniform, sinks_uniform = _sink_split(analysis)
    layers = np.arange(analysis.num_layers)
    fig = Figure(figsize=(1.5 + 0.55 * len(layers), 4))
    ax = fig.subplots()
    ax.bar(layers, cls, color="tab:red", label="first token (CLS)")
    ax.bar(layers, sinks, bottom=cls, color="tab:orange", label="other sinks")
    ax.bar(layers, 1 - cls - sinks, bottom=cls + sinks, color="lightgray", label="rest")
    for layer, taken, uniform in zip(layers, cls + sinks, cls_uniform + sinks_uniform):
        ax.annotate(f"{taken / uniform:.0f}×" if uniform > 0 else "", (layer, taken), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention received")
    ax.set_ylim(0, 1.08)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              title="above the bars: CLS + sinks\nover their uniform share" + (
                  "" if "sink_ratio" not in analysis.thresholds
                  else f"\n(sink: share ≥ {analysis.thresholds['sink_ratio']:g}× uniform)"), title_fontsize=7)
    ax.set_title("Where the attention goes")
    return _save(fig, path)


def plot_suppression(result: SuppressionResult, path) -> Path:
    """Three panels, per layer, comparing the masked run of a suppression experiment with the baseline.

    Left: the attention share received by the masked tokens and the largest share of any other token.
    Middle: residual norm ratio masked/baseline (masked tokens; median and maximum of the others).
    Right: how many tokens became sinks, massive or artifacts only in the masked run. Masked layers are
    shaded.

    Parameters
    ----------
    result : SuppressionResult
    path : str or os.PathLike
        Output ``.png`` file.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    _check("result", result, SuppressionResult)
    path = _png_path(path)
    base, masked = result.baseline, result.masked
    layers = np.arange(base.num_layers)
    others = base.token_mask & ~result.masked_tokens
    fig = Figure(figsize=(15, 4))
    share_ax, norm_ax, count_ax = fig.subplots(1, 3)
    for ax in (share_ax, norm_ax, count_ax):
        for layer in result.mask_layers:
            ax.axvspan(layer - 0.5, layer + 0.5, color="gold", alpha=0.25, lw=0)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")

    received = result.masked_share.mean(axis=-1)
    share_ax.plot(layers, received[0], "--", color="tab:red", label="masked tokens, baseline")
    share_ax.plot(layers, received[1], "-", color="tab:red", label="masked tokens, masked run")
    for analysis, style, name in ((base, "--", "baseline"), (masked, "-", "masked run")):
        largest = np.where(others, analysis.attention_share, 0).max(axis=-1).mean(axis=-1)
        share_ax.plot(layers, largest, style, color="tab:blue", label=f"largest other token, {name}")
    share_ax.set_ylabel("share of attention received")
    share_ax.set_title(f"Masking {result.mask_kind} keys: attention")
    share_ax.legend(fontsize=7)

    ratio = result.norm_ratio
    norm_ax.plot(layers, np.nanmean(np.where(result.masked_tokens, ratio, np.nan), axis=(1, 2)), "o-",
                 color="tab:red", label="masked tokens (mean)")
    norm_ax.plot(layers, np.nanmedian(np.where(others, ratio, np.nan), axis=(1, 2)), "o-",
                 color="tab:blue", label="other tokens (median)")
    norm_ax.plot(layers, np.nanmax(np.where(others, ratio, np.nan), axis=(1, 2)), "^:",
                 color="tab:blue", label="other tokens (max)")
    norm_ax.axhline(1.0, color="gray", lw=0.8)
    value_axis(norm_ax, "y", log=False)
    norm_ax.set_ylabel("residual norm, masked / baseline")
    norm_ax.set_title("Residual norms")
    norm_ax.legend(fontsize=7)

    width = 0.27
    for offset, (name, counts) in zip((-width, 0, width), (("new sinks", result.new_sinks),
                                                         ("new massive", result.new_massive),
                                                         ("new artifact", result.new_artifact))):
        count_ax.bar(layers + offset, counts.sum(axis=(1, 2)), width=width, label=name)
    count_ax.set_ylabel(f"tokens (over {base.token_mask.shape[0]} sequences)")
    count_ax.set_title("Tokens detected only after masking")
    count_ax.legend(fontsize=7)
    return _save(fig, path)
