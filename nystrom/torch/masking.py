"""Key masking in transformers models: the selected tokens' keys get no attention in chosen layers."""

from __future__ import annotations

import contextlib
import functools

import torch

from .dispatch import (
    Handle,
    check_not_causal,
    check_token_spec,
    padding_mask_from_attention_mask,
    token_mask,
    unknown_block_input,
)

__all__ = ["mask_keys", "masking_handler"]


def _masked_attention_mask(attention_mask, masked, dtype):
    """``attention_mask`` with the keys in ``masked (B, n)`` blocked, in the format the next function expects."""
    hide = masked[:, None, None, :]
    if attention_mask is None:
        # An additive mask works for every attention function that takes masks (eager adds it, SDPA accepts it).
        return torch.zeros(hide.shape, dtype=dtype, device=masked.device).masked_fill(hide, -float("inf"))
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~hide
    return torch.where(hide, torch.tensor(-float("inf"), dtype=attention_mask.dtype, device=masked.device),
                       attention_mask)


def masking_handler(name, select, handle, layer, call_next, module, query, key, value, attention_mask, **kwargs):
    """The handler behind :func:`mask_keys` (and ``patch(mask_tokens=...)``): blocks the keys ``select`` picks, then
    calls the next handler; ``name``, the argument that gave ``select``, names it in the errors."""
    inputs = handle.inputs
    if layer not in inputs:
        raise unknown_block_input(f"key masking in layer {layer}")
    # Replacing a causal call's mask of None would make it bidirectional (transformers' SDPA function is causal only
    # without a mask).
    check_not_causal(module, kwargs.get("is_causal"), "key masking")
    masked = token_mask(name, select, layer, inputs[layer])
    real = padding_mask_from_attention_mask(attention_mask, key.shape[0], key.shape[-2])
    visible = ~masked if real is None else real & ~masked
    if not bool(torch.all(torch.any(visible, dim=-1))):
        raise ValueError(
            f"the key mask ({name}) hides every (unpadded) key of a sequence in layer {layer}; at least one key per "
            "sequence must stay visible"
        )
    return call_next(module, query, key, value, _masked_attention_mask(attention_mask, masked, query.dtype), **kwargs)


@contextlib.contextmanager
def mask_keys(model, layers, select):
    r"""Give the selected tokens' keys no attention (logit :math:`-\infty`) in the chosen layers.

    Queries, values and the rest of the model are untouched; the masked tokens still attend to others. Works
    under every attention implementation that takes masks (``eager``, ``sdpa``), on top of the model's own
    padding mask, and composes with :func:`fna` in either order (FNA runs innermost, so the masking always reaches
    it; inside an FNA layer masked keys are also never landmarks).

    Parameters
    ----------
    model : torch.nn.Module
        See :func:`attention_layers`.
    layers : int, iterable of int, or None
        Encoder layers in which to mask; ``None`` for all.
    select : callable or bool Tensor
        ``select(layer_index, hidden_states) -> bool (B, n)`` with the block's input hidden states ``(B, n, D)``;
        ``True`` masks that token's key. A fixed bool tensor ``(n,)`` or ``(B, n)`` works too.

    Yields
    ------
    Handle

    Raises
    ------
    TypeError
        If ``select`` is neither callable nor a bool tensor, or returns something other than a bool tensor.
    ValueError
        In the forward pass, if ``select`` masks every unpadded key of a sequence (the softmax would be empty),
        or returns the wrong shape.

    Examples
    --------
    >>> def massive(layer, h):           # doctest: +SKIP
    ...     norms = h.norm(dim=-1)
    ...     return norms > 10 * norms.median(dim=-1, keepdim=True).values
    >>> with mask_keys(model, range(6, 12), massive):   # doctest: +SKIP
    ...     out = model(pixel_values=px)
    """
    check_token_spec("select", select, optional=False)
    handle = Handle(model, layers)
    handle.install(functools.partial(masking_handler, "select", select, handle))
    try:
        yield handle
    finally:
        handle.remove()
