r"""Pseudo-inverse solvers for the small :math:`m \times m` landmark kernel :math:`A`.

Every solver is a small frozen :class:`Solver` (``NewtonSchulz(iters=6)``, ``PInv()``,
``Ridge(lam=1e-2)``) called as ``solver(A)`` on a batch ``A (..., m, m)``; the strings
``"newton_schulz"``, ``"pinv"`` and ``"ridge"`` are short forms for the defaults, and
:data:`SOLVERS` is derived from the subclasses' declared names. All of them
compute in float32 or wider, whatever the input dtype, so half-precision callers never overflow in
the solve, and all report the relative Moore–Penrose residual

.. math:: r(Z) = \frac{\lVert A Z A - A \rVert_F}{\lVert A \rVert_F}

per matrix, which is 0 for the exact pseudo-inverse of any (also singular) :math:`A`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat

from .numerics import carries_derivatives, detached, power_of_two_unit
from .validation import check_finite, check_int, check_real, check_real_floating, namespace, register, resolve


@dataclass(frozen=True)
class SolveResult:
    """What a solver returns.

    Attributes
    ----------
    inverse : array, shape (..., m, m)
        The (approximate, regularised or truncated) pseudo-inverse, in float32 or float64.
    residual : array, shape (...)
        Relative Moore–Penrose residual :math:`\\lVert AZA-A\\rVert_F/\\lVert A\\rVert_F` per matrix.
        NaN where the inverse does not fit the dtype (:class:`NewtonSchulz` on a matrix of subnormal entries).
    iterations : int
        Iterations run (0 for direct solvers).
    product : callable, optional
        ``product(Y) -> Z @ Y``, for solvers whose derivative is better formed against ``Y`` than through
        ``inverse`` (:meth:`times` uses it; ``None``: ``inverse @ Y``).
    """

    inverse: Any
    residual: Any
    iterations: int = 0
    product: Any = field(default=None, repr=False, compare=False)

    def times(self, Y):
        """:math:`Z Y` for ``Y (..., m, k)``: ``inverse @ Y``, or where the solver gave one, its ``product``, equal
        in value with a derivative that applies :math:`Z` once per factor (:class:`PInv`'s notes)."""
        return self.inverse @ Y if self.product is None else self.product(Y)


SOLVERS: dict[str, type] = {}
"""Solver names accepted by :func:`get_solver` and ``nystrom.approximate``, derived from the :class:`Solver`
subclasses' declared ``name``."""


class Solver:
    """Base class of the pseudo-inverse solvers: a solver implements :meth:`solve` and :meth:`flops`.

    ``solver(A)`` checks ``A`` (a finite real ``(..., m, m)`` array; reading the values is a host
    synchronisation on accelerators) and runs :meth:`solve_any` (:meth:`solve`, for a matrix of any scale) in float32
    or wider. Library code that builds ``A`` itself calls :meth:`solve` directly (see :func:`unchecked`).

    Attributes
    ----------
    name : str
        The short form accepted by ``solver=...``; subclasses declare it as ``class X(Solver, name="x")`` (one not
        taken; a subclass without one is not registered).
    iterative : bool
        Whether :attr:`SolveResult.iterations` can be non-zero.
    """

    name: ClassVar[str]
    iterative: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str | None = None, iterative: bool | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if iterative is not None:
            cls.iterative = iterative
        if name is not None:
            # A subclass without a name (a helper of a user's) is not registered, and keeps its parent's.
            cls.name = name
            register(SOLVERS, name, cls, "solver")

    def __call__(self, A) -> SolveResult:
        xp = namespace(A=A)
        check_square_matrices(xp, "A", A)
        check_finite(xp, A=A)
        # The m x m solve is cheap, so it always runs in float32 or float64: half precision would
        # lose the small singular values and overflow in the cubic Newton-Schulz products.
        return self.solve_any(xp.astype(A, xp.float64 if A.dtype == xp.float64 else xp.float32))

    def solve_any(self, A) -> SolveResult:
        """:meth:`solve` of a checked float32/float64 ``A`` of any scale (``solver(A)``); the library's own kernels,
        softmax matrices of entries in [0, 1], go to :meth:`solve` directly."""
        return self.solve(A)

    def solve(self, A) -> SolveResult:
        """Pseudo-inverse of a checked float32/float64 ``A (..., m, m)``."""
        raise NotImplementedError

    def flops(self, m: int, iterations: int) -> int:
        """Floating-point operations of one solve of an ``m x m`` matrix that ran ``iterations`` steps."""
        raise NotImplementedError


def solve_in_units(solver, A) -> SolveResult:
    r"""``solver.solve`` of ``A`` in units of a power of two :math:`u` near :math:`\max|A|` per matrix,
    :math:`(uA)^+ u = A^+`: exact, the same steps bit for bit wherever nothing over- or underflows, for a matrix of
    any scale. An inverse past the dtype's range (that of a subnormal matrix) is infinite, with a NaN residual. (A
    softmax kernel, the library's, needs none of this: :meth:`Solver.solve`.)"""
    xp = array_api_compat.array_namespace(A)
    unit = detached(power_of_two_unit(xp, _largest_entry(xp, A)))
    result = solver.solve(A * unit)
    Z = result.inverse * unit
    fits = xp.all(xp.isfinite(Z), axis=(-2, -1))
    residual = xp.where(fits, result.residual, xp.full_like(result.residual, float("nan")))
    # Z Y = (uA)^+ (uY): the solver's own product, with its derivative, in the same units (a review: a standalone
    # PInv()(A) returned none, so its times() lost the one-Z-per-factor gradient the pseudo-inverse page derives).
    product = None if result.product is None else (lambda Y: result.product(Y * unit))
    return SolveResult(Z, residual, result.iterations, product)


def check_square_matrices(xp, name, X):
    r"""``X`` is a real floating ``(..., m, m)`` array with :math:`m \ge 1`."""
    check_real_floating(xp, name, X)
    if X.ndim < 2 or X.shape[-1] != X.shape[-2] or X.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., m, m) with m >= 1, got {tuple(X.shape)}")


