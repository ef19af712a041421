r"""The benchmark suite: ``python -m nystrom.bench`` (``./run.sh bench``) regenerates every table and plot.

Sections (all by default, or a subset with ``--only``):

``scaling``
    Time and peak memory of :func:`nystrom.approximate` (every strategy, :math:`m \in \{32, 64, 128, 256\}`)
    and of exact :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA) against :math:`n`, for
    inputs of shape ``(1, 1, n, 64)`` and ``(1, 12, n, 64)``; the fitted slope of :math:`\log t` against
    :math:`\log n`; the achieved FLOP rate as a fraction of a large GEMM's, timed in the same run
    (roofline); and the issue's speed targets, met or missed.
``breakdown``
    Where the time of one call goes: input validation, landmark selection, the two attention products
    (:math:`m` landmark queries over :math:`n` keys, :math:`n` queries over :math:`m` landmark keys) and
    the :math:`m \times m` pseudo-inverse.
``accuracy``
    Relative output error :math:`\lVert \hat O - O\rVert_F / \lVert O\rVert_F` against :math:`m` and
    against time, per strategy and solver, on attention inputs captured from DINOv2-S (224 and 518 px)
    and all-MiniLM-L6-v2, and on synthetic inputs with an attention sink; the reference :math:`O` is
    exact attention in float64.
``e2e``
    Latency, peak memory and feature agreement of the DINOv2-S forward pass at 224 / 518 / 1036 px,
    exact against FNA on the later half of the layers.

Every section writes ``<out>/<device>/<section>.json`` (the records and a stamp: device, dtype, library
versions, date, git commit, load average), ``<section>.md`` (its tables) and PNG plots carrying the same
stamp. ``--device cuda`` (the default when CUDA is present) runs the same suite on the GPU in bfloat16
(``--dtype float16`` for half) up to :math:`n = 262{,}144`.

Measurement
-----------
Time
    One warm-up call, then calls until at least three have run and together they take ``budget_s``
    (at most ten); min and median are reported and the tables use the min, the least disturbed
    sample on a shared machine. A warm-up call longer than ``budget_s`` (exact SDPA at large
    :math:`n`) is the only call and its time the only sample. CPU: wall clock; CUDA: CUDA events
    around each call.
Memory
    Peak bytes allocated during these calls above what was live before them (inputs excluded).
    CUDA: :func:`torch.cuda.max_memory_allocated`. CPU: the resident-set high-water mark (``VmHWM``),
    reset through ``/proc/self/clear_refs`` right before the calls, after ``malloc_trim`` has handed
    freed heap pages back to the kernel so that every new allocation must touch fresh pages (Linux
    only; ``None`` elsewhere). torch's CPU allocator does not cache, so this sees every tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .approximate import approximate
from .linalg.exact import exact_attention
from .linalg.flops import exact_attention_flops, nystrom_attention_flops
from .linalg.landmarks import STRATEGIES, get_strategy
from .linalg.solvers import SOLVERS, NewtonSchulz, get_solver
from .linalg.validation import check_attention_inputs
from .torch.attention import fna_attention

SECTIONS = ("scaling", "breakdown", "accuracy", "e2e")
DEFAULT_STRATEGY = "norm"
DEFAULT_SOLVER = "newton_schulz"
# Scaling "method": fna_attention on landmarks chosen before the clock starts, i.e. the two attention
# products and the m x m solve alone. No selection rule can be faster, so it is the ceiling of every
# speed-up and FLOP-rate target.
GIVEN = "given"
# What the scaling section times besides exact SDPA.
METHODS = (*STRATEGIES, GIVEN)
# The CPU targets (float32, (1, 1, n, 64), m = 64, default strategy): speed-up over SDPA at each n, FLOP
# rate as a fraction of the GEMM's at n = 65,536, and the log-log slope. benchmarks/ checks the same.
CPU_SPEEDUP_TARGETS = ((16384, 100), (65536, 300))
CPU_GEMM_FRACTION_TARGET = 0.70
CPU_SLOPE_TARGET = 1.10


# ----------------------------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The sizes one run sweeps; :func:`plan_for` gives the CPU, CUDA and ``--quick`` plans.

    Attributes
    ----------
    seq_lens : dict of int to tuple of int
        Heads ``H`` of the ``(1, H, n, d)`` scaling inputs, to the sequence lengths ``n`` swept.
    exact_max_n : dict of int to int
        Largest ``n`` at which exact SDPA is timed, per ``H``.
    landmarks : tuple of int
        :math:`m` for the scaling sweep and the breakdown.
    head_dim : int
    breakdown : tuple of (int, int)
        ``(H, n)`` shapes of the breakdown.
    slope_range : (int, int)
        ``n`` range of the fitted log-log slope.
    accuracy_landmarks : tuple of int
    dinov2_sizes : tuple of int
        Image sides (px) at which DINOv2-S attention is captured.
    minilm_tokens : int
        Length of the MiniLM text input (the example sentences joined, truncated).
    synthetic_n : int
        Length of the synthetic sink input.
    capture_layers : dict of str to tuple of int
        Layers captured per model.
    e2e_sizes : tuple of int
    e2e_landmarks : int
    gemm_size : int
        Side of the square GEMM whose FLOP rate is the roofline.
    copy_bytes : int
        Size of the buffer whose copy measures memory bandwidth.
    budget_s : float
        Seconds of timed calls per measurement (see :func:`measure`).
    """

    seq_lens: dict
    exact_max_n: dict
    landmarks: tuple
    head_dim: int
    breakdown: tuple
    slope_range: tuple
    accuracy_landmarks: tuple
    dinov2_sizes: tuple
    minilm_tokens: int
    synthetic_n: int
    capture_layers: dict
    e2e_sizes: tuple
    e2e_landmarks: int
    gemm_size: int
    copy_bytes: int
    budget_s: float = 1.0

    @property
    def default_landmarks(self):
        """The m of the targets and the single-m tables: 64 when swept, else the smallest swept."""
        return 64 if 64 in self.landmarks else self.landmarks[0]


