"""FLOP formulas (nystrom.linalg.flops, the solvers' ``flops``) against torch's own count of the products they describe.

``torch.utils.flop_counter.FlopCounterMode`` counts mm/bmm/SDPA at 2 FLOPs per multiply-add, as the formulas do, and
nothing else: elementwise work and exponentials (which the formulas leave out too) and the factorisations inside
``linalg.svd`` and ``linalg.solve``, which the solvers' formulas estimate from Golub & Van Loan (``UNCOUNTED``). Every
count here is of integers, so every comparison is exact.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import nystrom
from nystrom import Landmarks, NewtonSchulz, PInv, Ridge
from nystrom.linalg.attention import nystrom_attention
from nystrom.linalg.flops import exact_attention_flops, nystrom_attention_flops, self_attending_test_flops
from nystrom.torch import fna_attention

# (batch shape, n_q, n, d, d_v, m): self-attention sizes, then n_q < n with d > d_v over two batch axes, then
# n_q > n with d < d_v.
SHAPES = [((1,), 7, 7, 4, 4, 3), ((2, 3), 5, 9, 6, 4, 3), ((4,), 11, 6, 3, 8, 5)]

# What FlopCounterMode cannot see of a solver's flops(m): the SVD (Golub & Van Loan's 21 m^3 for U, Sigma and V of a
# square matrix) and the LU solve with m right-hand sides (2/3 m^3 + 2 m^3, floored as the formula does). The rest of
# each formula, its matrix products, is counted.
UNCOUNTED = {PInv: lambda m: 21 * m**3, Ridge: lambda m: (8 * m**3) // 3, NewtonSchulz: lambda m: 0}

SOLVERS = [NewtonSchulz(iters=0), NewtonSchulz(iters=1), NewtonSchulz(), NewtonSchulz(tol=1e-8),
           NewtonSchulz(tol=1e-30, max_iters=3), PInv(), PInv(rtol=3e-2), Ridge()]


def counted(function, *args, **kwargs):
    """``function(*args, **kwargs)`` and the FLOPs FlopCounterMode counted in it."""
    with FlopCounterMode(display=False) as counter:
        result = function(*args, **kwargs)
    return result, counter.get_total_flops()


def inputs(batch, n_q, n, d, d_v, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, n_q, d, generator=g, dtype=dtype), torch.randn(*batch, n, d, generator=g, dtype=dtype),
            torch.randn(*batch, n, d_v, generator=g, dtype=dtype))


def landmarks_of(Q, K, m):
    # The last m queries and the first m keys: cross-attention, with landmark queries of their own.
    return Landmarks(queries=Q[..., -m:, :], keys=K[..., :m, :])


@pytest.mark.parametrize(("batch", "n_q", "n", "d", "d_v", "m"), SHAPES)
def test_exact_attention_flops_are_the_counted_products(batch, n_q, n, d, d_v, m):
    Q, K, V = inputs(batch, n_q, n, d, d_v)
    expected = exact_attention_flops(math.prod(batch), n_q, n, d, d_v)
    tau = d**-0.5
    _, by_hand = counted(lambda: torch.softmax(tau * Q @ K.transpose(-2, -1), dim=-1) @ V)
    _, sdpa = counted(F.scaled_dot_product_attention, Q, K, V)
    _, library = counted(nystrom.exact_attention, Q, K, V)
    assert (by_hand, sdpa, library) == (expected, expected, expected)


@pytest.mark.parametrize(("batch", "n_q", "n", "d", "d_v", "m"), SHAPES)
def test_nystrom_flops_by_stage_are_the_counted_products(batch, n_q, n, d, d_v, m):
    Q, K, V = inputs(batch, n_q, n, d, d_v)
    landmarks = landmarks_of(Q, K, m)
    q, k, tau = landmarks.queries, landmarks.keys, d**-0.5
    assert q.shape[-2] == k.shape[-2] == m

    def attention(x, y, values):
        return torch.softmax(tau * x @ y.transpose(-2, -1), dim=-1) @ values

    BV, b_flops = counted(attention, q, K, V)
    A, a_flops = counted(lambda: torch.softmax(tau * q @ k.transpose(-2, -1), dim=-1))
    Z = torch.linalg.pinv(A)  # the solve is the solvers' own flops(), counted in the test below
    v_prime, zbv_flops = counted(lambda: Z @ BV)
    out, out_flops = counted(attention, Q, k, v_prime)
    solve_flops = 1234  # any count: the formula adds it once per sequence
    expected = nystrom_attention_flops(math.prod(batch), n_q, n, d, d_v, m, solve_flops=solve_flops)
    assert expected["landmark_products"] == b_flops + a_flops + zbv_flops
    assert expected["output_product"] == out_flops
    assert expected["solve"] == math.prod(batch) * solve_flops
    assert expected["total"] == b_flops + a_flops + zbv_flops + out_flops + math.prod(batch) * solve_flops
    # The stages counted are the library's product: its output with an exact pseudo-inverse. float64: the two
    # differ by rounding amplified by cond(A) (at most 7.3e2 over SHAPES), measured at most 1.0e-13; 10x margin.
    library, _ = nystrom_attention(Q, K, V, landmarks, PInv())
    torch.testing.assert_close(out, library, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize(("m", "batch"), [(1, ()), (5, ()), (8, (3,)), (16, (2, 2))])
def test_solver_flops_are_the_counted_products(solver, m, batch):
    # A batch of softmax kernels, as the library builds them: the count per matrix is the formula's.
    g = torch.Generator().manual_seed(m)
    A = torch.softmax(2 * torch.randn(*batch, m, m, generator=g, dtype=torch.float64), dim=-1)
    result, flops = counted(solver, A)
    per_matrix = solver.flops(m, result.iterations) - UNCOUNTED[type(solver)](m)
    assert flops == math.prod(batch) * per_matrix, (result.iterations, flops)


def test_newton_schulz_flops_count_every_way_the_tol_loop_ends():
    # Met tol after some steps; stopped where no residual fell (float32 at a condition number of 1e8, whose
    # rounding floor is far above tol); ran max_iters. Each returns at a different place in the loop.
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    hard = ((U * torch.logspace(0, -8, 12, dtype=torch.float64)) @ U.T).float()
    easy = torch.softmax(torch.randn(12, 12, generator=g), dim=-1)
    ends = []
    for solver, A in ((NewtonSchulz(tol=1e-4), easy), (NewtonSchulz(tol=1e-12), hard),
                      (NewtonSchulz(tol=1e-12, max_iters=2), hard)):
        result, flops = counted(solver, A)
        assert flops == solver.flops(12, result.iterations), (solver, result.iterations)
        ends.append((result.iterations, float(result.residual) <= solver.tol))
    assert ends[0][1] and ends[0][0] < 100, ends  # met tol
    assert not ends[1][1] and ends[1][0] < 100, ends  # the rounding floor, before max_iters
    assert ends[2] == (2, False), ends  # max_iters


@pytest.mark.parametrize(("batch", "n_q", "n", "d", "d_v", "m"), SHAPES)
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("function", [nystrom_attention, fna_attention], ids=["array_api", "torch"])
def test_nystrom_attention_runs_the_flops_it_reports(function, solver, batch, n_q, n, d, d_v, m):
    Q, K, V = inputs(batch, n_q, n, d, d_v, dtype=torch.float32)
    (_, result), flops = counted(function, Q, K, V, landmarks_of(Q, K, m), solver)
    expected = nystrom_attention_flops(math.prod(batch), n_q, n, d, d_v, m,
                                       solve_flops=solver.flops(m, result.iterations))
    assert flops == expected["total"] - math.prod(batch) * UNCOUNTED[type(solver)](m)


@pytest.mark.parametrize("options", [{}, {"strategy": "segment_means"}, {"query_chunk_size": 4},
                                     {"share_landmarks_across_heads": False}, {"enable_gqa": True}])
def test_approximate_info_flops_are_the_counted_flops(options):
    # Strategies whose selection does no matrix product (Uniform, SegmentMeans' weighted means); the FLOPs of
    # selection are not part of Info.flops.
    Q, K, V = inputs((2, 4), 9, 12, 6, 5)
    if options.get("enable_gqa"):
        K, V = K[:, :2], V[:, :2]
    (_, info), flops = counted(nystrom.approximate, Q, K, V, num_landmarks=4, return_info=True,
                               **{"strategy": "uniform", "seed": 0, **options})
    assert info.flops["total"] == flops
    assert info.exact_flops == exact_attention_flops(8, 9, 12, 6, 5)


@pytest.mark.parametrize(("batch", "n", "keys"), [((1, 2), 150, 128), ((3,), 40, 128), ((2,), 150, 16)])
def test_self_attending_test_flops_are_the_counted_products(batch, n, keys):
    # The own logits, 2 n d per sequence, are elementwise products FlopCounterMode does not see.
    import array_api_compat
    import numpy as np

    from nystrom.linalg import bounds

    Q, K, _ = inputs(batch, n, n, 6, 1, dtype=torch.float32)
    expected = self_attending_test_flops(math.prod(batch), n, 6, keys)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bounds, "SELF_ATTENTION_KEYS", keys)
        xp = array_api_compat.array_namespace(Q)
        _, seen = counted(bounds.self_attending_queries, xp, Q, K, np.arange(n), 8, 0.4)
    assert seen == expected - math.prod(batch) * 2 * n * 6
