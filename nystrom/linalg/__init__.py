"""Backend-agnostic Nyström mathematics, written once against the array API.

Every function accepts numpy arrays or torch tensors (through ``array-api-compat``) and returns
the same kind; nothing here imports torch.
"""

from .attention import exact_attention, landmark_kernel, nystrom_attention
from .bounds import (
    ErrorEstimate,
    TraceCertificate,
    best_rank_trace_floor,
    estimate_relative_error,
    nystrom_trace_error,
    rpcholesky_trace_bound,
)
from .landmarks import (
    FPS,
    RANDOM_STRATEGIES,
    STRATEGIES,
    KMeans,
    Landmarks,
    Norm,
    RPCholesky,
    SegmentMeans,
    Strategy,
    Uniform,
    get_strategy,
)
from .solvers import SOLVERS, NewtonSchulz, PInv, Ridge, Solver, SolveResult, get_solver, moore_penrose_residual

__all__ = [
    "FPS", "RANDOM_STRATEGIES", "SOLVERS", "STRATEGIES", "ErrorEstimate", "KMeans", "Landmarks", "NewtonSchulz",
    "Norm", "PInv", "RPCholesky", "Ridge", "SegmentMeans", "SolveResult", "Solver", "Strategy", "TraceCertificate",
    "Uniform", "best_rank_trace_floor", "estimate_relative_error", "exact_attention", "get_solver", "get_strategy",
    "landmark_kernel", "moore_penrose_residual", "nystrom_attention", "nystrom_trace_error", "rpcholesky_trace_bound",
]
