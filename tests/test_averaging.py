"""Tests for landscape_lib.averaging: SWA, EMA, PSWA restarts, iterate averaging, SWAG, BMA and
the learning-rate schedules, each against an independent reference (a hand loop, NumPy's
moments, the empirical moments of many samples, hand-computed schedule values)."""
import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel, update_bn

from landscape_lib import averaging as A
from landscape_lib import schedules, train
from landscape_lib.data import Dataset


def toy_data(n=96, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    xt = torch.randn(32, d, generator=g, dtype=torch.float64)
    yt = (xt[:, 0] > 0).long() + (xt[:, 1] > 0.5).long()
    return Dataset("toy", x, y, xt, yt, k)


def mlp(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def vec(model):
    return parameters_to_vector(model.parameters()).detach().clone()


# --- SWA and EMA -----------------------------------------------------------------------------

def test_swa_equals_mean_of_epoch_end_iterates():
    ds, model = toy_data(), mlp()
    averaged = AveragedModel(model)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train.fit(model, ds, optimizer=opt, epochs=6, batch_size=16, progress=False,
              generator=torch.Generator().manual_seed(1),
              callbacks=[A.epoch_callback(averaged, start=3, every=1),
                         lambda epoch, m: seen.append((epoch, vec(m)))])
    expected = torch.stack([v for e, v in seen if e >= 3]).mean(0)
    assert int(averaged.n_averaged) == 4
    torch.testing.assert_close(vec(averaged.module), expected, rtol=0, atol=1e-12)


def test_swa_every_other_epoch_and_evaluation_keys():
    ds, model = toy_data(), mlp(bn=True)
    averaged = AveragedModel(model)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hist = train.fit(model, ds, optimizer=opt, epochs=7, batch_size=16, progress=False,
                     callbacks=[A.epoch_callback(averaged, start=2, every=2,
                                                 eval_data=(ds.x_test, ds.y_test), bn_data=ds.x_train),
                                lambda epoch, m: seen.append((epoch, vec(m)))])
    expected = torch.stack([v for e, v in seen if e in (2, 4, 6)]).mean(0)
    torch.testing.assert_close(vec(averaged.module), expected, rtol=0, atol=1e-12)
    assert "swa_acc" not in hist.records[0] and "swa_acc" in hist.records[1]
    # the recorded accuracy is that of the average with recomputed BN statistics
    ref = copy.deepcopy(averaged.module)
    update_bn([(ds.x_train,)], ref)
    assert hist.last("swa_acc") == train.evaluate(ref, ds.x_test, ds.y_test)["acc"]


def test_ema_matches_hand_recursion_with_warmup():
    model = mlp()
    thetas = [torch.randn_like(vec(model)) for _ in range(30)]
    for warmup in (True, False):
        averaged = A.ema(model, decay=0.9, warmup=warmup)
        hand = None
        for n, th in enumerate(thetas):
            vector_to_parameters(th, model.parameters())
            averaged.update_parameters(model)
            if hand is None:
                hand = th.clone()
            else:
                d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
                hand = d * hand + (1 - d) * th
        torch.testing.assert_close(vec(averaged.module), hand, rtol=0, atol=1e-12)


def test_ema_decay_values_and_errors():
    assert A.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert A.ema_decay(10, 0.999) == pytest.approx(11 / 20)
    assert A.ema_decay(10_000, 0.999) == 0.999
    assert A.ema_decay(3, 0.99, warmup=False) == 0.99
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.ema_decay(0, 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        A.ema_decay(-1, 0.9)


def test_step_hook_updates_on_schedule():
    ds, model = toy_data(), mlp()
    averaged = AveragedModel(model)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train.fit(model, ds, optimizer=opt, epochs=2, batch_size=16, progress=False,
              on_step=[A.step_hook(averaged, start_step=3, every=4),
                       lambda step, m, o: seen.append((step, vec(m)))])
    expected = torch.stack([v for s, v in seen if s >= 3 and (s - 3) % 4 == 0]).mean(0)
    assert int(averaged.n_averaged) == 3  # steps 3, 7, 11 of 12
    torch.testing.assert_close(vec(averaged.module), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="every"):
        A.step_hook(averaged, every=0)
    with pytest.raises(ValueError, match="start"):
        A.epoch_callback(averaged, start=0)


def test_finalize_needs_bn_data_for_batchnorm_models():
    """finalize re-estimates BN at the averaged weights: running mean and (unbiased) variance of
    the pre-BN activations over bn_data, computed here by hand; without BN nothing changes."""
    ds, model = toy_data(), mlp(bn=True)
    averaged = AveragedModel(model)
    for shift in (0.0, 0.3, -0.1):  # three different iterates, so the average is none of them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift)
        averaged.update_parameters(model)
    inner = averaged.module
    with torch.no_grad():  # stale statistics, far from the right ones
        inner[1].running_mean.fill_(5.0)
        inner[1].running_var.fill_(9.0)
    with pytest.raises(ValueError, match="bn_data"):
        A.finalize(averaged, None)
    out = A.finalize(averaged, ds.x_train)
    assert out is inner
    with torch.no_grad():
        pre = inner[0](ds.x_train)
    torch.testing.assert_close(out[1].running_mean, pre.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1].running_var, pre.var(0, unbiased=True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vec(out), vec(averaged.module), rtol=0, atol=0)
    # no BatchNorm: the module itself, weights untouched, no data needed
    plain = AveragedModel(mlp())
    before = vec(plain.module)
    assert A.finalize(plain, None) is plain.module
    torch.testing.assert_close(vec(plain.module), before, rtol=0, atol=0)


# (start, every, the epochs 1..9 chosen): start % every != 0 (where (k + start) % every or an
# off-by-one would pick other epochs), start = 1 with every > 1, the last epoch, none
SCHEDULES = [(1, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9]), (2, 3, [2, 5, 8]), (3, 2, [3, 5, 7, 9]),
             (4, 4, [4, 8]), (9, 5, [9]), (10, 1, []), (1, 3, [1, 4, 7]), (5, 4, [5, 9]), (9, 1, [9])]


@pytest.mark.parametrize("start,every,chosen", SCHEDULES)
def test_epoch_callback_and_step_hook_average_exactly_the_scheduled_epochs(start, every, chosen):
    """Weights set to the epoch number k at the end of epoch k: the average is the mean of the
    chosen k and n_averaged their count (start/every pairs where ``epoch % every`` or an
    off-by-one would pick other epochs)."""
    model = mlp()
    for make in (lambda av: A.epoch_callback(av, start=start, every=every),
                 lambda av: (lambda e, m, h=A.step_hook(av, start_step=start, every=every): h(e, m, None))):
        averaged = AveragedModel(model)
        cb = make(averaged)
        for k in range(1, 10):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(k))
            cb(k, model)
        assert int(averaged.n_averaged) == len(chosen)
        if chosen:
            torch.testing.assert_close(vec(averaged.module), torch.full_like(vec(model), float(np.mean(chosen))),
                                       rtol=0, atol=1e-12)



@pytest.mark.parametrize("start,every,chosen", SCHEDULES)
def test_iterate_averaging_and_swag_callback_average_exactly_the_scheduled_steps(start, every, chosen):
    """SGD with lr 1 and gradient −1 puts the weights at k after step k: IA's average is the mean of
    the chosen k. SWAG's callback at weights k after epoch k: its mean is the same."""
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = A.IterateAveraging(torch.optim.SGD([w], lr=1.0), start_step=start, every=every)
    model = nn.Linear(1, 1).double()
    swag = A.SWAG(model, max_rank=2, dtype=torch.float64)
    cb = swag.callback(start=start, every=every)
    for k in range(1, 10):
        w.grad = torch.full_like(w, -1.0)
        opt.step()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(k))
        cb(k, model)
    assert w.tolist() == [9.0, 9.0, 9.0]
    assert opt.n_averaged == len(chosen) and swag.n == len(chosen)
    if chosen:
        assert opt.state[w]["ia_mean"].tolist() == pytest.approx([np.mean(chosen)] * 3, abs=1e-12)
        assert swag.mean.tolist() == pytest.approx([np.mean(chosen)] * 2, abs=1e-12)


