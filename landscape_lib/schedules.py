"""Learning-rate schedules as plain functions of the fractional epoch, and their PyTorch wrapper.

A schedule here is a function ``lr_at(e)`` of the *fractional* epoch ``e`` (epochs done plus the
fraction of the current epoch's batches consumed). :func:`per_batch` turns it into a
``torch.optim.lr_scheduler.LambdaLR`` that ``train.fit`` steps once per batch, so a schedule is
the same curve whatever the batch size. Where PyTorch ships the schedule, use PyTorch's:

* SGDR (Loshchilov & Hutter, ICLR 2017) is ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``
  stepped with ``train.fit(..., scheduler_step="fractional")``; :func:`sgdr_restarts` lists the
  epochs at which its cycles end (where snapshot ensembles take their members);
* a step decay is ``MultiStepLR``; SWA's annealing into a constant rate per epoch is ``SWALR``.

Written here, because PyTorch has no equivalent with these exact shapes:

* :func:`swa_lr` — the SWA reference code's schedule (Izmailov et al., UAI 2018): with
  ``t = e / swa_start`` the factor is 1 for ``t ≤ ½``, falls linearly to ``swa_lr / lr_init`` by
  ``t = 0.9`` and stays there;
* :func:`triangular_lr` — FGE's cycle (Garipov et al., NeurIPS 2018): with position
  ``s = (e mod c)/c`` in a cycle of ``c`` epochs, ``lr = α₁(1−2s) + α₂·2s`` for ``s < ½`` and
  ``α₁(2s−1) + α₂(2−2s)`` after: α₁ at the cycle ends, α₂ (the small one, where FGE takes its
  snapshots) in the middle. PyTorch's ``CyclicLR`` starts at its *base* and goes up, so it would
  need a phase shift;
* :func:`cosine_lr` — one cosine annealing ``lr_min + (lr_max − lr_min)·½(1 + cos(π e/E))``;
* :func:`phases` — schedules run one after another, each on its own clock (e.g. a dense phase,
  then cycles; Sup-tickets' cyclic phase after DST).
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

LrAt = Callable[[float], float]


def _positive(value, name: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


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


def cosine_lr(epoch: float, *, lr_max: float, lr_min: float, epochs: float) -> float:
    """Cosine annealing from ``lr_max`` at epoch 0 to ``lr_min`` at ``epochs`` (then constant)."""
    _positive(lr_max, "lr_max")
    if not lr_min >= 0:
        raise ValueError(f"lr_min must be >= 0, got {lr_min!r}")
    _positive(epochs, "epochs")
    e = min(max(epoch, 0.0), epochs)
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * e / epochs))


def phases(*parts: tuple[float, LrAt]) -> LrAt:
    """Run schedules one after another: ``parts = ((E₁, f₁), (E₂, f₂), …)`` gives ``f₁(e)`` for
    ``e < E₁``, ``f₂(e − E₁)`` for ``E₁ ≤ e < E₁ + E₂``, …; the last part continues past its end.

    >>> lr = phases((2, lambda e: 0.1), (3, lambda e: 0.1 / (1 + e)))
    >>> lr(1.5), lr(2.0), lr(4.0)
    (0.1, 0.1, 0.03333333333333333)
    """
    if not parts:
        raise ValueError("phases needs at least one (epochs, schedule) part")
    starts, t = [], 0.0
    for i, part in enumerate(parts):
        if not (isinstance(part, tuple) and len(part) == 2 and callable(part[1])):
            raise TypeError(f"part {i} must be (epochs, schedule function), got {part!r}")
        starts.append(t)
        t += _positive(part[0], f"length of part {i}")

    def lr_at(epoch: float) -> float:
        i = max(0, bisect.bisect_right(starts, epoch) - 1)
        return parts[i][1](epoch - starts[i])

    return lr_at


def sgdr_restarts(t0: int, t_mult: int, epochs: float) -> list[int]:
    """Epochs (1-based ends) at which SGDR with first cycle ``t0`` and growth ``t_mult`` completes
    a cycle, up to ``epochs``: ``t0, t0 + t0·t_mult, …`` (``CosineAnnealingWarmRestarts``)."""
    if isinstance(t0, bool) or not isinstance(t0, int) or t0 < 1:
        raise ValueError(f"t0 must be a positive integer, got {t0!r}")
    if isinstance(t_mult, bool) or not isinstance(t_mult, int) or t_mult < 1:
        raise ValueError(f"t_mult must be a positive integer, got {t_mult!r}")
    ends, t, length = [], 0, t0
    while t + length <= epochs:
        t += length
        ends.append(t)
        length *= t_mult
    return ends


def per_batch(optimizer: torch.optim.Optimizer, lr_at: LrAt, steps_per_epoch: int,
              start_epoch: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that sets ``lr = lr_at(start_epoch + b / steps_per_epoch)`` after ``b``
    batches.

    ``train.fit(..., scheduler_step="batch")`` steps it once per batch consumed. The optimizer's
    initial ``lr`` is only the unit: every group gets ``lr_at(e)`` scaled by its own base lr
    relative to the first group's.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    # LambdaLR multiplies each group's ``initial_lr`` (set by an earlier scheduler, if any),
    # not its current lr.
    group = optimizer.param_groups[0]
    base = group.get("initial_lr", group["lr"])
    if base <= 0:
        raise ValueError(f"the optimizer's lr must be positive, got {base}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(start_epoch + step / steps_per_epoch) / base)


def sample(lr_at: LrAt, epochs: float, points: int = 200) -> tuple[list[float], list[float]]:
    """``(e, lr_at(e))`` at ``points`` epochs on ``[0, epochs]``, for plotting a schedule."""
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    xs = [epochs * i / (points - 1) for i in range(points)]
    return xs, [lr_at(e) for e in xs]

