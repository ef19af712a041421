"""Host draws reach a CUDA device without waiting for it: an entry of
:data:`nystrom.linalg.landmarks.base.HOST_COPIES`, registered on import.

``torch.asarray(numpy_array, device="cuda")`` copies from pageable host memory, and such a copy returns only
once the device has caught up with every kernel queued before it: the seeded draws of ``uniform`` and
``rpcholesky`` made every call wait for the work before it (``torch.cuda.set_sync_debug_mode("error")`` raises
there; found on an H200). Staged in page-locked memory, the copy is queued on the current stream like a kernel. The
staging buffer comes from PyTorch's caching host allocator, which records the copy and does not hand the buffer
out again before the copy has run, so it can be let go at once.
"""

from __future__ import annotations

import torch

from ..linalg.landmarks.base import HOST_COPIES


def to_device(values, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """The numpy array ``values`` as a tensor of ``dtype`` (``None``: the array's own) on ``device``; on CUDA, a
    copy queued on the current stream from page-locked memory, which does not wait for the device."""
    host = torch.asarray(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    if torch.backends.cuda.is_built() and torch.cuda.is_current_stream_capturing():
        # A graph records the copy from this staging buffer, not the draw: every replay would copy the buffer again,
        # after the allocator may have handed it out for something else (indices read from it could fall outside
        # the sequence). Loud here, rather than the capture's own error or stale draws.
        raise RuntimeError(
            "a seeded strategy ('uniform', 'rpcholesky') draws on the host and cannot be captured in a CUDA graph: "
            "a replay would not draw again. Capture a deterministic strategy ('norm', 'kmeans', 'fps', "
            "'segment_means') or landmarks chosen before the capture.")
    # empty(pin_memory=True) and copy_ rather than Tensor.pin_memory(), which FakeTensorMode does not implement.
    staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)
    return staged.to(device, non_blocking=True)


class QueuedCopy:
    """The torch entry of :data:`~nystrom.linalg.landmarks.base.HOST_COPIES`: CUDA tensors."""

    @staticmethod
    def handles(like) -> bool:
        """Whether ``like`` is a CUDA tensor."""
        return isinstance(like, torch.Tensor) and like.device.type == "cuda"

    @staticmethod
    def copy(values, dtype, like):
        """:func:`to_device` onto ``like``'s device (``dtype`` ``None`` keeps ``values``'s)."""
        return to_device(values, dtype, like.device)


HOST_COPIES.append(QueuedCopy)
