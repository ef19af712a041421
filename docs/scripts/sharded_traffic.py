"""Bytes each process sends in one sequence-parallel ``approximate(..., group=...)`` call, measured on CPU processes.

``python docs/scripts/sharded_traffic.py [P ...]`` starts ``P`` gloo processes on 127.0.0.1 (default 2 and 4) and
prints, per strategy and sequence length, the payload each process passed into the collectives
(:func:`nystrom.torch.distributed.traffic`), collective by collective. The docs' page "Sequence parallelism"
shows its output.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nystrom
from nystrom.torch.distributed import traffic

SHAPE = (1, 4, None, 32)  # (B, H, n, d), float32
LENGTHS = (2048, 8192, 32768)
M = 32


def run(rank, world, port, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for strategy in ("norm", "kmeans", "segment_means", "uniform", "fps"):
        for n in LENGTHS:
            gen = torch.Generator().manual_seed(0)
            Q, K, V = (torch.randn(SHAPE[0], SHAPE[1], n, SHAPE[3], generator=gen) for _ in range(3))
            part = slice(rank * n // world, (rank + 1) * n // world)
            with traffic() as sent:
                nystrom.approximate(Q[..., part, :], K[..., part, :], V[..., part, :], strategy=strategy,
                                    num_landmarks=M, seed=0, group=dist.group.WORLD)
            rows.append((strategy, n, sent.bytes, sent.calls))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main(worlds):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for world in worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(run, args=(world, port, queue), nprocs=world, start_method="spawn")
        print(f"P = {world} processes, (B, H, d) = (1, 4, 32) float32, m = {M}: bytes sent by process 0")
        for strategy, n, total, calls in queue.get():
            detail = " + ".join(f"{op} {size}" for op, size in calls)
            print(f"  {strategy:13s} n = {n:6d}: {total:8d} bytes in {len(calls):2d} collectives ({detail})")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 4])
