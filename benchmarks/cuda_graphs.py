"""How much of a GPU call is launch overhead: ``approximate`` eager against the same call replayed as a CUDA graph.

::

    python benchmarks/cuda_graphs.py                  # on a CUDA machine: a table on stdout (--out DIR: files)
    python benchmarks/cuda_graphs.py --device cpu     # dry run: the eager calls only, at a small size

On an H200 every strategy's time was flat in n up to n = 65,536 (``benchmarks/gpu.py``): eager PyTorch pays about
10 µs of host time per operator, and a call issues about 120 (``uniform``) to 760 (``norm``, m = 64) operators. A
CUDA graph replays the recorded kernels with no Python and no per-operator launch, which is what a user gets from
``torch.cuda.graph`` or ``torch.cuda.make_graphed_callables`` (or ``torch.compile(mode="reduce-overhead")``); the
difference between the two columns is the host's overhead, and the graph's time is what the kernels cost.

Capture needs a call that never waits for the device: ``check_values=False``, and a deterministic strategy. The
seeded strategies (``uniform``, ``rpcholesky``) draw on the host, which a replay would not do again, and refuse a
capture (``nystrom/torch/transfer.py``); they are left out. Each graph's output is checked against the
eager call's (the same kernels on the same inputs: equal up to the order of floating-point reductions); a failed
capture or a replay that disagrees makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.bench.output import format_ms
from nystrom.experiments.bench.scaling import given_landmarks_call
from nystrom.experiments.stamp import caption, make_stamp
from nystrom.experiments.timing import best_time

STRATEGIES = ("norm", "kmeans", "fps", "segment_means")


def best(fn, device, calls):
    """Fastest of ``calls`` timed calls of ``fn`` (:func:`~nystrom.experiments.timing.best_time`) after one warm-up
    call, in seconds."""
    fn()
    return best_time(fn, device, repeats=calls)


def graphed(fn):
    """``fn`` recorded into a CUDA graph after three warm-up calls on a side stream (as ``torch.cuda.graphs``
    asks), and its output tensor, which every replay overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def measure(shape, m, dtype, device, calls):
    """One row per method at ``shape``: exact SDPA, then each strategy and the given-landmarks ceiling, eager and
    replayed."""
    gen = torch.Generator(device=device).manual_seed(0)
    Q, K, V = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    exact = best(lambda: F.scaled_dot_product_attention(Q, K, V), device, calls)
    rows = [{"shape": list(shape), "method": "exact SDPA", "eager_s": exact}]
    print(line(rows[0]), flush=True)
    calls_by_method = {strategy: partial(nystrom.approximate, Q, K, V, strategy=strategy, num_landmarks=m,
                                         check_values=False) for strategy in STRATEGIES}
    given = given_landmarks_call(Q, K, V, m)  # the ceiling: landmarks chosen beforehand
    calls_by_method["given"] = lambda: given()[0]  # fna_attention returns (out, solve)
    for method, call in calls_by_method.items():
        row = {"shape": list(shape), "method": method, "m": m, "eager_s": best(call, device, calls)}
        if device.type == "cuda":
            try:
                graph, out = graphed(call)
            except RuntimeError as err:  # an operation that capture refuses (a host read, a pageable copy)
                # The error raised on leaving the capture hides its cause, the one raised inside.
                cause = err.__context__ or err
                row["graph_error"] = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
                print(f"{method}: capture failed: {row['graph_error']}", file=sys.stderr)
            else:
                row["graph_s"] = best(graph.replay, device, calls)
                eager = call().float()
                graph.replay()
                row["graph_vs_eager"] = float((out.float() - eager).norm() / eager.norm())
        row["speedup_eager"] = exact / row["eager_s"]
        if "graph_s" in row:
            row["speedup_graph"] = exact / row["graph_s"]
        rows.append(row)
        print(line(row), flush=True)
    return rows


HEADER = ("| shape | method | eager (ms) | CUDA graph (ms) | speed-up over SDPA, eager | speed-up, graph | "
          "graph vs eager (rel.) |\n|---|---|---|---|---|---|---|")


def line(row):
    """``row`` as a line of the Markdown table under :data:`HEADER`; ``—`` where it has no such value (SDPA is not
    replayed)."""
    def cell(key, fmt):
        if key == "graph_s" and "graph_error" in row:
            return "**capture failed**"
        return fmt(row[key]) if key in row else "—"

    def times(ratio):
        return f"{ratio:.2g}×"

    return (f"| {tuple(row['shape'])} | {row['method']} | {format_ms(row['eager_s'])} | {cell('graph_s', format_ms)} | "
            f"{cell('speedup_eager', times)} | {cell('speedup_graph', times)} | "
            f"{cell('graph_vs_eager', '{:.1e}'.format)} |")


def failures(rows):
    """What makes the run fail: a capture refused, or a replay whose output is not the eager call's (the same
    kernels on the same inputs: only the order of floating-point reductions may differ)."""
    return ([f"{r['method']} at {tuple(r['shape'])}: capture failed ({r['graph_error']})" for r in rows
             if "graph_error" in r]
            + [f"{r['method']} at {tuple(r['shape'])}: replay differs from the eager call by {r['graph_vs_eager']:.1e}"
               for r in rows if r.get("graph_vs_eager", 0.0) > REPLAY_TOLERANCE])


# Relative Frobenius difference allowed between a replay and the eager call: reduction order at bfloat16 rounding.
REPLAY_TOLERANCE = 1e-2


def main(argv=None):
    """Measure every ``--landmarks`` value; exit status 1 if a capture failed or a replay disagreed."""
    parser = argparse.ArgumentParser(prog="python benchmarks/cuda_graphs.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--landmarks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--calls", type=int, default=10, help="timed calls per method (the fastest is kept)")
    parser.add_argument("--out", type=Path, help="also write cuda_graphs_m<M>.json (the rows) and .md (the table) "
                        "into this folder, one pair per m")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "cuda_graphs.py: no CUDA device; --device cpu runs the eager calls as a dry run\n")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = [(1, 12, 65536, 64), (1, 1, 262144, 64)] if device.type == "cuda" else [(1, 2, 512, 16)]
    problems = []
    for m in args.landmarks:
        stamp = make_stamp(device, dtype, smoke_run=device.type == "cpu")
        title = caption(stamp) + f"_m = {m}, the fastest of {args.calls} calls after one warm-up._\n"
        print(title + "\n" + HEADER, flush=True)
        rows = [row for shape in shapes for row in measure(shape, m, dtype, device, args.calls)]
        problems += failures(rows)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"cuda_graphs_m{m}.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=1)
                                                            + "\n")
            (args.out / f"cuda_graphs_m{m}.md").write_text("\n".join([title, HEADER, *map(line, rows)]) + "\n")
    for problem in problems:
        print(f"cuda_graphs.py: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
