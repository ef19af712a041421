"""Working precision and small numerical primitives shared by the math modules (array API)."""

from __future__ import annotations

import functools
import math

import array_api_compat
import numpy as np
import scipy.sparse


def at_least_float32(xp, X):
    """``X`` as float32 when it is a half-precision array, unchanged otherwise.

    Selection and the :math:`m\\times m` solve never run below float32: half-precision distances
    round away the differences that farthest points, k-means and pivoting compare (bfloat16 keeps
    8 significant bits), and the small singular values of the landmark kernel would be lost.
    """
    return X if X.dtype in (xp.float32, xp.float64) else xp.astype(X, xp.float32)


def mean_over(xp, X, axis):
    """``xp.mean(X, axis=axis)``, a view of ``X`` where that axis has one entry: such a mean is a copy of the whole
    array (4 ms for keys of (1, 1, 65,536, 64), 0.3-1 ms for the probes' attention there)."""
    return xp.squeeze(X, axis=axis) if X.shape[axis] == 1 else xp.mean(X, axis=axis)


def without_padding(xp, keys, *arrays):
    """``arrays (..., n, D)`` with the rows of padded keys (``keys (..., n)`` False) set to 0.

    Padding may hold anything finite, up to 3e38 in float32: zeroed, it takes part in no product, so no
    overflow from padding reaches a real token, in selection or attention. Only keys and values are zeroed: the
    query rows at padded keys are computed as given (a masked key's query may be a real one), so queries near the
    dtype's largest value there overflow their own logits, which the forward pass never reads but a backward pass
    does (NaN gradients). ``keys=None`` returns the arrays unchanged.
    """
    if keys is None:
        return arrays
    zero = xp.full((), 0, dtype=arrays[0].dtype, device=array_api_compat.device(arrays[0]))
    return tuple(xp.where(keys[..., None], a, zero) for a in arrays)


def power_of_two_unit(xp, largest):
    r"""The power of two :math:`u = 2^{-e}` that brings a magnitude ``largest`` (:math:`\ge 0`, any shape) into about
    :math:`[1, 2)`: a unit in which products and squares neither over- nor underflow, and by which scaling is exact
    (the same bits, short of subnormals). Finite for 0 and subnormal magnitudes (the smallest normal number is added
    first, so :math:`u \le 2^{1022}` in float64), and 1 where ``largest`` is not finite (unchecked inputs stay as
    they are)."""
    unit = 2.0 ** -xp.floor(xp.log2(largest + xp.finfo(largest.dtype).smallest_normal))
    return xp.where(unit > 0, unit, xp.ones_like(unit))


def detached(a):
    """``a`` without autograd history (torch's ``Tensor.detach``), unchanged for arrays that have none.

    The array API has no gradients; libraries that track them (torch) expose ``detach``.
    """
    detach = getattr(a, "detach", None)
    # "is not None", not callable(): torch.compile cannot trace the builtin callable (fullgraph broke on PInv).
    return detach() if detach is not None else a


TANGENTS: list = []
"""How an array library's arrays carry derivatives besides ``requires_grad``: callables ``carries(a) -> bool``, such as
torch's forward-mode tangents, which :mod:`nystrom.torch.forward_mode` registers on import (``linalg`` imports no
backend)."""


def carries_derivatives(a) -> bool:
    """Whether ``a`` carries derivatives to propagate: reverse mode (``requires_grad``) or a registered forward mode
    (:data:`TANGENTS`). A branch that skips derivative terms for arrays without them must ask this: a forward-mode
    dual tensor does not require grad (a review: ``PInv`` under ``torch.func.jvp`` gave a tangent 0.93 off). An array
    of a library that tracks derivatives (it has ``requires_grad``) is taken to carry them while no forward mode is
    registered (``nystrom.torch`` not yet imported: a solver called on its own in a fresh process, another review)."""
    if getattr(a, "requires_grad", False):
        return True
    if not TANGENTS:
        return hasattr(a, "requires_grad")
    return any(carries(a) for carries in TANGENTS)


