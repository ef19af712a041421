"""What the experiments show while they run and write when done: progress bars and markdown tables."""

from __future__ import annotations

import sys


def progress_bar(total, desc, *, enabled=True, leave=True):
    """A tqdm bar on stderr over ``total`` steps; ``enabled=False`` shows nothing, ``leave=False`` clears it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr)


def markdown_table(header, rows):
    """A GitHub-flavoured markdown table; ``None`` cells print as an em dash."""
    def cell(x):
        return "—" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