def test_schedules_default_to_every_epoch_and_step_from_the_first():
    """Defaults start = every = 1: weights k after epoch / step k, k = 1..4, all averaged (mean 2.5)."""
    model = mlp()
    averaged, stepped = AveragedModel(model), AveragedModel(model)
    cb, hook = A.epoch_callback(averaged), A.step_hook(stepped)
    swag = A.SWAG(model, max_rank=2, dtype=torch.float64)
    swag_cb = swag.callback()
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ia = A.IterateAveraging(torch.optim.SGD([w], lr=1.0))
    for k in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(k))
        cb(k, model)
        hook(k, model, None)
        swag_cb(k, model)
        w.grad = torch.full_like(w, -1.0)
        ia.step()
    assert int(averaged.n_averaged) == int(stepped.n_averaged) == swag.n == ia.n_averaged == 4
    full = torch.full_like(vec(model), 2.5)
    torch.testing.assert_close(vec(averaged.module), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec(stepped.module), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(swag.mean, full, rtol=0, atol=1e-12)
    assert ia.state[w]["ia_mean"].tolist() == [2.5, 2.5]


def test_ema_decay_accepts_the_ends_of_its_range_and_defaults_to_0999():
    assert A.ema_decay(0, 0.0) == 0.0
    assert A.ema_decay(0, 1.0) == pytest.approx(0.1)
    assert A.ema_decay(7, 1.0, warmup=False) == 1.0
    assert A.ema_decay(10_000) == 0.999
    assert A.ema_decay(0) == pytest.approx(0.1)


def test_ema_defaults_warm_up_and_keep_the_last_iterates_buffers():
    """Weights 0, 10, 20 and BN running means 1, 2, 3: the warm-up decays are 2/11 and 3/12, so
    the EMA is 1/4·(9/11·10) + 3/4·20 = 375/22; with use_buffers the running mean is averaged
    the same way (1/4·(2/11 + 18/11) + 3/4·3 = 119/44), else it is the last iterate's (3)."""
    for use_buffers, mean in ((None, 3.0), (True, 119 / 44)):
        model = mlp(bn=True)
        averaged = A.ema(model) if use_buffers is None else A.ema(model, use_buffers=True)
        for n, value in enumerate((0.0, 10.0, 20.0)):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(value)
                model[1].running_mean.fill_(n + 1.0)
            averaged.update_parameters(model)
        torch.testing.assert_close(vec(averaged.module), torch.full_like(vec(model), 375 / 22), rtol=0, atol=1e-12)
        torch.testing.assert_close(averaged.module[1].running_mean, torch.full((8,), mean, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    # no warm-up: the default decay 0.999 from the first update on
    model = mlp()
    averaged = A.ema(model, warmup=False)
    for value in (0.0, 10.0):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        averaged.update_parameters(model)
    torch.testing.assert_close(vec(averaged.module), torch.full_like(vec(model), 0.01), rtol=0, atol=1e-12)


def test_finalize_of_a_plain_module_recomputes_its_batchnorm():
    ds, model = toy_data(), mlp(bn=True)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    assert A.finalize(model, ds.x_train) is model
    with torch.no_grad():
        pre = model[0](ds.x_train)
    torch.testing.assert_close(model[1].running_mean, pre.mean(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="^the model has BatchNorm: pass bn_data"):
        A.finalize(mlp(bn=True), None)


# --- PSWA, DSWA ------------------------------------------------------------------------------

def test_restart_loads_average_and_resets_optimizer_state():
    ds, model = toy_data(), mlp(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    averaged = AveragedModel(model)
    train.fit(model, ds, optimizer=opt, epochs=3, batch_size=16, progress=False,
              callbacks=[A.epoch_callback(averaged)])
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    new = A.restart(model, averaged, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), ds.x_train)
    assert new is not opt and len(new.state) == 0  # no momentum buffers after the restart
    torch.testing.assert_close(vec(model), vec(averaged.module), rtol=0, atol=0)
    # BN buffers are those of the average, recomputed on the training inputs
    ref = copy.deepcopy(averaged.module)
    update_bn([(ds.x_train,)], ref)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    with pytest.raises(ValueError, match="no model"):
        A.restart(model, AveragedModel(model), lambda ps: torch.optim.SGD(ps, lr=0.1), ds.x_train)


def test_periodic_swa_restarts_fresh_and_ends_on_the_average():
    ds, model = toy_data(), mlp(bn=True)
    made = []

    def make(ps):
        made.append(torch.optim.SGD(ps, lr=0.05, momentum=0.9))
        return made[-1]

    res = A.periodic_swa(model, ds, make_optimizer=make, epochs=5, period=2, start=1,
                         batch_size=16, generator=torch.Generator().manual_seed(0), eval_every=1)
    assert [r["epoch"] for r in res.rounds] == [3, 5]
    assert len(made) == 3  # the first optimizer plus one fresh one per restart
    assert all(len(o.state) == 0 for o in made[-1:])  # the last restart's optimizer never stepped
    assert len(res.history) == 5 and "avg_acc" not in res.history.records[0]
    torch.testing.assert_close(vec(model), vec(res.average), rtol=0, atol=0)
    assert res.rounds[-1]["acc"] == train.evaluate(model, ds.x_test, ds.y_test)["acc"]
    with pytest.raises(ValueError, match="period"):
        A.periodic_swa(model, ds, make_optimizer=make, epochs=5, period=0)


def test_periodic_swa_backbone_identity_without_restart_effects():
    """With period longer than the run and restart_last=False, PSWA is plain training: the
    iterate equals a fit with the same generator, lr schedule and optimizer."""
    ds = toy_data()
    lr_at = lambda e: schedules.swa_lr(e, lr_init=0.1, swa_lr=0.02, swa_start=4)  # noqa: E731
    a, b = mlp(seed=3), mlp(seed=3)
    A.periodic_swa(a, ds, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
                   epochs=4, period=10, lr_at=lr_at, batch_size=16,
                   generator=torch.Generator().manual_seed(5), restart_last=False)
    opt = torch.optim.SGD(b.parameters(), lr=1.0, momentum=0.9)
    train.fit(b, ds, optimizer=opt, epochs=4, batch_size=16, progress=False,
              scheduler=schedules.per_batch(opt, lr_at, 6), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(vec(a), vec(b), rtol=0, atol=0)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the flat parameters after every step and at its creation."""

    def __init__(self, params, **kw):
        params = list(params)
        super().__init__(params, **kw)
        self._ps = params
        self.created_at = parameters_to_vector(params).detach().clone()
        self.after_step = []

    def step(self, closure=None):
        out = super().step(closure)
        self.after_step.append(parameters_to_vector(self._ps).detach().clone())
        return out


def _recording_optimizers():
    """``(made, make)``: ``make(params)`` builds a :class:`_RecordingSGD` (lr 0.05) and appends it to
    ``made``, so a test can inspect every optimizer a training routine created."""
    made = []

    def make(ps):
        made.append(_RecordingSGD(ps, lr=0.05))
        return made[-1]

    return made, make


def test_periodic_swa_ends_on_the_average_of_a_shorter_last_period():
    """5 epochs in periods of 3: the second period has 2 epochs. With restart_last (the default)
    the model ends on that period's average, the mean of the epoch-4 and epoch-5 iterates, with
    BatchNorm statistics recomputed on bn_data (here not the training inputs)."""
    ds, model = toy_data(), mlp(bn=True)
    bn_data = ds.x_train[:40] * 2.0 + 1.0
    made, make = _recording_optimizers()

    res = A.periodic_swa(model, ds, make_optimizer=make, epochs=5, period=3, batch_size=32, bn_data=bn_data,
                         eval_every=0, generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.rounds] == [3, 5]
    assert len(made) == 3  # the first optimizer, the restart after epoch 3 and the one at the end
    ends = made[1].after_step  # 2 epochs × 3 steps after the restart
    assert len(ends) == 6
    torch.testing.assert_close(vec(model), (ends[2] + ends[5]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec(res.average), vec(model), rtol=0, atol=0)
    with torch.no_grad():
        pre = model[0](bn_data)
    torch.testing.assert_close(model[1].running_mean, pre.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, pre.var(0, unbiased=True), rtol=1e-10, atol=1e-12)



def test_periodic_swa_evaluates_every_eval_every_epochs_of_a_period_and_at_its_end():
    """start = 1, one period of epochs 2..5, eval_every = 3: the average is evaluated after its
    3rd epoch (epoch 4) and at the end (5), each time the mean of the epoch-end iterates so far."""
    ds, model = toy_data(), mlp()
    made, make = _recording_optimizers()

    res = A.periodic_swa(model, ds, make_optimizer=make, epochs=5, period=4, start=1, batch_size=32,
                         eval_every=3, generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.history.records if "avg_acc" in r] == [4, 5]
    ends = made[0].after_step[2::3]  # epoch-end iterates of epochs 1..5 (3 steps per epoch)
    assert len(ends) == 5
    for epoch in (4, 5):
        ref = copy.deepcopy(model)
        vector_to_parameters(torch.stack(ends[1:epoch]).mean(0), ref.parameters())
        ev = train.evaluate(ref, ds.x_test, ds.y_test)
        rec = res.history.records[epoch - 1]
        assert rec["avg_acc"] == ev["acc"] and rec["avg_loss"] == pytest.approx(ev["loss"], rel=1e-12)
    assert res.rounds == [{"epoch": 5, "acc": res.history.records[4]["avg_acc"],
                           "loss": res.history.records[4]["avg_loss"]}]


def test_periodic_swa_defaults_match_fit_with_batch_128_and_a_generator_from_the_global_rng(capfd, monkeypatch):
    """A run whose one period outlasts it, restart_last=False: plain training. With the defaults
    (batch_size 128, eval_every 1, a generator drawn from the global RNG) and an lr schedule and
    augmentation across its two fits (start = 1), it is one train.fit of 3 epochs, the average is
    evaluated after every epoch of the period, and no progress bar is shown even with bars on."""
    monkeypatch.setenv("LANDSCAPE_QUIET", "0")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(130, 5, generator=g, dtype=torch.float64)
    ds = Dataset("toy130", x, (x[:, 0] > 0).long(), x[:20], (x[:20, 0] > 0).long(), 3)
    lr_at = lambda e: 0.1 / (1.0 + e)  # noqa: E731
    augment = lambda xb, gen: xb.flip(1)  # noqa: E731
    a, b = mlp(seed=4), mlp(seed=4)
    torch.manual_seed(11)
    res = A.periodic_swa(a, ds, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), epochs=3, period=5,
                         start=1, lr_at=lr_at, augment=augment, restart_last=False)
    assert capfd.readouterr().err == ""
    torch.manual_seed(11)
    opt = torch.optim.SGD(b.parameters(), lr=1.0)
    hist = train.fit(b, ds, optimizer=opt, epochs=3, batch_size=128, scheduler=schedules.per_batch(opt, lr_at, 2),
                     augment=augment, progress=False)
    torch.testing.assert_close(vec(a), vec(b), rtol=0, atol=0)
    assert [r["lr"] for r in res.history.records] == [r["lr"] for r in hist.records]
    assert [r["epoch"] for r in res.history.records if "avg_acc" in r] == [2, 3]


def test_periodic_swa_without_restart_last_restarts_between_periods_only():
    ds, model = toy_data(), mlp()
    made, make = _recording_optimizers()

    res = A.periodic_swa(model, ds, make_optimizer=make, epochs=4, period=2, batch_size=32, eval_every=0,
                         restart_last=False, generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.rounds] == [2, 4]
    assert len(made) == 2  # one restart, after the first period
    first = made[0].after_step
    torch.testing.assert_close(made[1].created_at, (first[2] + first[5]) / 2, rtol=0, atol=1e-12)
    last = made[1].after_step
    torch.testing.assert_close(vec(model), last[-1], rtol=0, atol=0)  # the final iterate
    torch.testing.assert_close(vec(res.average), (last[2] + last[5]) / 2, rtol=0, atol=1e-12)


def test_periodic_swa_boundaries_of_period_start_and_rounds():
    ds = toy_data()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05)  # noqa: E731
    # period 1: every epoch is a period, its average the epoch's iterate
    model = mlp()
    res = A.periodic_swa(model, ds, make_optimizer=sgd, epochs=2, period=1, batch_size=32,
                         generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.rounds] == [1, 2]
    # start = epochs: plain training, no period
    model, ref = mlp(seed=1), mlp(seed=1)
    res = A.periodic_swa(model, ds, make_optimizer=sgd, epochs=2, period=3, start=2, batch_size=32,
                         generator=torch.Generator().manual_seed(0))
    assert res.rounds == [] and res.average is None and len(res.history) == 2
    train.fit(ref, ds, optimizer=sgd(ref.parameters()), epochs=2, batch_size=32, progress=False,
              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vec(model), vec(ref), rtol=0, atol=0)
    # one round of multi-round SWA is SWA: the model ends on the mean of its two epoch-end iterates
    model = mlp()
    made, make = _recording_optimizers()

    res = A.multi_round_swa(model, ds, make_optimizer=make, rounds=1, epochs_per_round=2, batch_size=32,
                            eval_every=0, generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.rounds] == [2] and len(made) == 2
    torch.testing.assert_close(vec(model), (made[0].after_step[2] + made[0].after_step[5]) / 2, rtol=0, atol=1e-12)


def test_multi_round_swa_counts_rounds():
    """Three rounds of two epochs (3 steps each): every round's optimizer is created at the
    mean of the previous round's two epoch-end iterates (each round restarts from the previous
    average, with a new average), and the model ends on the last round's average."""
    ds, model = toy_data(), mlp()
    made, make = _recording_optimizers()

    res = A.multi_round_swa(model, ds, make_optimizer=make, rounds=3, epochs_per_round=2,
                            batch_size=32, eval_every=0, generator=torch.Generator().manual_seed(0))
    assert [r["epoch"] for r in res.rounds] == [2, 4, 6]
    assert len(made) == 4  # the first optimizer and one per restart
    for r in range(3):
        ends = made[r].after_step
        assert len(ends) == 6  # 2 epochs × 3 steps
        avg = (ends[2] + ends[5]) / 2  # epoch ends of this round
        torch.testing.assert_close(made[r + 1].created_at, avg, rtol=0, atol=1e-12)
    last = (made[2].after_step[2] + made[2].after_step[5]) / 2
    torch.testing.assert_close(vec(model), last, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec(res.average), last, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rounds"):
        A.multi_round_swa(model, ds, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05),
                          rounds=0, epochs_per_round=2)


# --- iterate averaging (Gadam) ---------------------------------------------------------------

def test_iterate_averaging_matches_hand_average_and_leaves_iterates_alone():
    ds = toy_data()
    a, b = mlp(seed=1), mlp(seed=1)
    opt_a = A.gadam(a.parameters(), lr=1e-2, weight_decay=0.1, start_step=4, every=2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    seen = []
    train.fit(a, ds, optimizer=opt_a, epochs=2, batch_size=16, progress=False,
              generator=torch.Generator().manual_seed(2),
              on_step=[lambda s, m, o: seen.append((s, vec(m)))])
    train.fit(b, ds, optimizer=opt_b, epochs=2, batch_size=16, progress=False,
              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vec(a), vec(b), rtol=0, atol=0)  # IA does not change the iterates
    expected = torch.stack([v for s, v in seen if s >= 4 and (s - 4) % 2 == 0]).mean(0)
    assert opt_a.n_averaged == 5  # steps 4, 6, 8, 10, 12
    torch.testing.assert_close(vec(opt_a.averaged_copy(a)), expected, rtol=0, atol=1e-12)
    # state_dict round trip keeps both the base optimizer's moments and the averages
    opt_c = A.gadam(mlp(seed=1).parameters(), lr=1e-2, weight_decay=0.1, start_step=4, every=2)
    opt_c.load_state_dict(opt_a.state_dict())
    assert opt_c.n_averaged == 5 and opt_c.steps == 12
    assert len(opt_c.optimizer.state) == len(opt_a.optimizer.state)


def test_iterate_averaging_errors():
    model = mlp()
    opt = A.IterateAveraging(torch.optim.SGD(model.parameters(), lr=0.1), start_step=5)
    with pytest.raises(ValueError, match="no iterate"):
        opt.averaged_copy(model)
    with pytest.raises(TypeError, match="Optimizer"):
        A.IterateAveraging(model)
    with pytest.raises(ValueError, match="lr"):
        A.gadam(model.parameters(), lr=0.0)



def test_averaged_copy_is_a_new_model_and_keeps_parameters_the_optimizer_does_not_train():
    """IA over the first layer only, SGD lr 1, gradient 1: its weights go p0 − 1, p0 − 2 (mean
    p0 − 1.5). The copy has the mean there and the untouched last layer; the model keeps its
    iterate, and the optimizer's state still packs (no entries for untrained parameters)."""
    model = mlp()
    first, last = vec(model[0]), vec(model[2])
    opt = A.IterateAveraging(torch.optim.SGD(model[0].parameters(), lr=1.0))
    for _ in range(2):
        for p in model[0].parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    out = opt.averaged_copy(model)
    torch.testing.assert_close(vec(out[0]), first - 1.5, rtol=0, atol=1e-12)
    torch.testing.assert_close(vec(out[2]), last, rtol=0, atol=0)
    torch.testing.assert_close(vec(model[0]), first - 2.0, rtol=0, atol=1e-12)
    assert len(opt.state_dict()["ia"]["state"]) == 2


def test_iterate_averaging_resumes_from_its_state_dict():
    """Momentum SGD on (w − 3)², averaging from step 2: 3 steps, save, load into a fresh wrapper
    at the same weights, 2 more steps. Weights and average equal those of an uninterrupted run,
    and the average is the plain mean of the iterates after steps 2..5; the reloaded wrapper
    still shares its param_groups with the wrapped optimizer (a changed lr reaches it)."""
    def run(w, opt, n):
        out = []
        for _ in range(n):
            opt.zero_grad()
            ((w - 3.0) ** 2).sum().backward()
            opt.step()
            out.append(w.detach().clone())
        return out

    w = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    opt = A.IterateAveraging(torch.optim.SGD([w], lr=0.1, momentum=0.9), start_step=2)
    iterates = run(w, opt, 5)
    v = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    first = A.IterateAveraging(torch.optim.SGD([v], lr=0.1, momentum=0.9), start_step=2)
    run(v, first, 3)
    u = nn.Parameter(v.detach().clone())
    resumed = A.IterateAveraging(torch.optim.SGD([u], lr=0.1, momentum=0.9), start_step=2)
    resumed.load_state_dict(first.state_dict())
    run(u, resumed, 2)
    torch.testing.assert_close(u.detach(), w.detach(), rtol=0, atol=0)
    assert resumed.steps == 5 and resumed.n_averaged == 4
    mean = torch.stack(iterates[1:]).mean(0)
    torch.testing.assert_close(resumed.state[u]["ia_mean"], mean, rtol=0, atol=1e-12)
    resumed.param_groups[0]["lr"] = 0.5
    assert resumed.optimizer.param_groups[0]["lr"] == 0.5


def test_gadam_defaults_and_arguments_are_those_of_adamw():
    """gadam() is AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 5e-4) averaging every
    step from the first; given arguments reach AdamW unchanged."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kwargs in ({}, dict(lr=0.05, betas=(0.5, 0.6), eps=0.1, weight_decay=0.2)):
        a = nn.Linear(3, 2).double()
        b = copy.deepcopy(a)
        opt_a = A.gadam(a.parameters(), **kwargs)
        ref = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4) | kwargs
        opt_b = torch.optim.AdamW(b.parameters(), **ref)
        iterates = []
        for _ in range(3):
            for m, o in ((a, opt_a), (b, opt_b)):
                o.zero_grad()
                m(x).pow(2).sum().backward()
                o.step()
            iterates.append(vec(b))
        torch.testing.assert_close(vec(a), vec(b), rtol=0, atol=0)
        assert opt_a.n_averaged == 3
        torch.testing.assert_close(vec(opt_a.averaged_copy(a)), torch.stack(iterates).mean(0), rtol=0, atol=1e-12)


# --- SWAG ------------------------------------------------------------------------------------

def swag_with_iterates(n_iter=12, rank=5, seed=0, scale_std=(0.1, 0.3)):
    """A SWAG over a 2→2 linear layer (d = 6) fed correlated random 'iterates'."""
    g = np.random.default_rng(seed)
    model = nn.Linear(2, 2).double()
    d = 6
    mix = g.normal(size=(d, d)) * np.linspace(*scale_std, d)
    thetas = g.normal(size=(n_iter, d)) @ mix.T + g.normal(size=d)
    swag = A.SWAG(model, max_rank=rank, dtype=torch.float64)
    for th in thetas:
        vector_to_parameters(torch.tensor(th), model.parameters())
        swag.collect(model)
    return swag, thetas, model


def test_swag_moments_match_numpy():
    swag, thetas, _ = swag_with_iterates()
    k = 5
    np.testing.assert_allclose(swag.mean.numpy(), thetas.mean(0), atol=1e-12)
    np.testing.assert_allclose(swag.variance.numpy(), thetas.var(0, ddof=0), atol=1e-12)
    # D_i = θ_i − mean(θ_1..θ_i) for the last K iterates (running mean *after* θ_i)
    running = np.cumsum(thetas, 0) / np.arange(1, len(thetas) + 1)[:, None]
    dev = (thetas - running)[-k:]
    np.testing.assert_allclose(swag.deviations.numpy(), dev, atol=1e-12)
    cov = np.diag(thetas.var(0)) + dev.T @ dev / (k - 1)
    np.testing.assert_allclose(swag.covariance().numpy(), cov, atol=1e-12)
    np.testing.assert_allclose(swag.covariance(use_lowrank=False).numpy(), np.diag(thetas.var(0)),
                               atol=1e-12)


def test_swag_lowrank_against_numpy_cov():
    """Σ_lr = D̂ᵀD̂/(K−1) is the *uncentred* covariance of the deviations: NumPy's (centred)
    np.cov plus K/(K−1)·m mᵀ, m the deviations' mean."""
    swag, thetas, model = swag_with_iterates(n_iter=5, rank=5)
    running = np.cumsum(thetas, 0) / np.arange(1, 6)[:, None]
    dev = thetas - running
    lowrank = (swag.covariance() - torch.diag(swag.variance)).numpy()
    np.testing.assert_allclose(lowrank, np.cov(dev.T, bias=False, ddof=1) + np.outer(dev.mean(0), dev.mean(0))
                               * 5 / 4, atol=1e-12)


def test_swag_mean_equals_averaged_model():
    swag, thetas, model = swag_with_iterates()
    averaged = AveragedModel(model)
    for th in thetas:
        vector_to_parameters(torch.tensor(th), model.parameters())
        averaged.update_parameters(model)
    torch.testing.assert_close(swag.mean, vec(averaged.module), rtol=0, atol=1e-12)


def test_swag_ring_buffer_keeps_last_k_oldest_first():
    model = nn.Linear(1, 1).double()
    swag = A.SWAG(model, max_rank=3, dtype=torch.float64)
    running = []
    for i in range(7):
        vector_to_parameters(torch.tensor([float(i), float(i * i)]), model.parameters())
        swag.collect(model)
        running.append(np.array([i, i * i]) - np.array([np.mean(range(i + 1)),
                                                        np.mean([j * j for j in range(i + 1)])]))
    assert swag.rank == 3 and swag.n == 7
    np.testing.assert_allclose(swag.deviations.numpy(), np.array(running[-3:]), atol=1e-12)


@pytest.mark.parametrize("scale,use_lowrank", [(0.5, True), (1.0, False), (2.0, True)])
def test_swag_samples_have_the_stored_mean_and_covariance(scale, use_lowrank):
    swag, _, _ = swag_with_iterates()
    n = 20_000
    g = torch.Generator().manual_seed(0)
    s = torch.stack([swag.sample(scale, use_lowrank, generator=g) for _ in range(n)]).numpy()
    target = scale * swag.covariance(use_lowrank=use_lowrank).numpy()
    mean = swag.mean.numpy()
    # standard errors of a Gaussian's sample mean and sample covariance
    se_mean = np.sqrt(np.diag(target) / n)
    se_cov = np.sqrt((target ** 2 + np.outer(np.diag(target), np.diag(target))) / n)
    assert np.all(np.abs(s.mean(0) - mean) < 5 * se_mean)
    emp = np.cov(s.T)
    assert np.all(np.abs(emp - target) < 5 * se_cov)
    # the test can fail: noise scaled by the variance (not its square root), or by `scale`
    # instead of sqrt(scale), would put the covariance far outside these bands
    var = swag.variance.numpy()
    wrong_var = scale * np.diag(var ** 2) + (target - scale * np.diag(var))
    assert np.any(np.abs(emp - wrong_var) > 5 * se_cov)
    if scale != 1.0:
        wrong_scale = scale * target
        assert np.any(np.abs(emp - wrong_scale) > 5 * se_cov)


def test_swag_sample_scale_zero_is_swa_and_errors():
    swag, _, model = swag_with_iterates()
    torch.testing.assert_close(swag.sample(0.0), swag.mean)
    with pytest.raises(ValueError, match="scale"):
        swag.sample(-1.0)
    one = A.SWAG(model, max_rank=5, dtype=torch.float64)
    with pytest.raises(ValueError, match="collected 0"):
        one.sample()
    one.collect(model)
    one.sample(use_lowrank=False)  # the diagonal needs one model
    with pytest.raises(ValueError, match="at least 2"):
        one.sample(use_lowrank=True)
    with pytest.raises(ValueError, match="trainable parameters"):
        one.collect(nn.Linear(3, 3).double())
    with pytest.raises(ValueError, match="max_rank"):
        A.SWAG(model, max_rank=-1)


def test_swag_variance_clamped():
    model = nn.Linear(1, 1).double()
    with torch.no_grad():  # zeros: the running moments stay exactly 0 (a random init rounds to ~1e-17)
        for p in model.parameters():
            p.zero_()
    swag = A.SWAG(model, dtype=torch.float64)
    for _ in range(3):
        swag.collect(model)  # identical iterates: variance 0, clamped to 1e-30
    assert torch.all(swag.variance == 1e-30)


def test_swag_callback_collects_per_epoch():
    ds, model = toy_data(), mlp()
    swag = A.SWAG(model, max_rank=3, dtype=torch.float64)
    seen = []
    train.fit(model, ds, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=5,
              batch_size=32, progress=False,
              callbacks=[swag.callback(start=2), lambda e, m: seen.append((e, vec(m)))])
    assert swag.n == 4
    torch.testing.assert_close(swag.mean, torch.stack([v for e, v in seen if e >= 2]).mean(0),
                               rtol=0, atol=1e-12)



def test_swag_covariance_of_two_models_and_its_size_limit():
    """θ₁ = (0, 0), θ₂ = (2, 4): mean (1, 2), variance (1, 4), D₁ = 0, D₂ = (1, 2), so
    Σ = diag(1, 4) + D₂D₂ᵀ/(2 − 1) = [[2, 2], [2, 8]]. A d × d matrix is refused above max_dim."""
    model = nn.Linear(1, 1).double()
    swag = A.SWAG(model, max_rank=3, dtype=torch.float64)
    for theta in ([0.0, 0.0], [2.0, 4.0]):
        vector_to_parameters(torch.tensor(theta, dtype=torch.float64), model.parameters())
        swag.collect(model)
    assert swag.covariance(max_dim=2).tolist() == [[2.0, 2.0], [2.0, 8.0]]
    with pytest.raises(ValueError, match=re.escape("a dense 2×2 covariance is too large (max_dim=1)")):
        swag.covariance(max_dim=1)
    big = nn.Linear(5000, 1)  # d = 5001, one above the default max_dim
    wide = A.SWAG(big, max_rank=0)
    wide.collect(big)
    with pytest.raises(ValueError, match=re.escape("a dense 5001×5001 covariance is too large (max_dim=5000)")):
        wide.covariance(use_lowrank=False)


# --- Bayesian model averaging ----------------------------------------------------------------

def test_bma_recomputes_batchnorm_for_every_sample():
    ds, model = toy_data(), mlp(bn=True)
    swag = A.SWAG(model, max_rank=4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train.fit(model, ds, optimizer=opt, epochs=6, batch_size=16, progress=False,
              callbacks=[swag.callback(start=2)])
    res = A.bma(model, swag, ds.x_test, bn_data=ds.x_train, n_samples=4,
                generator=torch.Generator().manual_seed(7))
    # hand loop with the same draws and torch's update_bn directly
    g = torch.Generator().manual_seed(7)
    work, stale = copy.deepcopy(model), copy.deepcopy(model)
    means = []
    for member in res.members:
        theta = swag.sample(0.5, True, generator=g)
        vector_to_parameters(theta, work.parameters())
        vector_to_parameters(theta, stale.parameters())
        update_bn([(ds.x_train,)], work)
        means.append(work[1].running_mean.clone())
        torch.testing.assert_close(member, train.predict_proba(work, ds.x_test))
        # without the recomputation (the last iterate's statistics) predictions differ
        assert (member - train.predict_proba(stale, ds.x_test)).abs().max() > 1e-6
    assert all((means[0] - m).abs().max() > 1e-8 for m in means[1:])  # statistics change per sample
    torch.testing.assert_close(res.probs, torch.stack(res.members).mean(0).float())
    with pytest.raises(ValueError, match="bn_data"):
        A.bma(model, swag, ds.x_test, bn_data=None)
    with pytest.raises(ValueError, match="n_samples"):
        A.bma(model, swag, ds.x_test, bn_data=ds.x_train, n_samples=0)


def test_bma_default_30_samples_one_sample_and_prediction_batches():
    """Without BatchNorm no bn_data is needed; 30 samples by default; one sample is its own
    average; predictions go through the model in chunks of batch_size (default 4096)."""
    swag, _, model = swag_with_iterates()
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = A.bma(model, swag, x, bn_data=None, generator=torch.Generator().manual_seed(1))
    assert len(res.members) == 30 and sizes == [7] * 30
    sizes.clear()
    res = A.bma(model, swag, x, bn_data=None, n_samples=1, batch_size=3, generator=torch.Generator().manual_seed(1))
    assert len(res.members) == 1 and sizes == [3, 3, 1]
    torch.testing.assert_close(res.probs, res.members[0].float(), rtol=0, atol=0)
    sizes.clear()
    A.bma(model, swag, torch.zeros(4097, 2, dtype=torch.float64), bn_data=None, n_samples=1)
    assert sizes == [4096, 1]


def _msg(text):
    return "^" + re.escape(text) + "$"


def test_errors_state_what_is_needed():
    """The messages of invalid arguments, exactly: each names the argument and its valid values."""
    model, bn = mlp(), mlp(bn=True)
    swag, _, lin = swag_with_iterates()
    cases = [
        (lambda: A.ema(model, decay=1.5), "decay must be in [0, 1], got 1.5"),
        (lambda: A.ema_decay(0, -0.1), "decay must be in [0, 1], got -0.1"),
        (lambda: A.ema_decay(-1, 0.9), "number of updates must be >= 0, got -1"),
        (lambda: A.epoch_callback(AveragedModel(model), start=0), "start epoch must be >= 1 (1-based), got 0"),
        (lambda: A.epoch_callback(AveragedModel(model), every=0), "averaging frequency 'every' must be >= 1, got 0"),
        (lambda: A.step_hook(AveragedModel(model), start_step=0), "start step must be >= 1 (1-based), got 0"),
        (lambda: A.IterateAveraging(torch.optim.SGD(model.parameters(), lr=0.1), start_step=0),
         "start_step must be >= 1 (1-based), got 0"),
        (lambda: swag.callback(start=0), "start epoch must be >= 1 (1-based), got 0"),
        (lambda: A.finalize(AveragedModel(bn), None),
         "the model has BatchNorm: pass bn_data (training inputs) to recompute the statistics of the averaged weights"),
        (lambda: A.restart(model, AveragedModel(model), lambda ps: torch.optim.SGD(ps, lr=0.1)),
         "the average holds no model yet: nothing to restart from"),
        (lambda: A.periodic_swa(model, toy_data(), make_optimizer=None, epochs=3, period=0),
         "period must be >= 1 epoch, got 0"),
        (lambda: A.periodic_swa(model, toy_data(), make_optimizer=None, epochs=3, period=1, start=-1),
         "need 0 <= start <= epochs, got start=-1, epochs=3"),
        (lambda: A.periodic_swa(model, toy_data(), make_optimizer=None, epochs=3, period=1, start=4),
         "need 0 <= start <= epochs, got start=4, epochs=3"),
        (lambda: A.periodic_swa(model, toy_data(), make_optimizer=None, epochs=3, period=1, eval_every=-1),
         "eval_every must be >= 0, got -1"),
        (lambda: A.multi_round_swa(model, toy_data(), make_optimizer=None, rounds=0, epochs_per_round=2),
         "rounds must be >= 1, got 0"),
        (lambda: A.IterateAveraging(torch.optim.SGD(model.parameters(), lr=0.1), start_step=3).averaged_copy(model),
         "no iterate averaged yet (averaging starts at step 3, 0 steps taken)"),
        (lambda: A.gadam(model.parameters(), lr=-1.0), "lr must be positive, got -1.0"),
        (lambda: A.SWAG(lin, var_clamp=0.0), "var_clamp must be positive, got 0.0"),
        (lambda: A.SWAG(lin, max_rank=-1), "max_rank must be >= 0, got -1"),
        (lambda: swag.collect(nn.Linear(3, 3).double()), "model has 12 trainable parameters, SWAG holds 6"),
        (lambda: A.SWAG(lin).sample(use_lowrank=False), "SWAG has collected 0 model(s); this needs at least 1"),
        (lambda: swag.sample(-0.5), "scale must be >= 0, got -0.5"),
        (lambda: A.bma(bn, swag, torch.zeros(1, 5), bn_data=None),
         "the model has BatchNorm: pass bn_data to recompute the statistics of every sample"),
        (lambda: A.bma(lin, swag, torch.zeros(1, 2), bn_data=None, n_samples=0), "n_samples must be >= 1, got 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=_msg(message)):
            call()
    with pytest.raises(TypeError, match=_msg("IterateAveraging wraps a torch.optim.Optimizer, got Sequential")):
        A.IterateAveraging(model)


def test_swag_sample_is_the_seeded_gaussian_in_the_swag_dtype():
    """Three iterates of a 2-parameter model in float64, K = 3: D = (0, θ₂ − θ̄₂, θ₃ − θ̄₃) with the
    running means; θ̃ = θ̄ + √scale (√var · z₁ + Dᵀz₂/√(K − 1)), z₁ then z₂ drawn in float64."""
    model = nn.Linear(1, 1).double()
    swag = A.SWAG(model, max_rank=3, dtype=torch.float64)
    thetas = np.array([[1.0, 2.0], [3.0, -1.0], [2.0, 0.5]])
    for th in thetas:
        vector_to_parameters(torch.tensor(th), model.parameters())
        swag.collect(model)
    mean, var = thetas.mean(0), thetas.var(0)
    dev = np.array([[0.0, 0.0], thetas[1] - thetas[:2].mean(0), thetas[2] - mean])
    replay = torch.Generator().manual_seed(4)
    z1 = torch.randn(2, generator=replay, dtype=torch.float64).numpy()
    z2 = torch.randn(3, generator=replay, dtype=torch.float64).numpy()
    got = swag.sample(scale=0.3, generator=torch.Generator().manual_seed(4))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), mean + math.sqrt(0.3) * (np.sqrt(var) * z1 + dev.T @ z2 / math.sqrt(2)),
                               rtol=1e-12)
    # the defaults are scale = ½ and the low-rank part
    np.testing.assert_allclose(swag.sample(generator=torch.Generator().manual_seed(4)).numpy(),
                               mean + math.sqrt(0.5) * (np.sqrt(var) * z1 + dev.T @ z2 / math.sqrt(2)), rtol=1e-12)


def test_swag_load_keeps_the_models_dtype_for_a_single_parameter():
    model = nn.Linear(2, 1, bias=False)  # one float32 parameter
    swag = A.SWAG(model, dtype=torch.float64)
    out = swag.load(model, torch.tensor([0.25, -1.5], dtype=torch.float64))
    assert out is model and model.weight.dtype == torch.float32
    assert model.weight.detach().tolist() == [[0.25, -1.5]]


def test_swag_collect_in_its_own_dtype_and_a_rank_one_ring_buffer():
    # a float32 model, float64 moments: θ = 1 + 2⁻²⁰ (exact in float32) has θ² = 1 + 2⁻¹⁹ + 2⁻⁴⁰,
    # which float32 would round to 1 + 2⁻¹⁹
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1 + 2 ** -20)
    swag = A.SWAG(model, max_rank=1, dtype=torch.float64)
    swag.collect(model)
    assert swag.sq_mean.tolist() == [1 + 2 ** -19 + 2 ** -40]
    # K = 1 keeps the last deviation: θ₂ − (θ₁ + θ₂)/2 = (3 − (1 + 2⁻²⁰))/2
    with torch.no_grad():
        model.weight.fill_(3.0)
    swag.collect(model)
    assert swag.rank == 1 and swag.deviations.tolist() == [[(3.0 - (1 + 2 ** -20)) / 2]]
