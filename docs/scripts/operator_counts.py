"""Operators one ``approximate`` call launches on a CUDA device, per strategy, counted on a CPU-only machine.

``python docs/scripts/operator_counts.py [M ...]`` (default m = 64) runs ``approximate(..., check_values=False)`` on
fake bfloat16 CUDA tensors of shape (1, 12, 65,536, 64) under ``FakeTensorMode`` and counts every operator that
would launch work on the device (views and metadata queries left out; ``tests/torch/fake_cuda.py``). On an H200 an
eager call cost 8–13 µs per operator for the selection-bound strategies, whatever n was, so the count predicts the
eager time there; the GPU section of ``docs/benchmarks.md`` quotes this script's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nystrom

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "torch"))
from fake_cuda import Launches, cuda_guard  # noqa: E402

SHAPE = (1, 12, 65536, 64)


def count(strategy, m):
    """Operators of one call at :data:`SHAPE`, m landmarks, on fake CUDA tensors."""
    with FakeTensorMode():
        Q, K, V = (torch.empty(SHAPE, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with Launches() as launches:
            nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=m, seed=0, check_values=False)
    return launches.count


def main(argv):
    landmarks = [int(m) for m in argv] or [64]
    print(f"operators launched by approximate(check_values=False) at {SHAPE}, bfloat16, fake CUDA")
    print("| strategy | " + " | ".join(f"m = {m}" for m in landmarks) + " |")
    print("|---|" + "---|" * len(landmarks))
    with cuda_guard():
        for strategy in sorted(nystrom.STRATEGIES):
            print(f"| `{strategy}` | " + " | ".join(f"{count(strategy, m):,}" for m in landmarks) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
