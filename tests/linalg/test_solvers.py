"""Pseudo-inverse solvers: Moore–Penrose identities, convergence, batch independence."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nystrom
from nystrom import NewtonSchulz, PInv, Ridge, get_solver
from nystrom.linalg.solvers import moore_penrose_residual
from nystrom.linalg.validation import summary

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps


def random_matrix(seed, m, rank=None, cond=1e3):
    """A (rank-deficient if asked) matrix with singular values log-spaced over ``cond``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = np.logspace(0, -np.log10(cond), m)
    if rank is not None:
        s[rank:] = 0
    return (U * s) @ V.T


def softmax_matrix(seed, m, temperature=1.0):
    rng = np.random.default_rng(seed)
    logits = temperature * rng.standard_normal((m, m))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 24), rank_frac=st.floats(0.2, 1.0))
def test_pinv_moore_penrose_identities(seed, m, rank_frac):
    rank = max(1, int(rank_frac * m))
    A = random_matrix(seed, m, rank=rank, cond=1e4)
    Z = PInv(rtol=1e-10)(A).inverse
    # Exact singular values span [1e-4, 1] (cond 1e4) and the dropped ones are exactly 0, so the
    # cutoff 1e-10 separates them; the identities then hold to ~cond * eps (m-term sums, 10x margin; measured at most
    # 9.6e-15, 8.0e-11, 1.4e-13, 1.0e-13 and 0). rtol=0: numpy's default 1e-7 would have allowed 1e-7 on O(1) entries.
    tol = 1e4 * m * EPS64 * 10
    np.testing.assert_allclose(A @ Z @ A, A, rtol=0, atol=tol)
    np.testing.assert_allclose(Z @ A @ Z, Z, rtol=0, atol=tol * 1e4)  # ||Z|| = 1e4 scales this identity
    np.testing.assert_allclose(A @ Z, (A @ Z).T, rtol=0, atol=tol)
    np.testing.assert_allclose(Z @ A, (Z @ A).T, rtol=0, atol=tol)
    np.testing.assert_allclose(Z, np.linalg.pinv(A, rcond=1e-10), rtol=0, atol=tol * 1e4)  # Z's entries reach 1e4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 32))
def test_newton_schulz_converges_to_pinv_on_well_conditioned(seed, m):
    A = random_matrix(seed, m, cond=10.0)
    result = NewtonSchulz(tol=1e-13, max_iters=60)(A)
    # Third-order convergence from ||E0|| < 1: cond 10 needs ~10 steps to reach eps.
    assert result.iterations < 60
    assert float(result.residual) <= 1e-13
    # Z - A^-1 = A^-1 (AZA - A) A^-1, so |Z - A^-1|_2 <= |A^-1|_2^2 * 1e-13 |A|_F <= cond^2 * 1e-13 * sqrt(m) (sigma_max
    # = 1); 2x for the rounding of the residual itself. Measured at most 2.0e-12, 10x below it at every m.
    np.testing.assert_allclose(result.inverse, np.linalg.inv(A), rtol=0, atol=2 * 10.0**2 * 1e-13 * np.sqrt(m))


def test_newton_schulz_error_recursion():
    # E_{k+1} = 3/4 E_k^3 + 1/4 E_k^4 with E = I - A Z, exactly (up to rounding) for one step.
    A = softmax_matrix(0, 12)
    Z0 = NewtonSchulz(iters=0)(A).inverse
    Z1 = NewtonSchulz(iters=1)(A).inverse
    E0 = np.eye(12) - A @ Z0
    E1 = np.eye(12) - A @ Z1
    E0_2 = E0 @ E0
    # float64: both sides round m = 12-term products of O(1) entries, ~m eps = 2.7e-15; measured 2.2e-16; 10x the bound.
    np.testing.assert_allclose(E1, 0.75 * E0_2 @ E0 + 0.25 * E0_2 @ E0_2, rtol=0, atol=10 * 12 * EPS64)
    assert np.linalg.norm(E0, 2) < 1  # the scaling A^T / (|A|_1 |A|_inf) guarantees this


