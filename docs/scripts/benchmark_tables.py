"""Put the tables and plots of a ``python -m nystrom bench`` run into ``docs/benchmarks.md``.

Each generated block of the page sits between ``<!-- bench:SECTION -->`` and ``<!-- /bench:SECTION -->``;
this replaces the block with ``RESULTS/SECTION.md`` and copies every PNG of ``RESULTS`` to
``docs/img/benchmarks/``. The prose around the blocks (what the numbers mean) is written by hand and
has to be re-read against the new tables.

Usage::

    .venv/bin/python docs/scripts/benchmark_tables.py [RESULTS]   # default results/cpu
    .venv/bin/python docs/scripts/benchmark_tables.py --prefix gpu_ results/gpu/bfloat16/cuda

With ``--prefix P`` the tables go to the blocks ``<!-- bench:PSECTION -->`` and the plots to ``PNAME.png``, so a
GPU run (``benchmarks/gpu.py``) fills its own blocks and never overwrites the CPU suite's tables or plots; the
page needs those blocks first (a section without its block is left out, and named).
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


def main(results: Path, prefix: str = "") -> None:
    page_path = DOCS / "benchmarks.md"
    page = page_path.read_text()
    blocks = set(re.findall(r"<!-- bench:(\w+) -->", page))
    for table in sorted(results.glob("*.md")):
        block = prefix + table.stem
        if block in blocks:
            page = splice(page, block, table.read_text())
            print(f"{block}: {table}")
        else:
            print(f"{table.name}: no <!-- bench:{block} --> block in docs/benchmarks.md, left out")
    page_path.write_text(page)
    for png in sorted(results.glob("*.png")):
        shutil.copy(png, DOCS / "img" / "benchmarks" / (prefix + png.name))
        print(f"copied {png.name} as {prefix + png.name}")


if __name__ == "__main__":
    args = sys.argv[1:]
    prefix = ""
    if args[:1] == ["--prefix"]:
        prefix, args = args[1], args[2:]
    main(Path(args[0]) if args else Path("results/cpu"), prefix)
