"""When splitting the keys of the landmark product pays: the crossover behind ``nystrom.torch.attention.key_blocks``.

    .venv/bin/python docs/scripts/split_key_crossover.py

Times attention of ``m`` landmark queries over ``n`` keys, float32, one head, d = 64, on the CPU: PyTorch's
``scaled_dot_product_attention`` (one flash task per 32 queries) against ``split_key_sdpa`` with ``p`` key blocks,
at 1 thread and at all cores. Each figure is the fastest of 25 calls, the methods interleaved call by call so
that a change in the machine's load hits them alike. Run it with nothing else busy; it prints the load average.
"""

import os
import time

import torch
import torch.nn.functional as F

from nystrom.torch.attention import split_key_sdpa

CALLS = 25


def fastest(calls):
    """Fastest of ``CALLS`` interleaved timings of each function in ``calls``, in ms."""
    best = {name: float("inf") for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(CALLS):
        for name, fn in calls.items():
            begin = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - begin)
    return {name: 1e3 * t for name, t in best.items()}


def main():
    cores = len(os.sched_getaffinity(0))
    print(f"load average {os.getloadavg()}, {cores} cores")
    print("threads  m      n      SDPA ms  " + "  ".join(f"p={p} ms" for p in (2, 4, 8)))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            for m in (16, 32, 64, 128):
                for n in (2048, 4096, 8192, 16384, 65536):
                    q = torch.randn(1, 1, m, 64, generator=g)
                    k, v = (torch.randn(1, 1, n, 64, generator=g) for _ in range(2))
                    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125)}
                    for p in (2, 4, 8):
                        calls[p] = lambda p=p: split_key_sdpa(q, k, v, scale=0.125, blocks=p)
                    t = fastest(calls)
                    splits = "  ".join(f"{t[p]:7.3f}" for p in (2, 4, 8))
                    print(f"{threads:7d} {m:3d} {n:7,d} {t['sdpa']:9.3f}  {splits}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