def plan_for(device: torch.device, quick: bool = False) -> Plan:
    """The sweep for ``device``; ``quick`` is a seconds-long smoke run at tiny sizes."""
    if quick:
        return Plan(seq_lens={1: (128, 256), 2: (256,)}, exact_max_n={1: 256, 2: 256}, landmarks=(8, 16),
                    head_dim=16, breakdown=((1, 256),), slope_range=(128, 256), accuracy_landmarks=(8, 16),
                    dinov2_sizes=(), minilm_tokens=48, synthetic_n=256,
                    capture_layers={"dinov2": (11,), "minilm": (2,)}, e2e_sizes=(112,), e2e_landmarks=16,
                    gemm_size=512, copy_bytes=2**22, budget_s=0.02)
    common = dict(landmarks=(32, 64, 128, 256), head_dim=64, slope_range=(4096, 65536),
                  accuracy_landmarks=(8, 16, 32, 64, 128, 256), dinov2_sizes=(224, 518), minilm_tokens=512,
                  synthetic_n=4096, capture_layers={"dinov2": (3, 7, 11), "minilm": (1, 3, 5)},
                  e2e_sizes=(224, 518, 1036), e2e_landmarks=64)
    if device.type == "cuda":
        return Plan(seq_lens={1: tuple(2**k for k in range(8, 19)), 12: tuple(4**k for k in range(4, 10))},
                    exact_max_n={1: 2**18, 12: 2**18}, breakdown=((1, 2**18), (12, 2**16)), gemm_size=8192,
                    copy_bytes=2**30, **common)
    # Exact SDPA for 12 heads costs 12 x 7.7 s per call at n = 65,536 on 2 cores: capped at 16,384 so the whole
    # suite stays under 15 minutes; one head is timed over the full range.
    return Plan(seq_lens={1: tuple(2**k for k in range(8, 17)), 12: tuple(4**k for k in range(4, 9))},
                exact_max_n={1: 2**16, 12: 2**14}, breakdown=((1, 2**16), (12, 2**14)), gemm_size=4096,
                copy_bytes=2**28, **common)


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device):
    """Seconds one call of ``fn`` takes: wall clock on CPU, CUDA events around the call's kernels on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


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
        return min(self.times)

    @property
    def median(self):
        return statistics.median(self.times)


def measure(fn, device, *, min_calls=3, max_calls=10, budget_s=1.0) -> Measurement:
    """Time ``fn()`` after one warm-up call and record its peak memory (see the module docstring).

    A warm-up call that already takes ``budget_s`` or longer is the only one: at that length one-time
    costs no longer show, and it keeps exact attention at large ``n`` to a single call.
    """
    with PeakMemory(device) as peak:
        first = _timed_call(fn, device)
        long_call = first >= budget_s
        times = [first] if long_call else []
        while not long_call and len(times) < max_calls and (len(times) < min_calls or sum(times) < budget_s):
            times.append(_timed_call(fn, device))
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


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def random_qkv(shape, device, dtype, seed=0):
    """Standard normal ``Q, K, V`` of ``shape``, drawn on ``device`` (timing only depends on the shape)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))


def sink_inputs(n, d, heads=1, *, clusters=16, seed=0):
    r"""Synthetic attention inputs with an attention sink, float32 ``(1, heads, n, d)``.

    Tokens fall into ``clusters`` groups whose queries and keys share a centre (tokens of a group
    attend to each other more), every query leans towards one direction :math:`u`
    (:math:`\bar q\cdot u = 3`), and token 0 is a sink: its key is :math:`\beta u` with
    :math:`3\tau\beta = \log n + 1`, so that its weight :math:`e^{\tau\beta\, q\cdot u}` matches the other
    keys' together and it takes about half of the attention (44–51 % on average for
    :math:`256 \le n \le 4096`, :math:`d = 64`), while its value is 20 times smaller than the others, as
    for [CLS] in all-MiniLM-L6-v2.
    """
    gen = torch.Generator().manual_seed(seed)
    tau, shift = d**-0.5, 3.0
    centres = 0.5 * torch.randn(heads, clusters, d, generator=gen)
    assign = torch.randint(clusters, (n,), generator=gen)
    u = torch.randn(heads, 1, d, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    Q = centres[:, assign] + torch.randn(heads, n, d, generator=gen) + shift * u
    K = centres[:, assign] + torch.randn(heads, n, d, generator=gen)
    V = torch.randn(heads, n, d, generator=gen)
    K[:, 0] = (math.log(n) + 1) / (tau * shift) * u[:, 0]
    V[:, 0] /= 20
    return Q[None], K[None], V[None]


def approximate_flops(batch, n, d, m):
    """FLOPs by stage of a default :func:`~nystrom.approximate` call on ``batch`` sequences of ``n`` tokens.

    The default solver, :class:`~nystrom.NewtonSchulz`, runs a fixed number of iterations; landmark
    selection is not counted (see :func:`nystrom.linalg.flops.nystrom_attention_flops`).
    """
    solver = NewtonSchulz()
    return nystrom_attention_flops(batch, n, n, d, d, m, solve_flops=solver.flops(m, solver.iters))


def relative_error(out, reference):
    r""":math:`\lVert \hat O - O\rVert_F / \lVert O\rVert_F` over the whole tensor, in float64."""
    out = out.double()
    return float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))


# ----------------------------------------------------------------------------------------------------------------
# Stamps, files and figures
# ----------------------------------------------------------------------------------------------------------------


