"""Benchmark: the top Hessian eigenvalue of the MNIST-1D MLP 40-100-100-10 (15,210 parameters).

Trains the MLP (SGD, 20 epochs), builds the dense Hessian of the loss on 1,000 training points
column by column from Hessian-vector products (about 1.5 minutes on 2 cores), takes its exact
spectrum with ``numpy.linalg.eigvalsh`` (about 3 minutes), and compares

* ``curvature.extremal_eigs`` (SciPy's ``eigsh``): value and number of HVPs;
* ``curvature.lanczos`` and plain ``curvature.power_iteration`` from the same three random
  starts: HVPs until the estimate stays within 1e-4 relative of the dense value.

    python benchmarks/top_eigenvalue.py

The ratio of the two counts is set by the spectrum: power iteration's error shrinks like
(λ₂/λ₁)^(2k), Lanczos' like a Chebyshev polynomial in the relative gap.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from landscape_lib import curvature, data, models

TOL = 1e-4


def first_within(errors, tol=TOL):
    """Products needed: the first step after which the relative error stays within ``tol``."""
    ok = np.asarray(errors) <= tol
    return next((j + 1 for j in range(len(ok)) if ok[j:].all()), None)


def main() -> None:
    torch.set_num_threads(2)
    ds = data.load("mnist1d")
    x, y = ds.train_subset(1000, seed=0)
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(40,), n_classes=10, hidden=(100, 100))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        for xb, yb in data.batches(ds.x_train, ds.y_train, 128, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    op = curvature.HVPOperator(model, x, y)
    n = op.n
    t0 = time.time()
    dense = np.empty((n, n))
    eye = torch.eye(n)
    for i in range(n):  # column i of H is H e_i
        dense[:, i] = op.mv(eye[i]).numpy()
    dense = (dense + dense.T) / 2
    t1 = time.time()
    spectrum = np.linalg.eigvalsh(dense)
    lam = spectrum[-1]
    print(f"{n} parameters; dense Hessian {t1 - t0:.0f} s, eigvalsh {time.time() - t1:.0f} s")
    print(f"dense: λ_max = {lam:.8f}, λ₂ = {spectrum[-2]:.6f} (λ₂/λ₁ = {spectrum[-2] / lam:.3f}), "
          f"λ_min = {spectrum[0]:.6f}")
    res = curvature.extremal_eigs(op, which="LA", tol=1e-6)
    print(f"eigsh:  λ_max = {res.values[0]:.8f}, relative error {abs(res.values[0] - lam) / lam:.1e}, "
          f"{res.n_hvp} HVPs")
    lz_n, pw_n = [], []
    for s in range(3):
        lz = curvature.lanczos(op, 40, generator=torch.Generator().manual_seed(s))
        pw = curvature.power_iteration(op, iters=400, tol=1e-14, generator=torch.Generator().manual_seed(s))
        lz_n.append(first_within([abs(lz.ritz_at(j)[-1] - lam) / lam for j in range(1, len(lz.alpha) + 1)]))
        pw_n.append(first_within(np.abs(pw.history - lam) / lam))
    print(f"HVPs to {TOL:g} relative: Lanczos {lz_n}, power iteration {pw_n} "
          f"(ratio of totals {sum(pw_n) / sum(lz_n):.1f}×)")


if __name__ == "__main__":
    main()
