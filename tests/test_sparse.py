"""Tests of landscape_lib.sparse against formulas, hand-built cases and FlopCounterMode."""
import copy
import math
import re
import types

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
    # N_a = 800, N_b = 20000, target = 0.3 · 20800 = 6240; ER scores (8+4)/32 = 0.375 and
    # 300/20000 = 0.015: ε = 6240 / (0.375·800 + 0.015·20000) = 6240/600 = 10.4 → d_a = 3.9 > 1,
    # dense; then ε = (6240 − 800) / 300 = 18.1333 → d_b = 0.272
    d = sparse.layer_densities(shapes, 0.3, "er")
    assert d == {"a": 1.0, "b": pytest.approx(0.272)}
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


# --- exact cases: densities and counts -------------------------------------------------------------

def test_density_bounds_and_messages():
    shapes = {"a": (2, 2)}
    assert sparse.layer_densities(shapes, 1) == {"a": 1.0}  # density 1 (the closed end) is valid
    for bad in (0, True, "0.5", 1.0000001):
        with pytest.raises(ValueError, match=re.escape(
                "density must lie in (0, 1] (a fraction of weights kept; sparsity = 1 - density), "
                f"got {bad!r}")):
            sparse.layer_densities(shapes, bad)


def test_erk_and_er_by_hand():
    shapes = {"a": (4, 2, 3, 3), "b": (10, 8)}  # N_a = 72, N_b = 80; target 0.5 · 152 = 76
    # ERK: scores 12/72 = 1/6 and 18/80; ε = 76 / (12 + 18) → d_a = 76/180 = 19/45, d_b = 0.57
    erk = {"a": pytest.approx(19 / 45), "b": pytest.approx(0.57)}
    assert sparse.layer_densities(shapes, 0.5, "erk") == erk
    assert sparse.layer_densities(shapes, 0.5) == erk  # the default is ERK
    # ER: scores (4+2)/8 = 0.75 and 18/80; ε = 76 / (54 + 18) → d_a = 19/24, d_b = 19/80
    assert sparse.layer_densities(shapes, 0.5, "er") == {"a": pytest.approx(19 / 24),
                                                        "b": pytest.approx(19 / 80)}


def test_layer_densities_dense_layers_and_messages():
    shapes = {"a": (2, 2), "b": (4, 4)}  # N = 4 and 16
    # uniform, a kept dense: target 0.5 · 20 = 10, budget 10 − 4 = 6 over b's 16 weights
    assert sparse.layer_densities(shapes, 0.5, "uniform", dense=["a"]) == {"a": 1.0, "b": 0.375}
    assert sparse.layer_densities(shapes, 0.5, "uniform") == {"a": 0.5, "b": 0.5}  # dense=()
    # the dense layers hold exactly the target (4 of 20 at density 0.2): allowed, b gets 0
    assert sparse.layer_densities(shapes, 0.2, "uniform", dense=["a"]) == {"a": 1.0, "b": 0.0}
    # at 2²⁴ weights the 1e-9 tolerance is below float resolution: dense == target is still allowed
    big = {"a": (4096, 4096), "b": (4096, 4096)}
    assert sparse.layer_densities(big, 0.5, "uniform", dense=["a"]) == {"a": 1.0, "b": 0.0}
    # every layer dense at density 1
    assert sparse.layer_densities(shapes, 1.0, "erk", dense=["a", "b"]) == {"a": 1.0, "b": 1.0}
    # 4 weights kept dense > 0.175 · 20 = 3.5 (by less than one weight)
    with pytest.raises(ValueError, match=re.escape(
            "the layers kept dense (['a']) already hold more than density 0.175 of the weights")):
        sparse.layer_densities(shapes, 0.175, "uniform", dense=["a"])
    with pytest.raises(ValueError, match=re.escape(
            "dense layers ['z'] are not masked; masked layers: a, b")):
        sparse.layer_densities(shapes, 0.5, dense=["z", "a"])
    with pytest.raises(ValueError, match=re.escape(
            "unknown distribution 'snip'; valid choices: uniform, er, erk")):
        sparse.layer_densities(shapes, 0.5, "snip")


