r"""How :mod:`nystrom.torch` reaches into Hugging Face transformers models without editing them.

Mechanism
---------
In transformers 5 the attention modules of ViT, DINOv2, CLIP and BERT compute ``query, key, value`` of shape
``(B, H, n, d)`` and ask ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
for the function that turns them into the per-head output ``(B, n, H, d)``. While any *handler* is installed
(by :func:`~nystrom.torch.patching.patch`, :func:`~nystrom.torch.patching.fna`,
:func:`~nystrom.torch.masking.mask_keys` or :func:`nystrom.torch.capture.capturing`), that lookup is wrapped:
it returns the function it would have returned, behind a dispatcher. For an attention module with
handlers the dispatcher runs them as a chain

``handler(call_next, module, query, key, value, attention_mask, **kwargs) -> (output (B, n, H, d), weights)``

ending in the original function; every other module gets the original call unchanged. Forward pre-hooks on the
encoder blocks hand each handler the block's input hidden states (the residual stream before the block's first
LayerNorm; for post-LayerNorm models such as BERT, the previous block's normalised output). Removing the last
handler restores ``get_interface``, so nothing of the model (config, modules, parameters) is ever modified.

Registering a new name in ``AttentionInterface`` and switching ``config._attn_implementation`` to it would be the
other route; it changes how transformers builds the attention mask (a name unknown to the mask interface makes
``masking_utils`` drop the padding mask) and it loses the model's own ``eager_attention_forward``, which the
dispatcher receives as the lookup's default.
"""


from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..linalg.validation import broadcasts_to, masked_threshold

__all__ = [
    "Handle", "attention_layers", "block_input", "check_token_spec", "layer_indices",
    "padding_mask_from_attention_mask", "token_mask",
]

# Attention module -> its handlers, innermost (closest to the original attention function) first.
_HANDLERS: dict[nn.Module, list[Callable]] = {}


# --------------------------------------------------------------------------------------------------------------
# The shared mechanism: a dispatching get_interface, per-module handler chains, per-block input hooks
# --------------------------------------------------------------------------------------------------------------


def _attention_functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


# The get_interface that _dispatching_get_interface shadows: ALL_ATTENTION_FUNCTIONS's own attribute, where another
# tool had set one before the first handler (a profiler's wrapper), else None for transformers' method.
_shadowed: Callable | None = None
# Set while the shadowed attribute runs: one that calls back into this lookup (a wrapper of it, set after it and
# shadowed by a later installation) gets transformers' method there instead of an endless recursion.
_in_shadowed = threading.local()


def _dispatching_get_interface(attn_implementation, default):
    functions = _attention_functions()
    if _shadowed is None or getattr(_in_shadowed, "active", False):
        original = type(functions).get_interface(functions, attn_implementation, default)
    else:
        _in_shadowed.active = True
        try:
            original = _shadowed(attn_implementation, default)
        finally:
            _in_shadowed.active = False
    return functools.partial(_dispatch, original)


def _dispatch(original, module, query, key, value, attention_mask, **kwargs):
    call = original
    for handler in _HANDLERS.get(module, ()):
        call = functools.partial(handler, call)
    return call(module, query, key, value, attention_mask, **kwargs)


def _add_handler(module, handler, layer):
    """Install ``handler`` on ``module``: outermost, unless it is *terminal* (it may answer without calling the
    next handler, as FNA does), which goes innermost, so that every other handler (key masking, capture) wraps it
    whatever the order of installation. A module takes one terminal handler."""
    handlers = _HANDLERS.get(module, [])
    terminal = getattr(handler, "terminal", False)
    if terminal and any(getattr(other, "terminal", False) for other in handlers):
        raise ValueError(f"encoder layer {layer} already runs FNA from another patch() or fna(); remove that one "
                         "first (two approximations of one attention cannot be chained)")
    if not _HANDLERS:
        # An instance attribute shadows the class method (and calls through to another tool's attribute, which the
        # last handler's removal puts back: a review found it skipped while patched, then deleted for good).
        global _shadowed
        functions = _attention_functions()
        _shadowed = vars(functions).get("get_interface")
        functions.get_interface = _dispatching_get_interface
    _HANDLERS.setdefault(module, [])
    if terminal:
        _HANDLERS[module].insert(0, handler)
    else:
        _HANDLERS[module].append(handler)


