"""What a benchmark section writes: ``<name>.json``, ``<name>.md`` and ``<name>.png`` files, and their formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..plotting import footer
from ..stamp import figure_stamp

#: Resolution of every PNG the suite writes.
DPI = 110


def figure(panels, stamp, width=5.5, height=4.2, rows=1):
    """A figure of ``panels`` axes on ``rows`` rows, with the stamp as its footer; returns ``(fig, axes)``."""
    from matplotlib.figure import Figure

    cols = math.ceil(panels / rows)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.get_layout_engine().set(h_pad=0.15)
    footer(fig, figure_stamp(stamp))
    return fig, axes


def save(ctx, name, fig=None, payload=None, tables=None):
    """Write whichever of the figure (PNG), payload (JSON) and tables (markdown) are given, as ``ctx.out/name.*``."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    if fig is not None:
        fig.savefig(ctx.out / f"{name}.png", dpi=DPI)
    if payload is not None:
        (ctx.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    if tables is not None:
        (ctx.out / f"{name}.md").write_text(tables)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def format_ms(seconds):
    """Seconds as milliseconds for a table cell (``None`` stays ``None``)."""
    return None if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def format_mib(nbytes):
    """Bytes as MiB for a table cell (``None`` stays ``None``)."""
    return None if nbytes is None else f"{nbytes / 2**20:,.1f}"
