"""Hypothesis runs derandomized by default, so a CI run and a local run try the same examples and a failure
reproduces; ``pytest --hypothesis-profile=explore`` draws fresh examples, as for a search for new failures.

Every test run on the ``"cuda"`` device (a parameter id) carries the ``cuda`` marker, like the tests marked by
hand, so ``pytest -m cuda`` (``benchmarks/gpu.py``) selects the whole CUDA part of the suite."""

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        # Compared as strings: `in` would compare "cuda" with array parameters, whose truth value is ambiguous.
        if callspec is not None and any(isinstance(v, str) and v == "cuda" for v in callspec.params.values()):
            item.add_marker(pytest.mark.cuda)
