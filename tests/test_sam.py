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


def sam_momentum_reference(steps, rho, lr, mom):
    """SAM with heavy-ball momentum on the quadratic, in NumPy: g at w, g̃ at w + ρ g/‖g‖,
    buf ← mom·buf + g̃ (g̃ at the first step), w ← w − lr·buf."""
    w, buf = W0.copy(), None
    for _ in range(steps):
        g = quad_grad(w)
        gt = quad_grad(w + rho * g / np.linalg.norm(g))
        buf = gt if buf is None else mom * buf + gt
        w = w - lr * buf
    return w


def test_two_steps_with_momentum_match_the_reference():
    rho, lr, mom = 0.2, 0.05, 0.9
    p = nn.Parameter(torch.tensor(W0))
    opt = SAM([p], torch.optim.SGD, rho=rho, lr=lr, momentum=mom)
    for _ in range(2):
        opt.step(quadratic_closure(p, opt))
    w = sam_momentum_reference(2, rho, lr, mom)
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


def lin_bn_lin():
    # 2·3 + 3 + 3·1 + 1 = 13 coordinates outside the norm layer, 3 + 3 = 6 in it, 19 in all
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()


def test_perturbed_count_of_each_filter_by_hand():
    for perturb, want in (("all", 19), ("norm", 6), ("no-norm", 13)):
        assert SAM(lin_bn_lin(), lr=0.1, perturb=perturb).perturbed_count() == want, perturb


def test_random_mask_is_the_seeded_permutation_of_its_pool():
    # no-norm pool: the two Linear layers (13 coordinates, in parameter order); BatchNorm never drawn
    model = lin_bn_lin()
    opt = SAM(model, lr=0.1, perturb="random", n_random=5, generator=torch.Generator().manual_seed(7))
    ref = torch.zeros(13, dtype=torch.float64)
    ref[torch.randperm(13, generator=torch.Generator().manual_seed(7))[:5]] = 1
    m = opt._masks
    assert m[2] is False and m[3] is False  # bn weight, bn bias
    assert all(m[i].dtype == torch.float64 and m[i].shape == q.shape  # stored as the parameter
               for i, q in ((0, model[0].weight), (1, model[0].bias), (4, model[2].weight), (5, model[2].bias)))
    assert torch.equal(torch.cat([m[i].flatten() for i in (0, 1, 4, 5)]), ref)
    assert opt.perturbed_count() == 5
    # random_from="all": the pool is every parameter (19 coordinates), BatchNorm included
    model = lin_bn_lin()
    opt = SAM(model, lr=0.1, perturb="random", n_random=7, random_from="all",
              generator=torch.Generator().manual_seed(1))
    ref = torch.zeros(19, dtype=torch.float64)
    ref[torch.randperm(19, generator=torch.Generator().manual_seed(1))[:7]] = 1
    assert torch.equal(torch.cat([mi.flatten() for mi in opt._masks]), ref)
    assert opt.perturbed_count() == 7


@pytest.mark.parametrize("random_from, total", [("no-norm", 13), ("all", 19)])
def test_n_random_bounds_are_1_and_the_pool_size(random_from, total):
    def sam(n):
        return SAM(lin_bn_lin(), lr=0.1, perturb="random", n_random=n, random_from=random_from,
                   generator=torch.Generator().manual_seed(0))
    assert sam(1).perturbed_count() == 1
    opt = sam(total)  # every coordinate of the pool
    assert opt.perturbed_count() == total
    assert all(torch.equal(m, torch.ones_like(m)) for m in opt._masks if m is not False)
    for bad in (0, total + 1, True, 2.0):
        msg = (rf"^perturb='random' needs n_random, an integer in 1\.\.{total} "
               rf"\(the {random_from} coordinates\), got {bad!r}$")
        with pytest.raises(ValueError, match=msg):
            sam(bad)