def test_newton_schulz_start_uses_both_norms():
    # Z_0 = A^T / (|A|_1 |A|_inf) gives |I - A Z_0|_2 < 1 for every nonsingular A, since |A|_2^2 <= |A|_1 |A|_inf.
    # A softmax matrix has |A|_inf = 1, so it cannot tell a start that drops a norm; its transpose with a sink column
    # (|A|_1 = 1, |A|_inf about m/2) and unnormalised matrices can: a start of A^T / |A|_1^2 diverges on the first.
    sink = softmax_matrix(3, 16, temperature=3.0)
    sink[:, 0] += 8.0
    sink /= sink.sum(-1, keepdims=True)
    for A in (sink.T, 1e4 * sink.T, random_matrix(5, 16, cond=10.0), 1e-3 * random_matrix(6, 16, cond=10.0)):
        Z0 = NewtonSchulz(iters=0)(A).inverse
        # float64: the two 16-term norms and the two divisions round differently here and in the solver, at most about
        # (2 * 15 + 4) eps / 2 = 3.8e-15 relative; measured 2.4e-16 (1 ulp).
        np.testing.assert_allclose(Z0, A.T / (np.abs(A).sum(0).max() * np.abs(A).sum(1).max()), rtol=1e-14)
        assert np.linalg.norm(np.eye(16) - A @ Z0, 2) < 1
        result = NewtonSchulz(tol=1e-10, max_iters=200)(A)
        assert float(result.residual) <= 1e-10
        # The inverse to the accuracy the residual allows: 1e-10 times the condition number (5e3 for the sink).
        inverse = np.linalg.inv(A)
        assert np.linalg.norm(result.inverse - inverse) <= 1e-10 * np.linalg.cond(A) * np.linalg.norm(inverse)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 20), iters=st.integers(0, 12), softmax=st.booleans())
def test_newton_schulz_is_the_documented_spectral_filter(seed, m, iters, softmax):
    # Docs' pseudo-inverse page: Z_k = V diag(phi_k(sigma)) U^T with e_0 = 1 - alpha sigma^2,
    # e_{k+1} = 3/4 e_k^3 + 1/4 e_k^4, phi_k = (1 - e_k) / sigma and alpha = 1 / (|A|_1 |A|_inf).
    A = softmax_matrix(seed, m, temperature=3.0) if softmax else random_matrix(seed, m, cond=1e3)
    U, sigma, Vt = np.linalg.svd(A)
    e = 1 - sigma**2 / (np.abs(A).sum(axis=0).max() * np.abs(A).sum(axis=1).max())
    for _ in range(iters):
        e = 0.75 * e**3 + 0.25 * e**4
    filtered = (Vt.T * ((1 - e) / sigma)) @ U.T
    # The matrix iteration rounds I - A Z to about m eps absolute in every direction; along a small singular value
    # that error grows by the map's slope 13/4 per step (as the inverted fraction does) and reaches Z divided by
    # sigma_min: m eps (13/4)^k / sigma_min, with a factor 10 of margin (measured within it for cond up to 1e6).
    Z = NewtonSchulz(iters=iters)(A).inverse
    np.testing.assert_allclose(Z, filtered, rtol=0, atol=10 * m * EPS64 * (13 / 4) ** iters / sigma.min())
    # Not a tolerance that passes anything: at least 100 times below the largest entry of the filtered inverse.
    assert 10 * m * EPS64 * (13 / 4) ** iters / sigma.min() < 1e-2 * np.abs(filtered).max() or iters == 0


