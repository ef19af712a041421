"""Put the tables and plots of a ``python -m nystrom bench`` run into ``docs/benchmarks.md``.

Each generated block of the page sits between ``<!-- bench:SECTION -->`` and ``<!-- /bench:SECTION -->``;
this replaces the block with ``RESULTS/SECTION.md`` and copies every PNG of ``RESULTS`` to
``docs/img/benchmarks/``. The prose around the blocks (what the numbers mean) is written by hand and
has to be re-read against the new tables.

Usage::

    .venv/bin/python docs/scripts/benchmark_tables.py [RESULTS]   # default results/cpu
"""

import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]


def splice(page: str, section: str, table: str) -> str:
    """``page`` with the block of ``section`` replaced by ``table``; raises if the block is not closed."""
    pattern = re.compile(rf"(<!-- bench:{section} -->\n).*?(<!-- /bench:{section} -->)", re.S)
    page, count = pattern.subn(lambda m: m.group(1) + "\n" + table.strip() + "\n\n" + m.group(2), page)
    if count == 0:
        raise SystemExit(f"docs/benchmarks.md opens <!-- bench:{section} --> but never closes it with "
                         f"<!-- /bench:{section} -->")
    return page


def main(results: Path) -> None:
    page_path = DOCS / "benchmarks.md"
    page = page_path.read_text()
    sections = sorted(set(re.findall(r"<!-- bench:(\w+) -->", page)))
    for section in sections:
        table = results / f"{section}.md"
        if table.exists():
            page = splice(page, section, table.read_text())
            print(f"{section}: {table}")
    page_path.write_text(page)
    for png in sorted(results.glob("*.png")):
        shutil.copy(png, DOCS / "img" / "benchmarks" / png.name)
        print(f"copied {png.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/cpu"))
