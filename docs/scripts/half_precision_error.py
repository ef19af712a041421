"""The half-precision table of docs/reliability.md: the error of float32, float16 and bfloat16 arithmetic.

    .venv/bin/python docs/scripts/half_precision_error.py

The inputs and reference of ``tests/test_reliability.py::test_low_precision_error_within_documented_bound``
(imported from it, so the table shows what the test checks): (1, 4, 256, 64) inputs scaled so that
max |q.k| / sqrt(d) is the logit scale, m = 32, ``norm`` and the default solver; the relative Frobenius error
against float64 arithmetic on the same rounded inputs, next to the documented bound; the half formats' error by
landmark rule at logit scale 5; apart from the arithmetic, how much rounding the inputs to bfloat16 moves the
approximation itself (both in float64); and the largest error over the documented bound across 12 seeds of the
inputs, with and without a key mask (200 of the 256 keys real), per solver and logit scale: the smooth filters of the
default Newton-Schulz steps and of ``Ridge()`` against the cut-off of ``PInv(rtol=3e-2)``.
"""

import pathlib
import sys

import torch

import nystrom

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from test_reliability import BOUND, scaled_qkv  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def main():
    torch.set_num_threads(1)
    print("| max logit | float32 | float16 | bfloat16 |\n|---|---|---|---|")
    for logit_max in (5.0, 20.0, 50.0):
        row = []
        for dtype in DTYPES:
            Q, K, V = scaled_qkv(logit_max)
            out = nystrom.approximate(Q.to(dtype), K.to(dtype), V.to(dtype), num_landmarks=32)
            ref = nystrom.approximate(*(x.to(dtype).double() for x in (Q, K, V)), num_landmarks=32)
            row.append(f"{float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref)):.1e}")
        print(f"| {logit_max:g} | " + " | ".join(row) + " |")
    print("| bound | " + " | ".join(f"{BOUND[dtype]:.1e}" for dtype in DTYPES) + " |")
    print("eps/2: " + ", ".join(f"{torch.finfo(dtype).eps / 2:.1e}" for dtype in DTYPES))
    # Cluster means are rounded to the inputs' dtype; rules that pick tokens use landmarks the dtype holds exactly.
    Q, K, V = scaled_qkv(5.0)
    for strategy in ("norm", "kmeans", "fps", "uniform"):
        errors = []
        for dtype in DTYPES[1:]:
            out = nystrom.approximate(Q.to(dtype), K.to(dtype), V.to(dtype), num_landmarks=32, strategy=strategy,
                                      seed=0)
            ref = nystrom.approximate(*(x.to(dtype).double() for x in (Q, K, V)), num_landmarks=32,
                                      strategy=strategy, seed=0)
            errors.append(f"{float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref)):.1e}")
        print(f"logit scale 5, {strategy}: float16 {errors[0]}, bfloat16 {errors[1]}")
    Q, K, V = scaled_qkv(5.0)
    exact_inputs = nystrom.approximate(Q, K, V, num_landmarks=32)
    rounded_inputs = nystrom.approximate(*(x.to(torch.bfloat16).double() for x in (Q, K, V)), num_landmarks=32)
    change = torch.linalg.norm(rounded_inputs - exact_inputs) / torch.linalg.norm(exact_inputs)
    print(f"inputs rounded to bfloat16, logit scale 5: the float64 approximation moves by {float(change):.2g}")
    print("| solver | max logit | largest error / bound (seed, dtype, key mask) |\n|---|---|---|")
    real = torch.arange(256) < 200
    for solver in (nystrom.NewtonSchulz(), nystrom.Ridge(), nystrom.PInv(rtol=3e-2)):
        for logit_max in (5.0, 20.0, 50.0, 100.0):
            worst = (0.0, None)
            for seed in range(12):
                Q, K, V = scaled_qkv(logit_max, seed=seed)
                for mask in (None, real):
                    rows = slice(None) if mask is None else slice(0, 200)
                    for dtype in DTYPES:
                        rounded = [x.to(dtype).double() for x in (Q, K, V)]
                        out = nystrom.approximate(*(x.to(dtype) for x in rounded), num_landmarks=32, solver=solver,
                                                  attn_mask=mask)[..., rows, :].double()
                        ref = nystrom.approximate(*rounded, num_landmarks=32, solver=solver,
                                                  attn_mask=mask)[..., rows, :]
                        ratio = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)) / BOUND[dtype]
                        worst = max(worst, (ratio, (seed, str(dtype).removeprefix("torch."), mask is not None)),
                                    key=lambda w: w[0])
            print(f"| {solver!r} | {logit_max:g} | {worst[0]:.2f} {worst[1]} |")


if __name__ == "__main__":
    main()