def relative_norms(xp, X, mask=None):
    r"""Euclidean norms of the rows of ``X (..., n, D)``, in float32 or wider, in a unit of a power of two per
    ``(n, D)`` block near its largest entry among the ``mask (..., n)`` rows (default all; the others count as 0):
    comparable within a block (a ratio to the median is the same in any unit), and their squares neither overflow
    nor underflow. In the rows' own units, float32 sums of squares overflowed past entries of about 1e19 and vanished
    below about 1e-19, and the median went to inf or 0 (a review: the high-norm tests flagged every token, or none,
    at scales of 1e30 and 1e-25)."""
    wide = at_least_float32(xp, X)
    if mask is not None:
        wide = xp.where(mask[..., None], wide, xp.zeros_like(wide))
    scaled = wide * power_of_two_unit(xp, largest_magnitude(xp, wide))
    return xp.sqrt(xp.sum(scaled * scaled, axis=-1))


def largest_magnitude(xp, X):
    r""":math:`\max|X|` over the last two axes, shape ``(..., 1, 1)``, by two reductions rather than one of
    :math:`|X|`, which would be an array of ``X``'s size of its own."""
    return xp.maximum(xp.max(X, axis=(-2, -1), keepdims=True), -xp.min(X, axis=(-2, -1), keepdims=True))


def scaled_logits(xp, q, k, scale):
    r""":math:`\tau\, q k^\top` for ``q (..., n_q, d)``, ``k (..., n, d)`` of one dtype and a Python float ``scale``,
    with :math:`\tau` applied first to the queries where it is at most 1 (as SDPA does): applied to the product, the
    product of keys and queries of logits up to the dtype's largest overflowed first, :math:`\tau^{-1} = \sqrt d`
    times larger (a review: exact attention NaN for float32 logits of 3e38, where SDPA was finite). A ``scale`` above
    1 goes on the product, which it can only enlarge."""
    if scale <= 1:
        return (scale * q) @ xp.matrix_transpose(k)
    return scale * (q @ xp.matrix_transpose(k))


def sum_dtype(xp, a):
    """Accumulator dtype for sums over ``a``: its own for float32/float64, float32 for half precision,
    whose sums of ordinary values overflow past 65,504 (float16) or stop growing (bfloat16)."""
    return None if a.dtype in (xp.float32, xp.float64) else xp.float32


def softmax(xp, logits, mask=None):
    r"""Row softmax :math:`\mathrm{softmax}(x)_j = e^{x_j - \max x} / \sum_k e^{x_k - \max x}`.

    Parameters
    ----------
    xp
        Array namespace.
    logits : array, shape (..., n)
    mask : bool array, shape broadcastable to (..., n), optional
        ``True`` marks entries that take part; masked entries get weight exactly 0. Every row
        must keep at least one entry (checked by the callers' validation).

    Returns
    -------
    array, shape (..., n)
        Rows summing to 1 (masked entries exactly 0).

    Notes
    -----
    Subtracting the row maximum (over unmasked entries) keeps every exponent :math:`\le 0`, so no
    overflow happens in any dtype; the largest term is exactly 1, so the sum is :math:`\ge 1` and
    the division is safe. Half-precision rows are summed in float32: more than 65,504 terms of up
    to 1 would overflow a float16 sum.
    """
    if mask is not None:
        neg = xp.full((), -float("inf"), dtype=logits.dtype, device=array_api_compat.device(logits))
        logits = xp.where(mask, logits, neg)
    if array_api_compat.is_torch_array(logits):
        # One fused kernel instead of four passes (max, subtract-exp, sum, divide): on long rows the passes are
        # memory-bound, and the fused one is about 1.6x faster at (8, 65,536) in float32 on one core.
        return logits.softmax(-1, dtype=sum_dtype(xp, logits)).to(logits.dtype)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    total = xp.sum(e, axis=-1, keepdims=True, dtype=sum_dtype(xp, e))
    return xp.astype(e / total, logits.dtype, copy=False)


