"""Tests for landscape_lib.langevin (the splitting integrator) and models.Stacked (batched seeds),
against independent references: the harmonic oscillator's known invariant measure, the
Ornstein–Uhlenbeck stationary variance, torch.optim.SGD, and S separate runs."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from landscape_lib import data, langevin as L, models, train


def _oscillator(n=20000, omega=1.0, dtype=torch.float64):
    q = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
    return q, lambda: 0.5 * omega ** 2 * (q * q).sum()


def _run(opt, params, loss_fn, steps, every=None):
    out = []
    for k in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if every is not None and k >= every:
            out.append(params.detach().clone())
    return out


def test_o_step_stationary_variance_is_tau():
    # zero force: BAOAB's momentum is a pure Ornstein–Uhlenbeck process, variance → τ
    q, _ = _oscillator()
    tau, g = torch.Generator().manual_seed(0), None
    opt = L.SplittingOptimizer([q], 0.1, scheme="la", tau=0.3, gamma=2.0, generator=tau)
    temps = []
    for k in range(300):
        opt.zero_grad()
        (0.0 * q.sum()).backward()
        opt.step()
        if k >= 100:
            temps.append(float(opt.state[q]["kinetic"]))
            g = float(opt.state[q]["momentum"].var())
    assert abs(sum(temps) / len(temps) / 0.3 - 1) < 0.01
    assert abs(g / 0.3 - 1) < 0.05


@pytest.mark.parametrize("h", [0.3, 0.8])
def test_baoab_configurational_variance_on_harmonic_oscillator(h):
    # known result (Leimkuhler & Matthews 2013): BAOAB samples the harmonic oscillator's
    # positions with variance τ/ω² without step-size bias
    omega, tau = 1.5, 0.2
    q, loss = _oscillator(omega=omega)
    opt = L.SplittingOptimizer([q], h, scheme="BAOAB", tau=tau, gamma=1.0,
                               generator=torch.Generator().manual_seed(1))
    samples = _run(opt, q, loss, 400, every=100)
    var = torch.stack(samples).var()
    assert abs(float(var) / (tau / omega ** 2) - 1) < 0.03
    # the kinetic temperature measured right after O is τ too, while the momentum after the
    # full kick is biased by (1 − h²ω²/4), the card's "where T is measured matters"
    temps = []
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
        temps.append(float(opt.state[q]["kinetic"]))
    assert abs(sum(temps) / len(temps) / tau - 1) < 0.03


def test_euler_like_scheme_is_biased_where_baoab_is_not():
    # the same oscillator with the O-step at the end (BAAOB ≈ "ABO") has a visible position bias
    # at h = 0.8: the test above is not passing for any scheme whatever
    omega, tau, h = 1.5, 0.2, 0.8
    q, loss = _oscillator(omega=omega)
    opt = L.SplittingOptimizer([q], h, scheme="BAAOB", tau=tau, gamma=1.0,
                               generator=torch.Generator().manual_seed(1))
    var = torch.stack(_run(opt, q, loss, 400, every=100)).var()
    assert abs(float(var) / (tau / omega ** 2) - 1) > 0.1


def _tiny_problem(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = models.MLP(2, (16,), 2).double()
    return model, x, y


def test_full_batch_equipartition_per_group():
    # every tensor's time-averaged kinetic temperature equals its own group's τ. Two blocks at
    # different τ are not in equilibrium (heat flows from the hot block to the cold one, which
    # reads ~10 % hot at γ = 1); strong friction (γ = 5) keeps that flow small
    model, x, y = _tiny_problem()
    groups = L.partition(model, {"fc1.*": dict(tau=1e-3), "out.*": dict(tau=3e-3)})
    opt = L.SplittingOptimizer(groups, 0.05, scheme="la", gamma=5.0,
                               generator=torch.Generator().manual_seed(0))
    mon = L.TemperatureMonitor.for_model(opt, model)
    for k in range(3000):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mon.record()
    ratios = mon.ratios(burn_in=0.3)
    assert set(ratios) == {"fc1.weight", "fc1.bias", "out.weight", "out.bias"}
    for name, r in ratios.items():
        assert abs(float(r) - 1) < 0.1, (name, float(r))
    assert mon.kinetic("fc1.weight").shape == (3000,)


def test_adla_thermostat_pins_the_temperature_under_minibatch_noise():
    model, x, y = _tiny_problem(n=256)
    opt = L.adlala(model, "fc1.*", h=0.1, tau=1e-3, gamma=1.0, sigma=0.01, eps=1.0)
    mon = L.TemperatureMonitor.for_model(opt, model)
    g = torch.Generator().manual_seed(0)
    for k in range(4000):
        idx = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        mon.record()
    r = mon.ratios(burn_in=0.5)
    assert abs(float(r["fc1.weight"]) - 1) < 0.05 and abs(float(r["fc1.bias"]) - 1) < 0.05
    assert mon.xi("fc1.weight").shape == (4000,)
    assert [g["thermostat"] for g in opt.param_groups] == ["one ξ per tensor", None]
    assert opt.state[model.fc1.weight]["xi"].shape == ()
    with pytest.raises(KeyError, match="no thermostat"):
        mon.xi("out.weight")


@pytest.mark.parametrize("h,gamma", [(0.25, 0.1), (0.1, 2.0)])
def test_converter_both_ways(h, gamma):
    sgd = L.to_sgd(h, gamma, tau=1e-3)
    assert sgd.momentum == pytest.approx(math.exp(-gamma * h))
    assert sgd.lr == pytest.approx(h * h * (1 + sgd.momentum) / 2)
    back = L.from_sgd(sgd.lr, sgd.momentum, sgd.noise)
    assert back.h == pytest.approx(h) and back.gamma == pytest.approx(gamma)
    assert back.tau == pytest.approx(1e-3)
    lang = L.from_sgd(0.05, 0.9)
    again = L.to_sgd(lang.h, lang.gamma)
    assert again.lr == pytest.approx(0.05) and again.momentum == pytest.approx(0.9)
    assert L.from_sgd(0.1, 0.0).gamma == math.inf


@pytest.mark.parametrize("lr,momentum", [(0.05, 0.9), (0.2, 0.5)])
def test_tau_zero_scheme_equals_torch_sgd_step_for_step(lr, momentum):
    units = L.from_sgd(lr, momentum)
    model, x, y = _tiny_problem()
    ref = models.MLP(2, (16,), 2).double()
    ref.load_state_dict(model.state_dict())
    ours = L.SplittingOptimizer(model.parameters(), units.h, scheme="heavy_ball",
                                gamma=units.gamma, initial_kick="full")
    theirs = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    for k in range(30):
        for m, o in ((model, ours), (ref, theirs)):
            o.zero_grad()
            F.cross_entropy(m(x[k:k + 16]), y[k:k + 16]).backward()
            o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # the integrator's own half initial kick halves the first step only: not SGD
    model2, x, y = _tiny_problem()
    half = L.SplittingOptimizer(model2.parameters(), units.h, scheme="heavy_ball", gamma=units.gamma)
    half.zero_grad()
    F.cross_entropy(model2(x[:16]), y[:16]).backward()
    half.step()
    assert not torch.allclose(next(model2.parameters()), next(model.parameters()))


def test_official_adla_substeps_by_hand():
    # one AdLa step on a single tensor against the official code's update, written out
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    g1, g2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    h, eps, sigma, tau = 0.25, 0.05, 0.01, 1e-4
    opt = L.SplittingOptimizer([p], h, scheme="adla", tau=tau, sigma=sigma, eps=eps, xi0=0.1,
                               generator=torch.Generator().manual_seed(5))
    theta = p.detach().clone()
    noise = torch.Generator().manual_seed(5)
    r = lambda: torch.randn(3, 4, generator=noise, dtype=torch.float64)  # noqa: E731
    mom, xi = -h / 2 * g1, 0.1
    for grad, first in ((g1, True), (g2, False)):
        if not first:
            mom = mom - h * grad
        theta = theta + h / 2 * mom
        mom = math.exp(-xi * h / 2) * mom
        mom = mom + sigma * math.sqrt(h / 2) * r()
        xi = xi + eps * h * (float((mom * mom).sum()) - 12 * tau)
        mom = mom + sigma * math.sqrt(h / 2) * r()
        mom = math.exp(-xi * h / 2) * mom
        theta = theta + h / 2 * mom
        p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), theta)
        assert float(opt.state[p]["xi"]) == pytest.approx(xi)


def test_errors_name_the_valid_choices():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="positive"):
        L.SplittingOptimizer(p, 0.0)
    with pytest.raises(ValueError, match="positive"):
        L.SplittingOptimizer(p, -0.1)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        L.SplittingOptimizer(p, 0.1, tau=-1e-4)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        L.SplittingOptimizer(p, 0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="valid sub-steps: A, B, O, O∞, C, D, E"):
        L.SplittingOptimizer(p, 0.1, scheme="BAXAB")
    with pytest.raises(ValueError, match="la, adla, overdamped, heavy_ball"):
        L.SplittingOptimizer(p, 0.1, scheme="langevin")
    with pytest.raises(ValueError, match="begin and end with the kick B"):
        L.SplittingOptimizer(p, 0.1, scheme="AOA")
    with pytest.raises(ValueError, match="half, full"):
        L.SplittingOptimizer(p, 0.1, initial_kick="none")
    with pytest.raises(ValueError, match="param group 0: step size h"):
        L.SplittingOptimizer([{"params": p, "h": -1.0}])
    with pytest.raises(ValueError, match="project_position"):
        L.SplittingOptimizer(p, 0.1, constraint=object())
    with pytest.raises(ValueError, match="positive"):
        L.to_sgd(0.0, 0.1)
    with pytest.raises(ValueError, match="momentum must lie in"):
        L.from_sgd(0.1, 1.0)
    model = models.MLP(2, (4,), 2)
    with pytest.raises(ValueError, match="match no parameter"):
        L.partition(model, {"conv*": {}}, default={})


def test_divergence_names_the_step_and_hyperparameters():
    ds = data.spirals(200, seed=0)
    torch.manual_seed(0)
    model = models.MLP(2, (16,), 1)
    mse = lambda o, y: ((o.squeeze(-1) - y.float()) ** 2).mean()  # noqa: E731
    opt = L.SplittingOptimizer(model.parameters(), 5.0, scheme="heavy_ball", gamma=0.0)
    with pytest.raises(train.Diverged, match=r"step \d+.*'scheme': 'heavy_ball', 'h': 5.0"):
        train.fit(model, ds, optimizer=opt, epochs=50, batch_size=50, loss_fn=mse, progress=False)


def test_state_dict_round_trip_and_fork_continue_identically():
    model, x, y = _tiny_problem()
    opt = L.adlala(model, "fc1.*", tau=1e-3, generator=None)

    def steps(m, o, n, seed):
        torch.manual_seed(seed)
        for k in range(n):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    steps(model, opt, 5, 0)
    branch = train.fork(model, opt)
    fresh_model = models.MLP(2, (16,), 2).double()
    fresh_model.load_state_dict(model.state_dict())
    fresh = L.adlala(fresh_model, "fc1.*", tau=1e-3)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded
    for m, o in ((model, opt), (branch.model, branch.optimizer), (fresh_model, fresh)):
        steps(m, o, 5, 1)
    for p, q, r in zip(model.parameters(), branch.model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p, r)


class _UnitSphere:
    """A stand-in constraint: rows of a tensor on the unit sphere (tests the hook only)."""

    def __init__(self):
        self.calls = {"position": 0, "momentum": 0}

    def project_position(self, p, m, t):
        self.calls["position"] += 1
        drifted = p.clone()
        p.div_(p.norm(dim=-1, keepdim=True))
        m.add_(p - drifted, alpha=1 / t)  # SHAKE: the same constraint force on the momentum

    def project_momentum(self, p, m):
        self.calls["momentum"] += 1
        m.sub_((m * p).sum(-1, keepdim=True) * p)


def test_constraint_hook_is_called_per_group():
    torch.manual_seed(0)
    w = torch.nn.Parameter(F.normalize(torch.randn(5, 3), dim=-1))
    b = torch.nn.Parameter(torch.randn(3))
    sphere = _UnitSphere()
    opt = L.SplittingOptimizer([{"params": [w], "constraint": sphere}, {"params": [b]}], 0.1,
                               scheme="la", tau=1e-2, gamma=1.0)
    for _ in range(20):
        opt.zero_grad()
        ((w.sum(0) - b) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(5))
    assert sphere.calls == {"position": 40, "momentum": 40}  # after A, A and after B, O


# --- batched seeds ------------------------------------------------------------------------

def _members(s=3, hidden=(32,)):
    torch.manual_seed(0)
    return [models.MLP(2, hidden, 1).double() for _ in range(s)]


@pytest.mark.parametrize("force_vmap", [False, True])
def test_stacked_forward_equals_members(force_vmap):
    members = _members()
    stacked = models.Stacked(members)
    stacked.force_vmap = force_vmap
    x = torch.randn(7, 2, dtype=torch.float64)
    out = stacked(x)
    assert out.shape == (3, 7, 1)
    for i, m in enumerate(members):
        torch.testing.assert_close(out[i], m(x))
        torch.testing.assert_close(stacked.member(i)(x), m(x))
    with pytest.raises(ValueError, match="buffers"):
        models.Stacked([models.MLP(2, (4,), 1, norm="batch")])


@pytest.mark.parametrize("method", ["adlala", "sgd", "adam"])
def test_batched_seeds_equal_separate_runs(method):
    # deterministic settings (τ = σ = 0) so the noise streams do not have to match; the AdLa
    # thermostat still acts (C, E), and its ξ must be per replica
    ds = data.spirals(200, seed=0)
    ds = dataclasses.replace(ds, x_train=ds.x_train.double(), x_test=ds.x_test.double())
    members = _members()
    singles = [models.MLP(2, (32,), 1).double() for _ in members]
    for a, b in zip(singles, members):
        a.load_state_dict(b.state_dict())
    stacked = models.Stacked(members)
    bce = lambda o, y: F.binary_cross_entropy_with_logits(o.squeeze(-1), y.double())  # noqa: E731

    def make(model, pattern, rd):
        if method == "adlala":
            return L.adlala(model, pattern, tau=0.0, sigma=0.0, replica_dims=rd)
        if method == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=5e-3)

    opt = make(stacked, "net.fc1.*", 1)
    train.fit(stacked, ds, optimizer=opt, epochs=3, batch_size=25, loss_fn=models.stacked_loss(bce),
              eval_every=0, generator=torch.Generator().manual_seed(3), progress=False)
    for i, m in enumerate(singles):
        o = make(m, "fc1.*", 0)
        train.fit(m, ds, optimizer=o, epochs=3, batch_size=25, loss_fn=bce, eval_every=0,
                  generator=torch.Generator().manual_seed(3), progress=False)
        for (n, p), q in zip(stacked.named_parameters(), m.parameters()):
            torch.testing.assert_close(p[i], q, rtol=1e-9, atol=1e-11, msg=n)
        if method == "adlala":
            xi_b = opt.state[stacked.net.fc1.weight]["xi"]
            assert xi_b.shape == (3,)
            assert float(xi_b[i]) == pytest.approx(float(o.state[m.fc1.weight]["xi"]), rel=1e-9)