def test_erk_over_full_layer_is_solved_again():
    shapes = {"a": (2, 2), "b": (100, 100)}  # ERK scores 1 and 0.02; target 0.5 · 10004 = 5002
    # ε = 5002 / (4 + 200) = 24.52 → d_a > 1: a dense; ε = 4998 / 200 → d_b = 0.4998
    assert sparse.layer_densities(shapes, 0.5, "erk") == {"a": 1.0, "b": pytest.approx(0.4998)}


def test_layer_counts_largest_remainder_by_hand():
    shapes = {"a": (1, 7), "b": (1, 8), "c": (1, 9), "d": (1, 6)}
    # uniform 0.1 of 30 weights: exact 0.7, 0.8, 0.9, 0.6 → floors 0; round(3.0) = 3 ones go to the
    # largest remainders c (0.9), b (0.8), a (0.7)
    assert sparse.layer_counts(shapes, 0.1, "uniform") == {"a": 1, "b": 1, "c": 1, "d": 0}
    shapes = {"a": (1, 7), "b": (1, 9), "c": (1, 11)}
    # uniform 0.3 of 27: exact 2.1, 2.7, 3.3 → floors 2, 2, 3; round(8.1) = 8: one more to b
    assert sparse.layer_counts(shapes, 0.3, "uniform") == {"a": 2, "b": 3, "c": 3}
    # integer exact counts stay as they are (uniform 0.5 of 4 and 16 weights: 2 and 8)
    assert sparse.layer_counts({"a": (2, 2), "b": (4, 4)}, 0.5, "uniform") == {"a": 2, "b": 8}
    # dense= is passed on: a full (4), b gets 10 − 4 = 6
    assert sparse.layer_counts({"a": (2, 2), "b": (4, 4)}, 0.5, "uniform", dense=["a"]) == {"a": 4, "b": 6}


def test_layer_counts_default_is_erk():
    shapes = {"a": (4, 2, 3, 3), "b": (10, 8)}
    # ERK densities 19/45 and 0.57 (above): exact 30.4 and 45.6 → floors 30, 45; 76 − 75 = 1 to b
    assert sparse.layer_counts(shapes, 0.5) == {"a": 30, "b": 46}
    assert sparse.layer_counts(shapes, 0.5, "erk") == {"a": 30, "b": 46}


def test_maskable_and_random_masks_from_the_generator():
    m = mlp()
    assert sparse.maskable(m) == ["fc1", "fc2", "out"]
    s = sparse.SparseMasker(m, 0.5, distribution="uniform", generator=g(3))
    # the masks place the counts' ones at the first positions of one randperm per layer, in order
    ref = g(3)
    for n in ["fc1", "fc2", "out"]:
        size = s.weights[n].numel()
        expect = torch.zeros(size, dtype=torch.bool)
        expect[torch.randperm(size, generator=ref)[:s.counts[n]]] = True
        assert torch.equal(s.masks[n], expect.view(s.weights[n].shape))
        assert s.masks[n].device == s.weights[n].device
    assert s.counts == {"fc1": 1280, "fc2": 1024, "out": 160}  # half of 2560, 2048 and 320


# --- the schedule ----------------------------------------------------------------------------------

def test_schedule_defaults_bounds_and_messages():
    s = sparse.DropSchedule()
    assert (s.alpha, s.delta_t, s.t_end) == (0.3, 100, 1)
    sparse.DropSchedule(alpha=0.0, delta_t=1, t_end=1)  # every closed end is valid
    sparse.DropSchedule(alpha=1.0)
    for dt in (0, True, 2.0):
        with pytest.raises(ValueError, match=re.escape(
                f"delta_t (ΔT, steps between mask updates) must be an integer >= 1, got {dt!r}")):
            sparse.DropSchedule(delta_t=dt, t_end=100)
    for te in (0, True, 5.0):
        with pytest.raises(ValueError, match=re.escape(
                f"t_end (the last step with mask updates) must be an integer >= 1, got {te!r}")):
            sparse.DropSchedule(t_end=te)
    for a in (-0.01, 1.01):
        with pytest.raises(ValueError, match=re.escape(
                f"alpha (the initial drop fraction) must lie in [0, 1], got {a!r}")):
            sparse.DropSchedule(alpha=a)


