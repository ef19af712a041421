"""The axis helpers of ``nystrom.experiments.plotting`` and the readability check the figure tests rely on."""

import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from plot_checks import unreadable_axes  # noqa: E402

from nystrom.experiments.plotting import footer, swept_axis, value_axis  # noqa: E402


def _figure(ys, xs=(8, 16)):
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, ys, "-o")
    return fig, ax


def test_the_check_sees_what_matplotlib_leaves_unreadable():
    # A log axis inside one decade labels no tick; values a hair below 1 are labelled by an offset.
    fig, ax = _figure([0.12, 0.35])
    ax.set_yscale("log")
    ax.minorticks_off()
    assert any("y axis labels" in p for p in unreadable_axes(fig))
    fig, ax = _figure([0.99991, 0.99998])
    assert any("offset" in p for p in unreadable_axes(fig))
    fig, ax = _figure([1, 2])
    ax.set_title("a title far too long for an axes this narrow, cut off at its edge")
    assert any("title" in p for p in unreadable_axes(fig))
    # Twelve bar labels on an axes about an inch high print over each other; at three inches they do not.
    for height, overlap in ((1.6, True), (4.0, False)):
        fig = Figure(figsize=(4.0, height), layout="constrained")
        fig.subplots().barh([f"strategy m={m}" for m in range(12)], range(12))
        assert any("tick labels overlap" in p for p in unreadable_axes(fig)) == overlap


@pytest.mark.parametrize("ys", [[0.12, 0.35], [0.15, 1.6], [1e-5, 0.4], [1e-7, 1e4], [0.99991, 0.99998], [5, 5]])
def test_value_axis_always_labels_two_ticks(ys):
    fig, ax = _figure(ys)
    value_axis(ax, "y")
    swept_axis(ax, [8, 16])
    assert unreadable_axes(fig) == []
    # A log scale only where the data span a decade.
    assert ax.get_yscale() == ("log" if max(ys) >= 10 * min(ys) else "linear")


def test_an_error_of_zero_keeps_the_log_axis_of_the_others():
    # An exact answer's error of 0 among errors from 1e-3 to 0.5: the axis stays log (a linear one pressed every
    # error but the largest onto 0), its lower edge, labelled 0, half a decade under the smallest positive error, where
    # the 0 is drawn.
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([8, 16, 32, 64], [0.5, 0.05, 1e-3, 0.0], "-o")
    ax.axhline(0.2, color="k")
    value_axis(ax, "y")
    swept_axis(ax, [8, 16, 32, 64])
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(1e-3 / 10**0.5)
    assert ax.get_lines()[0].get_ydata()[-1] == pytest.approx(1e-3 / 10**0.5)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_visible()]
    assert labels[0] == "0" and "0.001" in labels and unreadable_axes(fig) == []
    # Within a decade the axis is linear, and the 0 on it.
    fig, ax = _figure([0.0, 0.3])
    value_axis(ax, "y")
    assert ax.get_yscale() == "linear" and unreadable_axes(fig) == []
    # Bars alone, one of height 0, draw no line to read: linear, as before (reading the lines raised on no line).
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.bar([0, 1, 2], [0.0, 0.5, 20.0])
    value_axis(ax, "y")
    assert ax.get_yscale() == "linear"


def test_swept_axis_labels_every_value_and_gives_a_single_one_neighbours():
    fig, ax = _figure([0.1, 0.2], xs=(8, 16))
    swept_axis(ax, [8, 16])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"]
    fig, ax = _figure([0.1], xs=(4096,))
    swept_axis(ax, [4096])
    assert unreadable_axes(fig) == [] and [t.get_text() for t in ax.get_xticklabels()] == ["2048", "4k", "8k"]
    with pytest.raises(ValueError, match="positive"):
        swept_axis(ax, [0, 8])


def test_a_long_footer_is_broken_into_lines_that_fit():
    fig, ax = _figure([0.1, 0.2])
    value_axis(ax, "y")
    swept_axis(ax, [8, 16])
    footer(fig, " | ".join(["SMOKE RUN (--quick), not a benchmark", "AMD EPYC (family 25, model 1), 2 cores"] * 3))
    assert unreadable_axes(fig) == [] and fig.texts[-1].get_text().count("\n") >= 1
    fig, _ = _figure([0.1, 0.2])
    fig.supxlabel("a stamp far too long for a figure this narrow " * 4, fontsize=6)
    assert any("leaves the figure" in p for p in unreadable_axes(fig))


def test_strategy_specs_get_colours_of_their_own():
    # A review: eval drew `norm:sink_ratio=8` and `fps:use_queries=true` in black, the exact model's line colour.
    from matplotlib.colors import to_rgba

    from nystrom.experiments.plotting import STRATEGY_COLORS, strategy_colors

    labels = ["norm", "norm:sink_ratio=8", "fps:use_queries=true", "uniform", "fps"]
    colors = strategy_colors(labels)
    assert colors["norm"] == STRATEGY_COLORS["norm"] and colors["fps"] == STRATEGY_COLORS["fps"]
    rgba = [to_rgba(colors[label]) for label in labels]
    assert len(set(rgba)) == len(labels) and to_rgba("black") not in rgba


@pytest.mark.parametrize("xs", [(7.3e-4, 4.8e-3), (1.77e-4, 3.36e-4), (4.47e-4, 2.09e-3)])
def test_a_linear_value_axis_of_small_numbers_keeps_its_labels_apart(xs):
    # Times under a decade apart (the accuracy-against-time figure's panels, 4.8 inches wide): matplotlib's default
    # ticks labelled 0.00018, 0.00020, ... side by side, overlapping, in 26 of 400 random ranges (these three among
    # them); at most five ticks leave none.
    fig = Figure(figsize=(4.8, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(xs, (0.1, 0.2), "-o")
    ax.set(xlabel="fastest call (s)", ylabel="relative error")
    value_axis(ax, "x")
    value_axis(ax, "y")
    assert ax.get_xscale() == "linear" and unreadable_axes(fig) == []