def test_newton_schulz_scaling_is_per_matrix():
    # A batch mixing a matrix with a huge norm and a small one: a batch-wide scale (the peers'
    # bug) would start the small one at ~0 and leave it unconverged after 6 steps.
    small = softmax_matrix(1, 16)
    big = 1e4 * softmax_matrix(2, 16)
    batch = np.stack([small, big])
    together = NewtonSchulz(iters=6)(batch)
    # float64: the same operations per matrix (measured bitwise equal); the tolerances leave room for a BLAS that blocks
    # a batch differently (m eps ~ 4e-15 per product; the residual, about 1e-2, is a difference that rounds ~1e2 times
    # worse relatively). A batch-wide scale is off by O(1).
    for i, A in enumerate((small, big)):
        alone = NewtonSchulz(iters=6)(A)
        np.testing.assert_allclose(together.inverse[i], alone.inverse, rtol=1e-12)
        np.testing.assert_allclose(together.residual[i], alone.residual, rtol=1e-10)


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-6])
def test_newton_schulz_with_tol_solves_each_matrix_as_alone(tol):
    # The batch steps on until every matrix meets tol; a matrix that met it kept improving with its neighbours (a
    # review: 69 % off its own solve at tol=1e-2, next to a matrix of condition 1e6). The same iterates, in the same
    # float64 operations: bitwise.
    easy = softmax_matrix(1, 16)
    U, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((16, 16)))
    hard = (U * np.logspace(0, -6, 16)) @ U.T
    solver = NewtonSchulz(tol=tol)
    together = solver(np.stack([easy, hard]))
    for i, A in enumerate((easy, hard)):
        alone = solver(A)
        np.testing.assert_array_equal(together.inverse[i], alone.inverse)
        np.testing.assert_array_equal(together.residual[i], alone.residual)


def test_newton_schulz_with_tol_stops_a_matrix_at_its_rounding_floor_as_alone():
    # Below tol's reach, a matrix alone stops at the first step that does not lower its residual; in a batch it went
    # on while another still improved, and took a later iterate of its own that happened to be better (a review:
    # 155 % off its own solve, residuals 2.566e-10 against 2.584e-10). Bitwise its own solve now, and the empty batch
    # (inverse None before) is an empty inverse.
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    W, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    stalled, improving = U @ np.diag(np.logspace(0, -12, 6)) @ W, U @ np.diag(np.logspace(0, -8, 6)) @ W.T
    solver = NewtonSchulz(tol=1e-12)
    together = solver(np.stack([stalled, improving]))
    for i, A in enumerate((stalled, improving)):
        alone = solver(A)
        np.testing.assert_array_equal(together.inverse[i], alone.inverse)
        np.testing.assert_array_equal(together.residual[i], alone.residual)
    assert solver(np.zeros((0, 3, 3))).inverse.shape == (0, 3, 3)


def test_newton_schulz_reports_nonconvergence_instead_of_exploding():
    A = random_matrix(3, 20, rank=5, cond=1e12)
    result = NewtonSchulz(tol=1e-14, max_iters=8)(A)
    assert result.iterations == 8
    assert np.all(np.isfinite(result.inverse))
    assert float(result.residual) > 1e-14  # honest report, no exception, no blow-up (measured 6.6e-3)


@pytest.mark.parametrize("lam", [1e-6, 1e-9, 1e-12])
def test_ridge_tends_to_pinv(lam):
    A = random_matrix(4, 10, cond=100.0)
    Z = Ridge(lam=lam)(A).inverse
    # |sigma/(sigma^2+lam) - 1/sigma| = lam / (sigma (sigma^2 + lam)) <= lam cond^3 (sigma_max = 1) bounds |Z - A^-1|_2,
    # hence every entry: no margin needed (measured 0.31 of it for each lam). 1e-9: the normal equations' rounding,
    # eps cond(A)^2 max|A^-1| = 2.2e-16 * 1e4 * 37 = 8e-11, 10x.
    np.testing.assert_allclose(Z, np.linalg.inv(A), rtol=0, atol=lam * 100**3 + 1e-9)


@pytest.mark.parametrize("lam", [1e-30, 1e-2, 1.0, 7.0, 1e12, 1e39])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ridge_matches_its_formula_at_every_scale_of_lam(lam, dtype):
    # Z = V diag(sigma / (sigma^2 + lam)) U^T from the SVD, in float64. lam = 1e39 is positive and finite, but lam I
    # is inf in float32 (and inf * 0 NaN off the diagonal): the output was all NaN there (review).
    A = random_matrix(7, 10, cond=100.0)
    U, sigma, Vt = np.linalg.svd(A)
    expected = (Vt.T * (sigma / (sigma**2 + lam))) @ U.T
    Z = Ridge(lam=lam)(A.astype(dtype)).inverse
    assert np.all(np.isfinite(Z))
    # The normal equations' rounding: eps times the condition number of A^T A + lam I, relative to the largest entry.
    condition = (sigma[0] ** 2 + lam) / (sigma[-1] ** 2 + lam)
    scale = max(np.abs(expected).max(), np.finfo(dtype).tiny)
    np.testing.assert_allclose(Z, expected, rtol=0, atol=10 * np.finfo(dtype).eps * condition * scale)


