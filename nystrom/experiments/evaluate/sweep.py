"""The loop both model evaluations share: every (strategy, solver, m), per-layer errors, then FNA end to end."""

from __future__ import annotations

import time

import numpy as np
import torch

from nystrom import approximate
from nystrom.linalg.validation import SEED_LIMIT, check_int, check_seed
from nystrom.torch.dispatch import attention_layers
from nystrom.torch.patching import FNAHandle, fna, own_attention_answers

from ..metrics import real_query_rows, relative_error
from ..report import progress_bar
from .specs import check_names, check_positive_ints, parse_spec


def same_once(name, parsed):
    """``parsed`` (label to object) if no two labels give equal objects; ``ValueError`` naming both otherwise (a review:
    ``--strategies norm norm:`` ran ``norm`` twice under two labels)."""
    labels = list(parsed)
    for i, first in enumerate(labels):
        for second in labels[i + 1:]:
            if parsed[first] == parsed[second]:
                raise ValueError(f"{name} {first!r} and {second!r} are the same {parsed[first]!r}")
    return parsed


class Grid:
    """The configurations of one evaluation: every (strategy, solver, m), and the seed.

    The arguments are checked and the specs parsed here, before any model loads.
    """

    def __init__(self, num_landmarks, strategies, solvers, seed):
        self.num_landmarks = check_positive_ints("num_landmarks", num_landmarks)
        self.strategies = same_once("strategies", {s: parse_spec(s, "strategy")
                                                   for s in check_names("strategies", strategies)})
        self.solvers = same_once("solvers", {s: parse_spec(s, "solver") for s in check_names("solvers", solvers)})
        # Evaluations need an int seed (layer l uses seed + l, wrapped below 2**63 as patching wraps it); a bad one
        # fails before any model runs.
        self.seed = check_seed(check_int("seed", seed, minimum=0))

    def check_lengths(self, lengths, model):
        r"""Run every strategy once per :math:`m` on random data of the shortest of ``lengths`` (the token counts of
        ``model``'s sequences) longer than :math:`m`, so that a setting the sequences cannot take (``fps:first=100``
        for 14 tokens) is a ``ValueError`` naming it before the model loads. A sequence of at most :math:`m` tokens
        is answered by exact attention, without the strategy, and checks nothing."""
        generator = torch.Generator().manual_seed(0)
        for m in self.num_landmarks:
            longer = [n for n in lengths if n > m]
            if not longer:
                continue
            n = min(longer)
            Q, K, V = (torch.randn(1, 2, n, 8, generator=generator) for _ in range(3))
            for label, strategy in self.strategies.items():
                try:
                    approximate(Q, K, V, strategy=strategy, num_landmarks=m, seed=self.seed)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"strategy {label!r} with m={m} cannot run on {model}'s sequences of {n} "
                                     f"tokens: {err}") from None

    def __iter__(self):
        """``(strategy label, strategy, solver label, solver, m)``."""
        for s, strategy in self.strategies.items():
            for v, solver in self.solvers.items():
                for m in self.num_landmarks:
                    yield s, strategy, v, solver, m

    def __len__(self):
        return len(self.strategies) * len(self.solvers) * len(self.num_landmarks)

    def settings(self, model, layers, **extra):
        """The ``settings`` of a result: the grid, FNA's options, the model's dtype and ``extra``."""
        return {
            "layers": list(layers), "num_landmarks": list(self.num_landmarks),
            "strategies": list(self.strategies), "strategy_objects": {s: repr(o) for s, o in self.strategies.items()},
            "solvers": list(self.solvers), "solver_objects": {s: repr(o) for s, o in self.solvers.items()},
            "seed": self.seed, "resample": "once", "features": "input", "dtype": str(next(model.parameters()).dtype),
            **extra,
        }


