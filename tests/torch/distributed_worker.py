"""One process of the sequence-parallel tests (``tests/torch/test_distributed.py`` starts ``world`` of them).

:func:`worker` (or ``python tests/torch/distributed_worker.py RANK WORLD PORT OUT``) joins a gloo group on
127.0.0.1, runs every case of :data:`CASES` on its shard of the token axis and pickles ``{case: result}`` to
``OUT``: its shard of the output (the test compares the shards with the single-process call on the whole
sequence), the errors the bad calls raised (type and message), and the bytes it sent.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import sys
import traceback

import array_api_compat
import numpy as np
import torch
import torch.distributed as dist

import nystrom
from nystrom.linalg.landmarks.base import ClusterStrategy
from nystrom.torch.distributed import traffic


def split(n, world, rank, sizes=None):
    """Shard ``rank``'s slice of ``n`` tokens: ragged ``sizes`` when given (per world size), else equal parts."""
    if sizes is None:
        sizes = [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def inputs(shape, dtype, seed=0, sink=False, distinct=None):
    rng = np.random.default_rng(seed)
    Q, K, V = (torch.as_tensor(rng.standard_normal(shape), dtype=dtype) for _ in range(3))
    if distinct is not None:
        # ``distinct`` tokens repeated over the sequence, fewer than the landmarks: k-means seeds repeat one another.
        Q = Q[..., :distinct, :].repeat(*(1,) * (Q.ndim - 2), -(-shape[-2] // distinct), 1)[..., :shape[-2], :]
        K = Q.flip(-2)
    if sink is True:
        # A strong sink at position 5 (every query's key product with it is large), so Norm keeps a singleton.
        K[..., 5, :] = 4 * Q.mean(dim=-2)
    elif sink:
        # Identical sinks at the positions given, more than Norm's singleton budget and each strong enough to pass its
        # test (queries leaning towards one direction, the sinks' keys far along it: 5 sinks of 0.17 of the attention
        # each at n = 96, m = 16): which of them are singletons is a tie, broken by position on every shard layout.
        direction = Q.mean(dim=-2, keepdim=True)
        direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True)
        Q += 1.5 * direction
        K[..., sink, :] = 14 * direction
    return Q, K, V


def padding(B, n, lengths, kind):
    """Key masks for real lengths ``lengths`` (one per batch element) in SDPA's or transformers' convention."""
    real = torch.arange(n)[None, :] < torch.as_tensor(lengths)[:, None]
    if kind == "bool":
        return real[:, None, None, :]
    if kind == "int":
        return real.to(torch.int64)
    bias = torch.zeros(real.shape, dtype=torch.float64).masked_fill(~real, torch.finfo(torch.float64).min)
    return bias[:, None, None, :]


def shard_mask(mask, part):
    return None if mask is None else mask[..., part]


# Ragged shard sizes per world size (rank order), including a shard of one token.
RAGGED_96 = {2: [37, 59], 4: [10, 41, 1, 44]}
RAGGED_1200 = {2: [700, 500], 4: [1, 600, 299, 300]}


class PlainSegments(ClusterStrategy, sharded=True):
    """A strategy object that is no dataclass: its repr holds its address, which differs on every process."""

    def assign(self, selection, queries):
        return nystrom.SegmentMeans().assign(selection, queries)


def case(strategy="norm", shape=(2, 3, 96, 16), dtype=torch.float64, m=16, mask=None, sizes=RAGGED_96, sink=True,
         distinct=None, **kwargs):
    return {"strategy": strategy, "shape": shape, "dtype": dtype, "m": m, "mask": mask, "sizes": sizes, "sink": sink,
            "distinct": distinct, "kwargs": kwargs}


CASES = {
    "norm_f64": case(),
    "norm_f64_bool_mask": case(mask=("bool", [70, 96])),
    "norm_f64_int_mask": case(mask=("int", [96, 50])),
    # Shards of 2 tokens in a batch of 2: a (2, 2) shard of transformers' (batch, n) mask is not SDPA's (n_q, n).
    "norm_f64_int_mask_shards_of_batch": case(mask=("int", [96, 50]), sizes={2: [2, 94], 4: [2, 40, 2, 52]}),
    "norm_f64_float_mask": case(mask=("float", [33, 90])),
    "norm_f64_equal_shards": case(sizes=None),
    "norm_f64_tied_sinks": case(sink=(5, 20, 40, 70, 90)),
    "norm_f64_per_head": case(share_landmarks_across_heads=False),
    "norm_f64_sampled": case(shape=(1, 2, 1200, 8), mask=("bool", [1100]), sizes=RAGGED_1200),
    "norm_f64_query_chunks": case(query_chunk_size=7, solver="pinv"),
    "norm_f32": case(dtype=torch.float32, mask=("bool", [70, 96])),
    "norm_f32_sampled": case(dtype=torch.float32, shape=(1, 2, 1200, 8), sizes=RAGGED_1200),
    "kmeans_f64": case("kmeans", mask=("bool", [70, 96])),
    "kmeans_f64_sampled": case("kmeans", shape=(1, 2, 1200, 8), mask=("int", [1100]), sizes=RAGGED_1200),
    "kmeans_f32": case("kmeans", dtype=torch.float32),
    "uniform_f64": case("uniform", mask=("bool", [70, 96]), seed=3),
    "segment_means_f64": case("segment_means", mask=("int", [70, 96])),
    "fps_f64": case("fps", mask=("bool", [70, 96])),
    "fps_f64_authors": case(nystrom.FPS(first=0, from_guaranteed=False, use_queries=True)),
    "fps_f32_per_head": case("fps", dtype=torch.float32, share_landmarks_across_heads=False),
    "segment_means_f32": case("segment_means", dtype=torch.float32),
    "plain_strategy_object_f64": case(PlainSegments(), mask=("bool", [70, 96])),
    "uniform_f32": case("uniform", dtype=torch.float32, seed=4),
    # Every real key a landmark: exact attention, as one process answers (the Nyström formula was 0.15 off, a review).
    "norm_f64_every_real_key": case(mask=("bool", [40, 40]), m=40),
    # 12 distinct tokens for 16 landmarks: repeated seeds tied for the same tokens, and the product's rounding, which
    # differs between a shard's rows and the whole sequence's, broke the tie (1.5e-3 off one process, a review).
    "norm_f64_repeated_tokens": case(shape=(1, 2, 96, 8), sink=False, distinct=12),
    "kmeans_f64_repeated_tokens": case("kmeans", shape=(1, 2, 96, 8), sink=False, distinct=12),
    "kmeans_f32_repeated_tokens": case("kmeans", shape=(1, 2, 96, 8), dtype=torch.float32, sink=False, distinct=12),
}


def case_inputs(spec):
    """The whole sequence of a case: ``Q, K, V, attn_mask`` and the options of ``approximate``."""
    Q, K, V = inputs(spec["shape"], spec["dtype"], sink=spec["sink"], distinct=spec["distinct"])
    B, n = spec["shape"][0], spec["shape"][-2]
    mask = None if spec["mask"] is None else padding(B, n, spec["mask"][1], spec["mask"][0])
    if mask is not None and mask.dtype.is_floating_point:
        mask = mask.to(spec["dtype"])
    return Q, K, V, mask, {"strategy": spec["strategy"], "num_landmarks": spec["m"], **spec["kwargs"]}


def case_part(spec, world, rank):
    return split(spec["shape"][-2], world, rank, spec["sizes"] and spec["sizes"][world])


def run_case(spec, rank, world):
    """This process's shard of the sharded call's output."""
    Q, K, V, mask, options = case_inputs(spec)
    part = case_part(spec, world, rank)
    return nystrom.approximate(Q[..., part, :], K[..., part, :], V[..., part, :], attn_mask=shard_mask(mask, part),
                               group=dist.group.WORLD, **options)


def error_of(call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        return (type(exc).__name__, str(exc))
    return None


def error_cases(rank, world):
    """Calls that must raise on every process at once (the test fails on a hang by its timeout)."""
    Q, K, V = inputs((2, 3, 96, 16), torch.float64)
    part = split(96, world, rank)
    q, k, v = Q[..., part, :], K[..., part, :], V[..., part, :]
    group = dist.group.WORLD
    bad_d = (q[..., :8], k[..., :8], v) if rank == world - 1 else (q, k, v)
    nan_q = q.clone()
    if rank == 1:
        nan_q[0, 0, 0, 0] = float("nan")
    all_padding = torch.zeros(2, 1, 1, k.shape[-2], dtype=torch.bool)
    grad_q = q.clone().requires_grad_(rank == 0)
    return {
        "error_d_differs": error_of(lambda: nystrom.approximate(*bad_d, group=group)),
        "error_nan_on_one_process": error_of(lambda: nystrom.approximate(nan_q, k, v, group=group)),
        "error_strategy": error_of(lambda: nystrom.approximate(q, k, v, strategy="rpcholesky", group=group)),
        "error_too_many_landmarks": error_of(lambda: nystrom.approximate(q, k, v, num_landmarks=97, group=group)),
        "error_every_key_masked": error_of(lambda: nystrom.approximate(q, k, v, attn_mask=all_padding, group=group)),
        "error_tol": error_of(lambda: nystrom.approximate(q, k, v, tol=0.1, group=group)),
        "error_m_differs": error_of(lambda: nystrom.approximate(q, k, v, num_landmarks=8 + rank, group=group)),
        "error_cross_attention": error_of(lambda: nystrom.approximate(q[..., :1, :], k, v, group=group)),
        "error_requires_grad": error_of(lambda: nystrom.approximate(grad_q, k, v, group=group)),
        # A features tensor on one process once raised a RuntimeError outside the shared check (the others waited),
        # a solver that differed went unnoticed (each process's rows used its own), and tol=0 was ignored.
        "error_features_on_one_process": error_of(lambda: nystrom.approximate(
            q, k, v, group=group, features=torch.ones(2, k.shape[-2], 16, dtype=k.dtype) if rank == 1 else None)),
        "error_solver_differs": error_of(lambda: nystrom.approximate(
            q, k, v, group=group, solver="pinv" if rank == 0 else "newton_schulz")),
        "error_tol_zero": error_of(lambda: nystrom.approximate(q, k, v, tol=0, group=group)),
        "error_group_type": error_of(lambda: nystrom.approximate(q, k, v, group=True)),
        # More processes than tokens leave a shard empty: named as such (it once read "Q must have at least one token").
        "error_empty_shard": error_of(lambda: nystrom.approximate(
            *((x[..., :0, :] if rank == 1 else x) for x in (q, k, v)), group=group)),
        # enable_gqa was checked outside the shared report: a bad one on process 1 left the others waiting.
        "error_gqa_on_one_process": error_of(lambda: nystrom.approximate(
            q, k[:, :1], v[:, :1], group=group, enable_gqa=1 if rank == 1 else True)),
        # Three query heads over three key/value heads on one process, over one repeated three times on the others:
        # the same shapes after the repetition, different inputs.
        # A numpy Q on one process raised before the shared check: the others waited until the backend's timeout.
        "error_numpy_on_one_process": error_of(lambda: nystrom.approximate(
            q.numpy() if rank == 1 else q, k, v, group=group)),
        "error_gqa_heads_differ": error_of(lambda: nystrom.approximate(
            q, *((x if rank == 1 else x[:, :1]) for x in (k, v)), group=group, enable_gqa=True)),
        # A mask on the last process alone: the message named none of them.
        "error_mask_on_one_process": error_of(lambda: nystrom.approximate(
            q, k, v, group=group, attn_mask=torch.ones(2, k.shape[-2], dtype=torch.int64) if rank == world - 1
            else None)),
    }


def subgroup_case(rank, world):
    """A NaN on global rank 2 in the group of every rank but 0, where it is rank 1: what the other members raise
    (``None`` outside the group, and where the world is too small for it)."""
    others = dist.new_group(list(range(1, world)))  # a collective of every process
    if rank == 0 or world < 4:
        return None
    Q = inputs((1, 1, 8, 4), torch.float64)[0]
    if rank == 2:
        Q[0, 0, 0, 0] = float("nan")
    return error_of(lambda: nystrom.approximate(Q, Q, Q, num_landmarks=2, group=others))


def non_member_case(rank, world):
    """The last process calls with a group of the others, which hands it a placeholder: its error (the members do not
    call)."""
    others = dist.new_group(list(range(world - 1)))  # a collective of every process
    if rank != world - 1:
        return None
    Q = inputs((1, 1, 8, 4), torch.float64)[0]
    return error_of(lambda: nystrom.approximate(Q, Q, Q, num_landmarks=2, group=others))


def traffic_cases(rank, world):
    """Bytes this process sends for the default call at two sequence lengths past the k-means sample."""
    sent = {}
    for n in (2048, 4096):
        Q, K, V = inputs((1, 4, n, 32), torch.float32)
        part = split(n, world, rank)
        with traffic() as record:
            nystrom.approximate(Q[..., part, :], K[..., part, :], V[..., part, :], num_landmarks=32,
                                group=dist.group.WORLD)
        # The settings check pickles a few hundred bytes whose length varies with the values (the seed drawn).
        tensors = [size for op, size in record.calls if op != "all_gather_object"]
        settings = [size for op, size in record.calls if op == "all_gather_object"]
        sent[n] = (sum(tensors), len(tensors), settings)
    return sent


# Values with ties inside and across shards (0 and 1 repeat; -inf stands for ineligible tokens) and the k asked for.
TIED_VALUES = torch.tensor([[0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 1.0, -math.inf, 0.0, 1.0, 2.0, 0.0],
                            [-math.inf, 0.0, 0.0, 0.0, 0.0, 0.0, -math.inf, 0.0, 0.0, 0.0, 0.0, 0.0]])
TIED_K = (1, 2, 3, 4, 5, 12)


def top_k_cases(rank, world):
    """``ShardedSequence.top_k`` of :data:`TIED_VALUES` on this process's shard for each k of :data:`TIED_K`."""
    from nystrom.torch.distributed import ShardedSequence

    n = TIED_VALUES.shape[-1]
    axis = ShardedSequence(dist.group.WORLD, [split(n, world, r).stop - split(n, world, r).start
                                              for r in range(world)])
    xp = array_api_compat.array_namespace(TIED_VALUES)
    return {k: axis.top_k(xp, TIED_VALUES[..., split(n, world, rank)], k) for k in TIED_K}


def worker(rank, world, port, out):
    """Join the gloo group on 127.0.0.1:``port`` and pickle ``{case: shard of the output, or the error}`` to ``out``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, spec in CASES.items():
            try:
                results[name] = run_case(spec, rank, world)
            except Exception:  # noqa: BLE001 - reported to the test, which shows the traceback
                results[name] = ("crash", traceback.format_exc())
        results.update(error_cases(rank, world))
        results["non_member"] = non_member_case(rank, world)
        results["subgroup"] = subgroup_case(rank, world)
        results["traffic"] = traffic_cases(rank, world)
        results["top_k_ties"] = top_k_cases(rank, world)
    finally:
        with open(out + ".part", "wb") as f:
            pickle.dump(results, f)
        os.replace(out + ".part", out)
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
