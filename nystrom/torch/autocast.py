"""``torch.autocast`` and the library: Nyström attention runs as SDPA would under autocast, with its own precision.

Under ``torch.autocast`` every matrix product runs in the autocast dtype (bfloat16 on CPU by default), the
library's float32 sections included: the solve and the product :math:`A^+ (B V)`, which the library keeps in
float32 for half-precision inputs (docs' reliability page). A review measured a relative error of 1.07 at
:math:`m = n` with ``solver="pinv"`` under CPU bfloat16 autocast, against 1.8e-3 for SDPA under the same
autocast. So the library's entry points take their inputs as autocast gives them to SDPA (float32 and half
precision cast to the autocast dtype, float64 left as it is) and turn autocast off for their own computation,
which then follows its half-precision rules.

Turning autocast off covers the forward pass only: the backward of those float32 sections runs in whatever autocast
state ``.backward()`` is called, and inside the region it ran them in bfloat16 (a review measured gradients off by
5-70 relative with ``solver="pinv"``). So where gradients are wanted the call runs as a graph of its own
(:func:`with_own_backward`), whose backward runs with autocast off, as the forward did.

The same graph of its own serves float16, with or without autocast: its backward divides the incoming gradient by
its largest magnitude and multiplies the input gradients back in float32. Inside, a landmark stands for many
tokens, and the gradients of the landmark keys and queries, sums over those tokens, exceed float16's 65,504 where
every input gradient fits (a review: 1.6e5 for landmark keys, input gradients at most 2.3e4, at n = 256, m = 32);
with a loss scale of 2^16 (``GradScaler``) every step would overflow.
"""

from __future__ import annotations

import contextlib

import torch

from ..linalg.validation import NonFiniteError

# The dtypes autocast casts for an op that runs in lower precision (SDPA); float64 is left as it is.
_CAST_BY_AUTOCAST = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device):
    """The dtype ``torch.autocast`` runs SDPA in on ``device``'s type now, or ``None`` when autocast is off there."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def without_autocast(device):
    """A context in which autocast is off for ``device``'s type (the library's computation, whatever the caller's
    autocast); none for a type autocast does not know (``meta``: torch.autocast raised "unsupported scalarType")."""
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def autocast_cast(x, dtype):
    """``x`` as autocast casts an input of an op it runs in ``dtype``: float32 and half-precision tensors to ``dtype``,
    anything else (float64, integers, ``None``) as it is."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in _CAST_BY_AUTOCAST else x


def with_own_precision(function, Q, K, V, *inputs, replayable=None):
    """``function(Q, K, V, *inputs)`` under the library's precision rules rather than the caller's: under autocast,
    ``Q``, ``K`` and ``V`` in the dtype autocast would give SDPA and autocast off inside, forward and backward; for
    float16, with or without autocast, the gradient's range kept (:func:`with_own_backward`, which differentiates
    ``inputs`` too: tensors such as given landmarks). A plain call when autocast is off for ``Q``'s device and ``Q``
    is not float16. ``replayable``: ``None``, or a callable that says whether ``function`` makes the same choices when
    called again on the same values (no unseeded random draw, no collective, no state it writes), so that a float16
    backward that overflows inside may run again in float32 (:class:`_OwnBackward`); asked only where that backward
    is built, and without autocast only, where float32 inputs stay float32."""
    if not all(isinstance(x, torch.Tensor) for x in (K, V)):
        # The call's own checks name what is wrong (a review: a numpy V beside float16 torch queries was an
        # AttributeError from here).
        return function(Q, K, V, *inputs)
    dtype = autocast_dtype(Q.device)
    if dtype is None:
        if Q.dtype != torch.float16:
            return function(Q, K, V, *inputs)
        return with_own_backward(function, Q, K, V, *inputs, replayable=replayable)

    def run(q, k, v, *rest):
        with without_autocast(q.device):
            cast = [autocast_cast(x, dtype) for x in (q, k, v)]
            try:
                return function(*cast, *rest)
            except NonFiniteError as error:
                # Only where the caller's own values are finite (read on this error path alone).
                if all(
                        x.dtype == y.dtype for x, y in zip(cast, (q, k, v))) or not all(
                        bool(torch.isfinite(x).all()) for x in (q, k, v)):
                    raise
                # The caller's finite values may be past the autocast dtype's range (float32 padding of 1e30 under
                # float16 autocast): the message must not say the caller passed infinity (a review).
                raise ValueError(f"{error} in {dtype}, the dtype torch.autocast gives SDPA and so this call: finite "
                                 f"values past its range become infinite there") from error

    return with_own_backward(run, Q, K, V, *inputs)


