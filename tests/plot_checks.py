"""What makes a figure unreadable, read back from matplotlib after drawing (shared by the tests of every module
that plots; ``pythonpath`` in ``pyproject.toml`` puts this directory on ``sys.path``)."""

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.ticker import NullLocator


def _labelled_ticks(axis):
    """The non-empty tick labels (major and minor) that lie inside the axis's view."""
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    shown = []
    for locs, labels in ((axis.get_majorticklocs(), axis.get_majorticklabels()),
                         (axis.get_minorticklocs(), axis.get_minorticklabels())):
        shown += [label.get_text() for loc, label in zip(locs, labels)
                  if lo - slack <= loc <= hi + slack and label.get_visible() and label.get_text().strip()]
    return shown


def _overlapping_labels(axis, renderer):
    """Pairs of neighbouring tick labels in view whose boxes overlap (a review: the bar labels of a breakdown figure
    drawn too short for its bars were printed over each other)."""
    lo, hi = sorted(axis.get_view_interval())
    shown = [label for locs, labels in ((axis.get_majorticklocs(), axis.get_majorticklabels()),
                                        (axis.get_minorticklocs(), axis.get_minorticklabels()))
             for loc, label in zip(locs, labels)
             if lo <= loc <= hi and label.get_visible() and label.get_text().strip()]
    boxes = sorted(((label.get_window_extent(renderer), label.get_text()) for label in shown),
                   key=lambda item: (item[0].y0, item[0].x0))
    # Boxes overlap by at least a pixel in both directions: touching glyph boxes are not yet unreadable.
    return [(a, b) for (box, a), (other, b) in zip(boxes, boxes[1:])
            if min(box.x1, other.x1) - max(box.x0, other.x0) > 1 and min(box.y1, other.y1) - max(box.y0, other.y0) > 1]


def unreadable_axes(fig):
    """Descriptions of the problems of ``fig``: an axis with fewer than two labelled ticks, an offset or shared
    exponent printed beside an axis, a title wider than its axes or outside the figure, a figure text
    (suptitle, footer) outside the figure. Empty when readable.

    An axis without ticks on purpose (a ``NullLocator``, the short side of a colour bar) carries no values and
    is skipped.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    problems = []
    for index, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"axes {index} ({ax.get_title() or ax.get_label() or 'untitled'})"
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            tickless = len(axis.get_majorticklocs()) == 0 and ax.get_label() == "<colorbar>"
            if isinstance(axis.get_major_locator(), NullLocator) or tickless or not axis.get_visible():
                continue
            labels = _labelled_ticks(axis)
            if len(labels) < 2:
                problems.append(f"{name}: {which} axis labels {labels}")
            if axis.get_offset_text().get_text().strip():
                problems.append(f"{name}: {which} axis offset {axis.get_offset_text().get_text()!r}")
            overlapping = _overlapping_labels(axis, renderer)
            if overlapping:
                problems.append(f"{name}: {which} tick labels overlap: {overlapping}")
        title = ax.title if ax.get_title() else None
        if title is not None:
            box, frame = title.get_window_extent(renderer), ax.get_window_extent(renderer)
            if box.width > frame.width + 1 or box.x0 < fig.bbox.x0 - 1 or box.x1 > fig.bbox.x1 + 1:
                problems.append(f"{name}: title {ax.get_title()!r} is wider than its axes or leaves the figure")
    # Figure-level texts (suptitle, the stamp footer) must lie inside the figure, where savefig cuts.
    for text in fig.texts:
        box = text.get_window_extent(renderer)
        if text.get_text().strip() and (box.x0 < fig.bbox.x0 - 1 or box.x1 > fig.bbox.x1 + 1):
            problems.append(f"figure text {text.get_text()[:40]!r} leaves the figure")
    return problems
