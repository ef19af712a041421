"""Seeded host draws as one opaque operator in ``torch.compile``'s graphs.

The random strategies draw on the host with numpy, so that one seed gives the same landmarks for numpy and torch
inputs on every device (:func:`nystrom.linalg.landmarks.base.host_draws`). numpy's generators cannot enter a graph
(Dynamo has no rule for ``numpy.random.default_rng``, a graph break); wrapped in a custom operator, the draw is one
call of the graph that runs on every call of the compiled function, so ``seed=None`` still draws afresh, and its
fake implementation tells the tracer the shape, dtype and device without drawing.
"""

from __future__ import annotations

import importlib

import torch


@torch.library.custom_op("nystrom::host_draws", mutates_args=())
def _host_draws(draw: str, seed: int | None, shape: list[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    module, name = draw.split(":")
    values = getattr(importlib.import_module(module), name)(seed, tuple(shape))
    return torch.asarray(values, dtype=dtype, device=device)


@_host_draws.register_fake
def _(draw, seed, shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def traced_host_draws(draw, seed, shape, dtype, device):
    """``draw(seed, shape)``, a module-level numpy function of the seed and the shape alone, as a tensor of ``dtype``
    on ``device``, through the ``nystrom::host_draws`` operator (which names ``draw`` by module and name)."""
    return _host_draws(f"{draw.__module__}:{draw.__name__}", seed, list(shape), dtype, device)
