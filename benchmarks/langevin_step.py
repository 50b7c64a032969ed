"""Benchmark: one AdLaLa training step vs one ``torch.optim.SGD`` momentum step, and the cost of
training S = 5 seeds as one batched model (``models.Stacked``) vs one seed.

Chapter 16's model: the 2-100-1 ReLU MLP on two spirals, batch 25, binary cross-entropy on the
logit. One step = ``zero_grad``, forward, backward, ``optimizer.step()`` (the splitting adds a few
elementwise passes and no extra gradient). Contenders, interleaved round by round in this one
process, on one CPU thread:

* ``sgd`` — ``torch.optim.SGD(lr, momentum)`` with AdLaLa's (lr, momentum) from ``to_sgd``;
* ``adlala`` — :func:`landscape_lib.langevin.adlala` (AdLa on ``fc1``, BAOAB on ``out``) as the
  chapter runs it (kinetic temperature recorded);
* ``adlala (no probe)`` — ``record_temperature=False`` (the Langevin group's p^⊤p skipped);
* ``adlala S=5`` — five seeds as one ``models.Stacked`` model with ``replica_dims=1``;
* ``sgd S=5`` — the same for SGD.

    python benchmarks/langevin_step.py [--rounds 15] [--inner 200]

Prints the median time per step, AdLaLa / SGD (target ≤ 1.5) and batched S = 5 / one seed for
AdLaLa (target ≤ 2).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from landscape_lib import langevin, models


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())


def contender(kind: str, s: int = 1):
    torch.manual_seed(0)
    nets = [models.MLP(2, (100,), 1) for _ in range(s)]
    model = nets[0] if s == 1 else models.Stacked(nets)
    loss_fn = bce if s == 1 else models.stacked_loss(bce)
    first = "fc1.*" if s == 1 else "net.fc1.*"
    rd = 0 if s == 1 else 1
    if kind == "sgd":
        units = langevin.to_sgd(0.25, 0.1)
        opt = torch.optim.SGD(model.parameters(), lr=units.lr, momentum=units.momentum)
    elif kind == "adlala":
        opt = langevin.adlala(model, first, replica_dims=rd)
    else:
        opt = langevin.adlala(model, first, replica_dims=rd, record_temperature=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 2, generator=g)
    y = torch.randint(0, 2, (25,), generator=g)

    def run():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = {"sgd": contender("sgd"), "adlala": contender("adlala"),
            "adlala (no probe)": contender("adlala-noprobe"),
            "sgd S=5": contender("sgd", 5), "adlala S=5": contender("adlala", 5)}
    for run in runs.values():  # warm-up
        for _ in range(20):
            run()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(args.inner):
                run()
            times[name].append((time.perf_counter() - t) / args.inner)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:20s} {v * 1e6:8.1f} µs/step   ×{v / med['sgd']:.2f} of sgd")
    print(f"AdLaLa / SGD step:             {med['adlala'] / med['sgd']:.2f}  (target <= 1.5)")
    print(f"AdLaLa (no probe) / SGD step:  {med['adlala (no probe)'] / med['sgd']:.2f}")
    print(f"batched S=5 / one seed AdLaLa: {med['adlala S=5'] / med['adlala']:.2f}  (target <= 2)")
    print(f"batched S=5 / one seed SGD:    {med['sgd S=5'] / med['sgd']:.2f}")
    return med


if __name__ == "__main__":
    main()
