"""Whether strata in another order than the sequence's rescue the interval on the sharp-cluster family.

    .venv/bin/python docs/scripts/coverage_strata_orders.py

The family is the one where the row-sample interval of ``estimate_relative_error`` under-covers (sharp clusters
with ``norm`` landmarks, m = 16; ``python -m nystrom.experiments.coverage_report``). Each order sorts the 1,024
query positions by a quantity a call could compute for every row, and the replay draws one row per contiguous
stratum of that order (the library's sampler and interval, :func:`~nystrom.linalg.bounds.ratio_interval`), for
1,000 seeds at s = 64, 128 and 256 rows. The quantities, summed over the two heads: the entropy of the query's
attention over the weighted landmark keys, its largest logit there, its distance to the nearest landmark query
(each one n x m product), the approximate output's squared norm, its distance to a second approximation with half
or twice the landmarks (half a call or two more), the squared norm of its interpolation weights F_i A^+
(``Info.interpolation_weights``, an n x m product more), and, as an oracle no call has, the row's true squared
error. It
prints each order's coverage of a nominal 95 % interval and the Spearman correlation of the quantity with the row
error, then how far the true error lies above the interval's upper end when it does.
"""

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.coverage_report import CONFIDENCE, synthetic_inputs
from nystrom.linalg.bounds import ratio_interval, stratified_rows


def intervals(e, o, order, num_samples, replications=1000):
    """``(low, high)`` of the squared-error ratio's interval, one row per seed, when the strata follow ``order``
    (positions sorted by some quantity)."""
    bounds = []
    for seed in range(replications):
        rows, sizes = stratified_rows(order, num_samples, np.random.default_rng(seed))
        bounds.append(ratio_interval(e[rows], o[rows], sizes, CONFIDENCE)[1:])
    return np.array(bounds)


def replay(e, o, order, num_samples):
    """Coverage of the interval when the strata follow ``order``."""
    truth = e.sum() / o.sum()
    low, high = intervals(e, o, order, num_samples).T
    return np.mean((low <= truth) & (truth <= high))


def distance_to(out, Q, K, V, m):
    """Each row's squared distance to the ``norm`` approximation with ``m`` landmarks, summed over the heads."""
    other = nystrom.approximate(Q, K, V, strategy="norm", num_landmarks=m, seed=0)
    return ((out - other) ** 2).sum(-1).sum((0, 1)).numpy()


def main():
    torch.set_num_threads(1)
    Q, K, V, m = synthetic_inputs()["sharp clusters"]
    out, info = nystrom.approximate(Q, K, V, strategy="norm", num_landmarks=m, seed=0, return_info=True)
    exact = F.scaled_dot_product_attention(Q, K, V)
    e = ((out - exact) ** 2).sum(-1).sum((0, 1)).numpy()
    o = (exact**2).sum(-1).sum((0, 1)).numpy()
    landmarks = info.landmarks
    logits = Q.shape[-1] ** -0.5 * Q @ landmarks.keys.transpose(-1, -2) + landmarks.log_weights[..., None, :]
    p = torch.softmax(logits, dim=-1)
    quantities = {
        "sequence position": np.arange(e.size),
        "entropy over the landmark keys": -(p * torch.log(p)).sum(-1).sum((0, 1)).numpy(),
        "largest logit over the landmark keys": logits.amax(-1).sum((0, 1)).numpy(),
        "distance to the nearest landmark query": torch.cdist(Q, landmarks.queries).amin(-1).sum((0, 1)).numpy(),
        "approximate output's squared norm": (out**2).sum(-1).sum((0, 1)).numpy(),
        "distance to a second approximation at m/2": distance_to(out, Q, K, V, m // 2),
        "distance to a second approximation at 2m": distance_to(out, Q, K, V, 2 * m),
        "interpolation weights' squared norm": info.interpolation_weights(),
        "true squared row error (oracle)": e,
    }
    print(f"true error {np.sqrt(e.sum() / o.sum()):.4f}; coverage of a nominal {CONFIDENCE:.0%} interval")
    print("| strata in order of | Spearman with row error | s = 64 | s = 128 | s = 256 |\n|---|---|---|---|---|")
    for name, x in quantities.items():
        rho = scipy.stats.spearmanr(x, e)[0]
        order = np.argsort(x, kind="stable")
        print(f"| {name} | {rho:.2f} | " + " | ".join(f"{replay(e, o, order, s):.1%}" for s in (64, 128, 256)) + " |")
    # How far the misses fall: the true error over the interval's upper end, in sequence order at s = 128.
    truth = e.sum() / o.sum()
    over = np.sqrt(truth / intervals(e, o, np.arange(e.size), 128)[:, 1])
    print("s = 128, sequence order: the true error is at most f times the upper end in "
          + ", ".join(f"{np.mean(over <= f):.1%} (f = {f})" for f in (1.0, 1.1, 1.2, 1.3)) + " of samples")
    ranks = scipy.stats.rankdata(-quantities["interpolation weights' squared norm"])[np.argsort(-e)[:10]]
    print(f"the ten largest row errors ({e[np.argsort(-e)[:10]].sum() / e.sum():.0%} of the squared error) rank "
          f"{', '.join(str(int(r)) for r in ranks)} by their interpolation weights' squared norm")


if __name__ == "__main__":
    main()
