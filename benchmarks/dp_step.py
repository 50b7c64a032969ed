"""Benchmark: one DP-SGD step of ``landscape_lib.privacy`` against Opacus and plain SGD.

One step = per-example gradients of a batch of 256, clipping to C = 1, Gaussian noise and an SGD
update, on chapter 19's two networks:

* the **CNN** of the digits experiment (``models.WSCNN``: WS-Conv 1→16, GN, WS-Conv 16→32
  stride 2, GN, Linear; 10,026 parameters) on 8x8 inputs;
* the **MLP** of the MNIST-1D experiment (40→128→128→10 with GroupNorm; 23,818 parameters).

Contenders, all timed in this one process, interleaved round by round, on one CPU thread:

* ``library`` — :class:`landscape_lib.privacy.DPStep` with ``method="auto"`` (book-keeping ghost
  clipping for these layers) and ``library-vmap`` (``torch.func.vmap(grad)``);
* ``opacus-<mode>`` — ``PrivacyEngine.make_private`` with each ``grad_sample_mode`` that works
  for the model (``hooks``, ``functorch``, ``ew``, ``ghost``); a mode that fails is reported with
  its error;
* ``sgd`` — a plain non-private step (forward, backward, ``SGD.step``);
* ``library K=4`` — augmentation multiplicity with 4 views per example (Opacus has none).

    python benchmarks/dp_step.py [--rounds 15] [--inner 5]

Prints the median time per step of each contender, its ratio to plain SGD, the library's ratio
to the fastest Opacus mode (the target is at most 1.0) and the K = 4 / K = 1 cost.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landscape_lib import data, models, privacy, train

BATCH, CLIP, SIGMA, LR = 256, 1.0, 1.0, 0.5


def chapter_models():
    torch.manual_seed(0)
    cnn = models.WSCNN((64,), n_classes=10)
    mlp = models.MLP(40, (128, 128), 10, norm="group")
    g = torch.Generator().manual_seed(0)
    return {"CNN (digits)": (cnn, torch.randn(BATCH, 64, generator=g), None),
            "MLP (MNIST-1D)": (mlp, torch.randn(BATCH, 40, generator=g), data.shift_jitter)}


def library_step(model, views=1, method="auto", augment=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = privacy.DPStep(SIGMA, CLIP, expected_batch_size=BATCH, sample_rate=BATCH / 4000,
                          views=views, method=method, augment=augment,
                          generator=torch.Generator().manual_seed(1),
                          noise_generator=torch.Generator().manual_seed(2))

    def run(x, y):
        ctx = train.StepContext(model, opt, F.cross_entropy, train.Batch(x, y, torch.arange(len(x))),
                                1, 1, None)
        step(ctx)

    return run


def sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def run(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def opacus_step(model, mode, x, y):
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                  criterion=criterion, noise_multiplier=SIGMA,
                                  max_grad_norm=CLIP, poisson_sampling=False,
                                  grad_sample_mode=mode)
    if mode == "ghost":
        gsm, dp_opt, crit, _ = out
    else:
        gsm, dp_opt, _ = out
        crit = criterion

    def run(xb, yb):
        dp_opt.zero_grad(set_to_none=True)
        loss = crit(gsm(xb), yb)
        loss.backward()
        dp_opt.step()

    return run


def time_once(fn, x, y, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(x, y)
    return (time.perf_counter() - t0) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--only", choices=("cnn", "mlp"), default=None, help="one model only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook|Optimal order).*")
    import opacus

    print(f"torch {torch.__version__}, opacus {opacus.__version__}, 1 thread, batch {BATCH}, "
          f"{args.rounds} interleaved rounds x {args.inner} steps")
    for name, (base, x, augment) in chapter_models().items():
        if args.only and args.only.upper() not in name:
            continue
        y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(3))
        fns, failed = {}, {}
        fns["library"] = library_step(copy.deepcopy(base))
        fns["library-vmap"] = library_step(copy.deepcopy(base), method="vmap")
        for mode in ("hooks", "functorch", "ew", "ghost"):
            try:
                fn = opacus_step(copy.deepcopy(base), mode, x, y)
                fn(x, y)  # a mode that cannot run this model fails here
                fns[f"opacus-{mode}"] = fn
            except Exception as exc:  # noqa: BLE001 - report why a mode does not work
                failed[f"opacus-{mode}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        fns["sgd"] = sgd_step(copy.deepcopy(base))
        fns["library K=1 (augment)"] = library_step(copy.deepcopy(base), 1, augment=augment)
        fns["library K=4 (augment)"] = library_step(copy.deepcopy(base), 4, augment=augment)
        for fn in fns.values():  # warm-up
            fn(x, y)
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():  # interleaved: every round times every contender once
                times[k].append(time_once(fn, x, y, args.inner))
        med = {k: float(np.median(v)) for k, v in times.items()}
        n_params = models.count_parameters(base)
        print(f"\n{name}: {n_params} parameters")
        print(f"  {'contender':24s} {'ms/step':>8s} {'× SGD':>7s}")
        for k, v in med.items():
            print(f"  {k:24s} {1000 * v:8.2f} {v / med['sgd']:7.2f}")
        for k, why in failed.items():
            print(f"  {k:24s} does not run: {why}")
        opacus_modes = {k: v for k, v in med.items() if k.startswith("opacus-")}
        fastest = min(opacus_modes, key=opacus_modes.get)
        ratio = med["library"] / opacus_modes[fastest]
        print(f"  library / fastest Opacus mode ({fastest}): {ratio:.2f} "
              f"({'meets' if ratio <= 1.0 else 'MISSES'} the 1.0 target); "
              f"library-vmap / {fastest}: {med['library-vmap'] / opacus_modes[fastest]:.2f}")
        print(f"  augmentation multiplicity: K=4 / K=1 = "
              f"{med['library K=4 (augment)'] / med['library K=1 (augment)']:.2f}")


if __name__ == "__main__":
    main()
