"""Hypothesis runs derandomized by default, so a CI run and a local run try the same examples and a failure
reproduces; ``pytest --hypothesis-profile=explore`` draws fresh examples, as for a search for new failures.

Every test run on the ``"cuda"`` device (a parameter id) carries the ``cuda`` marker, like the tests marked by
hand, so ``pytest -m cuda`` (``benchmarks/gpu.py``) selects the whole CUDA part of the suite."""

import os

import pytest
from hypothesis import settings

# pytest-xdist workers share the cores: each gets its share for BLAS and torch's intra-op threads, but at least two, so
# that the paths that depend on the thread count (sdpa_attend's key blocks, split where there are fewer tasks than
# threads) run as on a user's multi-core machine; and idle threads sleep instead of spinning. Set before torch or numpy
# loads (no plugin imports them; a run that collects benchmarks/ too loads torch first, from its conftest, and keeps
# torch's defaults). Two workers of two spinning threads each on the 2-core CI machine waited on each
# other's cores: the suite took 227 s, a test of small searches 26.8 s against 1.1 s alone (2026-12-03).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    # The cores this process may run on: a container's CPU set can be smaller than the machine's count.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_variable, str(max(2, _cores // _workers)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        # Compared as strings: `in` would compare "cuda" with array parameters, whose truth value is ambiguous.
        if callspec is not None and any(isinstance(v, str) and v == "cuda" for v in callspec.params.values()):
            item.add_marker(pytest.mark.cuda)
