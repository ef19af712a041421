"""Error-controlled :math:`m`: the doubling search behind ``approximate(tol=...)`` and ``patch(tol=...)``."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

from .attention import nystrom_output
from .bounds import ErrorEstimate, query_positions, sample_rows, with_interpolation_census
from .flops import exact_attention_flops, nystrom_attention_flops
from .solvers import NewtonSchulz, PInv, Ridge, Solver
from .validation import outside_stacklevel, real_key_counts

#: Exact query rows behind every estimate of a search, and the level of its interval: with the high-norm and
#: self-attending queries apart, and the 16 rows of largest interpolation weights and the strata of unrepresented
#: queries that confirm a bound within tol, the measured coverage of the 95 % interval is at least 93.2 % on 37
#: families (79.8 % on sharply clustered tokens with ``norm`` landmarks from the 128 alone; docs' error-bounds page),
#: and on isolated tokens among tight clusters no answer of 100 at tol = 0.1 was above it
#: (``python docs/scripts/isolated_tokens.py``).
SAMPLED_ROWS = 128
CONFIDENCE = 0.95

#: Newton–Schulz steps the search adds when the default solver cannot reach ``tol`` (see :func:`stronger`).
EXTRA_ITERATIONS = 4


class TolStep(NamedTuple):
    """One step of the search: the :math:`m` tried, the estimated error there, and the solver used."""

    m: int
    estimate: ErrorEstimate
    solver: Any  # a Solver, a callable, or EXACT


#: The solver of an exact step of the search: exact attention, the answer with every key as a landmark.
EXACT = "exact"

#: Without a budget, Nyström attention is tried only at an :math:`m` that takes at most this fraction of exact
#: attention's FLOPs. Then a search of doublings that ends in exact attention takes at most about twice its FLOPs:
#: its steps sum to under one exact call (each step costs at most this fraction, and each earlier one at most half the
#: next), plus the 128 sampled rows, plus the exact call itself (a step grown by sqrt(2) near tol costs at most
#: 1/sqrt(2) of the next: 2.71 times in the worst case, every step so grown; docs' complexity page).
NYSTROM_COST_FRACTION = 0.5

#: A step whose estimate is at most this many times ``tol`` (its bound above it) grows :math:`m` by :math:`\sqrt2`
#: instead of 2 (:func:`search_landmarks`). On the 36 DINOv2-S layers (518 px) a doubling that followed such a step
#: answered up to 2.78 times the smallest m within tol, where sqrt(2) answers within 2.00, 1.96 and 1.68 times at tol
#: = 0.05, 0.1 and 0.2, for a modeled median time of 1.65, 2.06 and 2.26 times one call against 1.65, 2.06 and 2.23
#: (at most 2.78 either way; ``python docs/scripts/tol_policies.py``, docs' choosing-m page).
NEAR_MISS = 1.05

#: Where exact attention may answer, the doubling gives up as soon as ``tol`` is out of reach by the largest
#: :math:`m`, assuming each doubling left lowers the bound at most this many times as much as the last one did
#: (:func:`out_of_reach`). On the DINOv2-S layers (518 px, 3 images x 12 layers, from m = 16 to 128) a bound fell at
#: most 1.88 times faster than that over the rest of a search, and every give-up was right; on tokens along a smooth
#: curve one doubling fell 6.85 times faster, and 2 of 6 searches gave up wrongly at tol = 0.05 (docs' choosing-m page
#: weighs larger values). A wrong give-up costs no accuracy, only exact attention in place of the steps left.
FASTEST_FALL = 2.0


def solve_flops(solver, m):
    """FLOPs of one :math:`m\\times m` solve by ``solver`` at its set step count (0 for a plain callable, which
    declares no cost)."""
    return solver.flops(m, getattr(solver, "iters", 0)) if isinstance(solver, Solver) else 0


def nystrom_pays(n_q, n, d, d_v, fraction=NYSTROM_COST_FRACTION):
    r"""``pays(m, solver)``: whether Nyström attention with :math:`m` landmarks and ``solver`` takes at most
    ``fraction`` of the FLOPs of exact attention on the same shapes (:mod:`nystrom.linalg.flops`), per sequence:

    .. math:: 2 m (n + m)(d + d_v) + 2 n_q m (d + d_v) + F_{\mathrm{solve}}(m) \le
              \mathrm{fraction} \cdot 2 n_q n (d + d_v).

    Six Newton–Schulz steps cost :math:`52 m^3`, so at :math:`n = 1{,}370`, :math:`d = 64` and the default
    fraction the last such :math:`m` is 138, a tenth of :math:`n`."""
    exact = exact_attention_flops(1, n_q, n, d, d_v)

    def pays(m, solver):
        return nystrom_attention_flops(1, n_q, n, d, d_v, m, solve_flops(solver, m))["total"] <= fraction * exact

    return pays


def crossover(largest, pays, solver):
    r"""The largest :math:`m \le` ``largest`` with ``pays(m, solver)`` (the cost grows with :math:`m`), or 0."""
    low, high = 0, largest
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if pays(mid, solver) else (low, mid - 1)
    return low


def search_range(first, keys, queries, max_landmarks, pays, solver, real_keys=None):
    r"""``(largest, exact)``: the largest :math:`m` the search tries with Nyström attention, and whether it may
    return exact attention instead.

    ``max_landmarks`` is a budget on :math:`m`; exact attention is the answer with every key as a landmark (all
    ``real_keys`` of the shortest sequence, default ``keys``, the most landmarks they allow: fewer for
    cross-attention with fewer queries than keys). Without a budget, or with one that holds every real
    key, Nyström attention is tried at :math:`m = 2^k` ``first`` up to the :func:`crossover` of ``pays``
    (:func:`nystrom_pays`), and exact attention answers where it misses ``tol`` (a last step to the crossover
    itself, less than a doubling, would cost more than the step before it and lower the error little). Exact
    attention answers at once (``largest`` 0) where that crossover lies below ``first``, or where the ``queries``
    are at most :data:`SAMPLED_ROWS`: the estimate's exact rows would be all of them, exact attention itself. A
    smaller budget caps :math:`m` at it (the last step reaching it) and rules exact attention out.
    """
    if max_landmarks is None or max_landmarks >= (keys if real_keys is None else real_keys):
        top = 0 if queries <= SAMPLED_ROWS else crossover(keys, pays, solver)
        return (0 if top < first else first * 2 ** (top // first).bit_length() // 2), True
    return max(first, max_landmarks), False


def stronger(solver):
    r"""The solver the search escalates to when ``solver`` cannot reach ``tol``, or ``None``.

    Six Newton–Schulz steps regularise: singular values of the landmark kernel far below :math:`\sigma_{\max}`
    are not yet inverted, which keeps an error floor that more landmarks do not lower. Where the kernel is well
    represented (DINOv2-S layers 0, 5, 7 at 518 px) ten steps reach a few per cent at :math:`m \le n/2`; where it
    is not (layers 1–4), more steps *raise* the error (an exact pseudo-inverse amplifies it tenfold or more), so
    the search keeps the escalated step only where the estimate says it is better. Only a fixed-step
    :class:`~nystrom.linalg.solvers.NewtonSchulz` escalates, to ``iters + EXTRA_ITERATIONS`` steps.
    """
    if isinstance(solver, NewtonSchulz) and solver.tol is None:
        return NewtonSchulz(iters=solver.iters + EXTRA_ITERATIONS, max_iters=solver.max_iters)
    return None


def stall_advice(solver, escalated=None):
    """What a warning says of a doubling that stopped lowering the error: the floor ``solver`` leaves (and
    ``escalated``, the stronger solver tried after it), and what moves it. Never a plain exact pseudo-inverse (the
    advice once was ``solver='pinv'``): it raised the error tenfold or more on most DINOv2-S layers, where the best
    cut-off of a truncated one was 3e-2 (docs' pseudo-inverse page)."""
    if isinstance(solver, NewtonSchulz) and escalated is not None:
        return (f"the floor of {solver.iters} and of {escalated.iters} Newton-Schulz steps: more steps may go lower "
                f"where the landmark kernel is well conditioned and raise the error where it is not; without "
                f"max_landmarks, exact attention answers where tol is missed")
    if isinstance(solver, NewtonSchulz):
        more = "a smaller tol or a larger max_iters" if solver.tol is not None else f"more than iters={solver.iters}"
        return (f"the floor of {solver.iters if solver.tol is None else 'its'} Newton-Schulz steps, which leave the "
                f"landmark kernel's small singular values uninverted: {more} may go lower")
    if isinstance(solver, PInv):
        if not solver.rtol or solver.rtol < 1e-6:
            return ("the floor of an exact pseudo-inverse, which amplifies the landmark kernel's small singular "
                    "values: a regularising solver (the default NewtonSchulz(), or PInv(rtol=3e-2)) may go lower")
        return (f"the floor of PInv(rtol={solver.rtol}): another cut-off may go lower (a lower one inverts more of the "
                f"landmark kernel, a higher one regularises more; 3e-2 was the best on real attention)")
    if isinstance(solver, Ridge):
        return (f"the floor of Ridge(lam={solver.lam}): another lam may go lower (a smaller one inverts more of the "
                f"landmark kernel, a larger one regularises more)")
    return "the solver's floor"


def out_of_reach(high, before, m, largest, tol, fastest_fall=FASTEST_FALL):
    r"""Whether ``tol`` is out of reach of the doubling from :math:`m` to ``largest``, given the bound ``high`` at
    :math:`m` and ``before`` at :math:`m/2`.

    The last doubling lowered the bound :math:`r = \max(\text{before}/\text{high}, 1)`-fold; the
    :math:`k = \log_2(\text{largest}/m)` doublings left are assumed to lower it at most
    :math:`(\varphi r)`-fold each, :math:`\varphi` = ``fastest_fall`` (:data:`FASTEST_FALL`):

    .. math:: \text{high}\,/\,(\varphi r)^k > \text{tol}.
    """
    fall = fastest_fall * max(before / high, 1.0)
    return high / fall ** math.log2(largest / m) > tol


def search_landmarks(attempt, estimate, first, largest, tol, strict, solver, exact=None, keys=None, refine=False,
                     where=""):
    r"""Double :math:`m` from ``first`` until the estimated error's upper bound is at most ``tol``; where the solver
    is the limit, escalate it; where Nyström attention does not pay, return exact attention.

    1. Doubling: :math:`m = m_0, 2m_0, 4m_0, \dots` up to ``largest``, with ``solver``, until a bound is at most
       ``tol``; after a step whose estimate is within :data:`NEAR_MISS` times ``tol``, :math:`m` grows by
       :math:`\sqrt2` instead (where the doubling would overshoot the :math:`m` that meets ``tol``). It stops early
       after two steps in a row that do not lower the best bound (the solver's floor: six Newton–Schulz steps
       regularise, and their error does not vanish even at :math:`m = n`), and, with
       ``exact``, from the second step on as soon as :func:`out_of_reach` says that ``tol`` cannot be met by
       ``largest``. Geometric growth makes the steps before the last cost at most about as much as the last, for
       costs linear in :math:`m`.
    2. With ``exact``, when 1. missed ``tol`` (or ``first > largest``): exact attention, of error 0; with
       ``largest`` from :func:`search_range`, the whole search then takes at most about twice its FLOPs
       (:data:`NYSTROM_COST_FRACTION`).
    3. Without it, escalation when 1. missed ``tol`` and :func:`stronger` gives a solver: the stronger solver at
       the :math:`m` tried in 1., from the largest down, while its bound is at most ``tol``; the smallest such
       :math:`m` is returned (so :math:`m` is within a factor 2 of the smallest on that grid that meets ``tol``
       with the stronger solver). It costs at most about two calls at the largest :math:`m` tried. A miss then
       warns or raises. (The escalation pays at large :math:`m`, where six Newton–Schulz steps leave an error
       floor. In a version of this search that escalated before answering with exact attention, up to the
       :math:`m` of exact attention's full cost, it reached ``tol`` in none of the 52 DINOv2-S cases at 518 px
       that ended in exact attention: docs' choosing-m page.)

    With ``refine``, when 1. met ``tol`` at :math:`m` after a miss at the :math:`m'` before it, one more step at the
    geometric mid-point :math:`\mathrm{round}(\sqrt{m' m})` (:math:`m/\sqrt2` after a doubling) answers where its
    bound is within ``tol`` too: where the bound falls with :math:`m`, the :math:`m` returned then overshoots the
    smallest that meets ``tol`` by less than :math:`\sqrt{m/m'}` (:math:`\sqrt2`) instead of :math:`m/m'` (2). The
    step costs about 0.7 of the last one: it pays where :math:`m` is reused (``patch(tol=...)`` calibrates it once
    for every later batch), not for one call.

    Parameters
    ----------
    attempt : callable
        ``attempt(m, solver) -> result`` (the approximation at :math:`m` with ``solver``).
    estimate : callable
        ``estimate(result) -> ErrorEstimate``, from one sample of exact rows for every step.
    first, largest : int
        Starting and largest :math:`m` (:func:`search_range`).
    tol : float
    strict : bool
        On a miss, raise ``RuntimeError`` instead of warning (``UserWarning``).
    solver : Solver or callable
        The solver of the doubling.
    exact : callable, optional
        ``exact() -> result``, the result that stands for exact attention (the callers return a marker and compute
        exact attention after the search), the answer to a miss; ``None``: a miss warns or raises.
    keys : int, optional
        With ``exact``: the :math:`m` its step records, every real key.
    refine : bool
        Try the mid-point between the last two doublings (above).
    where : str
        What the search is for, leading the message of a miss (``"FNA layer 7: "``; empty for a plain call).

    Returns
    -------
    result
        That of the returned step: the last step within ``tol``, else exact attention, else the one with the
        lowest bound.
    steps : tuple of TolStep
        Every step tried, in order, then the returned one again when it is not the last. An exact step has
        ``solver`` :data:`EXACT`, ``m = keys`` and an estimate of 0 from no sampled row.
    """
    def step(m, with_solver):
        result = attempt(m, with_solver)
        return result, TolStep(m, estimate(result), with_solver)

    def bound(tried):
        # A NaN estimate (a non-finite output, or exact rows that overflowed) is no evidence of any error: +inf.
        high = tried.estimate.high
        return math.inf if math.isnan(high) else high

    def exactly(steps):
        return exact(), steps + (TolStep(keys, ErrorEstimate(0.0, 0.0, 0.0, CONFIDENCE, 0), EXACT),)

    if exact is not None and first > largest:
        return exactly(())
    best_result, first_step = step(first, solver)
    steps = (first_step,)
    best = 0
    m = first
    while bound(steps[best]) > tol and m < largest and len(steps) - 1 - best < 2:
        if exact is not None and len(steps) > 1 and out_of_reach(bound(steps[-1]), bound(steps[-2]), m, largest,
                                                                 tol):
            break
        # Near tol, a doubling overshoots the m that meets it: there m grows by sqrt(2).
        grow = math.sqrt(2) if steps[-1].estimate.estimate <= NEAR_MISS * tol else 2
        m = min(max(round(m * grow), m + 1), largest)
        result, tried = step(m, solver)
        steps += (tried,)
        if bound(tried) < bound(steps[best]):
            best, best_result = len(steps) - 1, result
    stalled = len(steps) - 1 - best >= 2
    floor_m = steps[best].m
    if refine and bound(steps[-1]) <= tol and len(steps) > 1:
        # The last step met tol and the one before missed it: every earlier bound is above tol.
        mid = round(math.sqrt(steps[-2].m * steps[-1].m))
        if steps[-2].m < mid < steps[-1].m:
            result, tried = step(mid, solver)
            steps += (tried,)
            if bound(tried) <= tol:
                best, best_result = len(steps) - 1, result
    if bound(steps[best]) > tol and exact is not None:
        return exactly(steps)
    escalated = stronger(solver) if bound(steps[best]) > tol else None
    if escalated is not None:
        # Down from the largest m: the stronger solver pays where the solver, not m, limited the error.
        for m in sorted({tried.m for tried in steps}, reverse=True):
            result, tried = step(m, escalated)
            steps += (tried,)
            if bound(tried) <= tol or bound(tried) < bound(steps[best]):
                best, best_result = len(steps) - 1, result
            if bound(tried) > tol:
                break
    if best != len(steps) - 1:
        steps += (steps[best],)
    if bound(steps[-1]) > tol:
        m, last = steps[-1].m, steps[-1].estimate
        why = (f"the error stopped falling after m={floor_m}, {stall_advice(solver, escalated)}" if stalled
               else f"max_landmarks={largest} reached")
        if escalated is not None and not stalled:
            why += f"; also with {escalated!r}"
        message = (f"{where}tol={tol} not reached, {why}; returned m={m}, estimated error {last.estimate:.3g}, "
                   f"95% interval [{last.low:.3g}, {last.high:.3g}]")
        if strict:
            raise RuntimeError(message)
        # The warning points at the caller of approximate, or at the line that called the model patch() changed.
        warnings.warn(message, UserWarning, stacklevel=outside_stacklevel())
    return best_result, steps


def search_for_tol(xp, Q, K, V, attempt, exact, *, first, num_keys, key_mask, max_landmarks, tol, strict,
                   solver, scale, seed, attend, real_keys=None, refine=False, where=""):
    r"""The whole search of ``tol=`` (``approximate`` and ``patch``), on checked inputs.

    Sets the range (:func:`nystrom_pays`, :func:`search_range`), samples the 128 exact rows once
    (:func:`~nystrom.linalg.bounds.sample_rows`; none where exact attention answers at once) and runs
    :func:`search_landmarks`. A step computes its output only at the sampled rows
    (:func:`~nystrom.linalg.attention.nystrom_output` of its factors): the caller computes the whole output once,
    for the result returned. A step so computes the output product,
    :math:`2 n_q m (d + d_v)`, at 128 rows instead of :math:`n_q`: at DINOv2-S's shape (:math:`n_q = n = 1{,}370`,
    :math:`d = 64`, six Newton–Schulz steps) that leaves out 44 % of a whole call's FLOPs at :math:`m = 16`, 34 % at
    64 and 20 % at 128, where the solve weighs most.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
    K, V : arrays, shape (..., n, d) and (..., n, d_v)
        Padded rows zeroed.
    attempt : callable
        ``attempt(m, solver) -> (result, factors)``, everything of the approximation at :math:`m` but its output:
        whatever the caller keeps, and the :class:`~nystrom.linalg.attention.NystromFactors` whose output at the
        sampled rows the estimate reads.
    exact : callable
        ``exact() -> (result, None)``: what stands for exact attention, used where the range allows it (a marker:
        the caller computes exact attention itself when the search returns it).
    first, num_keys : int
        The starting :math:`m` and the most landmarks the keys allow.
    real_keys : int, optional
        The real keys of the shortest sequence, the :math:`m` an exact step records (default ``num_keys``; more
        for cross-attention with fewer queries than keys).
    key_mask : bool array, shape broadcastable to (..., n), or None
    max_landmarks : int or None
        The budget, or ``None``.
    tol, strict, solver
        As :func:`search_landmarks` takes them.
    scale : float
    seed : int
        Of the row sample.
    attend : callable
        Attention as :func:`~nystrom.linalg.attention.nystrom_product` takes it: of the sampled rows, exact and
        through the factors.
    refine, where
        As :func:`search_landmarks` takes them.

    Returns
    -------
    (result, factors), steps
        As :func:`search_landmarks` returns them.
    """
    # The costs of the sequences as padded to the longest one alone: padding past it (to a fixed length) would make
    # exact attention's n^2 outgrow Nystrom's n m and change the answer for the same sequences (a review: MiniLM
    # layer 5 took m = 32 padded to 376 tokens, exact attention at its own 176, 6.3 % apart).
    queries = query_positions(Q, K, key_mask)[1].size
    keys = K.shape[-2] if key_mask is None else int(xp.max(real_key_counts(xp, key_mask)))
    pays = nystrom_pays(queries, keys, Q.shape[-1], V.shape[-1])
    top, exact_allowed = search_range(first, num_keys, queries, max_landmarks, pays, solver, real_keys)
    rows = None if top < first else sample_rows(xp, Q, K, V, num_samples=SAMPLED_ROWS, seed=seed, scale=scale,
                                                keys=key_mask, attend=attend)
    # The sampled queries once, for every step.
    sampled = None if rows is None else xp.take(Q, rows.at, axis=-2)

    def estimate(attempted):
        factors = attempted[1]
        first_look = rows.estimate(nystrom_output(xp, sampled, factors, attend), CONFIDENCE)
        if not first_look.high <= tol:
            return first_look
        # Within tol on the stratified rows: confirmed only with the rows of largest interpolation weights taken
        # with certainty too, which a heavy tail of row errors hides from the strata (their cost, an n_q x m
        # product, is paid where a bound is within tol: once per plain answer; patch's mid-point step and the
        # escalation can confirm more).
        census = with_interpolation_census(xp, rows, Q, K, factors.keys, factors.bias, factors.solve.inverse, scale)
        return census.estimate(nystrom_output(xp, xp.take(Q, census.at, axis=-2), factors, attend), CONFIDENCE)

    return search_landmarks(attempt, estimate, first, top,
                            tol, strict, solver, exact=exact if exact_allowed else None,
                            keys=num_keys if real_keys is None else real_keys, refine=refine, where=where)
