"""The main job: FNA on real attention of the bundled DINOv2-S, against exact attention.

``python -m nystrom demo`` (or ``./run.sh demo``) captures the queries, keys and values of a later
layer of a trained DINOv2-S/14 on a natural image, approximates that attention with the default
landmark rule and three others, and prints the relative error against the model's own exact attention
output and the time against exact ``scaled_dot_product_attention`` on the same tensors, under a legend
that says what each column means, with the machine's load, and why two strategies tie when they do.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import nystrom
from nystrom.torch.capture import capture_attention

from .evaluate.dinov2 import NUM_LAYERS, check_size
from .pretrained import imagenet_pixel_values, load_dinov2_small, natural_images
from .report import format_ratio, with_flags
from .stamp import busy_warning, load_average
from .timing import measure

LEGEND = """\
  rel. error  ||O_approx - O||_F / ||O||_F, where O is the layer's own attention output, computed by the model's
              exact attention on the same queries, keys and values (lower is better; 0 is exact).
  time        fastest of {repeats} calls of nystrom.approximate, landmark selection included; exact SDPA: fastest of
              {repeats} calls of torch's scaled_dot_product_attention on the same tensors. speed-up = exact / time.
  sampled estimate
              what nystrom can tell without the exact output: the error of the 'norm' row estimated from 128 query
              rows computed exactly (Info.estimate_error), with a 95% interval; it should bracket that row's error.
  ties        when two strategies print the same error, a line under the table says whether they chose the same
              landmark tokens (then they compute the same approximation) or only agree to the digits shown."""


def _best_time(fn, repeats):
    """Fastest of ``repeats`` timed calls after a warm-up (:func:`nystrom.experiments.timing.measure` on the CPU)."""
    return measure(fn, torch.device("cpu"), min_calls=repeats, max_calls=repeats).min


def _landmark_rows(landmarks):
    """Each landmark's key, query and log-weight (0 where it stands for itself) as one row, ``(sequences, m, 2d + 1)``
    float64, the rows of each sequence in lexicographic order: equal for the same landmarks in any order."""
    keys, queries = torch.broadcast_tensors(landmarks.keys, landmarks.queries)
    weights = (torch.zeros(keys.shape[:-1], dtype=keys.dtype) if landmarks.log_weights is None
               else landmarks.log_weights.broadcast_to(keys.shape[:-1]))
    rows = torch.cat([keys, queries, weights[..., None]], dim=-1).detach().double()
    rows = rows.reshape(-1, *rows.shape[-2:]).numpy()
    return np.stack([r[np.lexsort(r.T[::-1])] for r in rows])


def _same_landmarks(a, b):
    """Whether two :class:`~nystrom.Info` hold the same landmarks in any order: the same keys and queries, each
    standing for as many tokens (tokens, cluster means, or weighted ones alike)."""
    rows_a, rows_b = _landmark_rows(a.landmarks), _landmark_rows(b.landmarks)
    return rows_a.shape == rows_b.shape and np.array_equal(rows_a, rows_b)


def _ties(infos, errors):
    """Lines explaining each pair of strategies whose errors print the same: same landmarks, or equal to 4 digits."""
    lines = []
    names = list(infos)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if f"{errors[a]:.4f}" != f"{errors[b]:.4f}":
                continue
            if _same_landmarks(infos[a], infos[b]):
                why = "both chose the same landmarks on this input, so the approximations are the same"
            else:
                why = "different landmarks, equal errors to the 4 digits shown"
            lines.append(f"{'':>6} '{a}' and '{b}' tie: {why}")
    return lines


def check_demo(image, sizes, layer, num_landmarks):
    """Check the options of :func:`run_demo` before the model loads; ``ValueError`` naming the bad one. Returns the
    image, so that it is decoded once."""
    pictures = natural_images()
    if image not in pictures:
        raise ValueError(f"image must be one of {sorted(pictures)}, got {image!r}")
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise ValueError(f"num_landmarks must be a positive int, got {num_landmarks!r}")
    for size in sizes:
        check_size("sizes", size)
        if (size // 14) ** 2 + 1 < num_landmarks:
            raise ValueError(f"size {size} gives {(size // 14) ** 2 + 1} tokens, fewer than num_landmarks="
                             f"{num_landmarks}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < NUM_LAYERS:
        raise ValueError(f"layer must be an encoder layer in [0, {NUM_LAYERS}), got {layer!r}")
    return pictures[image]


def run_demo(*, image="astronaut", sizes=(518, 1036), layer=9, num_landmarks=64,
             strategies=("norm", "fps", "segment_means", "uniform"), repeats=3, out=print):
    """Print error and speed of Nyström attention on real DINOv2-S attention, with a legend of what they mean.

    Parameters
    ----------
    image : str
        A key of :func:`nystrom.experiments.pretrained.natural_images`.
    sizes : tuple of int
        Input resolutions (multiples of 14); ``n = (size/14)^2 + 1`` tokens.
    layer : int
        Encoder layer whose attention is approximated (FNA targets the later layers).
    num_landmarks : int
    strategies : tuple of str
    repeats : int
        Timing repeats (best of).
    out : callable
        Where lines go.

    Returns
    -------
    list of dict
        One row per (size, strategy): ``n``, ``strategy``, ``rel_error``, ``ms``, ``exact_ms``, ``speedup``.

    Notes
    -----
    The load average is printed with the header, and a warning when it exceeds the machine's cores (the run's own
    threads count in it): other processes then inflate the times.
    """
    picture = check_demo(image, sizes, layer, num_landmarks)
    model = load_dinov2_small()
    rows = []
    threads = torch.get_num_threads()
    loads = load_average()
    out(f"DINOv2-S/14 (bundled weights), image '{image}', layer {layer}, m = {num_landmarks}, "
        f"{threads} CPU threads, float32, load average {loads}")
    warning = busy_warning(threads)
    if warning:
        out(f"warning: {warning}")
    out(LEGEND.format(repeats=repeats))
    out(f"{'n':>6} {'strategy':>14} {'rel. error':>11} {'time':>10} {'exact SDPA':>11} {'speed-up':>9}")
    for size in sizes:
        cap = capture_attention(model, {"pixel_values": imagenet_pixel_values(picture, size)}, layers=[layer])[0]
        Q, K, V = cap.query, cap.key, cap.value
        exact_s = _best_time(lambda: F.scaled_dot_product_attention(Q, K, V, scale=cap.scaling), repeats)
        reference = cap.output
        errors, infos = {}, {}
        for strategy in strategies:
            approx, infos[strategy] = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=num_landmarks,
                                                          scale=cap.scaling, seed=0, return_info=True)
            err = errors[strategy] = float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference))
            secs = _best_time(lambda s=strategy: nystrom.approximate(Q, K, V, strategy=s, num_landmarks=num_landmarks,
                                                                     scale=cap.scaling, seed=0), repeats)
            row = dict(n=Q.shape[-2], strategy=strategy, rel_error=err, ms=1e3 * secs, exact_ms=1e3 * exact_s,
                       speedup=exact_s / secs)
            rows.append(row)
            out(f"{row['n']:>6} {strategy:>14} {err:>11.4f} {row['ms']:>8.1f}ms {row['exact_ms']:>9.1f}ms "
                f"{format_ratio(row['speedup']):>9}")
        for line in _ties(infos, errors):
            out(line)
        if "norm" in infos:
            est = infos["norm"].estimate_error(num_samples=128, seed=0)
            # est.num_samples: a sequence of fewer query rows is sampled whole (a review: n = 2 said "128").
            out(f"{'':>6} sampled estimate for 'norm' from {est.num_samples} exact rows: {est.estimate:.4f} "
                f"(95% interval {est.low:.4f} to {est.high:.4f})")
    warning = busy_warning(threads)
    if warning:
        out(f"warning: after the run, {warning}")
    return rows


def main(argv=None):
    """``python -m nystrom demo``: parse ``argv`` and run :func:`run_demo`; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m nystrom demo",
                                     description="FNA on real DINOv2-S attention: error and time vs exact")
    parser.add_argument("--image", default="astronaut",
                        help="a photograph bundled with scikit-image, by its name in "
                             "nystrom.experiments.pretrained.natural_images() (default astronaut)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 1036],
                        help="image sides in pixels, multiples of 14; n = (size/14)^2 + 1 tokens (default 518 1036)")
    parser.add_argument("--layer", type=int, default=9,
                        help="encoder layer (0-11) whose attention is approximated (default 9)")
    parser.add_argument("--num-landmarks", type=int, default=64, help="landmarks m per sequence (default 64)")
    args = parser.parse_args(argv)
    try:
        check_demo(args.image, args.sizes, args.layer, args.num_landmarks)
    except ValueError as err:
        parser.error(with_flags(parser, str(err)))
    run_demo(image=args.image, sizes=tuple(args.sizes), layer=args.layer, num_landmarks=args.num_landmarks)
    return 0
