r"""Token structure of pretrained transformers, layer by layer: massive activations, artifact tokens and sinks.

FNA (Lu et al. 2025, arXiv 2507.16018) builds on three kinds of outlier tokens in pretrained ViTs, which it
says "mutually suppress one another through the attention mechanism"; their definitions and detectors
are in :mod:`nystrom.linalg.tokens`. This module measures them in every encoder layer of a transformers
model (:func:`analyze_tokens`) and masks one kind to watch how the others respond
(:func:`suppression_experiment`).

Shapes: ``L`` encoder layers, ``B`` sequences, ``n`` tokens (padding included), ``D`` hidden width, ``H``
heads. Token masks are bool with ``True`` for a real (unpadded) token, as transformers' ``attention_mask``,
everywhere in the library.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import array_api_compat
import numpy as np
import torch
from torch import nn

from ..linalg.tokens import detect_high_norm_tokens, detect_massive_activations, detect_sinks, excluded_tokens
from ..linalg.validation import check_bool, check_positive
from .dispatch import answers_itself, attention_layers, block_input, layer_index
from .masking import mask_keys

__all__ = ["MASK_KINDS", "SuppressionResult", "TokenAnalysis", "analyze_tokens", "suppression_experiment"]

#: Accepted values of ``suppression_experiment(mask_kind=...)``.
MASK_KINDS = ("massive", "artifact", "sink", "cls")


# --------------------------------------------------------------------------------------------------------------
# Per-layer analysis of a transformers model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenAnalysis:
    r"""Token structure of one forward pass, layer by layer (numpy arrays).

    For encoder layer :math:`l` the *residual* :math:`r_l` is the un-normalised residual-stream tensor whose
    LayerNorm is what the layer's attention reads, and :math:`\hat r_l = \mathrm{LN}(r_l)` is that LayerNorm's
    output, the attention input:

    * pre-LayerNorm blocks (ViT, DINOv2, CLIP): :math:`r_l` is the block input and :math:`\hat r_l` the output of
      the block's first norm (``norm1``, ``layernorm_before``, ``layer_norm1``);
    * post-LayerNorm blocks (BERT): the block input is already normalised, so :math:`\hat r_l` is the block input
      and :math:`r_l` the *input of the LayerNorm that produced it*: for :math:`l \ge 1` the sum
      ``dense(ffn) + attention_output`` at the end of block :math:`l - 1` (``output.LayerNorm``'s input), for
      :math:`l = 0` the embedding sum (``embeddings.LayerNorm``'s input). Massive activations live there and are
      divided away in :math:`\hat r_l`.

    Attributes
    ----------
    residual_norms : ndarray, shape (L, B, n)
        :math:`\lVert r_{l,j}\rVert_2`.
    normed_norms : ndarray, shape (L, B, n)
        :math:`\lVert \hat r_{l,j}\rVert_2`.
    max_activation : ndarray, shape (L, B, n)
        Each token's largest-magnitude scalar of :math:`r_{l,j}`, with its sign.
    max_channel : int ndarray, shape (L, B, n)
        Its channel.
    activation_median : ndarray, shape (L, B)
        Median magnitude over all channels of all real tokens of :math:`r_l` (Sun et al.'s reference).
    attention_share : ndarray, shape (L, B, n)
        Share of layer :math:`l`'s attention that key :math:`j` receives, averaged over heads and real queries:
        :math:`a_{l,j} = \frac{1}{H n_v}\sum_h \sum_{i\,\mathrm{real}} P^{(h)}_{ij}`; sums to 1 over the keys.
    massive, artifact, sink : bool ndarray, shape (L, B, n)
        :func:`detect_massive_activations` on :math:`r_l`, :func:`detect_high_norm_tokens` on :math:`r_l`,
        :func:`detect_sinks` on :math:`a_l`, with the thresholds of :func:`analyze_tokens`.
    token_mask : bool ndarray, shape (B, n)
        ``True`` for real (unpadded) tokens.
    excluded : bool ndarray, shape (B, n)
        Tokens left out of the artifact test (CLS, registers, special tokens).
    norm_placement : tuple of str
        Per layer, ``"pre"`` or ``"post"``: which of the two readings above applies.
    thresholds : dict
        The detection settings behind ``massive``, ``artifact`` and ``sink``: :func:`analyze_tokens`'s
        ``massive_threshold``, ``massive_ratio``, ``artifact_ratio`` and ``sink_ratio`` (empty when not recorded).
    """

    residual_norms: np.ndarray
    normed_norms: np.ndarray
    max_activation: np.ndarray
    max_channel: np.ndarray
    activation_median: np.ndarray
    attention_share: np.ndarray
    massive: np.ndarray
    artifact: np.ndarray
    sink: np.ndarray
    token_mask: np.ndarray
    excluded: np.ndarray
    norm_placement: tuple[str, ...]
    thresholds: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """``L``."""
        return self.residual_norms.shape[0]

    @property
    def uniform_share(self) -> np.ndarray:
        """``(B,)``: :math:`1/n_v`, the share every real key would get under uniform attention."""
        return 1.0 / self.token_mask.sum(axis=-1)


def _is_norm(module):
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _same(a, b):
    return a is b or (a.shape == b.shape and torch.equal(a, b))


class _Recorder:
    """Forward hooks that pair every encoder layer with its pre-norm residual, its attention input and its
    attention probabilities during one forward pass.

    The LayerNorm feeding layer ``l``'s attention is the last norm that ran before the attention module, whose
    output is the attention input: ``norm1`` inside a pre-LN block; the previous block's final LayerNorm (or
    the embedding LayerNorm) for a post-LN block, recognised by its input not being the block input. Attention
    shares are reduced inside the hook so no ``(B, H, n, n)`` map is kept.
    """

    def __init__(self, model, real):
        self.blocks = attention_layers(model)
        self.model = model
        self.real = real
        self.residual, self.normed, self.placement, self.share = {}, {}, {}, {}
        self._last_norm = None
        self._block_input = None
        self._hooks = []

    def __enter__(self):
        try:
            for module in self.model.modules():
                if _is_norm(module):
                    self._hooks.append(module.register_forward_hook(self._on_norm))
            for layer, (block, attention) in enumerate(self.blocks):
                self._hooks.append(block.register_forward_pre_hook(self._on_block, with_kwargs=True))
                self._hooks.append(attention.register_forward_pre_hook(
                    functools.partial(self._on_attention_input, layer), with_kwargs=True))
                self._hooks.append(attention.register_forward_hook(functools.partial(self._on_attention, layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        while self._hooks:
            self._hooks.pop().remove()

    def _on_norm(self, module, args, output):
        self._last_norm = (args[0], output)

    def _on_block(self, block, args, kwargs):
        self._block_input = block_input(args, kwargs)

    def _on_attention_input(self, layer, module, args, kwargs):
        normed = block_input(args, kwargs)
        if self._last_norm is not None and _same(self._last_norm[1], normed):
            residual = self._last_norm[0]
            self.residual[layer], self.normed[layer] = residual, normed
            self.placement[layer] = "pre" if _same(residual, self._block_input) else "post"

    def _on_attention(self, layer, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
            self.share[layer] = None
            return
        weights = weights.float()
        if self.real is None:
            self.share[layer] = weights.mean(dim=(1, 2))
        else:
            # Checked here, in the forward pass: the product below would fail with torch's own message first.
            _check_mask_fits(self.real, (weights.shape[0], weights.shape[-1]))
            real = self.real.to(weights.device)
            count = weights.shape[1] * real.sum(dim=-1, keepdim=True).to(weights.dtype)
            self.share[layer] = (weights * real[:, None, :, None]).sum(dim=(1, 2)) / count


def _real_tokens(inputs):
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"inputs['attention_mask'] must be a (B, n) tensor (1 = real token), got "
                        f"{type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"inputs['attention_mask'] must be a (B, n) tensor (1 = real token), got shape "
                         f"{tuple(mask.shape)}")
    return mask.bool()


def _check_mask_fits(real, tokens):
    """``inputs['attention_mask']`` ``real (B, n)`` must match the ``tokens = (B, n)`` the model ran on."""
    if tuple(real.shape) != tuple(tokens):
        raise ValueError(f"inputs['attention_mask'] has shape {tuple(real.shape)} but the model ran on "
                         f"{tuple(tokens)} tokens")


def _numpy(t):
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


@torch.no_grad()
def analyze_tokens(model, inputs, *, massive_threshold=100.0, massive_ratio=1000.0, artifact_ratio=4.0,
                   sink_ratio=4.0, exclude=(0,)) -> TokenAnalysis:
    """Measure massive activations, artifact tokens and attention sinks in every encoder layer of ``model``.

    One forward pass ``model(**inputs)`` under forward hooks (nothing of the model is changed). What each field
    holds, pre- or post-LayerNorm, is spelled out in :class:`TokenAnalysis`.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers encoder (``Dinov2Model``, ``ViTModel``, ``CLIPVisionModel``, ``BertModel``; see
        :func:`nystrom.torch.dispatch.attention_layers`) in eval mode, loaded with ``attn_implementation="eager"``
        (the fused kernels never form the attention probabilities). Works inside
        :func:`nystrom.torch.masking.mask_keys` and :func:`~nystrom.torch.patching.fna` only if the attention function
        there still returns probabilities (``mask_keys`` over eager does; FNA does not).
    inputs : Mapping
        Keyword arguments of the model (``{"pixel_values": px}``, a tokenizer's output). Its
        ``attention_mask`` (B, n), if any, marks the real tokens.
    massive_threshold, massive_ratio : float
        ``abs_threshold`` and ``median_ratio`` of :func:`detect_massive_activations` (Sun et al.: 100, 1000).
    artifact_ratio : float
        ``ratio`` of :func:`detect_high_norm_tokens`.
    sink_ratio : float
        ``ratio`` of :func:`detect_sinks`.
    exclude : sequence of int or bool Tensor (B, n), default (0,)
        Tokens never tested as artifacts (default: the CLS token). Positions count among the real tokens of
        ``attention_mask``: ``0`` is the CLS token under left padding too, ``-1`` the last real token.

    Returns
    -------
    TokenAnalysis

    Raises
    ------
    TypeError
        ``model`` not a module, ``inputs`` not a mapping, non-real thresholds.
    ValueError
        Non-positive thresholds, a model in training mode, a model whose attention returns no probabilities
        (not ``eager``, or run by FNA), or whose blocks do not read a LayerNorm of the residual stream.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of model keyword arguments, got {type(inputs).__name__}")
    if model.training:
        raise ValueError("model is in training mode (dropout would randomise the attention); call model.eval()")
    for name, value in (("massive_threshold", massive_threshold), ("massive_ratio", massive_ratio),
                        ("artifact_ratio", artifact_ratio), ("sink_ratio", sink_ratio)):
        check_positive(name, value)
    real = _real_tokens(inputs)
    with _Recorder(model, real) as recorder:
        model(**inputs)
    layers = range(len(recorder.blocks))
    missing = [layer for layer in layers if layer not in recorder.residual]
    if missing:
        raise ValueError(f"could not find the LayerNorm that feeds the attention of layers {missing} of "
                         f"{type(model).__name__}; analyze_tokens needs pre- or post-LayerNorm blocks")
    if any(recorder.share.get(layer) is None for layer in layers):
        patched = [layer for layer, (_, core) in enumerate(attention_layers(model)) if answers_itself(core)]
        if patched:
            raise ValueError(f"FNA (nystrom.fna or nystrom.torch.patch) computes the attention of layers {patched} "
                             "itself, without probabilities; call analyze_tokens outside it")
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"the attention of {type(model).__name__} returned no probabilities (attn_implementation="
                         f"{implementation!r}); load the model with attn_implementation='eager'")
    # float32: half-precision norms of massive tokens lose the digits the ratios are read from.
    residual = torch.stack([recorder.residual[layer].float() for layer in layers])
    normed = torch.stack([recorder.normed[layer].float() for layer in layers])
    share = torch.stack([recorder.share[layer] for layer in layers])
    if real is not None:
        _check_mask_fits(real, residual.shape[1:3])
    # One host read for every layer.
    finite = torch.isfinite(residual).flatten(1).all(dim=1).tolist()
    overflowed = [layer for layer, ok in zip(layers, finite) if not ok]
    if overflowed:
        # The detectors would name their own argument, "hidden", which the caller never passed (a review).
        dtype = recorder.residual[layers[0]].dtype
        hint = (f" ({dtype} activations that overflow: run the model in float32)"
                if dtype in (torch.float16, torch.bfloat16) else "")
        raise ValueError(f"the residual stream of layers {overflowed} holds NaN or infinite values{hint}")
    mask = None if real is None else real.to(residual.device)[None]
    if isinstance(exclude, torch.Tensor):
        exclude = exclude.to(residual.device)
    # Checked against the batch's (B, n) first: the detectors see it beside (layers, B, n), whose shape a message
    # would name instead (a review).
    excluded = excluded_tokens(array_api_compat.array_namespace(residual), exclude, tuple(residual.shape[1:3]),
                               residual.device, None if real is None else real.to(residual.device))
    massive = detect_massive_activations(residual, abs_threshold=massive_threshold, median_ratio=massive_ratio,
                                         attention_mask=mask)
    artifact = detect_high_norm_tokens(residual, ratio=artifact_ratio, exclude=exclude, attention_mask=mask)
    sink = detect_sinks(share, ratio=sink_ratio, attention_mask=mask)
    token_mask = torch.ones(residual.shape[1:3], dtype=torch.bool) if real is None else real
    return TokenAnalysis(
        residual_norms=_numpy(torch.linalg.vector_norm(residual, dim=-1)),
        normed_norms=_numpy(torch.linalg.vector_norm(normed, dim=-1)),
        max_activation=_numpy(massive.value),
        max_channel=_numpy(massive.channel),
        activation_median=_numpy(massive.median),
        attention_share=_numpy(share),
        massive=_numpy(massive.mask),
        artifact=_numpy(artifact),
        sink=_numpy(sink),
        token_mask=_numpy(token_mask),
        excluded=_numpy(excluded),
        norm_placement=tuple(recorder.placement[layer] for layer in layers),
        thresholds=dict(massive_threshold=massive_threshold, massive_ratio=massive_ratio,
                        artifact_ratio=artifact_ratio, sink_ratio=sink_ratio),
    )


# --------------------------------------------------------------------------------------------------------------
# Mutual suppression: mask one kind of token, watch the others
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuppressionResult:
    r"""Outcome of :func:`suppression_experiment`: the same inputs with and without masked keys.

    Attributes
    ----------
    mask_kind : str
        One of :data:`MASK_KINDS`.
    mask_layers : tuple of int
        Layers in which the keys were masked.
    masked_tokens : bool ndarray, shape (B, n)
        The tokens whose keys were masked (chosen on the unmasked run at the first masked layer).
    baseline, masked : TokenAnalysis
        Without and with the masking. Layers before ``mask_layers[0]`` are identical.
    norm_ratio : ndarray, shape (L, B, n)
        ``masked.residual_norms / baseline.residual_norms``: which tokens grow once the others are masked.
    share_change : ndarray, shape (L, B, n)
        ``masked.attention_share - baseline.attention_share``: where the attention mass goes.
    new_sinks, new_massive, new_artifact : bool ndarray, shape (L, B, n)
        Tokens detected in the masked run but not in the baseline (a new sink is a "dormant takeover").
        Both runs count the masked keys among the :math:`n_v` real keys, so a sink has to beat the same
        share :math:`\rho / n_v` in both.
    """

    mask_kind: str
    mask_layers: tuple[int, ...]
    masked_tokens: np.ndarray
    baseline: TokenAnalysis
    masked: TokenAnalysis
    norm_ratio: np.ndarray
    share_change: np.ndarray
    new_sinks: np.ndarray
    new_massive: np.ndarray
    new_artifact: np.ndarray

    @property
    def masked_share(self) -> np.ndarray:
        """``(2, L, B)``: attention share received by the masked tokens, ``[baseline, masked]``."""
        tokens = self.masked_tokens[None]
        return np.stack([(a.attention_share * tokens).sum(axis=-1) for a in (self.baseline, self.masked)])


def suppression_experiment(model, inputs, *, mask_kind, mask_layer, persistent=False, massive_threshold=100.0,
                           massive_ratio=1000.0, artifact_ratio=4.0, sink_ratio=4.0,
                           exclude=(0,)) -> SuppressionResult:
    """Mask the keys of one kind of token in layer ``mask_layer`` and compare every layer with the unmasked run.

    FNA reports that massive and artifact tokens "mutually suppress one another through attention"; this
    tests it. The tokens of ``mask_kind`` are detected on the unmasked run at ``mask_layer``; their keys get
    no attention there (:func:`nystrom.torch.masking.mask_keys`; they still attend and pass through the MLP), and
    :func:`analyze_tokens` runs again. A token that becomes a sink only once the old sink is hidden is the
    "dormant takeover"; tokens whose residual norm grows are those the masked ones held down.

    Parameters
    ----------
    model, inputs
        As for :func:`analyze_tokens`.
    mask_kind : {"massive", "artifact", "sink", "cls"}
        Which tokens to mask: the ``massive``, ``artifact`` or ``sink`` tokens of :class:`TokenAnalysis` at
        ``mask_layer``, or each sequence's first real token (``"cls"``: [CLS], also under left padding).
    mask_layer : int
        Encoder layer where the keys are masked.
    persistent : bool, default False
        Mask the same tokens in every layer from ``mask_layer`` on, instead of only there.
    massive_threshold, massive_ratio, artifact_ratio, sink_ratio, exclude
        Detection settings, as for :func:`analyze_tokens`.

    Returns
    -------
    SuppressionResult

    Raises
    ------
    TypeError, ValueError
        As :func:`analyze_tokens`; ``ValueError`` also for an unknown ``mask_kind``, a ``mask_layer`` outside
        ``[0, L)``, no token of ``mask_kind`` at ``mask_layer``, or a selection that hides every key of a
        sequence.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    persistent = check_bool("persistent", persistent)  # "no" was taken as True
    num_layers = len(attention_layers(model))
    index = layer_index(mask_layer)
    if index is None or not 0 <= index < num_layers:
        raise ValueError(f"mask_layer must be a layer index in [0, {num_layers}), got {mask_layer!r}")
    mask_layer = index
    options = dict(massive_threshold=massive_threshold, massive_ratio=massive_ratio, artifact_ratio=artifact_ratio,
                   sink_ratio=sink_ratio, exclude=exclude)
    baseline = analyze_tokens(model, inputs, **options)
    if mask_kind == "cls":
        # The first real token of each row: position 0 is padding under left padding.
        selected = np.zeros_like(baseline.token_mask)
        selected[np.arange(selected.shape[0]), np.argmax(baseline.token_mask, axis=1)] = True
    else:
        selected = getattr(baseline, mask_kind)[mask_layer]
    if not selected.any():
        raise ValueError(f"no {mask_kind} token was detected at layer {mask_layer}; nothing to mask (adjust the "
                         "detection thresholds or pick another layer)")
    layers = tuple(range(mask_layer, num_layers)) if persistent else (int(mask_layer),)
    with mask_keys(model, layers, torch.from_numpy(selected)):
        masked = analyze_tokens(model, inputs, **options)
    return SuppressionResult(
        mask_kind=mask_kind,
        mask_layers=layers,
        masked_tokens=selected,
        baseline=baseline,
        masked=masked,
        norm_ratio=masked.residual_norms / baseline.residual_norms,
        share_change=masked.attention_share - baseline.attention_share,
        new_sinks=masked.sink & ~baseline.sink,
        new_massive=masked.massive & ~baseline.massive,
        new_artifact=masked.artifact & ~baseline.artifact,
    )
