"""How exact Nyström attention is with every token a landmark and a pseudo-inverse: the rounding of A^+.

    .venv/bin/python docs/scripts/pinv_at_full_rank.py

With m = n (self-attention) the formula gives F A^+ B V = A A^+ A V = A V exactly, but it is evaluated as
F (A^+ (B V)), and the singular values of A that the cut-off keeps amplify the rounding of B V and of F by up to
1 / (rtol sigma_max). Prints the relative error against float64 SDPA for several cut-offs, on well-conditioned
Gaussian tokens and on numerically low-rank kernels (head size 1, or logits near 0). Seconds on one core.
"""

import torch
import torch.nn.functional as F

import nystrom
from nystrom import PInv

CUTOFFS = (None, 0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3)


def cases():
    """``{name: (Q, K, V)}``."""
    def draw(seed, shapes, dtype, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        return tuple(scale * torch.randn(shape, generator=g, dtype=dtype) for shape in shapes)

    gaussian = ((1, 2, 256, 16),) * 3
    return {
        "Gaussian (1, 2, 256, 16), float64": draw(2, gaussian, torch.float64),
        "Gaussian (1, 2, 256, 16), float32": draw(2, gaussian, torch.float32),
        "head size 1, n = 10, float64": draw(3, ((10, 1), (10, 1), (10, 8)), torch.float64),
        "logits near 0 (entries 0.1, d = 64), float32": draw(0, ((1, 4, 128, 64),) * 3, torch.float32, 0.1),
        # The worst draws of a review's sweep (d of 1, 4, 16; n of 10 to 128; entries 0.1 to 3; five seeds each).
        "head size 1, n = 10, float32": draw(1, ((1, 2, 10, 1),) * 2 + ((1, 2, 10, 8),), torch.float32),
        "logits near 0 (entries 0.1, d = 4, n = 10), float32": draw(2, ((1, 2, 10, 4),) * 3, torch.float32, 0.1),
        "logits near 0 (entries 0.1, d = 4, n = 10), float16": draw(3, ((1, 2, 10, 4),) * 3, torch.float16, 0.1),
        "logits near 0 (entries 0.1, d = 4, n = 10), bfloat16": draw(3, ((1, 2, 10, 4),) * 3, torch.bfloat16, 0.1),
    }


def main():
    torch.set_num_threads(1)
    print("case | SDPA in the dtype | " + " | ".join(f"rtol={r}" for r in CUTOFFS))
    for name, (Q, K, V) in cases().items():
        exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double())

        def error(out):
            return float((out.double() - exact).norm() / exact.norm())

        row = [error(F.scaled_dot_product_attention(Q, K, V))]
        for rtol in CUTOFFS:
            row.append(error(nystrom.approximate(Q, K, V, num_landmarks=K.shape[-2], solver=PInv(rtol=rtol),
                                                 strategy="uniform", seed=0)))
        print(name + " | " + " | ".join(f"{x:.1e}" for x in row))


if __name__ == "__main__":
    main()
