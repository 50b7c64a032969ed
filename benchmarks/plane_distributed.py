"""Benchmark: a plane sharded over torch.distributed ranks vs one process, in one run.

    torchrun --nproc-per-node 2 benchmarks/plane_distributed.py            # gloo on CPUs
    torchrun --nproc-per-node 4 benchmarks/plane_distributed.py --device cuda --backend nccl

The problem is benchmarks/plane.py's: a 41×41 plane over an MNIST-1D MLP (40-100-100-10) on 1,000
training points, each rank on one CPU thread. Rank 0 times the plane alone (``group=None``: one
process, the other ranks wait at a barrier), then all ranks time the sharded plane
(``landscape.plane`` under torch.distributed); the two alternate, ``--repeats`` times each, and
rank 0 prints the best and median times, their ratio and the largest difference between the two
planes. ``--out FILE.npz`` saves both planes (the test suite compares them).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from landscape_lib import landscape

_spec = importlib.util.spec_from_file_location("plane_bench", Path(__file__).with_name("plane.py"))
plane_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plane_bench)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=41)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{rank % max(torch.cuda.device_count(), 1)}" if args.device == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    net, center, d1, d2, axis, x, y = plane_bench.problem(device, args.points)
    alone, sharded = [], []
    one = many = None
    for _ in range(args.repeats):
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            one = landscape.plane(net, center, d1, d2, axis, axis, x, y, group=None)
            plane_bench.sync(device)
            alone.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        many = landscape.plane(net, center, d1, d2, axis, axis, x, y)
        plane_bench.sync(device)
        dist.barrier()
        sharded.append(time.perf_counter() - t0)
    if rank == 0:
        diff = float(np.max(np.abs(many.loss - one.loss)))
        print(f"{args.points}×{args.points} plane, {len(x)} points, {world} rank(s) ({args.backend}), "
              f"torch threads per rank {torch.get_num_threads()}")
        print(f"one process: best {min(alone):.3f} s, median {statistics.median(alone):.3f} s")
        print(f"sharded    : best {min(sharded):.3f} s, median {statistics.median(sharded):.3f} s")
        print(f"speed-up (best/best) {min(alone) / min(sharded):.2f}×, (median/median) "
              f"{statistics.median(alone) / statistics.median(sharded):.2f}×; "
              f"max |difference| {diff:.1e}")
        if args.out:
            np.savez(args.out, one_loss=one.loss, one_acc=one.acc, many_loss=many.loss, many_acc=many.acc)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