def test_schedule_for_run_and_fraction_past_t_end():
    assert sparse.DropSchedule.for_run(1000) == sparse.DropSchedule(alpha=0.3, delta_t=100, t_end=750)
    assert sparse.DropSchedule.for_run(2).t_end == 1    # int(1.5): truncated, not rounded
    assert sparse.DropSchedule.for_run(1).t_end == 1    # int(0.75) = 0 → at least 1
    assert sparse.DropSchedule.for_run(10, alpha=0.5, delta_t=2, end_fraction=0.5) == \
        sparse.DropSchedule(alpha=0.5, delta_t=2, t_end=5)
    s = sparse.DropSchedule(alpha=0.3, delta_t=10, t_end=100)
    assert s.fraction(25) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))  # cos(π/4) = √½
    assert s.fraction(200) == pytest.approx(0.0)  # held at f(T_end) after T_end


# --- the masker: construction ----------------------------------------------------------------------

def test_masker_defaults():
    m = mlp()
    s = sparse.SparseMasker(m, 0.1, generator=g())
    assert (s.distribution, s.grow, s.schedule, s.skip_update, s.tie_noise) == \
        ("erk", "gradient", None, True, 1e-5)
    assert s.density == 0.1 and s.updates == []
    shapes = {n: tuple(w.shape) for n, w in s.weights.items()}
    assert s.counts == sparse.layer_counts(shapes, 0.1, "erk")
    s1 = sparse.SparseMasker(mlp(), 1, generator=g())
    assert type(s1.density) is float and s1.density == 1.0
    assert all(bool(x.all()) for x in s1.masks.values())


def test_masker_default_generator_is_seeded_from_the_global_rng():
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)))
    lin = nn.Linear(5, 4, bias=False)
    torch.manual_seed(11)
    s = sparse.SparseMasker(nn.Sequential(lin), 0.25, distribution="uniform")
    expect = torch.zeros(20, dtype=torch.bool)
    expect[torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:5]] = True
    assert torch.equal(s.masks["0"], expect.view(4, 5))


def test_masker_dense_modules_by_object_and_given_masks():
    m = mlp()
    s = sparse.SparseMasker(m, 0.5, modules=[m.fc2, "out"], dense=["out"], distribution="uniform",
                            generator=g())
    assert s.names == ["fc2", "out"]
    # out (320) is dense; fc2 gets 0.5 · 2368 − 320 = 864 of 2048
    assert s.counts == {"fc2": 864, "out": 320} and bool(s.masks["out"].all())
    assert bool((m.fc1.weight != 0).all())  # fc1 is not masked
    lin = nn.Linear(3, 2, bias=False)
    given = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # a float mask is read as bool
    s2 = sparse.SparseMasker(nn.Sequential(lin), None, masks={"0": given})
    assert s2.masks["0"].dtype == torch.bool and torch.equal(s2.masks["0"], given.bool())
    assert s2.counts == {"0": 2} and s2.density == 2 / 6
    assert bool((lin.weight.detach()[~given.bool()] == 0).all())
    with pytest.raises(ValueError, match=re.escape(
            "density must lie in (0, 1] (a fraction of weights kept; sparsity = 1 - density), got 2.0")):
        sparse.SparseMasker(nn.Sequential(nn.Linear(3, 2)), 2.0, masks={"0": given})
    with pytest.raises(ValueError, match=re.escape("got None")):
        sparse.SparseMasker(mlp(), None)


