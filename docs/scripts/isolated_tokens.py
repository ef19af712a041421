"""Isolated tokens among tight clusters, the family where the error estimate missed: approximate(tol=0.1), and how
often the interval of ``Info.estimate_error`` holds the true error.

    .venv/bin/python docs/scripts/isolated_tokens.py [--coverage] [--without-unrepresented] [--without-self-attending]

Each data seed draws 1,024 tokens of dimension 32 (Q = K, two heads;
:func:`nystrom.experiments.coverage_report.isolated_tokens`): 8 tight clusters and 10 tokens of the same norm far from
them and from each other. Each isolated query attends mostly to itself, a key no landmark stands for, so its row
holds much of the squared error, and neither its norm nor its interpolation weights single it out: the 128 sampled
rows miss all ten with probability about (7/8)^10 = 0.26. The estimate of a Nyström output therefore samples the
queries the landmarks do not represent apart (:func:`nystrom.linalg.bounds.unrepresented_queries`), and the row
sample takes the queries that attend mostly to themselves apart
(:func:`nystrom.linalg.bounds.self_attending_queries`): ``--without-unrepresented`` and ``--without-self-attending``
replay everything without either.

By default: ``approximate(tol=0.1, num_landmarks=8)`` on 100 data seeds; the answers above tol, then their count.
With ``--coverage``: for ``norm``, ``uniform`` and ``fps`` landmarks at m = 8 and 16, 10 data seeds x 100 row seeds
of ``Info.estimate_error`` (128 rows): how often the interval's upper end lies below the true error, and how often the
interval misses it on either side.
"""

import argparse

import numpy as np

import nystrom
import nystrom.linalg.bounds
from nystrom.experiments.coverage_report import isolated_tokens

TOL = 0.1


def answers():
    above = []
    for seed in range(100):
        X, V = isolated_tokens(seed)
        exact = nystrom.exact_attention(X, X, V)
        out, info = nystrom.approximate(X, X, V, num_landmarks=8, tol=TOL, return_info=True)
        error = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        if error > TOL:
            last = info.tol_steps[-1]
            above.append(f"seed {seed}: m = {last.m}, bound {last.estimate.high:.3f}, true error {error:.3f}")
    print("\n".join(above))
    print(f"{len(above)} of 100 answers above tol = {TOL}")


def coverage():
    print("| landmarks | m | upper end below the true error | interval misses it |\n|---|---|---|---|")
    for strategy in ("norm", "uniform", "fps"):
        for m in (8, 16):
            below = missed = 0
            for seed in range(10):
                X, V = isolated_tokens(seed)
                exact = nystrom.exact_attention(X, X, V)
                out, info = nystrom.approximate(X, X, V, num_landmarks=m, strategy=strategy, seed=0, return_info=True)
                true = np.linalg.norm(out - exact) / np.linalg.norm(exact)
                for row_seed in range(100):
                    estimate = info.estimate_error(seed=row_seed)
                    below += estimate.high < true
                    missed += not estimate.low <= true <= estimate.high
            print(f"| {strategy} | {m} | {below / 10:.1f} % | {missed / 10:.1f} % |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coverage", action="store_true", help="the interval's coverage instead of tol's answers")
    parser.add_argument("--without-unrepresented", action="store_true",
                        help="replay without the strata of unrepresented queries")
    parser.add_argument("--without-self-attending", action="store_true",
                        help="replay without the self-attending queries taken apart")
    args = parser.parse_args()
    # The names the estimator looks up when it runs (the census reads positions_outweighed of its own logits).
    if args.without_unrepresented:
        nystrom.linalg.bounds.positions_outweighed = lambda gaps, *args, **kwargs: np.empty(0, dtype=np.int64)
    if args.without_self_attending:
        nystrom.linalg.bounds.self_attending_queries = lambda xp, Q, K, positions, *args, **kwargs: positions[:0]
    coverage() if args.coverage else answers()


if __name__ == "__main__":
    main()
