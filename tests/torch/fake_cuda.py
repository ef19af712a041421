"""Fake CUDA tensors on a CPU-only torch, and a count of the operators a call launches on the device.

:func:`cuda_guard` lets ``FakeTensorMode`` make and index ``device="cuda"`` tensors where torch was built without
CUDA (``tests/torch/test_device.py`` runs the whole GPU path under it); :class:`Launches` counts the operators that
would launch work on the device, which ``docs/scripts/operator_counts.py`` reports per strategy: on an H200 an
eager call cost about 10 us per operator whatever n was (``docs/benchmarks.md``, GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA, META = 1, 14  # c10::DeviceType


@contextlib.contextmanager
def cuda_guard():
    """Let fake CUDA tensors be indexed on a torch built without CUDA.

    ``Tensor.__getitem__`` opens a device guard for its tensor's device in C++ (``THPVariable_getitem``), below any
    mode. A CUDA build without a device gets a no-op CUDA guard from ``FakeTensorMode`` itself
    (``torch._C._ensureCUDADeviceGuardSet``), but a CPU-only build has no CUDA guard to replace, and that call leaves
    it absent: indexing raises "PyTorch is not linked with support for cuda devices". This registers the meta
    device's guard, a no-op, as the CUDA one (through c10's exported ``registerDeviceGuard``) and unregisters it on
    exit. Nothing else changes: CUDA calls outside a fake mode still fail as before.

    Raises
    ------
    OSError, AttributeError, ValueError
        When this torch build does not export the registry (the caller decides whether to skip).
    """
    if torch.cuda._is_compiled():
        yield  # a CUDA build: FakeTensorMode installs its own guard when no device is present
        return
    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    slots = (ctypes.c_void_p * (META + 1)).in_dll(c10, "_ZN3c104impl26device_guard_impl_registryE")
    register = c10._ZN3c104impl19registerDeviceGuardENS_10DeviceTypeEPKNS0_24DeviceGuardImplInterfaceE
    register.argtypes, register.restype = [ctypes.c_int8, ctypes.c_void_p], None
    assert slots[CUDA] is None, "a CPU-only build has no CUDA device guard"
    register(CUDA, slots[META])
    try:
        yield
    finally:
        register(CUDA, None)


class Launches(TorchDispatchMode):
    """Counts the operators that launch work on the device: every one but views and metadata queries
    (``_unsafe_view``, the reshape after a batched product, is a view that is not marked as one)."""

    METADATA = (torch.ops.aten.detach.default, torch.ops.aten._unsafe_view.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func.namespace == "prim" or func in self.METADATA)
        return func(*args, **(kwargs or {}))
