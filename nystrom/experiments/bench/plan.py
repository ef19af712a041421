"""What one benchmark run does: the sizes it sweeps (:class:`Plan`), the methods and targets, and its context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nystrom.linalg.landmarks import STRATEGIES

from ..report import progress_bar
from ..stamp import git_commit, make_stamp

SECTIONS = ("scaling", "breakdown", "threads", "accuracy", "e2e")
DEFAULT_STRATEGY = "norm"
DEFAULT_SOLVER = "newton_schulz"
# Scaling "method": fna_attention on landmarks chosen before the clock starts, i.e. the two attention
# products and the m x m solve alone. No selection rule can be faster, so it is the ceiling of every
# speed-up and FLOP-rate target.
GIVEN = "given"
# What the scaling section times besides exact SDPA.
METHODS = (*STRATEGIES, GIVEN)
# Exact SDPA as timed: "exact" is PyTorch's own choice of kernel (flash on CPU, and on CUDA in bfloat16/float16),
# the reference of every speed-up; on CUDA "exact_efficient" forces the memory-efficient kernel, the other fused
# one, for comparison.
EXACT_BACKENDS = {"exact": None, "exact_efficient": "EFFICIENT_ATTENTION"}
# The CPU targets (float32, (1, 1, n, 64), m = 64, default strategy): speed-up over SDPA at each n, FLOP
# rate as a fraction of the GEMM's at n = 65,536, and the log-log slope. benchmarks/ checks the same.
CPU_SPEEDUP_TARGETS = ((16384, 100), (65536, 300))
CPU_GEMM_FRACTION_TARGET = 0.70
CPU_SLOPE_TARGET = 1.10


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
    thread_shape : (int, int)
        ``(H, n)`` of the thread-scaling section.
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
        Seconds of timed calls per measurement (see :func:`nystrom.experiments.timing.measure`).
    smoke_run : bool
        A ``--quick`` plan: its outputs are marked as a smoke run, not a benchmark.
    exact_methods : tuple of str
        The exact SDPA kernels timed (keys of :data:`EXACT_BACKENDS`).
    """

    seq_lens: dict
    exact_max_n: dict
    landmarks: tuple
    head_dim: int
    breakdown: tuple
    slope_range: tuple
    thread_shape: tuple
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
    smoke_run: bool = False
    exact_methods: tuple = ("exact",)

    @property
    def default_landmarks(self):
        """The m of the targets and the single-m tables: 64 when swept, else the smallest swept."""
        return 64 if 64 in self.landmarks else self.landmarks[0]


def plan_for(device: torch.device, quick: bool = False) -> Plan:
    """The sweep for ``device``; ``quick`` is a seconds-long smoke run at tiny sizes."""
    if quick:
        return Plan(seq_lens={1: (128, 256), 2: (256,)}, exact_max_n={1: 256, 2: 256}, landmarks=(8, 16),
                    head_dim=16, breakdown=((1, 256),), slope_range=(128, 256), thread_shape=(1, 512),
                    accuracy_landmarks=(8, 16),
                    dinov2_sizes=(), minilm_tokens=48, synthetic_n=256,
                    capture_layers={"dinov2": (11,), "minilm": (2,)}, e2e_sizes=(112,), e2e_landmarks=16,
                    gemm_size=512, copy_bytes=2**22, budget_s=0.02, smoke_run=True)
    common = dict(landmarks=(32, 64, 128, 256), head_dim=64, slope_range=(4096, 65536), thread_shape=(1, 65536),
                  accuracy_landmarks=(8, 16, 32, 64, 128, 256), dinov2_sizes=(224, 518), minilm_tokens=512,
                  synthetic_n=4096, capture_layers={"dinov2": (3, 7, 11), "minilm": (1, 3, 5)},
                  e2e_sizes=(224, 518, 1036), e2e_landmarks=64)
    if device.type == "cuda":
        return Plan(seq_lens={1: tuple(2**k for k in range(8, 19)), 12: tuple(4**k for k in range(4, 10))},
                    exact_max_n={1: 2**18, 12: 2**18}, breakdown=((1, 2**18), (12, 2**16)), gemm_size=8192,
                    copy_bytes=2**30, exact_methods=tuple(EXACT_BACKENDS), **common)
    # Exact SDPA for 12 heads costs 12 x 7.7 s per call at n = 65,536 on 2 cores: capped at 16,384 so the whole
    # suite stays under 15 minutes; one head is timed over the full range.
    return Plan(seq_lens={1: tuple(2**k for k in range(8, 17)), 12: tuple(4**k for k in range(4, 9))},
                exact_max_n={1: 2**16, 12: 2**14}, breakdown=((1, 2**16), (12, 2**14)), gemm_size=4096,
                copy_bytes=2**28, **common)


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
    commit: str | None = field(default_factory=git_commit)

    def stamp(self):
        """Where and when this run measures: see :func:`~nystrom.experiments.stamp.make_stamp`."""
        return make_stamp(self.device, self.dtype, self.commit, smoke_run=self.plan.smoke_run)

    def progress_bar(self, total, desc):
        """A section's progress bar over ``total`` steps, cleared when done; silent without ``progress``."""
        return progress_bar(total, desc, enabled=self.progress, leave=False)
