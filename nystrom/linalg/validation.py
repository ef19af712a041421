"""Input checks shared by every public function.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or
value) with a message that names the argument, quotes what was received and says what was expected,
so that a bad call never turns into a NaN or a shape error deep inside a kernel.
"""

from __future__ import annotations

import numbers

import array_api_compat
import numpy as np


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
        (e.g. a numpy ``Q`` with a torch ``K``) or live on different devices.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(
                f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}"
            )
    names = list(present)
    first = names[0]
    kind = _library(present[first])
    for name in names[1:]:
        if _library(present[name]) != kind:
            raise TypeError(
                f"{name} is a {_library(present[name])} array but {first} is a {kind} array; "
                "pass arrays from one library"
            )
    device = array_api_compat.device(present[first])
    for name in names[1:]:
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


def sum_dtype(xp, a):
    """Accumulator dtype for sums over ``a``: its own for float32/float64, float32 for half precision,
    whose sums of ordinary values overflow past 65,504 (float16) or stop growing (bfloat16)."""
    return None if a.dtype in (xp.float32, xp.float64) else xp.float32


def check_finite(xp, name: str, a) -> None:
    """Raise ``ValueError`` if ``a`` holds NaN or infinity.

    A finite sum proves every entry finite (a NaN or an infinity makes the sum NaN or infinite),
    and one reduction is several times cheaper than an elementwise test on long inputs; only a
    non-finite sum (a real NaN/Inf, or an overflow of large finite entries) needs the full test.
    """
    if bool(xp.isfinite(xp.sum(a, dtype=sum_dtype(xp, a)))):
        return
    if not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_attention_inputs(Q, K, V, key_padding_mask=None, *, finite: bool = True):
    """Validate ``(Q, K, V, key_padding_mask)`` in the attention convention.

    Shapes: ``Q (..., n_q, d)``, ``K (..., n, d)``, ``V (..., n, d_v)``, ``key_padding_mask (..., n)``
    (bool, ``True`` marks a real token) with the same leading dimensions as ``K``, or size-1
    dimensions that broadcast to them.

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
    for name, a in (("Q", Q), ("K", K), ("V", V)):
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
    if not (Q.dtype == K.dtype == V.dtype):
        raise TypeError(f"Q, K and V must share one dtype, got {Q.dtype}, {K.dtype} and {V.dtype}")
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(
            f"Q and K must have the same feature size d, got Q {tuple(Q.shape)} and K {tuple(K.shape)}"
        )
    if K.shape[-2] != V.shape[-2]:
        raise ValueError(
            f"K and V must have the same number of tokens n, got K {tuple(K.shape)} and V {tuple(V.shape)}"
        )
    if not (Q.shape[:-2] == K.shape[:-2] == V.shape[:-2]):
        raise ValueError(
            "Q, K and V must have the same leading (batch/head) dimensions, got "
            f"{tuple(Q.shape[:-2])}, {tuple(K.shape[:-2])} and {tuple(V.shape[:-2])}"
        )
    if finite:
        for name, a in (("Q", Q), ("K", K), ("V", V)):
            check_finite(xp, name, a)
    if key_padding_mask is not None:
        check_key_padding_mask(xp, key_padding_mask, K)
    return xp


def check_key_padding_mask(xp, mask, K) -> None:
    """Validate a key padding mask against ``K (..., n, d)``; see :func:`check_attention_inputs`."""
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
    if not bool(xp.all(xp.any(mask, axis=-1))):
        raise ValueError("key_padding_mask masks every key of at least one sequence; each row needs a True entry")


def check_num_landmarks(num_landmarks, n: int | None, n_valid: int | None = None) -> int:
    """Validate ``num_landmarks`` (``1 <= m <= n``, and ``<= n_valid`` when keys are padded); ``n=None``
    checks only ``m >= 1``, for settings fixed before the sequence length is known."""
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, numbers.Integral):
        raise TypeError(f"num_landmarks must be an int, got {type(num_landmarks).__name__} {num_landmarks!r}")
    m = int(num_landmarks)
    if m < 1:
        raise ValueError(f"num_landmarks must be at least 1, got {m}")
    if n is not None and m > n:
        raise ValueError(f"num_landmarks must be at most the number of keys n={n}, got {m}")
    if n_valid is not None and m > n_valid:
        raise ValueError(
            f"num_landmarks={m} exceeds the {n_valid} unpadded keys of the shortest sequence in "
            "key_padding_mask; landmarks are never placed on padding"
        )
    return m


def check_landmarks_fit(xp, num_landmarks, K, key_padding_mask=None) -> int:
    """:func:`check_num_landmarks` against the ``n`` keys of ``K (..., n, d)`` and the real keys of the shortest
    sequence in ``key_padding_mask (..., n)`` (already validated); returns ``m``."""
    n_valid = None
    if key_padding_mask is not None:
        n_valid = int(xp.min(xp.sum(xp.astype(key_padding_mask, xp.int64), axis=-1)))
    return check_num_landmarks(num_landmarks, K.shape[-2], n_valid)


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


def check_seed(seed) -> int | None:
    """Validate ``seed`` (``None`` or a non-negative int)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be None or a non-negative int, got {seed!r}")
    return int(seed)


def check_points(name: str, X, xp=None):
    """Validate a ``(..., n, D)`` real floating, finite, non-empty array; return its namespace."""
    xp = xp or namespace(**{name: X})
    check_real_floating(xp, name, X)
    if X.ndim < 2 or any(size == 0 for size in X.shape):
        raise ValueError(f"{name} must have shape (..., n, D) with no empty dimension, got {tuple(X.shape)}")
    check_finite(xp, name, X)
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


def float64_numpy(a):
    """float64 numpy copy of a numpy array or torch tensor (any device; bfloat16 has no numpy dtype, so the
    tensor is widened to float64 first). Other inputs go through ``numpy.asarray``."""
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


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


def check_query_chunk_size(query_chunk_size) -> int | None:
    """Validate ``query_chunk_size`` (``None`` or a positive int)."""
    if query_chunk_size is None:
        return None
    if isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, numbers.Integral) or query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be None or a positive int, got {query_chunk_size!r}")
    return int(query_chunk_size)
