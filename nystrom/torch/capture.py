r"""Record the real queries, keys, values and outputs of every attention layer of a transformers model.

One forward pass of an unmodified model yields, per encoder layer, exactly what its attention function sees and
returns, so approximations can be tested on real attention (:func:`capture_attention`'s example).

It uses the handler mechanism of :mod:`nystrom.torch.dispatch` (the model's own attention function still runs) and
restores the model on exit, also after an exception. Started inside :func:`~nystrom.torch.patching.fna` or
:func:`~nystrom.torch.masking.mask_keys`, it records the call as the model makes it (with the model's own mask) and
the output actually computed there (approximated, masked).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..linalg.validation import check_scale
from .dispatch import Handle, check_not_causal, padding_mask_from_attention_mask

__all__ = ["CapturedAttention", "capture_attention", "capturing"]


@dataclass(frozen=True)
class CapturedAttention:
    """One attention call of one encoder layer.

    Attributes
    ----------
    layer : int
        Encoder layer index.
    hidden_states : Tensor, shape (B, n, D), or None
        The block's input: the residual stream before the block's first LayerNorm (for post-LayerNorm models
        such as BERT, the previous block's normalised output). ``None`` where that input is not the attention's
        tokens, one feature row per key: windowed or pooled attention (SAM 2's Hiera attends over windows of a
        ``(B, H, W, C)`` input, some stages with pooled queries).
    query, key, value : Tensor, shapes (B, H, n, d) and (B, H_kv, n, d)
        As the attention function receives them (after the projections, before the softmax and scaling). A model
        with grouped-query or multi-query attention passes fewer key/value heads, :math:`H_{kv}` dividing :math:`H`:
        reproduce it with ``enable_gqa=True`` (SDPA's convention, which ``nystrom.exact_attention`` and
        ``nystrom.approximate`` follow, and which leaves equal head counts as they are); :math:`H_{kv} = H` otherwise.
    attention_mask : bool Tensor, shape (B, n), or None
        ``True`` for the keys the attention function sees as real (transformers' meaning); ``None`` when the model
        passed no attention mask. Capture entered outside :func:`~nystrom.torch.masking.mask_keys` runs inside it
        and sees its mask too: the masked tokens' keys read ``False`` there (the record stays consistent, ``attn_mask``
        reproducing ``output``); entered inside, it sees the model's own mask.
    scaling : float
        The softmax temperature :math:`\\tau` the model uses.
    output : Tensor, shape (B, H, n, d)
        The attention output per head, :math:`\\mathrm{softmax}(\\tau QK^\\top + M)V` for exact attention
        (transformers returns it as ``(B, n, H, d)``; it is stored head-major like the inputs).
    """

    layer: int
    hidden_states: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    output: torch.Tensor

    @property
    def attn_mask(self):
        """bool Tensor, shape (B, 1, 1, n), or None: ``attention_mask`` as the key mask that
        ``nystrom.approximate`` and ``scaled_dot_product_attention`` take for the ``(B, H, n, d)`` inputs."""
        return None if self.attention_mask is None else self.attention_mask[:, None, None, :]


def _record(records, handle, layer, call_next, module, query, key, value, attention_mask, **kwargs):
    # A causal call without a mask (transformers' SDPA function) would record no mask for a causal output.
    check_not_causal(module, kwargs.get("is_causal"), "capture")
    output, weights = call_next(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    hidden = handle.inputs.get(layer)
    batch, _, n, _ = key.shape
    if hidden is not None and (query.shape[-2] != n or tuple(hidden.shape[:-1]) != (batch, n)):
        hidden = None  # windowed or pooled attention: no feature row per key
    records.append(CapturedAttention(
        layer=layer,
        hidden_states=None if hidden is None else hidden.detach(),
        query=query.detach(),
        key=key.detach(),
        value=value.detach(),
        attention_mask=padding_mask_from_attention_mask(attention_mask, key.shape[0], key.shape[-2]),
        scaling=check_scale(scaling, query.shape[-1]),
        output=output.detach().transpose(1, 2),
    ))
    return output, weights


@contextlib.contextmanager
def capturing(model, layers=None):
    """Record every attention call of the chosen layers while the ``with`` block runs.

    Parameters
    ----------
    model : torch.nn.Module
        ``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel``, ``BertModel`` or another encoder accepted by
        :func:`nystrom.torch.dispatch.attention_layers`.
    layers : int, iterable of int, or None
        Encoder layers to record; ``None`` for all.

    Yields
    ------
    list of CapturedAttention
        Filled in call order (layer order within a forward pass; one entry per layer per pass).

    Raises
    ------
    ValueError
        In the forward pass, if the model's attention mask is not a key padding mask (causal attention).
    """
    records: list[CapturedAttention] = []
    handle = Handle(model, layers)
    handle.install(functools.partial(_record, records, handle))
    try:
        yield records
    finally:
        handle.remove()


def capture_attention(model, inputs, layers=None) -> list[CapturedAttention]:
    """Run ``model(**inputs)`` once without gradients and return what each attention layer saw and computed.

    Parameters
    ----------
    model : torch.nn.Module
        See :func:`capturing`.
    inputs : Mapping
        Keyword arguments of the model, e.g. ``{"pixel_values": px}`` or a tokenizer's output.
    layers : int, iterable of int, or None
        Layers to record; ``None`` for all, so that ``caps[i]`` is layer ``i``.

    Returns
    -------
    list of CapturedAttention
        One per recorded layer, in layer order.

    Raises
    ------
    TypeError
        If ``inputs`` is not a mapping.

    Examples
    --------
    >>> caps = capture_attention(model, {"pixel_values": px})         # doctest: +SKIP
    >>> c = caps[5]                                                   # doctest: +SKIP
    >>> out = nystrom.exact_attention(c.query, c.key, c.value, scale=c.scaling, attn_mask=c.attn_mask,
    ...                               enable_gqa=True)                # doctest: +SKIP
    >>> torch.testing.assert_close(out, c.output)                     # doctest: +SKIP
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of model keyword arguments, got {type(inputs).__name__}")
    with torch.no_grad(), capturing(model, layers) as records:
        model(**inputs)
    return records
