"""Tests for landscape_lib.optim.Padam: a hand-written reference update and PyTorch's Adam(W)."""
import math

import numpy as np
import pytest
import torch

from landscape_lib import data, models, train
from landscape_lib.optim import Padam


def reference_padam(theta0, grads, lr, betas, eps, wd, partial, amsgrad, decoupled):
    """The Padam update written out in NumPy, one step at a time (the module docstring)."""
    theta = np.array(theta0, dtype=np.float64)
    m, v, vmax = np.zeros_like(theta), np.zeros_like(theta), np.zeros_like(theta)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = np.array(g, dtype=np.float64)
        if decoupled:
            theta = theta * (1 - lr * wd)
        else:
            g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        vh = vmax if amsgrad else v
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        theta = theta - step * m / (np.sqrt(vh) + eps) ** (2 * partial)
    return theta


def run_padam(theta0, grads, **kw):
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = Padam([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


# gradients that shrink after two steps, so that the AMSGrad maximum differs from v_t
GRADS = [[3.0, -1.0, 0.5, 0.0], [2.5, -0.2, 0.4, 1.0], [0.1, 0.05, -0.3, 0.2],
         [0.05, -0.01, 0.2, -0.1], [0.02, 0.3, 0.1, 0.05]]
THETA0 = [1.0, -2.0, 0.5, 3.0]


@pytest.mark.parametrize("partial", [0.125, 0.25, 0.5])
@pytest.mark.parametrize("amsgrad", [True, False])
@pytest.mark.parametrize("decoupled", [True, False])
def test_matches_hand_written_reference(partial, amsgrad, decoupled):
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, partial=partial, amsgrad=amsgrad)
    got = run_padam(THETA0, GRADS, decoupled_weight_decay=decoupled, **kw)
    want = reference_padam(THETA0, GRADS, decoupled=decoupled, wd=kw.pop("weight_decay"), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_amsgrad_max_changes_the_update():
    # the gradients shrink and β₂ = 0.5 forgets fast, so max v̂ > v_t: AMSGrad takes smaller
    # steps on coordinates 0 and 2, whose gradients shrank most
    kw = dict(lr=0.1, betas=(0.9, 0.5), weight_decay=0.0, partial=0.125)
    with_max = run_padam(THETA0, GRADS, amsgrad=True, **kw)
    without = run_padam(THETA0, GRADS, amsgrad=False, **kw)
    moved = np.abs(np.array(THETA0) - with_max), np.abs(np.array(THETA0) - without)
    assert moved[0][0] < moved[1][0] - 1e-4 and moved[0][2] < moved[1][2] - 1e-4


def test_partial_zero_is_bias_corrected_momentum_sgd():
    # p = 0: θ ← θ − η √(1−β₂ᵗ)/(1−β₁ᵗ) m_t, independent of v
    got = run_padam(THETA0, GRADS, lr=0.1, partial=0.0, weight_decay=0.0)
    theta, m = np.array(THETA0), np.zeros(4)
    for t, g in enumerate(GRADS, start=1):
        m = 0.9 * m + 0.1 * np.array(g)
        theta = theta - 0.1 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m
    np.testing.assert_allclose(got, theta, rtol=1e-12)


def _train_pair(make_reference, **padam_kw):
    """Five steps on an MLP from one initialisation: Padam vs a PyTorch optimizer."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(models.MLP(6, hidden=(8,), n_classes=3).double())
    opts = [Padam(nets[0].parameters(), **padam_kw), make_reference(nets[1].parameters())]
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return [torch.cat([p.detach().flatten() for p in n.parameters()]) for n in nets]


@pytest.mark.parametrize("amsgrad", [True, False])
def test_half_partial_is_adamw(amsgrad):
    # p = ½, ε = 0: (√v̂)·√(1−β₂ᵗ)⁻¹ is exactly AdamW's denominator
    a, b = _train_pair(lambda ps: torch.optim.AdamW(ps, lr=0.01, eps=0.0, weight_decay=0.1, amsgrad=amsgrad),
                       lr=0.01, eps=0.0, weight_decay=0.1, partial=0.5, amsgrad=amsgrad)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_half_partial_with_l2_is_adam():
    a, b = _train_pair(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=0.0, weight_decay=0.01, amsgrad=True),
                       lr=0.01, eps=0.0, weight_decay=0.01, partial=0.5, amsgrad=True,
                       decoupled_weight_decay=False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_trains_through_fit_with_a_closure():
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    ds = data.Dataset("halfplane", x, y, x, y, 2)
    net = models.MLP(2, hidden=(32, 32), n_classes=2)
    before = train.evaluate(net, ds.x_train, ds.y_train)["loss"]
    hist = train.fit(net, ds, optimizer=Padam(net.parameters(), lr=0.05, weight_decay=1e-3),
                     epochs=15, batch_size=50, progress=False)
    assert hist.last("train_loss") < 0.7 * before


def test_bad_hyperparameters_are_rejected():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="partial"):
        Padam(p, partial=0.7)
    with pytest.raises(ValueError, match="lr"):
        Padam(p, lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        Padam(p, betas=(1.0, 0.999))


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_padam_defaults_and_boundaries():
    w = torch.nn.Parameter(torch.zeros(2))
    d = Padam([w]).defaults
    assert (d["lr"], d["weight_decay"], d["amsgrad"], d["partial"]) == (0.1, 0.0, True, 0.125)
    Padam([w], betas=(0.0, 0.0))  # β = 0 is allowed
    for betas in ((0.9, 1.0), (0.9, 1.5)):
        with pytest.raises(ValueError, match="betas must lie in"):
            Padam([w], betas=betas)
    with pytest.raises(ValueError, match="eps and weight_decay must be >= 0"):
        Padam([w], eps=-1.0)


def test_unit_weight_decay_is_adamw_and_step_returns_none_without_closure():
    # λ = 1 decays like any other λ (p = ½, ε = 0 is AdamW): θ(1 − ηλ) before the update
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = Padam([a], lr=0.01, eps=0.0, weight_decay=1.0, partial=0.5, amsgrad=False)
    opt_b = torch.optim.AdamW([b], lr=0.01, eps=0.0, weight_decay=1.0)
    for g in GRADS[:3]:
        for p in (a, b):
            p.grad = torch.tensor(g[:3], dtype=torch.float64)
        assert opt_a.step() is None
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
