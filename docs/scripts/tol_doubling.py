"""The data behind the doubling of ``tol=``: how fast its bound falls, and what each of its steps costs.

    .venv/bin/python docs/scripts/tol_doubling.py

1. **Falls.** On 60 doubling curves (every layer of the bundled DINOv2-S at 518 px for images astronaut, coffee and
   rocket, from m = 16 to the half-cost m = 128; smooth, clustered and Gaussian tokens of the tests and tokens along
   a smooth curve, 6 seeds each, from m = 8), the 95 % upper bound of the error at every m of the doubling (the
   search's own row sample), and for every step i >= 1 and later step j the fall per doubling from i to j over the
   fall of the doubling before i, ``(high_i / high_j) ** (1 / (j - i)) / max(high_{i-1} / high_i, 1)``. The search
   gives up once ``tol`` is out of reach by the largest m assuming at most ``FASTEST_FALL`` times the last fall
   (``nystrom.linalg.tolerance.out_of_reach``); prints the largest ratios, to the last m and to any m, and,
   replaying the rule on each family's curves at tol = 0.05, 0.1 and 0.2, how many searches give up and how many
   of those had a later bound within tol (an exact answer where the doubling would have found a Nyström one), for
   ``FASTEST_FALL`` and larger values.
2. **Step costs.** One thread, DINOv2-S layer 3 of astronaut (1, 6, 1370, 64), best of 10 each: at each m of the
   doubling one ``approximate`` call and one step of the search (landmark selection, ``nystrom_factors`` and the
   output at the 128 sampled rows, as ``approximate(tol=...)`` runs it); exact SDPA; the 128 exact rows of the
   estimate.
"""

import functools
import sys
import warnings
from pathlib import Path

import array_api_compat
import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.timing import best_time
from nystrom.experiments.tol_report import layer_cases
from nystrom.linalg.attention import nystrom_factors, nystrom_output
from nystrom.linalg.bounds import sample_rows
from nystrom.linalg.landmarks.base import Selection, get_strategy, run_strategy
from nystrom.linalg.solvers import get_solver, unchecked
from nystrom.linalg.tolerance import FASTEST_FALL, SAMPLED_ROWS, nystrom_pays, out_of_reach, search_range
from nystrom.torch.attention import sdpa_attend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_tolerance import clustered_tokens, smooth_tokens  # noqa: E402


