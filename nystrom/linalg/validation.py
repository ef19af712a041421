"""The contract of the public functions: argument checks, run once at the boundary.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or
value) with a message that names the argument, quotes what was received and says what was expected,
so that a bad call never turns into a NaN or a shape error deep inside a kernel.

Public functions call these checks once and then hand the checked arguments to trusted internal
functions that do not check again. Only the checks marked *reads the data* look at array values;
on an accelerator each of them is a host synchronisation, and ``check_values=False`` skips them
(as ``check_finite=False`` does in scipy.linalg):

* :func:`check_finite`: no NaN or infinity in ``Q``, ``K``, ``V`` (and ``features``);
* :func:`check_attn_mask`: mask values, rows equal across queries, a real key in every sequence;
* :func:`check_selection`: ``num_landmarks`` fits the real keys of the shortest sequence.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
import warnings

import array_api_compat
import numpy as np

from .numerics import numpy_overflow_ignored, sum_dtype, take_along_axis


def broadcasts_to(size, target) -> bool:
    """Whether an axis of ``size`` broadcasts to one of ``target``: 1 or equal. Compared with ``==``, not ``in (1,
    target)``: under ``torch.compile(dynamic=True)`` a symbolic size in a tuple compared unequal to an equal plain int
    (a valid mask was refused, compiled only; a review)."""
    return size == 1 or size == target


def per_token(got, shape) -> bool:
    """Whether an array of shape ``got`` holds one value per token of ``shape (..., n)``: its last axis ``n``, at most
    as many axes, each leading one broadcasting (:func:`broadcasts_to`)."""
    return 1 <= len(got) <= len(shape) and got[-1] == shape[-1] and all(
        broadcasts_to(g, e) for g, e in zip(got[::-1], shape[::-1]))


def namespace(**arrays):
    """Return the array namespace shared by the named arrays.

    Parameters
    ----------
    **arrays
        ``name=array`` pairs; ``None`` values are skipped.

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays come from different libraries
        (e.g. a numpy ``Q`` with a torch ``K``), or one is a numpy masked array.
    ValueError
        If they live on different devices.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be an array of an array-API library (numpy, torch, array_api_strict, ...), "
                            f"got {type(a).__name__}")
        if str(getattr(a, "layout", "torch.strided")) != "torch.strided" or getattr(a, "is_nested", False):
            # Sparse and nested tensors lack the dense operations the library runs (gather, expand, reshape).
            raise TypeError(f"{name} must be a dense (strided) tensor, got "
                            f"{'a nested tensor' if getattr(a, 'is_nested', False) else f'layout {a.layout}'}")
        if isinstance(a, np.ma.MaskedArray):
            # numpy's functions on it ignore its mask, or fail deep inside with a broadcasting error.
            raise TypeError(f"{name} is a numpy masked array, whose mask the library would not read: pass a plain "
                            f"array ({name}.filled(...)), and mark padded keys with attn_mask")
    names = list(present)
    first = names[0]
    kind = _library(present[first])
    device = array_api_compat.device(present[first])
    for name in names[1:]:
        if _library(present[name]) != kind:
            raise TypeError(
                f"{name} is a {_library(present[name])} array but {first} is a {kind} array; "
                "pass arrays from one library"
            )
        other = array_api_compat.device(present[name])
        if other != device:
            raise ValueError(f"{name} is on device {other} but {first} is on {device}")
    return array_api_compat.array_namespace(*present.values())


def check_given(**arrays) -> None:
    """Raise ``TypeError`` naming the first of ``arrays`` that is ``None`` where an array is required
    (:func:`namespace` skips ``None``, the value of an optional argument)."""
    for name, a in arrays.items():
        if a is None:
            raise TypeError(f"{name} must be an array of an array-API library (numpy, torch, array_api_strict, ...), "
                            "got None")


def repeats_along(a, axis: int) -> bool:
    """Whether ``a`` is known, without reading it, to repeat one slice along ``axis``: a broadcast or expanded view
    (stride 0 there, numpy or torch)."""
    strides = a.stride() if array_api_compat.is_torch_array(a) else getattr(a, "strides", None)
    return strides is not None and strides[axis] == 0


def _library(a) -> str:
    return "torch" if array_api_compat.is_torch_array(a) else type(a).__module__.split(".")[0]


#: The floating dtypes the library computes in, by name: others (numpy's longdouble, a non-native byte order such as
#: ``>f8``) compare unequal to all of them, and would otherwise be computed in float32 (``at_least_float32``) while
#: claiming their own precision.
FLOATING = ("float16", "bfloat16", "float32", "float64")


def check_real_floating(xp, name: str, a) -> None:
    """Raise ``TypeError`` unless ``a`` has one of the :data:`FLOATING` dtypes (in native byte order)."""
    if not any(hasattr(xp, kind) and a.dtype == getattr(xp, kind) for kind in FLOATING):
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64 in native byte order, got "
                        f"{a.dtype!r}")


class NonFiniteError(ValueError):
    """The ``ValueError`` of :func:`check_finite`: the input ``name`` holds NaN or infinity (a type of its own, so that
    a caller that knows more, such as the autocast wrapper, can tell it apart from other bad input). Built from its
    message, as every exception is rebuilt when pickled or re-raised from a worker process; ``name`` is ``None``
    there."""

    def __init__(self, message, name=None):
        super().__init__(message)
        self.name = name