def unchecked(solver):
    """The callable that inverts an ``A`` the library built itself: :meth:`Solver.solve` for a :class:`Solver`
    (no second check of ``A``); for a plain callable, the callable with its result's type checked (a tensor has an
    ``inverse`` method, so an array returned instead of a :class:`SolveResult` would fail far from here)."""
    if isinstance(solver, Solver):
        return solver.solve

    def solve(A):
        result = solver(A)
        if not isinstance(result, SolveResult):
            raise TypeError(f"a solver callable must return a SolveResult(inverse, residual, iterations), got "
                            f"{type(result).__name__}; e.g. lambda A: SolveResult(f(A), None, 0)")
        # An inverse of another library or device (numpy for torch inputs) would fail deep in the next product.
        namespace(A=A, **{"the solver callable's inverse": result.inverse})
        shape = tuple(result.inverse.shape)
        if shape != tuple(A.shape):
            raise ValueError(f"a solver callable must return an inverse of the shape of A, {tuple(A.shape)} "
                             f"(..., m, m), got {shape}")
        return result

    return solve


def _eye(xp, A):
    return xp.eye(A.shape[-1], dtype=A.dtype, device=array_api_compat.device(A))


def _norms_1_inf(xp, A):
    r""":math:`\lVert A\rVert_1` and :math:`\lVert A\rVert_\infty` per matrix, shape ``(..., 1, 1)``: their product
    bounds :math:`\sigma_{\max}^2`."""
    magnitudes = xp.abs(A)
    return (xp.max(xp.sum(magnitudes, axis=-2), axis=-1)[..., None, None],
            xp.max(xp.sum(magnitudes, axis=-1), axis=-1)[..., None, None])


def _largest_entry(xp, A):
    r""":math:`\max|A|` per matrix, shape ``(..., 1, 1)``: the unit in which squares neither over- nor underflow."""
    return xp.max(xp.abs(A), axis=(-2, -1), keepdims=True)


def _frobenius(xp, X):
    return xp.sqrt(xp.sum(X * X, axis=(-2, -1)))


