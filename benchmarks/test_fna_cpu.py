"""pytest-benchmark suite for the CPU speed targets of ``nystrom.approximate``.

float32, one head, ``d = 64``, ``m = 64``: exact ``scaled_dot_product_attention`` (SDPA) and ``approximate``
are timed in the same session at n = 4,096 / 16,384 / 65,536, with a 4096² GEMM for the roofline. Run::

    .venv/bin/python -m pytest benchmarks/ --benchmark-group-by=param:n --benchmark-columns=min,median,rounds

Each ``n`` is one group, so pytest-benchmark's table shows each method's time relative to the fastest;
``extra_info`` holds the FLOP rate and its fraction of the GEMM's. The ``test_target_*`` items then check
the issue's targets on this session's numbers and fail, with the measured value, when one is missed:

* speed-up over SDPA >= 100 at n = 16,384 and >= 300 at n = 65,536;
* FLOP rate >= 70 % of the GEMM's at n = 65,536;
* slope of log(time) against log(n) over [4,096, 65,536] <= 1.10.

The targets are checked for the default strategy (``norm``); ``uniform`` (the cheapest selection) is timed
beside it to show what selection costs, and ``fna_attention`` on landmarks chosen beforehand (the two attention
products and the m x m solve alone) gives the ceiling no selection rule can beat; a missed target's message
quotes it. These are benchmarks, outside ``./run.sh test`` (``testpaths``).
``python -m nystrom bench --only scaling`` measures the same quantities over a wider grid.
"""

import pytest
import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.bench.inputs import random_qkv
from nystrom.experiments.bench.plan import (
    CPU_GEMM_FRACTION_TARGET,
    CPU_SLOPE_TARGET,
    CPU_SPEEDUP_TARGETS,
    GIVEN,
)
from nystrom.experiments.bench.scaling import approximate_flops, given_landmarks_call, log_log_slope
from nystrom.experiments.timing import gemm_flop_rate
from nystrom.linalg.flops import exact_attention_flops

D = M = 64
LENGTHS = (4096, 16384, 65536)
STRATEGIES = ("norm", "uniform")
TARGET_STRATEGY = "norm"
CPU = torch.device("cpu")

# Fastest time per (method, n) in this session, filled by the benchmarks and read by the targets.
_FASTEST = {}


@pytest.fixture(scope="module")
def gemm_flops_per_s():
    return gemm_flop_rate(CPU, torch.float32, 4096)


def _inputs(n):
    return random_qkv((1, 1, n, D), CPU, torch.float32)


def _record(benchmark, key, flops, gemm_flops_per_s):
    if benchmark.stats is None:  # --benchmark-disable
        return
    fastest = benchmark.stats.stats.min
    _FASTEST[key] = fastest
    benchmark.extra_info.update(gflops=flops / fastest / 1e9, gemm_fraction=flops / fastest / gemm_flops_per_s)


@pytest.mark.parametrize("n", LENGTHS)
def test_exact_sdpa(benchmark, n, gemm_flops_per_s):
    Q, K, V = _inputs(n)
    # About 8 s per call at n = 65,536 on 2 cores: timed twice there, not ten times.
    rounds = 2 if n >= 65536 else 5
    benchmark.group = f"n={n}"
    benchmark.pedantic(F.scaled_dot_product_attention, args=(Q, K, V), rounds=rounds, warmup_rounds=1)
    _record(benchmark, ("exact", n), exact_attention_flops(1, n, n, D, D), gemm_flops_per_s)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", LENGTHS)
def test_approximate(benchmark, n, strategy, gemm_flops_per_s):
    Q, K, V = _inputs(n)
    benchmark.group = f"n={n}"
    benchmark.pedantic(nystrom.approximate, args=(Q, K, V), kwargs=dict(strategy=strategy, num_landmarks=M),
                       rounds=10, warmup_rounds=1)
    _record(benchmark, (strategy, n), approximate_flops(1, n, D, M)["total"], gemm_flops_per_s)


@pytest.mark.parametrize("n", LENGTHS)
def test_given_landmarks(benchmark, n, gemm_flops_per_s):
    Q, K, V = _inputs(n)
    benchmark.group = f"n={n}"
    benchmark.pedantic(given_landmarks_call(Q, K, V, M), rounds=10, warmup_rounds=1)
    _record(benchmark, (GIVEN, n), approximate_flops(1, n, D, M)["total"], gemm_flops_per_s)


def _ceiling(n, value_of):
    """``"; with the landmarks given: <value_of(time)>"`` when the given-landmarks timing was measured, else ``""``."""
    return f"; with the landmarks given: {value_of(_FASTEST[(GIVEN, n)])}" if (GIVEN, n) in _FASTEST else ""


def _fastest(key):
    if key not in _FASTEST:
        pytest.skip(f"no timing for {key} in this session (run the whole module without --benchmark-disable)")
    return _FASTEST[key]


@pytest.mark.parametrize(("n", "bound"), CPU_SPEEDUP_TARGETS)
def test_target_speedup(n, bound):
    speedup = _fastest(("exact", n)) / _fastest((TARGET_STRATEGY, n))
    ceiling = _ceiling(n, lambda t: f"{_fastest(('exact', n)) / t:.0f}x")
    assert speedup >= bound, f"{TARGET_STRATEGY} at n={n}: {speedup:.0f}x faster than SDPA, target >= {bound}x{ceiling}"


def test_target_gemm_fraction(gemm_flops_per_s):
    n = 65536
    flops = approximate_flops(1, n, D, M)["total"]
    fraction = flops / _fastest((TARGET_STRATEGY, n)) / gemm_flops_per_s
    ceiling = _ceiling(n, lambda t: f"{100 * flops / t / gemm_flops_per_s:.1f}%")
    bound = CPU_GEMM_FRACTION_TARGET
    assert fraction >= bound, (f"{TARGET_STRATEGY} at n={n}: {100 * fraction:.1f}% of the GEMM rate, target >= "
                               f"{100 * bound:.0f}%{ceiling}")


def test_target_slope():
    slope = log_log_slope(LENGTHS, [_fastest((TARGET_STRATEGY, n)) for n in LENGTHS])
    bound = CPU_SLOPE_TARGET
    assert slope <= bound, f"{TARGET_STRATEGY}: log-log slope {slope:.2f} over n in {LENGTHS}, target <= {bound}"
