"""Benchmark: multirate fine-tuning (k = 5) against training everything, wall clock per epoch.

Chapter 18's set-up: a 1-D CNN (four convolutions with 64 channels and a linear head, about 62k
parameters) fine-tuned on MNIST-1D digits 5–9 (2,007 signals, batches of 128), SGD-momentum 0.9,
lr 0.01. Contenders, timed in this one process on one CPU thread, one epoch each per round with
the order alternating (so a change in the machine's load hits all of them):

* ``train all`` — ``torch.optim.SGD`` on every parameter, ``train.fit``'s default step;
* ``multirate`` — :class:`landscape_lib.optim.MultirateSGD` (fast = head, slow = backbone,
  k = 5) with :func:`~landscape_lib.optim.multirate_step`: the backbone runs under ``no_grad``
  on fast steps;
* ``multirate (requires_grad)`` — the same optimizer, but fast steps toggle ``requires_grad`` of
  the slow parameters instead (the official code's way);
* ``head only`` — SGD on the head, the backbone frozen (the floor: no full backward at all).

    python benchmarks/multirate.py [--rounds 11] [--k 5]

Prints the median time per epoch of each contender, its ratio to train-all (the target for
multirate at k = 5 is at most 0.65; FLOPs predict (k+2)/(3k) = 0.47) and the FLOP ratio counted
with ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from landscape_lib import data, models, train
from landscape_lib.optim import MultirateSGD, multirate, multirate_step

BATCH, LR, MOMENTUM = 128, 0.01, 0.9


def toggle_step(ctx):
    """A multirate step that freezes the slow parameters with ``requires_grad_`` on fast steps."""
    opt = ctx.optimizer
    slow = opt.slow_params()
    fast_step = not opt.next_is_slow
    if fast_step:
        for p in slow:
            p.requires_grad_(False)
    try:
        loss = ctx.backward()
    finally:
        if fast_step:
            for p in slow:
                p.requires_grad_(True)
    opt.step()
    return loss


def contender(name, ds, k):
    torch.manual_seed(0)
    model = models.CNN1d(40, (64, 64, 64, 64), n_classes=ds.n_classes)
    if name.startswith("multirate"):
        opt = MultirateSGD(multirate.partition(model, "layer"), lr=LR, momentum=MOMENTUM, k=k)
        step = multirate_step if name == "multirate" else toggle_step
    elif name == "head only":
        model.features.requires_grad_(False)
        opt, step = torch.optim.SGD(model.out.parameters(), lr=LR, momentum=MOMENTUM), train.closure_step
    else:
        opt, step = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), train.closure_step
    gen, hist = torch.Generator().manual_seed(0), train.History()

    def epoch():
        t = time.perf_counter()
        train.fit(model, ds, optimizer=opt, epochs=1, batch_size=BATCH, step=step, generator=gen,
                  eval_every=0, progress=False, history=hist, start_epoch=len(hist))
        return time.perf_counter() - t

    def flops():
        m2, o2, _ = train.fork(model, opt)
        with FlopCounterMode(display=False) as fc:
            train.fit(m2, ds, optimizer=o2, epochs=1, sampler=train.RandomSubsets(BATCH, 2 * k),
                      step=step, generator=torch.Generator().manual_seed(1), eval_every=0,
                      progress=False)
        return fc.get_total_flops()

    return epoch, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = data.class_split(data.load("mnist1d"), range(5, 10))
    names = ["train all", "multirate", "multirate (requires_grad)", "head only"]
    runs = {n: contender(n, ds, args.k) for n in names}
    for epoch, _ in runs.values():
        epoch()  # warm-up
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(runs[n][0]())
    flops = {n: runs[n][1]() for n in names}
    base = np.median(times["train all"])
    print(f"{ds.name}, {len(ds.x_train)} signals, batch {BATCH}, k = {args.k}, "
          f"{torch.get_num_threads()} thread, {args.rounds} interleaved rounds")
    print(f"{'contender':28s} {'median s/epoch':>15s} {'ratio':>7s} {'per-round ratio (min-max)':>27s} "
          f"{'FLOP ratio':>11s}")
    for n in names:
        per_round = np.array(times[n]) / np.array(times["train all"])
        print(f"{n:28s} {np.median(times[n]):15.4f} {np.median(times[n]) / base:7.3f} "
              f"{per_round.min():13.3f} - {per_round.max():.3f} {flops[n] / flops['train all']:11.3f}")
    print(f"predicted FLOP ratio (k+2)/(3k) = {(args.k + 2) / (3 * args.k):.3f}; target wall-clock ratio <= 0.65")


if __name__ == "__main__":
    main()