def device_name(device):
    """Human-readable processor: the GPU's name, or the CPU model from /proc/cpuinfo with core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, family, number = platform.processor() or platform.machine(), None, None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    model = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    number = value
                elif not line.strip() and family is not None:
                    break
    except OSError:
        pass
    detail = f" (family {family}, model {number})" if family is not None else ""
    return f"{model}{detail}, {os.cpu_count()} cores"


def _git_commit():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions():
    versions = {"python": platform.python_version(), "nystrom": __version__, "torch": torch.__version__,
                "numpy": np.__version__}
    for name in ("transformers", "matplotlib"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def make_stamp(device, dtype, commit=None):
    """Where and when a result was measured: device, dtype, versions, date, commit, threads, load.

    ``commit`` is that of the code that ran (taken when the run started); default the checkout's now.
    """
    return {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or _git_commit(),
        # Other processes on a shared machine inflate times; the load says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def stamp_line(stamp):
    """One-line form of a stamp for figure footers and table captions."""
    v = stamp["versions"]
    return (f"{stamp['device_name']} | {stamp['dtype']}, {stamp['threads']} threads | torch {v['torch']}, "
            f"nystrom {v['nystrom']} | {stamp['date']} | commit {stamp['commit']}")


@dataclass
class Context:
    """What every section needs: device, dtype, plan, output folder, the run's stamp and roofline."""

    device: torch.device
    dtype: torch.dtype
    plan: Plan
    out: Path
    progress: bool = True
    roofline: dict = field(default_factory=dict)
    # The checkout can change while a long run goes on; the stamp names the code that was imported.
    commit: str | None = field(default_factory=_git_commit)

    def stamp(self):
        return make_stamp(self.device, self.dtype, self.commit)


def _figure(panels, stamp, width=5.5, height=4.2, rows=1):
    """A figure of ``panels`` axes on ``rows`` rows, with the stamp as its footer; returns ``(fig, axes)``."""
    from matplotlib.figure import Figure

    cols = math.ceil(panels / rows)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.get_layout_engine().set(h_pad=0.15)
    fig.supxlabel(stamp_line(stamp), fontsize=6, color="0.4", y=0.0)
    return fig, axes


def _sequence_axis(ax, ns):
    """Log-scaled ``n`` axis with a plain-number tick at every swept length."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [f"{n // 1024}k" if n >= 4096 else str(n) for n in ns], fontsize=7)
    ax.minorticks_off()


def _save(ctx, name, fig=None, payload=None, tables=None):
    ctx.out.mkdir(parents=True, exist_ok=True)
    if fig is not None:
        fig.savefig(ctx.out / f"{name}.png", dpi=110)
    if payload is not None:
        (ctx.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    if tables is not None:
        (ctx.out / f"{name}.md").write_text(tables)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _progress(ctx, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not ctx.progress, leave=False, file=sys.stderr)


def markdown_table(header, rows):
    """A GitHub-flavoured markdown table; ``None`` cells print as an em dash."""
    def cell(x):
        return "—" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ms(seconds):
    return None if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _mib(nbytes):
    return None if nbytes is None else f"{nbytes / 2**20:,.1f}"


def log_log_slope(ns, times):
    """Least-squares slope of :math:`\\log t` against :math:`\\log n` (``None`` for fewer than two points)."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(times), 1)[0])


# ----------------------------------------------------------------------------------------------------------------
# Section: scaling
# ----------------------------------------------------------------------------------------------------------------


def measure_roofline(ctx):
    """GEMM rate and copy bandwidth of the device, measured once per run."""
    plan = ctx.plan
    ctx.roofline = {"gemm_size": plan.gemm_size,
                    "gemm_flops_per_s": gemm_flop_rate(ctx.device, ctx.dtype, plan.gemm_size, 2 * plan.budget_s),
                    "copy_bytes_per_s": copy_bandwidth(ctx.device, plan.copy_bytes, plan.budget_s)}
    return ctx.roofline


def given_landmarks_call(Q, K, V, m):
    """``fn()`` computing :func:`~nystrom.torch.attention.fna_attention` on ``m`` shared landmarks drawn
    beforehand (uniformly, seed 0): the two attention products and the solve, the ceiling of every strategy."""
    landmarks = get_strategy("uniform")(Q, K, m, seed=0, head_axis=-3)
    return lambda: fna_attention(Q, K, V, landmarks, DEFAULT_SOLVER, scale=Q.shape[-1] ** -0.5)


def _scaling_configs(plan):
    """``(H, n, method, m)`` in sweep order; ``method`` is ``"exact"``, a strategy name or :data:`GIVEN`."""
    configs = []
    for heads, lengths in plan.seq_lens.items():
        for n in lengths:
            if n <= plan.exact_max_n[heads]:
                configs.append((heads, n, "exact", None))
            configs += [(heads, n, s, m) for s in METHODS for m in plan.landmarks if m <= n]
    return configs


def run_scaling(ctx):
    """Time and memory of exact SDPA and of ``approximate`` over the plan's grid; see the module docstring."""
    plan, device = ctx.plan, ctx.device
    roof = measure_roofline(ctx)
    configs = _scaling_configs(plan)
    records, inputs = [], None
    with _progress(ctx, len(configs), "scaling") as bar, torch.inference_mode():
        for heads, n, method, m in configs:
            shape = (1, heads, n, plan.head_dim)
            if inputs is None or inputs[0].shape != shape:
                inputs = Q = K = V = None  # free the previous size before allocating the next
                inputs = random_qkv(shape, device, ctx.dtype)
            Q, K, V = inputs
            d = plan.head_dim
            if method == "exact":
                meas = measure(lambda: F.scaled_dot_product_attention(Q, K, V), device, budget_s=plan.budget_s)
                flops = exact_attention_flops(heads, n, n, d, d)
            elif method == GIVEN:
                meas = measure(given_landmarks_call(Q, K, V, m), device, budget_s=plan.budget_s)
                flops = approximate_flops(heads, n, d, m)["total"]
            else:
                meas = measure(lambda: approximate(Q, K, V, strategy=method, num_landmarks=m, seed=0), device,
                               budget_s=plan.budget_s)
                flops = approximate_flops(heads, n, d, m)["total"]
            records.append({
                "heads": heads, "n": n, "d": d, "method": method, "m": m,
                "min_s": meas.min, "median_s": meas.median, "times_s": list(meas.times),
                "peak_bytes": meas.peak_bytes, "flops": flops, "flops_per_s": flops / meas.min,
                "gemm_fraction": flops / meas.min / roof["gemm_flops_per_s"],
                "io_floor_s": 4 * heads * n * d * Q.element_size() / roof["copy_bytes_per_s"],
            })
            bar.update()
    inputs = Q = K = V = None
    stamp = ctx.stamp()
    summary = scaling_summary(records, plan, device)
    payload = {"stamp": stamp, "plan": plan.__dict__, "roofline": roof, "summary": summary, "records": records}
    _save(ctx, "scaling", payload=payload, tables=scaling_tables(records, summary, plan, roof, stamp))
    _plot_scaling(ctx, records, plan, roof, stamp)
    return payload