def test_other_constructor_messages_in_full():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^eta must be >= 0, got -0\.1$"):
        SAM(nn.Linear(2, 1), lr=0.1, adaptive=True, eta=-0.1)
    with pytest.raises(ValueError, match=r"^unknown p 3; valid choices: 2, math\.inf$"):
        SAM([w], lr=0.1, p=3)
    with pytest.raises(ValueError, match=r"^unknown random_from 'bn'; valid choices: no-norm, all$"):
        SAM(lin_bn_lin(), lr=0.1, perturb="random", n_random=3, random_from="bn")
    with pytest.raises(ValueError, match=r"^n_random is only used with perturb='random', not 'all'$"):
        SAM(lin_bn_lin(), lr=0.1, n_random=3)
    with pytest.raises(ValueError, match=r"^perturb='norm' selects no parameter of this model \(normalisation "
                                         r"layers are found by type: _NormBase, GroupNorm, LayerNorm, RMSNorm\)$"):
        SAM(nn.Linear(2, 2), lr=0.1, perturb="norm")
    tail = (r" needs the model \(pass model=\.\.\. or the module itself as params\): "
            r"parameters are selected by module type$")
    with pytest.raises(ValueError, match=r"^perturb='norm'" + tail):
        SAM(list(lin_bn_lin().parameters()), lr=0.1, perturb="norm")
    with pytest.raises(ValueError, match=r"^perturb='all' with adaptive=True" + tail):
        SAM([w], lr=0.1, adaptive=True)  # biases are told apart through the model
    with pytest.raises(TypeError, match=r"^base_optimizer must be a torch\.optim\.Optimizer class "
                                        r"\(e\.g\. torch\.optim\.SGD\), got <class 'dict'>$"):
        SAM([w], dict, lr=0.1)
    with pytest.raises(TypeError, match=r"^base_optimizer must be a torch\.optim\.Optimizer class .*got SGD \("):
        SAM([w], torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), lr=0.1)  # an instance


def test_asam_with_eta_0_and_normalize_bias():
    # Linear(2, 1), w = (3, −4), b = 2, loss = w·(1, 1) + b: g = (1, 1 | 1); η = 0: T = (3, 4 | 2)
    # normalize_bias=True: ‖T g‖ = √(9 + 16 + 4) = √29, ε = ρ T² g / √29 = (9, 16 | 4) at ρ = √29
    # normalize_bias=False (default): T_b = 1, ‖T g‖ = √26, ε = (9, 16 | 1) at ρ = √26
    for kwargs, rho, want in (({"normalize_bias": True}, math.sqrt(29), [12.0, 12.0, 6.0]),
                              ({}, math.sqrt(26), [12.0, 12.0, 3.0])):
        model = nn.Linear(2, 1).double()
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[3.0, -4.0]])), model.bias.fill_(2.0)
        opt = SAM(model, lr=0.1, rho=rho, adaptive=True, eta=0, **kwargs)
        model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
        opt.first_step()
        got = [*model.weight.detach().flatten().tolist(), model.bias.detach().item()]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # normalize_bias=True needs no model (no bias is told apart): plain parameters, T = |w| = (3, 4)
    w = nn.Parameter(torch.tensor([3.0, -4.0], dtype=torch.float64))
    opt = SAM([w], lr=0.1, rho=5.0, adaptive=True, eta=0, normalize_bias=True)
    w.grad = torch.ones(2, dtype=torch.float64)
    opt.first_step()  # ‖T g‖ = 5, ε = 5 · (9, 16) / 5
    np.testing.assert_allclose(w.detach().numpy(), [12.0, 12.0], rtol=1e-12)