def test_pinv_exact_singularity_is_finite():
    A = np.zeros((2, 4, 4))
    A[0, 0, 0] = 1.0
    for solver in (PInv(), NewtonSchulz(), Ridge(), PInv(rtol=0.0)):
        result = solver(A)
        assert np.all(np.isfinite(result.inverse))
    # Exact: the SVD of a 0/1 diagonal matrix is exact in floating point.
    np.testing.assert_array_equal(PInv()(A).inverse[0], A[0])
    np.testing.assert_array_equal(PInv()(A).inverse[1], 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_solves_in_float32(dtype):
    A = torch.from_numpy(softmax_matrix(5, 16, temperature=3.0)).to(dtype)
    for name in ("newton_schulz", "pinv", "ridge"):
        result = get_solver(name)(A)
        assert result.inverse.dtype == torch.float32
        # The float32 solve of the same values, bit for bit: an inverse rounded to A's half precision on the way
        # (1.7e-4 and 1.3e-3 off) passed the dtype check alone (a review).
        assert torch.equal(result.inverse, get_solver(name)(A.float()).inverse)


def test_numpy_and_torch_agree():
    A = np.stack([softmax_matrix(s, 8) for s in range(3)])
    # float64: the libraries' BLAS and LAPACK sum in different orders, rounding Z by about cond(A) eps max|Z| (cond(A)
    # up to 151 here); measured at most 0.12 of that (PInv: 2.6e-13 of entries up to 67); 10x.
    cond = float(np.linalg.cond(A).max())
    for solver in (NewtonSchulz(), PInv(), Ridge()):
        expected = solver(A).inverse
        np.testing.assert_allclose(solver(torch.from_numpy(A)).inverse.numpy(), expected, rtol=0,
                                   atol=10 * cond * EPS64 * np.abs(expected).max())


def test_residual_is_zero_for_exact_pinv_of_singular():
    A = random_matrix(6, 9, rank=4, cond=10.0)
    # float64: A Z A rounds by about m cond(A) eps = 9 * 10 * 2.2e-16 = 2e-14; measured 8.8e-16.
    assert float(moore_penrose_residual(A, np.linalg.pinv(A))) < 2e-14


@pytest.mark.parametrize("bad", ["newton", "svd", ""])
def test_unknown_solver_lists_valid(bad):
    with pytest.raises(ValueError, match="unknown solver .*; candidates are:") as err:
        get_solver(bad)
    for name, cls in nystrom.SOLVERS.items():
        assert f"'{name}': {summary(cls)}" in str(err.value)


def test_solver_argument_validation():
    with pytest.raises(ValueError, match="iters"):
        NewtonSchulz(iters=-1)
    with pytest.raises(ValueError, match="rtol"):
        PInv(rtol=2.0)
    with pytest.raises(ValueError, match="lam"):
        Ridge(lam=-1.0)
    with pytest.raises(ValueError, match="A must have shape"):
        PInv()(np.zeros((3, 4)))
    with pytest.raises(TypeError, match="A must have dtype float16, bfloat16, float32 or float64"):
        PInv()(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="solver must be"):
        get_solver(3)


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pinv_default_is_scipys_moore_penrose(rank, dtype):
    # The cut-off is scipy.linalg.pinv's, max(m, m) * eps * sigma_max: singular values at round-off level are
    # dropped, all others inverted. Tolerance: the inverse's entries reach 1/sigma_min = cond; a relative 100 eps
    # of that, per dtype.
    import scipy.linalg

    A = random_matrix(4, 9, rank=rank, cond=1e2).astype(dtype)
    Z = PInv()(A).inverse
    expected = scipy.linalg.pinv(A)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(Z, expected, rtol=0, atol=100 * eps * 1e2)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_a_standalone_pinv_keeps_its_product_and_its_derivative(scale):
    # PInv()(A), which solves in units of a power of two for a matrix of any scale, dropped the product Y -> Z Y whose
    # derivative applies Z once per factor (the pseudo-inverse page): times() then differentiated through Z (a review).
    g = torch.Generator().manual_seed(3)
    A = torch.softmax(torch.randn(2, 6, 6, generator=g, dtype=torch.float64) * 3, dim=-1)
    Y, G = (torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(2))

    def gradient(solve, s):
        a = A.clone().requires_grad_()
        result = solve(a * s)
        return result, torch.autograd.grad((result.times(Y) * G).sum(), a)[0]

    alone, by_call = gradient(PInv(), scale)
    _, kernel = gradient(PInv().solve, 1.0)
    assert alone.product is not None
    # float64, cond(A) below 1e3 here: measured equal to 1e-15 relative; 1e-12 leaves room for cond(A) eps. Z(sA) =
    # Z(A) / s, so the gradient of the scaled call is the kernel's over s (at s = 1e-200 the gradient with respect to
    # sA, about Z^2 = 1e400, is past float64's range before the chain rule scales it back).
    torch.testing.assert_close(alone.times(Y), alone.inverse @ Y, rtol=1e-12, atol=0)
    torch.testing.assert_close(by_call * scale, kernel, rtol=1e-12, atol=0)


def test_pinv_at_m_equals_n_is_exact_attention():
    # solver="pinv" meant a 3e-2 cut-off before, 4 % off exact attention with every token a landmark.
    rng = np.random.default_rng(11)
    Q, K, V = (rng.standard_normal((2, 4, 64, 32)) for _ in range(3))
    out = nystrom.approximate(Q, K, V, strategy="fps", num_landmarks=64, solver="pinv")
    ref = nystrom.exact_attention(Q, K, V)
    # float64 rounding amplified by cond(A), up to 1.6e4 here (worst case cond eps = 3.6e-12); measured 1.7e-14.
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-12


@pytest.mark.parametrize("library,dtype,size", [("numpy", "float64", 1e160), ("torch", "float32", 1e20),
                                                ("torch", "bfloat16", 1e20)])
def test_pinv_names_logits_past_the_dtype_range(library, dtype, size):
    # Finite inputs whose logits overflow make a non-finite kernel: torch's _LinAlgError or numpy's LinAlgError from
    # inside the SVD, naming nothing the caller sets (review). (At 1e19 in float32 the logits fit since the scale goes
    # on the queries first, as SDPA's does; the unscaled products overflowed there before.)
    X = np.random.default_rng(0).standard_normal((1, 12, 4)) * size
    if library == "torch":
        X = torch.from_numpy(X).to(getattr(torch, dtype))
    with pytest.raises(ValueError, match=r"PInv: the SVD of the m x m landmark kernel failed .* scale the inputs down"):
        nystrom.approximate(X, X, X, num_landmarks=4, solver="pinv")


def test_pinv_rtol_zero_is_finite_but_not_the_pseudo_inverse():
    # One duplicated token at m = n makes A exactly singular. rtol=0 inverts its round-off singular value
    # (about 1e-17) and the output is finite but off; the default cut-off drops it and is exact.
    rng = np.random.default_rng(12)
    Q, K, V = (rng.standard_normal((1, 32, 8)) for _ in range(3))
    Q[:, 1], K[:, 1] = Q[:, 0], K[:, 0]
    ref = nystrom.exact_attention(Q, K, V)

    def error(solver):
        out = nystrom.approximate(Q, K, V, strategy="fps", num_landmarks=32, solver=solver)
        assert np.isfinite(out).all()
        return np.linalg.norm(out - ref) / np.linalg.norm(ref)

    # float64: the kept singular values have condition 502, cond eps = 1.1e-13; measured 3.5e-15. The round-off
    # inverse is measured 0.035 off, 35x above the floor below.
    assert error(PInv()) < 1e-13
    assert error(PInv(rtol=0.0)) > 1e-3


def test_regularising_cut_off_is_a_named_choice():
    from nystrom.linalg.solvers import REGULARISING_RTOL

    assert REGULARISING_RTOL == 3e-2
    s = np.array([1.0, 0.1, 0.02])
    A = np.diag(s)
    # float64, a diagonal A: one rounding of each 1 / s, 1 ulp (measured exact).
    np.testing.assert_allclose(np.diag(PInv(rtol=REGULARISING_RTOL)(A).inverse), [1.0, 10.0, 0.0], rtol=EPS64, atol=0)
    np.testing.assert_allclose(np.diag(PInv()(A).inverse), 1 / s, rtol=EPS64, atol=0)


def test_newton_schulz_with_tol_differentiates_as_the_inverse_when_its_start_already_meets_tol():
    # A near the identity: the start A^T / (|A|_1 |A|_inf) met tol at once, 0 steps, and autograd differentiated the
    # start, not the inverse (a review finding: gradient [[-2, 4, 7], ...] for -ones). One step at the fixed point
    # differentiates as -Z dA Z.
    A = torch.eye(3, dtype=torch.float64) + 1e-8 * torch.randn(3, 3, dtype=torch.float64,
                                                                generator=torch.Generator().manual_seed(0))
    grads = []
    for solver in (NewtonSchulz(tol=1e-6), PInv()):
        leaf = A.clone().requires_grad_()
        solver(leaf).inverse.sum().backward()
        grads.append(leaf.grad)
    # float64: one step from a start 1e-8 off the fixed point; measured 1.4e-13 of O(1) entries, 70x below 1e-11. The
    # start's own gradient was off by O(1).
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-11)


