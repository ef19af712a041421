"""The command line of the evaluation: ``python -m nystrom eval [--model ...] [--num-landmarks ...] ...``."""

from __future__ import annotations

import argparse

from ..report import output_folder, with_flags, without_library_progress_bars
from .runner import MODELS, check_evaluation, run_evaluation
from .specs import DEFAULT_LANDMARKS, DEFAULT_SOLVERS, DEFAULT_STRATEGIES, parse_layers

#: The options that belong to one model.
MODEL_OPTIONS = {"images": "dinov2", "crops": "dinov2", "size": "dinov2", "sentences": "minilm"}


def build_parser():
    """The ``python -m nystrom eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m nystrom eval",
        description="FNA on the bundled DINOv2-S and MiniLM: per-layer error, feature cosine, downstream agreement. "
                    "Writes eval_<model>.json, eval_<model>.md and PNGs into --out; see nystrom.experiments.evaluate.")
    parser.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models to evaluate (default both)")
    parser.add_argument("--layers", default=None,
                        help="FNA layers, e.g. 6-11, 3,5, -1 or --layers=-1,3 (negative: from the last layer; a list "
                             "that starts with a negative one may need '=', or argparse reads it as an option; "
                             "DINOv2-S has 12 layers, MiniLM 6: pass --model with layers past 5; default: each model's "
                             "later half)")
    parser.add_argument("--num-landmarks", type=int, nargs="+", default=list(DEFAULT_LANDMARKS),
                        help=f"landmark counts m to sweep (default {' '.join(map(str, DEFAULT_LANDMARKS))})")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help="names, or name:key=value,... such as norm:sink_ratio=8")
    parser.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS),
                        help="names, or name:key=value,... such as pinv:rtol=0 or newton_schulz:iters=12")
    parser.add_argument("--images", nargs="+", default=None, help="DINOv2: natural images (default all eight)")
    parser.add_argument("--crops", type=int, default=None, help="DINOv2: retrieval crops per image (default 4)")
    parser.add_argument("--size", type=int, default=None,
                        help="DINOv2: image side in pixels, a multiple of 14 (default 224)")
    parser.add_argument("--sentences", type=int, default=None,
                        help="MiniLM: the first N example sentences, N even (default all 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random strategies and crops (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); 1 is often faster on a busy machine")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv=None):
    """Parse ``argv``, evaluate and write the files; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only the model options given, so that the evaluation's own defaults apply to the others; one given for a model
    # that is not evaluated would be dropped without a word.
    given = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    for name, model in MODEL_OPTIONS.items():
        if name in given and model not in args.model:
            parser.error(f"--{name} is an option of --model {model}, which this run does not evaluate")
    # Bad options are usage errors, reported before any model loads or any file is written.
    try:
        layers = parse_layers(args.layers)
        check_evaluation(args.model, layers=layers, num_landmarks=args.num_landmarks, strategies=args.strategies,
                         solvers=args.solvers, seed=args.seed, threads=args.threads, **given)
    except (TypeError, ValueError) as err:
        parser.error(with_flags(parser, str(err)))
    try:
        output_folder(args.out)
    except OSError as err:
        parser.error(f"--out {args.out}: cannot create or write to the output folder ({err.strerror or err})")
    if args.no_progress:
        without_library_progress_bars()
    run_evaluation(args.model, out=args.out, layers=layers, num_landmarks=args.num_landmarks,
                   strategies=args.strategies, solvers=args.solvers, seed=args.seed, threads=args.threads,
                   progress=not args.no_progress, **given)
    return 0
