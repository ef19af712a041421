"""Error-controlled :math:`m`: the doubling search behind ``approximate(tol=...)`` and ``patch(tol=...)``."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

#: Exact query rows behind every estimate of a search, and the level of its interval: the measured coverage of
#: the 95 % interval is at least 93.5 % from 128 rows (docs' error-bounds page).
SAMPLED_ROWS = 128
CONFIDENCE = 0.95

#: Newton–Schulz steps the search adds when the default solver cannot reach ``tol`` (see :func:`stronger`).
EXTRA_ITERATIONS = 4


class TolStep(NamedTuple):
    """One step of the search: the :math:`m` tried, the estimated error there, and the solver used."""

    m: int
    estimate: Any  # ErrorEstimate (bounds imports validation, which imports this module)
    solver: Any


def ceiling(m, largest, max_landmarks=None):
    """The largest :math:`m` a search from ``m`` may try: ``max_landmarks`` (clipped to ``largest``, the most the
    keys allow), by default half of ``largest``, beyond which self-attention costs more than exact attention;
    never below ``m``."""
    return max(m, largest // 2 if max_landmarks is None else min(max_landmarks, largest))


def stronger(solver):
    r"""The solver the search escalates to when ``solver`` cannot reach ``tol``, or ``None``.

    Six Newton–Schulz steps regularise: singular values of the landmark kernel far below :math:`\sigma_{\max}`
    are not yet inverted, which keeps an error floor that more landmarks do not lower. Where the kernel is well
    represented (DINOv2-S layers 0, 5, 7 at 518 px) ten steps reach a few per cent at :math:`m \le n/2`; where it
    is not (layers 1–4), more steps *raise* the error (an exact pseudo-inverse amplifies it tenfold or more), so
    the search keeps the escalated step only where the estimate says it is better. Only a fixed-step
    :class:`~nystrom.linalg.solvers.NewtonSchulz` escalates, to ``iters + EXTRA_ITERATIONS`` steps.
    """
    from .solvers import NewtonSchulz  # solvers imports validation, which imports this module

    if isinstance(solver, NewtonSchulz) and solver.tol is None:
        return NewtonSchulz(iters=solver.iters + EXTRA_ITERATIONS, max_iters=solver.max_iters)
    return None


def search_landmarks(attempt, estimate, first, largest, tol, strict, solver):
    r"""Double :math:`m` from ``first`` until the estimated error's upper bound is at most ``tol``; where the solver
    is the limit, escalate it.

    1. Doubling: :math:`m = m_0, 2m_0, 4m_0, \dots` up to ``largest``, with ``solver``, until a bound is at most
       ``tol``. It stops early after two doublings in a row that do not lower the best bound (the solver's floor:
       six Newton–Schulz steps regularise, and their error does not vanish even at :math:`m = n`). Geometric
       growth makes the steps before the last cost at most about as much as the last, for costs linear in
       :math:`m`.
    2. Escalation, only when 1. missed ``tol`` and :func:`stronger` gives a solver: the stronger solver at the
       :math:`m` tried in 1., from the largest down, while its bound is at most ``tol``; the smallest such
       :math:`m` is returned (so :math:`m` is within a factor 2 of the smallest on that grid that meets ``tol``
       with the stronger solver). It costs at most about two calls at the largest :math:`m` tried.

    Parameters
    ----------
    attempt : callable
        ``attempt(m, solver) -> result`` (the approximation at :math:`m` with ``solver``).
    estimate : callable
        ``estimate(result) -> ErrorEstimate``, from one sample of exact rows for every step.
    first, largest : int
        Starting and largest :math:`m`, ``first <= largest``.
    tol : float
    strict : bool
        On a miss, raise ``RuntimeError`` instead of warning (``UserWarning``).
    solver : Solver or callable
        The solver of the doubling.

    Returns
    -------
    result
        That of the returned step: the last step within ``tol``, else the one with the lowest bound.
    steps : tuple of TolStep
        Every step tried, in order, then the returned one again when it is not the last.
    """
    def step(m, with_solver):
        result = attempt(m, with_solver)
        return result, TolStep(m, estimate(result), with_solver)

    best_result, first_step = step(first, solver)
    steps = (first_step,)
    best = 0
    m = first
    while steps[best].estimate.high > tol and m < largest and len(steps) - 1 - best < 2:
        m = min(2 * m, largest)
        result, tried = step(m, solver)
        steps += (tried,)
        if tried.estimate.high < steps[best].estimate.high:
            best, best_result = len(steps) - 1, result
    stalled = len(steps) - 1 - best >= 2
    escalated = stronger(solver) if steps[best].estimate.high > tol else None
    if escalated is not None:
        # Down from the largest m: the stronger solver pays where the solver, not m, limited the error.
        for m in sorted({tried.m for tried in steps}, reverse=True):
            result, tried = step(m, escalated)
            steps += (tried,)
            if tried.estimate.high <= tol or tried.estimate.high < steps[best].estimate.high:
                best, best_result = len(steps) - 1, result
            if tried.estimate.high > tol:
                break
    if best != len(steps) - 1:
        steps += (steps[best],)
    if steps[-1].estimate.high > tol:
        m, last = steps[-1].m, steps[-1].estimate
        why = (f"the error stopped falling after m={m} (the solver's floor: try solver='pinv' or "
               f"NewtonSchulz(iters=...))" if stalled else f"max_landmarks={largest} reached")
        if escalated is not None:
            why += f", also with {escalated!r}"
        message = (f"tol={tol} not reached, {why}: estimated error {last.estimate:.3g}, "
                   f"95% interval [{last.low:.3g}, {last.high:.3g}]")
        if strict:
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return best_result, steps
