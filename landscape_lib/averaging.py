"""Weight averaging and the learning-rate schedules that feed it.

Schedules are plain functions of the *fractional* epoch ``e`` (epoch + batch/batches), turned
into a ``torch.optim.lr_scheduler.LambdaLR`` stepped per batch by :func:`per_batch`:

* :func:`swa_lr` — the SWA reference code's schedule (Izmailov et al., UAI 2018): with
  ``t = e / swa_start``, the factor is 1 for ``t ≤ ½``, falls linearly to
  ``swa_lr / lr_init`` by ``t = 0.9`` and stays there.
* :func:`triangular_lr` — FGE's cycle (Garipov et al., NeurIPS 2018): with position
  ``s = (e mod c)/c`` in a cycle of ``c`` epochs, ``lr = α₁(1−2s) + α₂·2s`` for ``s < ½`` and
  ``α₁(2s−1) + α₂(2−2s)`` after: α₁ at the cycle ends, α₂ (the small one, where snapshots are
  taken) in the middle. PyTorch's ``CyclicLR`` starts at its *base* and goes up, so it would
  need a phase shift.

For SGDR use ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` with
``train.fit(..., scheduler_step="fractional")``.
"""
from __future__ import annotations

from typing import Callable

import torch


def swa_lr(epoch: float, *, lr_init: float, swa_lr: float, swa_start: float) -> float:
    """SWA-style learning rate at fractional ``epoch`` (constant, linear decay, constant)."""
    if lr_init <= 0 or swa_lr <= 0:
        raise ValueError(f"learning rates must be positive, got lr_init={lr_init}, swa_lr={swa_lr}")
    if swa_start <= 0:
        raise ValueError(f"swa_start must be positive, got {swa_start}")
    t = epoch / swa_start
    ratio = swa_lr / lr_init
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    else:
        factor = ratio
    return lr_init * factor


def triangular_lr(epoch: float, *, lr_max: float, lr_min: float, cycle: float) -> float:
    """FGE's triangular cycle: ``lr_max`` (α₁) at the cycle ends, ``lr_min`` (α₂) mid-cycle."""
    if lr_max <= 0 or lr_min <= 0:
        raise ValueError(f"learning rates must be positive, got lr_max={lr_max}, lr_min={lr_min}")
    if cycle <= 0:
        raise ValueError(f"cycle length must be positive, got {cycle}")
    s = (epoch % cycle) / cycle
    if s < 0.5:
        return lr_max * (1.0 - 2.0 * s) + lr_min * 2.0 * s
    return lr_max * (2.0 * s - 1.0) + lr_min * (2.0 - 2.0 * s)


def per_batch(optimizer: torch.optim.Optimizer, lr_at: Callable[[float], float],
              steps_per_epoch: int, start_epoch: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that sets ``lr = lr_at(start_epoch + step / steps_per_epoch)``.

    Step it once per batch (``train.fit(..., scheduler_step="batch")``). The optimizer's
    initial ``lr`` is only the unit: every group gets ``lr_at(e)`` scaled by its own base lr
    relative to the first group's.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    base = optimizer.param_groups[0]["lr"]
    if base <= 0:
        raise ValueError(f"the optimizer's lr must be positive, got {base}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(start_epoch + step / steps_per_epoch) / base)
