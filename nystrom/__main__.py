"""Command line: ``python -m nystrom demo`` (the README's main job) and ``python -m nystrom eval``."""

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
    evaluate = sub.add_parser(
        "eval", help="FNA on the bundled DINOv2-S and MiniLM: per-layer error, feature cosine, downstream agreement",
        description="Writes eval_<model>.json, eval_<model>.md and PNGs into --out; see nystrom.torch.evaluate.")
    evaluate.add_argument("--model", nargs="+", choices=("dinov2", "minilm"), default=["dinov2", "minilm"])
    evaluate.add_argument("--layers", default=None,
                          help="FNA layers, e.g. 6-11 or 3,5 (default: the later half of each model)")
    evaluate.add_argument("--num-landmarks", type=int, nargs="+", default=[16, 32, 64, 128])
    evaluate.add_argument("--strategies", nargs="+", default=["norm", "fps", "uniform", "segment_means"],
                          help="names, or name:key=value,... such as norm:sink_ratio=8")
    evaluate.add_argument("--solvers", nargs="+", default=["newton_schulz"],
                          help="names, or name:key=value,... such as pinv:rtol=0 or newton_schulz:iters=12")
    evaluate.add_argument("--images", nargs="+", default=None, help="DINOv2: natural images (default all eight)")
    evaluate.add_argument("--crops", type=int, default=4, help="DINOv2: retrieval crops per image")
    evaluate.add_argument("--size", type=int, default=224, help="DINOv2: image side in pixels (multiple of 14)")
    evaluate.add_argument("--sentences", type=int, default=None,
                          help="MiniLM: the first N example sentences, N even (default all 60)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--threads", type=int, default=None,
                          help="torch CPU threads (default torch's); 1 is often faster on a busy machine")
    evaluate.add_argument("--out", default="results")
    evaluate.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(image=args.image, sizes=tuple(args.sizes), layer=args.layer, num_landmarks=args.num_landmarks)
    elif args.command == "eval":
        from .torch.evaluate import parse_layers, parse_spec, run_evaluation

        # Bad specs are usage errors, reported before any model loads.
        try:
            layers = parse_layers(args.layers)
            for spec in args.strategies:
                parse_spec(spec, "strategy")
            for spec in args.solvers:
                parse_spec(spec, "solver")
        except (TypeError, ValueError) as err:
            parser.error(str(err))
        run_evaluation(args.model, out=args.out, layers=layers, num_landmarks=args.num_landmarks,
                       strategies=args.strategies, solvers=args.solvers, images=args.images, crops=args.crops,
                       size=args.size, sentences=args.sentences, seed=args.seed, threads=args.threads,
                       progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