def _lookup(records, **where):
    for r in records:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def scaling_summary(records, plan, device):
    """Slopes per (H, method, m) and the issue's targets, each with its measured value and verdict."""
    lo, hi = plan.slope_range
    slopes = []
    for heads in plan.seq_lens:
        for method, m in [("exact", None)] + [(s, m) for s in METHODS for m in plan.landmarks]:
            pts = [(r["n"], r["min_s"]) for r in records
                   if r["heads"] == heads and r["method"] == method and r["m"] == m and lo <= r["n"] <= hi]
            if pts:
                slope = log_log_slope(*zip(*pts))
                slopes.append({"heads": heads, "method": method, "m": m, "slope": slope, "points": len(pts)})

    def ratio(heads, n, m=64, method=DEFAULT_STRATEGY):
        exact, approx = _lookup(records, heads=heads, n=n, method="exact"), _lookup(
            records, heads=heads, n=n, method=method, m=m)
        return None if exact is None or approx is None else exact["min_s"] / approx["min_s"]

    def slope_of(heads, method=DEFAULT_STRATEGY, m=64):
        found = _lookup(slopes, heads=heads, method=method, m=m)
        return None if found is None else found["slope"]

    def target(name, value, op, bound):
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        return {"target": name, "value": value, "bound": f"{op} {bound}", "met": met}

    if device.type == "cuda":
        big = _lookup(records, heads=12, n=65536, method=DEFAULT_STRATEGY, m=64)
        targets = [
            target("(1,12,65536,64) m=64: speed-up over SDPA", ratio(12, 65536), ">=", 10),
            target("(1,12,65536,64) m=64: time / (read Q,K,V + write O at copy bandwidth)",
                   None if big is None else big["min_s"] / big["io_floor_s"], "<=", 2),
        ]
    else:
        big = _lookup(records, heads=1, n=65536, method=DEFAULT_STRATEGY, m=64)
        targets = [target(f"(1,1,{n},64) m=64: speed-up over SDPA", ratio(1, n), ">=", bound)
                   for n, bound in CPU_SPEEDUP_TARGETS] + [
            target("(1,1,65536,64) m=64: FLOP rate / GEMM rate", None if big is None else big["gemm_fraction"],
                   ">=", CPU_GEMM_FRACTION_TARGET),
            target(f"(1,1,n,64) m=64: slope of log t vs log n over [{lo}, {hi}]", slope_of(1), "<=",
                   CPU_SLOPE_TARGET),
        ]
    m0 = plan.default_landmarks
    ceiling = []
    for heads, lengths in plan.seq_lens.items():
        for n in lengths:
            exact, given = (_lookup(records, heads=heads, n=n, method="exact"),
                            _lookup(records, heads=heads, n=n, method=GIVEN, m=m0))
            if exact and given:
                ceiling.append({"heads": heads, "n": n, "m": m0, "speedup": exact["min_s"] / given["min_s"],
                                "gemm_fraction": given["gemm_fraction"]})
    return {"slopes": slopes, "targets": targets, "strategy": DEFAULT_STRATEGY, "ceiling": ceiling}


def scaling_tables(records, summary, plan, roof, stamp):
    """Markdown: the targets, time and speed-up per n, slopes, and memory at the largest n."""
    parts = [f"_Measured on {stamp_line(stamp)}; load average {stamp['load_average']}._\n",
             f"Roofline: {roof['gemm_size']}² GEMM at {roof['gemm_flops_per_s'] / 1e9:,.1f} GFLOP/s; "
             f"copy bandwidth {roof['copy_bytes_per_s'] / 1e9:,.1f} GB/s.\n"]

    def verdict(t):
        return "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")

    def fmt(v):
        return None if v is None else f"{v:.3g}"

    parts.append(f"### Targets (strategy `{summary['strategy']}`, default solver)\n")
    parts.append(markdown_table(["target", "measured", "bound", "verdict"],
                                [(t["target"], fmt(t["value"]), t["bound"], verdict(t)) for t in summary["targets"]]))
    if summary["ceiling"]:
        parts.append(f"Ceiling, m = {summary['ceiling'][0]['m']}: with the landmarks given (`{GIVEN}`: the two "
                     "attention products and the m×m solve, no selection, no input checks) no strategy can do "
                     "better than\n")
        parts.append(markdown_table(["shape", "speed-up over exact SDPA", "FLOP rate / GEMM"],
                                    [(f"(1, {c['heads']}, {c['n']:,}, {plan.head_dim})", f"{c['speedup']:,.0f}×",
                                      f"{100 * c['gemm_fraction']:.0f}%") for c in summary["ceiling"]]))
    m = plan.default_landmarks
    for heads, lengths in plan.seq_lens.items():
        parts.append(f"### Time per call (ms, min) and speed-up over exact SDPA: shape (1, {heads}, n, "
                     f"{plan.head_dim}), m = {m}\n")
        rows = []
        for n in lengths:
            exact = _lookup(records, heads=heads, n=n, method="exact")
            row = [f"{n:,}", _ms(exact and exact["min_s"])]
            for s in METHODS:
                r = _lookup(records, heads=heads, n=n, method=s, m=m)
                if r is None:
                    row.append(None)
                    continue
                speedup = f" ({exact['min_s'] / r['min_s']:,.0f}×)" if exact else ""
                row.append(f"{_ms(r['min_s'])}{speedup}")
            rows.append(row)
        parts.append(markdown_table(["n", "exact SDPA"] + [f"`{s}`" for s in METHODS], rows))
        n_max = lengths[-1]
        parts.append(f"### Shape (1, {heads}, {n_max:,}, {plan.head_dim}): time (ms, min), FLOP rate as % of "
                     f"the GEMM's, peak memory above the inputs (MiB) by m\n")
        rows = []
        exact = _lookup(records, heads=heads, n=n_max, method="exact")
        if exact:
            rows.append(["exact SDPA", "—", _ms(exact["min_s"]), f"{100 * exact['gemm_fraction']:.0f}%",
                         _mib(exact["peak_bytes"])])
        for s in METHODS:
            for m in plan.landmarks:
                r = _lookup(records, heads=heads, n=n_max, method=s, m=m)
                if r:
                    rows.append([f"`{s}`", m, _ms(r["min_s"]), f"{100 * r['gemm_fraction']:.1f}%",
                                 _mib(r["peak_bytes"])])
        parts.append(markdown_table(["method", "m", "time (ms)", "FLOP rate / GEMM", "peak memory (MiB)"], rows))
    lo, hi = plan.slope_range
    parts.append(f"### Fitted slope of log(time) vs log(n) over n ∈ [{lo:,}, {hi:,}]\n")
    rows = []
    for method, m in [("exact", None)] + [(s, m) for s in METHODS for m in plan.landmarks]:
        row = ["exact SDPA" if method == "exact" else f"`{method}`", m]
        for heads in plan.seq_lens:
            found = _lookup(summary["slopes"], heads=heads, method=method, m=m)
            row.append(None if found is None or found["slope"] is None else f"{found['slope']:.2f}")
        rows.append(row)
    parts.append(markdown_table(["method", "m"] + [f"H = {heads}" for heads in plan.seq_lens], rows))
    return "\n".join(parts)


