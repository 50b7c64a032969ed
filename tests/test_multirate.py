"""Tests for landscape_lib.optim.multirate: plain SGD at k = 1, a hand-written Algorithm 1 on a
quadratic, the random partition's masks, FLOP counts against an analytic count, stability."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from landscape_lib import data, models, train
from landscape_lib.optim import MultirateSGD, multirate_step
from landscape_lib.optim import multirate


def mlp(seed=0, dims=(40, 32, 32, 10)):
    torch.manual_seed(seed)
    return models.MLP(dims[0], dims[1:-1], dims[-1])


def batches(n, seed=0, b=16, d=40):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def mr_step(model, opt, x, y):
    with opt.forward_context(model):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("by", ["layer", "name", "random"])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_k1_is_plain_sgd_step_for_step(by, wd):
    a, b = mlp(), mlp()
    kw = {"fast": ("fc1",)} if by == "name" else {}
    opt_a = MultirateSGD(multirate.partition(a, by, **kw), lr=0.05, momentum=0.9, k=1, weight_decay=wd)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    for x, y in batches(8):
        mr_step(a, opt_a, x, y)
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert opt_a.slow_steps == 8 and opt_a.fast_steps == 0


def reference_algorithm1(theta_f, theta_s, grad, steps, lr, mu, k, drift):
    """Algorithm 1 (the module docstring's per-batch form) in NumPy: the slow step's gradient
    serves both parts; the slow part drifts (or jumps k·lr at the slow step)."""
    tf, ts = np.array(theta_f, float), np.array(theta_s, float)
    pf = ps = None
    out = []
    for t in range(steps):
        gf, gs = grad(t, tf, ts)
        pf = gf.copy() if pf is None else mu * pf + gf
        if t % k == 0:
            ps = gs.copy() if ps is None else mu * ps + gs
        tf = tf - lr * pf
        if drift:
            ts = ts - lr * ps
        elif t % k == 0:
            ts = ts - k * lr * ps
        out.append((tf.copy(), ts.copy()))
    return out


@pytest.mark.parametrize("drift", [True, False])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_hand_written_algorithm_on_a_quadratic(drift, k):
    # L(θ) = ½ Σ λ_i (θ_i − c_t,i)² with a minimiser c_t that changes every step (the "batches")
    lam_f, lam_s = np.array([3.0, 0.5]), np.array([1.0, 2.0, 0.2])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 5))

    def grad(t, tf, ts):
        return lam_f * (tf - centres[t, :2]), lam_s * (ts - centres[t, 2:])

    tf0, ts0 = [1.0, -1.0], [0.5, 2.0, -3.0]
    want = reference_algorithm1(tf0, ts0, grad, 20, 0.05, 0.9, k, drift)
    pf = nn.Parameter(torch.tensor(tf0, dtype=torch.float64))
    ps = nn.Parameter(torch.tensor(ts0, dtype=torch.float64))
    opt = MultirateSGD([{"params": [pf], "role": "fast"}, {"params": [ps], "role": "slow"}],
                       lr=0.05, momentum=0.9, k=k, drift=drift)
    for t in range(20):
        slow = opt.next_is_slow
        assert slow == (t % k == 0)
        c = torch.tensor(centres[t], dtype=torch.float64)
        pf.grad = torch.tensor(lam_f) * (pf.detach() - c[:2])
        ps.grad = torch.tensor(lam_s) * (ps.detach() - c[2:]) if slow else None
        opt.step()
        np.testing.assert_allclose(pf.detach().numpy(), want[t][0], rtol=1e-12)
        np.testing.assert_allclose(ps.detach().numpy(), want[t][1], rtol=1e-12)


def test_slow_params_change_only_every_k_steps():
    k = 4
    for drift in (False, True):
        model = mlp()
        opt = MultirateSGD(multirate.partition(model, "layer"), lr=0.05, k=k, drift=drift)
        slow = opt.slow_params()
        fast = opt.param_groups[0]["params"]
        prev = [p.detach().clone() for p in slow]
        moves, fast_moved = [], []
        for t, (x, y) in enumerate(batches(12)):
            f0 = [p.detach().clone() for p in fast]
            mr_step(model, opt, x, y)
            moves.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(slow, prev)]))
            fast_moved.append(all(not torch.equal(p, q) for p, q in zip(fast, f0)))
            prev = [p.detach().clone() for p in slow]
        assert all(fast_moved)
        for t, m in enumerate(moves):
            if not drift:  # still except at the slow step
                assert (m.abs().max() > 0) == (t % k == 0), t
            elif t % k:  # drift: the same move as the cycle's first step (frozen buffer)
                torch.testing.assert_close(m, moves[t - t % k], rtol=1e-4, atol=1e-7)
            elif t:
                assert not torch.allclose(m, moves[t - k])  # a fresh gradient every k


def test_fast_steps_backward_only_through_the_head():
    model = mlp()
    opt = MultirateSGD(multirate.partition(model, "layer"), lr=0.05, k=3)
    assert opt.slow_modules(model) == [model.fc1, model.fc2]
    seen = []
    model.act2.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    for t, (x, y) in enumerate(batches(6)):
        slow = opt.next_is_slow
        with opt.forward_context(model):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        assert seen[-1] == slow  # the backbone ran under no_grad on fast steps
        assert all((p.grad is not None) == slow for p in opt.slow_params())
        assert torch.is_grad_enabled()
        opt.step()


def test_random_partition_redrawn_every_k_steps_from_the_generator():
    k, frac = 3, 0.4
    model = mlp()
    opt = MultirateSGD(multirate.partition(model, "random", slow_fraction=frac), lr=0.05, k=k,
                       drift=False, generator=torch.Generator().manual_seed(7))
    ref = torch.Generator().manual_seed(7)
    params = list(model.parameters())
    masks = []
    for t, (x, y) in enumerate(batches(9)):
        before = [p.detach().clone() for p in params]
        mr_step(model, opt, x, y)
        m = opt.masks()
        if t % k == 0:  # a new draw, the same as the generator's next numbers
            for p in params:
                torch.testing.assert_close(m[p], torch.rand(p.shape, generator=ref) < frac)
        masks.append([m[p].clone() for p in params])
        if t % k:  # the slow elements stand still (no drift), the fast ones move
            for p, q in zip(params, before):
                assert torch.equal(p.detach()[m[p]], q[m[p]])
                assert (p.detach()[~m[p]] != q[~m[p]]).any()
    for t in range(9):
        same = all(torch.equal(a, b) for a, b in zip(masks[t], masks[t - t % k]))
        assert same
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[k]))
    share = torch.cat([m.flatten().float() for m in masks[0]]).mean()
    assert abs(float(share) - frac) < 0.05


def linear_flops(dims, batch):
    return [2 * batch * i * o for i, o in zip(dims[:-1], dims[1:])]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_flop_counts_match_the_analytic_count(k):
    dims, b, cycles = (40, 64, 64, 10), 32, 2
    lin = linear_flops(dims, b)
    fwd = sum(lin)
    full_bwd = sum(lin) + sum(lin[1:])  # weight grads everywhere, input grads but for the first layer
    head_bwd = lin[-1]  # the head's weight gradient only
    model = mlp(dims=dims)
    opt = MultirateSGD(multirate.partition(model, "layer"), lr=0.01, k=k)
    with FlopCounterMode(display=False) as fc:
        for x, y in batches(k * cycles, b=b):
            mr_step(model, opt, x, y)
    want = cycles * (k * fwd + full_bwd + (k - 1) * head_bwd)
    assert fc.get_total_flops() == want
    assert opt.slow_steps == cycles
    # train-all for the same batches, and the predicted ratio
    ref = mlp(dims=dims)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    with FlopCounterMode(display=False) as fc_all:
        for x, y in batches(k * cycles, b=b):
            sgd.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            sgd.step()
    ratio = fc.get_total_flops() / fc_all.get_total_flops()
    pred = multirate.predicted_cost_ratio(k, full_bwd / fwd, head_bwd / full_bwd)
    assert ratio == pytest.approx(pred, rel=1e-12)


def test_fit_counts_full_backward_passes():
    ds = data.load("digits")
    model = models.MLP(64, (32,), 10)
    opt = MultirateSGD(multirate.partition(model, "name", fast="out"), lr=0.02, k=5)
    hist = train.fit(model, ds, optimizer=opt, epochs=2, batch_size=128, step=multirate_step,
                     generator=torch.Generator().manual_seed(0), progress=False)
    steps = hist.last("step")
    assert opt.slow_steps == math.ceil(steps / 5) and opt.fast_steps == steps - opt.slow_steps
    assert hist.last("grad_evals") == steps
    assert hist.last("test_acc") > 0.5


def test_state_dict_and_fork_continue_the_cycle():
    model = mlp()
    opt = MultirateSGD(multirate.partition(model, "random"), lr=0.05, k=3,
                       generator=torch.Generator().manual_seed(1))
    bs = batches(10)
    for x, y in bs[:4]:
        mr_step(model, opt, x, y)
    m2, o2, _ = train.fork(model, opt)
    for x, y in bs[4:]:
        mr_step(model, opt, x, y)
        mr_step(m2, o2, x, y)
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    o3 = MultirateSGD(multirate.partition(m2, "random"), lr=0.05, k=3)
    o3.load_state_dict(opt.state_dict())
    assert o3.steps == opt.steps == 10 and o3.slow_steps == opt.slow_steps


@pytest.mark.parametrize("k", [1, 5])
def test_slow_part_stable_below_the_heavy_ball_limit(k):
    lam, mu = 4.0, 0.9
    limit = multirate.stable_lr(k, lam, mu)
    assert limit == pytest.approx(2 * (1 + mu) / (k * lam))

    def final(lr):
        pf, ps = nn.Parameter(torch.tensor([1.0], dtype=torch.float64)), nn.Parameter(
            torch.tensor([1.0], dtype=torch.float64))
        opt = MultirateSGD([{"params": [pf], "role": "fast"}, {"params": [ps], "role": "slow"}],
                           lr=lr, momentum=mu, k=k)
        for _ in range(300 * k):
            pf.grad = 1e-3 * pf.detach()  # a flat fast direction
            ps.grad = lam * ps.detach() if opt.next_is_slow else None
            opt.step()
        return abs(float(ps.detach()))

    assert final(0.97 * limit) < 1e-2
    assert not final(1.03 * limit) < 1e2  # grows (or overflows to inf/nan)


def test_errors_name_the_valid_choices():
    model = mlp()
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k .* integer >= 1"):
            MultirateSGD(model.parameters(), lr=0.1, k=k)
    with pytest.raises(ValueError, match="valid partitions: layer, name, random"):
        multirate.partition(model, "depth")
    with pytest.raises(ValueError, match="valid roles: fast, slow, random"):
        MultirateSGD([{"params": list(model.parameters()), "role": "medium"}], lr=0.1)
    with pytest.raises(ValueError, match="out of range"):
        multirate.partition(model, "layer", fast=(7,))
    with pytest.raises(ValueError, match="parameter names: fc1.weight"):
        multirate.partition(model, "name", fast="head")
    with pytest.raises(ValueError, match="slow part empty"):
        multirate.partition(model, "layer", fast=(0, 1, 2))
    with pytest.raises(ValueError, match="lr must be positive"):
        MultirateSGD(model.parameters(), lr=0.0)
    with pytest.raises(TypeError, match="MultirateSGD"):
        ds = data.load("digits")
        net = models.MLP(64, (8,), 10)
        train.fit(net, ds, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
                  step=multirate_step, progress=False)
