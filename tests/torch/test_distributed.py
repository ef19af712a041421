"""Sequence-parallel Nyström attention (``approximate(..., group=...)``) on 2 and 4 gloo processes on 127.0.0.1.

Each world size is one process group, started once for the module: its processes fork from a ``forkserver`` that
has imported torch and nystrom once, run every case of ``distributed_worker.CASES`` (ragged shards, one of a
single token, shards that are all padding, every mask convention, each strategy that selects over shards) and the
bad calls, and pickle their shards. The tests then compare the concatenated shards with the single-process call
on the whole sequence. A process group that does not finish within its timeout is killed and the tests fail.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nystrom

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

WORLDS = (2, 4)
TIMEOUT = 120

# The sharded call chooses the landmarks the whole sequence gets and computes the same products; only sums over
# the shards (the probes' softmax, the clusters' sums, the split-key merge of B V) are added in another order. In
# float64 that moves the output by a few units of 1e-16, times the solver's amplification (measured: at most 2e-15
# with 6 Newton-Schulz steps, 3e-14 with the exact pseudo-inverse of an ill-conditioned A), so 1e-12 leaves a margin
# of 30 or more. In float32 the same reordering is worth a few units of 1e-7 (measured: at most 7.5e-7 in the
# Frobenius norm used here, 1.4e-6 in max-abs), so 1e-6 bounds the reordering, not an approximation error.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world, tmp_path):
    """Start ``world`` processes, wait for all of them (killing them after TIMEOUT s) and load their results."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "nystrom", "nystrom.torch.distributed",
                                    "distributed_worker"])
    port = free_port()
    outs = [str(tmp_path / f"rank{rank}.pkl") for rank in range(world)]
    procs = [context.Process(target=worker.worker, args=(rank, world, port, outs[rank])) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"{len(hung)} of {world} processes did not finish within {TIMEOUT} s")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"process exit codes {codes}"
    results = []
    for out in outs:
        with open(out, "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return {world: run_group(world, tmp_path_factory.mktemp(f"world{world}")) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_sharded_equals_single_process(groups, world, name):
    spec = worker.CASES[name]
    shards = []
    for rank, result in enumerate(groups[world]):
        got = result[name]
        if isinstance(got, tuple):
            pytest.fail(f"process {rank} raised:\n{got[1]}")
        part = worker.case_part(spec, world, rank)
        assert got.shape[-2] == part.stop - part.start and got.dtype == spec["dtype"]
        shards.append(got)
    Q, K, V, mask, options = worker.case_inputs(spec)
    ref = nystrom.approximate(Q, K, V, attn_mask=mask, **options)
    out = torch.cat(shards, dim=-2)
    error = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
    assert error <= TOLERANCE[spec["dtype"]], error


ERRORS = {
    "error_d_differs": "agree on the feature size d",
    "error_nan_on_one_process": "NaN",
    "error_strategy": "those that can: 'fps', 'kmeans', 'norm', 'segment_means', 'uniform'",
    "error_too_many_landmarks": "at most the number of keys n=96",
    "error_every_key_masked": "masks every key",
    "error_tol": "tol cannot be used with group=",
    "error_m_differs": "agree on num_landmarks, got [8, 9",
    "error_cross_attention": "self-attention",
    "error_requires_grad": "forward pass only",
    "error_features_on_one_process": "features cannot be used with group=",
    "error_solver_differs": "agree on solver, got",
    "error_tol_zero": "tol cannot be used with group=",
    "error_group_type": "group must be a torch.distributed ProcessGroup",
    "error_empty_shard": "every process's shard needs at least one token",
    "error_gqa_on_one_process": "enable_gqa must be a bool",
    "error_gqa_heads_differ": "agree on kv_heads",
    "error_numpy_on_one_process": "must be a torch tensor with group=",
    "error_mask_on_one_process": "attn_mask must be given on every process of the group or on none, got it on process",
}
KINDS = {"error_group_type": "TypeError"}
# Errors of one process's own arguments: that process raises this kind, the others a ValueError that names it.
OWN_KINDS = {"error_gqa_on_one_process": (1, "TypeError"), "error_numpy_on_one_process": (1, "TypeError"),
             "error_nan_on_one_process": (1, "NonFiniteError")}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_calls_raise_on_every_process(groups, world, name):
    # Every process raises (none is left waiting in a collective: the group went on to the next call).
    for rank, result in enumerate(groups[world]):
        assert result[name] is not None, f"process {rank} did not raise"
        kind, message = result[name]
        owner, own_kind = OWN_KINDS.get(name, (None, None))
        expected = own_kind if rank == owner else KINDS.get(name, "ValueError")
        assert kind == expected and ERRORS[name] in message, (rank, kind, message)
    # The process whose own arguments were wrong says so; the others name it.
    if name == "error_nan_on_one_process":
        assert "Q contains NaN" in groups[world][1][name][1]
        assert "process 1 of the group" in groups[world][0][name][1]


def test_a_subgroup_names_a_process_by_its_global_rank_too(groups):
    # A review: in a group of global ranks 1-3, a NaN on global rank 2 was reported to rank 1 as "process 1 of the
    # group", which read as rank 1 itself.
    results = groups[4]
    assert results[0]["subgroup"] is None and results[2]["subgroup"][0] == "NonFiniteError"
    for rank in (1, 3):
        assert "process 1 of the group (global rank 2) rejected its arguments" in results[rank]["subgroup"][1]
    # In the world's group the ranks agree, and the message gives one; the last process held the mask.
    assert "process 1 of the group rejected" in results[0]["error_nan_on_one_process"][1]
    assert results[0]["error_mask_on_one_process"][1].endswith("got it on process 3 of the group of 4")


@pytest.mark.parametrize("world", WORLDS)
def test_a_process_outside_the_group_is_told_so(groups, world):
    # new_group hands the processes outside it an int placeholder: the message said "got int".
    *members, outside = groups[world]
    assert all(result["non_member"] is None for result in members)
    kind, message = outside["non_member"]
    assert kind == "ValueError" and f"this process (rank {world - 1}) is not a member of the group" in message


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_sent_do_not_grow_with_n(groups, world):
    for result in groups[world]:
        sent = result["traffic"]
        assert sent[2048][:2] == sent[4096][:2], sent
        size, calls, settings = sent[2048]
        # The k-means sample dominates: 1024 rows of 32 float32 features are 131,072 bytes.
        assert 131_072 < size < 250_000 and calls < 20, sent
        # One small settings check per call.
        assert len(settings) == 1 and settings[0] < 1000, sent


@pytest.mark.parametrize("world", WORLDS)
def test_top_k_breaks_ties_by_the_lowest_position_as_one_process_does(groups, world):
    # Tensor.topk breaks ties as it likes; the whole sequence's guaranteed order (FPS) is a stable sort, so the
    # shards must agree with it on ties, across shards too.
    expected = {k: torch.argsort(-worker.TIED_VALUES, dim=-1, stable=True)[..., :k] for k in worker.TIED_K}
    for result in groups[world]:
        got = result["top_k_ties"]
        for k in worker.TIED_K:
            assert torch.equal(got[k], expected[k]), (k, got[k], expected[k])


def test_group_needs_an_initialised_process_group():
    Q = torch.randn(1, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        nystrom.approximate(Q, Q, Q, num_landmarks=2, group=object())


def test_group_refuses_arrays_that_are_not_torch_tensors():
    # A review: numpy inputs reached the torch path, a RuntimeError about the process group (a ModuleNotFoundError
    # without torch installed) instead of what was wrong.
    Q = np.zeros((1, 8, 4))
    with pytest.raises(TypeError, match="Q must be a torch tensor with group=, got ndarray"):
        nystrom.approximate(Q, Q, Q, num_landmarks=2, group=object())


def test_group_without_torch_installed_names_the_inputs():
    # A fresh interpreter where importing torch fails, as where it is not installed.
    script = textwrap.dedent("""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] == "torch":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoTorch())
        import numpy as np, nystrom
        Q = np.zeros((1, 8, 4))
        try:
            nystrom.approximate(Q, Q, Q, num_landmarks=2, group=object())
        except TypeError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "Q, K and V must be torch tensors, got numpy.ndarray (and torch is not installed)" in result.stdout, result


def test_a_users_sharded_strategy_subclass_is_checked_with_group_as_without(tmp_path):
    # A review: a sharded TokenStrategy subclass returning m - 1 landmarks was refused by one process's approximate and
    # accepted with group=, whose selection did not go through run_strategy. A one-process gloo group of its own, in
    # a fresh interpreter, so that no process group outlives the test.
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist, nystrom
        from nystrom.linalg.landmarks import TokenStrategy
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://{tmp_path / 'store'}")

        class TooFew(TokenStrategy, sharded=True):
            def pick(self, selection, X, mask):
                m = selection.num_landmarks - 1
                return torch.arange(m).expand(*X.shape[:-2], m)

        X = torch.randn(2, 12, 4, dtype=torch.float64)
        for group in (None, dist.group.WORLD):
            try:
                nystrom.approximate(X, X, X, num_landmarks=3, strategy=TooFew(), group=group)
                print("accepted")
            except ValueError as error:
                print(str(error)[:57])
        dist.destroy_process_group()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["landmark queries have shape (2, 2, 4), expected (2, 3, 4)"] * 2, result