def moore_penrose_residual(A, Z):
    r"""Relative Moore–Penrose residual :math:`\lVert A Z A - A\rVert_F / \lVert A\rVert_F` per matrix.

    Parameters
    ----------
    A : array, shape (..., m, m)
        Finite and real.
    Z : array, shape (..., m, m)
        A candidate pseudo-inverse of ``A``: finite, real, of the same library and shape.

    Returns
    -------
    array, shape (...)
        0 for the exact pseudo-inverse of any (also singular) ``A``; 0 for the zero matrix.

    Raises
    ------
    TypeError, ValueError
        For arrays of two libraries or devices, of a non-real dtype, of other shapes, or holding NaN or infinity.
    """
    xp = namespace(A=A, Z=Z)
    check_square_matrices(xp, "A", A)
    check_square_matrices(xp, "Z", Z)
    if tuple(A.shape) != tuple(Z.shape):
        raise ValueError(f"A and Z must have the same shape, got {tuple(A.shape)} and {tuple(Z.shape)}")
    check_finite(xp, A=A, Z=Z)
    return residual_of(xp, A, Z)


def residual_of(xp, A, Z):
    """:func:`moore_penrose_residual` of checked arrays (the solvers' own, on every solve: no host read)."""
    A = xp.astype(A, Z.dtype)
    # In units of max|A| (A / t, Z t: the same ratio): squared entries of 1e-25 or 1e20 in float32 would underflow to
    # a residual of 0 or overflow to NaN.
    t = _largest_entry(xp, A)
    t = xp.where(t > 0, t, xp.ones_like(t))
    A, Z = A / t, Z * t
    norm = _frobenius(xp, A)
    # The zero matrix is its own pseudo-inverse's pseudo-inverse: report 0/1, not 0/0.
    return _frobenius(xp, A @ Z @ A - A) / xp.where(norm > 0, norm, xp.ones_like(norm))