def _plot_scaling(ctx, records, plan, roof, stamp):
    by_strategy = [("exact", None)] + [(s, plan.default_landmarks) for s in METHODS]
    by_landmarks = [("exact", None)] + [(DEFAULT_STRATEGY, m) for m in plan.landmarks]
    for name, lines, key, unit, ylabel, title in (
        ("scaling_time", by_strategy, "min_s", 1, "seconds", "time per call"),
        ("scaling_landmarks", by_landmarks, "min_s", 1, "seconds", "time per call"),
        ("scaling_memory", by_strategy, "peak_bytes", 2**20, "MiB", "peak memory above the inputs"),
        ("roofline", by_strategy, "flops_per_s", 1e9, "GFLOP/s", "achieved FLOP rate"),
    ):
        fig, axes = _figure(len(plan.seq_lens), stamp)
        for ax, (heads, lengths) in zip(axes, plan.seq_lens.items()):
            for method, m in lines:
                pts = sorted((r["n"], r[key]) for r in records
                             if (r["heads"], r["method"], r["m"]) == (heads, method, m) and r[key] is not None)
                # A zero (no measurable growth) cannot sit on a log axis.
                ax.plot([n for n, _ in pts], [v / unit if v > 0 else np.nan for _, v in pts],
                        "k-o" if method == "exact" else ("k--" if method == GIVEN else "-o"), ms=3,
                        label="exact SDPA" if method == "exact" else (
                            f"landmarks given, m={m}" if method == GIVEN else f"{method}, m={m}"))
            if key == "flops_per_s":
                ax.axhline(roof["gemm_flops_per_s"] / unit, color="r", ls="--", label=f"{roof['gemm_size']}² GEMM")
            else:
                ax.set_yscale("log")
            ax.set(title=f"{title}, shape (1, {heads}, n, {plan.head_dim})", xlabel="n", ylabel=ylabel)
            _sequence_axis(ax, lengths)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        _save(ctx, name, fig)


# ----------------------------------------------------------------------------------------------------------------
# Section: breakdown
# ----------------------------------------------------------------------------------------------------------------


def _timing_wrapper(inner, stage, seconds, device):
    """``inner`` with its time added to ``seconds[stage]``; ``stage`` is a name or a function of the call's
    first argument."""
    def wrapped(first, *args, **kwargs):
        _sync(device)
        begin = time.perf_counter()
        result = inner(first, *args, **kwargs)
        _sync(device)
        seconds[stage(first) if callable(stage) else stage] += time.perf_counter() - begin
        return result

    return wrapped


def stage_times(Q, K, V, strategy, m, device, solver=DEFAULT_SOLVER):
    """Seconds of one ``approximate`` call by stage; ``rest`` is what the stages do not account for.

    ``approximate`` accepts any callable as strategy or solver, so those two time themselves in place.
    ``scaled_dot_product_attention`` is swapped for a timed copy for the call (``fna_attention`` looks it
    up on ``torch.nn.functional`` each time): the :math:`m` landmark queries over all keys are the
    "landmark product", all queries over the :math:`m` landmark keys the "output product". Only those
    calls are intercepted, so the other stages run at full speed.
    """
    seconds = dict.fromkeys(("selection", "landmark_product", "solve", "output_product"), 0.0)
    select = _timing_wrapper(get_strategy(strategy), "selection", seconds, device)
    solve = _timing_wrapper(get_solver(solver), "solve", seconds, device)
    sdpa = _timing_wrapper(F.scaled_dot_product_attention,
                           lambda q: "landmark_product" if q.shape[-2] == m else "output_product", seconds, device)
    with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
        total = _timed_call(lambda: approximate(Q, K, V, strategy=select, num_landmarks=m, solver=solve, seed=0),
                            device)
    seconds["total"] = total
    return seconds


_BREAKDOWN_CALLS = 3


