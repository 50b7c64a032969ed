"""Benchmark: the cost of sparse training steps of ``landscape_lib.sparse`` against a dense step.

Chapter 12's network: MLP 40→512→512→10 with BatchNorm (≈ 288k weights, all three Linear
layers masked), batch 128, SGD with Nesterov momentum 0.9 and weight decay 5e-4, one CPU thread.
Contenders, timed in this one process, interleaved round by round:

* ``dense`` — forward, backward, ``SGD.step`` (the plain step of ``train.closure_step``);
* ``sparse`` — :meth:`SparseMasker.step` at 95 % sparsity (ERK) on a normal step: the same
  forward/backward plus masked gradients before and masked weights after the optimizer step;
* ``rigl update`` — the mask-update step of RigL: forward/backward, then drop by magnitude and
  grow by the dense gradient in every layer, with the momentum reset (no weight update, as in
  the official code);
* ``set update`` — the same with random growth.

Masks are dense tensors, so the sparse step does the dense step's FLOPs plus two element-wise
products per layer; the targets are sparse ≤ 1.3× dense and RigL update ≤ 3× dense.

    python benchmarks/sparse_step.py [--rounds 20] [--inner 20]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from landscape_lib import models, sparse, train


def make(seed=0):
    torch.manual_seed(seed)
    model = models.MLP(40, (512, 512), 10, norm="batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    return model, opt


def ctx_for(model, opt, x, y, step):
    return train.StepContext(model, opt, F.cross_entropy, train.Batch(x, y, torch.arange(len(x))),
                             1, step, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--sparsity", type=float, default=0.95)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)

    dense_model, dense_opt = make()
    sp_model, sp_opt = make()
    masker = sparse.SparseMasker(sp_model, 1 - args.sparsity, generator=torch.Generator().manual_seed(1))
    up_model, up_opt = make()
    rigl = sparse.SparseMasker(up_model, 1 - args.sparsity, grow="gradient",
                               schedule=sparse.DropSchedule(alpha=0.3, delta_t=1, t_end=10**9),
                               generator=torch.Generator().manual_seed(2))
    set_model, set_opt = make()
    set_ = sparse.SparseMasker(set_model, 1 - args.sparsity, grow="random",
                               schedule=sparse.DropSchedule(alpha=0.3, delta_t=1, t_end=10**9),
                               generator=torch.Generator().manual_seed(3))

    def dense():
        ctx = ctx_for(dense_model, dense_opt, x, y, 1)
        train.closure_step(ctx)

    def sparse_step():
        masker.step(ctx_for(sp_model, sp_opt, x, y, 1))

    counter = [0]

    def rigl_update():  # every step is an update step (ΔT = 1)
        counter[0] += 1
        rigl.step(ctx_for(up_model, up_opt, x, y, counter[0]))

    def set_update():
        set_.step(ctx_for(set_model, set_opt, x, y, counter[0] or 1))

    contenders = {"dense": dense, "sparse": sparse_step, "rigl update": rigl_update,
                  "set update": set_update}
    for fn in contenders.values():  # warm-up
        for _ in range(5):
            fn()
    times = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn()
            times[name].append((time.perf_counter() - t0) / args.inner)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"MLP 40-512-512-10 (BN), batch 128, {args.sparsity:.0%} sparse (ERK), 1 thread; "
          f"median of {args.rounds} rounds x {args.inner} steps")
    for k, v in med.items():
        print(f"  {k:12s} {v * 1e3:7.3f} ms   {v / med['dense']:.2f}x dense")
    print(f"sparse/dense = {med['sparse'] / med['dense']:.2f} (target <= 1.3); "
          f"rigl update/dense = {med['rigl update'] / med['dense']:.2f} (target <= 3)")
    return med


if __name__ == "__main__":
    main()
