"""Tests of landscape_lib.sparse against formulas, hand-built cases and FlopCounterMode."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from landscape_lib import data, models, sparse, train


def mlp():
    torch.manual_seed(0)
    return models.MLP(40, (64, 32), 10, norm="batch")


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# --- densities ---------------------------------------------------------------------------------

def test_erk_matches_formula_and_exact_count():
    shapes = {"conv": (4, 1, 3, 3), "fc1": (256, 512), "fc2": (10, 256)}
    d = sparse.layer_densities(shapes, 0.1, "erk")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    # every non-dense layer has d_l = ε Σshape/Πshape with one common ε
    raws = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    free = [n for n in shapes if d[n] < 1]
    eps = {d[n] / raws[n] for n in free}
    assert max(eps) - min(eps) < 1e-12
    # the small layers are over-full under ERK at 10 % and become dense
    assert d["conv"] == 1.0 and d["fc2"] == 1.0 and d["fc1"] < 1
    assert raws["conv"] * max(eps) > 1 and raws["fc2"] * max(eps) > 1
    assert sum(d[n] * sizes[n] for n in shapes) == pytest.approx(0.1 * sum(sizes.values()))
    counts = sparse.layer_counts(shapes, 0.1, "erk")
    assert sum(counts.values()) == round(0.1 * sum(sizes.values()))
    assert all(counts[n] <= sizes[n] for n in shapes)


def test_er_uses_channel_dims_and_uniform_is_flat():
    shapes = {"a": (8, 4, 5, 5), "b": (100, 200)}
    d = sparse.layer_densities(shapes, 0.3, "er")
    assert d["a"] / d["b"] == pytest.approx(((8 + 4) / 32) / (300 / 20000))  or d["a"] == 1.0
    u = sparse.layer_densities(shapes, 0.3, "uniform")
    assert u == {"a": pytest.approx(0.3), "b": pytest.approx(0.3)}


def test_masker_exact_global_count_and_dense_bias():
    m = mlp()
    s = sparse.SparseMasker(m, 0.05, generator=g())
    total = sum(w.numel() for w in s.weights.values())
    assert sum(int(x.sum()) for x in s.masks.values()) == round(0.05 * total)
    for n, w in s.weights.items():
        assert int((w != 0).sum()) == int(s.masks[n].sum())
    assert all((mod.bias != 0).any() for mod in (m.fc1, m.fc2, m.out))  # biases stay dense


# --- training ------------------------------------------------------------------------------------

def small_data():
    torch.manual_seed(0)
    x = torch.randn(256, 40)
    y = (x[:, :10].argmax(1))
    return data.Dataset("toy", x, y, x[:64], y[:64], n_classes=10)


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_masked_weights_stay_exactly_zero_through_training(grow):
    m, ds = mlp(), small_data()
    sched = sparse.DropSchedule(alpha=0.3, delta_t=3, t_end=15)
    s = sparse.SparseMasker(m, 0.1, grow=grow, schedule=sched, generator=g())
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    counts = dict(s.counts)
    zeros_ok = []

    def hook(step, model, optimizer):
        zeros_ok.append(all(bool((w[~s.masks[n]] == 0).all()) for n, w in s.weights.items()))

    train.fit(m, ds, optimizer=opt, epochs=3, batch_size=32, step=s.step, on_step=[hook],
              generator=g(1), progress=False)
    assert all(zeros_ok) and len(zeros_ok) == 24
    assert len([u for u in s.updates if u["step"]]) == 4  # steps 3, 6, 9, 12
    assert sum(u["changed"] for u in s.updates) > 0
    assert {n: int(x.sum()) for n, x in s.masks.items()} == counts
    for n, w in s.weights.items():  # momentum of masked positions is zero too
        assert (opt.state[w]["momentum_buffer"][~s.masks[n]] == 0).all()


def test_rigl_update_hand_built_case():
    lin = nn.Linear(4, 2, bias=False)
    model = nn.Sequential(lin)
    s = sparse.SparseMasker(model, 0.5, distribution="uniform", tie_noise=0.0, generator=g())
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.1, 2.0, 0.0], [-0.3, 0.0, 0.0, 0.0]]))
    s.set_masks({"0": mask})
    opt.state[lin.weight]["momentum_buffer"] = torch.full((2, 4), 7.0)
    lin.weight.grad = torch.tensor([[0.0, 9.0, 0.0, 0.4], [0.0, 0.2, 5.0, 0.3]])
    # 4 active; fraction 0.5 → k = 2: drop |w| = 0.1 (0,1) and 0.3 (1,0);
    # grow the largest |g| among the rest: (0,1) [just dropped, 9.0] and (1,2) [5.0]
    changed = s.drop_grow(0.5, opt)
    expect = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(s.masks["0"], expect)
    assert changed == {"0": 1}
    assert int(s.masks["0"].sum()) == 4
    w = lin.weight.detach()
    assert w[0, 1] == pytest.approx(-0.1)   # regrown just-dropped keeps its value
    assert w[1, 2] == 0 and w[1, 0] == 0    # new starts at 0; dropped is zeroed
    mom = opt.state[lin.weight]["momentum_buffer"]
    assert mom[1, 2] == 0 and mom[1, 0] == 0 and mom[0, 0] == 7.0 and mom[0, 1] == 7.0


def test_set_growth_is_seeded():
    def run(seed):
        m = mlp()
        s = sparse.SparseMasker(m, 0.2, grow="random", generator=g(seed))
        s.drop_grow(0.3)
        return {n: x.clone() for n, x in s.masks.items()}

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_reexplore_keeps_counts_and_moves_mask():
    m = mlp()
    s = sparse.SparseMasker(m, 0.2, grow="random", generator=g())
    before = {n: x.clone() for n, x in s.masks.items()}
    s.reexplore(0.8)
    for n in before:
        assert int(s.masks[n].sum()) == int(before[n].sum())
        active, size = int(before[n].sum()), before[n].numel()
        k = math.floor(0.8 * active)
        kept = active - k
        # random regrowth picks k of the size − kept free positions, k of which were just dropped
        expected = (kept + k * k / (size - kept)) / active
        overlap = int((s.masks[n] & before[n]).sum()) / active
        assert overlap == pytest.approx(expected, abs=0.08)


def test_global_repruning_hits_density_and_keeps_largest():
    torch.manual_seed(0)
    ws = {"a": torch.randn(30, 20), "b": torch.randn(10, 30)}
    masks = sparse.global_magnitude_masks(ws, 0.1)
    total = sum(w.numel() for w in ws.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)
    kept = torch.cat([ws[n][masks[n]].abs() for n in ws])
    dropped = torch.cat([ws[n][~masks[n]].abs() for n in ws])
    assert kept.min() >= dropped.max()


def test_dead_units():
    masks = {"fc": torch.tensor([[1, 0], [0, 0], [0, 1]], dtype=torch.bool),
             "conv": torch.zeros(4, 2, 3, 3, dtype=torch.bool)}
    assert sparse.dead_units(masks) == {"fc": 1, "conv": 4}


def test_schedule():
    s = sparse.DropSchedule(alpha=0.3, delta_t=10, t_end=100)
    assert s.fraction(0) == pytest.approx(0.3) and s.fraction(50) == pytest.approx(0.15)
    assert s.fraction(100) == pytest.approx(0.0)
    assert [t for t in range(1, 121) if s.is_update(t)] == list(range(10, 100, 10))


# --- FLOPs -------------------------------------------------------------------------------------

def test_layer_flops_match_flop_counter_dense():
    m = mlp()
    x = torch.randn(8, 40)
    ours = sparse.layer_flops(m, x)
    with FlopCounterMode(display=False) as fc:
        m.eval()
        m(x)
    assert sum(ours.values()) * 8 == fc.get_total_flops()
    # backward ≈ 2 × forward when the input needs a gradient too (the paper's rule)
    xr = x.clone().requires_grad_(True)
    m.train()
    with FlopCounterMode(display=False) as fc2:
        m(xr).sum().backward()
    assert fc2.get_total_flops() == 3 * sum(ours.values()) * 8


def test_layer_flops_conv_and_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ours = sparse.layer_flops(net, x)
    with FlopCounterMode(display=False) as fc:
        net.eval()
        net(x)
    assert sum(ours.values()) * 2 == fc.get_total_flops()
    # sparse training on a torchvision model: ERK masks over all conv/linear weights
    s = sparse.SparseMasker(net, 0.1, distribution="erk", generator=g(),
                            schedule=sparse.DropSchedule(delta_t=1, t_end=10))
    assert s.global_density() == pytest.approx(0.1, abs=1e-6)
    assert s.layer_density()["conv1"] > s.layer_density()["layer4.1.conv2"]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    loss = nn.functional.cross_entropy(net(x), torch.tensor([1, 2]))
    loss.backward()
    s.drop_grow(0.3, opt)
    s.mask_grads()
    opt.step()
    s.apply()
    assert all(bool((w[~s.masks[n]] == 0).all()) for n, w in s.weights.items())


def test_training_flops_rules():
    f = {"a": 100, "b": 900}
    d = {"a": 1.0, "b": 0.1}
    f_s = 100 + 90
    assert sparse.training_flops(f, d, steps=10, batch_size=2, method="dense") == 3 * 1000 * 20
    assert sparse.training_flops(f, d, steps=10, batch_size=2, method="set") == 3 * f_s * 20
    rigl = sparse.training_flops(f, d, steps=10, batch_size=2, method="rigl", delta_t=3, t_end=8)
    # updates at steps 3 and 6 cost 2 f_S + f_D instead of 3 f_S
    assert rigl == (8 * 3 * f_s + 2 * (2 * f_s + 1000)) * 2


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sparse.SparseMasker(mlp(), density)


def test_unknown_distribution_and_grow():
    with pytest.raises(ValueError, match="uniform, er, erk"):
        sparse.SparseMasker(mlp(), 0.1, distribution="snip")
    with pytest.raises(ValueError, match="gradient, random"):
        sparse.SparseMasker(mlp(), 0.1, grow="momentum")


def test_module_without_weight():
    m = mlp()
    with pytest.raises(ValueError, match="has no weight.*fc1"):
        sparse.SparseMasker(m, 0.1, modules=["act1"])
    with pytest.raises(ValueError, match="not a module"):
        sparse.SparseMasker(m, 0.1, modules=["nope"])


@pytest.mark.parametrize("dt", [0, -3])
def test_delta_t_below_one(dt):
    with pytest.raises(ValueError, match=">= 1"):
        sparse.DropSchedule(delta_t=dt, t_end=100)


def test_given_masks_are_kept():
    m = mlp()
    masks = sparse.global_magnitude_masks({n: mod.weight for n, mod in m.named_modules()
                                           if isinstance(mod, nn.Linear)}, 0.2)
    s = sparse.SparseMasker(m, None, masks=masks)
    assert all(torch.equal(s.masks[n], masks[n]) for n in masks)
    assert s.density == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(ValueError, match="lacks"):
        sparse.SparseMasker(mlp(), None, masks={"fc1": masks["fc1"]})


def test_fork_is_independent_and_reexplore_with_batch():
    m = mlp()
    s = sparse.SparseMasker(m, 0.2, generator=g())
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    f = train.fork(m, opt)
    s2 = s.fork(f.model)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    s2.reexplore(0.5, f.optimizer, batch=(x, y))
    assert all(w.grad is None for w in s2.weights.values())
    assert not all(torch.equal(s.masks[n], s2.masks[n]) for n in s.names)
    assert all(int(s.masks[n].sum()) == int(s2.masks[n].sum()) for n in s.names)
    assert all(s2.weights[n] is dict(f.model.named_modules())[n].weight for n in s.names)
    for n, w in s2.weights.items():
        assert (w[~s2.masks[n]] == 0).all()


def test_superposition_caa_cima_and_reprune():
    a, b = mlp(), mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    caa = sparse.superposition(a, "caa")
    caa.update_parameters(a)
    caa.update_parameters(b)
    assert torch.allclose(caa.module.fc1.weight, (a.fc1.weight + b.fc1.weight) / 2)
    cima = sparse.superposition(a, "cima", lam=0.25)
    cima.update_parameters(a)
    cima.update_parameters(b)
    assert torch.allclose(cima.module.fc1.weight, 0.75 * a.fc1.weight + 0.25 * b.fc1.weight, atol=1e-6)
    masks = sparse.reprune(caa.module, 0.1)
    ws = [caa.module.fc1.weight, caa.module.fc2.weight, caa.module.out.weight]
    assert sum(int((w != 0).sum()) for w in ws) == round(0.1 * sum(w.numel() for w in ws))
    assert set(masks) == {"fc1", "fc2", "out"}
    with pytest.raises(ValueError, match="caa, cima"):
        sparse.superposition(a, "mean")