def run_breakdown(ctx):
    """Stage times of ``approximate`` for every strategy and m at the plan's breakdown shapes."""
    plan, device = ctx.plan, ctx.device
    roof = ctx.roofline or measure_roofline(ctx)
    d = plan.head_dim
    configs = [(h, n, s, m) for h, n in plan.breakdown for s in STRATEGIES for m in plan.landmarks if m <= n]
    records = []
    with _progress(ctx, len(configs), "breakdown") as bar, torch.inference_mode():
        for heads, n in plan.breakdown:
            Q, K, V = random_qkv((1, heads, n, d), device, ctx.dtype)
            validation = measure(lambda: check_attention_inputs(Q, K, V), device, budget_s=plan.budget_s).min
            for _, _, s, m in [c for c in configs if c[:2] == (heads, n)]:
                warm_up = _timed_call(lambda: approximate(Q, K, V, strategy=s, num_landmarks=m, seed=0), device)
                calls = 1 if warm_up >= plan.budget_s else _BREAKDOWN_CALLS
                best = min((stage_times(Q, K, V, s, m, device) for _ in range(calls)), key=lambda t: t["total"])
                products = best["landmark_product"] + best["output_product"]
                flops = approximate_flops(heads, n, d, m)
                product_flops = flops["landmark_products"] + flops["output_product"]
                accounted = validation + best["selection"] + products + best["solve"]
                records.append({
                    "heads": heads, "n": n, "d": d, "m": m, "strategy": s, "validation_s": validation, **{
                        f"{k}_s": v for k, v in best.items()}, "rest_s": best["total"] - accounted,
                    "selection_share": best["selection"] / best["total"],
                    "products_flops_per_s": product_flops / products,
                    "products_gemm_fraction": product_flops / products / roof["gemm_flops_per_s"],
                })
                bar.update()
    stamp = ctx.stamp()
    payload = {"stamp": stamp, "roofline": roof, "records": records}
    _save(ctx, "breakdown", payload=payload, tables=breakdown_tables(records, plan, stamp))
    _plot_breakdown(ctx, records, plan, stamp)
    return payload


_STAGES = ("validation", "selection", "landmark_product", "solve", "output_product", "rest")


def breakdown_tables(records, plan, stamp):
    """Markdown: per shape, ms by stage for every strategy and m, with the selection share."""
    parts = [f"_Measured on {stamp_line(stamp)}; load average {stamp['load_average']}. Fastest of "
             f"{_BREAKDOWN_CALLS} instrumented calls after a warm-up (one call where the warm-up took over "
             f"{plan.budget_s:g} s); `rest` = total minus the named stages (checks, casts, the m×m softmax, "
             f"A⁺(BV))._\n"]
    for heads, n in plan.breakdown:
        parts.append(f"### Shape (1, {heads}, {n:,}, {plan.head_dim}): milliseconds by stage\n")
        rows = [[f"`{r['strategy']}`", r["m"], _ms(r["total_s"])] + [_ms(r[f"{s}_s"]) for s in _STAGES]
                + [f"{100 * r['selection_share']:.0f}%", f"{100 * r['products_gemm_fraction']:.0f}%"]
                for r in records if (r["heads"], r["n"]) == (heads, n)]
        parts.append(markdown_table(["strategy", "m", "total", *_STAGES, "selection share",
                                     "products FLOP rate / GEMM"], rows))
    return "\n".join(parts)


def _plot_breakdown(ctx, records, plan, stamp):
    fig, axes = _figure(len(plan.breakdown), stamp, width=6.5, height=0.9 + 0.16 * len(STRATEGIES)
                        * len(plan.landmarks))
    for ax, (heads, n) in zip(axes, plan.breakdown):
        rows = [r for r in records if (r["heads"], r["n"]) == (heads, n)]
        labels = [f"{r['strategy']} m={r['m']}" for r in rows]
        left = np.zeros(len(rows))
        for stage in _STAGES:
            widths = np.array([max(r[f"{stage}_s"], 0.0) * 1e3 for r in rows])
            ax.barh(labels, widths, left=left, label=stage.replace("_", " "))
            left += widths
        ax.invert_yaxis()
        ax.set(title=f"where the time goes, (1, {heads}, {n:,}, {plan.head_dim})", xlabel="milliseconds")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
    _save(ctx, "breakdown", fig)


# ----------------------------------------------------------------------------------------------------------------
# Section: accuracy
# ----------------------------------------------------------------------------------------------------------------


def _captured(model, model_inputs, layers, dataset):
    """``(dataset, layer, Q, K, V, scale, key_padding_mask)`` of each chosen layer, from one forward pass."""
    from .torch import capture_attention

    for c in capture_attention(model, model_inputs, layers):
        yield dataset, c.layer, c.query, c.key, c.value, c.scaling, c.key_padding_mask


def _dinov2_inputs(plan):
    """DINOv2-S attention inputs on the ``astronaut`` image at each of ``plan.dinov2_sizes``."""
    from .torch import pretrained

    model = pretrained.load_dinov2_small()
    image = pretrained.natural_images()["astronaut"]
    for size in plan.dinov2_sizes:
        pixels = pretrained.imagenet_pixel_values(image, size)
        yield from _captured(model, {"pixel_values": pixels}, plan.capture_layers["dinov2"], f"DINOv2-S {size} px")


def _minilm_inputs(plan):
    """all-MiniLM-L6-v2 attention inputs on the example sentences joined into one text."""
    from .torch import pretrained

    model, tokenizer = pretrained.load_minilm()
    tokens = tokenizer(" ".join(pretrained.example_sentences()), truncation=True, max_length=plan.minilm_tokens,
                       return_tensors="pt")
    yield from _captured(model, dict(tokens), plan.capture_layers["minilm"],
                         f"MiniLM {tokens['input_ids'].shape[-1]} tokens")


def attention_inputs(plan):
    """``[(dataset, layer, Q, K, V, scale, key_padding_mask)]`` on the CPU in float32: captured, and synthetic.

    A model whose weight package is missing is skipped with a note on stderr.
    """
    inputs = []
    for name, source, wanted in (("DINOv2-S", _dinov2_inputs, plan.dinov2_sizes),
                                 ("MiniLM", _minilm_inputs, plan.minilm_tokens)):
        if not wanted:
            continue
        try:
            inputs += list(source(plan))
        except (ImportError, FileNotFoundError) as err:
            print(f"accuracy: {name} skipped ({err})", file=sys.stderr)
    Q, K, V = sink_inputs(plan.synthetic_n, plan.head_dim, heads=1)
    inputs.append((f"synthetic sink n={plan.synthetic_n}", None, Q, K, V, plan.head_dim**-0.5, None))
    return inputs


