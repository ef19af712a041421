"""Command line: ``python -m nystrom demo`` (the README's main job), ``python -m nystrom eval`` and
``python -m nystrom bench``.

Each command's arguments belong to its module in :mod:`nystrom.experiments`, imported only when the command runs;
``python -m nystrom COMMAND --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Command to (module whose ``main(argv)`` runs it, one-line help).
COMMANDS = {
    "demo": ("nystrom.experiments.demo", "FNA on real DINOv2-S attention: error and time vs exact"),
    "eval": ("nystrom.experiments.evaluate.cli",
             "FNA on the bundled DINOv2-S and MiniLM: per-layer error, feature cosine, downstream agreement"),
    "bench": ("nystrom.experiments.bench.cli", "the benchmark suite: regenerates every table and plot"),
}


def main(argv=None):
    """Run one command with the rest of ``argv``; returns the process exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The module docstring without its reStructuredText literals' backquotes.
    parser = argparse.ArgumentParser(prog="python -m nystrom", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # The command's own parser reads the rest, --help included.
        sub.add_parser(name, help=help_text, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        # argparse would read the option's value as the command ("invalid choice: '2'" for --threads 2 eval).
        parser.error(f"{argv[0]} comes before the command; options go after it: python -m nystrom "
                     f"{{{','.join(COMMANDS)}}} {argv[0]} ...")
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
