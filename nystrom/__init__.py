"""Nyström approximations of softmax attention and training-free Fast Nyström Attention (FNA).

The public API is small: :func:`approximate` and :func:`exact_attention`, the landmark strategies
and pseudo-inverse solvers (as objects and by name, in :data:`STRATEGIES` and :data:`SOLVERS`), and the
error bounds. The torch backend and the model tools live in :mod:`nystrom.torch`.
"""

from .approximation import Info, approximate, estimate_relative_error, exact_attention
from .linalg.bounds import (
    ErrorEstimate,
    TraceCertificate,
    best_rank_trace_floor,
    nystrom_trace_error,
    rpcholesky_trace_bound,
)
from .linalg.landmarks import (
    FNA_AUTHORS,
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
from .linalg.solvers import SOLVERS, NewtonSchulz, PInv, Ridge, Solver, SolveResult, get_solver

__version__ = "0.1.0"

_MODEL_TOOLS = {"fna": "patching", "patch": "patching", "mask_keys": "masking", "capture_attention": "capture"}


def __getattr__(name):
    # ``nystrom.fna(model, ...)`` and friends live in the torch backend; importing it on first use keeps
    # ``import nystrom`` free of torch for users of the math alone.
    if name in _MODEL_TOOLS:
        import importlib

        return getattr(importlib.import_module(f".torch.{_MODEL_TOOLS[name]}", __name__), name)
    raise AttributeError(f"module 'nystrom' has no attribute {name!r}")


__all__ = [
    "FNA_AUTHORS", "FPS", "RANDOM_STRATEGIES", "SOLVERS", "STRATEGIES", "ErrorEstimate", "Info", "KMeans", "Landmarks",
    "NewtonSchulz", "Norm", "PInv", "RPCholesky", "Ridge", "SegmentMeans", "SolveResult", "Solver", "Strategy",
    "TraceCertificate", "Uniform", "approximate", "best_rank_trace_floor", "capture_attention",
    "estimate_relative_error", "exact_attention", "fna", "get_solver", "get_strategy", "mask_keys",
    "nystrom_trace_error", "patch", "rpcholesky_trace_bound",
]
