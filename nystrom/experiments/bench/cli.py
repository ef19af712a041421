"""The command line of the benchmark suite: ``python -m nystrom bench [--only ...] [--quick] ...``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from ..report import output_folder, without_library_progress_bars
from ..stamp import busy_warning, device_name
from ..timing import thread_limit
from .accuracy import run_accuracy
from .breakdown import run_breakdown
from .e2e import run_e2e
from .plan import SECTIONS, Context, plan_for
from .replot import replot
from .scaling import run_scaling
from .threads import run_threads

RUNNERS = {"scaling": run_scaling, "breakdown": run_breakdown, "threads": run_threads, "accuracy": run_accuracy,
           "e2e": run_e2e}
#: The dtype of a run without ``--dtype``, per device type.
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def _parse_sections(text):
    # In the order given, each once: a repeated section would run (and be timed) twice.
    sections = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not sections:
        raise argparse.ArgumentTypeError(f"no section named; choose from {', '.join(SECTIONS)}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return sections


def build_parser():
    """The ``python -m nystrom bench`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m nystrom bench",
                                     description="The benchmark suite: regenerates every table and plot.")
    parser.add_argument("--only", type=_parse_sections, default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when present, else CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    # A string, checked below: Path("") is the current folder (a review: --out '' wrote into the repository).
    parser.add_argument("--out", default="results",
                        help="results go to OUT/<device>/, or OUT/<device>-<dtype>/ for a --dtype other than the "
                             "device's default (default results/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about half a minute")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for numpy's BLAS (default: their own choice, one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--replot", type=Path, metavar="DIR",
                        help="time nothing: redraw the figures of the run saved in DIR (e.g. results/cpu) from its "
                             "JSON")
    return parser


def results_folder(device_type, dtype=None):
    """The folder of a run under ``--out``: the device type (``"cpu"``, ``"cuda"``) for its default dtype, and the
    type and the dtype (``cpu-bfloat16``) for another one (a review: a ``--dtype`` run overwrote the default one's
    files)."""
    return device_type if dtype in (None, DEFAULT_DTYPE[device_type]) else f"{device_type}-{dtype}"


def usage_error(parser, message):
    """Report a bad option as argparse does (the usage line, then ``prog: error: message`` on stderr), for values only
    the run can judge; returns the exit status, 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    """Run the selected sections; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot is not None:
        # What times a run means nothing to a redraw: refused, not ignored (a review: --replot with --only scaling
        # redrew every section).
        defaults = vars(parser.parse_args([]))
        timing = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
                  if name not in ("replot", "no_progress") and value != defaults[name]]
        if timing:
            return usage_error(parser, f"--replot redraws every figure of the saved run and times nothing; "
                                       f"{', '.join(timing)} do not apply to it")
        try:
            written = replot(args.replot)
        except (OSError, KeyError, ValueError) as error:
            return usage_error(parser, f"--replot {args.replot}: {error}")
        print(f"nystrom bench: redrew {len(written)} figures in {args.replot}", file=sys.stderr)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error(parser, "--device cuda asked for, but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}); run without --device or with --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = getattr(torch, args.dtype or DEFAULT_DTYPE[device.type])
    if not args.out.strip():
        return usage_error(parser, "--out: an empty path names no folder")
    if args.no_progress:
        without_library_progress_bars()
    ctx = Context(device=device, dtype=dtype, plan=plan_for(device, args.quick),
                  out=Path(args.out) / results_folder(device.type, args.dtype), progress=not args.no_progress)
    if args.threads is not None and args.threads < 1:
        return usage_error(parser, f"--threads must be at least 1, got {args.threads}")
    try:
        output_folder(ctx.out)
    except OSError as error:
        return usage_error(parser, f"--out {args.out}: cannot create or write to the output folder {ctx.out} "
                                   f"({error.strerror or error})")
    with contextlib.nullcontext() if args.threads is None else thread_limit(args.threads):
        print(f"nystrom bench: {', '.join(args.only)} on {device_name(device)} ({str(dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads) -> {ctx.out}", file=sys.stderr)
        if args.quick:
            print("nystrom bench: --quick is a smoke run at tiny sizes; its numbers are not benchmarks",
                  file=sys.stderr)
        warning = busy_warning(torch.get_num_threads()) if device.type == "cpu" else None
        if warning:
            print(f"nystrom bench: warning: {warning}", file=sys.stderr)
        for section in args.only:
            begin = time.perf_counter()
            payload = RUNNERS[section](ctx)
            print(f"  {section}: {time.perf_counter() - begin:.0f} s", file=sys.stderr)
            # The load while the section ran (its stamp is taken at the end), not only before it.
            warning = (payload.get("stamp") or {}).get("load_warning")
            if warning:
                print(f"  {section}: warning: {warning}", file=sys.stderr)
    return 0
