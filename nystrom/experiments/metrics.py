"""How far an approximate model's outputs are from the exact model's: output error, retrieval, saliency overlap."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Share of each saliency map's pixels that counts as salient for the IoU.
SALIENT_FRACTION = 0.2


def relative_error(out, reference):
    r""":math:`\lVert \hat O - O\rVert_F / \lVert O\rVert_F` over the whole tensor, in float64.

    Parameters
    ----------
    out : Tensor, any shape
        The approximation; cast to float64.
    reference : Tensor, same shape
        The exact values, float64.

    Returns
    -------
    float
    """
    out = out.double()
    return float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))


def real_query_rows(capture):
    """``(B, 1, n, 1)`` float64 ones on the real query rows of a captured layer (those of its ``attention_mask``), or
    1.0 without a mask: the factor that leaves padded rows, attention nobody reads, out of an error. For captures of
    padded batches; under :func:`~nystrom.torch.masking.mask_keys` the masked tokens' rows would drop out too."""
    return 1.0 if capture.attention_mask is None else capture.attention_mask[:, None, :, None].double()


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
