"""Tests for landscape_lib.optim.multirate: plain SGD at k = 1, a hand-written Algorithm 1 on a
quadratic, the random partition's masks, FLOP counts against an analytic count, stability."""
import copy
import math
import re

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


def assert_steps_match_sgd(a, opt_a, b, opt_b, data, every_step=False):
    """Step model ``a`` with ``opt_a`` (through ``mr_step``) and its copy ``b`` with
    ``torch.optim.SGD`` on the same batches; their parameters agree (after every step, or at the end)."""
    def same():
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    for x, y in data:
        mr_step(a, opt_a, x, y)
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
        if every_step:
            same()
    same()


@pytest.mark.parametrize("by", ["layer", "name", "random"])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_k1_is_plain_sgd_step_for_step(by, wd):
    a, b = mlp(), mlp()
    kw = {"fast": ("fc1",)} if by == "name" else {}
    opt_a = MultirateSGD(multirate.partition(a, by, **kw), lr=0.05, momentum=0.9, k=1, weight_decay=wd)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    assert_steps_match_sgd(a, opt_a, b, opt_b, batches(8), every_step=True)
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
    with pytest.raises(TypeError, match="^multirate_step needs a MultirateSGD optimizer, got SGD$"):
        ds = data.load("digits")
        net = models.MLP(64, (8,), 10)
        train.fit(net, ds, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
                  step=multirate_step, progress=False)


def tiny(seed=0):
    return mlp(seed, dims=(4, 3, 3, 2))  # layers fc1, fc2, out


def tiny_batches(n):
    return [(x, y % 2) for x, y in batches(n, b=4, d=4)]


def ids(ps):
    return [id(p) for p in ps]


def test_cost_ratio_and_stable_lr_defaults_and_bounds():
    # defaults B = 2F, a negligible head: (k + 2)/(3k) = 7/15 at k = 5
    assert multirate.predicted_cost_ratio(5) == pytest.approx(7 / 15, rel=1e-12)
    assert multirate.predicted_cost_ratio(5) == multirate.predicted_cost_ratio(5, 2.0, 0.0)
    # default µ = 0.9: 2·(1 + 0.9)/(1·3.8) = 1
    assert multirate.stable_lr(1, 3.8) == pytest.approx(1.0, rel=1e-12)
    assert multirate.stable_lr(2, 0.5, 0.0) == 2.0  # 2·1/(2·0.5): a curvature below 1 is fine
    for lam in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match=f"^curvature must be positive, got {lam}$"):
            multirate.stable_lr(1, lam)


def test_partition_defaults_roles_and_layer_index_bounds():
    model = tiny()
    head = [model.out.weight, model.out.bias]
    rest = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
    for groups in (multirate.partition(model), multirate.partition(model, "layer", fast=(-1,))):
        assert [sorted(g) for g in groups] == [["params", "role"]] * 2
        assert [g["role"] for g in groups] == ["fast", "slow"]
        assert ids(groups[0]["params"]) == ids(head) and ids(groups[1]["params"]) == ids(rest)
    # the end points of the index range: -3 is the first layer, 2 the last
    first = multirate.partition(model, "layer", fast=-3)
    assert ids(first[0]["params"]) == ids(rest[:2])
    assert ids(multirate.partition(model, "layer", fast=(2,))[0]["params"]) == ids(head)
    for bad in (3, -4, True, 1.0):
        msg = f"layer index {bad!r} out of range: the model has 3 layers with parameters (fc1, fc2, out)"
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            multirate.partition(model, "layer", fast=(bad,))
    with pytest.raises(ValueError, match=r"^partition by layer with fast=\(\) leaves the fast part empty$"):
        multirate.partition(model, "layer", fast=())
    with pytest.raises(ValueError, match=r"^partition by name with fast=\(\) leaves the fast part empty$"):
        multirate.partition(model, "name", fast=())
    with pytest.raises(ValueError, match=r"^partition by layer with fast=\(0, 1, 2\) leaves the slow part empty$"):
        multirate.partition(model, "layer", fast=(0, 1, 2))
    msg = ("no parameter named 'head' or under it; parameter names: "
           "fc1.weight, fc1.bias, fc2.weight, fc2.bias, out.weight, out.bias")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        multirate.partition(model, "name", fast="head")
    # random: both ends of [0, 1] are valid fractions
    for frac in (0.0, 1.0):
        (g,) = multirate.partition(model, "random", slow_fraction=frac)
        assert g["role"] == "random" and g["slow_fraction"] == frac and ids(g["params"]) == ids(rest + head)
    for frac in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^slow_fraction must lie in \[0, 1\], got {frac}$"):
            multirate.partition(model, "random", slow_fraction=frac)


