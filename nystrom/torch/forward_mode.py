"""Forward-mode automatic differentiation (``torch.func.jvp``, ``torch.autograd.forward_ad``) and the array-API
core: a dual tensor does not require grad, so the core asks :func:`nystrom.linalg.numerics.carries_derivatives`,
through the check registered here, before it drops a derivative term.

On the CPU, PyTorch's fused SDPA kernel (flash attention) has no forward mode: ``torch.func.jvp`` through
``nystrom.approximate`` raises ``NotImplementedError`` there, as it does through ``scaled_dot_product_attention``
itself. Run it under ``torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)``, SDPA's math backend,
which the library's forward-mode tests use (tangents equal to central differences)."""

from __future__ import annotations

import torch

from ..linalg.numerics import TANGENTS


def has_tangent(a) -> bool:
    """Whether ``a`` is a tensor with a forward-mode tangent at the current dual level (never while ``torch.compile``
    traces: forward mode does not compile)."""
    return (isinstance(a, torch.Tensor) and not torch.compiler.is_compiling()
            and torch.autograd.forward_ad.unpack_dual(a).tangent is not None)


TANGENTS.append(has_tangent)