def test_masker_messages():
    m = mlp()
    valid = "fc1, bn1, fc2, bn2, out"
    cases = [
        (dict(modules=["act1"]), f"module 'act1' (ReLU) has no weight to mask; modules with a weight: {valid}"),
        (dict(modules=["nope"]), f"'nope' is not a module of the model; modules with a weight: {valid}"),
        (dict(modules=[]), f"no modules to mask; modules with a weight: {valid}"),
        (dict(distribution="snip"), "unknown distribution 'snip'; valid choices: uniform, er, erk"),
        (dict(grow="momentum"), "unknown grow rule 'momentum'; valid choices: gradient, random"),
        (dict(masks={"fc1": torch.ones(64, 40)}),
         "masks= lacks the masked modules ['fc2', 'out']; masked: fc1, fc2, out"),
        (dict(masks={"fc1": torch.ones(40, 64), "fc2": torch.ones(32, 64), "out": torch.ones(10, 32)}),
         "masks of ['fc1'] do not have their weights' shapes"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            sparse.SparseMasker(m, 0.1, **kwargs)
    with pytest.raises(ValueError, match=re.escape("is not a module of the model; modules with a weight")):
        sparse.SparseMasker(m, 0.1, modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=re.escape(
            "the model has no Linear/Conv module to mask; pass modules= naming modules with a weight: 0")):
        sparse.SparseMasker(nn.Sequential(nn.BatchNorm1d(3)), 0.1)
    with pytest.raises(ValueError, match=re.escape("naming modules with a weight: 0, 1")):
        sparse.SparseMasker(nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3)), 0.1)
    with pytest.raises(ValueError, match=re.escape("naming modules with a weight: none")):
        sparse.SparseMasker(nn.Sequential(nn.ReLU()), 0.1)
    with pytest.raises(TypeError, match=re.escape("schedule must be a DropSchedule or None, got dict")):
        sparse.SparseMasker(m, 0.1, schedule={"delta_t": 10})


def test_masks_in_the_weights_dtype():
    lin = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(2.0)
    s = sparse.SparseMasker(nn.Sequential(lin), None, masks={"0": torch.tensor([[1, 0, 1], [0, 1, 0]])})
    assert s._float["0"].dtype == torch.float64
    assert torch.equal(lin.weight.detach(), torch.tensor([[2.0, 0, 2], [0, 2, 0]], dtype=torch.float64))


# --- the masker: masks, gradients, optimizer state ----------------------------------------------------

def two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    masks = {"0": torch.tensor([[1, 0, 1], [0, 1, 0]]), "1": torch.tensor([[1, 1], [0, 1]])}
    return model, sparse.SparseMasker(model, None, masks=masks, tie_noise=0.0)


def test_mask_grads_with_and_without_missing_grads():
    model, s = two_layers()
    model[0].weight.grad = torch.ones(2, 3)
    s.mask_grads()  # the second layer has no gradient: the first is masked, the second stays None
    assert torch.equal(model[0].weight.grad, torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert model[1].weight.grad is None
    model[1].weight.grad = torch.full((2, 2), 3.0)
    s.mask_grads()
    assert torch.equal(model[1].weight.grad, torch.tensor([[3.0, 3], [0, 3]]))


def test_set_masks_resets_state_of_new_connections():
    model, s = two_layers()
    opt = torch.optim.Adam(model.parameters())
    w0 = model[0].weight
    opt.state[w0]["exp_avg"] = torch.full((2, 3), 5.0)
    opt.state[w0]["step"] = torch.tensor(4.0)
    with torch.no_grad():
        w0.fill_(1.0)
    # new mask: (0,0) kept, (0,1) new, (0,2) and (1,1) dropped
    s.set_masks({"0": torch.tensor([[1, 1, 0], [0, 0, 0]]), "1": torch.ones(2, 2)}, opt)
    assert s.counts == {"0": 2, "1": 4}
    assert s.masks["0"].dtype == torch.bool
    assert torch.equal(w0.detach(), torch.tensor([[1.0, 1, 0], [0, 0, 0]]))
    # state: kept active → kept; new and inactive → 0; the step count is not a weight-shaped tensor
    assert torch.equal(opt.state[w0]["exp_avg"], torch.tensor([[5.0, 0, 0], [0, 0, 0]]))
    assert opt.state[w0]["step"] == 4.0
    s.set_masks({"0": torch.ones(2, 3), "1": torch.ones(2, 2)})  # no optimizer: nothing reset
    assert torch.equal(opt.state[w0]["exp_avg"], torch.tensor([[5.0, 0, 0], [0, 0, 0]]))


def test_drop_grow_bounds_messages_and_k_of_one():
    model, s = two_layers()
    with pytest.raises(ValueError, match=re.escape("unknown grow rule 'x'; valid choices: gradient, random")):
        s.drop_grow(0.5, grow="x")
    for f in (-0.1, 1.1):
        with pytest.raises(ValueError, match=re.escape(f"drop fraction must lie in [0, 1], got {f!r}")):
            s.drop_grow(f)
    with pytest.raises(RuntimeError, match=re.escape(
            "RigL growth needs the dense gradient of '0'.weight; run a backward pass first")):
        s.drop_grow(0.5)
    before = {n: x.clone() for n, x in s.masks.items()}
    assert s.drop_grow(0.0) == {"0": 0, "1": 0}
    assert all(torch.equal(s.masks[n], before[n]) for n in before)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 0.0, -0.2], [0.0, 0.9, 0.0]]))
        model[1].weight.copy_(torch.tensor([[0.3, -0.1], [0.0, 0.7]]))
    model[0].weight.grad = torch.tensor([[0.0, 4.0, 0.0], [1.0, 0.0, 2.0]])
    model[1].weight.grad = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    # layer 0: 3 active, ⌊0.5 · 3⌋ = 1: drop (0,2) (|w| 0.2), grow (0,1) (|g| 4)
    # layer 1: 3 active, k = 1: drop (0,1) (0.1), grow (1,0) (|g| 6)
    assert s.drop_grow(0.5) == {"0": 1, "1": 1}
    assert torch.equal(s.masks["0"], torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool))
    assert torch.equal(s.masks["1"], torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))