def test_pinv_without_a_cutoff_stays_finite_on_a_subnormal_singular_value():
    # 1 / 1e-310 overflows: such a singular value is dropped, as an exactly zero one is (a review finding: inf/NaN).
    result = PInv(rtol=0)(np.diag([1.0, 1e-310]))
    assert np.all(np.isfinite(result.inverse)) and np.isfinite(result.residual)
    np.testing.assert_array_equal(result.inverse, np.diag([1.0, 0.0]))


def reference_residual(A, Z):
    """||AZA - A||_F / ||A||_F in float64, in units of max|A| (no overflow or underflow at any scale)."""
    A, Z = A.astype(np.float64), Z.astype(np.float64)
    t = np.max(np.abs(A))
    A, Z = A / t, Z * t
    return float(np.linalg.norm(A @ Z @ A - A) / np.linalg.norm(A))


# Tolerances of test_solvers_and_their_residuals_hold_at_every_scale, per dtype, each about 10x the largest deviation
# measured over its six cases (cond(A) = 10, m = 6):
# - "inverse": |solver(scale A) scale - solver(A)| / max |solver(A)|, the same iterates in units of the scale: at most
#   3.9e-7 (float32, 3 ulps) and 1.7e-15 (float64, 8 ulps);
# - "residual": |reported - reference_residual| for residuals from 1e-16 to 3e-3: at most 7.6e-8 (float32, 0.6 ulp,
#   the rounding of A Z A - A) and 4.3e-19 (float64: both compute A Z A - A in float64 and differ only in where the
#   scale is divided out);
# - "ridge": |Z - expected| / max |expected| with lam = 1e-2: at most 3.9e-5 (float32, 320 ulps: the normal equations
#   square cond(A)) and 7.1e-14 (float64).
SCALE_TOL = {np.float32: dict(inverse=4e-6, residual=5e-7, ridge=4e-4),
             np.float64: dict(inverse=2e-14, residual=1e-17, ridge=1e-12)}


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e-25), (np.float32, 1e-20), (np.float32, 1e20),
                                              (np.float32, 1e30), (np.float32, 1e37), (np.float64, 1e-160),
                                              (np.float64, 1e200), (np.float64, 1e305)])
