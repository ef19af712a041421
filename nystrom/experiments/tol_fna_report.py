r"""``fna(model, tol=...)`` end to end: ``python -m nystrom.experiments.tol_fna_report``.

For each ``tol``, FNA with ``tol`` on every layer (default) of the bundled DINOv2-S (images astronaut, coffee and
rocket at 518 px, :math:`n = 1{,}370`, one batch) and all-MiniLM-L6-v2 (the 60 example sentences in one padded
batch, 10-22 tokens): the first forward pass calibrates :math:`m` per layer (the search of
``approximate(tol=...)`` from ``--num-landmarks``, default 16 for DINOv2 and 4 for MiniLM), the second reuses it
and is measured. Per model and ``tol``:

* the :math:`m` each layer calibrated (``exact``: the layer ran the model's own attention, because Nyström
  attention could not reach ``tol`` with at most half the FLOPs, or :math:`m` covered every token), and the layers
  whose search escalated the solver or warned (``tol`` not reached: only with a ``--max-landmarks`` budget);
* the achieved layer error of the second pass: :math:`\lVert \hat O_\ell - O_\ell\rVert_F / \lVert O_\ell\rVert_F`
  with :math:`O_\ell` exact attention (float64) on the layer's own queries, keys and values as FNA saw them
  (:func:`~nystrom.torch.capture.capturing` inside :func:`~nystrom.fna`), real rows only; how many layers are
  within ``tol``, the median and the largest;
* the downstream metric of :mod:`nystrom.experiments.evaluate`: DINOv2's cosine of FNA and exact final features
  (``pooler_output``, the normalised CLS token, mean and worst image; patch tokens, mean), MiniLM's cosine of FNA
  and exact sentence embeddings (mean and worst sentence);
* with ``--timing``, the time of a calibrated forward pass over the exact model's (best of 3
  :func:`~nystrom.experiments.timing.timed_call` each, one thread); otherwise "to be measured".

Writes ``tol_fna.json`` (stamped, per-layer detail) and ``tol_fna.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.linalg.tolerance import EXACT
from nystrom.torch.capture import capturing
from nystrom.torch.dispatch import attention_layers

from . import pretrained
from .evaluate import dinov2, minilm
from .metrics import real_query_rows, relative_error
from .report import check_distinct, layers_per_model, markdown_table, output_folder, positive, with_flags
from .stamp import caption, load_average, make_stamp
from .timing import best_time

TOLS = (0.05, 0.1, 0.2)
IMAGES = ("astronaut", "coffee", "rocket")
MODELS = ("dinov2", "minilm")
#: Where each layer's search starts by default: MiniLM's shortest example sentence has 10 tokens.
FIRST_M = {"dinov2": 16, "minilm": 4}
NUM_LAYERS = {"dinov2": dinov2.NUM_LAYERS, "minilm": minilm.NUM_LAYERS}
CPU = torch.device("cpu")


def dinov2_setup(images=IMAGES, size=518):
    """``(model, forward, compare)`` for DINOv2-S on ``images`` at ``size`` px, one batch."""
    model = pretrained.load_dinov2_small()
    pictures = pretrained.natural_images()
    pixels = torch.cat([pretrained.imagenet_pixel_values(pictures[name], size) for name in images])

    def forward():
        return model(pixel_values=pixels)

    def compare(out, exact):
        cls = F.cosine_similarity(out.pooler_output, exact.pooler_output, dim=-1)
        patches = F.cosine_similarity(out.last_hidden_state[:, 1:], exact.last_hidden_state[:, 1:], dim=-1)
        return {"cls_cosine": float(cls.mean()), "cls_cosine_min": float(cls.min()),
                "patch_cosine": float(patches.mean())}

    return model, forward, compare


def minilm_setup(sentences=None):
    """``(model, forward, compare)`` for MiniLM on the first ``sentences`` example sentences, one padded batch."""
    model, tokenizer = pretrained.load_minilm()
    text = pretrained.example_sentences()[:sentences]

    def forward():
        return pretrained.sentence_embeddings(model, tokenizer, text)

    def compare(out, exact):
        cosine = (out * exact).sum(dim=-1)  # unit rows
        return {"embedding_cosine": float(cosine.mean()), "embedding_cosine_min": float(cosine.min())}

    return model, forward, compare


def layer_error(c):
    """Relative error of a captured layer's output against float64 exact attention on its own inputs, real rows
    only."""
    exact = F.scaled_dot_product_attention(c.query.double(), c.key.double(), c.value.double(), attn_mask=c.attn_mask,
                                           scale=c.scaling)
    keep = real_query_rows(c)
    return relative_error(c.output * keep, exact * keep)


def evaluate(model, forward, compare, *, tols=TOLS, layers=None, num_landmarks=16, max_landmarks=None,
             timing=False):
    """Per ``tol``: calibrate FNA on one pass, measure the next (see the module docstring).

    Returns
    -------
    dict
        ``exact_seconds`` and ``records``: one dict per ``tol`` with ``num_landmarks_per_layer`` (``None`` where the
        layer ran exact attention), ``escalated`` and ``warned`` layers, ``layer_error`` per layer, the downstream
        metrics and ``seconds`` (``None`` without ``timing``).
    """
    layers = list(range(len(attention_layers(model)))) if layers is None else list(layers)
    with torch.no_grad():
        exact = forward()
        exact_seconds = best_time(forward, CPU) if timing else None
        records = []
        for tol in tols:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)  # a layer that misses tol is counted, not printed
                with nystrom.fna(model, layers=layers, num_landmarks=num_landmarks, tol=tol,
                                 max_landmarks=max_landmarks) as handle:
                    forward()  # calibration
                    with capturing(model, layers) as captures:
                        out = forward()
                    seconds = best_time(forward, CPU) if timing else None
            default = handle.solver
            errors = {c.layer: layer_error(c) for c in captures}
            records.append({
                "tol": tol,
                "num_landmarks_per_layer": {layer: None if layer in handle.exact_layers
                                            else handle.num_landmarks_per_layer.get(layer) for layer in layers},
                "escalated": sorted(layer for layer, solver in handle.solver_per_layer.items()
                                    if solver not in (default, EXACT)),
                "warned": sum("not reached" in str(w.message) for w in caught),
                "layer_error": errors,
                **compare(out, exact),
                "seconds": seconds,
            })
    return {"exact_seconds": exact_seconds, "records": records}


def table_rows(name, result):
    """Markdown rows of one model's :func:`evaluate` result."""
    rows = []
    for record in result["records"]:
        tol, errors = record["tol"], np.array(list(record["layer_error"].values()))
        ms = " ".join("exact" if m is None else str(m) for m in record["num_landmarks_per_layer"].values())
        downstream = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in record.items()
                               if "cosine" in key)
        speed = ("to be measured" if record["seconds"] is None or result["exact_seconds"] is None
                 else f"{record['seconds'] / result['exact_seconds']:.2f}×")
        rows.append([name, tol, ms, f"{int((errors <= tol).sum())} / {errors.size}",
                     f"{np.median(errors):.3f}, {errors.max():.3f}", len(record["escalated"]), record["warned"],
                     downstream, speed])
    return rows


