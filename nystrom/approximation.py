"""``nystrom.approximate``: the one call researchers make, and the boundary where its arguments are checked.

:func:`approximate` checks every argument once, then runs trusted code that does not check again:
the strategy's :meth:`~nystrom.linalg.landmarks.base.Strategy.select`, the solver's
:meth:`~nystrom.linalg.solvers.Solver.solve` and :func:`nystrom.linalg.attention.nystrom_product`
(with torch's fused SDPA as the attention call for torch inputs).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any

import array_api_compat
import numpy as np

from .linalg.attention import exact_attention as array_api_exact_attention
from .linalg.attention import (
    grouped_query_heads,
    in_query_chunks,
    nystrom_factors,
    nystrom_output,
    nystrom_product,
    softmax_attention,
)
from .linalg.bounds import (
    ErrorEstimate,
    check_sampling,
    interpolation_weight_norms,
    query_positions,
    sample_rows,
    with_interpolation_census,
)
from .linalg.bounds import estimate_relative_error as array_api_estimate_relative_error
from .linalg.flops import exact_attention_flops, nystrom_attention_flops
from .linalg.landmarks.base import Landmarks, Selection, Strategy, get_strategy, run_strategy
from .linalg.numerics import detached, float64_numpy, quiet_numpy_overflow, without_padding
from .linalg.solvers import Solver, get_solver, unchecked
from .linalg.tolerance import search_for_tol
from .linalg.validation import (
    check_attention_inputs,
    check_bidirectional,
    check_bool,
    check_query_chunk_size,
    check_scale,
    check_seed,
    check_selection,
    check_tolerance,
    check_unknown_arguments,
    every_key_a_landmark,
    real_key_counts,
)


def follows_sdpa_under_autocast(function):
    """``function(Q, K, V, ...)`` for torch inputs under ``torch.autocast`` (inputs in the dtype autocast would give
    SDPA, the library's computation with autocast off) and in float16 (a backward that keeps the gradients'
    range): :mod:`nystrom.torch.autocast`."""

    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()}

    @functools.wraps(function)
    def call(Q, K, V, *args, **kwargs):
        if array_api_compat.is_torch_array(Q):
            from .torch.autocast import with_own_precision

            return with_own_precision(lambda q, k, v: function(q, k, v, *args, **kwargs), Q, K, V,
                                      replayable=functools.partial(replayable, {**defaults, **kwargs}))
        return function(Q, K, V, *args, **kwargs)

    return call


def replayable(arguments):
    """Whether a call with these keyword ``arguments`` makes the same choices when run again on the same values in
    float32: a strategy object that draws nothing, or draws from a given seed, a :class:`Solver`, no ``tol`` (a search
    in float32 may stop at another step where a bound lies within rounding of ``tol``: a review found the gradients
    of exact attention for a float16 answer at m = 16) and no process group (a backward that ran a call again on one
    process alone would wait for the others in a collective)."""
    try:
        strategy, solver = get_strategy(arguments["strategy"]), get_solver(arguments["solver"])
    except (TypeError, ValueError):
        return False  # the call itself says why
    return (arguments["group"] is None and arguments["tol"] is None and isinstance(strategy, Strategy)
            and isinstance(solver, Solver) and (not strategy.random or arguments["seed"] is not None))


def own_precision(Q):
    """A context in which a computation on ``Q`` runs in the inputs' own precision: for a torch tensor, with
    ``torch.autocast`` off for its device (under CPU autocast every product would run in bfloat16: a review measured an
    error estimate of 7.0e-3 for an approximation 8.8e-6 from float32 exact attention, and an ``exact_attention`` in
    float32 6.9e-3 away from float32 SDPA); nothing to change for other arrays."""
    if array_api_compat.is_torch_array(Q):
        from .torch.autocast import without_autocast

        return without_autocast(Q.device)
    return contextlib.nullcontext()


def exact_attention(Q, K, V, attn_mask=None, **options):
    """Exact scaled dot-product attention, :func:`nystrom.linalg.attention.exact_attention` (the formula, the options
    ``scale`` and ``attn_mask``, the shapes), in the inputs' own precision whatever the caller's ``torch.autocast``
    (:func:`own_precision`): it is the reference, where SDPA under autocast runs in bfloat16."""
    with own_precision(Q):
        return array_api_exact_attention(Q, K, V, attn_mask, **options)


def estimate_relative_error(Q, K, V, approx, **options):
    """The sampled estimate of ``approx``'s relative error, :func:`nystrom.linalg.bounds.estimate_relative_error` (the
    estimator, its interval, the options ``num_samples``, ``confidence``, ``seed``, ``scale``, ``attn_mask``,
    ``query_mask`` and ``enable_gqa``), with the exact rows in the inputs' own precision whatever the caller's
    ``torch.autocast`` (:func:`own_precision`)."""
    with own_precision(Q):
        return array_api_estimate_relative_error(Q, K, V, approx, **options)


@dataclass(frozen=True)
class Info:
    """Diagnostics of one :func:`approximate` call.

    Attributes
    ----------
    landmarks : Landmarks or None
        The landmark queries/keys; ``landmarks.indices`` ``(..., m)`` holds token positions for
        strategies that pick real tokens (``None`` for those that group tokens: ``norm``, k-means, segment means).
        ``None`` when the call was answered by exact attention: with ``tol`` (the last of ``tol_steps`` has solver
        ``"exact"``), and for cross-attention or masked self-attention with every real key a landmark (see
        ``num_landmarks``).
    residual : array, shape (...), or None
        Relative Moore–Penrose residual :math:`\\lVert AZA-A\\rVert_F/\\lVert A\\rVert_F` of the
        pseudo-inverse :math:`Z` of each landmark kernel :math:`A` (``None`` for exact attention).
    solver_iterations : int
        Iterations the solver ran (0 for direct solvers and exact attention).
    flops : dict
        Floating-point operations of the approximation by stage (``"landmark_products"``,
        ``"solve"``, ``"output_product"``, ``"total"``); landmark *selection* is not counted, nor
        the solve of a solver that is a plain callable (only :class:`~nystrom.linalg.solvers.Solver`
        objects declare their cost). For exact attention ``"exact"`` and ``"total"``.
    exact_flops : int
        Those of exact attention on the same shapes, for the ratio.
    tol_steps : tuple of TolStep
        With ``approximate(tol=...)``: every step of the search, in order, as ``(m, estimate, solver)``
        (:class:`~nystrom.linalg.tolerance.TolStep`); the last is the one returned (listed twice when it was not
        the last tried). A solver other than the one passed marks an escalation (see ``tol``). Empty otherwise.
    """

    landmarks: Landmarks
    residual: Any
    solver_iterations: int
    flops: dict
    exact_flops: int
    tol_steps: tuple = ()
    _inputs: tuple = field(repr=False, default=())

    def __repr__(self) -> str:
        # The fields hold whole arrays (landmarks, residuals); a summary of their shapes and ranges reads better.
        tol = ""
        if self.tol_steps:
            last = self.tol_steps[-1].estimate
            tol = (f", tol: m tried {[step.m for step in self.tol_steps]}, error {last.estimate:.3g} "
                   f"[{last.low:.3g}, {last.high:.3g}]")
        lm = self.landmarks
        if lm is None:
            return f"Info(exact attention, flops={self.flops['total']:.4g}{tol})"
        m = lm.keys.shape[-2]
        kind = "tokens" if lm.indices is not None else "group means"
        weighted = ", weighted" if lm.log_weights is not None else ""
        if self.residual is None:
            # A solver callable may report none.
            residual = "no residual reported"
        else:
            values = float64_numpy(self.residual)
            residual = (f"residual max {values.max():.3g} / median {np.median(values):.3g} over {values.size} "
                        "kernel(s)")
        ratio = self.flops["total"] / self.exact_flops if self.exact_flops else float("nan")
        return (f"Info(m={m} landmarks ({kind}{weighted}) for batch {tuple(lm.keys.shape[:-2])}, "
                f"{residual}, solver_iterations={self.solver_iterations}, flops={self.flops['total']:.4g} "
                f"({ratio:.3g} of exact){tol})")

    @quiet_numpy_overflow
    def interpolation_weights(self):
        r"""Per query position, :math:`\sum_{\text{batch}}\lVert F_i A^+\rVert^2`: the squared norm of the weights
        by which the output row combines the landmark rows :math:`BV`
        (:func:`~nystrom.linalg.bounds.interpolation_weight_norms`). Large where the row is an interpolation whose
        terms cancel, and its error is amplified; :meth:`estimate_error` computes the largest with certainty. Zero at
        padded query rows; ``None`` for an exact answer. Costs :math:`O(n_q m (d + m))`.

        Returns
        -------
        float64 ndarray, shape (n_q,), or None
        """
        xp, Q, K, _, _, scale, keys, interpolation = self._inputs
        if interpolation is None:
            return None
        return interpolation_weight_norms(xp, Q, *interpolation, scale, query_positions(Q, K, keys)[0])

    @quiet_numpy_overflow
    def estimate_error(self, num_samples=128, confidence=0.95, seed=None) -> ErrorEstimate:
        """A-posteriori relative error of the returned output from ``num_samples`` exact query rows.

        The stratified rows of :func:`nystrom.linalg.estimate_relative_error` (with the high-norm and, for
        self-attention, the self-attending queries apart: :func:`~nystrom.linalg.bounds.outlying_queries`), with
        certainty the
        :math:`\\lfloor s/8\\rfloor` rows of largest interpolation weights :math:`\\lVert F_i A^+\\rVert`
        (:func:`~nystrom.linalg.bounds.interpolation_census`), where a heavy tail of row errors lies and strata miss
        it, and, for self-attention, up to :math:`s/2` rows of strata of their own for the queries the landmarks do
        not represent (:func:`~nystrom.linalg.bounds.unrepresented_queries`: isolated tokens, which attend to
        themselves); costs :math:`O(s\\, n\\, d + n_q m (d + m))`. The inputs were checked by :func:`approximate`;
        only the sampling settings are checked here.

        Parameters
        ----------
        num_samples : int
            Query rows drawn in strata (clipped to :math:`n_q`); more are computed for the census
            (:math:`\\lfloor s/8\\rfloor`), the unrepresented queries (:math:`s/2`, or their share of the strata where
            larger) and the strata whose row fell among them (drawn again), and ``ErrorEstimate.num_samples`` counts
            the rows it reads. At 128 the 95 % interval covered at least 93.2 % on 37 families, isolated tokens among
            tight clusters included (96.0-100 % there); at 64 as little as 83.9 % (docs' error-bounds page).
        confidence : float
            Level of the interval.
        seed : int, optional
            Seed of the row sample.

        Returns
        -------
        ErrorEstimate
        """
        xp, Q, K, V, out, scale, keys, interpolation = self._inputs
        with own_precision(Q):
            options = check_sampling(num_samples, confidence, seed)
            sample = sample_rows(xp, Q, K, V, num_samples=options["num_samples"], seed=options["seed"], scale=scale,
                                 keys=keys)
            if interpolation is not None:
                sample = with_interpolation_census(xp, sample, Q, K, *interpolation, scale)
            return sample.estimate(xp.take(out, sample.at, axis=-2), options["confidence"])


@follows_sdpa_under_autocast
@quiet_numpy_overflow
def approximate(
    Q,
    K,
    V,
    attn_mask=None,
    *,
    strategy="norm",
    num_landmarks=64,
    solver="newton_schulz",
    scale=None,
    seed=None,
    return_info=False,
    share_landmarks_across_heads=True,
    features=None,
    query_chunk_size=None,
    check_values=True,
    is_causal=False,
    dropout_p=0.0,
    enable_gqa=False,
    tol=None,
    max_landmarks=None,
    strict_tol=False,
    group=None,
    **unknown,
):
    r"""Approximate softmax attention with the Nyström method.

    .. math::

        \hat O = \mathrm{softmax}(\tau Q \tilde k^\top)\; A^{+}\; \mathrm{softmax}(\tau \tilde q K^\top + M)\, V,
        \qquad A = \mathrm{softmax}(\tau \tilde q \tilde k^\top)

    with :math:`m` landmark queries :math:`\tilde q` and keys :math:`\tilde k` chosen by
    ``strategy``. Cost :math:`O((n_q + n) m (d + d_v) + m^3)` instead of :math:`O(n_q n (d+d_v))`.

    Parameters
    ----------
    Q : array, shape (..., n_q, d)
        Queries: numpy array or torch tensor (CPU or CUDA; float16/bfloat16/float32/float64).
        Leading dimensions are batch/heads, as in ``scaled_dot_product_attention`` ``(B, H, n, d)``, and the same
        for ``Q``, ``K`` and ``V``: unlike SDPA, no broadcasting (for key/value heads shared across query heads,
        ``enable_gqa=True``). ``n_q`` may differ from ``n`` (cross-attention).
    K : array, shape (..., n, d)
    V : array, shape (..., n, d_v)
    attn_mask : array, optional
        Key mask, in the conventions of ``scaled_dot_product_attention`` and transformers:

        * bool, ``True`` = attend (a real key); integer 0/1, 1 = real token (transformers'
          ``attention_mask``); or floating, added to the logits: 0 = attend, ``-inf`` or at most half the
          dtype's most negative value (transformers' ``finfo.min``) = masked. Unlike SDPA's, a floating mask is a
          padding mask, not a bias: other values, and a mask that requires grad (SDPA differentiates it), raise a
          ``ValueError``;
        * shape ``(..., 1, n)`` broadcasting to ``(..., n_q, n)`` as in SDPA (``(B, 1, 1, n)``,
          ``(B, H, 1, n)``, ``(1, n)``), ``(n,)``, or transformers' ``(B, n)`` for inputs with a batch axis.
          A ``(..., n_q, n)`` mask whose query rows are all equal (an expanded key mask) is taken too.

        Masked keys get no attention and are never landmarks, and their contents (any finite values) do
        not change the output. Of self-attention's padded query rows (the rows of masked keys), whose output
        nobody reads, only the gradients are affected: queries near the dtype's largest value (1e37 and up in
        float32, where their logits overflow) make every input's gradient NaN, real rows' included (SDPA's
        output is NaN there already). The library cannot zero them: a masked key's query may be a real one
        (key-masking experiments read its output). Nyström attention here is bidirectional: a mask that differs between
        queries (causal) is rejected. A mask that differs between heads makes each head choose its own
        landmarks (see ``share_landmarks_across_heads``). The name and meaning are SDPA's, so an
        ``nn.MultiheadAttention`` ``key_padding_mask`` (``True`` = padding) is passed as
        ``attn_mask=~key_padding_mask``; the former ``key_padding_mask=`` argument raises a ``TypeError``
        that says so.
    strategy : str or callable
        ``"norm"`` (default: attention sinks, high-norm tokens and CLS as landmarks of their own,
        weighted k-means clusters for the rest), ``"fps"``, ``"segment_means"``, ``"uniform"``,
        ``"kmeans"``, ``"rpcholesky"``, a strategy object such as ``nystrom.Norm(sink_ratio=8)``, or
        any callable with the strategy signature (:mod:`nystrom.linalg.landmarks.base`), which must choose among the
        real keys of the ``attn_mask`` it is given (with ``check_values``, landmark ``indices`` it returns at padded
        keys or outside ``K`` raise a ``ValueError``).
    num_landmarks : int
        :math:`m`, with ``1 <= m <= n``, at most the real keys of every padded sequence, and for cross-attention
        (:math:`n_q \ne n`) at most :math:`n_q`. With every token a landmark and a pseudo-inverse
        (``solver="pinv"``, which drops singular values below :math:`m\varepsilon\sigma_{\max}`), self-attention
        is exact through the formula (:math:`A A^+ A = A`) up to rounding, which the kept singular values of
        :math:`A` amplify, in orders of magnitude (``docs/scripts/pinv_at_full_rank.py``; amplified rounding, whose
        digits move with the order of the sums, another BLAS's or instruction set's): 1e-13 in float64 and
        1e-5 in float32 on Gaussian tokens, but on numerically low-rank kernels (head size 1, logits near 0) 1e-3 in
        float64 and 1e-5 to 1e-2 in float32 (the most with few tokens: head size 1 or 4, :math:`n = 10`), and up to
        about 0.6 in float32 with ``PInv(rtol=0)``, which inverts the round-off too; ``PInv(rtol=1e-10)`` brings the
        float64 case to 1e-9, ``PInv(rtol=1e-4)`` the float32 ones to 4e-5. Near-uniform attention is the worst case
        in float32: 1.7e-4 to
        4.4e-4 with unit-norm queries and keys (:math:`n` = 24 to 128, a review), and 1.3e-3 with norms near 0.4
        (:math:`n = 24`, :math:`d = 16`, a later review), against 1e-5 to 3e-5 at norms 8 to 30 (1.8e-4 for some
        draws at norm 16); in float64 on near-uniform attention (norms near 1e-3) up to 6e-4, where
        ``PInv(rtol=1e-10)`` gives 4e-11, and 1.2e-2 with norms near 1e-6 (:math:`n = 8`, :math:`d = 32`, logits
        near 1e-12, a review: a singular value of 1.9e-15, rounding itself, just above the cut-off; 2.5e-14 with
        ``PInv(rtol=1e-10)``). float16 and bfloat16 stay within 1.3 to 16 times SDPA's own rounding in
        those dtypes on Gaussian tokens, but not on such kernels: a few 1e-3 in float16 (13 to 25 times SDPA's) and
        0.3 to 0.4 in bfloat16 (150 to 170 times) with head size 4 and :math:`n = 10`, where :math:`BV` and
        :math:`F`, rounded to the dtype, meet singular values the float32 cut-off keeps; ``PInv(rtol=1e-4)`` gives
        3.9e-4 and 2.4e-3 (SDPA's own 2.1e-3) there. The default six
        Newton–Schulz steps regularise and are not exact there (a review measured 1.6e-2 on smooth tokens at
        :math:`n = 256`).
        Cross-attention is exact there only through :math:`A^+ A = I`, which rounding loses when attention is
        peaked, so a cross-attention call whose every real key is a landmark (:math:`m` = the real keys of every
        sequence, read from the mask unless ``check_values=False``; possible where :math:`n_q` is at least that)
        returns exact attention, which costs less (``Info.landmarks`` is ``None``). So does self-attention with a key
        mask whose every real key is a landmark: its queries at masked keys are no landmark queries (a review
        measured 0.12 of error in those rows through the formula in float32).
    solver : str or callable
        ``"newton_schulz"`` (default, 6 iterations, as in FNA/Nyströmformer), ``"pinv"``,
        ``"ridge"``, or a solver object such as ``nystrom.NewtonSchulz(tol=1e-10)``.
    scale : float, optional
        Softmax temperature :math:`\tau`, default ``1/sqrt(d)``. Positive and finite: unlike SDPA, which takes any
        float, 0 and negative temperatures are refused (``ValueError``); landmark rules that read attention
        assume that a larger logit means more attention.
    seed : int, optional
        Makes the random strategies (``uniform``, ``rpcholesky``) deterministic; the
        same seed gives the same draws for numpy and torch inputs, hence the same landmarks, except where
        ``rpcholesky``'s residual kernel has fallen to its rounding (the rank exhausted: head size 1, near-uniform
        keys), whose pivots then follow each library's rounding (a review: 10 of 20 float32 draws of keys near 1e-3
        differed from the fifth pivot on, for outputs equally far from exact attention). One draw serves the whole
        call: a sequence's landmarks depend on its place in the batch (its row of the flattened leading dimensions)
        and, for ``rpcholesky``, on :math:`m`, not on the seed alone; not on the batch's size.
    return_info : bool
        Also return an :class:`Info` (landmark indices, solver residual, flop counts, and an
        ``estimate_error()`` method).
    share_landmarks_across_heads : bool
        For inputs with 4 or more dimensions ``(..., H, n, d)``: choose one landmark set per
        sequence and share it across the ``H`` heads (axis ``-3``), as FNA does; selection then
        sees the head-mean features, and the cost of selection is paid once. ``False``
        chooses per head, at :math:`H` times the selection cost (the measured trade-off is on the
        docs' benchmarks page, accuracy section). Ignored for 2-D and 3-D inputs, and where ``attn_mask``
        differs between heads: shared landmarks would sit on one head's padding or miss its real keys, so
        each head then chooses among its own real keys.
    features : array, shape (..., n, D), optional
        Per-token features for selection (e.g. the layer's input hidden states, where massive
        activations show); default the keys. Read by the rules that measure the tokens (``fps``, but not
        ``FPS(use_queries=True)``, which measures the queries; ``kmeans``, ``norm``, ``rpcholesky``; a user's strategy
        through its selection); ``uniform`` and ``segment_means``, which place landmarks by position, ignore them.
        Without head sharing their leading dimensions are ``K``'s; with it, ``K``'s without the head axis. With
        ``enable_gqa=True`` ``K`` counts after its heads are repeated to ``Q``'s: without head sharing, ``features``
        has the query heads.
    query_chunk_size : int, optional
        Process queries in chunks of this many rows (numpy and torch) to bound the :math:`n_q \times m`
        buffer of the output product, for very long sequences.
    check_values : bool
        Run the checks that read the data: finite ``Q``, ``K``, ``V`` and ``features``, a real key in
        every sequence, ``num_landmarks`` within the real keys. On CUDA each is a host
        synchronisation, and they are the only data reads of the default ``"norm"`` path in every
        dtype (``tests/test_approximation.py`` proves it on ``meta`` tensors); ``False`` skips them, like
        ``check_finite=False`` in scipy.linalg, and bad values then give undefined results. Also the mask
        checks read the data: its values, whether a ``(..., n_q, n)`` mask repeats one row (without the
        check such a mask is rejected; pass its ``(..., 1, n)`` row), and whether a mask with a head axis holds one
        row for every head. Without that check a per-head mask counts as differing between heads, so each head
        selects its own landmarks (a different approximation, at heads times the selection), unless its head axis
        has size 1 or is a broadcast or expanded view (stride 0): pass ``mask[:, :1]`` for one mask per sequence.
        With ``False`` the torch path of every strategy reads no data (but with ``tol``, whose search reads each
        step's estimate, and ``NewtonSchulz(tol=...)``, which reads its residual each step): it compiles into one graph,
        ``torch.compile(..., fullgraph=True)`` (each check would be a graph break), and every tensor it makes is
        on the input's device but the random strategies' seeded host draws (``tests/torch/test_device.py``, on
        fake CUDA tensors; the docs' design page). The ``pinv`` and ``ridge`` solvers call ``torch.linalg.svd`` and
        ``torch.linalg.solve``, which PyTorch documents as synchronising a CUDA device with the host to check for
        errors; the default Newton–Schulz steps do not (a review; not measured here, where no GPU was lent).
    is_causal : bool
        SDPA's argument, accepted as ``False`` only: ``True`` raises ``ValueError`` (bidirectional only).
    dropout_p : float
        SDPA's argument, accepted as 0 only.
    enable_gqa : bool
        SDPA's grouped-query attention: ``K`` and ``V`` with :math:`H_{kv}` heads (axis -3) serve
        :math:`H_q = g H_{kv}` query heads, key/value head :math:`j` serving query heads :math:`j g, \dots,
        (j + 1) g - 1`; they are repeated to :math:`H_q` heads (``repeat_interleave``, as SDPA's reference does).
    tol : float, optional
        Error-controlled :math:`m`: the largest relative error :math:`\lVert\hat O - O\rVert_F / \lVert O\rVert_F`
        (over the real rows of the whole batch, one :math:`m` for all: a sequence harder than the others may be
        above ``tol`` where the batch is within it, as one of eight at 0.28 in a batch at 0.11 with ``tol = 0.2``;
        call per sequence for a bound per sequence) to accept. Starting at ``num_landmarks`` (lowered to the most
        landmarks the keys allow, the real keys of the shortest sequence and :math:`n_q` for cross-attention, where
        it is above them: a short input is answered, not refused), :math:`m` doubles (grows by :math:`\sqrt2` after a
        step whose estimate is within 5 % of ``tol``) until the upper end of the
        95 % interval of the error, estimated from 128 exact query rows (one sample for every step,
        :func:`nystrom.linalg.estimate_relative_error`), is at most ``tol``, while :math:`m` stays within the last
        :math:`m` at which Nyström attention takes at most half the FLOPs of exact attention
        (:func:`nystrom.linalg.tolerance.nystrom_pays`; :math:`m = 138` at :math:`n = 1{,}370`, :math:`d = 64` with
        six Newton–Schulz steps). The output of the last :math:`m` is returned, and ``Info.tol_steps`` lists the
        steps. When the doubling misses ``tol`` (or two steps in a row did not lower the bound, or the last fall
        of the bound, even doubled at every step left, cannot reach ``tol``:
        :func:`nystrom.linalg.tolerance.out_of_reach`), the output is
        **exact attention**: the answer with every key as a landmark, of error 0 (its step has solver ``"exact"``
        and ``Info.landmarks`` is ``None``); the whole search then takes at most about twice the FLOPs of exact
        attention (2.71 times in the worst case, every step grown by :math:`\sqrt2`). Where even
        ``num_landmarks`` costs more than half of exact attention, or there are at most 128 queries (the
        estimate's exact rows would be all of them), exact attention is the first and only step
        (:func:`nystrom.linalg.tolerance.search_landmarks`). Reads the data (the estimate is computed on the host).
        A step whose bound is within ``tol`` is confirmed by the estimate with the 16 rows of largest interpolation
        weights taken with certainty too, and the queries the landmarks do not represent in 64 rows of their own
        (more where they are most of the queries; ``Info.estimate_error``), which a heavy tail of row errors hides
        from the sampled strata. The interval's coverage is measured, not guaranteed (docs' error-bounds page: at
        least 93.2 % from 128 rows on 37 families of synthetic and real attention; on isolated tokens among tight
        clusters ``tol=0.1`` answered above it in none of 100 seeds, 40 without those queries sampled apart); the
        cost is
        that of the steps, each
        without its output product (a step evaluates the output at the 128 sampled rows only), plus
        :math:`O(128\, n\, d)`, about one output product for each confirmation, and one output product (one exact
        attention call for an exact answer).
        With a key mask and as many queries as keys the call is taken for self-attention, as in
        :func:`nystrom.linalg.estimate_relative_error`: the rows at padded positions are padded queries, left out
        of the error (so cross-attention of equal lengths with real queries at padded key positions has those rows
        unassessed).
    max_landmarks : int, optional
        A budget on :math:`m` for ``tol``, between ``num_landmarks`` and the real keys of the shortest sequence
        (at most :math:`n_q` for cross-attention); default none, as described under ``tol`` (a budget of every
        real key is the same). A budget below the real keys rules exact attention out: :math:`m` doubles up to it,
        whatever the cost; when that misses ``tol`` and the solver is a fixed-step Newton–Schulz, the search
        escalates to four more steps at the :math:`m` it tried, from the largest down, and returns the smallest
        that meets ``tol``; when the bound is still above ``tol``, the step with the lowest bound is returned
        (listed again last in ``Info.tol_steps``), and the call warns or raises (``strict_tol``).
    strict_tol : bool
        With a ``max_landmarks`` budget below the real keys, when ``tol`` is missed (the bound still above it at
        the budget, or two doublings in a row that do not lower it, also after the escalation): ``False``
        (default) warns (``UserWarning``) and returns the output with the lowest bound, ``True`` raises
        ``RuntimeError``. Without a budget a miss is answered by exact attention and neither happens.
    group : torch.distributed ProcessGroup, optional
        The inputs are this process's shard of a sequence sharded along the token axis across ``group``
        (self-attention, shards in rank order, sizes free; ``attn_mask`` the shard's key mask), and the output is
        this shard's. The landmarks are those of the whole sequence and the result equals the single-process one
        up to rounding; the messages do not grow with :math:`n`. Every process calls with the same settings;
        ``strategy`` must be one that selects over shards (``"norm"``, ``"kmeans"``, ``"segment_means"``,
        ``"uniform"``, ``"fps"``), and ``return_info``, ``features`` and ``tol`` are not taken.
        See :func:`nystrom.torch.distributed.sharded_approximate`.

    Returns
    -------
    out : array, shape (..., n_q, d_v)
        Same library, device and dtype as ``V``.
    info : Info
        Only with ``return_info=True``.

    Raises
    ------
    TypeError
        Non-array inputs, mixed numpy/torch, non-floating or mismatched dtypes, a mask that is neither
        bool, integer nor floating, non-int ``num_landmarks``/``seed``, a strategy/solver that is neither
        a name nor callable, ``key_padding_mask=`` or ``attention_mask=`` (the message says to pass
        ``attn_mask``), any other unknown keyword.
    ValueError
        Shape mismatches, empty inputs, NaN/Inf, out-of-range ``num_landmarks``, a mask of the
        wrong shape, that differs between queries, holds other values than described or masks every key,
        ``is_causal=True``, ``dropout_p > 0``, mismatched devices, unknown strategy/solver names (the
        message lists the valid ones).

    Notes
    -----
    Under ``torch.autocast`` the call runs as SDPA does there: ``Q``, ``K`` and ``V`` in the autocast dtype (float64
    left as it is) and the output in it, with the library's float32 sections (the solve, :math:`A^+ (B V)`) kept in
    float32 (:mod:`nystrom.torch.autocast`), in the backward pass too, wherever ``.backward()`` is called.

    Differentiable in ``Q``, ``K`` and ``V`` (torch autograd) through the landmark queries and keys, the
    solve and the two attention products; the *choice* of landmarks (indices, cluster labels) is piecewise
    constant and carries no gradient. With every real key a landmark and ``solver="pinv"`` the gradients
    equal those of ``scaled_dot_product_attention`` (``tests/test_gradients.py``, every strategy, masked
    and not); with a cut-off that drops singular values, ``PInv``'s gradient is the fixed-rank formula, not
    the exact derivative of the truncated inverse (see :class:`~nystrom.linalg.solvers.PInv`). The default
    cut-off, :math:`m\varepsilon` of the working dtype, drops some where attention is nearly uniform, whose
    kernel is ill-conditioned even at :math:`m = n` (logits of about :math:`\pm 0.3`, ``(1, 2, 64, 16)``: condition
    number 6e5-8e5; in float32 the gradient of ``Q`` is 2e-4-9e-4 off SDPA's, relative, on two draws, against
    2.6e-7 for SDPA itself, and without a cut-off the output is 1.4e-3 off instead of 1.4e-4; in bfloat16 both are
    of order 1): for every key as a landmark in half precision or float32, exact attention is the call to make.

    Examples
    --------
    >>> import numpy as np, nystrom
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = (rng.standard_normal((2, 4, 512, 32)) for _ in range(3))
    >>> out = nystrom.approximate(Q, K, V, num_landmarks=64)
    >>> out.shape
    (2, 4, 512, 32)
    """
    if group is not None:
        try:
            from .torch.distributed import sharded_approximate
        except ModuleNotFoundError as error:
            # Without torch installed, numpy inputs met a ModuleNotFoundError (a review); with it, the check of the
            # inputs' type runs inside, as every other: one process's numpy Q left the others waiting in their
            # collective until the backend's timeout (another review).
            kinds = sorted({f"{type(x).__module__}.{type(x).__qualname__}" for x in (Q, K, V)})
            raise TypeError(f"group= shards a sequence across torch.distributed processes: Q, K and V must be torch "
                            f"tensors, got {', '.join(kinds)} (and torch is not installed)") from error

        # Every check of a sharded call runs inside it: a process with wrong arguments must not leave the others
        # waiting in a collective.
        return sharded_approximate(
            Q, K, V, group=group, strategy=strategy, num_landmarks=num_landmarks, solver=solver, scale=scale,
            attn_mask=attn_mask, seed=seed, share_landmarks_across_heads=share_landmarks_across_heads,
            query_chunk_size=query_chunk_size, check_values=check_values, is_causal=is_causal, dropout_p=dropout_p,
            enable_gqa=enable_gqa, unsupported={"return_info": return_info, "features": features, "tol": tol,
                                                "max_landmarks": max_landmarks, "strict_tol": strict_tol},
            **unknown)
    check_unknown_arguments("approximate", unknown)
    check_bidirectional(is_causal, dropout_p)
    if check_bool("enable_gqa", enable_gqa):
        K, V = grouped_query_heads(Q, K, V)
    check_values = check_bool("check_values", check_values)
    xp, keys = check_attention_inputs(Q, K, V, attn_mask, check_values=check_values)
    check_bool("return_info", return_info)
    check_bool("share_landmarks_across_heads", share_landmarks_across_heads)
    query_chunk_size = check_query_chunk_size(query_chunk_size)
    tau = check_scale(scale, Q.shape[-1])
    seed = check_seed(seed)
    select = get_strategy(strategy)
    solve = get_solver(solver)
    head_axis = -3 if (share_landmarks_across_heads and K.ndim >= 4) else None
    m, fewest = check_selection(xp, Q, K, num_landmarks, keys, head_axis, features, check_values=check_values,
                                start=tol is not None)
    tol, max_landmarks, largest, real_keys = check_tolerance(xp, tol, max_landmarks, strict_tol, m, Q, K, keys,
                                                             fewest)
    K, V = without_padding(xp, keys, K, V)
    if array_api_compat.is_torch_array(Q):
        from .torch.attention import sdpa_attend

        attend = functools.partial(sdpa_attend, scale=tau)
    else:
        attend = functools.partial(softmax_attention, xp, scale=tau)
    attend = in_query_chunks(attend, query_chunk_size)

    mask = None if keys is None else keys[..., None, :]
    steps = ()
    if tol is None and every_key_a_landmark(m, K.shape[-2], Q.shape[-2] != K.shape[-2], keys is not None, fewest,
                                            lambda: int(xp.max(real_key_counts(xp, keys)))):
        # Every real key a landmark, and queries that are no landmark queries (cross-attention, or self-attention's
        # queries at masked keys): those rows are exact only through A^+ A = I, which a peaked landmark kernel loses
        # in rounding (reviews: 0.16 of error in float32 at m = n in cross-attention, 0.12 in the rows at masked keys);
        # exact attention is exact and cheaper. Unmasked self-attention needs no such step: its landmark queries are
        # its tokens, and A A^+ A = A.
        landmarks, out = None, attend(Q, K, V, mask)
    elif tol is None:
        landmarks = run_strategy(select, Selection.of(xp, Q, K, m, keys, seed, head_axis, features, tau),
                                 check_values)
        out, result = nystrom_product(xp, Q, K, V, landmarks, unchecked(solve), scale=tau, mask=mask, attend=attend)
    else:
        selection = Selection.of(xp, Q, K, m, keys, seed, head_axis, features, tau)

        def attempt(m, solve):
            landmarks = run_strategy(select, selection.resized(m), check_values)
            return landmarks, nystrom_factors(xp, K, V, landmarks, unchecked(solve), scale=tau, mask=mask,
                                              attend=attend)

        (landmarks, factors), steps = search_for_tol(
            xp, Q, K, V, attempt, lambda: (None, None), first=m, num_keys=largest, real_keys=real_keys, key_mask=keys,
            max_landmarks=max_landmarks, tol=tol, strict=strict_tol, solver=solve, scale=tau,
            seed=0 if seed is None else seed, attend=attend)
        # What the steps shared (float32 features, the probes' attention) is not needed for the output.
        selection.memo.clear()
        m, solve = steps[-1].m, steps[-1].solver
        out, result = (attend(Q, K, V, mask), None) if landmarks is None else (
            nystrom_output(xp, Q, factors, attend), factors.solve)
    if not return_info:
        return out
    batch = math.prod(Q.shape[:-2])
    exact_flops = exact_attention_flops(batch, Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1])
    # A diagnostic: it must not hold the call's autograd graph for as long as the Info lives (a review: 20 Infos of
    # calls without a backward pass held 137 MiB against 63 under no_grad, through the output and the landmarks).
    arrays = tuple(detached(a) for a in (Q, K, V, out))
    if landmarks is None:
        return out, Info(landmarks=None, residual=None, solver_iterations=0,
                         flops={"exact": exact_flops, "total": exact_flops}, exact_flops=exact_flops,
                         tol_steps=steps, _inputs=(xp, *arrays, tau, keys, None))
    solve_flops = solve.flops(m, result.iterations) if isinstance(solve, Solver) else 0
    # What the census of the error estimate reads: the weights by which the output combines the landmark rows.
    bias = None if landmarks.log_weights is None else detached(landmarks.log_weights)[..., None, :]
    interpolation = (detached(landmarks.keys), bias, detached(result.inverse))
    info = Info(
        landmarks=replace(landmarks, **{name: detached(getattr(landmarks, name))
                                        for name in ("queries", "keys", "log_weights", "counts")}),
        residual=None if result.residual is None else detached(result.residual),
        solver_iterations=result.iterations,
        flops=nystrom_attention_flops(batch, Q.shape[-2], K.shape[-2], Q.shape[-1], V.shape[-1], m,
                                      solve_flops=solve_flops),
        exact_flops=exact_flops,
        tol_steps=steps,
        _inputs=(xp, *arrays, tau, keys, interpolation),
    )
    return out, info