def test_solvers_and_their_residuals_hold_at_every_scale(dtype, scale):
    # A review found, past about 1e+-19 in float32 (1e+-154 in float64): Newton-Schulz's start ||A||_1 ||A||_inf
    # over- or underflowed (a NaN inverse, or the unscaled transpose), Ridge's A^T A overflowed into NaN, and the
    # reported residual squared the entries (0 reported for a true 1, NaN for a true 9e-8).
    tol = SCALE_TOL[dtype]
    A0 = random_matrix(3, 6, cond=10.0)
    A = (scale * A0).astype(dtype)
    for solver in (NewtonSchulz(), NewtonSchulz(tol=1e-5), PInv()):
        result = solver(A)
        # The pseudo-inverse scales as 1 / scale: the same iterates in units of the scale, to rounding.
        unscaled = solver(A0.astype(dtype)).inverse
        np.testing.assert_allclose(result.inverse * scale, unscaled, rtol=0,
                                   atol=tol["inverse"] * float(np.abs(unscaled).max()))
        # Within the rounding of the products behind either residual.
        assert float(result.residual) == pytest.approx(reference_residual(A, result.inverse), rel=0,
                                                       abs=tol["residual"])
    lam = 1e-2
    Z = Ridge(lam=lam)(A).inverse
    # sigma_A / (sigma_A^2 + lam) with sigma_A = scale * sigma, from the SVD of A in units of the scale.
    U, sigma, Vt = np.linalg.svd(A.astype(np.float64) / scale)
    expected = (Vt.T * (1 / (sigma * scale + lam / (sigma * scale)))) @ U.T
    assert np.all(np.isfinite(Z))
    np.testing.assert_allclose(Z, expected, rtol=0, atol=tol["ridge"] * float(np.abs(expected).max()))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize(("dtype", "lam"), [(np.float32, 1e-9), (np.float64, 1e-18)])