def masked_median(xp, values, mask=None):
    """Median over the last axis of the entries where ``mask`` is True (lower median for even counts).

    Parameters
    ----------
    xp
        Array namespace.
    values : array, shape (..., n)
    mask : bool array, shape (..., n), optional
        Entries that count; every row needs at least one.

    Returns
    -------
    array, shape (...)
    """
    if mask is None:
        count = values.shape[-1]
        ordered = xp.sort(values, axis=-1)
        return ordered[..., (count - 1) // 2]
    big = xp.full((), float("inf"), dtype=values.dtype, device=array_api_compat.device(values))
    ordered = xp.sort(xp.where(mask, values, big), axis=-1)
    # A row with no entry that counts (outside the contract, but reachable with check_values=False) gives inf, the
    # filler, rather than an index of -1: a gather out of bounds on a GPU is a device-side assert.
    middle = xp.clip((xp.sum(xp.astype(mask, xp.int64), axis=-1, keepdims=True) - 1) // 2, min=0)
    return take_along_axis(xp, ordered, middle)[..., 0]


def numpy_overflow_ignored():
    """numpy's error state with its overflow and invalid-value ``RuntimeWarning`` off, for computations whose padding
    rows may overflow and are never read (under ``-W error`` the warning would be an error)."""
    return np.errstate(over="ignore", invalid="ignore")


def quiet_numpy_overflow(function):
    """``function`` with numpy's overflow and invalid-value ``RuntimeWarning`` off: padding may hold any finite
    values, up to the dtype's largest, and the padded rows' overflowing logits are computed (as SDPA computes them)
    and never read. torch warns of none, so neither does numpy here. Calls with a torch tensor among the positional
    arguments run as they are (``torch.compile`` traces them, and numpy's error state is not theirs)."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        if any(array_api_compat.is_torch_array(a) for a in args):
            return function(*args, **kwargs)
        with numpy_overflow_ignored():
            return function(*args, **kwargs)

    return call


def float64_numpy(a):
    """float64 numpy copy of a numpy array or torch tensor (any device; bfloat16 has no numpy dtype, so the
    tensor is widened to float64 first). Other inputs go through ``numpy.asarray``, and arrays it cannot read
    (another library's array on another device) through DLPack."""
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().double().numpy()
    try:
        return np.asarray(a, dtype=np.float64)
    except (RuntimeError, TypeError, ValueError, BufferError):
        if array_api_compat.is_numpy_array(a) or not hasattr(a, "__dlpack__"):
            raise
    # ``__array__`` is not in the array API, and arrays off the host refuse it (array_api_strict's "device1"):
    # DLPack asks their library for a host copy (numpy 2.1 added the device request; before it, host arrays only).
    try:
        host = np.from_dlpack(a, device="cpu", copy=True)
    except TypeError:
        host = np.from_dlpack(a)
    return np.asarray(host, dtype=np.float64)


COMPILERS: list = []
"""The compilers that trace Python code into graphs of array operations, numpy calls excluded, each with
``tracing(a) -> bool`` (is it tracing the array ``a`` now?), ``holds_no_data(a) -> bool`` (is ``a`` a stand-in without
values, such as a fake tensor?) and ``host_draws(draw, seed, shape, dtype, like)``
(:func:`~nystrom.linalg.landmarks.base.host_draws` as one operation of its graph). The backend of an array library
registers its compiler on import, as :mod:`nystrom.torch.tracing` does for ``torch.compile``: ``linalg`` imports no
backend. While one traces, the host fast paths (:func:`host_view`) give way to the array-API paths, and host draws
become graph operations."""


def stand_in(a) -> bool:
    """Whether ``a`` is a stand-in a compiler of :data:`COMPILERS` traces with (a fake tensor): a shape, a dtype and a
    device, no values."""
    return any(c.holds_no_data(a) for c in COMPILERS)


def holds_values(a) -> bool:
    """Whether ``a`` holds values to read: not on torch's meta device, nor as a compiler's stand-in
    (:func:`stand_in`)."""
    return str(array_api_compat.device(a)) != "meta" and not stand_in(a)


def host_view(a):
    """``a`` as a numpy array sharing its memory when it lives in host memory, else ``None``.

    Parameters
    ----------
    a : array
        Any array-API array (numpy, torch, ...).

    Returns
    -------
    numpy.ndarray or None
        A zero-copy DLPack view for host arrays (detached from autograd), ``None`` on accelerators, for
        dtypes numpy lacks, and for arrays a compiler traces (:func:`compiling`; ``torch.compile``) or that hold no
        data (fake tensors): numpy calls cannot enter a graph nor read them, so the callers' array-API paths (those
        of accelerators) run instead.
    """
    if array_api_compat.is_numpy_array(a):
        return a
    # On the CPU, so not on the meta device: a stand-in is the only array without values left.
    if str(array_api_compat.device(a)) != "cpu" or compiling(a) or stand_in(a):
        return None
    try:
        return np.from_dlpack(detached(a))
    except (BufferError, RuntimeError, TypeError):
        return None  # a dtype numpy does not have (torch.bfloat16): the caller's array-API path handles it


@functools.cache
def _numpy_blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def single_threaded_numpy_blas():
    """A context in which numpy's BLAS runs on the calling thread alone, for the host fast paths of torch tensors.

    OpenBLAS's worker threads spin for a while after each call: on a 2-core machine the flash-attention call right
    after farthest-point sampling of 65,536 tokens took 32-35 instead of 17 ms at two threads, its second core busy
    spinning (64 products of 66 x 1,024, the k-means seeding's, slowed the call after them from 15 to 26 ms; within a
    ``norm`` selection the operations between absorbed it). Single-threaded, the workers never wake: a 66 x 1,024
    product takes 6.5 against 6.0 us, one of 66 x 65,536 529 against 249 us (the loop is memory-bound). It also keeps
    ``torch.set_num_threads(1)`` honest: numpy's BLAS follows its own thread count.
    """
    return _numpy_blas().limit(limits=1)


def compiling(a) -> bool:
    """Whether a compiler of :data:`COMPILERS` is tracing ``a`` now (its graph takes no numpy call)."""
    return any(compiler.tracing(a) for compiler in COMPILERS)


def segment_sum(xp, values, labels, num_segments):
    """Sum the rows of ``values`` by label: ``out[..., j, :]`` is the sum of the rows ``values[..., i, :]`` with
    ``labels[..., i] == j``.

    The scatter-add behind cluster means, in :math:`O(nD)` without a dense :math:`m\\times n` membership matrix:
    ``index_add_`` for torch, a sparse product for numpy (the array API has no scatter); other libraries multiply
    by one :math:`(m+1)\\times n` one-hot matrix per row, :math:`O(mnD)`.

    Parameters
    ----------
    xp
        Array namespace.
    values : array, shape (..., n, D)
    labels : int array, shape broadcastable to (..., n)
        Segment of each row; rows labelled outside ``[0, num_segments)`` (``-1`` for padding) are dropped.
    num_segments : int

    Returns
    -------
    array, shape (..., num_segments, D)
        Same dtype as ``values``.
    """
    lead, (n, D) = tuple(values.shape[:-2]), tuple(values.shape[-2:])
    # Slot S collects the rows labelled outside [0, S): it is dropped at the end.
    slots = xp.where((labels >= 0) & (labels < num_segments), labels, num_segments)
    if (array_api_compat.is_torch_array(values) and values.dtype in (xp.float32, xp.float64)
            and math.prod(lead) > 1 and math.prod(labels.shape[:-1]) == 1 and labels.shape[-1] == n):
        # One labelling for several rows (shared heads of one sequence): a scatter along the token axis of values as
        # they lie, without the flat copy below (a strided (1, 6, 1370, 64) of a model's projections: 0.40 against
        # 0.71 ms for the keys of DINOv2-S layer 7 on one thread, labels of its norm selection). Not for one row,
        # whose flat scatter is a view and runs 3-7 times faster (index_add_ along the first axis of a matrix: 28
        # against 78 us for the (1, 1024, 65) of a Lloyd step, 13 against 90 us for 1,370 counts). Not for half
        # precision: index_add_ along an inner axis rounds to it after every addition (float16 ones summed 3,000
        # times give 2,048), the flat scatter does not.
        index = xp.astype(xp.reshape(slots, (n,)), xp.int64)
        out = values.new_zeros((*lead, num_segments + 1, D)).index_add_(-2, index, values)
        return out[..., :num_segments, :]
    if not (array_api_compat.is_torch_array(values) or array_api_compat.is_numpy_array(values)):
        # One (S + 1) x n one-hot matrix per row, multiplied as a batch: one block-diagonal matrix over the flat
        # rows below would grow with the square of their number (a review: 16 rows of n = 200 made a 272 x 3,200).
        segments = xp.arange(num_segments + 1, device=array_api_compat.device(values))[:, None]
        one_hot = xp.astype(xp.expand_dims(slots, axis=-2) == segments, values.dtype)
        return (one_hot @ values)[..., :num_segments, :]
    rows = math.prod(lead)
    if rows == 1:
        # The labels are the flat indices (a Lloyd step's scatter, the cluster sizes): four operations fewer. In int64,
        # as the offsets made them: torch's index_add_ with an int32 index rounds float16 sums after every addition
        # (a review: 3,000 ones gave 2,048).
        flat = xp.reshape(xp.broadcast_to(xp.astype(slots, xp.int64, copy=False), (*lead, n)), (-1,))
    else:
        # One flat index per row: segment j of row r is r * (S + 1) + j.
        offsets = xp.reshape(xp.arange(rows, dtype=xp.int64, device=array_api_compat.device(values))
                             * (num_segments + 1), (*lead, 1))
        flat = xp.reshape(xp.broadcast_to(slots, (*lead, n)) + offsets, (-1,))
    source = xp.reshape(values, (rows * n, D))
    size = rows * (num_segments + 1)
    if array_api_compat.is_torch_array(values):
        out = source.new_zeros((size, D)).index_add_(0, flat, source)
    else:
        member = scipy.sparse.csr_matrix((np.ones(rows * n, dtype=values.dtype), (flat, np.arange(rows * n))),
                                         shape=(size, rows * n))
        out = np.asarray(member @ source, dtype=values.dtype)
    return xp.reshape(out, (*lead, num_segments + 1, D))[..., :num_segments, :]


def take_along_axis(xp, array, indices, axis=-1):
    """``xp.take_along_axis`` for non-negative ``indices`` (as many dimensions as ``array``, broadcast against it
    outside ``axis``): for torch one ``Tensor.gather`` on broadcast views.

    array-api-compat's torch version first wraps negative indices, four more operations per call, and
    ``torch.take_along_dim`` adds a copy where it broadcasts; on a GPU each operation costs a launch (about 10 us
    eager on an H200), which adds up in the per-step loops of selection.
    """
    if not array_api_compat.is_torch_array(array):
        return xp.take_along_axis(array, indices, axis=axis)
    axis %= array.ndim
    lead = [max(a, i) for a, i in zip(array.shape, indices.shape)]
    array = xp.broadcast_to(array, tuple(lead[:axis] + [array.shape[axis]] + lead[axis + 1:]))
    indices = xp.broadcast_to(indices, tuple(lead[:axis] + [indices.shape[axis]] + lead[axis + 1:]))
    return array.gather(axis, indices)


def put_along_axis(xp, array, indices, values):
    """A copy of ``array (..., n)`` with ``out[..., indices[..., k]] = values[..., k]`` along the last axis.

    The array API has no scatter: ``numpy.put_along_axis`` for numpy, ``Tensor.scatter`` for torch, an
    :math:`O(nk)` comparison for other libraries. ``indices`` must be distinct within a row.

    Parameters
    ----------
    xp
        Array namespace.
    array : array, shape (..., n)
    indices : int array, shape (..., k)
    values : array, shape (..., k)

    Returns
    -------
    array, shape (..., n)
    """
    if array_api_compat.is_torch_array(array):
        return array.scatter(-1, indices, values)
    if array_api_compat.is_numpy_array(array):
        out = np.array(array, copy=True)
        np.put_along_axis(out, indices, values, axis=-1)
        return out
    hit = indices[..., :, None] == xp.arange(array.shape[-1], device=array_api_compat.device(array))
    if values.dtype == xp.bool:
        chosen = xp.any(hit & values[..., :, None], axis=-2)  # the array API sums no booleans
    else:
        chosen = xp.sum(xp.where(hit, values[..., :, None], xp.zeros_like(values)[..., :, None]), axis=-2)
    return xp.where(xp.any(hit, axis=-2), chosen, array)


def put_where(xp, array, indices, values, where=None):
    """:func:`put_along_axis` of the entries where ``where (..., k)`` is True (``None``: all, which must then be
    distinct); the other entries write nothing, whatever their ``indices`` (repeats included).

    They are sent to one extra slot past the end, which is then dropped, so the written positions need only be
    distinct among themselves.
    """
    if where is None:
        return put_along_axis(xp, array, indices, values)
    n = array.shape[-1]
    spare = xp.zeros((*array.shape[:-1], 1), dtype=array.dtype, device=array_api_compat.device(array))
    slots = xp.where(where, indices, xp.full((), n, dtype=indices.dtype, device=array_api_compat.device(indices)))
    values = xp.broadcast_to(values, tuple(slots.shape))
    padded = xp.concat([array, spare], axis=-1)
    if array_api_compat.is_torch_array(padded):
        # In place into the fresh padded copy: put_along_axis would copy it once more (page faults of an (..., n)
        # array per call, three calls per norm selection).
        return padded.scatter_(-1, slots, values)[..., :n]
    return put_along_axis(xp, padded, slots, values)[..., :n]


def searchsorted_rows(xp, sorted_rows, values):
    """Per row, the number of entries of ``sorted_rows (..., n)`` (non-decreasing) that are ``<= values (..., k)``:
    ``searchsorted(side="right")`` batched over the leading dimensions: torch's is batched already, numpy's takes
    one row at a time.

    Returns
    -------
    int64 array, shape (..., k)
    """
    if array_api_compat.is_torch_array(sorted_rows):
        lead = tuple(sorted_rows.shape[:-1])
        values = xp.broadcast_to(values, (*lead, values.shape[-1]))
        return xp.astype(xp.searchsorted(sorted_rows, values, side="right"), xp.int64)
    lead = tuple(sorted_rows.shape[:-1])
    flat_rows = xp.reshape(sorted_rows, (-1, sorted_rows.shape[-1]))
    flat_values = xp.reshape(xp.broadcast_to(values, (*lead, values.shape[-1])), (-1, values.shape[-1]))
    found = [xp.searchsorted(flat_rows[r, :], flat_values[r, :], side="right") for r in range(flat_rows.shape[0])]
    return xp.reshape(xp.astype(xp.stack(found), xp.int64), (*lead, values.shape[-1]))


def top_k(xp, values, k):
    """Positions ``(..., k)`` of the ``k`` largest entries of ``values (..., n)`` along the last axis, largest first,
    ties to the lowest position: what a stable sort of the whole row gives, in every array library and over a sharded
    sequence (whose shards send their :func:`top_k_candidates`).

    A partial selection instead of a full sort of ``n`` entries (65,536 of them took 7.8 ms to sort on one core): the
    library's top-:math:`k`, then a stable sort of those :math:`k`. Only where the :math:`k`-th largest value recurs
    outside them, which a host array shows at the cost of one comparison, or wherever the check would wait for a
    device, are the tied positions looked for (:func:`top_k_candidates`; 1.0 ms more at n = 65,536 on one core).
    ``values`` should hold no NaN (callers replace it): a NaN is ranked as the library ranks it (first by
    ``Tensor.topk``, last by numpy), and every position returned is one of the row's.
    """
    if k == 0:
        return xp.zeros((*values.shape[:-1], 0), dtype=xp.int64, device=array_api_compat.device(values))
    above = _library_top_k(xp, values, k)
    if above is None:
        return xp.argsort(values, axis=-1, descending=True, stable=True)[..., :k]
    above_value, above_at = above
    if host_view(values) is not None:
        # Where the k-th value does not recur outside the picks, they are the right set; unless two of them tie (their
        # order is then the library's), also in the right order.
        if not bool(xp.any(xp.sum(values >= above_value[..., -1:], axis=-1) > k)):
            if bool(xp.any(above_value[..., 1:] == above_value[..., :-1])):
                return stable_top_k(xp, above_value, above_at, k)
            return xp.astype(above_at, xp.int64)
    return stable_top_k(xp, *top_k_candidates(xp, values, k, above), k)


def _library_top_k(xp, values, k):
    """``(value, position)`` of the ``k`` largest entries, value descending, ties as the library breaks them
    (``Tensor.topk``, ``numpy.argpartition``), or ``None`` for a library without a partial selection."""
    n = values.shape[-1]
    if array_api_compat.is_torch_array(values):
        above = values.topk(k, dim=-1)
        return above.values, above.indices
    if array_api_compat.is_numpy_array(values):
        part = (np.argpartition(-values, k - 1, axis=-1)[..., :k] if k < n
                else np.broadcast_to(np.arange(n), values.shape))
        part_value = np.take_along_axis(values, part, axis=-1)
        order = np.argsort(-part_value, axis=-1, kind="stable")
        return np.take_along_axis(part_value, order, axis=-1), np.take_along_axis(part, order, axis=-1)
    return None


def top_k_candidates(xp, values, k, above=None):
    r"""``(value, position)``, each ``(..., 2k)``: entries among which the ``k`` largest of ``values (..., n)`` lie,
    ties included (torch and numpy arrays; ``above``, the library's top-:math:`k`, where the caller has it).

    With :math:`t` the :math:`k`-th largest value, the entries above :math:`t` (fewer than :math:`k`) and, apart,
    the :math:`k` lowest positions holding :math:`t`: ``Tensor.topk`` and ``numpy.argpartition`` break ties as they
    like, so the ones at :math:`t` are taken by position. The list is padded with value :math:`-\infty` at position
    :math:`n` (which a stable sort of the candidates puts after every entry of the row).
    """
    n = values.shape[-1]
    above_value, above_at = _library_top_k(xp, values, k) if above is None else above
    device = array_api_compat.device(values)
    threshold = above_value[..., -1:]
    nowhere = xp.full((), n, dtype=xp.int64, device=device)
    below = xp.full((), -math.inf, dtype=values.dtype, device=device)
    # Not <=, rather than >: a NaN among the library's picks (which torch ranks first) stays one of them.
    keep = ~(above_value <= threshold)
    tied_at = xp.where(values == threshold, xp.arange(n, dtype=xp.int64, device=device), nowhere)
    if array_api_compat.is_torch_array(tied_at):
        lowest = tied_at.topk(k, dim=-1, largest=False).values
    else:
        lowest = np.sort(np.partition(tied_at, k - 1, axis=-1)[..., :k] if k < n else tied_at, axis=-1)
    value = xp.concat([xp.where(keep, above_value, below),
                       xp.where(lowest < n, xp.broadcast_to(threshold, tuple(lowest.shape)), below)], axis=-1)
    position = xp.concat([xp.where(keep, xp.astype(above_at, xp.int64), nowhere), lowest], axis=-1)
    return value, position


def stable_top_k(xp, value, position, k):
    """The positions of the ``k`` largest of candidate ``value (..., c)`` at ``position (..., c)``, largest first, ties
    to the lowest position (a stable sort by position, then by value)."""
    order = xp.argsort(position, axis=-1, stable=True)
    value, position = take_along_axis(xp, value, order), take_along_axis(xp, position, order)
    # A NaN candidate is one the library ranked first (a sort would put it last, behind the padding at position n).
    value = xp.where(xp.isnan(value), xp.full((), math.inf, dtype=value.dtype, device=array_api_compat.device(value)),
                     value)
    order = xp.argsort(-value, axis=-1, stable=True)[..., :k]
    return take_along_axis(xp, position, order)