def _remove_handler(module, handler):
    handlers = _HANDLERS[module]
    handlers.remove(handler)
    if not handlers:
        del _HANDLERS[module]
    if not _HANDLERS:
        functions = _attention_functions()
        # Where another tool has set its own attribute since, it stays (it may call through to this one, which then
        # dispatches to no handler).
        if vars(functions).get("get_interface") is _dispatching_get_interface:
            if _shadowed is None:
                del functions.get_interface
            else:
                functions.get_interface = _shadowed


def _is_attention(module):
    return type(module).__name__.endswith("Attention")


def _attention_cores(block):
    """The innermost ``*Attention`` modules of ``block`` (those that call the attention function)."""
    return [m for m in block.modules() if _is_attention(m) and not any(map(_is_attention, list(m.modules())[1:]))]


def attention_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The encoder blocks of ``model`` and the attention module inside each, in order.

    The blocks are the one ``nn.ModuleList`` of ``model`` whose every entry holds exactly one innermost module
    whose class name ends in ``Attention`` (``Dinov2Attention``, ``ViTAttention``, ``CLIPAttention``,
    ``BertSelfAttention``): the module that calls the attention function.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers encoder such as ``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel`` or ``BertModel``.

    Returns
    -------
    list of (block, attention) pairs
        Index ``i`` is encoder layer ``i``.

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``.
    ValueError
        If no such list, or more than one (e.g. ``CLIPModel`` with a text and a vision tower: pass
        ``model.vision_model``), is found, or one beside a list of blocks that each hold several attention modules
        (an encoder–decoder such as ``BartModel``: pass its encoder).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found, several = {}, []
    for name, child in model.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            cores = [_attention_cores(block) for block in child]
            if all(len(core) == 1 for core in cores):
                found[name] = [(block, core[0]) for block, core in zip(child, cores)]
            elif all(len(core) > 1 for core in cores):
                several.append(name)
    # Blocks of several attention modules beside the encoder's, not stages that hold its blocks: a decoder (causal
    # self-attention and cross-attention). Patching the encoder alone was silent (a review: a whole BartModel).
    # (The model itself, named "", holds every list.)
    blocks = next(iter(found)) if len(found) == 1 else None
    decoders = [name for name in several if blocks is not None and name and not blocks.startswith(f"{name}.")]
    if decoders:
        raise ValueError(
            f"found the encoder blocks {blocks!r} and blocks of several attention modules {decoders} (a decoder's "
            f"causal self-attention and cross-attention, which FNA does not approximate) in {type(model).__name__}; "
            f"pass the encoder alone (model.get_submodule({blocks.rpartition('.')[0]!r}))"
        )
    if len(found) != 1:
        what = "no list of encoder blocks" if not found else f"several lists of encoder blocks {sorted(found)}"
        # Nested lists (ALBERT's shared layer groups) are patched through the submodule that holds one of them.
        holder = max(found, key=len).rpartition(".")[0] if len(found) > 1 else ""
        inner = f", or the module that holds the list to patch (model.get_submodule({holder!r}))" if holder else ""
        raise ValueError(
            f"found {what} in {type(model).__name__}; pass a single encoder such as ViTModel, Dinov2Model, "
            f"CLIPVisionModel or BertModel (for CLIPModel pass model.vision_model){inner}"
        )
    return next(iter(found.values()))


