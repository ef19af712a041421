"""Memory stays linear in n: measured peak allocation, not a reading of the code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch, nystrom

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    n, d, m = int(sys.argv[1]), 64, 64
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    nystrom.approximate(Q[..., :4096, :], K[..., :4096, :], V[..., :4096, :], num_landmarks=m)  # warm-up
    # Reset the high-water mark to the current resident size (Linux clear_refs "5"), so the peak
    # measured is this call's alone and not an earlier transient of imports or input creation.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    out = nystrom.approximate(Q, K, V, num_landmarks=m, query_chunk_size=65536)
    extra = status("VmHWM") - before
    assert torch.isfinite(out).all()
    print(json.dumps({"n": n, "extra_bytes": extra}))
    """
)


def peak_extra_bytes(n):
    # A fresh process per size: ru_maxrss is a process-lifetime high-water mark.
    proc = subprocess.run([sys.executable, "-c", PROBE, str(n)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_linear_up_to_a_million_tokens():
    # n = 2^20 at d = 64: an n x n float32 buffer would be 4 TiB, an n x m one 256 MiB. The budget
    # is linear, 4 float32 words per token per (m + d) column (measured: 1.3 at both sizes); a quadratic
    # buffer at either size would exceed it > 1000x.
    small, large = 2**18, 2**20
    extra_small = peak_extra_bytes(small)
    extra_large = peak_extra_bytes(large)
    for n, extra in ((small, extra_small), (large, extra_large)):
        assert extra <= 4 * n * (64 + 64) * 4, (n, extra)
    # Growth from n to 4n: 4 for linear, 16 for quadratic; allow 6 for allocator granularity.
    assert extra_large <= 6 * max(extra_small, 1 << 20), (extra_small, extra_large)
