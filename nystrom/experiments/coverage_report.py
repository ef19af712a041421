"""How often the interval of ``estimate_relative_error`` holds the true error:
``python -m nystrom.experiments.coverage_report``.

For each family of inputs the exact and approximate outputs are computed once, giving every query row's squared
error :math:`e_i` and squared norm :math:`o_i` (summed over batch and heads), and the interpolation weights'
norms of ``Info.interpolation_weights``. The estimator's own row sampler and interval
(:func:`~nystrom.linalg.bounds.census_and_strata` with :func:`~nystrom.linalg.bounds.outlying_queries`, then
:meth:`~nystrom.linalg.bounds.RowSample.with_census` of :func:`~nystrom.linalg.bounds.interpolation_census`, and
:func:`~nystrom.linalg.bounds.ratio_interval`) are then replayed on those rows for 1,000 seeds per sample size,
and the table reports the share of 95 % intervals that contain the true squared error ratio, with the median
interval width (high / low of the reported error). For comparison it replays the estimators the library used
before: the same strata without the census of interpolation weights (until 2026-12-03), and a simple random sample
with a delta-method log-scale interval (until 2026-12-01).

Families: Gaussian tokens, clustered tokens, clustered low-rank tokens, sharper clusters (12 centres, larger logits),
artifact-like queries (10 of 512 with 4 times the others' norm), aimed queries (16 of 1,024 with 2.9 times the
others' norm, each aimed at one key) and isolated tokens (10 of 1,024 far from 8 tight clusters, of the same norm),
each with the default ``norm``, with ``uniform`` and with ``fps`` landmarks,
and real
DINOv2-S attention at 518 px (images astronaut and coffee, layers 3, 6, 9 and 11) with ``norm`` and ``uniform``.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

import nystrom
from nystrom.linalg.bounds import (
    CENSUS_SHARE,
    UNREPRESENTED_SHARE,
    RowSample,
    census_and_strata,
    interpolation_census,
    outlying_queries,
    ratio_interval,
    unrepresented_queries,
)
from nystrom.torch.capture import capture_attention

from .pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from .report import check_distinct, markdown_table, positive

CONFIDENCE = 0.95


def row_errors(Q, K, V, strategy, num_landmarks, scale=None):
    """``(e, o, outlying, weights, alone)``: per query position, the squared error of ``approximate`` and the squared
    exact norm, float64, ``outlying(s)``, the positions a sample of ``s`` rows takes apart
    (:func:`~nystrom.linalg.bounds.outlying_queries`), the interpolation weights' squared norms
    (``Info.interpolation_weights``, for its census of those) and the queries the landmarks do not represent
    (:func:`~nystrom.linalg.bounds.unrepresented_queries`, for their strata)."""
    out, info = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=num_landmarks, scale=scale, seed=0,
                                    return_info=True)
    exact = F.scaled_dot_product_attention(Q.double(), K.double(), V.double(), scale=scale)
    e = ((out.double() - exact) ** 2).sum(-1)
    o = (exact**2).sum(-1)
    xp, _, K, _, _, tau, _, (keys, bias, _) = info._inputs
    positions = np.arange(Q.shape[-2])

    def outlying(num_samples):
        return outlying_queries(xp, Q, K, positions, num_samples, tau)

    return (e.reshape(-1, e.shape[-1]).sum(0).numpy(), o.reshape(-1, o.shape[-1]).sum(0).numpy(), outlying,
            info.interpolation_weights(), unrepresented_queries(xp, Q, K, keys, bias, tau))


def synthetic_inputs():
    """``{family: (Q, K, V, m)}`` of the synthetic families of the module docstring (landmark rule aside)."""
    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 4, 1024, 64, generator=g) for _ in range(3))
    centres = 2 * torch.randn(16, 64, generator=g)
    X = centres[torch.randint(0, 16, (1024,), generator=g)] + 0.3 * torch.randn(1024, 64, generator=g)
    Qc, Kc, Vc = ((X @ (torch.randn(64, 64, generator=g) / 8)).expand(1, 4, 1024, 64) for _ in range(3))
    U = torch.randn(400, 3, generator=g, dtype=torch.float64)
    Ql, Kl = (1.5 * U @ torch.randn(3, 16, generator=g, dtype=torch.float64)
              + 0.2 * torch.randn(400, 16, generator=g, dtype=torch.float64) for _ in range(2))
    Vl = torch.randn(400, 8, generator=g, dtype=torch.float64)
    # Artifact-like: 10 of 512 queries, scattered, with 4 times the norm of the others (smooth tokens otherwise).
    t = torch.linspace(0, 6, 512, dtype=torch.float64)[:, None]
    Qa, Ka = (2 * torch.sin(t * torch.randn(1, 16, generator=g, dtype=torch.float64)
                            + torch.randn(1, 16, generator=g, dtype=torch.float64))
              + 0.2 * torch.randn(512, 16, generator=g, dtype=torch.float64) for _ in range(2))
    Qa[torch.randperm(512, generator=g)[:10]] *= 4
    Va = torch.randn(512, 8, generator=g, dtype=torch.float64)
    # Sharper clusters (a review's family): 12 centres and larger logits; a handful of rows with flat attention and
    # small outputs holds most of the squared error.
    sharp = 2 * torch.randn(12, 64, generator=g, dtype=torch.float64)
    Xs = sharp[torch.randint(0, 12, (1024,), generator=g)] + 0.3 * torch.randn(1024, 64, generator=g,
                                                                                dtype=torch.float64)
    Qs, Ks, Vs = ((Xs @ (torch.randn(64, 64, generator=g, dtype=torch.float64) / 6)).expand(1, 2, 1024, 64)
                  for _ in range(3))
    # Aimed queries (a review's family): 16 of 1,024 unit-norm queries replaced by 2.9 times a key's direction, each
    # attending to that one key, which the landmarks stand for least; just under a threshold of 3 times the median
    # norm, the census left them to the draw.
    Kt, Vt, Qt = (torch.randn(1024, 32, generator=g, dtype=torch.float64) for _ in range(3))
    Qt = Qt / Qt.norm(dim=-1, keepdim=True)
    aimed, targets = torch.randperm(1024, generator=g)[:16], torch.randperm(1024, generator=g)[:16]
    Qt[aimed] = 2.9 * Kt[targets] / Kt[targets].norm(dim=-1, keepdim=True)
    Xi, Vi = (torch.as_tensor(x) for x in isolated_tokens(0))
    return {"Gaussian": (Q, K, V, 32), "artifact-like queries": (Qa, Ka, Va, 24), "clustered": (Qc, Kc, Vc, 16),
            "low-rank": (Ql, Kl, Vl, 16), "sharp clusters": (Qs, Ks, Vs, 16), "aimed queries": (1.5 * Qt, Kt, Vt, 32),
            "isolated tokens": (Xi, Xi, Vi, 16)}


def isolated_tokens(seed, n=1024, d=32, isolated=10):
    """``(X, V)``, float64 numpy of shape (1, 2, n, d): self-attention inputs (Q = K = X) of 8 tight clusters (centres
    3 N(0, I), spread 0.05) and ``isolated`` tokens of the same norm far from them and from each other (3 N(0, I)), a
    review's family (2026-12-03). Each isolated query attends mostly to itself, a key no landmark stands for, and its
    row holds most of the error; neither its norm nor its interpolation weights single it out, only
    :func:`~nystrom.linalg.bounds.unrepresented_queries` does."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((8, d))
    X = centres[rng.integers(0, 8, n)] + 0.05 * rng.standard_normal((n, d))
    far = rng.choice(n, isolated, replace=False)
    X[far] = 3 * rng.standard_normal((isolated, d))
    return np.broadcast_to(X, (1, 2, n, d)).copy(), rng.standard_normal((1, 2, n, d))