@dataclass(frozen=True)
class NewtonSchulz(Solver, name="newton_schulz", iterative=True):
    r"""Iterative Moore–Penrose inverse of Razavi et al. (2014), as used by Nyströmformer and FNA.

    .. math::

        Z_0 = \frac{A^\top}{\lVert A\rVert_1 \lVert A\rVert_\infty}, \qquad
        Z_{k+1} = \tfrac14 Z_k\bigl(13 I - A Z_k (15 I - A Z_k (7 I - A Z_k))\bigr)

    With :math:`E_k = I - A Z_k` one step gives :math:`E_{k+1} = \tfrac34 E_k^3 + \tfrac14 E_k^4`
    (third-order convergence once :math:`\lVert E_k\rVert < 1`). The scaling is computed **per
    matrix**, as the FNA authors do (Nyströmformer's "original" mode and lucidrains' ``nystrom-attention``
    take one maximum over the whole batch, which slows or breaks convergence for every matrix but the
    worst). :math:`\sigma_{\max}^2 \le \lVert A\rVert_1\lVert A\rVert_\infty`
    holds for every matrix, so :math:`Z_0` converges for any :math:`A`; for row-softmax matrices
    :math:`\lVert A\rVert_\infty = 1` and the start reduces to the peers' :math:`A^\top/\lVert A\rVert_1`.

    Parameters
    ----------
    iters : int
        Fixed number of iterations (6 as in Nyströmformer/FNA) when ``tol`` is None.
    tol : float, optional
        If given, each matrix stops at its first iterate whose Moore–Penrose residual is ``<= tol``, or at the first
        step that does not lower its residual (its rounding floor), keeping its iterate of least residual, which is
        reported, never raised; the batch steps on for the others up to ``max_iters``, so a batched solve equals the
        solves one by one. Each test reads the residual: one host synchronisation per step on an accelerator.
    max_iters : int
        Cap for the tolerance mode.

    Notes
    -----
    A fixed small iteration count is a *regulariser*: singular values of :math:`A` far below
    :math:`\sigma_{\max}` are not yet inverted after 6 steps, so directions that an exact
    pseudo-inverse would amplify by :math:`1/\sigma_{\min}` stay damped. On clustered real tokens
    this gives far smaller attention-output errors than an exact inverse (see the docs' solver
    page for the measurement). Cost: :math:`8 m^3` flops per iteration.
    """

    iters: int = 6
    tol: float | None = None
    max_iters: int = 100

    def __post_init__(self):
        check_int("NewtonSchulz iters", self.iters, minimum=0)
        check_int("NewtonSchulz max_iters", self.max_iters, minimum=0)
        if check_real("NewtonSchulz tol", self.tol, optional=True) is not None and not (0 < self.tol < math.inf):
            raise ValueError(f"NewtonSchulz tol must be positive or None, got {self.tol!r}")

    def solve_any(self, A) -> SolveResult:
        r"""The iterations in units of a power of two near :math:`\max|A|` (:func:`solve_in_units`): the norms and
        products of a matrix of entries near 1e38 in float32 overflowed to a zero start (an inverse of 0, a residual
        of 1) and subnormal entries gave NaN."""
        return solve_in_units(self, A)

    def solve(self, A) -> SolveResult:
        xp = array_api_compat.array_namespace(A)
        eye = _eye(xp, A)
        norm_1, norm_inf = _norms_1_inf(xp, A)
        # One norm at a time: their product over- or underflows for entries past about 1e+-19 in float32. An all-zero
        # matrix has pseudo-inverse 0; avoid 0/0 by dividing by 1 there.
        Z = (xp.matrix_transpose(A) / xp.where(norm_1 > 0, norm_1, xp.ones_like(norm_1))
             / xp.where(norm_inf > 0, norm_inf, xp.ones_like(norm_inf)))
        steps = self.iters if self.tol is None else self.max_iters
        done = 0
        # The scaled identities once, not in every step: on m x m matrices each small operation costs more in
        # dispatch than in arithmetic.
        eye7, eye13, eye15 = 7 * eye, 13 * eye, 15 * eye
        best = best_residual = active = None

        def kept(Z, residual):
            # Each matrix stops where it would alone: at its first iterate within tol, or at the first step that did
            # not lower its residual, keeping its best iterate (past 1/sigma_min of about 1/eps, A Z loses its digits
            # and the cubic step diverges: a review found NaN after 100 steps in float32 at a condition number of
            # 1e8). The batch steps on for the others, and a stopped matrix takes none of their later iterates (a
            # review found an inverse 69 % off its own solve next to a matrix of condition 1e6, and one 155 % off
            # where a stalled matrix took a later improvement while another matrix still improved). Returns the best
            # iterates, their residuals and which matrices go on.
            if best is None:
                return Z, residual, residual > self.tol
            take = active & (residual < best_residual)
            best_now = xp.where(take, residual, best_residual)
            return xp.where(take[..., None, None], Z, best), best_now, take & (best_now > self.tol)

        for _ in range(steps):
            # At least one step before the test: the start A^T / (|A|_1 |A|_inf) may already meet tol (A near a
            # scaled orthogonal matrix), and it differentiates as itself, not as the inverse; one step at the fixed
            # point differentiates as -Z dA Z, the inverse's derivative (a review found the start's gradient).
            if self.tol is not None and done > 0:
                best, best_residual, active = kept(Z, residual_of(xp, A, Z))
                if not bool(xp.any(active)):
                    # Every matrix met tol or reached its rounding floor (or diverged): the best iterates' residuals
                    # are known, none is computed again.
                    return SolveResult(best, best_residual, done)
            AZ = A @ Z
            Z = 0.25 * Z @ (eye13 - AZ @ (eye15 - AZ @ (eye7 - AZ)))
            done += 1
        if self.tol is None:
            return SolveResult(Z, residual_of(xp, A, Z), done)
        best, best_residual, _ = kept(Z, residual_of(xp, A, Z))
        return SolveResult(best, best_residual, done)

    def flops(self, m, iterations):
        """Four :math:`m^3` products per step plus two for the residual; with ``tol``, two more per step for the
        residual each step after the first reads."""
        tests = 0 if self.tol is None else max(iterations - 1, 0)
        return (4 * iterations + 2 * tests + 2) * 2 * m**3


#: The regularising cut-off of :class:`PInv`, ``PInv(rtol=REGULARISING_RTOL)``: the best of 1e-12 ... 1e-1 for the
#: output error on real attention (DINOv2-S, MiniLM; table and command on the docs' pseudo-inverse page).
REGULARISING_RTOL = 3e-2