def padding_mask_from_attention_mask(attention_mask, batch_size, num_keys):
    r"""The key padding mask ``(B, n)`` (``True`` = real key) behind a transformers attention mask, or None.

    Parameters
    ----------
    attention_mask : Tensor or None
        What transformers 5 passes to attention functions for bidirectional models: ``None``, a bool mask of
        shape ``(B or 1, 1 or H, n_q, n)`` (``True`` = attend; ``sdpa``) or an additive float mask of that shape
        (0 = attend, ``-inf`` or at most half the dtype's most negative value = masked; ``eager``). Every query row
        holds the same key mask, but for the rows of padded queries, which may attend to no key (a mask that pads
        both axes, :math:`b_q \wedge b_k`).
    batch_size : int
        ``B``.
    num_keys : int
        ``n``.

    Returns
    -------
    bool Tensor, shape (B, n), or None

    Raises
    ------
    TypeError
        For a mask that is not a torch tensor.
    ValueError
        For a mask of another shape or of an integer dtype, an additive mask with other values (a bias), or one that
        differs between queries or heads (causal or block-sparse attention): none of these is a key padding mask.
    """
    if attention_mask is None:
        return None
    # transformers builds the mask once per forward pass and hands the same tensor to every layer; the
    # checks below read all B x n_q x n entries (28 ms at B = 2, n = 4,096 on one core), so the last
    # answer is kept, tied to that tensor object (a weak reference: no id reuse) and its version counter.
    # A tensor made under torch.inference_mode() has no version counter, so an in-place edit could not be seen:
    # it is checked afresh every time.
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_inference():
        return _padding_mask_of(attention_mask, batch_size, num_keys)
    global _last_padding_mask
    last = _last_padding_mask
    if (last is not None and last[0]() is attention_mask and last[1] == attention_mask._version
            and last[2] == (batch_size, num_keys)):
        # A copy: a caller that edits its answer in place (a captured mask) must not edit the next layer's.
        return last[3].clone()
    result = _padding_mask_of(attention_mask, batch_size, num_keys)
    _last_padding_mask = (weakref.ref(attention_mask), attention_mask._version, (batch_size, num_keys), result)
    return result.clone()


_last_padding_mask = None


def _padding_mask_of(attention_mask, batch_size, num_keys):
    """:func:`padding_mask_from_attention_mask` without its cache."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"expected the attention mask as a torch tensor, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if len(shape) != 4 or shape[-1] != num_keys or shape[0] not in (1, batch_size):
        raise ValueError(f"expected an attention mask of shape ({batch_size} or 1, 1, n_q, {num_keys}), got "
                         f"{shape}")
    if attention_mask.dtype == torch.bool:
        attend = attention_mask
    elif not attention_mask.is_floating_point():
        # A 4-D mask reaches the attention function as given: an integer one is neither convention.
        raise ValueError(f"expected a bool attention mask (True = attend) or an additive float one, got dtype "
                         f"{attention_mask.dtype} (pass 0/1 integers as the 2-D attention_mask, which the model "
                         "converts)")
    else:
        attend = attention_mask == 0
        blocked = attention_mask <= masked_threshold(torch, attention_mask.dtype)
        if not bool(torch.all(attend | blocked)):
            raise ValueError(
                "the additive attention mask holds values other than 0 (attend) and a large negative number "
                "(masked): an attention bias, not a key padding mask"
            )
    # The keys some query attends to. A query row may also attend to none: a padded query of a mask that pads both
    # axes (b_q & b_k, which the model answers on its real rows as it does the 2-D mask; a review found it refused).
    keys = attend.any(dim=-2, keepdim=True)[:, :1]
    empty = ~attend.any(dim=-1)
    padded_queries = empty.any() and attend.shape[-2] == num_keys and not torch.any(empty & keys[:, :, 0, :])
    rows = torch.where(empty[..., None], keys, attend) if padded_queries else attend
    if not torch.equal(rows, keys.expand_as(attend)):
        raise ValueError(
            "the attention mask differs between queries or heads (causal or block-sparse attention); only "
            "bidirectional attention with a key padding mask is supported (a query row may attend to no key where "
            "that query's own key is padding)"
        )
    # A (B, n) copy, not a view: the cache in padding_mask_from_attention_mask must not keep the B x n_q x n mask alive.
    return keys[:, 0, 0, :].expand(batch_size, num_keys).clone()


def attentions_requested() -> bool:
    """Whether the running forward pass records attention weights (``output_attentions=True``): transformers keeps
    what it records in a context variable (``transformers.utils.output_capturing``, 5.x). ``False`` where that is not
    found, and an FNA layer then returns no weights, as SDPA does."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    recording = _active_collector.get()
    return recording is not None and "attentions" in recording


