"""The contract of the public functions: argument checks, run once at the boundary.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or
value) with a message that names the argument, quotes what was received and says what was expected,
so that a bad call never turns into a NaN or a shape error deep inside a kernel.

Public functions call these checks once and then hand the checked arguments to trusted internal
functions that do not check again. Only the checks marked *reads the data* look at array values;
on an accelerator each of them is a host synchronisation, and ``check_values=False`` skips them
(as ``check_finite=False`` does in scipy.linalg):

* :func:`check_finite`: no NaN or infinity in ``Q``, ``K``, ``V`` (and ``features``);
* :func:`check_key_padding_mask`: every sequence keeps at least one real key;
* :func:`check_selection`: ``num_landmarks`` fits the real keys of the shortest sequence.
"""

from __future__ import annotations

import numbers
import re

import array_api_compat
import numpy as np

from .numerics import float64_numpy, sum_dtype


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
        (e.g. a numpy ``Q`` with a torch ``K``).
    ValueError
        If they live on different devices.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")
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


def _library(a) -> str:
    return "torch" if array_api_compat.is_torch_array(a) else type(a).__module__.split(".")[0]


def check_real_floating(xp, name: str, a) -> None:
    """Raise ``TypeError`` unless ``a`` has a real floating dtype."""
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")


def check_finite(xp, **arrays) -> None:
    """Raise ``ValueError`` naming the first of ``arrays`` that holds NaN or infinity. Reads the data.

    A finite sum proves every entry finite (a NaN or an infinity makes the sum NaN or infinite),
    and one reduction is several times cheaper than an elementwise test on long inputs; only a
    non-finite sum (a real NaN/Inf, or an overflow of large finite entries) needs the full test.
    """
    for name, a in arrays.items():
        if bool(xp.isfinite(xp.sum(a, dtype=sum_dtype(xp, a)))):
            continue
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{name} contains NaN or infinite values")


def check_bool(name: str, value) -> bool:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_attention_inputs(Q, K, V=None, key_padding_mask=None, *, check_values=True):
    """Validate ``(Q, K, V, key_padding_mask)`` in the attention convention; return their namespace.

    Shapes: ``Q (..., n_q, d)``, ``K (..., n, d)``, ``V (..., n, d_v)``, ``key_padding_mask (..., n)``
    (bool, ``True`` marks a real token) with the same leading dimensions as ``K``, or size-1
    dimensions that broadcast to them. ``V=None`` checks queries and keys alone (strategies).

    Parameters
    ----------
    Q, K, V : arrays
    key_padding_mask : bool array, optional
    check_values : bool
        Also run the checks that read the data (finite values, no fully masked sequence).

    Returns
    -------
    xp
        The array namespace of the inputs.

    Raises
    ------
    TypeError
        Non-array inputs, mixed libraries, non-floating or mismatched dtypes, non-bool mask.
    ValueError
        Rank below 2, empty sequences or feature dimensions, mismatched leading dimensions,
        ``n`` or ``d``, NaN/Inf values, a mask of the wrong shape or one that hides every key.
    """
    xp = namespace(Q=Q, K=K, V=V, key_padding_mask=key_padding_mask)
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
        )
    if check_values:
        check_finite(xp, **named)
    if key_padding_mask is not None:
        check_key_padding_mask(xp, key_padding_mask, K, check_values=check_values)
    return xp


def check_key_padding_mask(xp, mask, K, *, check_values=True) -> None:
    """Validate a key padding mask against ``K (..., n, d)``; see :func:`check_attention_inputs`.

    With ``check_values`` it reads the data: every sequence must keep a real key.
    """
    expected = tuple(K.shape[:-1])
    if mask.dtype != xp.bool:
        raise TypeError(f"key_padding_mask must be a bool array (True = real token), got dtype {mask.dtype}")
    shape = tuple(mask.shape)
    if len(shape) != len(expected) or shape[-1] != expected[-1] or any(
        s not in (1, e) for s, e in zip(shape[:-1], expected[:-1])
    ):
        hint = ""
        if len(shape) == len(expected) - 1:
            hint = " (for (B, H, n, d) inputs pass mask[:, None, :])"
        raise ValueError(
            f"key_padding_mask must have shape {expected} or one that broadcasts to it with size-1 "
            f"leading dimensions, got {shape}{hint}"
        )
    if check_values and not bool(xp.all(xp.any(mask, axis=-1))):
        raise ValueError("key_padding_mask masks every key of at least one sequence; each row needs a True entry")


def check_num_landmarks(num_landmarks, n: int | None, n_valid: int | None = None) -> int:
    """Validate ``num_landmarks`` (``1 <= m <= n``, and ``<= n_valid`` when keys are padded); ``n=None``
    checks only ``m >= 1``, for settings fixed before the sequence length is known."""
    m = check_int("num_landmarks", num_landmarks, minimum=1)
    if n is not None and m > n:
        raise ValueError(f"num_landmarks must be at most the number of keys n={n}, got {m}")
    if n_valid is not None and m > n_valid:
        raise ValueError(
            f"num_landmarks={m} exceeds the {n_valid} unpadded keys of the shortest sequence in key_padding_mask "
            "(with landmarks shared across heads, a key counts only where it is real in every head); landmarks are "
            "never placed on padding"
        )
    return m


def check_head_axis(head_axis, K) -> None:
    """``head_axis`` is None or a negative leading axis of ``K (..., n, d)`` (``-3`` for ``(B, H, n, d)``)."""
    if head_axis is None:
        return
    if isinstance(head_axis, bool) or not isinstance(head_axis, int) or not (-K.ndim <= head_axis <= -3):
        raise ValueError(
            f"head_axis must be None or a negative int between {-K.ndim} and -3 (a leading axis "
            f"of K with shape {tuple(K.shape)}), got {head_axis!r}"
        )


