"""Time and peak memory of a call, and the device's roofline (GEMM FLOP rate, copy bandwidth).

Time
    One warm-up call, then calls until at least three have run and together they take ``budget_s``
    (at most ten); min and median are reported and the tables use the min, the least disturbed
    sample on a shared machine. A warm-up call longer than ``budget_s`` (exact SDPA at large
    :math:`n`) is the only call and its time the only sample. CPU: wall clock; CUDA: CUDA events
    around each call.
Memory
    Peak bytes allocated during the timed calls above what was live before them (the inputs, and what the warm-up
    keeps for good), or during the only call where the warm-up is the only one.
    CUDA: :func:`torch.cuda.max_memory_allocated`. CPU: the resident-set high-water mark (``VmHWM``),
    reset through ``/proc/self/clear_refs`` right before the calls, after ``malloc_trim`` has handed
    freed heap pages back to the kernel so that every new allocation must touch fresh pages (Linux
    only; ``None`` elsewhere). torch's CPU allocator does not cache, so this sees every tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass

import torch


def synchronize(device):
    """Wait for the device's queued kernels (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def thread_limit(count):
    """torch and the process's BLAS libraries limited to ``count`` threads, torch's count restored on exit.

    Farthest-point sampling runs its loop in numpy on CPU; numpy's BLAS (OpenBLAS) has its own thread pool, which
    would otherwise use every core while torch uses ``count``.
    """
    import threadpoolctl

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpoolctl.threadpool_limits(count):
            yield
    finally:
        torch.set_num_threads(before)


def timed_call(fn, device):
    """Seconds one call of ``fn`` takes: wall clock on CPU, CUDA events around the call's kernels on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Kernels still queued (a warm-up's) would delay the start event and hide the host time of the call's own
        # launches, which a CUDA graph saves: its first sample read fast (a review).
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def best_time(fn, device, repeats=3):
    """The fastest of ``repeats`` :func:`timed_call` times of ``fn()``, in seconds."""
    return min(timed_call(fn, device) for _ in range(repeats))


def _proc_status_kib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the peak allocated above the start.

    See the module docstring for the method on each device; ``bytes`` is ``None`` where it cannot be
    measured (CPU off Linux).
    """

    def __init__(self, device):
        self.device = device
        self.bytes = None
        self._base = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # 5 resets the peak RSS (VmHWM) to the current RSS
            self._base = _proc_status_kib("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.bytes = (_proc_status_kib("VmHWM") - self._base) * 1024
        return False


@dataclass(frozen=True)
class Measurement:
    """Call times (seconds) and the peak memory above the inputs (bytes, or None)."""

    times: tuple
    peak_bytes: int | None

    @property
    def min(self):
        """Fastest call, in seconds."""
        return min(self.times)

    @property
    def median(self):
        """Median call, in seconds."""
        return statistics.median(self.times)


def measure(fn, device, *, min_calls=3, max_calls=10, budget_s=1.0) -> Measurement:
    """Time ``fn()`` after one warm-up call and record its peak memory (see the module docstring).

    The peak is that of the timed calls: what the warm-up keeps for good (lazily built kernels, thread pools, a
    first call's caches) is live before them, as the inputs are. A warm-up call that already takes ``budget_s`` or
    longer is the only one, and its peak the one recorded: at that length one-time costs no longer show, and it
    keeps exact attention at large ``n`` to a single call.
    """
    with PeakMemory(device) as warm_up:
        first = timed_call(fn, device)
    if first >= budget_s:
        return Measurement((first,), warm_up.bytes)
    times = []
    with PeakMemory(device) as peak:
        while len(times) < max_calls and (len(times) < min_calls or sum(times) < budget_s):
            times.append(timed_call(fn, device))
    return Measurement(tuple(times), peak.bytes)


def gemm_flop_rate(device, dtype, size, budget_s=2.0):
    """FLOP/s of a ``size x size`` matrix product, the roofline every achieved rate is compared with."""
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    B = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    return 2 * size**3 / measure(lambda: A @ B, device, budget_s=budget_s).min


def copy_bandwidth(device, nbytes, budget_s=1.0):
    """Bytes/s of a device-memory copy (read plus write), the floor for memory-bound work."""
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / measure(lambda: y.copy_(x), device, budget_s=budget_s).min
