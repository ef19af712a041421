"""``python -m nystrom bench --replot DIR``: every figure of a run redrawn from its saved JSON, without timing anything.

A figure's style (colours, scales, legends) can change after the run that measured it; the records cannot. Each
section saves what its figures read (the scaling section its :class:`~nystrom.experiments.bench.plan.Plan`), so
the PNGs of any saved run can be redrawn with the current code.
"""

from __future__ import annotations

import json
from pathlib import Path

from .accuracy import accuracy_figures
from .breakdown import breakdown_figure
from .e2e import e2e_figure
from .output import DPI
from .plan import Plan
from .scaling import scaling_figures
from .threads import threads_figure


def saved_plan(payload) -> Plan:
    """The :class:`Plan` a scaling payload saved, with JSON's lists and string keys turned back into its types."""
    fields = dict(payload)
    for key in ("seq_lens", "exact_max_n"):
        fields[key] = {int(k): tuple(v) if isinstance(v, list) else v for k, v in fields[key].items()}
    fields["capture_layers"] = {k: tuple(v) for k, v in fields["capture_layers"].items()}
    for key in ("landmarks", "slope_range", "thread_shape", "accuracy_landmarks", "dinov2_sizes", "e2e_sizes",
                "exact_methods"):
        fields[key] = tuple(fields[key])
    fields["breakdown"] = tuple(tuple(shape) for shape in fields["breakdown"])
    return Plan(**fields)


def section_figures(section, payload):
    """The figures ``{file name: Figure}`` of one section's saved payload."""
    records, stamp = payload.get("records"), payload["stamp"]
    if section == "scaling":
        return scaling_figures(records, saved_plan(payload["plan"]), payload["roofline"], stamp)
    if section == "breakdown":
        return {"breakdown": breakdown_figure(records, stamp)}
    if section == "accuracy":
        return accuracy_figures(records, stamp)
    if section == "e2e":
        return {"e2e": e2e_figure(records, stamp)} if records else {}
    if section == "threads":
        return {"threads": threads_figure(payload["summary"], payload["thread_counts"], stamp,
                                          tuple(payload["shape"]), payload["m"])}
    raise ValueError(f"unknown section {section!r}")


def replot(directory) -> list[Path]:
    """Redraw the figures of every section saved in ``directory`` (``<section>.json`` files) as PNGs beside them;
    returns the files written.

    A section that cannot be redrawn (not JSON, or not as this version saves it) leaves the others to be redrawn
    (a review: a run saved before the plan's ``thread_shape`` existed stopped at its scaling section); then a
    ``ValueError`` names every such section and what was redrawn.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no folder {directory}")
    written, problems, found = [], [], False
    for section in ("scaling", "breakdown", "threads", "accuracy", "e2e"):
        path = directory / f"{section}.json"
        if not path.exists():
            continue
        found = True
        try:
            written += redraw(path, section)
        except (OSError, ValueError) as error:
            problems.append(str(error))
    if problems:
        redrawn = ", ".join(p.name for p in written) or "none"
        raise ValueError(f"{'; '.join(problems)} (figures redrawn: {redrawn})")
    if not found:
        raise FileNotFoundError(f"no saved section (<section>.json) in {directory}")
    return written


def redraw(path, section) -> list[Path]:
    """Redraw one saved section's figures beside ``path``; returns the files written."""
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error})") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a saved section (a JSON object with 'stamp' and 'records'), it holds "
                         f"{json.dumps(payload)[:60]}")
    if "skipped" in payload:
        return []
    try:
        figures = section_figures(section, payload)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        # A hand-edited or truncated record fails deep inside the figure code otherwise.
        raise ValueError(f"{path} is not a saved {section} section as this version writes it "
                         f"({type(error).__name__}: {error})") from error
    written = []
    for name, fig in figures.items():
        fig.savefig(path.parent / f"{name}.png", dpi=DPI)
        written.append(path.parent / f"{name}.png")
    return written