def families(synthetic):
    """``{name: (e, o, outlying, weights, alone)}`` (:func:`row_errors`) for the ``synthetic`` inputs
    (:func:`synthetic_inputs`) and the real ones of the module docstring."""
    rows = {}
    for strategy in ("norm", "uniform", "fps"):
        for family, (Q, K, V, m) in synthetic.items():
            rows[f"{family}, {strategy}, m = {m}"] = row_errors(Q, K, V, strategy, m)
    model = load_dinov2_small()
    pictures = natural_images()
    for image in ("astronaut", "coffee"):
        captures = capture_attention(model, {"pixel_values": imagenet_pixel_values(pictures[image], 518)},
                                     layers=[3, 6, 9, 11])
        for c in captures:
            for strategy in ("norm", "uniform"):
                rows[f"DINOv2-S {image} L{c.layer}, {strategy}, m = 64"] = row_errors(
                    c.query, c.key, c.value, strategy, 64, c.scaling)
    return rows


def simple_random_interval(e, o, population):
    """The previous estimator: a simple random sample, delta-method variance, log-scale Student interval."""
    s = e.size
    ratio = e.sum() / o.sum()
    var = (1 - s / population) / (s * o.mean() ** 2) * np.var(e - ratio * o, ddof=1)
    spread = np.exp(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, s - 1) * np.sqrt(var) / ratio)
    return ratio / spread, ratio * spread


