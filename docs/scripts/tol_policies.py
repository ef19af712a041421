"""Search policies for ``tol=`` replayed on real attention: what each does to the m chosen and to the time.

    .venv/bin/python docs/scripts/tol_policies.py

For every layer of the bundled DINOv2-S at 518 px (images astronaut, coffee and rocket), at every m of the report's
grid of ratio 2^(1/4) from 16 to the half-cost m (``nystrom.experiments.tol_report.sweep_grid``): the estimate and
its 95 % upper bound from the 128 rows the search samples (``estimate_relative_error(seed=0)``, the search's own
rows), the same with the census of interpolation weights that confirms a bound within ``tol``
(``Info.estimate_error(seed=0)``: the replay of the library's policy below must find the library's steps), and the
true error against float64 exact attention. Then, one thread, on layer 3 of astronaut (1, 6, 1370, 64), best of 5
each: one call and one search step (``tol_doubling.search_step``) at every m of the grid, exact SDPA and the 128 exact
rows. A search's time is modeled as the rows, plus its steps, plus the returned call's whole output (call minus
step) or exact attention; the census's cost is not modeled.

Policies, each from m = 16, with the library's give-up rule (``out_of_reach``) and exact attention on a miss:

* ``doubling``: m doubles at every step (``approximate(tol=...)``'s search until 2026-12-03);
* ``near miss``: after a step whose estimate is within 5 % of ``tol`` (its bound above it), grow by sqrt(2) instead
  of 2: ``approximate(tol=...)``'s search since, ``search_landmarks`` itself on the grid's bounds;
* ``refine``: the same with the mid-point of the last two steps (``search_landmarks(refine=True)``, as ``fna``
  calibrates).

The grid holds every m these policies reach from 16 (doubling and growth by sqrt(2), rounded).

Printed per ``tol``: layers within ``tol`` (true error), exact answers, the m chosen over the smallest m of the grid
that meets ``tol`` (median, largest; Nyström answers), and the modeled search time over one call at the m returned
(exact attention for an exact answer; median, largest).
"""

import functools
import math
import sys
import warnings
from pathlib import Path