def test_ridge_solves_a_rank_deficient_kernel_whatever_lam(library, dtype, lam):
    # Two identical landmarks make A rank-deficient; a lam below the rounding of A^T A was lost in it and the normal
    # equations raised LinAlgError (review). The answer is then the pseudo-inverse, 0.25 * ones for A = 0.25 * ones,
    # on the range of A; along its null space Z holds the rounding of the normal equations at the least lam they
    # resolve (documented).
    A = np.full((4, 4), 0.25, dtype=dtype)
    result = Ridge(lam=lam)(A if library == "numpy" else torch.from_numpy(A))
    Z = np.asarray(result.inverse, dtype=np.float64)
    assert np.all(np.isfinite(Z))
    on_range = np.full((4, 4), 0.25)  # the orthogonal projector onto span(ones)
    # Measured: on the range Z is off by at most 1.5e-7 relative in float32 (torch; 1.2e-7 numpy, 1 ulp) and 2.2e-16
    # in float64 (1 ulp), the residual at most 1.2e-7 and 2.2e-16 (1 ulp each); 10 ulps of the dtype for both.
    ulps = 10 * float(np.finfo(dtype).eps)
    np.testing.assert_allclose(on_range @ Z @ on_range, np.full((4, 4), 0.25), rtol=ulps, atol=0)
    assert float(result.residual) < ulps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_newton_schulz_with_tol_keeps_each_matrix_best_iterate(dtype):
    # float32 at a condition number of 1e8 (float64: 1e17), tol out of reach: the iterate diverged to NaN over 100
    # steps (review). Each matrix now returns its least-residual iterate, whatever the others in the batch do.
    rng = np.random.default_rng(0)
    U, V = (np.linalg.qr(rng.standard_normal((8, 8)))[0] for _ in range(2))
    cond = 1e8 if dtype == np.float32 else 1e17
    hard = U @ np.diag(np.logspace(0, -np.log10(cond), 8)) @ V.T
    easy = random_matrix(1, 8, cond=10.0)
    A = np.stack([hard, easy]).astype(dtype)
    result = NewtonSchulz(tol=1e-12)(A)
    assert np.all(np.isfinite(result.inverse)) and np.all(np.isfinite(result.residual))
    assert np.all(np.asarray(result.residual) == moore_penrose_residual(A, result.inverse))
    # Each at most its residual after one step, and the easy matrix converged to its rounding.
    one = NewtonSchulz(iters=1)(A).residual
    assert np.all(np.asarray(result.residual) <= one)
    # Measured 1.5 eps (float32) and 35 eps (float64): the rounding of A Z A over m = 8 terms at cond(A) = 10.
    assert float(result.residual[1]) < 100 * np.finfo(dtype).eps


