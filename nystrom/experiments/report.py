"""What the experiments show while they run and write when done: progress bars, markdown tables, ratios."""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path


def positive(kind):
    """An argparse ``type``: ``kind(text)`` where that is finite and above 0, else an argparse error naming the value
    (a review: ``--tols 0`` and ``--samples 0`` were tracebacks from deep inside the reports)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'positive' if kind is int else 'positive and finite'}")
        return value

    convert.__name__ = f"positive {kind.__name__}"  # argparse names the type by it in its messages
    return convert


def output_folder(path):
    """Create the folder ``path`` (and its parents) and check that a file can be written in it, before a run computes
    anything: an existing read-only folder passes ``mkdir`` and failed only at the first write, after the run.

    Raises
    ------
    OSError
        The folder cannot be created or written to, or ``path`` is empty (which ``Path`` reads as the current
        folder: a run's files would land wherever it was started).
    """
    if not str(path).strip():
        raise OSError("an empty path names no folder")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def progress_bar(total, desc, *, enabled=True, leave=True):
    """A tqdm bar on stderr over ``total`` steps; ``enabled=False`` shows nothing, ``leave=False`` clears it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr)


def without_library_progress_bars():
    """Silence the progress bars the model libraries draw themselves for the rest of the process (transformers'
    "Loading weights" bar, and huggingface_hub's through it): a CLI's ``--no-progress`` promises no tqdm bar."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def markdown_table(header, rows):
    """A GitHub-flavoured markdown table; ``None`` cells print as an em dash."""
    def cell(x):
        return "—" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_ratio(ratio):
    """A ratio such as a speed-up for a table cell, to two significant figures at least: ``0.44×``, ``2.6×``,
    ``12×``, ``331×`` (``None`` stays ``None``)."""
    if ratio is None:
        return None
    if not (math.isfinite(ratio) and ratio > 0):
        return f"{ratio}×"
    rounded = float(f"{ratio:.2g}")
    if rounded >= 10:
        return f"{ratio:,.0f}×"
    return f"{rounded:.{max(0, 1 - math.floor(math.log10(rounded)))}f}×"


def check_distinct(flag, values):
    """``ValueError`` naming ``flag`` where ``values`` repeat one (a review: ``--tols 0.1 0.1`` ran each case twice and
    counted both in one table row)."""
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{flag} {' '.join(map(str, values))}: {', '.join(map(str, repeated))} given more than once")


def layers_per_model(flag, layers, counts):
    """``{model: sorted layers, or None for all}`` from a ``--layers`` list (``None``: every model all of its layers):
    each model in ``counts`` (its number of layers) takes those it has, a negative one counted from its own last.
    ``ValueError`` naming ``flag`` where a model has none of them."""
    per_model = {}
    for model, count in counts.items():
        per_model[model] = None if layers is None else sorted({layer % count for layer in layers
                                                               if -count <= layer < count})
        if per_model[model] == []:
            raise ValueError(f"{flag} {' '.join(map(str, layers))}: {model} has layers 0 to {count - 1}; pass "
                             f"--models to leave it out")
    return per_model


def with_flags(parser, message):
    """``message`` (a check's, which names Python parameters) with each parameter of an option of ``parser`` that it
    opens or that it says "must" of named by the option's flag: ``num_landmarks must be`` becomes
    ``--num-landmarks must be``, ``num_landmarks=64`` ``--num-landmarks 64`` (a review: a command line's user read
    names it has no option for)."""
    for action in parser._actions:
        flag = next((option for option in action.option_strings if option.startswith("--")), None)
        if flag is not None:
            message = re.sub(rf"(^|(?<=[\s(]))({re.escape(action.dest)})(?= must\b)|^{re.escape(action.dest)}\b",
                             flag, message)
            message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=", f"{flag} ", message)
    return message