def run_accuracy(ctx):
    """Relative error (float64 reference) and time of every strategy x solver x m on captured and synthetic inputs.

    For multi-head inputs the default strategy also runs with one landmark set per head
    (``share_landmarks_across_heads=False``), which measures what sharing costs in accuracy and saves in time.
    """
    plan, device = ctx.plan, ctx.device
    inputs = attention_inputs(plan)
    configs = [(i, m) for i, item in enumerate(inputs) for m in plan.accuracy_landmarks if m <= item[2].shape[-2]]
    records = []
    with _progress(ctx, len(configs), "accuracy") as bar, torch.inference_mode():
        for index, (dataset, layer, Q, K, V, scale, real) in enumerate(inputs):
            mask = None if real is None else real[:, None, :]
            reference = exact_attention(Q.double(), K.double(), V.double(), scale=scale, key_padding_mask=mask)
            Q, K, V = (x.to(device=device, dtype=ctx.dtype) for x in (Q, K, V))
            mask = None if mask is None else mask.to(device)
            variants = [(s, solver, True) for s in STRATEGIES for solver in SOLVERS]
            if K.shape[-3] > 1:
                variants.append((DEFAULT_STRATEGY, DEFAULT_SOLVER, False))
            for m in [m for i, m in configs if i == index]:
                for strategy, solver, shared in variants:
                    def call():
                        return approximate(Q, K, V, strategy=strategy, num_landmarks=m, solver=solver, scale=scale,
                                           key_padding_mask=mask, seed=0, share_landmarks_across_heads=shared)

                    # Time is measured for the default solver only: the solve is a small share of the call.
                    meas = measure(call, device, min_calls=2, budget_s=0.05) if solver == DEFAULT_SOLVER else None
                    records.append({
                        "dataset": dataset, "layer": layer, "n": K.shape[-2], "heads": K.shape[-3],
                        "strategy": strategy, "solver": solver, "m": m, "shared": shared,
                        "rel_error": relative_error(call().cpu(), reference),
                        "time_s": None if meas is None else meas.min,
                    })
                bar.update()
    stamp = ctx.stamp()
    payload = {"stamp": stamp, "seed": 0, "records": records}
    _save(ctx, "accuracy", payload=payload, tables=accuracy_tables(records, plan, stamp))
    _plot_accuracy(ctx, records, plan, stamp)
    return payload


def _mean_over_layers(records, shared=True, **where):
    """Mean relative error (and time) over the layers of a dataset, per m."""
    by_m = {}
    for r in records:
        if r["shared"] == shared and all(r[k] == v for k, v in where.items()):
            by_m.setdefault(r["m"], []).append(r)
    return {m: (float(np.mean([r["rel_error"] for r in rs])),
                None if rs[0]["time_s"] is None else float(np.mean([r["time_s"] for r in rs])))
            for m, rs in sorted(by_m.items())}


def accuracy_tables(records, plan, stamp):
    """Markdown: per dataset, mean relative error over the captured layers by strategy x m, and by solver at m=64."""
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    parts = [f"_Measured on {stamp_line(stamp)}. Relative Frobenius error of the output against exact attention "
             f"in float64, mean over the captured layers; random strategies use seed 0._\n"]
    m_solver = 64 if 64 in plan.accuracy_landmarks else plan.accuracy_landmarks[-1]
    for dataset in datasets:
        layers = sorted({r["layer"] for r in records if r["dataset"] == dataset and r["layer"] is not None})
        shape = next((r["heads"], r["n"]) for r in records if r["dataset"] == dataset)
        where = f", layers {layers}" if layers else ""
        parts.append(f"### {dataset} ({shape[0]} heads, n = {shape[1]:,}{where}): error with `{DEFAULT_SOLVER}`\n")
        ms = sorted({r["m"] for r in records if r["dataset"] == dataset})
        rows = []
        for s in STRATEGIES:
            errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=DEFAULT_SOLVER)
            rows.append([f"`{s}`"] + [f"{errors[m][0]:.3g}" if m in errors else None for m in ms])
        parts.append(markdown_table(["strategy"] + [f"m={m}" for m in ms], rows))
        if m_solver in ms:
            parts.append(f"Error by solver at m = {m_solver}:\n")
            rows = []
            for s in STRATEGIES:
                row = [f"`{s}`"]
                for solver in SOLVERS:
                    errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=solver)
                    row.append(f"{errors[m_solver][0]:.3g}")
                rows.append(row)
            parts.append(markdown_table(["strategy"] + [f"`{s}`" for s in SOLVERS], rows))
        per_head = _mean_over_layers(records, shared=False, dataset=dataset)
        if per_head:
            shared = _mean_over_layers(records, dataset=dataset, strategy=DEFAULT_STRATEGY, solver=DEFAULT_SOLVER)
            parts.append(f"Landmarks shared by the {shape[0]} heads (default) or chosen per head, "
                         f"`{DEFAULT_STRATEGY}`: error and time (ms):\n")
            rows = [[m, f"{shared[m][0]:.3g}", f"{per_head[m][0]:.3g}", _ms(shared[m][1]), _ms(per_head[m][1])]
                    for m in per_head]
            parts.append(markdown_table(["m", "error, shared", "error, per head", "time, shared",
                                         "time, per head"], rows))
    return "\n".join(parts)


def _plot_accuracy(ctx, records, plan, stamp):
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    for name, against_time in (("accuracy_m", False), ("accuracy_time", True)):
        for solver in ((DEFAULT_SOLVER,) if against_time else SOLVERS):
            fig, axes = _figure(len(datasets), stamp, width=4.8, height=3.8, rows=1 if len(datasets) < 3 else 2)
            for ax, dataset in zip(axes, datasets):
                for s in STRATEGIES:
                    errors = _mean_over_layers(records, dataset=dataset, strategy=s, solver=solver)
                    x = [t for _, t in errors.values()] if against_time else list(errors)
                    ax.loglog(x, [e for e, _ in errors.values()], "-o", ms=3, label=s)
                ax.set(title=dataset, xlabel="seconds per call (min)" if against_time else "m (landmarks)",
                       ylabel="relative error")
                ax.grid(True, which="both", alpha=0.3)
            axes[0].legend(fontsize=7, title=f"solver: {solver}", title_fontsize=7)
            _save(ctx, name if solver == DEFAULT_SOLVER else f"{name}_{solver}", fig)