def bounds(Q, K, V, scale, first):
    """The upper bounds at every m of the doubling up to the half-cost m, with a ``tol`` no m reaches and that m as
    the budget (so that the search neither gives up nor answers with exact attention)."""
    n_q, n, d, d_v = Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1]
    solver = nystrom.NewtonSchulz()
    top, _ = search_range(first, n, n_q, None, nystrom_pays(n_q, n, d, d_v), solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = nystrom.approximate(Q, K, V, num_landmarks=first, tol=1e-9, max_landmarks=top, scale=scale,
                                      return_info=True)
    doubling = [step for step in info.tol_steps if step.solver == solver]
    # Escalated steps and the returned one listed again come after the doubling, which only grows m.
    count = next((i for i in range(1, len(doubling)) if doubling[i].m <= doubling[i - 1].m), len(doubling))
    return [step.estimate.high for step in doubling[:count]]


def curve_tokens(seed, n=600, d=32, width=64):
    """Tokens along a smooth one-dimensional curve (a review's family, where a doubling fell 6.8 times faster than
    the one before it): cosines of random frequencies of the position, projected to Q, K and V."""
    rng = np.random.default_rng(seed)
    side = np.linspace(0, 1, n)[:, None]
    X = np.cos(side * (3 * rng.standard_normal((1, width))) * 5 + rng.uniform(0, 6.3, width))
    return tuple(X @ rng.standard_normal((width, d)) / 2 for _ in range(3))


def curves():
    """``(name, bounds)`` of every curve of part 1."""
    for i, (_, Q, K, V, scale, _, _, _) in enumerate(layer_cases(models=("dinov2",))):
        yield f"DINOv2-S image {i // 12} layer {i % 12}", bounds(Q, K, V, scale, 16)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        yield f"smooth {seed}", bounds(*smooth_tokens(seed), None, 8)
        yield f"clustered {seed}", bounds(*clustered_tokens(seed), None, 8)
        yield f"Gaussian {seed}", bounds(*(rng.standard_normal((1, 4, 1024, 32)) for _ in range(3)), None, 8)
        yield f"curve {seed}", bounds(*curve_tokens(seed), None, 8)


def replay(high, tol, fastest_fall=FASTEST_FALL):
    """``(gave up, a later bound within tol)`` for the search along one curve (``high`` up to the largest m)."""
    for i in range(1, len(high) - 1):
        if high[i - 1] <= tol or high[i] <= tol:
            return False, False
        if out_of_reach(high[i], high[i - 1], 2**i, 2 ** (len(high) - 1), tol, fastest_fall):
            return True, any(h <= tol for h in high[i + 1:])
    return False, False


def falls(high):
    """``(ratio, i, j)`` for every step i >= 1 and later step j of one curve."""
    return [((high[i] / high[j]) ** (1 / (j - i)) / max(high[i - 1] / high[i], 1.0), i, j)
            for i in range(1, len(high)) for j in range(i + 1, len(high))]


def search_step(Q, K, V, scale):
    """``step(m)``: one step of ``approximate(tol=...)``'s search on self-attention inputs without padding (landmark
    selection, ``nystrom_factors``, the output at the 128 sampled rows), as the search runs it."""
    xp = array_api_compat.array_namespace(Q)
    attend = functools.partial(sdpa_attend, scale=scale)
    rows = sample_rows(xp, Q, K, V, num_samples=SAMPLED_ROWS, seed=0, scale=scale, attend=attend).at

    def step(m):
        landmarks = run_strategy(get_strategy("norm"), Selection.of(xp, Q, K, m, None, None, -3, None, scale))
        factors = nystrom_factors(xp, K, V, landmarks, unchecked(get_solver("newton_schulz")), scale=scale,
                                  attend=attend)
        return nystrom_output(xp, xp.take(Q, rows, axis=-2), factors, attend)

    return step


def main():
    torch.set_num_threads(1)
    every = list(curves())
    ratios = [(ratio, name, i, j, j == len(high) - 1) for name, high in every for ratio, i, j in falls(high)]
    curves_count = len({r[1] for r in ratios})
    to_last = max(r for r in ratios if r[4])
    print(f"{curves_count} curves; FASTEST_FALL = {FASTEST_FALL}")
    print(f"largest fall over the rest of a search, relative to the last: {to_last[0]:.2f} ({to_last[1]}, "
          f"steps {to_last[2]} -> {to_last[3]})")
    print("largest over any later step: " + ", ".join(f"{r[0]:.2f} ({r[1]}, {r[2]} -> {r[3]})"
                                                        for r in sorted(ratios, reverse=True)[:3]))
    for family in ("DINOv2", "smooth", "clustered", "Gaussian", "curve"):
        mine = [r for r in ratios if r[1].startswith(family)]
        last, anywhere = max(r for r in mine if r[4]), max(mine)
        print(f"{family}: largest to the last m {last[0]:.2f} ({last[1]}, {last[2]} -> {last[3]}), to any m "
              f"{anywhere[0]:.2f} ({anywhere[1]}, {anywhere[2]} -> {anywhere[3]})")
    print("searches that give up / of them with a later bound within tol, at tol = 0.05, 0.1, 0.2, for FASTEST_FALL:")
    families = ("DINOv2", "smooth", "clustered", "Gaussian", "curve")
    print("| FASTEST_FALL | " + " | ".join(families) + " |\n|---|" + "---|" * len(families))
    for fastest_fall in (FASTEST_FALL, 3.0, 4.0, 7.0, 16.0):
        cells = []
        for family in families:
            highs = [high for name, high in every if name.startswith(family)]
            outcomes = [[replay(high, tol, fastest_fall) for high in highs] for tol in (0.05, 0.1, 0.2)]
            cells.append(", ".join(f"{sum(g for g, _ in o)}/{sum(a for _, a in o)}" for o in outcomes)
                         + f" of {len(highs)}")
        print(f"| {fastest_fall:g} | " + " | ".join(cells) + " |")
    _, Q, K, V, scale, _, _, _ = next(iter(layer_cases(models=("dinov2",), images=("astronaut",), layers=[3])))
    xp = array_api_compat.array_namespace(Q)
    def best_ms(fn):
        return 1e3 * best_time(fn, torch.device("cpu"), repeats=10)

    attend = functools.partial(sdpa_attend, scale=scale)
    step = search_step(Q, K, V, scale)
    costs = {}
    for m in (16, 32, 64, 128):
        costs[f"m = {m}: call"] = best_ms(lambda m=m: nystrom.approximate(Q, K, V, num_landmarks=m, scale=scale))
        costs[f"m = {m}: step"] = best_ms(lambda m=m: step(m))
    costs["exact SDPA"] = best_ms(lambda: F.scaled_dot_product_attention(Q, K, V, scale=scale))
    costs[f"{SAMPLED_ROWS} exact rows"] = best_ms(
        lambda: sample_rows(xp, Q, K, V, num_samples=SAMPLED_ROWS, seed=0, scale=scale, attend=attend))
    print("one thread, (1, 6, 1370, 64): " + ", ".join(f"{k} {v:.1f} ms" for k, v in costs.items()))


if __name__ == "__main__":
    main()