@dataclass(frozen=True)
class PInv(Solver, name="pinv"):
    r"""Moore–Penrose pseudo-inverse by SVD, as ``scipy.linalg.pinv``.

    :math:`Z = V \Sigma_r^{-1} U^\top`: singular values :math:`\sigma_i \le \mathrm{rtol}\cdot\sigma_{\max}` are
    dropped.

    Parameters
    ----------
    rtol : float, optional
        Relative cut-off. The default (``None``) is scipy's, :math:`m\,\varepsilon` of the working dtype
        (float32 or float64): singular values at round-off level are dropped, every other one is inverted,
        and with all tokens as landmarks the output equals exact attention up to rounding amplified by the
        smallest kept singular value (:func:`nystrom.approximate`'s ``num_landmarks`` gives the orders of magnitude:
        1e-5 in float32 on Gaussian tokens, 1e-3 in float64 on a numerically low-rank kernel, where a cut-off of
        1e-10 gives 1e-9). On real attention with
        :math:`m \ll n` an exact inverse amplifies the noise directions of :math:`A` into errors larger than
        the signal; ``PInv(rtol=REGULARISING_RTOL)`` (3e-2, the best cut-off measured on the docs'
        pseudo-inverse page) regularises instead. ``rtol=0`` inverts every non-zero singular value,
        round-off included: finite for an exactly singular :math:`A`, but not its pseudo-inverse (with one
        duplicated token at :math:`m = n`, relative output errors of 0.02-0.19 against at most 2e-14 for the
        default on five Gaussian draws, n = 32, d = 8; the size depends on the data).

    Raises
    ------
    ValueError
        From :meth:`solve`, where the SVD fails on a kernel that holds NaN or infinity: with finite inputs, attention
        logits past the working dtype's range, where exact attention overflows too. (``NewtonSchulz`` returns NaN
        there without a word: telling would cost a read of the data, a host synchronisation on CUDA.)

    Notes
    -----
    Cost: one batched SVD, :math:`O(m^3)`. The gradient does not go through the SVD, whose backward
    divides by :math:`\sigma_i^2 - \sigma_j^2` and gives NaN when singular values repeat (a strongly
    diagonal :math:`A \approx I`). It is the derivative of the pseudo-inverse at fixed rank
    (Golub & Pereyra, 1973),

    .. math:: dZ = -Z\,dA\,Z + Z Z^\top dA^\top (I - AZ) + (I - ZA)\, dA^\top Z^\top Z,

    exact when no singular value is dropped (then :math:`dZ = -Z\,dA\,Z`). With a cut-off that drops some it is
    the derivative of the pseudo-inverse of a matrix of rank :math:`r` held at rank :math:`r`, which leaves out
    how a perturbation moves the kept singular subspace into the dropped one: it is *not* the derivative of the
    truncated inverse :math:`V\Sigma_r^{-1}U^\top`. A review measured the difference at 0.1 %, 8 %, 36 % and
    60 % for kept/dropped singular values of 0.5/0.001, 0.1/0.01, 0.05/0.02 and 0.04/0.025 (the closer they
    are, the larger), and 1.3 % end to end in :math:`\partial\hat O/\partial Q` with ``PInv(rtol=3e-2)``, which
    ``gradcheck`` fails. It is built from the SVD's value held constant (``Tensor.detach``) plus terms in
    :math:`A - A_0`, which are 0 in value; :math:`I - AZ` and :math:`I - ZA` are the SVD's projectors on the
    dropped singular vectors (0 when none is dropped). The term :math:`Z\,dA\,Z\,dA\,Z` of second order makes
    second derivatives (``create_graph=True``, Hessian-vector products) those of :math:`A^{-1}` where no singular
    value is dropped; with dropped ones they lack the second-order terms of the projectors.
    :attr:`SolveResult.product` applies the same derivative
    to :math:`Y` in :math:`ZY`, so that :math:`\partial L/\partial A = -(Z^\top G)(ZY)^\top` meets :math:`Z` once per
    factor (rounding like :math:`\kappa(A)\varepsilon`, not :math:`\kappa(A)^2\varepsilon`; the docs'
    pseudo-inverse page).
    """

    rtol: float | None = None

    def __post_init__(self):
        if check_real("PInv rtol", self.rtol, optional=True) is not None and not (0 <= self.rtol < 1):
            raise ValueError(f"PInv rtol must be None or in [0, 1), got {self.rtol!r}")

    def solve_any(self, A) -> SolveResult:
        r"""The SVD in units of a power of two near :math:`\max|A|` (:func:`solve_in_units`): a well-conditioned
        matrix of entries near 1e308 in float64 (2e38 in float32) had an infinite largest singular value, kept none
        and gave an inverse of 0 (a review)."""
        return solve_in_units(self, A)

    def solve(self, A) -> SolveResult:
        xp = array_api_compat.array_namespace(A)
        A0 = detached(A)
        try:
            U, s, Vh = xp.linalg.svd(A0, full_matrices=False)
        except (RuntimeError, ValueError) as error:
            # torch's _LinAlgError is a RuntimeError, numpy's LinAlgError a ValueError: both name no cause a user sets.
            raise ValueError(
                f"PInv: the SVD of the m x m landmark kernel failed ({error}). The kernel holds NaN or infinity: the "
                f"queries or keys hold some (in a patched model, an earlier layer's output may have overflowed), or "
                f"the attention logits passed the range of {A.dtype} (|q| |k| scale near or above "
                f"{float(xp.finfo(A.dtype).max):.1e}, where exact attention overflows too): scale the inputs down"
            ) from error
        rtol = self.rtol if self.rtol is not None else A.shape[-1] * xp.finfo(A.dtype).eps
        # Nor a singular value whose reciprocal overflows (a subnormal one, 1e-310 in float64): A^+ stays finite.
        keep = (s > rtol * s[..., :1]) & (s > 1 / float(xp.finfo(A.dtype).max))
        s_inv = xp.where(keep, 1 / xp.where(keep, s, xp.ones_like(s)), xp.zeros_like(s))
        V, Ut = xp.matrix_transpose(Vh), xp.matrix_transpose(U)
        Z0 = V @ (s_inv[..., None] * Ut)
        if not carries_derivatives(A):
            return SolveResult(Z0, residual_of(xp, A, Z0), 0)
        # Value Z0 (dA = A - A0 is exactly 0), derivative Golub-Pereyra's: see the class notes. I - AZ and I - ZA are
        # the projectors on the dropped singular vectors, from the SVD: exactly 0 when none is dropped (formed as
        # I - A0 Z0 they were rounding noise, which the products with Z0 Z0^T amplified).
        dropped = xp.astype(~keep, A0.dtype)[..., None, :]
        left, right = (U * dropped) @ Ut, (V * dropped) @ Vh
        dA = A - A0
        dAt, Z0t = xp.matrix_transpose(dA), xp.matrix_transpose(Z0)
        # Every product takes dA (exactly 0 in value) before a second Z0: Z0 Z0^T overflows where Z0 is near the
        # dtype's largest (rtol=0 on duplicated tokens), and inf * 0 made the value NaN (a review). The second-order
        # term Z0 dA Z0 dA Z0 gives second derivatives (d^2 A^{-1} = 2 Z dA Z dA Z; a review: an HVP 17 times off
        # without it).
        first = Z0 @ dA
        Z = (Z0 - first @ Z0 + first @ (first @ Z0) + Z0 @ (Z0t @ (dAt @ left))
             + ((right @ dAt) @ Z0t) @ Z0)

        def product(Y):
            # The same derivative applied to Y right to left: the gradient of -Z0 dA (Z0 Y) is -(Z0^T G)(Z0 Y)^T, Z0
            # once per factor; through Z's -Z0 dA Z0 it was Z0^T ((G Y^T) Z0^T), whose rounding grew like cond(A)^2
            # (a review: dQ 38 times its size at m = n, cond(A) = 9e12, float64).
            W0 = Z0 @ Y
            step = Z0 @ (dA @ W0)
            return (W0 - step + Z0 @ (dA @ step) + Z0 @ (Z0t @ (dAt @ (left @ Y)))
                    + ((right @ dAt) @ Z0t) @ W0)

        return SolveResult(Z, residual_of(xp, A, Z), 0, product)

    def flops(self, m, iterations=0):
        """Golub–Van Loan's ~:math:`21 m^3` for a full SVD, one product to form :math:`Z`, two for the residual."""
        return 21 * m**3 + 3 * 2 * m**3


