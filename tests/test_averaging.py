"""Tests for landscape_lib.averaging: SWA, EMA, PSWA restarts, iterate averaging, SWAG, BMA and
the learning-rate schedules, each against an independent reference (a hand loop, NumPy's
moments, the empirical moments of many samples, hand-computed schedule values)."""
import copy

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


@pytest.mark.parametrize("start,every,chosen", [(1, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
                                                (2, 3, [2, 5, 8]), (3, 2, [3, 5, 7, 9]),
                                                (4, 4, [4, 8]), (9, 5, [9]), (10, 1, [])])
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


def test_periodic_swa_ends_on_the_average_of_a_shorter_last_period():
    """5 epochs in periods of 3: the second period has 2 epochs. With restart_last (the default)
    the model ends on that period's average, the mean of the epoch-4 and epoch-5 iterates, with
    BatchNorm statistics recomputed on bn_data (here not the training inputs)."""
    ds, model = toy_data(), mlp(bn=True)
    bn_data = ds.x_train[:40] * 2.0 + 1.0
    made = []

    def make(ps):
        made.append(_RecordingSGD(ps, lr=0.05))
        return made[-1]

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


def test_multi_round_swa_counts_rounds():
    """Three rounds of two epochs (3 steps each): every round's optimizer is created at the
    mean of the previous round's two epoch-end iterates (each round restarts from the previous
    average, with a new average), and the model ends on the last round's average."""
    ds, model = toy_data(), mlp()
    made = []

    def make(ps):
        made.append(_RecordingSGD(ps, lr=0.05))
        return made[-1]

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