def test_linf_asam_and_per_group_rho_by_hand():
    # ℓ∞ ASAM: ε = ρ T sign g, T = |w| + η for the weight, 1 for the bias: w = (3, −4), η = 0.5,
    # g = (1, −2 | 1): ε = 0.1 · (3.5, −4.5 | 1)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -4.0]])), model.bias.fill_(2.0)
    opt = SAM(model, lr=0.1, rho=0.1, adaptive=True, eta=0.5, p=math.inf)
    model(torch.tensor([[1.0, -2.0]], dtype=torch.float64)).sum().backward()
    opt.first_step()
    np.testing.assert_allclose(model.weight.detach().numpy(), [[3.35, -4.45]], rtol=1e-12)
    np.testing.assert_allclose(model.bias.detach().item(), 2.1, rtol=1e-12)
    # two groups, ρ = 0.3 and 0.6, one norm over both: g = (3, 0 | 4), ‖g‖ = 5
    a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SAM([{"params": [a]}, {"params": [b], "rho": 0.6}], lr=0.1, rho=0.3)
    a.grad, b.grad = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    opt.first_step()
    np.testing.assert_allclose(a.detach().numpy(), [0.18, 0.0], rtol=1e-12, atol=0)  # 0.3 · 3/5
    np.testing.assert_allclose(b.detach().numpy(), [0.48], rtol=1e-12)  # 0.6 · 4/5
    opt.second_step()  # back to w, then SGD: w − 0.1 g
    np.testing.assert_allclose(a.detach().numpy(), [-0.3, 0.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(b.detach().numpy(), [-0.4], rtol=1e-12)


def test_first_step_without_gradients_moves_nothing():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([w], lr=0.1)
    opt.first_step()  # no .grad: nothing to perturb
    opt.second_step()  # nothing to undo, and SGD skips a parameter without a gradient
    assert w.detach().tolist() == [1.0, 2.0]


def test_state_dict_round_trip_continues_the_reference():
    # one step, then a fresh SAM with other hyperparameters loads the state: its second step is
    # the reference's second step (ρ = 0.2, lr = 0.05, the momentum buffer of step 1)
    rho, lr, mom = 0.2, 0.05, 0.9
    p = nn.Parameter(torch.tensor(W0))
    opt = SAM([p], rho=rho, lr=lr, momentum=mom)
    opt.step(quadratic_closure(p, opt))
    q = nn.Parameter(p.detach().clone())
    opt2 = SAM([q], rho=0.9, lr=0.5, momentum=0.1)
    opt2.load_state_dict(opt.state_dict())
    opt2.step(quadratic_closure(q, opt2))
    w = sam_momentum_reference(2, rho, lr, mom)
    np.testing.assert_allclose(q.detach().numpy(), w, rtol=1e-12)
    # one set of groups after loading too: an lr set on SAM is the base optimizer's
    opt2.param_groups[0]["lr"] = 0.0
    before = q.detach().clone()
    opt2.step(quadratic_closure(q, opt2))
    assert opt2.base_optimizer.param_groups[0]["lr"] == 0.0
    torch.testing.assert_close(q.detach(), before, rtol=0, atol=1e-15)  # w + ε − ε, rounded


def test_base_optimizer_options_are_sams_defaults_from_the_start():
    # torch's own checks in add_param_group see the base options: differentiable=True allows a
    # non-leaf tensor (as torch.optim.SGD itself does), without it SAM refuses it as SGD would
    x = torch.ones(2, requires_grad=True) * 2  # not a leaf
    torch.optim.SGD([x], lr=0.1, differentiable=True)
    opt = SAM([x], lr=0.1, differentiable=True)
    assert opt.param_groups[0]["differentiable"] is True
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        torch.optim.SGD([x], lr=0.1)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        SAM([x], lr=0.1)


def bn_closure(model, opt, x):
    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss
    return closure


def test_freeze_uses_the_model_argument_over_the_module_passed_as_params():
    # training only the head: the BatchNorm of the whole model (model=) is still frozen
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, ref = lin_bn_lin(), lin_bn_lin()
    opt = SAM(model[2], lr=0.1, rho=0.5, model=model)
    opt.step(bn_closure(model, opt, x))
    ref(x)  # one train-mode pass at w
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    assert torch.equal(model[0].weight, ref[0].weight)  # not trained
    assert not torch.equal(model[2].weight, ref[2].weight)  # trained


def test_freeze_with_a_batchnorm_that_does_not_count_batches():
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, ref = lin_bn_lin(), lin_bn_lin()
    model[1].num_batches_tracked = None  # allowed by BatchNorm: it then always uses momentum
    ref[1].num_batches_tracked = None
    opt = SAM(model, lr=0.1, rho=0.5)
    opt.step(bn_closure(model, opt, x))
    ref(x)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=0, atol=0)
    assert model[1].num_batches_tracked is None and model[1].momentum == 0.1


def test_norm_parameters_shared_parameter_once_and_no_child_parameters():
    class GatedLayerNorm(nn.LayerNorm):  # a norm type with a sub-module: only its own affine
        def __init__(self, d):
            super().__init__(d)
            self.gate = nn.Linear(d, d)

    ln1, ln2, gated = nn.LayerNorm(3), nn.LayerNorm(3), GatedLayerNorm(3)
    ln2.weight = ln1.weight  # one parameter in two norm modules
    model = nn.Sequential(ln1, ln2, gated)
    got = norm_parameters(model)
    want = [ln1.weight, ln1.bias, ln2.bias, gated.weight, gated.bias]
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
    # all: 5 affine vectors of 3 + the gate's 3·3 + 3 = 27; norm: 15
    assert sam_param_counts(model) == {"all": 27, "norm": 15, "no-norm": 12}


@pytest.mark.parametrize("policy", ["freeze", "update"])
def test_freeze_also_holds_instancenorm_running_statistics(policy):
    # InstanceNorm with track_running_stats=True keeps running statistics like BatchNorm (both
    # are _NormBase): bn="freeze" leaves them as the pass at w set them
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 5, dtype=torch.float64, generator=g)
    target = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 3, 1),
                             nn.InstanceNorm1d(3, affine=True, track_running_stats=True)).double()
    model, ref = make(), make()
    opt = SAM(model, lr=0.1, rho=0.5, bn=policy)

    def closure():
        opt.zero_grad()
        loss = (model(x) * target).sum()
        loss.backward()
        return loss
    opt.step(closure)
    ref(x)  # one train-mode pass at w
    same = [torch.equal(model[1].running_mean, ref[1].running_mean),
            torch.equal(model[1].running_var, ref[1].running_var)]
    assert same == ([True, True] if policy == "freeze" else [False, False])
    assert model[1].momentum == 0.1