def with_own_backward(run, *inputs, replayable=None):
    """``run(*inputs)`` (a tensor, or a tuple of outputs such as an attention function's ``(output, weights)``),
    whose backward runs with autocast off for the inputs' device, whatever the state ``.backward()`` is called in,
    and, for float16 outputs, with the incoming gradients divided by their largest magnitude (the input gradients are
    multiplied back in float32: the module notes). Every floating-point tensor of the result carries its gradient to
    the inputs (the attention weights a model returns with ``output_attentions=True`` too); other items pass as they
    are. First derivatives only (a second one raises). A plain call where no input requires grad, grad mode is off,
    or ``torch.compile`` traces the call (Dynamo cannot trace a backward that differentiates a graph of its own:
    there, run the backward outside the autocast block, as PyTorch recommends). With ``replayable``
    (:func:`with_own_precision`), a float16 backward that overflows inside is run again in float32."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)) or torch.compiler.is_compiling():
        return run(*inputs)
    items = []

    def outputs(*args):
        result = run(*args)
        result = result if isinstance(result, tuple) else (result,)
        if not items:
            # The forward's items; a float32 recompute in the backward (_OwnBackward) keeps none.
            items.extend(result)
        return tuple(x for x in result if _differentiable(x))

    differentiable = iter(_OwnBackward.apply(outputs, inputs[0].device.type, replayable, *inputs))
    result = tuple(next(differentiable) if _differentiable(x) else x for x in items)
    return result if len(result) > 1 else result[0]


def _differentiable(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class _OwnBackward(torch.autograd.Function):
    """The outputs of ``run(*inputs)`` built as a graph of their own in the forward pass, differentiated in the
    backward pass with autocast off (``torch.autograd.grad`` through that graph)."""

    @staticmethod
    def forward(ctx, run, device_type, replayable, *inputs):
        inner = tuple(x.detach().requires_grad_(x.requires_grad) for x in inputs)
        # An output the loss does not use (the weights of a model called without output_attentions) gets None, not
        # zeros to differentiate.
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            outs = run(*inner)
        ctx.graph, ctx.device_type = (outs, inner), device_type
        ctx.run = run if replayable is not None and replayable() else None
        return tuple(out.detach() for out in outs)

    @staticmethod
    def backward(ctx, *grads):
        # The inner graph lives as long as this node: retained, so that a backward with retain_graph=True can run
        # again. A second derivative would need the inner graph built on the caller's tensors, not on detached copies:
        # an error rather than a silent None.
        if torch.is_grad_enabled():
            raise RuntimeError("nystrom under torch.autocast or in float16 gives first derivatives only "
                               "(create_graph=True asked for a second): call it in float32 or float64 outside the "
                               "autocast block for higher derivatives")
        outs, inner = ctx.graph
        # The outputs that reach the inputs and receive a gradient (autograd passes zeros for unused outputs, or None
        # where it materialises none).
        pairs = [(out, grad) for out, grad in zip(outs, grads) if grad is not None and out.requires_grad]
        wanted = [x for x in inner if x.requires_grad]
        unit = None
        if pairs and any(out.dtype == torch.float16 for out, _ in pairs):
            # In units of the largest incoming entry (1 where there is none, or it is not finite: NaN and inf go on).
            unit = torch.stack([grad.detach().abs().amax().float() for _, grad in pairs]).amax()
            unit = torch.where(torch.isfinite(unit) & (unit > 0), unit, torch.ones_like(unit))
            pairs = [(out, (grad.float() / unit).to(grad.dtype)) for out, grad in pairs]
        if pairs:
            with torch.autocast(ctx.device_type, enabled=False):
                found = torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                            allow_unused=True, retain_graph=True)
        else:
            found = (None,) * len(wanted)
        if unit is not None:
            if ctx.run is not None and _overflowed_inside(found, [grad for _, grad in pairs]):
                # A sum inside overflowed float16 (a landmark's gradient over the tokens it stands for, amplified by
                # A^+: a review found 9.3e4 for landmark queries where every input gradient was at most 1.7e4): the
                # backward again through the graph built in float32 on the same values (one host read of the
                # gradients, in float16 only; the recompute only where something overflowed).
                found = _float32_gradients(ctx, pairs, inner)
            # In float32, then the input's dtype: inf only where the gradient itself does not fit.
            found = tuple(None if g is None else (g.float() * unit).to(x.dtype) for g, x in zip(found, wanted))
        found = iter(found)
        return (None, None, None, *(next(found) if x.requires_grad else None for x in inner))


def _overflowed_inside(found, incoming):
    """Whether a gradient ``found`` is not finite where every ``incoming`` one is: one host read in all."""
    finite = [torch.isfinite(g).all() for g in found if g is not None]
    if not finite:
        return False
    ok_in = torch.stack([torch.isfinite(g).all() for g in incoming]).all()
    return bool(ok_in & ~torch.stack(finite).all())


def _float32_gradients(ctx, pairs, inner):
    """The gradients of :class:`_OwnBackward`'s inputs that require one, for the incoming gradients of ``pairs``
    (already in units), from a float32 recompute of its graph: the float16 inputs cast to float32 (exactly), the
    outputs run again and differentiated in float32."""
    wide = tuple(x.detach().float().requires_grad_(x.requires_grad) if x.dtype == torch.float16 else x for x in inner)
    incoming = {id(out): grad for out, grad in pairs}
    with torch.enable_grad(), torch.autocast(ctx.device_type, enabled=False):
        again = [(new, incoming[id(old)].float()) for old, new in zip(ctx.graph[0], ctx.run(*wide))
                 if id(old) in incoming]
        return torch.autograd.grad([new for new, _ in again], [x for x in wide if x.requires_grad],
                                   [grad for _, grad in again], allow_unused=True)
