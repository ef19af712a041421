"""The GPU path, proven on a CPU-only machine.

With ``check_values=False`` :func:`nystrom.approximate` runs only trusted computation (every check that reads the
data is skipped). Two claims about that path are tested here, without a GPU:

* under ``FakeTensorMode`` with fake CUDA inputs it runs for every strategy, masked or not and in every dtype:
  fake tensors have no values, so any data-dependent operation (``.item()``, ``bool(tensor)``, ``nonzero``, a copy
  to the host) raises. A dispatch mode records every tensor the path creates: all are on the input's device, except
  the seeded draws of the random strategies, which come from the host by design (one seed gives the same landmarks
  on every device) and are copied to the device, never read back;
* ``torch.compile(..., fullgraph=True)`` traces it into one graph (a graph break raises) and the compiled call gives
  the eager output.
"""

import contextlib
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nystrom

sys.path.insert(0, os.path.dirname(__file__))
from fake_cuda import Launches  # noqa: E402

STRATEGIES = sorted(nystrom.STRATEGIES)


class Placement(TorchDispatchMode):
    """Records every tensor an operator returns that is not on ``device``, with the operator."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.elsewhere = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An operator that takes a tensor on the device and returns one elsewhere reads the device back.
        read_back = any(isinstance(t, torch.Tensor) and t.device == self.device for t in tree_leaves((args, kwargs)))
        self.elsewhere += [(str(func), t.device, tuple(t.shape), t.dtype, read_back) for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor) and t.device != self.device]
        return out


def fake_call(strategy, dtype=torch.float32, masked=False, **kwargs):
    """``approximate`` on fake CUDA inputs ``(2, 4, 256, 32)``: the output and the tensors created off the device."""
    with FakeTensorMode():
        Q, K, V = (torch.empty(2, 4, 256, 32, device="cuda", dtype=dtype) for _ in range(3))
        mask = torch.ones(2, 1, 1, 256, dtype=torch.bool, device="cuda") if masked else None
        with Placement(Q.device) as placement:
            out = nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=8, attn_mask=mask, seed=0,
                                      check_values=False, **kwargs)
    return out, placement.elsewhere


# Half precision takes other paths (selection and the solve widen to float32), so one of them is in; float16 runs
# them as bfloat16 does, and the meta-tensor test of tests/test_approximation.py covers every dtype for data reads.
@pytest.mark.parametrize(("dtype", "masked"), [(torch.float32, False), (torch.float32, True),
                                               (torch.bfloat16, True)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_fake_cuda_and_stays_there(fake_cuda, strategy, dtype, masked):
    out, elsewhere = fake_call(strategy, dtype, masked)
    assert isinstance(out, FakeTensor)
    assert out.device == torch.device("cuda", 0) and out.shape == (2, 4, 256, 32) and out.dtype == dtype
    if strategy in nystrom.RANDOM_STRATEGIES:
        # Only tensors made from the seeded host draws: the draws, or the positions they select, turned into a tensor
        # by lift_fresh, cast, and staged in page-locked memory (empty + copy_) for a copy that does not wait for the
        # device. No scalar, and nothing read back from the device.
        staging = {"aten.lift_fresh.default", "aten._to_copy.default", "aten.empty.memory_format", "aten.copy_.default"}
        assert elsewhere and elsewhere[0][0] == "aten.lift_fresh.default", elsewhere
        assert {func for func, *_ in elsewhere} <= staging, elsewhere
        assert not any(read_back for *_, read_back in elsewhere), elsewhere
        assert all(shape for _, _, shape, _, _ in elsewhere), elsewhere
    else:
        assert elsewhere == []


@pytest.mark.parametrize("solver", sorted(nystrom.SOLVERS))
def test_every_solver_runs_on_fake_cuda(fake_cuda, solver):
    out, elsewhere = fake_call("norm", solver=solver)
    assert out.device == torch.device("cuda", 0) and out.shape == (2, 4, 256, 32)
    assert elsewhere == []


def launches_per_farthest_point(num_points, masked):
    from nystrom.linalg.landmarks.fps import farthest_points

    with FakeTensorMode():
        X = torch.empty(2, 4, 256, 32, device="cuda")
        mask = torch.ones(2, 4, 256, dtype=torch.bool, device="cuda") if masked else None
        with Launches() as launches:
            farthest_points(X, num_points, mask=mask)
    return launches.count


@pytest.mark.parametrize("masked", [False, True])
def test_a_farthest_point_step_launches_six_operators(fake_cuda, masked):
    # On an H200 eager selection cost about 10 us per operator whatever n was (docs/benchmarks.md, GPU): the
    # step count times the operators per step is the time. Six: argmax, gather of the point's coefficients, the
    # distance product, its clamp at zero, the running minimum, and the scatter that retires the point.
    per_step = (launches_per_farthest_point(25, masked) - launches_per_farthest_point(9, masked)) / 16
    assert per_step == 6, per_step


def test_host_draws_refuse_a_cuda_graph_capture(monkeypatch):
    # A replay would copy the capture's staging buffer again instead of drawing: the copy refuses while a capture
    # is under way (simulated: there is no CUDA device here), before it touches the device.
    from nystrom.torch.transfer import to_device

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        to_device(np.zeros(3), torch.float32, torch.device("cuda"))
    assert torch.equal(to_device(np.zeros(3), torch.float32, torch.device("cpu")), torch.zeros(3))


def test_device_farthest_points_broadcast_a_narrow_mask_as_the_host_does(fake_cuda):
    # A (1, n) mask over (3, n, D) points: the host loop broadcasts it; the device loop failed at its final stack.
    from nystrom.linalg.landmarks.fps import farthest_points

    with FakeTensorMode():
        picks = farthest_points(torch.empty(3, 40, 5, device="cuda"), 6,
                                mask=torch.ones(1, 40, dtype=torch.bool, device="cuda"))
    assert picks.shape == (3, 6) and picks.device == torch.device("cuda", 0)


def test_a_data_dependent_operation_would_fail(fake_cuda):
    # What makes the runs above a proof: the value checks read the data, and on fake tensors they cannot.
    with FakeTensorMode():
        Q = torch.empty(1, 2, 64, 8, device="cuda")
        # The finiteness check asks the host for one bool: aten._local_scalar_dense, which fake tensors refuse.
        with pytest.raises(DataDependentOutputException, match="_local_scalar_dense"):
            nystrom.approximate(Q, Q, Q, num_landmarks=8)


def small_inputs():
    """``(1, 2, 32, 8)`` float32 queries, keys and values, and a key mask with 8 padded keys: compile time grows with
    the traced operations, not with the shapes, so the shapes stay small."""
    generator = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(1, 2, 32, 8, generator=generator) for _ in range(3))
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool)
    mask[..., 24:] = False
    return Q, K, V, mask


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_every_strategy_compiles_into_one_graph():
    # fullgraph=True raises at the first graph break. One compiled function calls every strategy, masked, so Dynamo's
    # fixed cost is paid once; the eager backend runs the traced graph as it is (inductor's code generation would
    # add minutes on two cores and prove nothing more about graph breaks).
    def every_strategy(Q, K, V, mask):
        return [nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=4, attn_mask=mask, seed=0,
                                    check_values=False) for strategy in STRATEGIES]

    Q, K, V, mask = small_inputs()
    compiled = torch.compile(every_strategy, fullgraph=True, backend="eager")(Q, K, V, mask)
    # The graph runs the eager kernels; what differs is that selection's host fast paths (numpy, for tensors in host
    # memory) give way to the device paths, which choose the same landmarks. So the outputs agree to float32
    # rounding, float32's default tolerance.
    for strategy, out, eager in zip(STRATEGIES, compiled, every_strategy(Q, K, V, mask)):
        torch.testing.assert_close(out, eager, msg=lambda message, strategy=strategy: f"{strategy}: {message}")


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_every_solver_compiles_and_a_new_length_recompiles():
    # PInv traced the builtin callable() (a graph break under fullgraph), and RPCholesky's draw clipped to a length
    # that the second call's dynamic shapes make symbolic, which array-api-compat's clip cannot take.
    def every_solver(Q, K, V):
        return [nystrom.approximate(Q, K, V, strategy=strategy, num_landmarks=4, solver=solver, seed=0,
                                    check_values=False)
                for strategy, solver in (("uniform", "pinv"), ("rpcholesky", "newton_schulz"))]

    compiled = torch.compile(every_solver, fullgraph=True, backend="eager")
    generator = torch.Generator().manual_seed(1)
    for n in (32, 40):
        Q, K, V = (torch.randn(1, 2, n, 8, generator=generator) for _ in range(3))
        for out, eager in zip(compiled(Q, K, V), every_solver(Q, K, V)):
            # float32's default tolerance, as above (measured bitwise equal).
            torch.testing.assert_close(out, eager)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_a_mask_made_inside_a_dynamic_graph_passes_its_shape_check():
    # dynamic=True makes the inputs' sizes symbolic, and a mask built in the graph keeps plain ones: the shape checks'
    # `size in (1, target)` compared 4 with the symbolic 4 as unequal and refused a valid mask, compiled only (a
    # review). The same output as eager.
    Q, K, V, _ = small_inputs()

    def call(Q, K, V):
        mask = torch.ones(1, 1, 32, dtype=torch.bool).expand(2, 1, 32)  # plain sizes; the inputs' are symbolic
        return nystrom.approximate(Q[0], K[0], V[0], mask, num_landmarks=4, check_values=False)

    compiled = torch.compile(call, fullgraph=True, backend="eager", dynamic=True)
    # float32's default tolerance, as above (measured bitwise equal).
    torch.testing.assert_close(compiled(Q, K, V), call(Q, K, V))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiled_draws_are_drawn_on_every_call():
    # The random strategies' host draws are a custom operator in the graph, not constants baked in at trace time:
    # without a seed, two calls of one compiled function choose different landmarks.
    def landmarks(Q, K, V):
        return nystrom.approximate(Q, K, V, strategy="uniform", num_landmarks=4, check_values=False,
                                   return_info=True)[1].landmarks.indices

    Q, K, V, _ = small_inputs()
    compiled = torch.compile(landmarks, fullgraph=True, backend="eager")
    draws = [compiled(Q, K, V) for _ in range(4)]
    assert any(not torch.equal(draws[0], other) for other in draws[1:])


def test_host_draws_are_queued_copies_on_cuda_only(fake_cuda):
    # The queued copy (page-locked staging, non_blocking) is the entry for CUDA tensors; a CPU tensor keeps the plain
    # asarray, and the values arrive unchanged either way.
    from nystrom.linalg.landmarks.base import HOST_COPIES
    from nystrom.torch.transfer import QueuedCopy, to_device

    assert QueuedCopy in HOST_COPIES
    assert not QueuedCopy.handles(torch.zeros(1)) and not QueuedCopy.handles(np.zeros(1))
    values = np.random.default_rng(0).random((3, 5))
    assert torch.equal(to_device(values, torch.float64, torch.device("cpu")), torch.from_numpy(values))
    with FakeTensorMode():
        like = torch.empty(2, device="cuda")
        assert QueuedCopy.handles(like)
        out = QueuedCopy.copy(values, torch.float32, like)
        # Without a dtype the array's own is kept: positions stay integers (an H200 run caught them staged as
        # float32, which index_select refused).
        positions = QueuedCopy.copy(np.arange(4), None, like)
    assert out.device == torch.device("cuda", 0) and out.shape == (3, 5) and out.dtype == torch.float32
    assert positions.device == torch.device("cuda", 0) and positions.dtype == torch.int64


@pytest.mark.parametrize("strategy", sorted(nystrom.STRATEGIES))
def test_every_strategy_runs_on_fake_cpu_tensors_without_reading_them(strategy):
    # FakeTensorMode's default device is the CPU, where the host fast paths handed the fake tensor to numpy: norm failed
    # on a host read (DataDependentOutputException) and fps read whatever memory the pointer named, with torch's
    # deprecation warning (a review). Fake tensors take the array-API paths, as a compiler's trace does.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode():
            Q = torch.empty(2, 4, 256, 32)
            out = nystrom.approximate(Q, Q, Q, num_landmarks=8, check_values=False, strategy=strategy, seed=0)
    assert out.shape == (2, 4, 256, 32) and out.device.type == "cpu"


@pytest.mark.parametrize("fake", [False, True])
def test_the_exact_reference_runs_on_tensors_without_values_as_sdpa_does(fake):
    # SDPA gives meta and fake tensors their output's shape; the reference refused them ("pass check_values=False",
    # an option it does not take) and, before that, own_precision entered torch.autocast("meta", enabled=False):
    # "unsupported scalarType" from inside (two reviews). Only the shapes are checked.
    with FakeTensorMode() if fake else contextlib.nullcontext():
        Q = torch.empty(2, 4, 64, 16, device="cpu" if fake else "meta")
        V = torch.empty(2, 4, 48, 8, device=Q.device)
        K = V.new_empty(2, 4, 48, 16)
        # Key masks, and transformers' per-query (B, 1, n_q, n) masks, whose rows cannot be compared without values.
        for mask in (torch.ones(2, 1, 1, 48, dtype=torch.bool, device=Q.device),
                     torch.zeros(2, 1, 64, 48, device=Q.device), torch.ones(2, 4, 64, 48, dtype=torch.bool,
                                                                             device=Q.device)):
            out = nystrom.exact_attention(Q, K, V, mask)
            expected = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask)
            assert (out.shape, out.dtype, out.device) == (expected.shape, expected.dtype, expected.device)
        with pytest.raises(ValueError, match="same number of tokens"):
            nystrom.exact_attention(Q, Q, V)


def test_calls_that_read_values_refuse_meta_tensors_with_what_to_do_instead():
    # The message offered check_values=False to calls that do not take it (a review).
    Q = torch.empty(1, 2, 300, 8, device="meta")
    with pytest.raises(ValueError, match="meta device.*estimate computes exact rows") as refused:
        nystrom.estimate_relative_error(Q, Q, Q, Q)
    assert "check_values" not in str(refused.value)
    with pytest.raises(ValueError, match="^Q and K are on torch's meta device.*check_values=False"):
        nystrom.get_strategy("norm")(Q, Q, 8)