class Scaled(nn.Module):
    """A unit with a parameter of its own and a child layer (two units of a layer partition)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.inner = nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x) * self.scale


def test_a_layer_unit_owns_only_its_direct_parameters():
    model = nn.Sequential(Scaled(), nn.Linear(2, 2))
    assert [n for n, _ in multirate.layers(model)] == ["0", "0.inner", "1"]
    fast, slow = multirate.partition(model, "layer", fast=(0,))
    assert ids(fast["params"]) == ids([model[0].scale])
    assert ids(slow["params"]) == ids([model[0].inner.weight, model[0].inner.bias, model[1].weight, model[1].bias])


def test_role_less_groups_are_plain_sgd_with_momentum():
    # the docstring: MultirateSGD(model.parameters(), ...) is torch.optim.SGD(lr, momentum), fast steps included
    a, b = tiny(), tiny()
    opt_a = MultirateSGD(a.parameters(), lr=0.05, momentum=0.9, k=3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    assert opt_a.param_groups[0]["role"] == "fast"
    assert_steps_match_sgd(a, opt_a, b, opt_b, tiny_batches(4))
    assert (opt_a.slow_steps, opt_a.fast_steps) == (2, 2)


def test_optimizer_defaults_k5_and_drift():
    def run(**kw):
        pf = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        ps = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = MultirateSGD([{"params": [pf], "role": "fast"}, {"params": [ps], "role": "slow"}], lr=0.25,
                           momentum=0.5, **kw)
        slow, pos = [], []
        for _ in range(7):
            slow.append(opt.next_is_slow)
            pf.grad = torch.zeros(1, dtype=torch.float64)
            ps.grad = torch.full((1,), 2.0, dtype=torch.float64) if opt.next_is_slow else None
            opt.step()
            pos.append(float(ps.detach()))
        return slow, pos

    # k = 5: slow at steps 0 and 5; drift: the slow part moves lr·p_S = 0.25·2 every step, and at step 5
    # p_S = 0.5·2 + 2 = 3
    want = ([True, False, False, False, False, True, False], [0.5, 0.0, -0.5, -1.0, -1.5, -2.25, -3.0])
    assert run() == run(k=5, drift=True) == want
    # without drift it jumps k·lr·p_S = 2.5 at the slow steps (p_S = 2, then 3: 2.5, then 3.75)
    assert run(drift=False) == (want[0], [-1.5] * 5 + [-5.25] * 2)


def test_momentum_and_slow_fraction_bounds():
    p = nn.Parameter(torch.tensor([1.0]))
    opt = MultirateSGD([p], lr=0.25, momentum=0.0, k=1)  # µ = 0 is allowed: plain gradient descent
    for want in (0.5, 0.0):
        p.grad = torch.tensor([2.0])
        opt.step()
        assert float(p.detach()) == want
    for mu in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^momentum must lie in \[0, 1\), got {mu}$"):
            MultirateSGD([p], lr=0.1, momentum=mu)
    for frac in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^slow_fraction must lie in \[0, 1\], got {frac}$"):
            MultirateSGD([{"params": [p], "role": "random"}], lr=0.1, slow_fraction=frac)
    # both ends of [0, 1]: nothing slow, everything slow
    for frac, want in ((0.0, False), (1.0, True)):
        q = nn.Parameter(torch.zeros(50))
        opt = MultirateSGD([{"params": [q], "role": "random"}], lr=0.1, slow_fraction=frac)
        q.grad = torch.ones(50)
        opt.step()
        assert torch.equal(opt.masks()[q], torch.full((50,), want))


def test_an_element_drawn_exactly_at_slow_fraction_is_fast():
    # slow with probability slow_fraction: slow iff the uniform draw u < slow_fraction
    u = torch.rand(7, generator=torch.Generator().manual_seed(3))
    order = torch.argsort(u)
    frac = float(u[order[3]])  # three draws below, one equal, three above
    p = nn.Parameter(torch.zeros(7))
    opt = MultirateSGD([{"params": [p], "role": "random", "slow_fraction": frac}], lr=0.1, k=2,
                       generator=torch.Generator().manual_seed(3))
    p.grad = torch.ones(7)
    opt.step()
    mask = opt.masks()[p]
    want = torch.zeros(7, dtype=torch.bool)
    want[order[:3]] = True
    assert torch.equal(mask, want)


def test_default_generator_is_seeded_from_the_global_rng():
    model = tiny()
    seeds = []
    for s in (0, 1):
        torch.manual_seed(s)
        opt = MultirateSGD(multirate.partition(model, "random"), lr=0.1)
        torch.manual_seed(s)  # replay: the global RNG's next 64-bit word, cut to a seed in [0, 2**62)
        word = int(torch.empty((), dtype=torch.int64).random_())
        assert opt.generator.initial_seed() == word % 2**62
        seeds.append(opt.generator.initial_seed())
    assert seeds[0] != seeds[1]


def test_slow_modules_are_cached_per_model():
    model = tiny()
    opt = MultirateSGD(multirate.partition(model, "layer"), lr=0.1)
    first = opt.slow_modules(model)
    assert first == [model.fc1, model.fc2]
    assert opt.slow_modules(model) is first  # cached
    other = nn.Sequential(model.fc2, nn.Linear(3, 2))  # shares one slow layer
    assert opt.slow_modules(other) == [model.fc2]


def test_state_dict_resumes_a_random_partition_mid_cycle():
    model, resumed = tiny(), tiny()
    opt = MultirateSGD(multirate.partition(model, "random"), lr=0.05, k=3,
                       generator=torch.Generator().manual_seed(1))
    bs = tiny_batches(7)
    for x, y in bs[:4]:  # slow at 0 and 3
        mr_step(model, opt, x, y)
    resumed.load_state_dict(model.state_dict())
    o2 = MultirateSGD(multirate.partition(resumed, "random"), lr=0.05, k=3)
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict holds references
    assert (o2.steps, o2.slow_steps, o2.fast_steps) == (4, 2, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(opt.masks()[p], o2.masks()[q])
    for x, y in bs[4:]:  # fast, fast (with the loaded masks), slow
        mr_step(model, opt, x, y)
        mr_step(resumed, o2, x, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert (o2.steps, o2.slow_steps, o2.fast_steps) == (7, 3, 4)


def test_load_state_dict_without_the_multirate_counters():
    # a plain Optimizer state (no "multirate" entry) loads the buffers and leaves the counters at 0
    model = tiny()
    opt = MultirateSGD(multirate.partition(model, "layer"), lr=0.05, k=3)
    for x, y in tiny_batches(2):
        mr_step(model, opt, x, y)
    old = copy.deepcopy(torch.optim.Optimizer.state_dict(opt))
    assert "multirate" not in old
    o2 = MultirateSGD(multirate.partition(model, "layer"), lr=0.05, k=3)
    o2.load_state_dict(old)
    assert (o2.steps, o2.slow_steps, o2.fast_steps) == (0, 0, 0) and o2.next_is_slow
    for p in model.parameters():
        assert torch.equal(o2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def reference_random_role(w0, grads, masks, lr, mu, wd, k, drift):
    """The random role element by element (the class docstring): a slow element keeps its buffer
    on fast steps and moves lr·buf per step (drift) or k·lr·buf at the slow step (no drift)."""
    w, buf = list(w0), [None] * len(w0)
    for s, g in enumerate(grads):
        slow_step = s % k == 0
        mask = masks[s // k]
        for i in range(len(w)):
            d = g[i] + wd * w[i]
            if buf[i] is None:
                buf[i] = d
            elif slow_step or not mask[i]:
                buf[i] = mu * buf[i] + d
            if not mask[i] or drift:
                w[i] -= lr * buf[i]
            elif slow_step:
                w[i] -= k * lr * buf[i]
    return w


@pytest.mark.parametrize("drift", [True, False])
def test_random_role_by_element_over_two_cycles(drift):
    w0 = [1.0, -0.5, 0.25, 2.0, -1.5, 0.75]
    grads = [[0.3, -0.2, 0.5, 0.1, -0.4, 0.2], [-0.1, 0.4, 0.2, -0.3, 0.6, 0.1],
             [0.2, 0.1, -0.5, 0.4, 0.3, -0.2]]
    replay = torch.Generator().manual_seed(11)
    masks = [(torch.rand(6, generator=replay) < 0.5).tolist() for _ in range(2)]
    assert all(any(m) and not all(m) for m in masks) and masks[0] != masks[1]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = MultirateSGD([{"params": [p], "role": "random"}], lr=0.1, momentum=0.5, k=2, drift=drift,
                       weight_decay=1.0, slow_fraction=0.5, generator=torch.Generator().manual_seed(11))
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        assert opt.step() is None
    want = reference_random_role(w0, grads, masks, lr=0.1, mu=0.5, wd=1.0, k=2, drift=drift)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-15)


def test_zero_weight_decay_never_reads_the_weights_as_torch_sgd():
    # an infinite weight: with weight_decay = 0 the buffer is the gradient (inf·0 would be nan)
    a = nn.Parameter(torch.tensor([float("inf"), 1.0], dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    opt_a = MultirateSGD([a], lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for p in (a, b):
        p.grad = torch.tensor([0.5, -0.25], dtype=torch.float64)
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    torch.testing.assert_close(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"],
                               rtol=0, atol=0)
