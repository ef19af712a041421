"""Axes a reader can read at a glance: every figure of the experiments labels at least two ticks per axis.

Matplotlib's defaults fail on the data these experiments produce:

* a log axis whose data span less than a decade gets no labelled tick at all (errors of 0.10–0.35);
* a linear axis of values close together is labelled by an offset (``+9.999e-1``) that hides the values;
* a log axis of swept sizes (:math:`m`, :math:`n`) puts ticks at powers of ten, not at the sizes swept.

:func:`value_axis` and :func:`swept_axis` set scale, ticks and labels from the data; both label plain numbers.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

from nystrom.linalg.landmarks import STRATEGIES

__all__ = ["footer", "log_ticks", "method_color", "plain_number", "strategy_colors", "swept_axis", "value_axis"]

#: One colour per landmark strategy, the same in every figure (a figure that draws another line first, such as a
#: second exact kernel, must not shift them): matplotlib's default cycle in the registry's alphabetical order.
STRATEGY_COLORS = {name: f"C{i}" for i, name in enumerate(sorted(STRATEGIES))}


def method_color(name):
    """The colour of a strategy's lines in every figure; black for anything else (exact attention, references)."""
    return STRATEGY_COLORS.get(name, "black")


def strategy_colors(labels):
    """Colours for the strategy ``labels`` of one figure: a registered name keeps its own (:func:`method_color`), and
    a spec such as ``norm:sink_ratio=8`` takes a colour no other label of the figure has (a review: specs were drawn
    in black, the exact model's colour), from matplotlib's cycle, then ``tab20``."""
    import matplotlib

    taken = {STRATEGY_COLORS[label] for label in labels if label in STRATEGY_COLORS}
    tab20 = matplotlib.colormaps["tab20"]
    spare = iter([c for c in (f"C{i}" for i in range(10)) if c not in taken] + [tab20(i) for i in range(20)])
    return {label: STRATEGY_COLORS[label] if label in STRATEGY_COLORS else next(spare) for label in labels}


def plain_number(value, _position=None):
    """A tick label: whole numbers below a million in full (``2048``), others to three significant digits without
    trailing zeros (``0.2``, ``2e-05``)."""
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.3g}"


def footer(fig, text, fontsize=7):
    """Write ``text`` (a result's stamp) small and grey under the figure, broken into lines that fit its width.

    The lines are broken here, not by matplotlib's ``wrap``: the layout engine reserves room for the text as
    given, and a text wrapped only when drawn runs into the axis labels above it.
    """
    # About 0.55 em per character of the default sans-serif font, at 72 points per inch.
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    fig.supxlabel(textwrap.fill(text, chars, break_on_hyphens=False), fontsize=fontsize, color="0.4")


def _swept_label(value, _position=None):
    return f"{value / 1024:g}k" if value >= 4096 and value % 1024 == 0 else plain_number(value)


def _axis(ax, which):
    if which not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {which!r}")
    return ax.xaxis if which == "x" else ax.yaxis


def log_ticks(axis, lo, hi):
    r"""Label a log-scaled ``axis`` whose values lie in ``[lo, hi]``: plain numbers at :math:`\{1, 2, 5\} \times
    10^k` when they span under three decades, at powers of ten otherwise; unlabelled minor ticks."""
    subs = (1.0, 2.0, 5.0) if hi / lo < 1e3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(plain_number))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10)))
    axis.set_minor_formatter(NullFormatter())


def value_axis(ax, which="y", *, log=True):
    r"""Scale and label a value axis from the data drawn on it; call after plotting.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    which : {"x", "y"}
    log : bool
        Whether a log scale is wanted. It is used only when the positive data span at least a decade; below
        that a log axis would have no labelled tick, and the axis stays linear. Values of 0 or below (an exact
        answer's error) then lie on the axis's lower edge, labelled 0, half a decade under the smallest positive
        value.

    Notes
    -----
    A log axis is labelled by :func:`log_ticks`; a linear axis shows at most five plain numbers, never an offset or a
    shared exponent.
    """
    axis = _axis(ax, which)
    lo, hi = ax.dataLim.intervalx if which == "x" else ax.dataLim.intervaly
    lines = [line for line in ax.get_lines() if line.get_transform() == ax.transData]
    data = [np.asarray(line.get_xdata() if which == "x" else line.get_ydata(), dtype=float) for line in lines]
    if log and lo <= 0 < hi:
        # A single 0 made the axis linear, which pressed every error but the largest onto it (a review).
        # Only lines are read: an axes of bars alone keeps the linear axis it had.
        values = np.concatenate(data) if data else np.zeros(0)
        values = values[np.isfinite(values) & (values > 0)]
        lo = values.min() if values.size else lo
    positive = bool(np.isfinite([lo, hi]).all()) and lo > 0
    if log and positive and hi / lo >= 10:
        # Half a decade under the smallest positive value: the lower edge, labelled 0, where values of 0 lie.
        edge = lo / 10**0.5
        for line, values in zip(lines, data):
            if (values <= 0).any():
                # Marker and all on the edge (a log axis would leave the point out).
                (line.set_xdata if which == "x" else line.set_ydata)(np.where(values <= 0, edge, values))
                line.set_clip_on(False)
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        log_ticks(axis, lo, hi)
        if any((values <= 0).any() for values in data):
            (ax.set_xlim if which == "x" else ax.set_ylim)(edge, None)
            ticks = [t for t in axis.get_major_locator().tick_values(lo, hi) if t >= lo * (1 - 1e-9)]
            axis.set_major_locator(FixedLocator([edge, *ticks]))
            axis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == edge else plain_number(v)))
    else:
        (ax.set_xscale if which == "x" else ax.set_yscale)("linear")
        # At most five labelled ticks: matplotlib's default of up to ten put plain numbers such as 0.00018, 0.00020,
        # ... side by side on a panel 4.8 inches wide, overlapping (26 of 400 random time ranges under a decade).
        axis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)


def swept_axis(ax, values, which="x"):
    """A log-2 axis with one labelled tick at each swept value (``m`` or ``n``) and no other ticks.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    values : sequence of positive numbers
        The values swept. A single value gets its halves and doubles as neighbours, so that the axis still
        has a scale.
    which : {"x", "y"}

    Notes
    -----
    Labels are :func:`plain_number`, with multiples of 1024 from 4096 on in thousands (``4k``, ``64k``).
    """
    axis = _axis(ax, which)
    ticks = sorted({float(v) for v in values})
    if not ticks or ticks[0] <= 0:
        raise ValueError(f"swept values must be positive, got {list(values)}")
    if len(ticks) == 1:
        ticks = [ticks[0] / 2, ticks[0], ticks[0] * 2]
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    # Every swept value in view, with a quarter of an octave to spare, whatever was drawn (or not).
    margin = 2 ** 0.25
    (ax.set_xlim if which == "x" else ax.set_ylim)(ticks[0] / margin, ticks[-1] * margin)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(_swept_label))
    axis.set_minor_locator(NullLocator())
