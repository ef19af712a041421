"""Backend-agnostic Nyström mathematics, written once against the array API.

Every function accepts numpy arrays or torch tensors (through ``array-api-compat``) and returns
the same kind; nothing here imports torch.
"""

from .bounds import (
    ErrorEstimate,
    TraceCertificate,
    best_rank_trace_floor,
    estimate_relative_error,
    nystrom_trace_error,
    rpcholesky_trace_bound,
)
from .exact import exact_attention
from .landmarks import (
    FPS,
    RANDOM_STRATEGIES,
    STRATEGIES,
    KMeans,
    Landmarks,
    Norm,
    RPCholesky,
    SegmentMeans,
    Uniform,
    get_strategy,
)
from .nystrom_attention import nystrom_attention
from .solvers import SOLVERS, NewtonSchulz, PInv, Ridge, SolveResult, get_solver, moore_penrose_residual

__all__ = [
    "FPS", "SOLVERS", "STRATEGIES", "RANDOM_STRATEGIES", "ErrorEstimate", "KMeans", "Landmarks", "NewtonSchulz",
    "Norm", "PInv", "RPCholesky", "Ridge", "SegmentMeans", "SolveResult", "TraceCertificate", "Uniform",
    "best_rank_trace_floor", "estimate_relative_error", "exact_attention", "get_solver", "get_strategy",
    "moore_penrose_residual", "nystrom_attention", "nystrom_trace_error", "rpcholesky_trace_bound",
]
