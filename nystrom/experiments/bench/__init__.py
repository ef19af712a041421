r"""The benchmark suite: ``python -m nystrom bench`` (``./run.sh bench``) regenerates every table and plot.

Sections (all by default, or a subset with ``--only``):

``scaling``
    Time and peak memory of :func:`nystrom.approximate` (every strategy, :math:`m \in \{32, 64, 128, 256\}`)
    and of exact :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA) against :math:`n`, for
    inputs of shape ``(1, 1, n, 64)`` and ``(1, 12, n, 64)``; the fitted slope of :math:`\log t` against
    :math:`\log n`; the achieved FLOP rate as a fraction of a large GEMM's, timed in the same run
    (roofline); and the issue's speed targets, met or missed.
``breakdown``
    Where the time of one call goes: input validation, landmark selection, the two attention products
    (:math:`m` landmark queries over :math:`n` keys, :math:`n` queries over :math:`m` landmark keys) and
    the :math:`m \times m` pseudo-inverse.
``threads``
    Every method at one thread and at all cores, and the parallel efficiency of each stage (CPU only).
``accuracy``
    Relative output error :math:`\lVert \hat O - O\rVert_F / \lVert O\rVert_F` against :math:`m` and
    against time, per strategy and solver, on attention inputs captured from DINOv2-S (224 and 518 px)
    and all-MiniLM-L6-v2, and on synthetic inputs with an attention sink; the reference :math:`O` is
    exact attention in float64.
``e2e``
    Latency, peak memory and feature agreement of the DINOv2-S forward pass at 224 / 518 / 1036 px,
    exact against FNA on the later half of the layers.

Every section writes ``<out>/<device>/<section>.json`` (the records and a stamp: device, dtype, library
versions, date, git commit, load average), ``<section>.md`` (its tables) and PNG plots carrying the same
stamp. ``--device cuda`` (the default when CUDA is present) runs the same suite on the GPU in bfloat16
(``--dtype float16`` for half) up to :math:`n = 262{,}144`.

How times and peak memory are measured, and the roofline they are compared with, is described in
:mod:`nystrom.experiments.timing`.

Modules: :mod:`~nystrom.experiments.bench.plan` (what one run sweeps), :mod:`~nystrom.experiments.bench.inputs`,
one module per section, :mod:`~nystrom.experiments.bench.output` (files and figures) and
:mod:`~nystrom.experiments.bench.cli` (the command line).
"""
