"""Fixtures of the torch tests."""

import pytest
from fake_cuda import cuda_guard  # pytest's rootdir-relative imports put this directory on sys.path


@pytest.fixture(scope="module")
def fake_cuda():
    """:func:`fake_cuda.cuda_guard` for a module's tests, skipped where this torch build cannot register it."""
    try:
        guard = cuda_guard()
        guard.__enter__()
    except (OSError, AttributeError, ValueError) as error:
        pytest.skip(f"cannot register a CUDA device guard in this torch build: {error}")
    try:
        yield
    finally:
        guard.__exit__(None, None, None)
