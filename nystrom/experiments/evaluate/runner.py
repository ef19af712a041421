"""``python -m nystrom eval`` as a function: evaluate each model, write its JSON, markdown and plots."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from nystrom.torch.dispatch import layer_indices

from ..stamp import busy_warning, make_stamp
from . import dinov2, minilm
from .dinov2 import evaluate_dinov2
from .minilm import evaluate_minilm
from .report import markdown_report, plot_evaluation
from .specs import DEFAULT_LANDMARKS, DEFAULT_SOLVERS, DEFAULT_STRATEGIES, check_names
from .sweep import Grid

MODELS = ("dinov2", "minilm")


def check_evaluation(models=MODELS, *, layers=None, num_landmarks=DEFAULT_LANDMARKS, strategies=DEFAULT_STRATEGIES,
                     solvers=DEFAULT_SOLVERS, images=None, crops=4, size=224, sentences=None, seed=0, threads=None):
    """``(models, layers)`` of :func:`run_evaluation`, after checking all its options before any model loads:
    ``ValueError`` (or ``TypeError``) naming the bad one, so that no model runs for nothing (layers are checked
    against every chosen model and returned per model, ``{model: sorted tuple or None}``: a negative layer counts
    from each model's own last one)."""
    models = check_names("models", [models] if isinstance(models, str) else models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")
    grid = Grid(num_landmarks, strategies, solvers, seed)  # checks m, the specs and the seed
    module = {"dinov2": dinov2, "minilm": minilm}
    per_model = dict.fromkeys(models)
    if layers is not None:
        # The rule patching applies, for each model (a review: layer -1 resolved against MiniLM's 6 layers ran DINOv2's
        # layer 5 instead of its 11).
        layers = list(layers) if isinstance(layers, Iterator) else layers  # read once per model
        for name in models:
            try:
                per_model[name] = layer_indices(layers, module[name].NUM_LAYERS, None)
            except ValueError as err:
                raise ValueError(f"{err} ({name} has {module[name].NUM_LAYERS} layers; pass --model to evaluate "
                                 "another model alone)") from None
    if "dinov2" in models:
        dinov2.check_options(images, crops, size)
        grid.check_lengths([dinov2.tokens(size)], "DINOv2-S")
    if "minilm" in models:
        grid.check_lengths(minilm.sentence_lengths(minilm.check_options(sentences)), "MiniLM")
    return models, per_model


def run_evaluation(models=MODELS, *, out="results", layers=None, num_landmarks=DEFAULT_LANDMARKS,
                   strategies=DEFAULT_STRATEGIES, solvers=DEFAULT_SOLVERS, images=None, crops=4, size=224,
                   sentences=None, seed=0, threads=None, progress=True, echo=print):
    """Evaluate each model and write ``eval_<model>.json``, ``eval_<model>.md`` and two PNGs into ``out``.

    Parameters
    ----------
    models : {"dinov2", "minilm"} or iterable of them
    out : str or os.PathLike
        Output folder, created if missing.
    layers : iterable of int, optional
        FNA layers for every model; default each model's later half.
    num_landmarks, strategies, solvers, seed, progress
        See :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2`.
    images, crops, size
        DINOv2 only; see :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2`.
    sentences
        MiniLM only; see :func:`~nystrom.experiments.evaluate.minilm.evaluate_minilm`.
    threads : int, optional
        torch CPU threads while evaluating (restored afterwards); default torch's setting. On a busy machine one
        thread can be much faster for these small batches: spin-waiting threads slowed the MiniLM forward
        passes 30-fold on 2 cores at a load average of 7.
    echo : callable
        Receives each model's markdown report.

    Returns
    -------
    dict of str to dict
        Model name to its result, as written to JSON: the dict of
        :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2` or
        :func:`~nystrom.experiments.evaluate.minilm.evaluate_minilm` plus ``stamp`` (date, library versions, machine,
        load average; see :func:`nystrom.experiments.stamp.make_stamp`) and ``total_seconds``.
    """
    models, layers = check_evaluation(models, layers=layers, num_landmarks=num_landmarks, strategies=strategies,
                              solvers=solvers, images=images, crops=crops, size=size, sentences=sentences, seed=seed,
                              threads=threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(num_landmarks=num_landmarks, strategies=strategies, solvers=solvers, seed=seed, progress=progress)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        # The records time every configuration: say so when other processes share the cores.
        warning = busy_warning(torch.get_num_threads())
        if warning:
            print(f"nystrom eval: warning: {warning}", file=sys.stderr)
        return {name: _evaluate_and_write(name, out, echo, images=images, crops=crops, size=size,
                                          sentences=sentences, layers=layers[name], **common) for name in models}
    finally:
        torch.set_num_threads(previous)


def _evaluate_and_write(name, out, echo, *, images, crops, size, sentences, **common):
    start = time.perf_counter()
    if name == "dinov2":
        result = evaluate_dinov2(images=images, crops=crops, size=size, **common)
    else:
        result = evaluate_minilm(sentences=sentences, **common)
    result["stamp"] = make_stamp(torch.device("cpu"), torch.float32)
    if result["stamp"]["load_warning"]:
        print(f"nystrom eval: {name}: warning: {result['stamp']['load_warning']}", file=sys.stderr)
    result["total_seconds"] = time.perf_counter() - start
    (out / f"eval_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    report = markdown_report(result)
    (out / f"eval_{name}.md").write_text(report)
    plot_evaluation(result, out)
    echo(report)
    return result
