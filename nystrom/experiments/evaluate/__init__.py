r"""How much FNA changes what the bundled pretrained models compute: ``python -m nystrom eval``.

For one model, a set of FNA layers, landmark counts :math:`m`, landmark strategies and solvers, three kinds of
agreement with the exact model are measured.

Per-layer attention error
    The exact model runs once with :func:`~nystrom.torch.capture.capturing` on the chosen layers. For every
    captured layer the recorded queries, keys and values are approximated with :func:`nystrom.approximate`
    (same strategy, :math:`m` and solver, one landmark set per sequence shared by the heads, selected on the
    block's input hidden states as :func:`~nystrom.torch.patching.fna` does, seed ``seed + layer``) and compared
    with the recorded exact output:
    :math:`\lVert \hat O_\ell - O_\ell\rVert_F / \lVert O_\ell\rVert_F` over all sequences and heads of the
    layer. Every layer sees exact inputs, so the error of one layer does not leak into the next, and every
    layer chooses its own landmarks.
Final features
    The model runs end to end with :func:`~nystrom.torch.patching.fna` in the chosen layers (FNA's defaults:
    landmarks chosen at the first FNA layer on its input hidden states and reused by the later ones), and its
    output is compared with the exact model's by cosine similarity.
Downstream agreement
    DINOv2-S/14: instance retrieval and saliency maps. MiniLM: sentence-embedding nearest neighbours and
    paraphrase retrieval. The definitions are under :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2` and
    :func:`~nystrom.experiments.evaluate.minilm.evaluate_minilm`.

:math:`m` is clipped to the number of tokens :math:`n` of each sequence. With :math:`m \ge n` every token is a
landmark, and the patched model runs its own exact attention in such layers (see
:func:`~nystrom.torch.patching.fna`): their per-layer error is 0 whatever the solver, and the end-to-end metrics of
a record with ``all_tokens_fraction`` 1 are the exact model's. The records say how many sequences had :math:`m \ge n`
(``all_tokens_fraction``).

Modules: :mod:`~nystrom.experiments.evaluate.specs` (the arguments), :mod:`~nystrom.experiments.evaluate.sweep`
(the loop over configurations both models share), :mod:`~nystrom.experiments.evaluate.dinov2` and
:mod:`~nystrom.experiments.evaluate.minilm` (one per model), :mod:`~nystrom.experiments.evaluate.runner`
(:func:`~nystrom.experiments.evaluate.runner.run_evaluation`: evaluate and write the files),
:mod:`~nystrom.experiments.evaluate.report` (markdown and plots) and :mod:`~nystrom.experiments.evaluate.cli`.
"""