# ----------------------------------------------------------------------------------------------------------------
# Section: end-to-end DINOv2-S
# ----------------------------------------------------------------------------------------------------------------


def run_e2e(ctx):
    """DINOv2-S forward latency, memory and feature agreement, exact vs FNA on the later half of the layers."""
    from .torch import fna, pretrained

    stamp = ctx.stamp()
    plan, device = ctx.plan, ctx.device
    try:
        model = pretrained.load_dinov2_small(dtype=ctx.dtype).to(device)
    except (ImportError, FileNotFoundError) as err:
        print(f"e2e: skipped ({err})", file=sys.stderr)
        payload = {"stamp": stamp, "skipped": str(err), "records": []}
        _save(ctx, "e2e", payload=payload, tables=f"End-to-end benchmark skipped: {err}\n")
        return payload
    image = pretrained.natural_images()["astronaut"]
    depth = model.config.num_hidden_layers
    layers = range(depth // 2, depth)
    records = []
    with _progress(ctx, len(plan.e2e_sizes), "e2e") as bar, torch.inference_mode():
        for size in plan.e2e_sizes:
            pixels = pretrained.imagenet_pixel_values(image, size).to(device=device, dtype=ctx.dtype)
            outputs = {}

            def forward(key):
                # Keeps the timed calls' output: a 1036 px forward is too slow to repeat for the comparison.
                outputs[key] = model(pixel_values=pixels)

            exact = measure(lambda: forward("exact"), device, budget_s=2 * plan.budget_s)
            with fna(model, layers=layers, num_landmarks=plan.e2e_landmarks, strategy=DEFAULT_STRATEGY):
                approx = measure(lambda: forward("fna"), device, budget_s=2 * plan.budget_s)
            exact_out, fna_out = outputs["exact"], outputs["fna"]
            cls = F.cosine_similarity(fna_out.pooler_output.float(), exact_out.pooler_output.float(), dim=-1)
            patches = F.cosine_similarity(fna_out.last_hidden_state[:, 1:].float(),
                                          exact_out.last_hidden_state[:, 1:].float(), dim=-1)
            records.append({
                "size": size, "n": exact_out.last_hidden_state.shape[1], "fna_layers": list(layers),
                "m": plan.e2e_landmarks, "strategy": DEFAULT_STRATEGY,
                "exact_s": exact.min, "fna_s": approx.min, "speedup": exact.min / approx.min,
                "exact_peak_bytes": exact.peak_bytes, "fna_peak_bytes": approx.peak_bytes,
                "cls_cosine": float(cls.mean()), "patch_cosine_mean": float(patches.mean()),
                "patch_cosine_min": float(patches.min()),
            })
            bar.update()
    payload = {"stamp": stamp, "records": records}
    rows = [[r["size"], f"{r['n']:,}", _ms(r["exact_s"]), _ms(r["fna_s"]), f"{r['speedup']:.2f}×",
             _mib(r["exact_peak_bytes"]), _mib(r["fna_peak_bytes"]), f"{r['cls_cosine']:.4f}",
             f"{r['patch_cosine_mean']:.4f}", f"{r['patch_cosine_min']:.3f}"] for r in records]
    tables = (f"_Measured on {stamp_line(stamp)}. FNA (`{DEFAULT_STRATEGY}`, m = {plan.e2e_landmarks}) in layers "
              f"{layers.start}–{layers.stop - 1} of {depth}; image `astronaut`._\n\n" + markdown_table(
                  ["px", "tokens", "exact (ms)", "FNA (ms)", "speed-up", "exact peak (MiB)", "FNA peak (MiB)",
                   "CLS cosine", "patch cosine (mean)", "patch cosine (min)"], rows))
    _save(ctx, "e2e", payload=payload, tables=tables)
    fig, axes = _figure(2, stamp, width=4.6, height=3.6)
    n = [r["n"] for r in records]
    axes[0].loglog(n, [r["exact_s"] for r in records], "k-o", ms=3, label="exact")
    axes[0].loglog(n, [r["fna_s"] for r in records], "-o", ms=3, label=f"FNA m={plan.e2e_landmarks}")
    axes[0].set(title="DINOv2-S forward latency", xlabel="tokens", ylabel="seconds")
    axes[1].semilogx(n, [r["cls_cosine"] for r in records], "-o", ms=3, label="CLS")
    axes[1].semilogx(n, [r["patch_cosine_mean"] for r in records], "-o", ms=3, label="patches (mean)")
    axes[1].set(title="feature agreement with exact", xlabel="tokens", ylabel="cosine similarity")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(ctx, "e2e", fig)
    return payload


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

RUNNERS = {"scaling": run_scaling, "breakdown": run_breakdown, "accuracy": run_accuracy, "e2e": run_e2e}


def _parse_sections(text):
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return sections


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m nystrom.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=_parse_sections, default=list(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when present, else CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="results go to OUT/<device>/ (default results/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for numpy's BLAS (default: their own choice, one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv=None):
    """Run the selected sections; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("nystrom.bench: --device cuda asked for, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}); run without --device or with --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ctx = Context(device=device, dtype=dtype, plan=plan_for(device, args.quick), out=args.out / device.type,
                  progress=not args.no_progress)
    default_threads = torch.get_num_threads()
    blas_limit = contextlib.nullcontext()
    if args.threads is not None:
        if args.threads < 1:
            print(f"nystrom.bench: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
        # Farthest-point sampling runs its loop in numpy on CPU; its BLAS (OpenBLAS) has its own
        # thread pool, which would otherwise use every core while torch uses one.
        import threadpoolctl

        blas_limit = threadpoolctl.threadpool_limits(args.threads)
    print(f"nystrom.bench: {', '.join(args.only)} on {device_name(device)} ({str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads) -> {ctx.out}", file=sys.stderr)
    try:
        with blas_limit:
            for section in args.only:
                begin = time.perf_counter()
                RUNNERS[section](ctx)
                print(f"  {section}: {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    finally:
        torch.set_num_threads(default_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