import array_api_compat
import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.experiments.timing import best_time
from nystrom.experiments.tol_report import layer_cases, sweep_grid
from nystrom.linalg.bounds import ErrorEstimate, sample_rows
from nystrom.linalg.tolerance import (
    CONFIDENCE,
    EXACT,
    NEAR_MISS,
    SAMPLED_ROWS,
    crossover,
    nystrom_pays,
    out_of_reach,
    search_landmarks,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tol_doubling import search_step  # noqa: E402

TOLS = (0.05, 0.1, 0.2)
FIRST = 16


def layer_grid(Q, K, V, scale):
    """``{m: (estimate, upper bound, true error, upper bound with the census)}`` over the grid, and the largest m of
    the doubling."""
    n_q, n, d, d_v = Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1]
    top = crossover(n, nystrom_pays(n_q, n, d, d_v), nystrom.NewtonSchulz())
    exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), scale=scale)
    grid = {}
    largest = FIRST * 2 ** (top // FIRST).bit_length() // 2
    for m in sorted(set(sweep_grid(FIRST, top)) | reachable(largest)):
        out, info = nystrom.approximate(Q, K, V, num_landmarks=m, scale=scale, return_info=True)
        bound = nystrom.estimate_relative_error(Q, K, V, out, num_samples=SAMPLED_ROWS, seed=0, scale=scale)
        census = info.estimate_error(num_samples=SAMPLED_ROWS, seed=0)
        error = torch.linalg.norm(out.double() - exact) / torch.linalg.norm(exact)
        grid[m] = (bound.estimate, bound.high, float(error), census.high)
    return grid, largest


def reachable(largest):
    """Every m a search from ``FIRST`` reaches by doubling and by growth by sqrt(2) (rounded), up to ``largest``."""
    found, todo = set(), [FIRST]
    while todo:
        m = todo.pop()
        if m not in found:
            found.add(m)
            todo += [min(max(round(m * grow), m + 1), largest) for grow in (2, math.sqrt(2)) if m < largest]
    return found


def bound(grid, m, tol):
    """The search's bound at ``m``: from the 128 rows, confirmed by the census where it is within ``tol``."""
    return grid[m][1] if grid[m][1] > tol else grid[m][3]


def library(grid, largest, tol, refine=False):
    """``(m returned or None for exact attention, the m tried)``: the library's own search
    (:func:`~nystrom.linalg.tolerance.search_landmarks`) on one layer's grid of bounds."""
    def estimate(m):
        return ErrorEstimate(grid[m][0], grid[m][0], bound(grid, m, tol), CONFIDENCE, SAMPLED_ROWS)

    result, steps = search_landmarks(lambda m, solver: m, estimate, FIRST, largest, tol, False,
                                     nystrom.NewtonSchulz(), exact=lambda: None, keys=0, refine=refine)
    # The returned step listed again last is not tried twice (as tol_report counts it).
    tried = steps[:-1] if steps[-1] in steps[:-1] else steps
    return result, [step.m for step in tried if step.solver != EXACT]


def near_miss(grid, largest, tol, near=NEAR_MISS):
    """``(m returned or None, the m tried)``: the library's search written out, a step whose estimate is within
    ``near`` times ``tol`` growing m by sqrt(2) instead of 2 (``near=0``: the doubling alone)."""
    steps, best, m = [FIRST], FIRST, FIRST
    # As the library: stop within tol, at the largest m, after two steps that did not lower the best bound (the
    # solver's floor), or when out_of_reach gives up.
    while bound(grid, best, tol) > tol and m < largest and steps.index(best) >= len(steps) - 2:
        if len(steps) > 1 and out_of_reach(bound(grid, m, tol), bound(grid, steps[-2], tol), m, largest, tol):
            break
        grow = math.sqrt(2) if grid[m][0] <= near * tol else 2
        m = min(max(round(m * grow), m + 1), largest)
        steps.append(m)
        best = m if bound(grid, m, tol) < bound(grid, best, tol) else best
    return (best if bound(grid, best, tol) <= tol else None), steps


def main():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = [(layer_grid(Q, K, V, scale), Q, K, V, scale, i)
                  for i, (_, Q, K, V, scale, _, _, _) in enumerate(layer_cases(models=("dinov2",)))]
        # The grid holds the search's own bounds, and the near-miss loop is the library's.
        for ((grid, largest), Q, K, V, scale, i) in layers:
            for tol in TOLS:
                _, info = nystrom.approximate(Q, K, V, num_landmarks=FIRST, tol=tol, scale=scale, return_info=True)
                tried = [step.m for step in info.tol_steps if step.solver != EXACT]
                assert tried == library(grid, largest, tol)[1] == near_miss(grid, largest, tol)[1], (i, tol)
    (grid, largest), Q, K, V, scale, _ = layers[3]
    step, cpu = search_step(Q, K, V, scale), torch.device("cpu")
    call = {m: best_time(lambda m=m: nystrom.approximate(Q, K, V, num_landmarks=m, scale=scale), cpu, 5) for m in grid}
    cost = {m: best_time(lambda m=m: step(m), cpu, 5) for m in grid}
    exact = best_time(lambda: F.scaled_dot_product_attention(Q, K, V, scale=scale), cpu, 5)
    xp = array_api_compat.array_namespace(Q)
    rows = best_time(lambda: sample_rows(xp, Q, K, V, num_samples=SAMPLED_ROWS, seed=0, scale=scale), cpu, 5)
    print("one thread, (1, 6, 1370, 64), ms: " + ", ".join(f"m = {m}: call {1e3 * call[m]:.1f}, step "
                                                             f"{1e3 * cost[m]:.1f}" for m in grid)
          + f"; exact {1e3 * exact:.1f}; {SAMPLED_ROWS} rows {1e3 * rows:.1f}")
    policies = {"doubling": functools.partial(near_miss, near=0.0), "near miss": library,
                "refine": functools.partial(library, refine=True)}
    for policy, search in policies.items():
        for tol in TOLS:
            within, answers, ratios, times = 0, 0, [], []
            for (grid, largest), *_ in layers:
                m, steps = search(grid, largest, tol)
                spent = rows + sum(cost[s] for s in steps)
                if m is None:
                    within += 1
                    answers += 1
                    times.append((spent + exact) / exact)
                    continue
                within += grid[m][2] <= tol
                smallest = next((x for x in sorted(grid) if grid[x][2] <= tol), None)
                if smallest is not None:
                    ratios.append(m / smallest)
                times.append((spent + call[m] - cost[m]) / call[m])
            print(f"{policy:9s} tol {tol}: within tol {within}/{len(layers)}, exact answers {answers}, m / smallest "
                  f"{np.median(ratios):.2f}, {max(ratios):.2f}; time / one call {np.median(times):.2f}, "
                  f"{max(times):.2f}")


if __name__ == "__main__":
    main()