def check_selection(xp, Q, K, num_landmarks, key_padding_mask=None, head_axis=None, features=None, *,
                    check_values=True) -> int:
    """Validate what a landmark strategy is asked for, given checked ``Q``, ``K`` and mask; return ``m``.

    Checks ``head_axis``, ``features (..., n, D)`` (the leading dimensions of ``K``, without the head
    axis when heads share landmarks), ``1 <= m <= n``, ``m <= n_q`` for cross-attention and, when
    ``check_values`` (reads the data), ``m`` at most the keys that are real in every shared head of
    the shortest sequence: landmarks are never placed on padding.
    """
    check_head_axis(head_axis, K)
    n_valid = None
    if key_padding_mask is not None and check_values:
        real = xp.broadcast_to(key_padding_mask, tuple(K.shape[:-1]))
        if head_axis is not None:
            real = xp.all(real, axis=head_axis + 1)
        n_valid = int(xp.min(xp.sum(xp.astype(real, xp.int64), axis=-1)))
    m = check_num_landmarks(num_landmarks, K.shape[-2], n_valid)
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
    return m


def check_landmarks(landmarks, K, m) -> None:
    """Landmark queries and keys must be arrays like ``K``, of shape ``(..., m, d)`` (no data read)."""
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
        if len(shape) != len(target) or shape[-1] != m or any(s not in (1, t) for s, t in zip(shape, target)):
            raise ValueError(f"landmark log_weights have shape {shape}, expected one that broadcasts to {target}")


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite positive real number; raise naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


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


def check_int(name: str, value, *, minimum: int, optional: bool = False) -> int | None:
    """Return ``value`` as an int ``>= minimum`` (or None when ``optional``): ``TypeError`` for a non-int (bools
    included), ``ValueError`` below ``minimum``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_seed(seed) -> int | None:
    """Validate ``seed`` (``None`` or a non-negative int)."""
    return check_int("seed", seed, minimum=0, optional=True)


def check_query_chunk_size(query_chunk_size) -> int | None:
    """Validate ``query_chunk_size`` (``None`` or a positive int)."""
    return check_int("query_chunk_size", query_chunk_size, minimum=1, optional=True)


def check_points(name: str, X, xp=None):
    """Validate a ``(..., n, D)`` real floating, finite, non-empty array; return its namespace."""
    xp = xp or namespace(**{name: X})
    check_real_floating(xp, name, X)
    if X.ndim < 2 or any(size == 0 for size in X.shape):
        raise ValueError(f"{name} must have shape (..., n, D) with no empty dimension, got {tuple(X.shape)}")
    check_finite(xp, **{name: X})
    return xp


def check_indices(xp, name: str, idx, n: int, batch_shape) -> None:
    """Validate landmark positions ``(..., m)``: integer dtype, batch dims matching, values in ``[0, n)``."""
    if not xp.isdtype(idx.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype, got {idx.dtype}")
    if idx.ndim < 1 or idx.shape[-1] == 0 or tuple(idx.shape[:-1]) != tuple(batch_shape):
        raise ValueError(
            f"{name} must have shape {tuple(batch_shape) + ('m',)} with m >= 1, got {tuple(idx.shape)}"
        )
    if bool(xp.any(idx < 0)) or bool(xp.any(idx >= n)):
        raise ValueError(f"{name} must hold positions in [0, {n}), got values outside")


def check_eigenvalues(eigenvalues):
    """Validate a 1-D finite real spectrum; return it as float64 numpy, sorted decreasingly, clipped at 0.

    Small negative values are round-off of a PSD matrix's spectrum and are clipped; a clearly
    negative one (below ``-1e-8`` times the largest magnitude) means the matrix is not PSD.
    """
    try:
        lam = float64_numpy(eigenvalues)
    except (TypeError, ValueError):
        raise TypeError(f"eigenvalues must be a 1-D array of real numbers, got {type(eigenvalues).__name__}") from None
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contains NaN or infinite values")
    if lam.min() < -1e-8 * np.abs(lam).max():
        raise ValueError(f"eigenvalues must be those of a PSD matrix (>= 0), got minimum {lam.min():.3g}")
    return np.sort(np.clip(lam, 0, None))[::-1]


def resolve(argument: str, registry: dict, value, base: type):
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

    Raises
    ------
    ValueError
        For an unknown name; the message lists each candidate with what it does.
    TypeError
        For anything that is neither a string nor callable.
    """
    if isinstance(value, str):
        if value in registry:
            return registry[value]()
        raise ValueError(f"unknown {argument} {value!r}; candidates are:\n{describe(registry)}")
    if callable(value):
        return value
    raise TypeError(
        f"{argument} must be a name ({', '.join(map(repr, registry))}), a {base.__name__} object or a callable, "
        f"got {type(value).__name__}"
    )


def summary(cls) -> str:
    """The first line of ``cls``'s docstring as plain text (Sphinx roles such as ``:math:`x``` reduced to ``x``)."""
    first = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    return re.sub(r":\w+:`([^`]*)`", r"\1", first).replace("``", "")


def describe(registry: dict, why=None) -> str:
    """One line per candidate: ``  name: first docstring line``, or ``  name: why(cls)`` when given."""
    lines = []
    for name, cls in registry.items():
        text = why(cls) if why is not None else summary(cls)
        lines.append(f"  {name!r}: {text}")
    return "\n".join(lines)