def test_random_masks_live_on_the_parameters_device():
    # the meta device stands in for an accelerator: a mask left on the CPU could not multiply the
    # gradient in first_step ("Tensor on device cpu is not on the expected device meta")
    model = nn.Linear(2, 3, device="meta")
    opt = SAM(model, lr=0.1, perturb="random", n_random=4, generator=torch.Generator().manual_seed(0))
    assert [m.device.type for m in opt._masks] == ["meta", "meta"]
    for q in model.parameters():
        q.grad = torch.ones_like(q)
    opt.first_step()
    opt.second_step()


def test_vanishing_gradient_is_divided_by_its_norm_plus_1e_12():
    # ‖g‖ = 5e-13: ε = ρ g / (5e-13 + 1e-12) = ρ g / 1.5e-12, bounded and along g
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = SAM([p], lr=0.1, rho=1.0)
    p.grad = torch.tensor([3e-13, 4e-13], dtype=torch.float64)
    opt.first_step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.2, 0.8 / 3], dtype=torch.float64), rtol=1e-12, atol=0)
    # the same with a ρ per group (ρ = 1 and 2): ε_a = 3e-13 / 1.5e-12, ε_b = 2 · 4e-13 / 1.5e-12
    a, b = nn.Parameter(torch.zeros(1, dtype=torch.float64)), nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SAM([{"params": [a], "rho": 1.0}, {"params": [b], "rho": 2.0}], lr=0.1)
    a.grad, b.grad = torch.tensor([3e-13], dtype=torch.float64), torch.tensor([4e-13], dtype=torch.float64)
    opt.first_step()
    torch.testing.assert_close(torch.cat([a.detach(), b.detach()]),
                               torch.tensor([0.2, 1.6 / 3], dtype=torch.float64), rtol=1e-12, atol=0)


