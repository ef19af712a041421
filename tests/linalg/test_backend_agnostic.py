"""``nystrom.linalg`` is array-API code: importing it and running it on numpy must not import torch."""

import subprocess
import sys
import textwrap


def test_linalg_runs_on_numpy_without_importing_torch():
    probe = textwrap.dedent(
        """
        import sys
        import numpy as np
        import nystrom
        rng = np.random.default_rng(0)
        Q, K, V = (rng.standard_normal((2, 40, 8)) for _ in range(3))
        for s in nystrom.STRATEGIES:
            nystrom.approximate(Q, K, V, strategy=s, num_landmarks=8, seed=0)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