def test_drop_grow_fraction_one_and_random_growth_from_the_generator():
    model, s = two_layers()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 0.0, -0.2], [0.0, 0.9, 0.0]]))
    model[0].weight.grad = torch.tensor([[0.0, 4.0, 0.0], [1.0, 0.0, 2.0]])
    model[1].weight.grad = torch.tensor([[5.0, 0.0], [6.0, 7.0]])
    # fraction 1: every active weight dropped, the 3 largest |g| of all positions grown
    assert s.drop_grow(1.0) == {"0": 3, "1": 1}
    assert torch.equal(s.masks["0"], torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.bool))
    assert torch.equal(s.masks["1"], torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))
    # random growth (grow= overrides the masker's rule; no gradient needed): with tie_noise 0 the
    # generator gives one torch.rand per layer, the k largest not-kept positions are grown
    model, s = two_layers()
    model[0].weight.grad = None
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 0.0, -0.2], [0.0, 0.9, 0.0]]))
        model[1].weight.copy_(torch.tensor([[0.3, -0.1], [0.0, 0.7]]))
    s.generator = g(5)
    ref = g(5)
    s.drop_grow(0.5, grow="random")
    for n, kept in (("0", [0, 4]), ("1", [0, 3])):  # the dropped ones: (0,2) and (0,1)
        r = torch.rand(s.masks[n].numel(), generator=ref)
        r[kept] = -math.inf
        expect = torch.zeros(r.numel(), dtype=torch.bool)
        expect[kept] = True
        expect[int(r.argmax())] = True
        assert torch.equal(s.masks[n].reshape(-1), expect)


def test_drop_tie_noise_from_the_generator():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.501, 0.501, 0.0, 0.0]]))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s = sparse.SparseMasker(nn.Sequential(lin), None, masks={"0": mask}, grow="random", generator=g(9))
    ref = g(9)
    s.drop_grow(1 / 3)  # 6 active, k = 2: two of the four tied |w| = 0.5, chosen by the noise
    noise = torch.randn(6, generator=ref)  # σ = 1e-5 ≪ 0.001: 0.501 is never dropped
    dropped = torch.argsort(noise[:4])[:2]
    kept = mask.reshape(-1).bool().clone()
    kept[dropped] = False
    r = torch.rand(8, generator=ref)  # then random growth: the 2 largest among the 4 not kept
    r[kept] = -math.inf
    expect = kept.clone()
    expect[torch.argsort(r, descending=True)[:2]] = True
    assert torch.equal(s.masks["0"].reshape(-1), expect)


# --- re-exploration, fork, the training step --------------------------------------------------------

class ModeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def test_reexplore_with_batch_by_hand():
    lin, probe = nn.Linear(3, 2, bias=False), ModeProbe()
    model = nn.Sequential(lin, probe)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.2, 0.0], [0.9, 0.0, 0.0]]))
    s = sparse.SparseMasker(model, None, masks={"0": torch.tensor([[1, 1, 0], [1, 0, 0]])}, tie_noise=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[lin.weight]["momentum_buffer"] = torch.full((2, 3), 7.0)
    model.eval()
    x, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, -3.0]])
    # loss Σ out ⊙ y → ∂L/∂W = yᵀx = [[1, 2, 3], [−3, −6, −9]]; ⌊0.5 · 3⌋ = 1: drop (0,1)
    # (|w| 0.2), grow (1,2) (|g| 9)
    out = s.reexplore(0.5, opt, batch=(x, y), loss_fn=lambda o, t: (o * t).sum())
    assert out == {"0": 1}
    assert torch.equal(s.masks["0"], torch.tensor([[1, 0, 0], [1, 0, 1]], dtype=torch.bool))
    assert probe.seen == [True] and model.training is False  # train mode for the pass, then restored
    assert lin.weight.grad is None
    assert torch.equal(opt.state[lin.weight]["momentum_buffer"], torch.tensor([[7.0, 0, 0], [7, 0, 0]]))
    assert s.updates == [{"step": None, "fraction": 0.5, "changed": 1, "kind": "reexplore"}]
    # random growth by grow= (over the masker's "gradient"; no gradient is there now) needs no
    # pass over the batch; q at its closed ends
    assert lin.weight.grad is None
    s.reexplore(0.5, grow="random", batch=(x, y))  # would raise under the masker's own rule
    assert int(s.masks["0"].sum()) == 3 and len(s.updates) == 2
    assert probe.seen == [True]
    assert s.reexplore(0.0) == {"0": 0}
    with pytest.raises(ValueError, match=re.escape("re-exploration rate q must lie in [0, 1], got 1.5")):
        s.reexplore(1.5)
    with pytest.raises(ValueError, match=re.escape("got -0.5")):
        s.reexplore(-0.5)
    lin.weight.grad = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    s.reexplore(1.0, grow="random")  # q = 1: all 3 dropped, 3 grown anywhere
    assert int(s.masks["0"].sum()) == 3 and s.updates[-1]["fraction"] == 1.0
    assert lin.weight.grad is not None  # without a batch the gradient is left as it was


def test_reexplore_with_batch_clears_a_stale_gradient_of_an_unused_layer():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(5, 5))  # the second layer is never called
    model.forward = lambda x: model[0](x)
    s = sparse.SparseMasker(model, 0.5, distribution="uniform", generator=g())
    model[1].weight.grad = torch.ones(5, 5)  # a stale gradient is cleared, not used for growth
    with pytest.raises(RuntimeError, match=re.escape(
            "RigL growth needs the dense gradient of '1'.weight; run a backward pass first")):
        s.reexplore(0.5, batch=(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))


def test_reexplore_default_loss_is_cross_entropy():
    def run(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4))
        s = sparse.SparseMasker(model, 0.5, distribution="uniform", tie_noise=0.0, generator=g())
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        s.reexplore(0.5, batch=(x, y), **kw)
        return s.masks["0"]

    assert torch.equal(run(), run(loss_fn=nn.functional.cross_entropy))
    assert not torch.equal(run(), run(loss_fn=lambda o, t: -o.pow(3).sum()))


def test_fork_copies_state_and_binds_the_new_model():
    m = mlp()
    s = sparse.SparseMasker(m, 0.2, grow="random", generator=g())
    s.updates.append({"step": 1, "fraction": 0.1, "changed": 0, "kind": "random"})
    f = copy.deepcopy(m)
    s2 = s.fork(f)
    assert s2.counts == s.counts and s2.counts is not s.counts
    assert s2.updates == s.updates and s2.updates[0] is not s.updates[0]
    assert s2.generator is not s.generator
    # the same generator state: the same random growth on both
    s.drop_grow(0.3)
    s2.drop_grow(0.3)
    assert all(torch.equal(s.masks[n], s2.masks[n]) for n in s.names)
    with torch.no_grad():
        f.fc1.weight.fill_(1.0)
    s2.apply()
    assert torch.equal(f.fc1.weight.detach(), s2.masks["fc1"].float())
    del f.out
    with pytest.raises(ValueError, match=re.escape("the model lacks the masked modules ['out']")):
        s.fork(f)


