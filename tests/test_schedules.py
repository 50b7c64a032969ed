import math

import pytest
import torch
from torch import nn

from landscape_lib import schedules as S


# --- schedules -------------------------------------------------------------------------------

def test_swa_lr_hand_values():
    f = lambda e: S.swa_lr(e, lr_init=0.1, swa_lr=0.01, swa_start=10)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1)            # t = 0.5: still constant
    assert f(7) == pytest.approx(0.055)          # t = 0.7: 1 − 0.9·0.2/0.4 = 0.55
    assert f(9) == pytest.approx(0.01)           # t = 0.9: reached swa_lr
    assert f(25) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="positive"):
        S.swa_lr(1, lr_init=0.0, swa_lr=0.01, swa_start=10)
    with pytest.raises(ValueError, match="swa_start"):
        S.swa_lr(1, lr_init=0.1, swa_lr=0.01, swa_start=0)


def test_triangular_lr_hand_values():
    f = lambda e: S.triangular_lr(e, lr_max=0.1, lr_min=0.01, cycle=4)  # noqa: E731
    assert [f(e) for e in (0, 1, 2, 3, 4, 6)] == pytest.approx([0.1, 0.055, 0.01, 0.055, 0.1, 0.01])
    with pytest.raises(ValueError, match="positive"):
        S.triangular_lr(0, lr_max=0.1, lr_min=-0.01, cycle=4)
    with pytest.raises(ValueError, match="cycle"):
        S.triangular_lr(0, lr_max=0.1, lr_min=0.01, cycle=0)


def test_per_batch_sets_the_fractional_epoch_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lr_at = lambda e: S.triangular_lr(e, lr_max=0.2, lr_min=0.02, cycle=1)  # noqa: E731
    sched = S.per_batch(opt, lr_at, steps_per_epoch=4, start_epoch=1.0)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([lr_at(1 + k / 4) for k in range(5)])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        S.per_batch(opt, lr_at, 0)
    with pytest.raises(ValueError, match="lr must be positive"):
        S.per_batch(torch.optim.SGD([p], lr=0.0), lr_at, 4)


def test_per_batch_after_an_earlier_scheduler_uses_the_initial_lr():
    """A second per-batch schedule on the same optimizer (e.g. continuing a run) sets the lr the
    schedule asks for, although LambdaLR scales the stored initial_lr, not the current lr."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.05)
    at = lambda e: S.swa_lr(e, lr_init=0.05, swa_lr=0.0005, swa_start=10)  # noqa: E731
    first = S.per_batch(opt, at, steps_per_epoch=4)
    for _ in range(8):
        opt.step()
        first.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(at(2.0))
    second = S.per_batch(opt, at, steps_per_epoch=4, start_epoch=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(at(7.0))
    opt.step()
    second.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(at(7.25))


def test_cosine_lr_hand_values():
    f = lambda e: S.cosine_lr(e, lr_max=0.2, lr_min=0.02, epochs=10)  # noqa: E731
    assert f(0) == pytest.approx(0.2)
    assert f(5) == pytest.approx(0.11)             # halfway: the mean of the two
    assert f(10) == pytest.approx(0.02)
    assert f(2.5) == pytest.approx(0.02 + 0.18 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(30) == pytest.approx(0.02)            # constant after the end
    with pytest.raises(ValueError, match="epochs"):
        S.cosine_lr(1, lr_max=0.2, lr_min=0.0, epochs=0)
    with pytest.raises(ValueError, match="lr_min"):
        S.cosine_lr(1, lr_max=0.2, lr_min=-1.0, epochs=3)


def test_phases_switch_clocks_at_the_boundaries():
    first = lambda e: 1.0 + e    # noqa: E731
    second = lambda e: 10.0 + e  # noqa: E731
    third = lambda e: 100.0 + e  # noqa: E731
    f = S.phases((2, first), (3, second), (1, third))
    assert [f(e) for e in (0, 1.5, 2.0, 4.9, 5.0, 7.0)] == pytest.approx(
        [1.0, 2.5, 10.0, 12.9, 100.0, 102.0])
    with pytest.raises(ValueError, match="at least one"):
        S.phases()
    with pytest.raises(ValueError, match="length of part 1"):
        S.phases((2, first), (0, second))
    with pytest.raises(TypeError, match="part 0"):
        S.phases((2, 0.1))


def test_sgdr_restarts_match_pytorchs_cosine_annealing_warm_restarts():
    """The listed cycle ends are where CosineAnnealingWarmRestarts jumps back to its base lr."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=3)
    restarts = []
    for epoch in range(1, 40):
        opt.step()
        sched.step(epoch)
        if opt.param_groups[0]["lr"] == pytest.approx(1.0):
            restarts.append(epoch)
    assert S.sgdr_restarts(2, 3, 39) == restarts == [2, 8, 26]
    assert S.sgdr_restarts(1, 1, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="t0"):
        S.sgdr_restarts(0, 2, 10)
    with pytest.raises(ValueError, match="t_mult"):
        S.sgdr_restarts(1, 0, 10)


def test_sample_evaluates_the_schedule_on_an_even_grid():
    xs, ys = S.sample(lambda e: 2 * e, 4, points=5)
    assert xs == pytest.approx([0, 1, 2, 3, 4]) and ys == pytest.approx([0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="points"):
        S.sample(lambda e: e, 4, points=1)
