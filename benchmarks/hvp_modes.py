"""Benchmark: the cost of one Hessian-vector product in each ``HVPOperator`` mode.

The MNIST-1D MLP 40-100-100-10 (15,210 parameters, as in ``top_eigenvalue.py``, untrained:
the cost of a product does not depend on the weights) on 1,000 training points, one thread.
Modes are interleaved, ``REPEATS`` rounds of ``PER_ROUND`` products each; best and median
per product are printed, with the load average before and after (the numbers are only as quiet
as the machine). Also timed: each mode's bare product function (no chunk loop, no float64
conversion of ``mv``), outside and inside ``curvature.second_order_kernels``, to show what the
operator's bookkeeping and the composite-kernel context cost.

    python benchmarks/hvp_modes.py
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from landscape_lib import curvature, data, models
from landscape_lib import params as P

REPEATS, PER_ROUND = 7, 20


def _in_kernels(f, loss, w, tangent):
    with curvature.second_order_kernels():
        return f(loss, w, tangent, {})


def main() -> None:
    torch.set_num_threads(1)
    ds = data.load("mnist1d")
    x, y = ds.train_subset(1000, seed=0)
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(40,), n_classes=10, hidden=(100, 100))
    ops = {m: curvature.HVPOperator(model, x, y, mode=m) for m in curvature.HVP_MODES}
    v = torch.randn(ops["auto"].n, generator=torch.Generator().manual_seed(0))
    ref = ops["forward-over-reverse"].mv(v)
    for m, op in ops.items():  # warm up, and check that every mode computes the same product
        err = float((op.mv(v) - ref).norm() / ref.norm())
        print(f"{m:22s} runs as {op.mode:22s} relative difference {err:.1e}")

    # the products without the composite-kernel context, straight through the mode functions
    w = dict(P.weights(model))
    tangent = dict(P.from_vector(v, w))
    loss = ops["auto"]._chunk_loss(x, y)
    bare = {}
    for m, f in curvature._PRODUCTS.items():
        bare[f"{m}, bare product"] = lambda f=f: f(loss, w, tangent, {})
        bare[f"{m}, bare, in second_order_kernels"] = lambda f=f: _in_kernels(f, loss, w, tangent)
    cases = {**{m: (lambda op=op: op.mv(v)) for m, op in ops.items()}, **bare}

    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    load = os.getloadavg()[0]
    for _ in range(REPEATS):
        for k, f in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(PER_ROUND):
                f()
            wall[k].append((time.perf_counter() - t0) / PER_ROUND)
            cpu[k].append((time.process_time() - c0) / PER_ROUND)
    print(f"\nper product, {REPEATS}×{PER_ROUND} interleaved, one thread; load average "
          f"{load:.1f} before, {os.getloadavg()[0]:.1f} after (process CPU time is less "
          "disturbed by other load than wall time)")
    for k in cases:
        print(f"  {k:52s} wall best {min(wall[k]) * 1e3:6.2f} ms, median "
              f"{statistics.median(wall[k]) * 1e3:6.2f} ms; CPU best {min(cpu[k]) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