def layer_errors(captures, *, strategy, solver, num_landmarks, seed):
    """Per captured layer, the pooled relative error of Nyström attention on the recorded inputs.

    Parameters
    ----------
    captures : list of CapturedAttention
        What :func:`nystrom.torch.capture.capturing` recorded in the exact model, one per (layer, forward pass).
    strategy, solver
        Objects as :func:`~nystrom.experiments.evaluate.specs.parse_spec` returns them.
    num_landmarks : int
        :math:`m`, as :func:`~nystrom.torch.patching.fna` takes it: where the patched model runs its own attention
        (:func:`~nystrom.torch.patching.own_attention_answers`) the layer's error is 0; otherwise :math:`m` is
        clipped to the real tokens of the shortest sequence.
    seed : int
        Layer ``l`` uses ``seed + l`` (modulo :math:`2^{63}`, as :func:`~nystrom.torch.patching.fna` wraps it).

    Returns
    -------
    dict of int to float
        Layer to :math:`\\lVert \\hat O_\\ell - O_\\ell\\rVert_F / \\lVert O_\\ell\\rVert_F` over all its captures,
        on the real query rows (:func:`~nystrom.experiments.metrics.real_query_rows`; captures of padded batches, not
        of :func:`~nystrom.torch.masking.mask_keys`).
    """
    approx, exact = {}, {}
    for cap in captures:
        lengths = ([cap.key.shape[-2]] if cap.attention_mask is None
                   else cap.attention_mask.sum(dim=-1).tolist())
        if own_attention_answers(num_landmarks, max(lengths), min(lengths)):
            out = cap.output
        else:
            out = approximate(cap.query, cap.key, cap.value, strategy=strategy, num_landmarks=min(num_landmarks,
                              min(lengths)), solver=solver, scale=cap.scaling, attn_mask=cap.attn_mask,
                              seed=(seed + cap.layer) % SEED_LIMIT, features=cap.hidden_states)
        # Over the real query rows: a padded token's row is attention nobody reads (a review: 0.4637 against 0.4697
        # on MiniLM layer 3 for a batch of 10 and 22 tokens; the CLI's batches hold sentences of one length).
        real = real_query_rows(cap)
        approx.setdefault(cap.layer, []).append((out * real).flatten())
        exact.setdefault(cap.layer, []).append((cap.output * real).flatten())
    return {layer: relative_error(torch.cat(approx[layer]), torch.cat(exact[layer]).double()) for layer in approx}


def fna_layers(model, layers):
    """``layers`` as a tuple, or by default the later half of the model's attention layers (as
    :func:`~nystrom.torch.patching.fna`; the FNA authors' CLIP runs use layers 13-23 of 24)."""
    return FNAHandle.default_layers(len(attention_layers(model))) if layers is None else tuple(layers)


def sweep(model, grid, captures, *, layers, desc, progress, forward, coverage, compare):
    """One record per configuration of ``grid``: per-layer errors on ``captures``, then the FNA model's outputs.

    For each (strategy, solver, m) the errors of :func:`layer_errors` are computed, ``forward()`` runs the model
    with :func:`~nystrom.torch.patching.fna` in ``layers``, and ``compare`` turns its outputs into the model's
    downstream metrics. Run it under :func:`torch.inference_mode`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    grid : Grid
    captures : list of CapturedAttention
        The exact model's attention inputs and outputs in ``layers``.
    layers : tuple of int
        FNA layers.
    desc : str
        Progress-bar label.
    progress : bool
        Show the progress bar.
    forward : callable
        ``forward()`` returns the outputs compared (called with FNA switched on).
    coverage : callable
        ``coverage(m)`` returns ``{"m_effective": ..., "all_tokens_fraction": ...}`` for the model's inputs.
    compare : callable
        ``compare(outputs)`` returns the metrics of one configuration, a dict of str to float.

    Returns
    -------
    list of dict
        ``strategy``, ``solver`` (the labels given), ``m``, the ``coverage`` keys, ``layer_error`` (layer as str to
        error), ``mean_layer_error``, the ``compare`` keys and ``seconds`` (the configuration's wall time).
    """
    records = []
    with progress_bar(len(grid), desc, enabled=progress) as bar:
        for strategy_label, strategy, solver_label, solver, m in grid:
            bar.set_postfix_str(f"{strategy_label} {solver_label} m={m}")
            start = time.perf_counter()
            errors = layer_errors(captures, strategy=strategy, solver=solver, num_landmarks=m, seed=grid.seed)
            with fna(model, layers=layers, num_landmarks=m, strategy=strategy, solver=solver, seed=grid.seed):
                outputs = forward()
            records.append({
                "strategy": strategy_label, "solver": solver_label, "m": m, **coverage(m),
                "layer_error": {str(layer): e for layer, e in errors.items()},
                "mean_layer_error": float(np.mean(list(errors.values()))),
                **compare(outputs),
                "seconds": time.perf_counter() - start,
            })
            bar.update()
    return records