def replayed_sample(positions, census, weights, num_samples, rng, alone=None):
    """The rows of the library's sample (:func:`~nystrom.linalg.bounds.sample_rows` and ``RowSample.with_census``) and
    ``(rows, sizes, certain)`` of the same strata without the census of interpolation weights, for one seed; the
    exact rows are replayed, so the sample holds none."""
    rows, sizes, certain, strata = census_and_strata(positions, census, num_samples, rng)
    sample = RowSample(rows, rows, sizes, 1.0, np.zeros((rows.size, 1)), certain, strata, rng=rng,
                       exact_rows=lambda at: np.zeros((len(at), 1)))
    return (sample.with_census(interpolation_census(sample, weights), alone, num_samples // UNREPRESENTED_SHARE),
            (rows, sizes, certain))


def coverage(e, o, outlying, weights, num_samples, replications=1000, alone=None):
    """``(coverage, median width)`` over seeds of the library's interval, of the same strata without the census of
    interpolation weights and of the queries the landmarks do not represent (``alone``), and of a simple random
    sample, in that order."""
    truth = e.sum() / o.sum()
    population = e.size
    positions = np.arange(population)
    census = outlying(num_samples)
    hits, widths = np.zeros(3), [[], [], []]
    for seed in range(replications):
        rng = np.random.default_rng(seed)
        sample, (rows, sizes, certain) = replayed_sample(positions, census, weights, num_samples, rng, alone)
        library = ratio_interval(e[sample.rows], o[sample.rows], sample.sizes, CONFIDENCE, certain=sample.certain)
        strata = ratio_interval(e[rows], o[rows], sizes, CONFIDENCE, certain=certain)
        simple = rng.choice(population, num_samples, replace=False)
        intervals = (library[1:], strata[1:], simple_random_interval(e[simple], o[simple], population))
        for k, (lo, hi) in enumerate(intervals):
            hits[k] += lo <= truth <= hi
            widths[k].append(np.sqrt(hi / lo))
    return [(hits[k] / replications, float(np.median(widths[k]))) for k in range(3)]


def main(argv=None):
    """Print one coverage table per sample size."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.coverage_report", description=__doc__)
    parser.add_argument("--samples", type=positive(int), nargs="+", default=[64, 128], help="row sample sizes s")
    args = parser.parse_args(argv)
    synthetic = synthetic_inputs()
    # Two rows at least (the interval's variance), at most every query of the smallest family (DINOv2-S's 1,370 are
    # more); checked before any model runs (a review: --samples 1 and 500 were tracebacks after the families).
    fewest = min(Q.shape[-2] for Q, *_ in synthetic.values())
    try:
        check_distinct("--samples", args.samples)
        if not all(2 <= s <= fewest for s in args.samples):
            raise ValueError(f"--samples {' '.join(map(str, args.samples))}: each must be in [2, {fewest}] (the "
                             f"queries of the smallest family)")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    rows = families(synthetic)
    for s in args.samples:
        table = []
        for name, (e, o, outlying, weights, alone) in rows.items():
            measured = coverage(e, o, outlying, weights, s, alone=alone)
            table.append([name, e.size, round(float(np.sqrt(e.sum() / o.sum())), 3)]
                         + [x for c, w in measured for x in (c, round(w, 2))])
        table.append(["lowest", "", ""] + [x for k in (3, 5, 7) for x in (min(r[k] for r in table), "")])
        print(f"\ns = {s} rows (and s // {CENSUS_SHARE} of largest interpolation weights), nominal {CONFIDENCE:.0%}, "
              "1,000 seeds per family\n")
        print(markdown_table(["family", "n", "true error", "coverage", "width", "coverage, strata only", "width",
                              "coverage, simple random", "width"], table))


if __name__ == "__main__":
    main()
