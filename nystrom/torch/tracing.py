"""``torch.compile`` as a compiler of :data:`nystrom.linalg.numerics.COMPILERS`, registered on import.

While ``torch.compile`` traces, the host fast paths of selection (numpy on a view of a CPU tensor) give way to the
array-API paths, which it can trace. The random strategies draw on the host with numpy, so that one seed gives the
same landmarks for numpy and torch inputs on every device; numpy's generators cannot enter a graph (Dynamo has no
rule for ``numpy.random.default_rng``: a graph break). Wrapped in a custom operator, ``nystrom::host_draws``, a draw
is one call of the graph that runs on every call of the compiled function, so ``seed=None`` still draws afresh, and
its fake implementation gives the tracer the shape, dtype and device without drawing.
"""

from __future__ import annotations

import importlib

import torch
from torch._subclasses.fake_tensor import is_fake

from ..linalg.numerics import COMPILERS
from .transfer import to_device


@torch.library.custom_op("nystrom::host_draws", mutates_args=())
def _host_draws(draw: str, seed: int | None, shape: list[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    module, name = draw.split(":")
    values = getattr(importlib.import_module(module), name)(seed, tuple(shape))
    return to_device(values, dtype, device)


@_host_draws.register_fake
def _(draw, seed, shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


class TorchCompile:
    """The hooks of ``torch.compile`` (see :data:`~nystrom.linalg.numerics.COMPILERS`)."""

    @staticmethod
    def tracing(a) -> bool:
        """Whether ``a`` is a tensor and ``torch.compile`` is tracing (Dynamo evaluates this to True in a trace)."""
        return isinstance(a, torch.Tensor) and torch.compiler.is_compiling()

    @staticmethod
    def holds_no_data(a) -> bool:
        """Whether ``a`` is a fake tensor (``FakeTensorMode``): on the CPU the host paths read whatever memory its
        pointer named, or failed on a host read (a review)."""
        return isinstance(a, torch.Tensor) and is_fake(a)

    @staticmethod
    def host_draws(draw, seed, shape, dtype, like):
        """``draw(seed, shape)`` as a tensor of ``dtype`` on ``like``'s device, by the ``nystrom::host_draws``
        operator."""
        # The operator names ``draw`` by module and name: a graph holds strings, not Python functions.
        return _host_draws(f"{draw.__module__}:{draw.__name__}", seed, list(shape), dtype, like.device)


COMPILERS.append(TorchCompile)