@dataclass(frozen=True)
class Ridge(Solver, name="ridge"):
    r"""Tikhonov-regularised (ridge) pseudo-inverse, with an absolute regularisation ``lam``.

    :math:`Z = (A^\top A + \lambda I)^{-1} A^\top`: each singular value :math:`\sigma` of :math:`A` is inverted as
    :math:`\sigma / (\sigma^2 + \lambda)`: exact for :math:`\sigma^2 \gg \lambda`, damped to 0 for
    :math:`\sigma^2 \ll \lambda`, and :math:`Z \to A^+` as :math:`\lambda \to 0`.

    Parameters
    ----------
    lam : float
        Regularisation :math:`\lambda > 0`, absolute. Softmax matrices satisfy
        :math:`1 \le \sigma_{\max} \le \sqrt{m}`, so an absolute value is on a known scale. The
        default ``1e-2`` was the best of 1e-6 ... 1e-1 in the measurement on the docs'
        pseudo-inverse page.

    Notes
    -----
    One batched linear solve of the normal equations, :math:`O(m^3)`, in units of
    :math:`\max(\max|A|, \sqrt\lambda)` (no overflow, whatever the scales of :math:`A` and ``lam``). Squaring
    :math:`A` squares its condition number, so ``lam`` well above ``eps * sigma_max**2`` is needed for accuracy; a
    smaller one acts as :math:`\varepsilon \lVert A\rVert_1 \lVert A\rVert_\infty` (the rounding of
    :math:`A^\top A`, with a bound on :math:`\sigma_{\max}^2`), the least the working precision resolves, which
    keeps the normal equations of a rank-deficient :math:`A` (duplicated landmarks) solvable: :math:`AZA = A` to
    rounding, but :math:`Z` along the null space of :math:`A` is rounding noise (a review measured 7–20 % of the
    pseudo-inverse's entries on random rank-1 float32 kernels with ``lam=1e-9``; ``PInv`` is the solver for such
    kernels).
    """

    lam: float = 1e-2

    def __post_init__(self):
        # lam = 0 is the normal equations without regularisation: singular for a rank-deficient A (use PInv).
        if not (0 < check_real("Ridge lam", self.lam) < math.inf):
            raise ValueError(f"Ridge lam must be positive and finite (PInv for no regularisation), got {self.lam!r}")

    def solve(self, A) -> SolveResult:
        xp = array_api_compat.array_namespace(A)
        # In units t = max(max|A|, sqrt(lam)) per matrix, Z = (Â^T Â + lam' I)^-1 Â^T / t with Â = A / t and
        # lam' = lam / t^2 <= 1: the same Z, but A^T A cannot overflow (|A| of 1e20 in float32 gave NaN) and lam I
        # cannot be inf (lam of 1e39 in float32). sqrt(lam) is clipped to the dtype's range (past it, A^T / lam is 0).
        root = min(math.sqrt(self.lam), float(xp.finfo(A.dtype).max))
        t = xp.maximum(_largest_entry(xp, A), xp.full((), root, dtype=A.dtype, device=array_api_compat.device(A)))
        # sqrt(lam) may round to 0 in float32 (lam below 1e-90) for an all-zero A: any unit will do there.
        t = xp.where(t > 0, t, xp.ones_like(t))
        unit = A / t
        unit_t = xp.matrix_transpose(unit)
        # A lam below the rounding of Â^T Â (eps ||Â||_1 ||Â||_inf, with a bound on sigma_max^2) would be lost in it,
        # and a rank-deficient A (duplicated landmarks) would make the normal equations exactly singular (LinAlgError):
        # it acts as that rounding, the least the working precision resolves.
        norm_1, norm_inf = _norms_1_inf(xp, unit)
        lam = xp.maximum((root / t) ** 2, xp.finfo(A.dtype).eps * norm_1 * norm_inf)
        Z = xp.linalg.solve(unit_t @ unit + lam * _eye(xp, A), unit_t) / t
        return SolveResult(Z, residual_of(xp, A, Z), 0)

    def flops(self, m, iterations=0):
        r""":math:`A^\top A`, an LU solve with :math:`m` right-hand sides (~:math:`\tfrac83 m^3`), two residual
        products."""
        return 2 * m**3 + (8 * m**3) // 3 + 2 * 2 * m**3


def get_solver(solver):
    """Return a solver object for a name, an existing solver object or any callable ``A -> SolveResult``.

    Parameters
    ----------
    solver : str or callable
        A name in :data:`SOLVERS` (``"newton_schulz"``, ``"pinv"``, ``"ridge"``), giving the default object.

    Returns
    -------
    callable
        ``solver(A (..., m, m)) -> SolveResult``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists each candidate and what it does.
    TypeError
        For anything that is neither a string nor callable.
    """
    # Imported here: the landmark strategies import the solvers (FNA_AUTHORS holds one).
    from .landmarks.base import Strategy

    return resolve("solver", SOLVERS, solver, Solver, other=(Strategy, "strategy"))