def own_attention_returns_weights(module) -> bool:
    """Whether ``module``'s own attention function returns attention weights: the eager one does; SDPA and flash
    attention return ``None``, and transformers then leaves that layer out of ``outputs.attentions`` (the module
    dispatches on ``config._attn_implementation``, as ``get_interface`` maps ``"eager"`` and ``None`` to the eager
    default)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None) in (None, "eager", "paged|eager")


def layer_index(value):
    """``value`` as a Python int if it is an integer that is not a bool (anything with ``__index__``: Python, numpy
    and zero-dimensional integer torch or numpy arrays), else ``None``."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) in (torch.bool, np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def layer_indices(layers, num_layers, default):
    """The sorted distinct layers of ``layers`` (an int or an iterable of ints, each in ``[-num_layers, num_layers)``,
    a negative one counted from the last layer as Python indexes), or ``default`` for ``None``: ``TypeError`` or
    ``ValueError`` naming ``layers`` otherwise."""
    if layers is None:
        return default
    if layer_index(layers) is not None:
        layers = [layers]
    if (isinstance(layers, (str, bytes, bytearray, Mapping)) or not isinstance(layers, Iterable)
            or getattr(layers, "ndim", 1) == 0):
        raise TypeError(f"layers must be None, an int or an iterable of ints, got {layers!r}")
    layers = list(layers)
    indices = [layer_index(i) for i in layers]
    if any(i is None for i in indices):
        raise TypeError(f"layers must hold ints (layer indices), got {layers!r}")
    if not layers or any(not -num_layers <= i < num_layers for i in indices):
        raise ValueError(f"layers must be non-empty layer indices in [-{num_layers}, {num_layers}) (negative: from "
                         f"the last), got {layers!r}")
    return tuple(sorted({i % num_layers for i in indices}))


def answers_itself(module) -> bool:
    """Whether a terminal handler (FNA, from :func:`nystrom.fna` or :func:`~nystrom.torch.patch`) answers the
    attention of ``module`` without calling the model's own attention function."""
    return any(getattr(handler, "terminal", False) for handler in _HANDLERS.get(module, ()))


def check_token_spec(name, spec, optional=True):
    """Raise ``TypeError`` unless ``spec`` is a bool tensor, a callable ``(layer, hidden_states) -> bool (B, n)``, or
    (where ``optional``) None."""
    if (spec is None and not optional) or (spec is not None and not callable(spec) and not (
            isinstance(spec, torch.Tensor) and spec.dtype == torch.bool)):
        raise TypeError(
            f"{name} must be {'None, ' if optional else ''}a bool tensor of shape (n,) or (B, n), or a callable "
            f"(layer_index, hidden_states) -> bool (B, n); got {type(spec).__name__}"
        )


