"""Benchmark: the cost of one SAM, SAM-ON, ASAM-ON and Entropy-SGD step relative to one SGD step.

The model is chapter 11's: an MLP 40→256→256→10 with BatchNorm1d after each hidden layer (78,858
parameters, 1,024 of them BatchNorm affine), SGD with momentum 0.9 and weight decay 5e-4, batches
of 128 MNIST-1D signals, one CPU thread. Contenders, all timed in this one process, interleaved
round by round (every round times each contender once, so a change of machine load hits all):

* ``sgd`` — one plain step: zero_grad, forward, backward, ``SGD.step`` (through a closure);
* ``sam-all`` / ``sam-on`` / ``asam-on`` — one :class:`landscape_lib.optim.SAM` step (two
  forward-backward passes, the ascent, the restore and the base step), ``perturb="all"`` /
  ``"norm"`` / ``"norm"`` with ``adaptive=True``; BatchNorm statistics frozen in the second pass;
* ``entropy-sgd L=5`` — one :class:`landscape_lib.optim.EntropySGD` outer step with L = 5 inner
  SGLD steps, each on a fresh batch (L gradient evaluations), so its floor is 5×.

    python benchmarks/sam_step.py [--rounds 20] [--inner 10]

Prints the median time per step of each and its ratio to SGD. Targets (issue 9): SAM ≤ 2.3× SGD
and SAM-ON ≤ 2.3× (two gradient evaluations are the floor of 2×).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from landscape_lib import data, models
from landscape_lib.optim import SAM, EntropySGD

BATCH, LR, MOMENTUM, WD = 128, 0.05, 0.9, 5e-4


def make(kind: str, ds):
    torch.manual_seed(0)
    model = models.MLP(40, (256, 256), 10, norm="batch")
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **kw)
    elif kind == "sam-all":
        opt = SAM(model, torch.optim.SGD, rho=0.1, **kw)
    elif kind == "sam-on":
        opt = SAM(model, torch.optim.SGD, rho=1.0, perturb="norm", **kw)
    elif kind == "asam-on":
        opt = SAM(model, torch.optim.SGD, rho=1.0, perturb="norm", adaptive=True, **kw)
    else:
        opt = EntropySGD(model.parameters(), lr=1.0, L=5, inner_lr=0.05, noise=1e-4,
                         generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    n = len(ds.x_train)
    fresh = isinstance(opt, EntropySGD)
    batch = [None]

    def closure():  # SAM: the step's batch twice; Entropy-SGD: a fresh batch per call (as train.fit)
        if fresh or batch[0] is None:
            batch[0] = torch.randint(0, n, (BATCH,), generator=g)
        idx = batch[0]
        opt.zero_grad()
        loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        loss.backward()
        return loss

    def step():
        batch[0] = None
        return opt.step(closure)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10, help="steps per timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = data.load("mnist1d")
    kinds = ["sgd", "sam-all", "sam-on", "asam-on", "entropy-sgd L=5"]
    steps = {k: make(k, ds) for k in kinds}
    for fn in steps.values():  # warm-up
        for _ in range(3):
            fn()
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:  # interleaved
            t = time.perf_counter()
            for _ in range(args.inner):
                steps[k]()
            times[k].append((time.perf_counter() - t) / args.inner)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"one step, batch {BATCH}, MLP 40-256-256-10 + BatchNorm, 1 thread, "
          f"{args.rounds} interleaved rounds x {args.inner} steps")
    for k in kinds:
        print(f"  {k:16s} {1e3 * med[k]:7.3f} ms   {med[k] / med['sgd']:5.2f}x SGD")
    for k, target in (("sam-all", 2.3), ("sam-on", 2.3)):
        r = med[k] / med["sgd"]
        print(f"  target {k} <= {target}x: {'met' if r <= target else 'NOT met'} ({r:.2f}x)")


if __name__ == "__main__":
    main()
