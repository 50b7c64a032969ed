"""Tests for landscape_lib.manifolds and optim.ConstrainedLangevin (c-CoLA, o-CoLA, C-SGLD).

References: a dense projection built from the constraint's Jacobian (autograd), PyTorch's
``parametrizations.orthogonal`` (QR with diag R > 0) and SciPy's polar decomposition, PyTorch's
SGD, and the analytic Gibbs measures on a circle (von Mises, arcsine)."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch import nn

from landscape_lib import data, manifolds, models, train
from landscape_lib.manifolds import Circle, Sphere, Stiefel
from landscape_lib.optim import ConstrainedLangevin, constrained_groups

DT = torch.float64


def on_manifold(m, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=DT) * 0.3
    return m.init_project(p, {})


CASES = [("circle", lambda: Circle(0.5), (3, 2)),
         ("sphere", lambda: Sphere(2.0), (4, 3)),
         ("sphere-vector", lambda: Sphere(1.0), (5,)),
         ("stiefel-tall", lambda: Stiefel(), (6, 3)),
         ("stiefel-wide", lambda: Stiefel(), (3, 6)),
         ("stiefel-square", lambda: Stiefel("polar"), (4, 4)),
         ("stiefel-conv", lambda: Stiefel(), (4, 2, 3))]


def dense_projector(m, q):
    """I − Jᵀ (J Jᵀ)⁺ J from the Jacobian J of the constraint function g at q."""
    jac = torch.autograd.functional.jacobian(lambda x: m.constraint(x).reshape(-1), q)
    j = jac.reshape(jac.shape[0], -1)
    return torch.eye(q.numel(), dtype=DT) - torch.linalg.pinv(j) @ j, j


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_tangent_projection_matches_dense_reference(name, make, shape):
    m = make()
    q = on_manifold(m, shape)
    assert m.residual(q) < 1e-12
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    proj, j = dense_projector(m, q)
    t = m.tangent(q, v)
    np.testing.assert_allclose(t.reshape(-1).numpy(), (proj @ v.reshape(-1)).numpy(), atol=1e-10)
    # orthogonal to the normal space (J t = 0), the rest normal, and idempotent
    assert float((j @ t.reshape(-1)).abs().max()) < 1e-10
    assert float((proj @ (v - t).reshape(-1)).abs().max()) < 1e-10
    torch.testing.assert_close(m.tangent(q, t), t)


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_shake_lands_on_manifold_along_the_old_normal(name, make, shape):
    m = make()
    q = on_manifold(m, shape)
    g = torch.Generator().manual_seed(2)
    trial = q + 0.05 * torch.randn(q.shape, generator=g, dtype=DT)
    q_new, iters = m.solve_position(q, trial)
    assert m.residual(q_new) < m.tolerance(q_new) and iters >= 1
    proj, _ = dense_projector(m, q)  # the correction q_new − trial lies in the normal space at q
    assert float((proj @ (q_new - trial).reshape(-1)).abs().max()) < 1e-9


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_stiefel_qr_init_equals_torch_orthogonal_parametrization(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]).double()
    w0 = layer.weight.detach().clone()
    ours = torch.empty_like(w0)
    m = Stiefel("qr")
    m.write(ours, m.init_project(w0), {})
    nn.utils.parametrizations.orthogonal(layer, orthogonal_map="matrix_exp")
    torch.testing.assert_close(ours, layer.weight.detach(), atol=1e-10, rtol=0)
    k = min(shape)
    gram = ours.T @ ours if shape[0] >= shape[1] else ours @ ours.T
    torch.testing.assert_close(gram, torch.eye(k, dtype=DT), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (3, 2, 2)])
def test_stiefel_polar_init_is_scipy_polar(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    m = Stiefel("polar")
    ours = torch.empty_like(w)
    m.write(ours, m.init_project(w), {})
    mat = w.reshape(shape[0], -1).numpy()
    u, _ = scipy.linalg.polar(mat if mat.shape[0] >= mat.shape[1] else mat.T)
    want = u if mat.shape[0] >= mat.shape[1] else u.T
    np.testing.assert_allclose(ours.reshape(shape[0], -1).numpy(), want, atol=1e-10)


def test_circle_init_clamps_and_geodesic_stays_on_the_circle():
    m = Circle(0.1)
    w = torch.tensor([0.5, -0.05, 0.0, -3.0], dtype=DT)
    state = {}
    q = m.init_project(w, state)
    assert float(q[0].abs().max()) <= 0.1 and bool((q[1] >= 0).all()) and m.residual(q) < 1e-14
    v = m.tangent(q, torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=DT))
    q2, v2 = m.geodesic(q, v, 0.7)
    assert m.residual(q2) < 1e-12
    torch.testing.assert_close((v2 * v2).sum(0), (v * v).sum(0))  # speed conserved
    torch.testing.assert_close(m.tangent(q2, v2), v2)


def _mlp(seed=0, hidden=(32, 32), act="relu"):
    torch.manual_seed(seed)
    return models.MLP(40, hidden, 10, act=act)


def test_unconstrained_zero_temperature_is_torch_sgd():
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    a, b = _mlp(), _mlp()
    opt_a = ConstrainedLangevin(a.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-3)
    for _ in range(6):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("constraint,dynamics,temperature", [
    ("circle", "underdamped", 0.0), ("circle", "underdamped", 1e-4), ("circle", "overdamped", 1e-4),
    ("sphere", "underdamped", 0.0), ("stiefel", "underdamped", 0.0), ("stiefel", "overdamped", 1e-5)])
def test_residuals_below_card_tolerances_after_every_step(mnist1d, constraint, dynamics, temperature):
    model = _mlp(act="tanh", hidden=(48, 48, 24))
    radius = (lambda n, p: manifolds.radius_by_fan_in(p, 1.4)) if constraint == "circle" else 1.0
    groups = constrained_groups(model, constraint, radius=radius,
                                skip=("fc1.weight",) if constraint == "stiefel" else ())
    opt = ConstrainedLangevin(groups, lr=0.05, momentum=0.9, temperature=temperature,
                              dynamics=dynamics, generator=torch.Generator().manual_seed(0))
    x, y = mnist1d.x_train[:512], mnist1d.y_train[:512]
    radii = {id(g["params"][0]): g["radius"] for g in groups if g["constraint"]}
    losses = []
    for step in range(40):
        i = torch.arange(step * 64, step * 64 + 64) % 512
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        for r in opt.residuals():
            tol = 1e-4 if constraint == "stiefel" else 1e-5
            assert r["residual"] < tol, (step, r)
        if constraint == "circle":
            for p in model.parameters():
                if id(p) in radii:
                    assert float(p.detach().abs().max()) <= radii[id(p)] * (1 + 1e-6)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it trains


def test_von_mises_gibbs_measure_on_the_circle():
    # rows of a (N, 2) tensor on the unit circle (Sphere), L = -κ Σ x₁, at temperature τ: the
    # invariant measure ∝ exp(κ cos φ / τ), so E cos φ = I₁(κ/τ)/I₀(κ/τ)
    kappa, tau, n = 1.0, 1.0, 2000
    want = scipy.special.iv(1, kappa / tau) / scipy.special.iv(0, kappa / tau)
    for dynamics, lr in (("underdamped", 0.01), ("overdamped", 0.01)):
        q = nn.Parameter(torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=DT))
        opt = ConstrainedLangevin([q], lr=lr, momentum=0.9, temperature=tau, dynamics=dynamics,
                                  constraint="sphere", radius=1.0,
                                  generator=torch.Generator().manual_seed(1))
        grad = torch.zeros(n, 2, dtype=DT)
        grad[:, 0] = -kappa
        means = []
        for t in range(1500):
            q.grad = grad
            opt.step()
            if t >= 500:
                means.append(float(q[:, 0].mean()))
        assert abs(np.mean(means) - want) < 0.02, (dynamics, np.mean(means), want)
        assert opt.max_residual() < 1e-6


def test_circle_prior_is_arcsine_and_momentum_has_temperature_tau():
    # L = 0: (w, ξ) uniform on the circle of radius r, so E w² = r²/2; the tangent momentum
    # p = -h·buf (h = √lr) has E|p|² = τ (one degree of freedom per weight)
    r, tau, lr = 0.5, 0.3, 0.01
    w = nn.Parameter(torch.zeros(3000, dtype=DT))
    opt = ConstrainedLangevin([w], lr=lr, momentum=0.8, temperature=tau, constraint="circle",
                              radius=r, generator=torch.Generator().manual_seed(0))
    w2, kin = [], []
    for t in range(1200):
        w.grad = torch.zeros_like(w)
        opt.step()
        if t >= 400:
            w2.append(float((w * w).mean()))
            buf = opt.state[w]["momentum_buffer"]
            kin.append(float(lr * (buf * buf).sum(0).mean()))
    assert abs(np.mean(w2) / (r * r / 2) - 1) < 0.03
    assert abs(np.mean(kin) / tau - 1) < 0.05


def test_errors_name_the_valid_choices():
    model = _mlp()
    with pytest.raises(ValueError, match="stiefel constraint needs a matrix"):
        ConstrainedLangevin([model.fc1.bias], constraint="stiefel")
    with pytest.raises(ValueError, match="sphere constraint needs"):
        ConstrainedLangevin([nn.Parameter(torch.tensor(1.0))], constraint="sphere", radius=1.0)
    with pytest.raises(ValueError, match="valid choices: none, circle, sphere, stiefel"):
        ConstrainedLangevin(model.parameters(), constraint="orthogonal")
    with pytest.raises(ValueError, match="needs radius"):
        ConstrainedLangevin(model.parameters(), constraint="circle")
    with pytest.raises(ValueError, match="radius r must be a positive"):
        Circle(0.0)
    for kw, msg in ((dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(temperature=-1e-3), "temperature"),
                    (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
                    (dict(dynamics="langevin"), "valid choices: underdamped, overdamped")):
        with pytest.raises(ValueError, match=msg):
            ConstrainedLangevin(model.parameters(), **kw)
    with pytest.raises(ValueError, match="valid choices: qr, polar"):
        Stiefel("svd")
    with pytest.raises(ValueError, match="not parameters of the model"):
        constrained_groups(model, "stiefel", skip=("fc9.weight",))
    with pytest.raises(ValueError, match="lr"):  # a group's own bad value
        ConstrainedLangevin([{"params": [model.out.weight], "lr": -0.1}], lr=0.1)


def test_divergence_is_detected_with_step_and_hyperparameters(mnist1d):
    model = _mlp()
    opt = ConstrainedLangevin(constrained_groups(model, "stiefel"), lr=1e4, momentum=0.9)
    x, y = mnist1d.x_train[:64], mnist1d.y_train[:64]
    with pytest.raises(train.Diverged, match=r"step 1.*did not converge.*'lr': 10000"):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    p = nn.Parameter(torch.ones(3, 2))
    opt = ConstrainedLangevin([p], lr=0.1, constraint="sphere", radius=1.0)
    p.grad = torch.tensor([[float("nan"), 0.0], [0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(train.Diverged, match="non-finite gradient"):
        opt.step()


def test_trains_through_fit_and_forks(mnist1d):
    small = data.Dataset("m", mnist1d.x_train[:256], mnist1d.y_train[:256], mnist1d.x_test[:256],
                         mnist1d.y_test[:256], 10)
    model = _mlp()
    opt = ConstrainedLangevin(constrained_groups(model, "circle", radius=0.2), lr=0.09, momentum=0.74)
    h = train.fit(model, small, optimizer=opt, epochs=2, batch_size=64,
                  generator=torch.Generator().manual_seed(0))
    f = train.fork(model, opt)
    assert len(h) == 2 and opt.max_residual() < 1e-5 and f.optimizer.max_residual() < 1e-5
    xi = opt.state[model.fc1.weight]["xi"]
    assert f.optimizer.state[f.model.fc1.weight]["xi"] is not xi
    torch.testing.assert_close(f.optimizer.state[f.model.fc1.weight]["xi"], xi)


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def _one_free_step(seed=5, **kw):
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = ConstrainedLangevin([w], generator=torch.Generator().manual_seed(seed), **kw)
    w.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    opt.step()
    xi = torch.randn(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64), w.grad, xi


@pytest.mark.parametrize("dynamics,momentum,factor", [
    ("overdamped", 0.9, 2.0),   # θ − lr g + √(2 lr τ) ξ
    ("underdamped", 0.0, 1.0),  # no momentum: θ − lr g + √(lr τ) ξ
])
def test_unconstrained_noisy_step_without_momentum_is_hand_computed(dynamics, momentum, factor):
    lr, tau = 0.1, 0.5
    w, w0, g, xi = _one_free_step(lr=lr, momentum=momentum, temperature=tau, dynamics=dynamics)
    torch.testing.assert_close(w, w0 - lr * g + math.sqrt(factor * lr * tau) * xi, rtol=1e-12, atol=1e-12)


def test_unconstrained_noisy_momentum_step_is_hand_computed():
    """First step: b = g + √((1 − μ²) τ / lr) ξ, θ ← θ − lr b."""
    lr, mu, tau = 0.1, 0.6, 0.5
    w, w0, g, xi = _one_free_step(lr=lr, momentum=mu, temperature=tau)
    torch.testing.assert_close(w, w0 - lr * (g + math.sqrt((1 - mu * mu) * tau / lr) * xi),
                               rtol=1e-12, atol=1e-12)


def test_constrained_langevin_defaults_monitor_and_messages():
    w = nn.Parameter(torch.zeros(2))
    opt = ConstrainedLangevin([w])
    assert opt.defaults["lr"] == 0.1 and opt.defaults["temperature"] == 0.0
    assert opt.max_residual() == 0.0  # no constrained parameter
    s = nn.Parameter(torch.tensor([3.0, 4.0, 0.0]))
    ConstrainedLangevin([s], constraint="sphere", radius=2.0)
    torch.testing.assert_close(s.detach(), torch.tensor([1.2, 1.6, 0.0]))  # projected onto r = 2
    s.grad = torch.tensor([float("inf"), 0.0, 0.0])
    opt = ConstrainedLangevin([s], constraint="sphere", radius=2.0)
    with pytest.raises(train.Diverged, match=r"^ConstrainedLangevin diverged at step 1, param group 0"):
        opt.step()


def test_constrained_groups_keys_radius_function_and_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    radii = {"0.weight": 1.5, "2.weight": 2.5}
    groups = constrained_groups(model, "sphere", radius=lambda name, p: radii[name], lr=0.05)
    assert [g["name"] for g in groups] == ["0.weight", "2.weight", "unconstrained"]
    assert [g.get("radius") for g in groups[:2]] == [1.5, 2.5]
    assert groups[-1]["constraint"] is None and len(groups[-1]["params"]) == 2
    assert all(g["lr"] == 0.05 for g in groups)
    with pytest.raises(ValueError, match=r"valid names: 0\.bias, 0\.weight, 2\.bias, 2\.weight$"):
        constrained_groups(model, "sphere", skip=("nope",))


def test_residuals_report_each_constrained_parameter_by_group_and_index():
    # group 0 is unconstrained (skipped, not the end of the list), group 1 holds two sphere rows
    free = nn.Parameter(torch.zeros(2, dtype=DT))
    a = nn.Parameter(torch.tensor([3.0, 4.0], dtype=DT))
    b = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DT))
    opt = ConstrainedLangevin([{"params": [free]},
                               {"params": [a, b], "constraint": "sphere", "radius": 2.0}])
    with torch.no_grad():
        a.copy_(torch.tensor([2.0, 2.0], dtype=DT))  # |a|² = 8: residual |8 − 4| / 4 = 1
        b.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=DT))  # |b|² = 4: on the sphere, residual 0
    assert opt.residuals() == [
        dict(group=1, index=0, shape=(2,), constraint="Sphere(r=2)", residual=1.0),
        dict(group=1, index=1, shape=(1, 4), constraint="Sphere(r=2)", residual=0.0)]
    assert opt.max_residual() == 1.0


def test_one_constrained_step_on_the_unit_circle_by_hand():
    """q = (1, 0), g = (0, 1.2), lr = 0.5, τ = 0: B gives b = (0, 1.2), the trial point (1, −0.6);
    SHAKE moves along q to (0.8, −0.6); RATTLE: (q − q')/lr = (0.4, 1.2), minus its component
    along q' (q'·v = 0.32 − 0.72 = −0.4): b = (0.4 + 0.32, 1.2 − 0.24) = (0.72, 0.96)."""
    q = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DT))
    gen = torch.Generator().manual_seed(3)
    opt = ConstrainedLangevin([q], lr=0.5, momentum=0.9, constraint="sphere", radius=1.0, generator=gen)
    q.grad = torch.tensor([0.0, 1.2], dtype=DT)
    assert opt.step() is None
    torch.testing.assert_close(q.detach(), torch.tensor([0.8, -0.6], dtype=DT), rtol=0, atol=1e-12)
    state = opt.state[q]
    torch.testing.assert_close(state["momentum_buffer"], torch.tensor([[0.72, 0.96]], dtype=DT),
                               rtol=0, atol=1e-12)
    row = torch.tensor([[1.0, 0.0]], dtype=DT)
    _, iters = Sphere(1.0).solve_position(row, torch.tensor([[1.0, -0.6]], dtype=DT))
    assert state["shake_iters"] == iters and iters >= 2
    # τ = 0 draws no noise: the generator is where its seed left it
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())


def test_zero_temperature_overdamped_constrained_step_draws_no_noise():
    q = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DT))
    gen = torch.Generator().manual_seed(3)
    opt = ConstrainedLangevin([q], lr=0.5, dynamics="overdamped", constraint="sphere", radius=1.0,
                              generator=gen)
    q.grad = torch.tensor([0.0, 1.2], dtype=DT)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([0.8, -0.6], dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())
    assert "momentum_buffer" not in opt.state[q]


def test_divergence_messages_name_the_step_and_the_group():
    free = nn.Parameter(torch.zeros(2, dtype=DT))
    q = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DT))
    opt = ConstrainedLangevin([{"params": [free]}, {"params": [q], "constraint": "sphere", "radius": 1.0}],
                              lr=0.5, dynamics="overdamped")
    free.grad = torch.zeros(2, dtype=DT)
    q.grad = torch.zeros(2, dtype=DT)
    opt.step()
    q.grad = torch.tensor([float("nan"), 0.0], dtype=DT)
    with pytest.raises(train.Diverged, match=r"^ConstrainedLangevin diverged at step 2, param group 1 "
                                             r"\(Sphere\(r=1\)\): non-finite gradient; hyperparameters"):
        opt.step()
    # the trial point q − lr g = (1, 0) − 0.5 (2, 0) is the origin: SHAKE has no normal to follow
    q.grad = torch.tensor([2.0, 0.0], dtype=DT)
    with pytest.raises(train.Diverged, match=r"^ConstrainedLangevin diverged at step 3, param group 1 "
                                             r"\(Sphere\(r=1\)\): SHAKE on the sphere constraint did not"):
        opt.step()


def test_rattle_velocity_from_a_loosely_solved_position_by_hand():
    """As above with SHAKE's tolerance 0.1: one Newton step, φ = 1.36 − 1 = 0.36, φ' = 2·1:
    q' = (1 − 0.18, −0.6) = (0.82, −0.6), |q'|² = 1.0324 (residual 0.0324 < 0.1). RATTLE:
    v = (q − q')/lr = (0.36, 1.2), q'·v = 0.2952 − 0.72 = −0.4248,
    b = v + 0.4248 q' = (0.36 + 0.348336, 1.2 − 0.25488) = (0.708336, 0.94512)."""
    q = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DT))
    opt = ConstrainedLangevin([q], lr=0.5, momentum=0.9, constraint=Sphere(1.0, tol=0.1))
    q.grad = torch.tensor([0.0, 1.2], dtype=DT)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([0.82, -0.6], dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[q]["momentum_buffer"], torch.tensor([[0.708336, 0.94512]], dtype=DT),
                               rtol=0, atol=1e-12)
    assert opt.state[q]["shake_iters"] == 1