def step_ctx(model, optimizer, x, t):
    """A minimal train.StepContext: backward on a fixed batch."""
    def backward():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), torch.zeros(len(x), 2), reduction="sum")
        loss.backward()
        return loss
    return types.SimpleNamespace(backward=backward, step=t, optimizer=optimizer)


@pytest.mark.parametrize("skip_update", [True, False])
def test_step_update_and_plain_steps(skip_update):
    lin = nn.Linear(2, 2, bias=False)
    model = nn.Sequential(lin)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5], [0.2, 3.0]]))
    s = sparse.SparseMasker(model, None, masks={"0": torch.tensor([[1, 1], [0, 1]])}, tie_noise=0.0,
                            skip_update=skip_update, schedule=sparse.DropSchedule(alpha=1.0, delta_t=2, t_end=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 1.0]])
    # step 1: no update. out = (1.5, 3), grad 2 · out ⊗ x = [[3, 3], [6, 6]], masked → (1,0) 0
    s.step(step_ctx(model, opt, x, 1))
    assert torch.allclose(lin.weight.detach(), torch.tensor([[0.7, 0.2], [0.0, 2.4]]))
    assert s.updates == []
    # step 2: update with f(2) = ½(1 + cos(2π/3)) = 0.25: k = ⌊0.75⌋ = 0 → nothing changes; then
    # no SGD step when skip_update. out = (0.9, 2.4), grad [[1.8, 1.8], [4.8, 4.8]]
    s.step(step_ctx(model, opt, x, 2))
    assert s.updates == [{"step": 2, "fraction": pytest.approx(0.25), "changed": 0, "kind": "gradient"}]
    expect = [[0.7, 0.2], [0.0, 2.4]] if skip_update else [[0.52, 0.02], [0.0, 1.92]]
    assert torch.allclose(lin.weight.detach(), torch.tensor(expect))


# --- global magnitude masks, FLOPs, superposition, re-pruning ----------------------------------------

def test_global_magnitude_masks_by_hand_and_ties_by_position():
    ws = {"a": torch.tensor([[3.0, -1.0], [0.5, 2.0]]), "b": torch.tensor([-4.0, 0.1, 1.5]),
          "c": torch.tensor([[0.2, -2.5]])}
    # keep round(4/9 · 9) = 4: |w| 4, 3, 2.5, 2
    m = sparse.global_magnitude_masks(ws, 4 / 9)
    assert torch.equal(m["a"], torch.tensor([[True, False], [False, True]]))
    assert torch.equal(m["b"], torch.tensor([True, False, False]))
    assert torch.equal(m["c"], torch.tensor([[False, True]]))
    # equal magnitudes: the earliest positions win
    ties = sparse.global_magnitude_masks({"a": torch.ones(4, 5), "b": -torch.ones(3)}, 0.3)
    assert torch.equal(ties["a"].reshape(-1), torch.arange(20) < 7) and not bool(ties["b"].any())
    with pytest.raises(ValueError, match=re.escape("density must lie in (0, 1]")):
        sparse.global_magnitude_masks(ws, 0)


def test_reprune_names_and_message():
    m = mlp()
    with torch.no_grad():
        m.fc2.weight.fill_(0.5)
        m.out.weight.fill_(2.0)
    masks = sparse.reprune(m, 320 / 2368, names=["fc2", "out"])  # keeps exactly the 320 weights of out
    assert set(masks) == {"fc2", "out"}
    assert bool(masks["out"].all()) and not bool(masks["fc2"].any())
    assert bool((m.fc2.weight == 0).all()) and bool((m.fc1.weight != 0).all())
    with pytest.raises(ValueError, match=re.escape("modules ['act1', 'nope'] have no weight; maskable: fc1, fc2, out")):
        sparse.reprune(m, 0.5, names=["fc1", "act1", "nope"])


