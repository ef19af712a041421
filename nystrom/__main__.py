"""Command line: ``python -m nystrom demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m nystrom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FNA on real DINOv2-S attention: error and time vs exact")
    demo.add_argument("--image", default="astronaut")
    demo.add_argument("--sizes", type=int, nargs="+", default=[518, 1036])
    demo.add_argument("--layer", type=int, default=9)
    demo.add_argument("--num-landmarks", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(image=args.image, sizes=tuple(args.sizes), layer=args.layer, num_landmarks=args.num_landmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