def check_finite(xp, **arrays) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``arrays`` that holds NaN or infinity. Reads the data.

    A finite sum proves every entry finite (a NaN or an infinity makes the sum NaN or infinite),
    and one reduction is several times cheaper than an elementwise test on long inputs; only a
    non-finite sum (a real NaN/Inf, or an overflow of large finite entries) needs the full test.
    The arrays' sums are tested together, one host read for all of them (on CUDA, one synchronisation).
    """
    # An overflowing sum of finite entries is expected here (padding may hold up to the dtype's largest).
    with numpy_overflow_ignored():
        sums = [xp.astype(xp.sum(a, dtype=sum_dtype(xp, a)), xp.float64 if a.dtype == xp.float64 else xp.float32)
                for a in arrays.values()]
    if bool(xp.all(xp.isfinite(xp.stack(sums)))):
        return
    for name, a in arrays.items():
        if not bool(xp.all(xp.isfinite(a))):
            raise NonFiniteError(f"{name} contains NaN or infinite values", name)


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool if it is a bool (numpy's ``np.bool_`` included); ``TypeError`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__module__}.{type(value).__qualname__}")
    return bool(value)


#: What a call on tensors without values (meta) can do instead, by default: skip the checks that read the data.
NO_VALUES_HINT = ("pass check_values=False (the call then reads no data, as for FakeTensorMode; not with tol=, which "
                  "reads exact rows)")


def check_attention_inputs(Q, K, V, attn_mask=None, *, check_values=True, shard=False, values=True,
                           no_values_hint=NO_VALUES_HINT):
    """Validate ``(Q, K, V, attn_mask)`` in the attention convention; return the namespace and the key mask.

    Shapes: ``Q (..., n_q, d)``, ``K (..., n, d)``, ``V (..., n, d_v)``; ``attn_mask`` as
    :func:`check_attn_mask` takes it.

    Parameters
    ----------
    Q, K, V : arrays
    attn_mask : array, optional
    values : bool
        ``V`` is required; ``False``: ``V`` is ``None`` and queries and keys are checked alone (strategies).
    check_values : bool
        Also run the checks that read the data (finite values, mask values, no fully masked sequence).
    shard : bool
        The keys are one process's shard of a sequence (:mod:`nystrom.torch.distributed`): the mask may hide all
        of them (the caller checks the whole sequence).
    no_values_hint : str
        What the message for tensors on torch's meta device, which hold no values to check, tells the caller to do.

    Returns
    -------
    xp
        The array namespace of the inputs.
    keys : bool array, shape (..., n), or None
        The key mask (``True`` = real key) from :func:`check_attn_mask`.

    Raises
    ------
    TypeError
        Non-array inputs, mixed libraries, non-floating or mismatched dtypes, a mask of another dtype.
    ValueError
        Rank below 2, empty sequences or feature dimensions, mismatched leading dimensions,
        ``n`` or ``d``, NaN/Inf values, a mask of the wrong shape or values, one that depends on the
        query or hides every key.
    """
    check_given(Q=Q, K=K, **({"V": V} if values else {}))
    xp = namespace(Q=Q, K=K, V=V, attn_mask=attn_mask)
    named = {"Q": Q, "K": K} if V is None else {"Q": Q, "K": K, "V": V}
    for name, a in named.items():
        check_real_floating(xp, name, a)
        if a.ndim < 2:
            raise ValueError(
                f"{name} must have shape (..., tokens, features) with at least 2 dimensions, "
                f"got shape {tuple(a.shape)}"
            )
        if any(size == 0 for size in a.shape):
            raise ValueError(
                f"{name} must have at least one token, one feature and non-empty batch dimensions, "
                f"got shape {tuple(a.shape)}"
            )
    if len({a.dtype for a in named.values()}) > 1:
        dtypes = ", ".join(str(a.dtype) for a in named.values())
        raise TypeError(f"{', '.join(named)} must share one dtype, got {dtypes}")
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(
            f"Q and K must have the same feature size d, got Q {tuple(Q.shape)} and K {tuple(K.shape)}"
        )
    if V is not None and K.shape[-2] != V.shape[-2]:
        raise ValueError(
            f"K and V must have the same number of tokens n, got K {tuple(K.shape)} and V {tuple(V.shape)}"
        )
    if len({tuple(a.shape[:-2]) for a in named.values()}) > 1:
        raise ValueError(
            f"{', '.join(named)} must have the same leading (batch/head) dimensions, got "
            + ", ".join(str(tuple(a.shape[:-2])) for a in named.values())
            # SDPA broadcasts them (grouped-query attention's shared K/V heads); here they are explicit.
            + "; unlike scaled_dot_product_attention, they are not broadcast against each other (for key/value "
            "heads shared by several query heads, grouped-query attention: approximate(..., enable_gqa=True), or "
            "K.repeat_interleave(H_q // H_kv, dim=-3) and V alike)"
        )
    if check_values:
        if str(array_api_compat.device(Q)) == "meta":
            names = " and ".join([", ".join(list(named)[:-1]), list(named)[-1]])
            raise ValueError(f"{names} are on torch's meta device, whose tensors hold no values to check: "
                             f"{no_values_hint}")
        check_finite(xp, **named)
    keys = None if attn_mask is None else check_attn_mask(xp, attn_mask, Q, K, check_values=check_values, shard=shard)
    return xp, keys


#: Additive mask entries at or below this fraction of the dtype's most negative value mask the key, as in
#: transformers, which fills masked entries with ``finfo(dtype).min`` (``-inf`` qualifies too).
MASKED_FRACTION_OF_MIN = 0.5


def masked_threshold(xp, dtype):
    """The largest additive mask entry of ``dtype`` that masks its key (:data:`MASKED_FRACTION_OF_MIN` of
    ``finfo(dtype).min``); larger entries, 0 included, attend."""
    return MASKED_FRACTION_OF_MIN * xp.finfo(dtype).min

BIDIRECTIONAL = (
    "Nyström attention here is bidirectional: every query sees the same keys, and landmarks summarise all of "
    "them. Pass a key mask (shape (..., 1, n): True or 0 where a key is real), or use exact attention "
    "(torch.nn.functional.scaled_dot_product_attention) for causal or per-query masks"
)


EVERY_KEY_MASKED = "attn_mask masks every key of at least one sequence; each needs a real key"


def check_attn_mask(xp, attn_mask, Q, K, *, check_values=True, shard=False):
    r"""Validate a key mask given the way SDPA or transformers users hold it; return it as bool ``(..., n)``.

    Accepted, for ``Q (..., n_q, d)`` and ``K (..., n, d)``:

    * dtypes: bool (``True`` = attend, as SDPA's ``attn_mask``), integer 0/1 (1 = real token, as
      transformers' ``attention_mask``) or real floating, added to the logits (0 = attend; ``-inf`` or at
      most half the dtype's most negative value, as transformers' ``finfo.min``, = masked);
    * shapes that broadcast to ``(..., n_q, n)`` in SDPA's way while depending on the key only: ``(n,)``,
      ``(..., 1, n)`` such as ``(B, 1, 1, n)`` or ``(B, H, 1, n)``, and transformers' ``(B, n)`` for inputs
      with a batch axis. A mask with fewer dimensions than ``Q`` (other than these) must have size 1 in
      all but its last two: SDPA aligns it to the right, where a former ``(B, 1, n)`` key mask of
      ``(B, H, n, d)`` inputs would read ``B`` as the head axis. A mask of shape ``(..., n_q, n)`` is taken
      when all its query rows are equal (an expanded key mask; reading it needs ``check_values``).

    Parameters
    ----------
    xp
        Array namespace.
    attn_mask : array
    Q, K : arrays
        Checked queries and keys.
    check_values : bool
        Read the data: mask values, rows equal across queries (and, for ``(B, H, ...)`` inputs, across
        heads, which then share one mask row), a real key in every sequence.
    shard : bool
        ``K`` is a shard of the key axis: it may hold no real key (the caller checks the whole sequence).

    Returns
    -------
    bool array, shape (..., n)
        ``True`` for real keys; ``K.ndim - 1`` dimensions, each 1 or ``K``'s.

    Raises
    ------
    TypeError
        A mask of another dtype.
    ValueError
        A mask whose shape does not fit, that varies along the query axis (causal or per-query masks:
        Nyström attention here is bidirectional), with additive values other than 0 and masked (a bias),
        integer values other than 0 and 1, or one that hides every key of a sequence.
    """
    if attn_mask.dtype == xp.bool:
        kind = "bool"
    elif xp.isdtype(attn_mask.dtype, "integral"):
        kind = "int"
    elif any(hasattr(xp, name) and attn_mask.dtype == getattr(xp, name) for name in FLOATING):
        # Not isdtype's "real floating": torch counts its float8 types there, on which comparisons are not implemented.
        kind = "float"
    else:
        raise TypeError(
            f"attn_mask must be a bool mask (True = attend, as SDPA), an integer 0/1 mask (1 = real token, as "
            f"transformers' attention_mask) or an additive float mask (0 / -inf), got dtype {attn_mask.dtype}"
        )
    if kind == "float" and getattr(attn_mask, "requires_grad", False):
        # SDPA differentiates an additive mask as a bias; here it only says which keys are padding.
        raise ValueError("attn_mask requires grad: a float mask is read as a key padding mask (0 or -inf), which "
                         "takes no gradient; pass attn_mask.detach()")
    n, n_q, lead = K.shape[-2], Q.shape[-2], tuple(K.shape[:-2])
    shape = tuple(attn_mask.shape)
    threshold = masked_threshold(xp, attn_mask.dtype) if kind == "float" else None

    def attending(values):
        return values if kind == "bool" else values != 0 if kind == "int" else values > threshold

    expected = f"(n,), (..., 1, n) broadcasting to {(*lead, n_q, n)} or (batch, n) = {(*lead[:1], n)}"
    if not shape or shape[-1] != n:
        raise ValueError(f"attn_mask must have shape {expected} with n={n} keys, got {shape}")
    if len(shape) == 2 and lead and shape[0] == lead[0] and shape[0] > 1:
        # A shard's n_q is its own length, which may equal the batch by chance: a sharded call is self-attention
        # with transformers' (batch, n_r) mask (review: a 2-token shard of a batch of 2 was refused).
        if n_q == shape[0] and not shard:
            raise ValueError(
                f"attn_mask of shape {shape} is ambiguous: it is (batch, n) as transformers' attention_mask, and "
                f"(n_q, n) as SDPA's attn_mask; pass mask[:, None, ..., None, :] with shape "
                f"{(shape[0], *(1,) * len(lead), n)} for a key mask per batch element"
            )
        mask = xp.reshape(attn_mask, (shape[0], *(1,) * (len(lead) - 1), n))
    else:
        if len(shape) == 1:
            attn_mask, shape = attn_mask[None, :], (1, n)
        if len(shape) == len(lead) + 1 and shape[:-1] == lead and not broadcasts_to(lead[-1], n_q):
            raise ValueError(f"attn_mask must have shape {expected}, got {shape} (a per-key mask {shape} needs a "
                             "query axis: pass mask[..., None, :])")
        if 2 < len(shape) < len(lead) + 2 and any(size != 1 for size in shape[:-2]):
            # SDPA aligns a mask with fewer dimensions to the right, so a former (B, 1, n) key mask of (B, H, n, d)
            # inputs would read B as the head axis: silently wrong whenever B == H.
            raise ValueError(
                f"attn_mask of shape {shape} has fewer dimensions than Q {tuple(Q.shape)}: aligned to the right (as "
                f"SDPA does) its leading sizes {shape[:-2]} fall on Q's axes of sizes "
                f"{lead[len(lead) + 2 - len(shape):]}, where a former (batch, 1, n) key mask would put its batch, so "
                f"such masks are refused; pass it with {len(lead) + 2} dimensions, e.g. "
                f"{(*lead[:1], *(1,) * (len(lead) - 1), 1, n)} for one key mask per batch element, or mask[None] for "
                "one per head"
            )
        if len(shape) > len(lead) + 2 or not broadcasts_to(shape[-2], n_q) or any(
                not broadcasts_to(s, t) for s, t in zip(shape[-3::-1], lead[::-1])):
            raise ValueError(f"attn_mask must have shape {expected}, got {shape}")
        if shape[-2] != 1:
            if not check_values:
                raise ValueError(
                    f"attn_mask has shape {shape} with one row per query; with check_values=False pass the key "
                    f"mask mask[..., :1, :] (shape (..., 1, n)). {BIDIRECTIONAL}"
                )
            # Compared as attend / masked: -inf in one row and finfo.min in another mask the same key (a sum of two
            # transformers masks mixes them).
            attend = attending(attn_mask)
            if not bool(xp.all(attend == attend[..., :1, :])):
                raise ValueError(
                    "attn_mask differs between queries (a causal or per-query mask, or padding masked along both "
                    "axes, such as pad[..., :, None] & pad[..., None, :], whose key mask is a real query's row, "
                    f"mask[..., i:i + 1, :]). {BIDIRECTIONAL}"
                )
        mask = xp.reshape(attn_mask[..., :1, :], (*(1,) * (len(lead) + 2 - len(shape)), *shape[:-2], n))
    keys = attending(mask)
    # The values of every row, not only the one kept.
    if kind == "int":
        if check_values and not bool(xp.all((attn_mask == 0) | (attn_mask == 1))):
            raise ValueError("attn_mask as an integer mask must hold 0 (padding) and 1 (real token), got other values")
    elif kind == "float":
        # Tested as "0 or masked", not "0 or not a key": a NaN is neither (SDPA would return NaN rows).
        if check_values and not bool(xp.all((attn_mask == 0) | (attn_mask <= threshold))):
            raise ValueError(
                "attn_mask as an additive float mask must hold 0 (attend) and -inf or a large negative number "
                "(masked, at most half the dtype's most negative value, as transformers' finfo.min); other values "
                "(NaN included) are an attention bias, which Nyström landmarks do not approximate"
            )
    if check_values:
        if not shard and not bool(xp.all(xp.any(keys, axis=-1))):
            raise ValueError(EVERY_KEY_MASKED)
        if len(lead) >= 2 and keys.shape[-2] > 1 and bool(xp.all(keys == keys[..., :1, :])):
            # The same row for every head (an expanded mask): one row lets the heads share landmarks.
            keys = keys[..., :1, :]
    elif len(lead) >= 2 and keys.shape[-2] > 1 and repeats_along(mask, -2):
        # Without reading the data, an expanded view (stride 0 along the heads) still says its rows are equal.
        keys = keys[..., :1, :]
    return keys


def check_token_mask(xp, mask, shape, name="attention_mask"):
    """Validate a per-token mask ``attention_mask`` (named ``name`` in the messages) against tokens of shape
    ``(..., n)``; return it as bool.

    transformers' meaning: bool ``True`` or integer 1 = real token, 0 = padding. It broadcasts to ``shape`` (an
    ``(n,)`` mask serves every sequence of a batch) and is returned broadcast to it. Reads the data: integer values
    must be 0/1, and every sequence needs a real token.
    """
    if mask.dtype != xp.bool and not xp.isdtype(mask.dtype, "integral"):
        raise TypeError(f"{name} must be bool or integer 0/1 (1 = real token), got dtype {mask.dtype}")
    got = tuple(mask.shape)
    if not per_token(got, shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (1 = real token) or one that broadcasts "
                         f"to it, got {got}")
    lead = got[:-1]
    if len(got) < len(shape) and any(size != 1 for size in lead) and lead == tuple(shape[:len(lead)]):
        # It broadcasts aligned to the right, and would fit aligned to the left too: a (B, n) mask of per-head values
        # (B, H, n) with B == H reads B as the head axis, silently (a review: a sink of batch 0 lost in head 1). A
        # (B, n) mask of (layers, B, n) values, which fits only to the right, is taken.
        raise ValueError(f"{name} of shape {got} for tokens of shape {tuple(shape)} is ambiguous: broadcasting "
                         f"aligns it to the right (its first axis as axis {len(shape) - len(got)} of the tokens), and "
                         f"it would fit from the left too; give it the tokens' number of dimensions (for per-head "
                         f"values (B, H, n): {name}[:, None, :])")
    if mask.dtype != xp.bool:
        if not bool(xp.all((mask == 0) | (mask == 1))):
            raise ValueError(f"{name} as an integer mask must hold 0 (padding) and 1 (real token)")
        mask = mask != 0
    if not bool(xp.all(xp.any(mask, axis=-1))):
        raise ValueError(f"{name} masks every token of at least one sequence; each needs a real token")
    return xp.broadcast_to(mask, tuple(shape))


def check_unknown_arguments(function: str, unknown: dict) -> None:
    """Raise ``TypeError`` for keyword arguments ``function`` does not take, saying what to pass for the
    mask names of other libraries.

    ``key_padding_mask`` (``nn.MultiheadAttention``'s, ``True`` = padding, the opposite of this library's
    former meaning) and ``attention_mask`` (transformers') both become ``attn_mask``.
    """
    for name in unknown:
        if name == "key_padding_mask":
            raise TypeError(
                f"{function}() takes no key_padding_mask: the mask argument is attn_mask, in SDPA's convention "
                "(bool True = attend, or additive 0 / -inf; integer 1 = real token as transformers' "
                "attention_mask), shape (..., 1, n) or (batch, n). nn.MultiheadAttention's key_padding_mask "
                "(True = padding) becomes attn_mask=~key_padding_mask"
            )
        if name == "attention_mask":
            raise TypeError(
                f"{function}() takes the mask as attn_mask: pass transformers' attention_mask (integer 0/1, "
                "1 = real token, shape (batch, n)) as attn_mask=attention_mask"
            )
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


def check_bidirectional(is_causal, dropout_p) -> None:
    """SDPA's ``is_causal`` and ``dropout_p`` are accepted at their neutral values (``False``, 0) only."""
    check_bool("is_causal", is_causal)
    if is_causal:
        raise ValueError(f"is_causal=True is not supported. {BIDIRECTIONAL}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(
            f"dropout_p must be 0, got {dropout_p!r}: attention dropout would drop entries of the n x n matrix "
            "that Nyström attention never forms; apply dropout to the output instead"
        )


def check_num_landmarks(num_landmarks, n: int | None, n_valid: int | None = None) -> int:
    """Validate ``num_landmarks`` (``1 <= m <= n``, and ``<= n_valid`` when keys are padded); ``n=None``
    checks only ``m >= 1``, for settings fixed before the sequence length is known."""
    m = check_int("num_landmarks", num_landmarks, minimum=1)
    if n is not None and m > n:
        raise ValueError(f"num_landmarks must be at most the number of keys n={n}, got {m} (approximate's default is "
                         "64; where every key would be a landmark, nystrom.exact_attention costs no more)")
    if n_valid is not None and m > n_valid:
        raise ValueError(
            f"num_landmarks={m} exceeds the {n_valid} real keys of the shortest sequence (and head) in attn_mask; "
            "landmarks are never placed on padding"
        )
    return m


def real_key_counts(xp, keys):
    """The real keys ``(...)`` of each sequence (and head) of a bool key mask ``(..., n)``."""
    return xp.sum(xp.astype(keys, xp.int64), axis=-1)


def fewest_real_keys(xp, keys) -> int:
    """The real keys of the shortest sequence (and head) of a bool key mask ``(..., n)``. Reads the data."""
    return int(xp.min(real_key_counts(xp, keys)))


def every_key_a_landmark(m, n, cross, masked, fewest, longest) -> bool:
    """Whether a checked call makes every real key of every sequence a landmark where some query is not a
    landmark query: cross-attention (``cross``, ``n_q != n``) with ``m = n`` without a key mask (``masked``), or, in
    either, ``m`` the real keys of the shortest sequence (``fewest``, read by :func:`check_selection`; ``None`` if
    unread) and of the longest (``longest()``, read only then), which self-attention needs below ``n`` (masked keys,
    whose queries are no landmark queries; a mask that masks nothing is no mask). ``n`` and the counts are those of
    the whole sequence (over every shard of a sharded one)."""
    if not masked:
        return cross and m == n
    return (cross or m < n) and fewest == m and longest() == m


def check_error_control(tol, max_landmarks, strict_tol, m, largest=None):
    """Validate the error control of ``approximate`` and ``patch``; return ``(tol, max_landmarks)`` (``None`` where
    not given).

    ``tol`` is a positive finite number; ``max_landmarks`` (only with ``tol``) an int from the starting ``m`` to
    ``largest``, the most landmarks the keys allow, when that is known (``patch`` learns it per batch);
    ``strict_tol`` a bool, true only with ``tol``.
    """
    check_bool("strict_tol", strict_tol)
    if tol is None:
        if max_landmarks is not None:
            raise ValueError("max_landmarks only applies with tol; pass tol=... or leave max_landmarks out")
        if strict_tol:
            raise ValueError("strict_tol only applies with tol; pass tol=... or leave strict_tol out")
        return None, None
    tol = check_real("tol", tol)
    if not (0 < tol < math.inf):
        raise ValueError(f"tol must be a positive finite number (a relative error), got {tol!r}")
    if max_landmarks is None:
        return tol, None
    top = check_int("max_landmarks", max_landmarks, minimum=1)
    if largest is None:
        if top < m:
            raise ValueError(f"max_landmarks must be at least num_landmarks={m}, got {top}")
    elif not (m <= top <= largest):
        raise ValueError(f"max_landmarks must be between the search's start, m={m} (num_landmarks, at most the "
                         f"landmarks these keys allow), and {largest} (the most they allow), got {top}")
    return tol, top


def check_tolerance(xp, tol, max_landmarks, strict_tol, m, Q, K, keys=None, fewest=None):
    r""":func:`check_error_control` for ``approximate``'s inputs; return ``(tol, max_landmarks, largest, real)``:
    ``real`` the real keys of the shortest sequence (``fewest`` where :func:`check_selection` read it, else read
    from the mask, only when ``tol`` is given), ``largest`` the most landmarks the keys allow,
    :math:`\min(\text{real}, n_q)`. ``(None,) * 4`` without ``tol``.
    """
    if tol is None:
        check_error_control(tol, max_landmarks, strict_tol, m)
        return None, None, None, None
    if keys is None:
        real = K.shape[-2]
    else:
        real = fewest if fewest is not None else fewest_real_keys(xp, keys)
    largest = min(real, Q.shape[-2])
    tol, top = check_error_control(tol, max_landmarks, strict_tol, m, largest)
    warn_below_rounding(xp, tol, Q.dtype)
    return tol, top, largest, real


def warn_below_rounding(xp, tol, dtype, where=""):
    """Warn when ``tol`` is below the rounding of exact attention in ``dtype``, the reference its error is measured
    against (``where`` prefixes the message)."""
    # The reference is exact attention in the inputs' dtype, itself off by its rounding: the output's eps (a review
    # found float16 calls with tol=1e-4 answered "exactly" with 3e-4 of error against float64), and that of the sums,
    # 8 eps of the dtype they accumulate in (float64 for float64 inputs, else float32: float32 SDPA measured 1.2-3.3
    # eps from float64 at n = 1,024-2,048).
    floor = max(float(xp.finfo(dtype).eps), 8 * float(xp.finfo(xp.float64 if dtype == xp.float64
                                                                 else xp.float32).eps))
    if tol < floor:
        warnings.warn(f"{where}tol={tol} is below the rounding of exact attention in {dtype} (about {floor:.3g}): the "
                      f"error is measured against exact attention computed in {dtype}, which is itself about that "
                      "far from exact", UserWarning, stacklevel=outside_stacklevel())


def check_head_axis(head_axis, K) -> None:
    """``head_axis`` is None or a negative leading axis of ``K (..., n, d)`` (``-3`` for ``(B, H, n, d)``)."""
    if head_axis is None:
        return
    if isinstance(head_axis, bool) or not isinstance(head_axis, numbers.Integral):
        # A TypeError, as check_int gives for num_landmarks=2.0 (a review).
        raise TypeError(f"head_axis must be None or an int, got {type(head_axis).__qualname__} {head_axis!r}")
    if not (-K.ndim <= head_axis <= -3):
        # K of shape (n, d) has no leading axis: "between -2 and -3" named no int (a review).
        allowed = ("None: K has no leading axis" if K.ndim < 3 else
                   f"None or a negative int between {-K.ndim} and -3 (a leading axis of K)")
        raise ValueError(f"head_axis must be {allowed}; K has shape {tuple(K.shape)}, got {head_axis!r}")


def check_selection(xp, Q, K, num_landmarks, keys=None, head_axis=None, features=None, *, check_values=True,
                    start=False):
    """Validate what a landmark strategy is asked for, given checked ``Q``, ``K`` and key mask ``keys``; return
    ``(m, fewest)``: ``fewest`` the real keys of the shortest sequence where the mask was read, else ``None``.

    Checks ``head_axis``, ``features (..., n, D)`` (the leading dimensions of ``K``, without the head
    axis when heads share landmarks), ``1 <= m <= n``, ``m <= n_q`` for cross-attention and, when
    ``check_values`` (reads the data), ``m`` at most the real keys of the shortest sequence and head:
    landmarks are never placed on padding (heads whose masks differ choose their own landmarks, see
    :meth:`nystrom.linalg.landmarks.base.Selection.of`). With ``start`` (``num_landmarks`` is where a search over
    :math:`m` starts, ``approximate(tol=...)``) the mask is read whatever ``check_values``, and an ``m`` above those
    bounds becomes the largest they allow: the search answers within ``tol`` from there, or by exact attention.
    """
    check_head_axis(head_axis, K)
    if start and str(array_api_compat.device(Q)) == "meta":
        # check_values=False lets meta tensors through; a search reads the mask and exact rows (torch's raw errors
        # from inside, a review).
        raise ValueError("tol estimates the error from exact rows of the data, which tensors on torch's meta device "
                         "do not hold: pass num_landmarks without tol there")
    n_valid = None
    if keys is not None and (check_values or start):
        n_valid = fewest_real_keys(xp, keys)
    m = check_int("num_landmarks", num_landmarks, minimum=1)
    if start:
        if n_valid == 0:
            # The check check_values=True would have made on reading the mask, which a search start reads anyway.
            raise ValueError(EVERY_KEY_MASKED)
        cross = [Q.shape[-2]] if Q.shape[-2] != K.shape[-2] else []
        m = min(m, K.shape[-2], *([] if n_valid is None else [n_valid]), *cross)
    m = check_num_landmarks(m, K.shape[-2], n_valid)
    if Q.shape[-2] != K.shape[-2] and m > Q.shape[-2]:
        raise ValueError(f"num_landmarks={m} exceeds the number of queries n_q={Q.shape[-2]}")
    if features is not None:
        namespace(K=K, features=features)
        check_real_floating(xp, "features", features)
        shape = list(K.shape[:-1])
        if head_axis is not None:
            shape.pop(head_axis + 1)
        if features.ndim < 2 or tuple(features.shape[:-1]) != tuple(shape) or features.shape[-1] == 0:
            raise ValueError(
                f"features must have shape {(*shape, 'D')} (one row per key"
                f"{', heads shared' if head_axis is not None else ''}), got {tuple(features.shape)}"
            )
        if check_values:
            check_finite(xp, features=features)
    return m, n_valid


def check_landmarks(landmarks, K, m=None) -> None:
    """Landmark queries and keys must be arrays like ``K``, of shape ``(..., m, d)`` (no data read); ``m=None``:
    as many as ``landmarks.keys`` holds."""
    if not all(hasattr(landmarks, field) for field in ("queries", "keys", "log_weights")):
        raise TypeError(f"landmarks must be Landmarks (queries, keys, log_weights), as a strategy returns, got "
                        f"{type(landmarks).__name__}")
    for name in ("queries", "keys"):
        if getattr(landmarks, name) is None:
            raise TypeError(f"landmark {name} must be an array like K, got None")
    if m is None:
        namespace(K=K, **{"landmark keys": landmarks.keys})
        if landmarks.keys.ndim < 2 or landmarks.keys.shape[-2] < 1:
            raise ValueError(f"landmark keys must have shape (..., m, d) with m >= 1, got "
                             f"{tuple(landmarks.keys.shape)}")
        m = landmarks.keys.shape[-2]
    expected = (*K.shape[:-2], m, K.shape[-1])
    for name, got in (("queries", landmarks.queries), ("keys", landmarks.keys)):
        namespace(K=K, **{f"landmark {name}": got})
        if got.dtype != K.dtype:
            raise TypeError(f"landmark {name} must have the dtype of K, {K.dtype}, got {got.dtype}")
        if tuple(got.shape) != expected:
            raise ValueError(
                f"landmark {name} have shape {tuple(got.shape)}, expected {expected} (..., num_landmarks, d); "
                "a strategy must return m landmarks per sequence and head"
            )
    if landmarks.log_weights is not None:
        log_c = landmarks.log_weights
        namespace(K=K, **{"landmark log_weights": log_c})
        check_real_floating(array_api_compat.array_namespace(K), "landmark log_weights", log_c)
        shape = tuple(log_c.shape)
        target = (*K.shape[:-2], m)
        if len(shape) != len(target) or shape[-1] != m or any(not broadcasts_to(s, t) for s, t in zip(shape, target)):
            raise ValueError(f"landmark log_weights have shape {shape}, expected {target} with 1 allowed for any "
                             f"leading dimension (as many dimensions as K less one, the last of size m = {m})")


def check_finite_landmarks(xp, landmarks) -> None:
    """Raise ``ValueError`` naming the landmark field that holds NaN or infinity (landmarks made by hand or by a
    strategy callable: it would come out as a NaN output with a NaN residual). Reads the data."""
    check_finite(xp, **{"landmark queries": landmarks.queries, "landmark keys": landmarks.keys})
    if landmarks.log_weights is not None:
        check_finite(xp, **{"landmark log_weights": landmarks.log_weights})


def check_positions(xp, name, idx, n, rows_of) -> None:
    """``idx`` must be integer positions of the ``n`` rows of the array named ``rows_of``: ``TypeError`` for another
    dtype, ``ValueError`` for values outside ``[0, n)``. Reads the data."""
    if not xp.isdtype(idx.dtype, "integral"):
        raise TypeError(f"{name} must be integers (positions in {rows_of}), got dtype {idx.dtype}")
    if not bool(xp.all((idx >= 0) & (idx < n))):
        raise ValueError(f"{name} must be positions in {rows_of}, in [0, {n}), got {int(xp.min(idx))} to "
                         f"{int(xp.max(idx))}")


def check_landmark_positions(xp, landmarks, K, real_keys=None) -> None:
    """Raise ``ValueError`` (``TypeError`` for indices that are not integers) where landmarks made by hand or by a
    strategy callable say, through their ``indices``, that they are keys outside ``K`` or masked ones (``real_keys``,
    bool, broadcastable to ``K.shape[:-1]``): a landmark on padding lets the padding change the real rows' output (a
    review: 5e-5 in a patched BERT, 0.81 through ``approximate``, silently). Landmarks without ``indices`` (means)
    are the callable's to keep off padding. Indices must broadcast to ``K.shape[:-2] + (m,)``; reads the data."""
    idx = landmarks.indices
    if idx is None:
        return
    n, m = K.shape[-2], landmarks.keys.shape[-2]
    target = (*K.shape[:-2], m)
    namespace(K=K, **{"landmark indices": idx})
    shape = tuple(idx.shape)
    if len(shape) > len(target) or any(not broadcasts_to(s, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"landmark indices must have a shape that broadcasts to {target} (positions in K of the m "
                         f"landmark keys), got {shape}")
    idx = xp.broadcast_to(idx, target)
    check_positions(xp, "landmark indices", idx, n, "K")
    if real_keys is None:
        return
    if not bool(xp.all(take_along_axis(xp, xp.broadcast_to(real_keys, tuple(K.shape[:-1])), idx))):
        raise ValueError("landmark indices point at masked keys (False in the attn_mask the strategy was given: "
                         "padding, or in a patched model tokens excluded or guaranteed apart): a landmark there lets "
                         "them change the real rows; a strategy callable must choose among the keys its attn_mask "
                         "keeps")


def check_real(name: str, value, *, optional: bool = False) -> float | None:
    """Return ``value`` as a float if it is a real number (numpy scalars included, bools not; ``None`` when
    ``optional``): ``TypeError`` naming ``name`` otherwise, ``ValueError`` for NaN. Ranges are the caller's."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "None or a real number" if optional else "a real number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return float(value)


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite positive real number; raise naming ``name`` otherwise."""
    value = check_real(name, value)
    if not (0 < value < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


def check_scale(scale, d: int) -> float:
    """Return the softmax temperature: ``scale`` if given (finite, positive), else ``1/sqrt(d)``."""
    if scale is None:
        return float(d) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def check_int(name: str, value, *, minimum: int | None, optional: bool = False) -> int | None:
    """Return ``value`` as an int ``>= minimum`` (any int for ``None``; or None when ``optional``): ``TypeError``
    for a non-int (bools included), ``ValueError`` below ``minimum``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int" if minimum is None else f"an int >= {minimum}"
        raise TypeError(f"{name} must be {'None or ' if optional else ''}{what}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


#: Seeds are below this: a 64-bit signed integer, as ``torch.compile`` passes one to the graph's draw operator (a
#: larger one worked eagerly and failed compiled; a review).
SEED_LIMIT = 2**63


def check_seed(seed) -> int | None:
    """Validate ``seed`` (``None`` or an int in ``[0, 2**63)``)."""
    seed = check_int("seed", seed, minimum=0, optional=True)
    if seed is not None and seed >= SEED_LIMIT:
        raise ValueError(f"seed must be below 2**63 (a 64-bit signed integer), got {seed}")
    return seed


def check_query_chunk_size(query_chunk_size) -> int | None:
    """Validate ``query_chunk_size`` (``None`` or a positive int)."""
    return check_int("query_chunk_size", query_chunk_size, minimum=1, optional=True)


def register(registry: dict, name: str, cls: type, family: str) -> None:
    """Add ``cls`` to ``registry`` under ``name``: ``ValueError`` where another class holds that name (a subclass
    named as a built-in silently replaced it for every caller, a review), except the same class defined again (a
    module reloaded), which replaces its earlier self. ``family`` names the registry in the message."""
    held = registry.get(name)
    if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"the {family} name {name!r} is taken by {held.__module__}.{held.__qualname__}: give "
                         f"{cls.__qualname__} a name of its own, or none to leave it unregistered")
    registry[name] = cls


def resolve(argument: str, registry: dict, value, base: type, other: tuple[type, str] | None = None):
    """``registry[value]()`` for a name, ``value`` itself for a callable.

    Parameters
    ----------
    argument : str
        The argument's name in messages (``"strategy"``, ``"solver"``).
    registry : dict of str to type
        Name to class; each class's first docstring line describes it in the error message.
    value : str or callable
    base : type
        The family's base class, named in the ``TypeError``.
    other : (type, str), optional
        The other family's base class and argument: an object of it is refused by name (a solver passed as
        ``strategy=`` failed later with an error about neither argument, a review).

    Raises
    ------
    ValueError
        For an unknown name; the message lists each candidate with what it does.
    TypeError
        For anything that is neither a string nor callable, for a class of the family instead of an object, and for
        an object of the ``other`` family.
    """
    if isinstance(value, str):
        if value in registry:
            return registry[value]()
        raise ValueError(f"unknown {argument} {value!r}; candidates are:\n{describe(registry)}")
    if isinstance(value, type) and issubclass(value, base):
        # The class itself is callable, with the call's arguments taken as its options: a confusing error later.
        raise TypeError(f"{argument} must be a {base.__name__} object, not the class: pass {value.__name__}()")
    if other is not None and isinstance(value, other[0]):
        raise TypeError(f"{argument} must be a {base.__name__} object or a name, got the {other[1]} {value!r}: pass it "
                        f"as {other[1]}=")
    if callable(value):
        return value
    raise TypeError(
        f"{argument} must be a name ({', '.join(map(repr, registry))}), a {base.__name__} object or a callable, "
        f"got {type(value).__name__}"
    )


def summary(cls) -> str:
    """The first paragraph of ``cls``'s docstring on one line, as plain text: a Sphinx role (math, mod, func) is
    reduced to its content and double backquotes are dropped."""
    first = (cls.__doc__ or cls.__name__).strip().split("\n\n")[0]
    return " ".join(re.sub(r":\w+:`([^`]*)`", r"\1", first).replace("``", "").split())


def describe(registry: dict, why=None) -> str:
    """One line per candidate: ``  name: first docstring line``, or ``  name: why(cls)`` when given."""
    lines = []
    for name, cls in registry.items():
        text = why(cls) if why is not None else summary(cls)
        lines.append(f"  {name!r}: {text}")
    return "\n".join(lines)


#: Packages whose frames a warning skips to reach the user's line: the library, and the model code it runs inside
#: when it patches a model (torch's module calls, transformers' forward passes).
_LIBRARY_PACKAGES = ("nystrom", "torch", "transformers")


def outside_stacklevel() -> int:
    """The ``stacklevel`` at which ``warnings.warn``, called by the caller of this function, names the first frame
    outside the library and the model code around it (:data:`_LIBRARY_PACKAGES`): the user's line, however many
    library frames (wrappers included) lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARY_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level