@pytest.mark.parametrize(("cond", "tol"), [(1e3, 1e-10), (1e8, 1e-12)])
def test_newton_schulz_counts_the_flops_it_runs(monkeypatch, cond, tol):
    # With tol every step after the first reads the residual, two more m x m products each: 13 steps ran 78 products
    # (156 m^3) while flops() said 108 m^3 (review). Counted here: 4 products per step, 2 per residual computed,
    # whether the loop meets tol (cond 1e3) or stops where no residual falls (cond 1e8 in float32).
    import nystrom.linalg.solvers as solvers

    residuals = []
    residual = solvers.residual_of
    monkeypatch.setattr(solvers, "residual_of", lambda xp, A, Z: residuals.append(1) or residual(xp, A, Z))
    A = random_matrix(2, 16, cond=cond).astype(np.float32 if cond > 1e6 else np.float64)
    for solver in (NewtonSchulz(iters=6), NewtonSchulz(tol=tol)):
        residuals.clear()
        steps = solver(A).iterations
        assert solver.flops(16, steps) == (4 * steps + 2 * len(residuals)) * 2 * 16**3, (solver, steps)


@pytest.mark.parametrize("A, Z, error, match", [
    (np.eye(3), np.eye(4), ValueError, "A and Z must have the same shape"),
    (np.eye(3), torch.eye(3, dtype=torch.float64), TypeError, "pass arrays from one library"),
    (np.full((3, 3), np.nan), np.eye(3), ValueError, "A contains NaN or infinite values"),
    (np.eye(3, dtype=int), np.eye(3), TypeError, "A must have dtype"),
    (np.eye(3), np.ones((3, 2)), ValueError, r"Z must have shape \(..., m, m\)"),
])
def test_the_public_residual_checks_its_arguments(A, Z, error, match):
    # It checked nothing: torch raised its own RuntimeError on mismatched shapes, numpy its ValueError, a mix of
    # libraries array_api_compat's message, and NaN gave NaN (a review). The solvers call the unchecked residual_of.
    with pytest.raises(error, match=match):
        moore_penrose_residual(A, Z)


@pytest.mark.parametrize("solver", [NewtonSchulz(), NewtonSchulz(tol=1e-5), PInv(), PInv(rtol=3e-2)])
@pytest.mark.parametrize(("dtype", "exponent"), [(np.float32, 126), (np.float64, 1022), (np.float32, -120)])
def test_solvers_are_exactly_scale_equivariant_to_the_ends_of_the_range(solver, dtype, exponent):
    # The row sums of an 8 x 8 matrix of entries near 1e38 overflow float32: the start A^T / (|A|_1 |A|_inf) was 0, and
    # so was the "inverse", with a residual of 1 (a review); PInv's largest singular value was infinite there, it kept
    # none and answered 0 too (another review). Both run in units of a power of two: scaled by one, the matrix gets
    # the same inverse, scaled back, bit for bit but where that inverse is subnormal (entries of 2**-127 at the top of
    # the range, exact to the subnormals' spacing).
    A = (np.random.default_rng(0).random((2, 8, 8)) + 0.5 + np.eye(8)).astype(dtype)
    scale = dtype(2.0**exponent)
    with np.errstate(over="raise"):
        result = solver(A * scale)
    unscaled = solver(A)
    spacing = float(np.finfo(dtype).smallest_subnormal) * float(scale)
    np.testing.assert_allclose(result.inverse * scale, unscaled.inverse, rtol=0, atol=spacing)
    np.testing.assert_array_equal(result.residual, unscaled.residual)


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e-42), (np.float64, 1e-310)])
def test_newton_schulz_of_a_subnormal_matrix_reports_the_inverse_it_cannot_hold(dtype, scale):
    # The inverse of a matrix of subnormal entries exceeds the dtype's largest number: infinite, with a NaN residual,
    # not NaN entries (as before) nor the small residual of the problem in units of a power of two.
    A = (scale * (np.random.default_rng(0).random((8, 8)) + np.eye(8))).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        result = NewtonSchulz()(A)
    assert not np.any(np.isnan(result.inverse)) and np.all(np.isinf(result.inverse).any(axis=-1))
    assert np.isnan(result.residual)