HEADER = ["model", "tol", "m per layer (calibrated)", "layers within tol", "layer error (median, largest)",
          "escalated", "warned", "downstream (FNA vs exact)", "forward time / exact"]


def main(argv=None):
    """Evaluate, write ``tol_fna.json`` and ``tol_fna.md``, print the table."""
    parser = argparse.ArgumentParser(prog="python -m nystrom.experiments.tol_fna_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tols", type=positive(float), nargs="+", default=list(TOLS))
    parser.add_argument("--layers", type=int, nargs="+",
                        help="FNA layers (default all); each model takes those it has, a negative one from its last")
    parser.add_argument("--num-landmarks", type=positive(int), default=None,
                        help="m where each layer's search starts (default 16 for DINOv2, 4 for MiniLM, as tol_report)")
    parser.add_argument("--max-landmarks", type=positive(int), default=None,
                        help="budget on each layer's m (default none: a layer that Nyström attention cannot bring "
                             "within tol with at most half the FLOPs of exact attention runs exact attention)")
    parser.add_argument("--images", nargs="+", default=list(IMAGES), help="DINOv2: natural images")
    parser.add_argument("--size", type=positive(int), default=518, help="DINOv2: image side in pixels (multiple of 14)")
    parser.add_argument("--sentences", type=positive(int), default=None, help="MiniLM: the first N example sentences")
    parser.add_argument("--timing", action="store_true", help="also time a calibrated forward pass against exact")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    args = parser.parse_args(argv)
    # Usage errors before any model runs (reviews: an unknown image was a KeyError after DINOv2-S had loaded, a side
    # of 15 pixels ran, layers that no model has ran none; --max-landmarks below a start, --sentences past the
    # examples and repeated --tols were tracebacks or corrupt tables).
    try:
        check_distinct("--tols", args.tols)
        if "dinov2" in args.models:
            dinov2.check_size("--size", args.size)
            dinov2.check_images(args.images)
        if "minilm" in args.models and args.sentences is not None:
            minilm.check_options(args.sentences)
        layers = layers_per_model("--layers", args.layers, {key: NUM_LAYERS[key] for key in args.models})
        starts = {key: args.num_landmarks or FIRST_M[key] for key in args.models}
        if args.max_landmarks is not None and args.max_landmarks < max(starts.values()):
            raise ValueError(f"--max-landmarks {args.max_landmarks}: below where a search starts, m = "
                             f"{max(starts.values())} (--num-landmarks, default {FIRST_M})")
    except ValueError as err:
        parser.error(with_flags(parser, str(err)))
    try:
        # An empty --out would write into the current folder (a review).
        output_folder(args.out)
    except OSError as err:
        parser.error(f"--out {args.out!r}: cannot create or write to the output folder ({err.strerror or err})")
    torch.set_num_threads(1)
    stamp = make_stamp(CPU, torch.float32)
    setups = {"dinov2": ("DINOv2-S", lambda: dinov2_setup(args.images, args.size)),
              "minilm": ("MiniLM", lambda: minilm_setup(args.sentences))}
    results, rows = {}, []
    for key in args.models:
        name, setup = setups[key]
        model, forward, compare = setup()
        first = starts[key]
        results[key] = {"num_landmarks": first, **evaluate(model, forward, compare, tols=args.tols, layers=layers[key],
                                                            num_landmarks=first, max_landmarks=args.max_landmarks,
                                                            timing=args.timing)}
        rows += table_rows(name, results[key])
    # The options that applied: --images and --size only with DINOv2, --sentences only with MiniLM.
    unused = {"out"} | ({"images", "size"} if "dinov2" not in args.models else set()) | (
        {"sentences"} if "minilm" not in args.models else set())
    settings = {key: value for key, value in vars(args).items() if key not in unused}
    # The stamp's load is the start's; the timings met the load at the end too (a review).
    stamp["load_average_end"] = load_average()
    markdown = (caption(stamp) + "\n" + f"_Load average at the end: {stamp['load_average_end']}._\n\n"
                + markdown_table(HEADER, rows))
    out = Path(args.out)
    (out / "tol_fna.json").write_text(json.dumps({"stamp": stamp, "settings": settings, "results": results},
                                                 indent=1))
    (out / "tol_fna.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
