"""Tests for landscape_lib.optim.sgld and EntropySGD: exact Gaussian references on quadratics,
a hand-written two-step reference, scoping, fresh batches through train.fit, errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from landscape_lib import data, models, train
from landscape_lib.optim import SGLD, EntropySGD, sgld_step_


def test_sgld_samples_the_discrete_chains_gaussian():
    # U = ½ a θ², temperature T: the discrete chain's stationary variance is T / (a (1 − ηa/2))
    a, lr, noise = 2.0, 0.05, 0.7
    theta = torch.full((20000,), 3.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        sgld_step_(theta, a * theta, lr, noise, g)
    var = noise ** 2 / (a * (1 - lr * a / 2))
    assert abs(float(theta.mean())) < 4 * math.sqrt(var / len(theta))
    assert abs(float(theta.var()) / var - 1) < 0.04  # sd of a sample variance of 20000: 1 %


def test_sgld_without_noise_is_gradient_descent_and_the_optimizer_agrees():
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = SGLD([p], lr=0.1, noise=0.0, weight_decay=0.5)
    p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [1.0 - 0.1 * (0.3 + 0.5), -2.0 - 0.1 * (0.4 - 1.0)])


def quadratic(p, opt, a):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (a * p * p).sum()
        loss.backward()
        return loss
    return closure


def test_inner_running_mean_approaches_the_local_gibbs_mean():
    """f(x') = ½ Σ a_i x'_i²: the local Gibbs measure ∝ exp(−(f(x') + γ/2‖x − x'‖²)/ε²) is Gaussian
    with mean γx/(a + γ) and variance ε²/(a + γ). μ (an EMA of the chain) must sit within 5 of its
    own standard deviations (computed for the AR(1) chain) of that mean, coordinate by coordinate."""
    d, gamma, eps, lr, alpha, L = 400, 1.0, 0.5, 0.05, 0.005, 4000
    a = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    x0 = torch.ones(d, dtype=torch.float64)
    p = nn.Parameter(x0.clone())
    opt = EntropySGD([p], lr=1.0, L=L, inner_lr=lr, noise=eps, alpha=alpha, gamma0=gamma, gamma1=0.0,
                     momentum=0.0, generator=torch.Generator().manual_seed(1))
    opt.step(quadratic(p, opt, a))
    mu = opt.state[p]["mu"]
    want = gamma * x0 / (a + gamma)
    # sd of an EMA (weight α) of an AR(1) chain x_k = r x_{k-1} + noise, stationary variance s²
    r = 1 - lr * (a + gamma)
    s2 = eps ** 2 / ((a + gamma) * (1 - lr * (a + gamma) / 2))
    q = 1 - alpha
    sd = torch.sqrt(alpha ** 2 * s2 * (1 + q * r) / ((1 - q ** 2) * (1 - q * r)))
    z = (mu - want) / sd
    assert float(z.abs().max()) < 5.0
    assert abs(float(z.mean())) < 5.0 / math.sqrt(d) * 1.5  # no common bias
    # lr = 1, no momentum: the outer step lands on μ exactly
    torch.testing.assert_close(p.detach(), mu)


def reference(x, grad, steps, L, inner_lr, alpha, gamma0, gamma1, lr, m, nesterov):
    """Entropy-SGD without noise, written out in NumPy."""
    x, buf = np.array(x, dtype=np.float64), None
    for t in range(steps):
        gamma = gamma0 * (1 + gamma1) ** t
        xp, mu = x.copy(), x.copy()
        for _ in range(L):
            xp = xp - inner_lr * (grad(xp) + gamma * (xp - x))
            mu = (1 - alpha) * mu + alpha * xp
        d = x - mu
        buf = d.copy() if buf is None else m * buf + d
        x = x - lr * ((d + m * buf) if nesterov else buf)
    return x


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_the_written_out_algorithm_with_scoping_and_momentum(nesterov):
    A = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    x0 = [1.5, -1.0]
    kw = dict(L=3, inner_lr=0.2, alpha=0.4, gamma0=0.5, gamma1=0.7)
    p = nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = EntropySGD([p], lr=0.8, noise=0.0, momentum=0.6, nesterov=nesterov, **kw)

    def closure():
        opt.zero_grad()
        loss = 0.5 * p @ A @ p + (p ** 4).sum() / 4
        loss.backward()
        return loss
    for _ in range(4):
        opt.step(closure)
    want = reference(x0, lambda v: A.numpy() @ v + v ** 3, 4, lr=0.8, m=0.6, nesterov=nesterov, **kw)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)


def test_the_step_counter_increments_so_scoping_works():
    p = nn.Parameter(torch.zeros(3))
    opt = EntropySGD([p], L=2, gamma0=0.03, gamma1=1e-2)
    closure = quadratic(p, opt, torch.ones(3))
    assert opt.gamma() == 0.03
    for _ in range(25):
        opt.step(closure)
    assert opt.param_groups[0]["t"] == 25
    assert math.isclose(opt.gamma(), 0.03 * 1.01 ** 25, rel_tol=1e-12)


def test_fit_draws_a_fresh_batch_per_inner_step_and_counts_every_evaluation():
    ds = data.load("spirals")
    torch.manual_seed(0)
    model = models.MLP(2, (16,), ds.n_classes)
    L = 3
    seen = []

    def loss_fn(out, y):  # records which batch each closure call saw
        seen.append(tuple(y[:8].tolist()) + (len(y),))
        return nn.functional.cross_entropy(out, y)
    opt = EntropySGD(model.parameters(), lr=0.5, L=L, inner_lr=0.05, generator=torch.Generator().manual_seed(0))
    hist = train.fit(model, ds, optimizer=opt, epochs=2, batch_size=50, loss_fn=loss_fn, eval_every=0,
                     generator=torch.Generator().manual_seed(0), progress=False)
    steps = hist.last("step")
    per_epoch = math.ceil(len(ds.x_train) / 50)
    assert hist.last("grad_evals") == hist.last("batches") == L * steps == len(seen)
    assert hist.last("effective_epochs") == L * steps / per_epoch
    assert 2 <= hist.last("effective_epochs") < 2 + L / per_epoch  # ≈ the fit epochs: one eval per batch
    assert len(set(seen[:L])) == L  # the inner steps of one outer step see different batches
    assert opt.param_groups[0]["t"] == steps


def test_errors_name_the_valid_ranges():
    p = [nn.Parameter(torch.zeros(2))]
    for kw, msg in [(dict(L=0), "integer >= 1"), (dict(L=2.5), "integer >= 1"),
                    (dict(gamma0=-0.1), "gamma0 must be >= 0"), (dict(gamma1=-1e-3), "gamma1 must be >= 0"),
                    (dict(noise=-1e-4), "noise must be >= 0"), (dict(inner_lr=0.0), "positive"),
                    (dict(alpha=0.0), r"\(0, 1\]"), (dict(momentum=1.0), r"\[0, 1\)"), (dict(lr=-1.0), "positive")]:
        with pytest.raises(ValueError, match=msg):
            EntropySGD(p, **kw)
    with pytest.raises(ValueError, match="noise scale"):
        sgld_step_(torch.zeros(2), torch.zeros(2), 0.1, -1.0)
    with pytest.raises(ValueError, match="step size must be positive"):
        SGLD(p, lr=0.0)
    with pytest.raises(ValueError, match="closure"):
        EntropySGD(p).step()


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_gaussian_like_is_the_generator_draw_in_the_tensor_dtype():
    from landscape_lib.optim.sgld import gaussian_like
    p = torch.zeros(2, 3, dtype=torch.float64)
    z = gaussian_like(p, torch.Generator().manual_seed(4))
    ref = torch.randn((2, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, ref, rtol=0, atol=0)


def test_sgld_defaults_and_one_seeded_step():
    """θ ← θ − lr·(g + λθ) + √(2·lr)·noise·ξ with ξ the generator's draw."""
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert SGLD([w]).defaults == dict(lr=1e-3, noise=1.0, weight_decay=0.0)
    opt = SGLD([w], lr=0.02, noise=0.5, weight_decay=0.1, generator=torch.Generator().manual_seed(7))
    w.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    opt.step()
    xi = torch.randn(2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w0, g = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    ref = w0 - 0.02 * (g + 0.1 * w0)
    torch.testing.assert_close(w.detach(), ref + math.sqrt(0.04) * 0.5 * xi, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        SGLD([w], weight_decay=-1.0)


def test_entropy_sgd_defaults():
    w = nn.Parameter(torch.zeros(2))
    d = EntropySGD([w]).defaults
    assert d == dict(lr=1.0, L=20, inner_lr=0.1, noise=1e-4, alpha=0.25, gamma0=0.03, gamma1=1e-3,
                     momentum=0.9, nesterov=True, weight_decay=0.0, t=0)
    assert isinstance(d["weight_decay"], float)
    assert EntropySGD([w], L=1, alpha=1.0).defaults["L"] == 1  # L = 1 and α = 1 are allowed


@pytest.mark.parametrize("kw,message", [
    (dict(lr=0.0), "lr must be a positive number, got 0.0"),
    (dict(inner_lr=-1.0), "inner_lr (the SGLD step η') must be a positive number, got -1.0"),
    (dict(noise=-1.0), "noise must be >= 0 (the SGLD noise scale ε; 0 means no noise), got -1.0"),
    (dict(gamma0=-1.0), "gamma0 must be >= 0 (the scope γ₀), got -1.0"),
    (dict(gamma1=-1.0), "gamma1 must be >= 0 (the scoping rate γ₁), got -1.0"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0, got -1.0"),
    (dict(alpha=1.5), "alpha must lie in (0, 1], got 1.5"),
    (dict(L=0), "L (SGLD steps per outer step) must be an integer >= 1, got 0"),
])
def test_entropy_sgd_rejects_each_bad_argument_by_name(kw, message):
    import re
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        EntropySGD([nn.Parameter(torch.zeros(2))], **kw)


def test_entropy_sgd_noise_comes_from_its_generator():
    """Two runs from one seed give the same weights, whatever the global RNG does between."""
    def run(global_seed):
        torch.manual_seed(0)
        w = nn.Parameter(torch.tensor([1.0, -1.0]))
        opt = EntropySGD([w], L=2, noise=0.1, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(global_seed)

        def closure():
            opt.zero_grad()
            loss = (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach().clone()

    torch.testing.assert_close(run(1), run(2), rtol=0, atol=0)


def test_sgld_step_on_a_0d_tensor_and_zero_noise_draws_nothing():
    # θ = 1, g = 0.5, lr = 0.1, ε = 0: θ − lr·g = 0.95, and the generator is not advanced
    theta = torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    assert sgld_step_(theta, torch.tensor(0.5, dtype=torch.float64), 0.1, 0.0, g) is theta
    assert float(theta) == 1.0 - 0.1 * 0.5
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(2).get_state())


def test_sgld_without_noise_is_torch_sgd_with_unit_and_zero_weight_decay():
    # weight_decay = 1 decays like any other value; weight_decay = 0 never reads the weight (an
    # infinite weight stays inf instead of turning the gradient into inf·0 = nan)
    for wd, w0 in ((1.0, [1.0, -2.0]), (0.0, [float("inf"), -2.0])):
        a = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
        b = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
        opt_a = SGLD([a], lr=0.1, noise=0.0, weight_decay=wd)
        opt_b = torch.optim.SGD([b], lr=0.1, weight_decay=wd)
        for p in (a, b):
            p.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
        assert opt_a.step() is None
        opt_b.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_entropy_sgd_returns_the_first_closure_loss_and_keeps_no_buffer_without_momentum():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = EntropySGD([w], L=3, noise=0.0, momentum=0.0)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum() + len(calls)  # 2, 3, 4 (+ the moving weights' change)
        calls.append(float(loss.detach()))
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert len(calls) == 3 and float(loss.detach()) == calls[0] == 2.0
    assert set(opt.state[w]) == {"mu"}  # momentum = 0: no momentum buffer


def test_entropy_sgd_closure_message_in_full():
    with pytest.raises(ValueError, match=r"^EntropySGD needs a closure \(zero_grad, forward, backward, "
                                         r"return loss\): the inner loop evaluates it L times$"):
        EntropySGD([nn.Parameter(torch.zeros(2))]).step()