def test_linf_ball_with_a_random_mask_leaves_the_other_coordinates_alone():
    # ε = ρ sign(g) on the 3 drawn coordinates of the 8 (weight 2×3, then bias 2), exactly 0 elsewhere
    model = nn.Linear(3, 2).double()
    opt = SAM(model, lr=0.1, rho=0.25, p=math.inf, perturb="random", n_random=3, random_from="all",
              generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(8, dtype=torch.float64)
    mask[torch.randperm(8, generator=torch.Generator().manual_seed(5))[:3]] = 1
    g = torch.tensor([0.5, -1.0, 2.0, -0.1, 0.3, -0.7, 1.5, -2.5], dtype=torch.float64)
    model.weight.grad, model.bias.grad = g[:6].reshape(2, 3).clone(), g[6:].clone()
    w0 = torch.cat([q.detach().flatten() for q in model.parameters()])
    opt.first_step()
    moved = torch.cat([q.detach().flatten() for q in model.parameters()]) - w0
    torch.testing.assert_close(moved, 0.25 * torch.sign(g) * mask, rtol=0, atol=1e-15)


def test_second_step_without_a_first_step_is_the_base_step():
    # before any first_step and again right after a second_step: nothing to undo, SGD's step only
    a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    opt, ref = SAM([a], lr=0.1, momentum=0.5), torch.optim.SGD([b], lr=0.1, momentum=0.5)
    for _ in range(2):
        for p in (a, b):
            p.grad = torch.tensor([0.4, 0.2], dtype=torch.float64)
        opt.second_step()
        ref.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_a_group_added_after_construction_is_perturbed_and_stepped_by_hand():
    # SAM([a]), then add_param_group({b, lr=0.2}); g = (3, 0 | 4), ‖g‖ = 5, ρ = 0.5:
    # ε = 0.5 · (3, 0 | 4) / 5 = (0.3, 0 | 0.4); the base step uses b's own lr and momentum buffer
    a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SAM([a], lr=0.1, rho=0.5, momentum=0.9)
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert opt.base_optimizer.param_groups is opt.param_groups
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["rho"] == 0.5
    a.grad, b.grad = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    opt.first_step()
    np.testing.assert_allclose(a.detach().numpy(), [0.3, 0.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(b.detach().numpy(), [0.4], rtol=1e-12)
    a.grad, b.grad = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    opt.second_step()  # SGD from w = 0: a − 0.1 ĝ_a, b − 0.2 ĝ_b (first momentum buffer = ĝ)
    np.testing.assert_allclose(a.detach().numpy(), [-0.1, -0.2], rtol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), [0.2], rtol=1e-12)
    assert torch.equal(opt.base_optimizer.state[b]["momentum_buffer"], torch.tensor([-1.0], dtype=torch.float64))
    assert opt.perturbed_count() == 3


def test_add_param_group_follows_the_filter_and_refuses_random_masks():
    model = bn_mlp()
    bn, lin = model.bn1, model.fc1
    assert isinstance(bn, nn.BatchNorm1d) and isinstance(lin, nn.Linear)
    rest = [q for q in model.parameters() if all(q is not r for r in (*bn.parameters(), *lin.parameters()))]
    opt = SAM(rest, model=model, lr=0.1, perturb="norm")
    before = opt.perturbed_count()
    opt.add_param_group({"params": list(lin.parameters())})  # not a norm layer: not perturbed
    assert opt.perturbed_count() == before and opt._masks[-2:] == [False, False]
    opt.add_param_group({"params": list(bn.parameters())})  # its weight and bias are
    assert opt.perturbed_count() == before + 2 * bn.num_features and opt._masks[-2:] == [True, True]
    # ASAM tells biases apart in an added group too
    asam = SAM([model.fc1.weight], model=model, lr=0.1, adaptive=True)
    asam.add_param_group({"params": [model.fc1.bias]})
    assert asam._is_bias == [False, True]
    rnd = SAM(model, lr=0.1, perturb="random", n_random=3, generator=torch.Generator().manual_seed(0))
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^perturb='random' draws its mask once, over the parameters given"):
        rnd.add_param_group({"params": [extra]})
    assert len(rnd.param_groups) == 1 and len(rnd._masks) == len(list(model.parameters()))


def test_per_group_ball_options_are_checked():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="valid choices: 2, math.inf"):
        SAM([{"params": [a]}, {"params": [b], "p": 3}], lr=0.1)
    with pytest.raises(ValueError, match="one ball over all groups"):
        SAM([{"params": [a]}, {"params": [b], "p": math.inf}], lr=0.1)
    for bad in (-1.0, 0.0, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="rho must be a positive number"):
            SAM([{"params": [a]}, {"params": [b], "rho": bad}], lr=0.1)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        SAM([{"params": [a], "eta": -0.5}], lr=0.1)
    with pytest.raises(ValueError, match=r"^adaptive=True in a param group needs the model \(pass model="):
        SAM([{"params": [a], "adaptive": True}], lr=0.1)
    opt = SAM([a], lr=0.1, p=math.inf)
    with pytest.raises(ValueError, match="one ball over all groups"):
        opt.add_param_group({"params": [b], "p": 2})
    opt.add_param_group({"params": [b], "rho": 0.2})  # same ball, another radius: fine
    assert [g["p"] for g in opt.param_groups] == [math.inf, math.inf] and len(opt._masks) == 2