def test_layer_flops_by_hand():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
            self.conv1 = nn.Conv1d(2, 3, 3)
            self.lin = nn.Linear(4, 3)
            self.shared = nn.Linear(3, 3)
            self.probe = ModeProbe()

        def forward(self, x):
            a = self.conv(x["img"]).sum()
            b = self.conv1(x["seq"]).sum()
            c = self.shared(self.shared(self.lin(self.probe(x["tok"])))).sum()
            return a + b + c

    class Batch(dict):
        shape = (2,)

    net = Net()
    x = Batch(img=torch.randn(2, 4, 8, 8), seq=torch.randn(2, 2, 7), tok=torch.randn(2, 5, 4))
    f = sparse.layer_flops(net, x)
    # conv: 2 · (4/2 · 9) · 6 per output position, 4 × 4 of them: 3456; conv1: 2 · 6 · 3 · 5 = 180;
    # lin on 5 tokens: 2 · 4 · 3 · 5 = 120; shared, called twice: 2 × 2 · 3 · 3 · 5 = 180
    assert f == {"conv": 3456, "conv1": 180, "lin": 120, "shared": 180}
    assert all(type(v) is int for v in f.values())
    assert net.training and net.probe.seen == [False]  # eval mode for the pass, then restored
    assert sparse.layer_flops(net, x, names=["lin"]) == {"lin": 120}
    # one example, one output channel: 2 · (2 · 9) · 1 per position, 3 × 3 positions = 324
    assert sparse.layer_flops(nn.Sequential(nn.Conv2d(2, 1, 3)), torch.randn(1, 2, 5, 5)) == {"0": 324}
    assert all(not mod._forward_hooks for mod in net.modules())


def test_training_flops_defaults_missing_layers_and_update_count():
    f = {"a": 100, "b": 900}
    d = {"b": 0.1}  # a is missing: dense; f_S = 100 + 90 = 190, f_D = 1000
    assert sparse.training_flops(f, d, steps=10, batch_size=2) == 3 * 190 * 10 * 2  # static
    assert sparse.training_flops(f, d, steps=10, batch_size=2, method="static") == 3 * 190 * 10 * 2
    # t_end past the run: updates at 3 and 6 of 6 steps; t_end = 9: updates at 3 and 6 (not 9)
    assert sparse.training_flops(f, d, steps=6, batch_size=1, method="rigl", delta_t=3,
                                 t_end=100) == 3 * 190 * 6 + 2 * (1000 - 190)
    assert sparse.training_flops(f, d, steps=20, batch_size=1, method="rigl", delta_t=3,
                                 t_end=9) == 3 * 190 * 20 + 2 * (1000 - 190)
    for kw in (dict(delta_t=3), dict(t_end=9)):
        with pytest.raises(ValueError, match="^" + re.escape("method='rigl' needs delta_t and t_end") + "$"):
            sparse.training_flops(f, d, steps=20, batch_size=1, method="rigl", **kw)
    with pytest.raises(ValueError, match=re.escape("unknown method 'sparse'; valid choices: dense, static, set, rigl")):
        sparse.training_flops(f, d, steps=1, batch_size=1, method="sparse")


def test_superposition_defaults_buffers_and_lam_bounds():
    a, b, c = mlp(), mlp(), mlp()
    with torch.no_grad():
        for k, mod in ((1.0, b), (4.0, c)):
            for p in mod.parameters():
                p.add_(k)
            mod.bn1.running_mean.add_(k)
    caa = sparse.superposition(a)  # default rule: the equal average
    cima = sparse.superposition(a, "cima")  # default λ = 0.5
    last = sparse.superposition(a, "cima", lam=1.0)  # λ = 1: the last ticket
    for avg in (caa, cima, last):
        for mod in (a, b, c):
            avg.update_parameters(mod)
    # caa: (a + b + c)/3 = a + 5/3; cima ½: ¼a + ¼b + ½c = a + 2.25; λ = 1: c = a + 4
    for avg, shift in ((caa, 5 / 3), (cima, 2.25), (last, 4.0)):
        assert torch.allclose(avg.module.fc1.weight, a.fc1.weight + shift, atol=1e-6)
        assert torch.allclose(avg.module.bn1.running_mean, a.bn1.running_mean + shift, atol=1e-6)
    for lam in (0, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"lam must lie in (0, 1], got {lam!r}")):
            sparse.superposition(a, "cima", lam=lam)
    with pytest.raises(ValueError, match=re.escape("unknown superposition 'mean'; valid choices: caa, cima")):
        sparse.superposition(a, "mean")