def token_mask(name, spec, layer, hidden_states):
    """Resolve a token selection (bool tensor or ``select(layer, hidden_states)``) to a bool ``(B, n)``."""
    batch, n = hidden_states.shape[:2]
    mask = spec(layer, hidden_states) if callable(spec) else spec
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must give a bool tensor of shape (B, n), got {type(mask).__name__} "
                        f"{getattr(mask, 'dtype', '')}".rstrip())
    if mask.ndim not in (1, 2) or mask.shape[-1] != n or (mask.ndim == 2 and not broadcasts_to(mask.shape[0], batch)):
        raise ValueError(f"{name} must give a bool tensor of shape ({batch}, {n}) or ({n},) in layer {layer}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(hidden_states.device).expand(batch, n)


def _detached_handle(kind, layers, origin=None):
    """A handle of class ``kind`` that handles nothing, the one the hooks of a copy of a patched model belong to: they
    refuse the copy's forward passes while ``origin`` (the handle of the model copied) is installed, whose handlers
    the copy never reaches, and do nothing once it is removed or gone (a copy stayed broken for good before)."""
    handle = object.__new__(kind)
    handle.layers, handle._pass, handle._installed, handle._hooks = layers, PassState(**kind.PASS_STATE), [], []
    handle._detached, handle._origin = True, origin
    return handle


def check_not_causal(module, is_causal, where) -> None:
    """Refuse causal attention, prefixed by ``where``: an attention call is causal by its ``is_causal`` keyword or,
    where that is ``None``, by its module's ``is_causal`` (transformers' SDPA function then makes a call without a mask
    causal, so its ``attention_mask`` of ``None`` says nothing)."""
    if getattr(module, "is_causal", False) if is_causal is None else is_causal:
        raise ValueError(f"{where} takes bidirectional attention; {type(module).__name__} is causal")


def unknown_block_input(where) -> RuntimeError:
    """The error, prefixed by ``where`` (``"FNA layer 3"``), of a handler that needs its block's input hidden states
    where they are unknown: the attention ran outside its block's forward call, as checkpointing's recompute runs it
    (transformers' gradient checkpointing calls the block's ``forward``, past the hooks that record its input)."""
    return RuntimeError(
        f"{where}: its attention ran outside its encoder block's forward call, so the block's input hidden "
        "states are unknown (activation, or gradient, checkpointing recomputes blocks this way, and a recompute that "
        "chose otherwise than the forward pass would give gradients of another model); call "
        "model.activation_checkpointing_disable() to use it"
    )


def block_input(args, kwargs):
    """The hidden states ``(B, n, D)`` a block or attention module was called with (first positional argument or
    ``hidden_states=``), from the ``args, kwargs`` of a forward pre-hook."""
    return args[0] if args else kwargs["hidden_states"]


class PassState(threading.local):
    """What one forward pass keeps between its layers, a fresh set per thread: a model patched once and called from
    several threads at a time runs each pass on its own state (a review: passes in two threads took each other's
    block inputs and landmarks, outputs off by 10 where the model's own were exact). Each keyword names an attribute
    and the callable that makes its starting value in every thread."""

    def __init__(self, **starts):
        for name, start in starts.items():
            setattr(self, name, start())


class Handle:
    """Handlers installed on some encoder layers of one model; :meth:`remove` uninstalls them.

    Parameters
    ----------
    model : torch.nn.Module
        See :func:`attention_layers`.
    layers : int, iterable of int, or None
        Encoder layer indices; ``None`` for all.

    Attributes
    ----------
    layers : tuple of int
        The layers handled, ascending.
    inputs : dict of int to Tensor
        During a block's forward: its input hidden states ``(B, n, D)``, keyed by layer index (those of the calling
        thread's forward pass).
    """

    #: The per-pass state (:class:`PassState`): attribute names and the callables that start them.
    PASS_STATE: Mapping[str, Callable] = {"inputs": dict, "reached": set}

    def __init__(self, model, layers=None):
        self._blocks = attention_layers(model)
        self.layers = layer_indices(layers, len(self._blocks), self.default_layers(len(self._blocks)))
        # The block inputs, and the layers whose handlers ran during their block's forward pass (checked when the
        # block returns), of the calling thread's pass.
        self._pass = PassState(**self.PASS_STATE)
        self._installed: list[tuple[nn.Module, Callable]] = []
        self._hooks = []
        # A handle whose hooks a copy of the model carries (copy.deepcopy, pickling): it handles nothing.
        self._detached, self._origin = False, None

    def __deepcopy__(self, memo):
        # The blocks' hooks travel with a copy of the model, the handlers (keyed by the original modules) do not: the
        # copy's hooks belong to a detached handle instead of a copy of this one, which no remove() could reach.
        return _detached_handle(type(self), self.layers, origin=self)

    def __reduce__(self):
        # Pickled with a model (torch.save): a detached handle, whose original does not outlive the process.
        return _detached_handle, (type(self), self.layers)

    @property
    def inputs(self) -> dict[int, torch.Tensor]:
        """During a block's forward: its input hidden states ``(B, n, D)`` by layer index, of the calling thread's
        pass."""
        return self._pass.inputs

    @staticmethod
    def default_layers(num_layers):
        """The layers handled when ``layers`` is None: all of them."""
        return tuple(range(num_layers))

    def install(self, *handlers):
        """Install each ``handler(layer, call_next, module, query, key, value, attention_mask, **kwargs)`` on every
        layer; later handlers run first (outermost), except that a handler with a true ``terminal`` attribute runs
        innermost (:func:`_add_handler`). Undoes everything if installing fails."""
        try:
            for layer in self.layers:
                block, attention = self._blocks[layer]
                self._hooks.append(block.register_forward_pre_hook(
                    functools.partial(self._keep_input, layer), with_kwargs=True))
                # always_call: a forward pass that raises must not leave the block's input (and its graph) held.
                self._hooks.append(block.register_forward_hook(functools.partial(self._drop_input, layer),
                                                               always_call=True))
                self._hooks.append(block.register_forward_hook(functools.partial(self._check_reached, layer)))
                for handler in handlers:
                    bound = functools.partial(self._reach, handler, layer)
                    bound.terminal = getattr(handler, "terminal", False)
                    _add_handler(attention, bound, layer)
                    self._installed.append((attention, bound))
        except BaseException:
            self.remove()
            raise
        return self

    def _keep_input(self, layer, block, args, kwargs):
        if self._detached:
            return
        if layer == self.layers[0]:
            # The padding-mask answer lasts one forward pass: a mask buffer edited where torch's version counter does
            # not see it (through .data, or a numpy array it shares memory with) is read afresh on the next pass.
            global _last_padding_mask
            _last_padding_mask = None
        self.inputs[layer] = block_input(args, kwargs)
        self._pass.reached.discard(layer)

    def _drop_input(self, layer, block, args, output):
        # Only held while the block runs, so a handle never keeps activations (or their graph) alive.
        self.inputs.pop(layer, None)

    def _reach(self, handler, layer, *args, **kwargs):
        self._pass.reached.add(layer)
        return handler(layer, *args, **kwargs)

    def _check_reached(self, layer, block, args, output):
        # A model whose attention module computes attention itself (DeBERTa, MPNet, Longformer, ...) never asks
        # transformers' attention interface for a function, and a compiled graph or a copy of the model calls it for
        # modules other than those the handlers are installed on: the handlers would never run, silently.
        if self._detached:
            if self._origin is not None and self._origin._hooks:
                raise ValueError(
                    f"encoder layer {layer} of a copy of a patched model ran without nystrom's handlers, which run on "
                    "the modules they were installed on (copy.deepcopy copies the blocks' hooks, not the handlers): "
                    "patch the copy itself, or copy the model before patching or after remove()"
                )
            return
        if layer not in self._pass.reached:
            raise ValueError(
                f"encoder layer {layer} ran without nystrom's handlers on its attention module "
                f"{type(self._blocks[layer][1]).__name__}: either that module computes attention itself instead of "
                "calling transformers' attention functions (ALL_ATTENTION_FUNCTIONS; ViT, DINOv2, CLIP and BERT call "
                "them), or the model runs as a compiled graph or a copy (torch.compile, copy.deepcopy, "
                "DataParallel) of the modules the handlers were installed on: patch the model that runs, and "
                "call it uncompiled"
            )

    def remove(self):
        """Uninstall; safe to call more than once. Restores transformers' ``get_interface`` with the last handler."""
        while self._installed:
            _remove_handler(*self._installed.pop())
        while self._hooks:
            self._hooks.pop().remove()
        self.inputs.clear()


