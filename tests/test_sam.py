"""Tests for landscape_lib.optim.SAM: hand-computed updates, the parameter filters, ASAM, BatchNorm."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from landscape_lib import data, models, train
from landscape_lib.optim import SAM, norm_parameters, sam_param_counts

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 2.0]])
B = np.array([1.0, -2.0, 0.5])
W0 = np.array([0.3, -1.2, 2.0])


def quad_grad(w):
    return A @ w - B  # f(w) = ½ wᵀAw − bᵀw


def quadratic_closure(p, opt):
    At, Bt = torch.tensor(A), torch.tensor(B)

    def closure():
        opt.zero_grad()
        loss = 0.5 * p @ At @ p - Bt @ p
        loss.backward()
        return loss
    return closure


def test_one_sam_step_equals_the_hand_computed_two_step_update():
    rho, lr = 0.3, 0.1
    p = nn.Parameter(torch.tensor(W0))
    opt = SAM([p], torch.optim.SGD, rho=rho, lr=lr)
    opt.step(quadratic_closure(p, opt))
    g = quad_grad(W0)
    e = rho * g / np.linalg.norm(g)
    want = W0 - lr * quad_grad(W0 + e)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)


def test_two_steps_with_momentum_match_the_reference():
    rho, lr, mom = 0.2, 0.05, 0.9
    p = nn.Parameter(torch.tensor(W0))
    opt = SAM([p], torch.optim.SGD, rho=rho, lr=lr, momentum=mom)
    for _ in range(2):
        opt.step(quadratic_closure(p, opt))
    w, buf = W0.copy(), None
    for _ in range(2):
        g = quad_grad(w)
        gt = quad_grad(w + rho * g / np.linalg.norm(g))
        buf = gt if buf is None else mom * buf + gt
        w = w - lr * buf
    np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12)


def test_asam_perturbation_matches_its_formula():
    rho, eta = 0.5, 0.01
    model = nn.Linear(3, 2).double()
    opt = SAM(model, torch.optim.SGD, rho=rho, lr=0.1, adaptive=True, eta=eta)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).sum().backward()
    w0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    g = {n: q.grad.clone() for n, q in model.named_parameters()}
    opt.first_step()
    # weights: T = |w| + η; the bias: T = 1 (normalize_bias=False, as in the ASAM code)
    T = {"weight": w0["weight"].abs() + eta, "bias": torch.ones_like(w0["bias"])}
    denom = math.sqrt(sum(float((T[n] * g[n]).pow(2).sum()) for n in g))
    for n, q in model.named_parameters():
        want = rho * T[n] ** 2 * g[n] / denom
        torch.testing.assert_close(q.detach() - w0[n], want, rtol=1e-10, atol=1e-12)


def test_linf_ball_is_rho_times_sign():
    model = nn.Linear(3, 2).double()
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, p=math.inf)
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    w0 = [q.detach().clone() for q in model.parameters()]
    opt.first_step()
    for q, q0 in zip(model.parameters(), w0):
        torch.testing.assert_close(q.detach() - q0, 0.1 * torch.sign(q.grad))


def bn_mlp(seed=0):
    torch.manual_seed(seed)
    return models.MLP(8, (16, 12), 3, norm="batch").double()


def batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("perturb", ["norm", "no-norm"])
def test_filter_zero_outside_and_total_norm_rho_inside(perturb):
    model = bn_mlp()
    rho = 0.7
    opt = SAM(model, torch.optim.SGD, rho=rho, lr=0.1, perturb=perturb)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt.first_step()
    # the norm set found by module type: bn1, bn2 weight and bias
    inside = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)
              for n in (f"{n}.weight", f"{n}.bias")}
    assert inside == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    if perturb == "no-norm":
        inside = set(w0) - inside
    sq = 0.0
    for n, q in model.named_parameters():
        e = q.detach() - w0[n]
        if n in inside:
            sq += float(e.pow(2).sum())
            assert e.abs().max() > 0
        else:
            assert torch.equal(e, torch.zeros_like(e)), n  # exactly zero
    assert math.isclose(math.sqrt(sq), rho, rel_tol=1e-9)


def test_norm_filter_finds_groupnorm_layernorm_and_unnamed_batchnorm():
    # names say nothing about the type: "downsample.1" is a BatchNorm, "x" a LayerNorm
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Identity(), nn.BatchNorm1d(6)),
                          nn.GroupNorm(2, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    found = {id(p) for p in norm_parameters(model)}
    want = {id(p) for m in (model[1][1], model[2], model[3]) for p in m.parameters()}
    assert found == want
    assert sam_param_counts(model)["norm"] == 6 * 2 * 3


def test_random_mask_has_the_requested_count_and_is_reproducible():
    model = bn_mlp()
    k = 37
    opt = SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, perturb="random", n_random=k,
              generator=torch.Generator().manual_seed(3))
    assert opt.perturbed_count() == k
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt.first_step()
    moved = {n: (q.detach() != w0[n]) for n, q in model.named_parameters()}
    masks = {n: (m if torch.is_tensor(m) else torch.full_like(w0[n], float(m))).bool()
             for n, m in zip(w0, opt._masks)}
    assert sum(int(m.sum()) for m in masks.values()) == k
    for n in w0:  # nothing moves outside the mask (a coordinate with zero gradient may not move)
        assert not (moved[n] & ~masks[n]).any()
    assert sum(int(m.sum()) for m in moved.values()) >= k - 5
    for n in ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"):  # drawn from the no-norm pool
        assert not moved[n].any()
    e = torch.cat([(q.detach() - w0[n]).flatten() for n, q in model.named_parameters()])
    assert math.isclose(float(e.norm()), 0.5, rel_tol=1e-9)
    opt2 = SAM(bn_mlp(), torch.optim.SGD, rho=0.5, lr=0.1, perturb="random", n_random=k,
               generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(opt._masks, opt2._masks))


@pytest.mark.parametrize("policy", ["freeze", "update"])
def test_batchnorm_statistics_updated_once_per_step_when_frozen(policy):
    x, y = batch()
    model = bn_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.5, lr=0.1, bn=policy)
    model.train()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    # reference: one plain train-mode forward at w (what the first pass does to the statistics)
    ref = bn_mlp()
    ref.train()
    ref(x)
    opt.step(closure)
    bn, bn_ref = model.bn1, ref.bn1
    if policy == "freeze":
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
        torch.testing.assert_close(bn.running_var, bn_ref.running_var)
        assert int(bn.num_batches_tracked) == 1
        assert bn.momentum == bn_ref.momentum  # restored
    else:
        assert int(bn.num_batches_tracked) == 2
        assert not torch.allclose(bn.running_mean, bn_ref.running_mean)


def test_sam_trains_through_fit_with_two_gradient_evaluations_per_step():
    ds = data.load("spirals")
    torch.manual_seed(0)
    model = models.MLP(2, (32,), ds.n_classes, norm="batch")
    opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, perturb="norm")
    hist = train.fit(model, ds, optimizer=opt, epochs=2, batch_size=64,
                     generator=torch.Generator().manual_seed(0), progress=False)
    per_epoch = math.ceil(len(ds.x_train) / 64)
    assert hist.last("grad_evals") == 2 * hist.last("step") == 2 * 2 * per_epoch
    assert hist.last("effective_epochs") == 4
    # fork copies the optimizer with its masks and base optimizer
    m2, o2, _ = train.fork(model, opt)
    assert o2.base_optimizer.param_groups[0] is o2.param_groups[0]  # one lr for both
    assert all(p is q for p, q in zip(o2.param_groups[0]["params"], m2.parameters()))


def test_lr_scheduler_on_sam_drives_the_base_optimizer():
    p = nn.Parameter(torch.tensor(W0))
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step(quadratic_closure(p, opt))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_errors_name_the_valid_choices():
    model = bn_mlp()
    with pytest.raises(ValueError, match="all, norm, no-norm, random"):
        SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, perturb="bn")
    for rho in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho must be a positive"):
            SAM(model, torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="freeze, update"):
        SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, bn="twice")
    with pytest.raises(ValueError, match="n_random"):
        SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, perturb="random")
    with pytest.raises(ValueError, match="needs the model"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, perturb="norm")
    with pytest.raises(ValueError, match="selects no parameter"):
        SAM(nn.Linear(2, 2), torch.optim.SGD, rho=0.1, lr=0.1, perturb="norm")
    with pytest.raises(ValueError, match="closure"):
        SAM(model, torch.optim.SGD, rho=0.1, lr=0.1).step()


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_sam_param_counts_by_hand_with_a_shared_norm_layer():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), bn, nn.Linear(4, 2))  # bn used twice
    assert [p.shape for p in norm_parameters(model)] == [(4,), (4,)]
    # 3·4 + 4 + 4·2 + 2 = 26 outside the norm layer, 4 + 4 inside it
    assert sam_param_counts(model) == {"all": 34, "norm": 8, "no-norm": 26}


def test_sam_defaults_zero_grad_and_closure_message():
    w = nn.Parameter(torch.ones(2))
    opt = SAM([w], lr=0.1)
    assert opt.defaults["rho"] == 0.05 and opt.defaults["eta"] == 0.01
    assert opt.base_optimizer.defaults["lr"] == 0.1
    w.grad = torch.ones(2)
    opt.zero_grad()
    assert w.grad is None  # set_to_none=True by default
    with pytest.raises(ValueError, match=r"^SAM needs a closure \(zero_grad, forward, backward"):
        opt.step()
