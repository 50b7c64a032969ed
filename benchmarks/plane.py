"""Benchmark: a 41×41 plane over an MNIST-1D MLP (40-100-100-10) on 1,000 training points.

Compares `landscape.plane` with a plain per-point `functional_call` loop (the FLOP-floor
reference on one CPU thread) and with the batched `vmap` strategy:

    python benchmarks/plane.py --mode library     # landscape.plane, strategy="auto"
    python benchmarks/plane.py --mode loop        # the plain reference loop below
    python benchmarks/plane.py --mode vmap        # landscape.plane, strategy="vmap"
    python benchmarks/plane.py --mode all         # all three in one process, with a check

Time whole processes with any benchmark harness (e.g. hyperfine), or read the in-process
timings printed by `--mode all`. `--device cuda` runs it on a GPU.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from landscape_lib import config, data, directions, landscape, models, params


def problem(device: str = "cpu", n: int = 41):
    setup = config.setup("cpu", 0, device, threads=1 if device == "cpu" else None)
    ds = data.load("mnist1d", device=setup.device)
    x, y = ds.train_subset(1000)
    net = models.MLP(40, (100, 100), 10).to(setup.device).eval()
    center = params.weights(net)
    g = torch.Generator().manual_seed(0)
    d1 = directions.random(center, generator=g)
    d2 = directions.random(center, generator=g)
    axis = landscape.grid(1.0, n)
    return net, center, d1, d2, axis, x, y


@torch.no_grad()
def reference_loop(net, center, d1, d2, axis, x, y) -> np.ndarray:
    """The plain loop: build θ(α, β) and call functional_call, one point at a time."""
    out = np.empty((len(axis), len(axis)))
    for j, b in enumerate(axis):
        for i, a in enumerate(axis):
            theta = {k: center[k] + a * d1[k] + b * d2[k] for k in center}
            out[j, i] = F.cross_entropy(functional_call(net, theta, (x,)), y).item()
    return out


def run(mode: str, net, center, d1, d2, axis, x, y):
    if mode == "loop":
        return reference_loop(net, center, d1, d2, axis, x, y)
    strategy = "auto" if mode == "library" else "vmap"
    return landscape.plane(net, center, d1, d2, axis, axis, x, y, strategy=strategy, chunk_size=64).loss


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="all", choices=["library", "loop", "vmap", "all"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    prob = problem(args.device)
    modes = ["loop", "library", "vmap"] if args.mode == "all" else [args.mode]
    results, times = {}, {}
    for mode in modes:
        best = float("inf")
        for _ in range(args.repeats):
            sync(args.device)
            t0 = time.perf_counter()
            results[mode] = run(mode, *prob)
            sync(args.device)
            best = min(best, time.perf_counter() - t0)
        times[mode] = best
        print(f"{mode:8s} best of {args.repeats}: {best:.3f} s")
    if args.mode == "all":
        ref = results["loop"]
        for mode in ("library", "vmap"):
            rel = np.max(np.abs(results[mode] - ref) / np.abs(ref))
            print(f"{mode:8s} / loop = {times[mode] / times['loop']:.2f}×, max relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
