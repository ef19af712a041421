"""``torch.autocast`` and the library: Nyström attention runs as SDPA would under autocast, with its own precision.

Under ``torch.autocast`` every matrix product runs in the autocast dtype (bfloat16 on CPU by default), the
library's float32 sections included: the solve and the product :math:`A^+ (B V)`, which the library keeps in
float32 for half-precision inputs (docs' reliability page). A review measured a relative error of 1.07 at
:math:`m = n` with ``solver="pinv"`` under CPU bfloat16 autocast, against 1.8e-3 for SDPA under the same
autocast. So the library's entry points take their inputs as autocast gives them to SDPA (float32 and half
precision cast to the autocast dtype, float64 left as it is) and turn autocast off for their own computation,
which then follows its half-precision rules.
"""

from __future__ import annotations

import torch

# The dtypes autocast casts for an op that runs in lower precision (SDPA); float64 is left as it is.
_CAST_BY_AUTOCAST = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device):
    """The dtype ``torch.autocast`` runs SDPA in on ``device``'s type now, or ``None`` when autocast is off there."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def without_autocast(device):
    """A context in which autocast is off for ``device``'s type (the library's computation, whatever the caller's
    autocast)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def autocast_cast(x, dtype):
    """``x`` as autocast casts an input of an op it runs in ``dtype``: float32 and half-precision tensors to ``dtype``,
    anything else (float64, integers, ``None``) as it is."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in _CAST_BY_AUTOCAST else x


def as_sdpa_under_autocast(function, Q, K, V, *args, **kwargs):
    """``function(Q, K, V, *args, **kwargs)``, with ``Q``, ``K`` and ``V`` in the dtype autocast would give SDPA and
    autocast off inside; a plain call when autocast is off for ``Q``'s device."""
    dtype = autocast_dtype(Q.device)
    if dtype is None:
        return function(Q, K, V, *args, **kwargs)
    with without_autocast(Q.device):
        return function(autocast_cast(Q, dtype), autocast_cast(K, dtype), autocast_cast(V, dtype), *args, **kwargs)
