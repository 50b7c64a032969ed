"""Tests of landscape_lib.privacy against independent references: a loop over single examples
(per-example gradients), plain autograd (a non-private step), the Gaussian law (noise), and an
independent Rényi-DP computation (the accountant)."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_lib import averaging, data, models, privacy, train

torch.set_default_dtype(torch.float32)


def _mlp():
    return models.MLP(12, (32, 32), 5, norm="group")  # GroupNorm(8): 4 features a group


def _cnn():
    return models.WSCNN((1, 8, 8), n_classes=5, channels=(8, 8), groups=4)


def _layernorm():
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


class _Seq(nn.Module):
    """A sequence model (positions through Linear and LayerNorm), for the ghost Gram rule."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln, self.out = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.ln(torch.tanh(self.inp(x.reshape(len(x), 4, 3))))
        return self.out(h.mean(1))


class _Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.fc = nn.Conv1d(1, 4, 3, 2, 1), nn.GroupNorm(2, 4), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.gn(self.conv(x.reshape(len(x), 1, 12)))).flatten(1))


class _GramConv(nn.Module):
    """Convolutions with few output positions and many patch entries, where the ghost norm uses
    the positions' Gram matrix; a dilated kernel; GroupNorm with ε = 0.5; a weight-standardised
    1×1 convolution with bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 2, dilation=2)  # 3×3 → 1×1, patch n = 8
        self.gn = nn.GroupNorm(2, 8, eps=0.5)  # a non-default ε
        self.ws = models.WSConv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.ws(torch.tanh(self.gn(self.conv(x.reshape(len(x), 2, 3, 3))))))
        return self.fc(h.flatten(1))


class _Scalars(nn.Module):
    """A Linear with one input feature over 12 positions: positions, not features, count."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(1, 4), nn.Linear(4, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x.reshape(len(x), 12, 1))).mean(1))


MODELS = {"mlp-gn": (_mlp, (12,)), "wscnn-gn": (_cnn, (64,)), "layernorm": (_layernorm, (12,)),
          "sequence": (_Seq, (12,)), "conv1d": (_Conv1dNet, (12,)), "gram-conv": (_GramConv, (18,)),
          "scalars": (_Scalars, (12,))}


def _loop_grads(model, x, y, views=1):
    """Reference: per-example gradient by one autograd call per example (its K views)."""
    out = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x) // views):
        model.zero_grad()
        F.cross_entropy(model(x[i * views:(i + 1) * views]), y[i * views:(i + 1) * views]).backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


def _batch(shape, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randint(0, 5, (b,), generator=g)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("views", [1, 3])
def test_per_sample_grads_equal_a_loop_over_single_examples(name, views):
    make, shape = MODELS[name]
    torch.manual_seed(1)
    model = make()
    x, y = _batch(shape, 6 * views)
    y = y[::views].repeat_interleave(views)  # the K views of an example share its label
    ref = _loop_grads(model, x, y, views)
    got = privacy.per_sample_grads(model, x, y, views=views, chunk_size=4)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].shape == ref[n].shape
        assert _rel(got[n], ref[n]) < 1e-5, n


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_clipped_sum_and_norms_match_the_loop(name, views, method):
    """Both methods against Σ_i min(1, C/‖g_i‖) g_i of the looped per-example gradients."""
    make, shape = MODELS[name]
    torch.manual_seed(2)
    model = make()
    x, y = _batch(shape, 5 * views, seed=3)
    y = y[::views].repeat_interleave(views)
    ref = _loop_grads(model, x, y, views)
    flat = torch.cat([g.reshape(len(g), -1) for g in ref.values()], 1)
    norms = flat.norm(dim=1)
    clip = float(norms.median())  # some examples clipped, some not
    factors = (clip / norms).clamp(max=1)
    sums, got_norms, loss = privacy.clipped_grad_sum(model, x, y, max_grad_norm=clip, views=views,
                                                     method=method, chunk_size=2)
    assert _rel(got_norms, norms) < 1e-5
    for (n, _), s in zip(model.named_parameters(), sums):
        assert _rel(s, torch.tensordot(factors, ref[n], dims=1)) < 1e-5, n
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-5)


def test_every_clipped_per_example_gradient_has_norm_at_most_C():
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch((64,), 16)
    g = privacy.per_sample_grads(model, x, y)
    norms = torch.cat([v.reshape(16, -1) for v in g.values()], 1).norm(dim=1)
    for c in (1e-3, float(norms.min()), float(norms.median()), 10 * float(norms.max())):
        f = privacy.clip_factors(norms, c)
        clipped = torch.cat([(f.view(-1, *[1] * (v.dim() - 1)) * v).reshape(16, -1)
                             for v in g.values()], 1).norm(dim=1)
        assert (clipped <= c * (1 + 1e-6)).all()
        # examples under C are untouched, those above land on C
        under = norms <= c
        assert torch.allclose(clipped[under], norms[under])
        assert torch.allclose(clipped[~under], torch.full_like(clipped[~under], c), rtol=1e-5)


def _fit_one_step(model, step, x, y, lr=0.5):
    ds = data.Dataset("toy", x, y, x[:2], y[:2], 5)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train.fit(model, ds, optimizer=opt, epochs=1, sampler=train.RandomSubsets(len(x), 1),
              step=step, eval_every=0, progress=False, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_no_noise_and_a_large_clip_equal_a_plain_sgd_step(method):
    torch.manual_seed(4)
    a = _cnn()
    b = models.WSCNN((1, 8, 8), n_classes=5, channels=(8, 8), groups=4)
    b.load_state_dict(a.state_dict())
    x, y = _batch((64,), 12)
    step = privacy.DPStep(0.0, 1e6, expected_batch_size=12, sample_rate=1.0, method=method)
    _fit_one_step(a, step, x, y)
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    F.cross_entropy(b(x), y).backward()  # mean over the 12 examples = sum / expected size
    opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5)
    assert step.last["clipped"] == 0.0 and step.steps == 1


def test_the_noise_has_standard_deviation_sigma_C_over_B():
    """Zero gradients (a model whose output does not depend on its weights' gradient path is
    awkward; instead subtract the noiseless result): the added noise over P = 10026 coordinates
    and 20 draws has sample s.d. σC/B within 2 % (its relative standard error is
    1/√(2·200520) ≈ 0.16 %, so 2 % is > 10 standard errors yet catches σ vs σ/√B mistakes)."""
    torch.manual_seed(5)
    model = models.WSCNN((64,), 10)
    x, y = _batch((64,), 8)
    y = y % 10
    sigma, c, b = 1.7, 0.3, 16.0
    sums, _, _ = privacy.clipped_grad_sum(model, x, y, max_grad_norm=c)
    exact = [s / b for s in sums]
    gen = torch.Generator().manual_seed(123)
    draws = []
    for _ in range(20):
        noisy = privacy.noisy_mean(sums, sigma, c, b, gen)
        draws.append(torch.cat([(n - e).reshape(-1) for n, e in zip(noisy, exact)]))
    noise = torch.cat(draws).double()
    assert abs(float(noise.mean())) < 5 * sigma * c / b / math.sqrt(len(noise))
    assert float(noise.std()) == pytest.approx(sigma * c / b, rel=0.02)
    # a fresh generator with the same seed repeats the noise exactly
    again = privacy.noisy_mean(sums, sigma, c, b, torch.Generator().manual_seed(123))
    first = privacy.noisy_mean(sums, sigma, c, b, torch.Generator().manual_seed(123))
    assert all(torch.equal(u, v) for u, v in zip(again, first))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_augmult_with_K_identity_views_equals_K_1(method):
    torch.manual_seed(6)
    model = _mlp()
    x, y = _batch((12,), 10)
    res = {}
    for k in (1, 4):
        xs, ys = privacy.augmult(x, y, k, None, None)
        sums, norms, _ = privacy.clipped_grad_sum(model, xs, ys, max_grad_norm=0.05, views=k,
                                                  method=method)
        res[k] = (sums, norms)
    assert torch.allclose(res[1][1], res[4][1], rtol=1e-5)
    for s1, s4 in zip(res[1][0], res[4][0]):
        assert torch.allclose(s1, s4, rtol=1e-5, atol=1e-7)


def test_augmult_averages_the_views_before_clipping():
    """With two different views, the clipped gradient is clip(mean of the views), which differs
    from the mean of the clipped views (the estimator the paper warns against)."""
    torch.manual_seed(7)
    model = _mlp()
    x, y = _batch((12,), 4)
    shift = lambda v, g: v + torch.randn(v.shape, generator=g)  # noqa: E731
    xs, ys = privacy.augmult(x, y, 2, shift, torch.Generator().manual_seed(0))
    assert torch.equal(ys, y.repeat_interleave(2))
    c = 1e-3
    sums, _, _ = privacy.clipped_grad_sum(model, xs, ys, max_grad_norm=c, views=2)
    g = _loop_grads(model, xs, ys, views=2)  # per example: mean over its 2 views
    flat = torch.cat([v.reshape(4, -1) for v in g.values()], 1)
    ref = torch.tensordot((c / flat.norm(dim=1)).clamp(max=1), flat, dims=1)
    got = torch.cat([s.reshape(-1) for s in sums])
    assert _rel(got, ref) < 1e-5
    single = _loop_grads(model, xs, ys, views=1)
    flat1 = torch.cat([v.reshape(8, -1) for v in single.values()], 1)
    clip_then_mean = (flat1 * (c / flat1.norm(dim=1, keepdim=True)).clamp(max=1)).reshape(4, 2, -1).mean(1).sum(0)
    assert _rel(got, clip_then_mean) > 1e-2


def test_an_empty_poisson_batch_adds_only_noise():
    torch.manual_seed(8)
    model = _mlp()
    sums, norms, loss = privacy.clipped_grad_sum(model, torch.zeros(0, 12), torch.zeros(0, dtype=torch.long),
                                                 max_grad_norm=1.0)
    assert len(norms) == 0 and all(float(s.abs().max()) == 0 for s in sums)


def test_dp_step_through_fit_with_poisson_ema_and_accounting():
    torch.manual_seed(9)
    ds = data.Dataset("toy", *_batch((12,), 200, seed=1), *_batch((12,), 50, seed=2), 5)
    model = _mlp()
    q = 0.1
    step = privacy.DPStep(1.0, 1.0, expected_batch_size=q * 200, sample_rate=q, delta=1e-5,
                          noise_generator=torch.Generator().manual_seed(0))
    avg = averaging.ema(model, 0.99)
    hist = train.fit(model, ds, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), epochs=3,
                     sampler=train.Poisson(q), step=step, on_step=[averaging.step_hook(avg)],
                     progress=False, generator=torch.Generator().manual_seed(0))
    assert step.steps == 30 == hist.last("step") == hist.last("grad_evals")
    assert int(avg.n_averaged) == 30
    assert step.epsilon() == pytest.approx(privacy.epsilon(1.0, q, 30, 1e-5), rel=1e-12)
    sizes = [h["batch"] for h in step.history]
    assert len(set(sizes)) > 1 and abs(np.mean(sizes) - 20) < 5  # Binomial(200, 0.1)


def test_stop_at_epsilon_stops_updating_when_the_budget_is_spent():
    torch.manual_seed(10)
    ds = data.Dataset("toy", *_batch((12,), 100, seed=1), *_batch((12,), 20, seed=2), 5)
    model = _mlp()
    q, sigma, target = 0.2, 1.5, 3.0
    budget = privacy.max_steps(target, 1e-5, sigma, q)
    assert privacy.epsilon(sigma, q, budget, 1e-5) <= target < privacy.epsilon(sigma, q, budget + 1, 1e-5)
    step = privacy.DPStep(sigma, 1.0, expected_batch_size=20, sample_rate=q, delta=1e-5,
                          stop_at_epsilon=target)
    epochs = budget // 5 + 2
    train.fit(model, ds, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=epochs,
              sampler=train.Poisson(q), step=step, progress=False, eval_every=0)
    assert step.steps == budget and step.stopped_at == budget + 1
    assert step.epsilon() <= target


def _log_moment(q, sigma, alpha):
    """log E_{z~N(0,σ²)} [((1−q) + q·exp((2z−1)/(2σ²)))^α], the α-th moment of the privacy loss
    of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019, A_α), by numerical
    quadrature in log space (scipy.integrate.quad around the integrand's peak) — not the
    series that Opacus sums."""
    from scipy import integrate

    def log_f(z):
        ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma ** 2))
        return alpha * ratio - z * z / (2 * sigma ** 2) - math.log(sigma * math.sqrt(2 * math.pi))

    grid = np.linspace(-30 * sigma, 30 * sigma + 2 * alpha, 4001)
    peak = float(grid[np.argmax(log_f(grid))])
    m, width = float(log_f(peak)), 10 * sigma
    pieces = [integrate.quad(lambda z: math.exp(log_f(z) - m), lo, hi, limit=200, epsabs=0,
                             epsrel=1e-10)[0]
              for lo, hi in ((-np.inf, peak - width), (peak - width, peak),
                             (peak, peak + width), (peak + width, np.inf))]
    return m + math.log(sum(pieces))


def _rdp_epsilon(q, sigma, steps, delta):
    """Independent reference ε: RDP ε(α) = T·log A_α/(α−1) over orders 1.1 … 256, converted with
    Balle et al. (2020)'s bound ε = rdp − (log δ + log α)/(α − 1) + log((α − 1)/α)."""
    orders = np.concatenate([np.arange(1.1, 11, 0.1), np.arange(11, 65), [80, 128, 256]])
    best = math.inf
    for a in orders:
        rdp = steps * _log_moment(q, sigma, a) / (a - 1)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


@pytest.mark.parametrize("q,sigma,steps", [(256 / 1257, 7.25, 73), (256 / 1257, 1.42, 73),
                                           (256 / 4000, 1.0, 312), (0.01, 2.0, 5000)])
def test_the_accountant_matches_an_independent_rdp_computation(q, sigma, steps):
    ours = privacy.epsilon(sigma, q, steps, 1e-5)
    ref = _rdp_epsilon(q, sigma, steps, 1e-5)
    assert ours == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_noise_calibration_for_the_chapters_digits_settings(target):
    """The card's digits runs: q = 256/1257, 73 steps, δ = 1e-5: σ from Opacus reaches ε within
    1 % of the target by the independent RDP computation too."""
    q, steps = 256 / 1257, 73
    sigma = privacy.noise_multiplier(target, 1e-5, q, steps)
    assert target - 0.011 <= privacy.epsilon(sigma, q, steps, 1e-5) <= target
    assert _rdp_epsilon(q, sigma, steps, 1e-5) == pytest.approx(target, rel=0.01)
    assert privacy.epsilon(sigma * 1.05, q, steps, 1e-5) < target  # more noise, less ε


def test_prv_accountant_is_tighter_than_rdp():
    q, sigma, steps = 256 / 4000, 1.0, 312
    assert privacy.epsilon(sigma, q, steps, 1e-5, "prv") < privacy.epsilon(sigma, q, steps, 1e-5)


def test_batchnorm_is_refused_and_group_norm_allowed():
    privacy.check_model(models.MLP(4, (8,), 2, norm="group"))
    privacy.check_model(models.ws_wide_resnet(10, 1))
    with pytest.raises(ValueError, match=r"BatchNorm .*layers: bn1.*Allowed normalisation layers: GroupNorm"):
        privacy.check_model(models.MLP(4, (8,), 2, norm="batch"))
    with pytest.raises(ValueError, match="BatchNorm"):
        privacy.per_sample_grads(models.WideResNet(10, 1), torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))


def test_ghost_support_detection_and_auto_fallback():
    assert privacy.ghost_supported(_cnn()) and privacy.ghost_supported(_layernorm())
    vit = models.ViT((12,), n_classes=5, patch=4, dim=8, depth=1, heads=2)
    assert not privacy.ghost_supported(vit)  # its class token and position embeddings
    x, y = _batch((12,), 4)
    with pytest.raises(ValueError, match=r"^method='ghost' supports Linear, .* use method='vmap' or 'auto'$"):
        privacy.clipped_grad_sum(vit, x, y, max_grad_norm=1.0, method="ghost")
    sums, norms, _ = privacy.clipped_grad_sum(vit, x, y, max_grad_norm=1.0, method="auto")
    ref = _loop_grads(vit, x, y)
    assert _rel(norms, torch.cat([g.reshape(4, -1) for g in ref.values()], 1).norm(dim=1)) < 1e-5


def _full(message):
    """The whole error text (mutants that decorate or drop a message must not pass)."""
    return "^" + re.escape(message) + "$"


_LONG = torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize("call,message", [
    # ε: zero, negative, infinite, not a number
    (lambda: privacy.noise_multiplier(0.0, 1e-5, 0.1, 10), "epsilon must be a finite number > 0, got 0.0"),
    (lambda: privacy.noise_multiplier(-1.0, 1e-5, 0.1, 10), "epsilon must be a finite number > 0, got -1.0"),
    (lambda: privacy.max_steps(math.inf, 1e-5, 1.0, 0.1), "epsilon must be a finite number > 0, got inf"),
    (lambda: privacy.max_steps("1", 1e-5, 1.0, 0.1), "epsilon must be a finite number > 0, got '1'"),
    # δ: both ends of the open interval, not a number
    (lambda: privacy.noise_multiplier(1.0, 0.0, 0.1, 10), "delta must lie in the open interval (0, 1), got 0.0"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1.0), "delta must lie in the open interval (0, 1), got 1.0"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, "0.1"), "delta must lie in the open interval (0, 1), got '0.1'"),
    # σ: negative, infinite, not a number
    (lambda: privacy.epsilon(-0.5, 0.1, 10, 1e-5), "noise multiplier σ must be a finite number >= 0, got -0.5"),
    (lambda: privacy.epsilon(math.inf, 0.1, 10, 1e-5), "noise multiplier σ must be a finite number >= 0, got inf"),
    (lambda: privacy.epsilon("1", 0.1, 10, 1e-5), "noise multiplier σ must be a finite number >= 0, got '1'"),
    # q: 0, above 1, not a number
    (lambda: privacy.epsilon(1.0, 0.0, 10, 1e-5), "sampling rate q must lie in (0, 1], got 0.0"),
    (lambda: privacy.epsilon(1.0, 1.5, 10, 1e-5), "sampling rate q must lie in (0, 1], got 1.5"),
    (lambda: privacy.epsilon(1.0, "0.1", 10, 1e-5), "sampling rate q must lie in (0, 1], got '0.1'"),
    # steps: 0, a bool, a float
    (lambda: privacy.epsilon(1.0, 0.1, 0, 1e-5), "number of steps must be an integer >= 1, got 0"),
    (lambda: privacy.epsilon(1.0, 0.1, True, 1e-5), "number of steps must be an integer >= 1, got True"),
    (lambda: privacy.epsilon(1.0, 0.1, 2.0, 1e-5), "number of steps must be an integer >= 1, got 2.0"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, "gdp"), "unknown accountant 'gdp'; valid accountants: rdp, prv"),
    (lambda: privacy.noise_multiplier(1.0, 1e-5, 0.1, 10, "gdp"),
     "unknown accountant 'gdp'; valid accountants: rdp, prv"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, accountant="gdp"),
     "unknown accountant 'gdp'; valid accountants: rdp, prv"),
    # C: 0, infinite, not a number
    (lambda: privacy.clip_factors(torch.ones(2), 0.0),
     "clipping norm C (max_grad_norm) must be a finite number > 0, got 0.0"),
    (lambda: privacy.clip_factors(torch.ones(2), math.inf),
     "clipping norm C (max_grad_norm) must be a finite number > 0, got inf"),
    (lambda: privacy.clip_factors(torch.ones(2), "1"),
     "clipping norm C (max_grad_norm) must be a finite number > 0, got '1'"),
    (lambda: privacy.DPStep(1.0, -1.0, 10, 0.1),
     "clipping norm C (max_grad_norm) must be a finite number > 0, got -1.0"),
    (lambda: privacy.DPStep(-1.0, 1.0, 10, 0.1), "noise multiplier σ must be a finite number >= 0, got -1.0"),
    # K: 0, a bool, a float
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, views=0),
     "augmentation multiplicity K (views) must be an integer >= 1, got 0"),
    (lambda: privacy.augmult(torch.ones(2, 1), _LONG[:2], True, None, None),
     "augmentation multiplicity K (views) must be an integer >= 1, got True"),
    (lambda: privacy.augmult(torch.ones(2, 1), _LONG[:2], 2.0, None, None),
     "augmentation multiplicity K (views) must be an integer >= 1, got 2.0"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.0), "sampling rate q must lie in (0, 1], got 0.0"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, method="fast"),
     "unknown method 'fast'; valid methods: auto, ghost, vmap"),
    (lambda: privacy.clipped_grad_sum(_mlp(), torch.randn(3, 12), _LONG, max_grad_norm=1.0, method="fast"),
     "unknown method 'fast'; valid methods: auto, ghost, vmap"),
    (lambda: privacy.DPStep(1.0, 1.0, 0, 0.1), "expected batch size must be > 0, got 0"),
    (lambda: privacy.DPStep(1.0, 1.0, "8", 0.1), "expected batch size must be > 0, got '8'"),
    (lambda: privacy.noisy_mean([torch.ones(2)], 1.0, 1.0, 0), "expected batch size must be > 0, got 0"),
    (lambda: privacy.noisy_mean([torch.ones(2)], 1.0, 1.0, "8"), "expected batch size must be > 0, got '8'"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, delta=1.0), "delta must lie in the open interval (0, 1), got 1.0"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, stop_at_epsilon=2.0),
     "stop_at_epsilon needs delta (a number in (0, 1))"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, stop_at_epsilon=0.0, delta=1e-5),
     "epsilon must be a finite number > 0, got 0.0"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1).epsilon(), "give delta (a number in (0, 1)) to compute ε"),
    (lambda: privacy.per_sample_grads(_mlp(), torch.randn(3, 12), _LONG, views=2),
     "3 rows are not a whole number of examples with K=2 views"),
    (lambda: privacy.clipped_grad_sum(_mlp(), torch.randn(3, 12), _LONG, max_grad_norm=1.0, views=2),
     "3 rows are not a whole number of examples with K=2 views"),
    (lambda: privacy.per_sample_grads(_mlp(), torch.randn(3, 12), _LONG, chunk_size=0),
     "chunk_size must be an integer >= 1 (examples per micro-batch), got 0"),
    (lambda: privacy.per_sample_grads(_mlp(), torch.randn(3, 12), _LONG, chunk_size=True),
     "chunk_size must be an integer >= 1 (examples per micro-batch), got True"),
    (lambda: privacy.clipped_grad_sum(_mlp(), torch.randn(3, 12), _LONG, max_grad_norm=1.0, chunk_size=1.5),
     "chunk_size must be an integer >= 1 (examples per micro-batch), got 1.5"),
])
def test_bad_input_names_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=_full(message)):
        call()


def test_poisson_refuses_a_zero_rate():
    with pytest.raises(ValueError, match=r"sampling rate must lie in \(0, 1\]"):
        train.Poisson(0.0)


def test_ghost_clipping_of_the_gpu_network_with_crop_flip_views():
    """The gpu profile's path: a (tiny) WRN with WS-Conv + GroupNorm, K = 2 crop-and-flip views,
    micro-batches: norms and clipped sum against the loop over single examples."""
    torch.manual_seed(11)
    net = models.ws_wide_resnet(10, 1, n_classes=5, groups=4)
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 3, 4])
    xs, ys = privacy.augmult(x, y, 2, data.crop_flip, torch.Generator().manual_seed(0))
    ref = _loop_grads(net, xs, ys, views=2)
    flat = torch.cat([g.reshape(3, -1) for g in ref.values()], 1)
    norms = flat.norm(dim=1)
    clip = float(norms.median())
    sums, got, _ = privacy.clipped_grad_sum(net, xs, ys, max_grad_norm=clip, views=2, method="ghost",
                                            chunk_size=2)
    assert _rel(got, norms) < 1e-5
    ref_sum = torch.tensordot((clip / norms).clamp(max=1), flat, dims=1)
    assert _rel(torch.cat([s.reshape(-1) for s in sums]), ref_sum) < 1e-5


# --- validation: the accepted edge of every range --------------------------------------------

def test_the_edges_of_the_valid_ranges_are_accepted():
    """q = 1, σ = 0, one step, K = 1, chunk_size = 1, ε and C below 1, δ just inside (0, 1):
    all valid (each check's comparison sits exactly on its documented bound)."""
    assert privacy.epsilon(0.0, 1.0, 1, 0.5) == math.inf  # σ = 0: no privacy
    assert privacy.max_steps(0.5, 0.999, 0.0, 1.0) == 0
    step = privacy.DPStep(0, 0.5, 0.5, 1, views=1, delta=0.999, stop_at_epsilon=0.5)
    assert step.views == 1 and step.epsilon() == 0.0
    assert privacy.DPStep(0.0, 1, 1, 0.5, views=3).views == 3  # ints are numbers too
    assert torch.equal(privacy.clip_factors(torch.tensor([1.0]), 1), torch.tensor([1.0]))
    x, y = _batch((12,), 2)
    g = privacy.per_sample_grads(_mlp(), x, y, chunk_size=1)
    assert all(len(v) == 2 for v in g.values())


# --- accounting -------------------------------------------------------------------------------

def _gaussian_rdp_epsilon(sigma, steps, delta):
    """ε of ``steps`` Gaussian mechanisms (q = 1) by the paper's closed form: RDP ε(α) = T·α/(2σ²)
    over the module's documented orders (Opacus' 1.1 … 10.9, 12 … 63, and 80, 128, 256),
    converted with Balle et al. (2020). Returns (ε, optimal order)."""
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256]
    return min((steps * a / (2 * sigma ** 2) - (math.log(delta) + math.log(a)) / (a - 1)
                + math.log((a - 1) / a), a) for a in orders)


@pytest.mark.parametrize("sigma,steps,order", [(100.0, 1, 256), (30.0, 1, 128), (10.0, 3, 25), (0.05, 1, 1.2)])
def test_the_accountant_at_q_1_equals_the_gaussian_closed_form(sigma, steps, order):
    """No subsampling: RDP of the Gaussian mechanism is T·α/(2σ²) exactly. The cases put the
    optimum at 256 and 128 (beyond Opacus' default orders, which stop at 63), inside, and at 1.2."""
    ref, best = _gaussian_rdp_epsilon(sigma, steps, 1e-5)
    assert best == pytest.approx(order)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest")  # the 256 case
        got = privacy.epsilon(sigma, 1.0, steps, 1e-5)
        assert got == pytest.approx(ref, rel=1e-12)
        assert privacy.epsilon(sigma, 1.0, steps, 1e-5, "rdp") == got  # the default accountant


def _exact_gaussian_epsilon(sigma, steps, delta):
    """T Gaussian steps at σ (q = 1) are one Gaussian mechanism of sensitivity μ = √T/σ, whose
    exact δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018): ε by root finding."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = math.sqrt(steps) / sigma
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 50)


def test_rdp_warns_when_the_optimum_is_its_largest_order_but_prv_does_not():
    """ε = 0.0323 at σ = 100 has its optimum at the largest order 256 (Opacus says so); the PRV
    accountant's internal RDP bound hits Opacus' largest order too, a warning that is not about
    the ε it returns and is silenced."""
    with pytest.warns(UserWarning, match="Optimal order is the largest alpha"):
        privacy.epsilon(100.0, 1.0, 1, 1e-5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eps = privacy.epsilon(100.0, 1.0, 1, 1e-5, "prv")
    exact = _exact_gaussian_epsilon(100.0, 1, 1e-5)
    assert exact <= eps <= exact + 0.02
    assert not [w for w in seen if "Optimal order" in str(w.message)]


def test_prv_at_q_1_bounds_the_exact_gaussian_epsilon_from_above():
    """Opacus' PRV returns an upper bound within its ε error (0.01) of the exact ε of the
    Gaussian mechanism; RDP is looser (8.08 here, by its closed form)."""
    sigma, steps, delta = 2.0, 10, 1e-5
    exact = _exact_gaussian_epsilon(sigma, steps, delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Opacus' log(1 − q) at q = 1
        got = privacy.epsilon(sigma, 1.0, steps, delta, "prv")
    assert exact <= got <= exact + 0.02
    rdp = _gaussian_rdp_epsilon(sigma, steps, delta)[0]
    assert rdp == pytest.approx(8.0794, abs=1e-4) and privacy.epsilon(sigma, 1.0, steps, delta) == pytest.approx(
        rdp, rel=1e-12)


def test_noise_multiplier_default_tolerance_and_the_bisection_orders():
    """Opacus' bisection over its own default orders (1.1 … 63): at q = 1 its ε by the closed
    form lies in [target − tolerance, target]; the default tolerance is 0.01."""
    from opacus.accountants import RDPAccountant

    def eps_default_orders(sigma, steps, delta):
        return min(steps * a / (2 * sigma ** 2) - (math.log(delta) + math.log(a)) / (a - 1)
                   + math.log((a - 1) / a) for a in RDPAccountant.DEFAULT_ALPHAS)

    target, delta, steps = 3.0, 1e-5, 4
    sigma = privacy.noise_multiplier(target, delta, 1.0, steps)
    assert sigma == privacy.noise_multiplier(target, delta, 1.0, steps, "rdp", 0.01)
    assert target - 0.01 <= eps_default_orders(sigma, steps, delta) <= target
    loose = privacy.noise_multiplier(target, delta, 1.0, steps, tolerance=0.5)
    assert loose != sigma and target - 0.5 <= eps_default_orders(loose, steps, delta) <= target


def _max_steps_ref(target, sigma, delta, cap=10 ** 7):
    """The largest T (≤ cap) with closed-form ε(T) ≤ target, by a plain loop (q = 1)."""
    t = 0
    while t < cap and _gaussian_rdp_epsilon(sigma, t + 1, delta)[0] <= target:
        t += 1
    return t


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 6, 9, 12, 17])
def test_max_steps_at_q_1_equals_a_loop_over_the_closed_form(steps):
    """A target midway between ε(T) and ε(T + 1) gives T (every doubling and bisection branch:
    powers of two, their neighbours, odd and even)."""
    sigma, delta = 20.0, 1e-5
    lo, hi = (_gaussian_rdp_epsilon(sigma, t, delta)[0] for t in (steps, steps + 1))
    target = (lo + hi) / 2
    assert _max_steps_ref(target, sigma, delta) == steps
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest")
        assert privacy.max_steps(target, delta, sigma, 1.0) == steps
        assert privacy.max_steps(target, delta, sigma, 1.0, "rdp") == steps  # the default accountant


def test_max_steps_on_the_boundary_and_below_one_step():
    """ε exactly equal to the budget is allowed (≤): at ε(1) one step, at ε(4) four, at ε(6)
    six, also with limit=6; just below ε(1) none. σ = 1 is an ordinary noise level (ε(T) at q = 1
    by the closed form), not the no-noise case."""
    q, sigma, delta = 1.0, 1.1, 1e-5
    e1, e4, e6 = (privacy.epsilon(sigma, q, t, delta) for t in (1, 4, 6))
    assert privacy.max_steps(e1, delta, sigma, q) == 1
    assert privacy.max_steps(e4, delta, sigma, q) == 4  # on a doubling point
    assert privacy.max_steps(e6, delta, sigma, q) == 6  # on a bisection point
    assert privacy.max_steps(e6, delta, sigma, q, limit=6) == 6  # on the cap (not a power of 2)
    assert privacy.max_steps(math.nextafter(e1, 0), delta, sigma, q) == 0
    target = _gaussian_rdp_epsilon(1.0, 3, delta)[0] + 0.01  # ε(3) = 9.01 < 9.02 < ε(4) = 10.73
    assert _max_steps_ref(target, 1.0, delta) == 3 == privacy.max_steps(target, delta, 1.0, q)


def test_max_steps_stops_at_limit_and_never_above_the_budget():
    """``limit`` caps the answer, but a budget under the limit is still found exactly: 9 steps
    fit in the budget, so limit=10 (between 8 = 2³ and 16) must give 9, not 10; limit=9 and
    limit=8 give themselves. The default limit is 10⁷ (at σ = 10⁴, q = 1, ε = 2 affords more)."""
    sigma, delta = 20.0, 1e-5
    e9, e10 = (_gaussian_rdp_epsilon(sigma, t, delta)[0] for t in (9, 10))
    target = (e9 + e10) / 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest")
        assert privacy.max_steps(target, delta, sigma, 1.0, limit=10) == 9
        assert privacy.max_steps(target, delta, sigma, 1.0, limit=9) == 9
        assert privacy.max_steps(target, delta, sigma, 1.0, limit=8) == 8
        assert privacy.max_steps(target, delta, sigma, 1.0, limit=1) == 1
        assert _gaussian_rdp_epsilon(1e4, 10 ** 7, delta)[0] < 2.0
        assert privacy.max_steps(2.0, delta, 1e4, 1.0) == 10 ** 7


def test_max_steps_and_dpstep_use_the_chosen_accountant():
    """q = 1, σ = 5, ε ≤ 1.4: RDP (closed form ε(2) = 1.158, ε(3) = 1.446) affords 2 steps; the
    tighter PRV (ε(3) ≈ 1.336 ≥ the exact 1.33 of the Gaussian) affords 3, which DPStep's budget uses."""
    q, sigma, delta, target = 1.0, 5.0, 1e-5, 1.4
    assert _max_steps_ref(target, sigma, delta) == 2 == privacy.max_steps(target, delta, sigma, q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step = privacy.DPStep(sigma, 1.0, 10, q, accountant="prv", delta=delta, stop_at_epsilon=target)
        assert step._budget == 3
        e3, e4 = privacy.epsilon(sigma, q, 3, delta, "prv"), privacy.epsilon(sigma, q, 4, delta, "prv")
        assert _exact_gaussian_epsilon(sigma, 3, delta) <= e3 <= target < _exact_gaussian_epsilon(sigma, 4, delta)
        step.steps = 3
        assert step.epsilon() == e3
        assert step.epsilon(1e-3) == privacy.epsilon(sigma, q, 3, 1e-3, "prv") < e3
    assert e4 > target


# --- per-example gradients, clipping ---------------------------------------------------------

def test_clip_factors_by_hand():
    """min(1, C/‖g‖): norms 0, 0.5, 1, 2, 4 at C = 1 → 1, 1, 1, 0.5, 0.25; at C = 0.25 → 1 (a
    zero gradient), 0.5, 0.25, 0.125, 0.0625."""
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])
    assert torch.equal(privacy.clip_factors(norms, 1.0), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.25]))
    assert torch.equal(privacy.clip_factors(norms, 0.25), torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625]))


class _Scaled(nn.Module):
    """A Linear whose output is multiplied by a buffer, with a frozen extra weight."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.extra = nn.Parameter(torch.tensor([0.5, -2.0]), requires_grad=False)
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        return self.fc(x) * self.scale + self.extra


def test_per_sample_grads_skip_frozen_parameters_and_use_buffers():
    torch.manual_seed(12)
    model = _Scaled()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    got = privacy.per_sample_grads(model, x, y)
    assert set(got) == {"fc.weight", "fc.bias"}
    ref = {n: [] for n in got}
    for i in range(4):  # loop reference
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n in ref:
            ref[n].append(dict(model.named_parameters())[n].grad.clone())
    for n in got:
        assert torch.allclose(got[n], torch.stack(ref[n]), atol=1e-6), n
    # the defaults: cross-entropy, K = 1, everything in one chunk
    explicit = privacy.per_sample_grads(model, x, y, loss_fn=F.cross_entropy, views=1, chunk_size=4)
    assert all(torch.equal(got[n], explicit[n]) for n in got)


def test_per_sample_grads_of_an_empty_batch_and_a_custom_loss():
    model = _Scaled()
    empty = privacy.per_sample_grads(model, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert {n: tuple(v.shape) for n, v in empty.items()} == {"fc.weight": (0, 2, 3), "fc.bias": (0, 2)}
    # loss = mean over the K rows of Σ_j out_j: the gradient of fc.bias is scale·(1, 1) = (3, 3)
    with torch.no_grad():
        model.fc.weight.fill_(0.0)
    x = torch.randn(4, 3)
    g = privacy.per_sample_grads(model, x, torch.zeros(4), loss_fn=lambda out, y: out.sum(1).mean(), views=2)
    assert torch.equal(g["fc.bias"], torch.full((2, 2), 3.0))
    # weight: scale · mean of the 2 views' inputs, per output row
    ref = 3.0 * x.reshape(2, 2, 3).mean(1)
    assert torch.allclose(g["fc.weight"], ref[:, None, :].expand(2, 2, 3), atol=1e-6)


def test_ghost_support_by_layer_type_and_convolution_options():
    good = [nn.Linear(2, 2), nn.Conv1d(1, 2, 3), nn.Conv2d(1, 2, 3, padding=1), models.WSConv2d(1, 2, 3),
            nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.ReLU()]
    for m in good:
        assert privacy.ghost_supported(nn.Sequential(m)) is True, m
    bad = [nn.Conv2d(2, 2, 3, groups=2), nn.Conv1d(2, 2, 3, groups=2), nn.Conv2d(1, 2, 3, padding="same"),
           nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Conv1d(1, 2, 3, padding="valid"),
           nn.Embedding(4, 2), nn.Bilinear(2, 2, 2)]
    for m in bad:
        assert privacy.ghost_supported(nn.Sequential(nn.Linear(2, 2), m)) is False, m

    class MyLinear(nn.Linear):  # a subclass may change the forward: no rule
        pass

    assert privacy.ghost_supported(MyLinear(2, 2)) is False
    frozen = nn.Embedding(4, 2)
    frozen.weight.requires_grad_(False)  # a frozen layer needs no rule
    assert privacy.ghost_supported(nn.Sequential(frozen, nn.Linear(2, 2))) is True


class _Frozen(nn.Module):
    """Layers with frozen or absent weights or biases, for the ghost rules' filters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.ws = models.WSConv2d(4, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 4, eps=0.5)  # a non-default ε reaches the ghost rule too
        self.gn.weight.requires_grad_(False)
        self.conv1 = nn.Conv1d(4, 4, 1)
        self.conv1.weight.requires_grad_(False)
        self.fc = nn.Linear(64, 6)
        self.fc.weight.requires_grad_(False)
        self.ln = nn.LayerNorm(6, bias=False, eps=0.5)
        self.head = nn.Linear(6, 5, bias=False)
        self.tail = nn.Linear(5, 5)
        self.tail.bias.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.gn(self.ws(torch.tanh(self.conv(x.reshape(len(x), 1, 4, 4))))))
        h = torch.tanh(self.conv1(h.flatten(2))).flatten(1)
        return self.tail(torch.tanh(self.head(torch.tanh(self.ln(self.fc(h))))))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_clipped_sum_with_frozen_and_absent_weights_and_biases(method):
    """``None`` at the frozen parameters, and the trainable ones against the loop."""
    torch.manual_seed(13)
    model = _Frozen()
    assert privacy.ghost_supported(model)
    x, y = _batch((16,), 5, seed=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: [] for n in trainable}
    for i in range(5):  # loop reference over the trainable parameters
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(trainable.values()))
        for n, gi in zip(trainable, g):
            ref[n].append(gi)
    ref = {n: torch.stack(v) for n, v in ref.items()}
    flat = torch.cat([g.reshape(5, -1) for g in ref.values()], 1)
    norms = flat.norm(dim=1)
    clip = float(norms.median())
    factors = (clip / norms).clamp(max=1)
    sums, got, _ = privacy.clipped_grad_sum(model, x, y, max_grad_norm=clip, method=method, chunk_size=3)
    assert _rel(got, norms) < 1e-5
    for (n, p), s in zip(model.named_parameters(), sums):
        if p.requires_grad:
            assert s.shape == p.shape and _rel(s, torch.tensordot(factors, ref[n], dims=1)) < 1e-5, n
        else:
            assert s is None, n


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_clipped_sum_defaults_and_a_custom_loss(method):
    """Default chunk (all examples) = one example at a time; ``method='auto'`` is ghost on a
    supported model; a custom ``loss_fn`` reaches both the gradients and the returned loss."""
    torch.manual_seed(14)
    model = _layernorm()
    x, y = _batch((12,), 6, seed=5)
    loss_fn = lambda out, t: F.cross_entropy(out, t, label_smoothing=0.3)  # noqa: E731
    whole = privacy.clipped_grad_sum(model, x, y, max_grad_norm=0.1, loss_fn=loss_fn, method=method)
    ones = privacy.clipped_grad_sum(model, x, y, max_grad_norm=0.1, loss_fn=loss_fn, method=method, chunk_size=1)
    for a, b in zip(whole[0], ones[0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert torch.allclose(whole[1], ones[1], rtol=1e-5)
    assert float(whole[2]) == pytest.approx(float(loss_fn(model(x), y).detach()), rel=1e-6)
    norms = []
    for i in range(6):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        norms.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    assert _rel(whole[1], torch.stack(norms)) < 1e-5
    if method == "ghost":
        auto = privacy.clipped_grad_sum(model, x, y, max_grad_norm=0.1, loss_fn=loss_fn)
        assert all(torch.equal(a, b) for a, b in zip(auto[0], whole[0])) and torch.equal(auto[1], whole[1])


def test_an_empty_batch_gives_zero_sums_none_for_frozen_and_a_zero_loss():
    model = _Frozen()
    for method in ("ghost", "vmap"):
        sums, norms, loss = privacy.clipped_grad_sum(model, torch.zeros(0, 16), torch.zeros(0, dtype=torch.long),
                                                     max_grad_norm=1.0, method=method)
        for p, s in zip(model.parameters(), sums):
            assert (s is None) if not p.requires_grad else torch.equal(s, torch.zeros_like(p))
        assert norms.shape == (0,) and loss.shape == () and float(loss) == 0.0


def test_ghost_refuses_a_layer_called_twice_and_unsupported_models():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=_full("layer Linear is called twice in one forward pass; "
                                                 "use method='vmap'")):
        privacy.clipped_grad_sum(Twice(), x, y, max_grad_norm=1.0, method="ghost")
    with pytest.raises(ValueError, match=_full("method='ghost' supports Linear, Conv1d/Conv2d (groups=1, numeric "
                                               "padding), WSConv2d, GroupNorm and LayerNorm layers only; use "
                                               "method='vmap' or 'auto'")):
        privacy.clipped_grad_sum(nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 4)), x, y, max_grad_norm=1.0,
                                 method="ghost")


def test_check_model_names_every_batchnorm_layer():
    msg = ("DP-SGD needs per-example gradients, but BatchNorm mixes the examples of a batch (layers: {}). "
           "Allowed normalisation layers: GroupNorm, LayerNorm, or none; use models.WSConv2d + GroupNorm "
           "(models.WSCNN, models.ws_wide_resnet) or MLP(norm='group'/'layer')")
    two = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.SyncBatchNorm(2)))
    with pytest.raises(ValueError, match=_full(msg.format("1, 2.0"))):
        privacy.check_model(two)
    with pytest.raises(ValueError, match=_full(msg.format("BatchNorm2d"))):  # the model itself
        privacy.check_model(nn.BatchNorm2d(3))
    ok = nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.InstanceNorm1d(2))
    assert privacy.check_model(ok) is ok


# --- noise, views -----------------------------------------------------------------------------

def test_noisy_mean_reproduces_the_documented_draws_exactly():
    """(s + σC·n)/B with n drawn on the CPU from the generator, tensor after tensor, in the sums'
    dtype; ``None`` stays ``None`` and draws nothing."""
    sums = [torch.arange(6, dtype=torch.float64).reshape(2, 3), None, torch.tensor([1.0, -1.0])]
    sigma, c, b = 0.5, 0.6, 8  # σ < 1 is noise too
    got = privacy.noisy_mean(sums, sigma, c, b, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    n1 = torch.randn((2, 3), generator=gen, dtype=torch.float64)
    n2 = torch.randn((2,), generator=gen, dtype=torch.float32)
    assert got[1] is None
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.float32
    assert torch.allclose(got[0], (sums[0] + 0.3 * n1) / 8, rtol=1e-14, atol=0)
    assert torch.allclose(got[2], (sums[2] + 0.3 * n2) / 8, rtol=1e-6, atol=0)


def test_noisy_mean_without_noise_divides_and_leaves_the_generator_alone():
    sums = [torch.tensor([2.0, -6.0]), None]
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    got = privacy.noisy_mean(sums, 0.0, 1.0, 0.5, gen)  # B = 0.5: any positive size is valid
    assert torch.equal(got[0], torch.tensor([4.0, -12.0])) and got[1] is None
    assert torch.equal(gen.get_state(), state)


def test_augmult_rows_are_view_k_of_example_i_and_get_the_generator():
    x, y = torch.tensor([[1.0, -1.0], [2.0, -2.0]]), torch.tensor([7, 8])
    calls = []

    def augment(v, g):  # the k-th call adds 10·k
        calls.append(g)
        return v + 10 * (len(calls) - 1)

    gen = torch.Generator()
    xs, ys = privacy.augmult(x, y, 3, augment, gen)
    assert torch.equal(xs, torch.tensor([[1.0, -1.0], [11.0, 9.0], [21.0, 19.0],
                                         [2.0, -2.0], [12.0, 8.0], [22.0, 18.0]]))
    assert torch.equal(ys, torch.tensor([7, 7, 7, 8, 8, 8]))
    assert len(calls) == 3 and all(g is gen for g in calls)
    soft = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # soft labels: rows repeated, not flattened
    xs, ys = privacy.augmult(x, soft, 2, None, None)
    assert torch.equal(xs, torch.tensor([[1.0, -1.0], [1.0, -1.0], [2.0, -2.0], [2.0, -2.0]]))
    assert torch.equal(ys, torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]]))


# --- DPStep without fit -----------------------------------------------------------------------

class _Dot(nn.Module):
    """out = w·x with a frozen bias; under ``_dot_loss`` example i's gradient is x_i exactly."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.5, -0.25]]))
            self.fc.bias.zero_()
        self.fc.bias.requires_grad_(False)

    def forward(self, x):
        return self.fc(x)


def _dot_loss(out, y):
    return (out.squeeze(1) * y).mean()


_X = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.75, 1.0]])  # per-example norms 5, 10, 1.25
_Y = torch.ones(3)


def _ctx(model, x, y, step=1, lr=1.0, loss_fn=F.cross_entropy):
    opt = torch.optim.SGD([p for p in model.parameters()], lr=lr)
    return train.StepContext(model, opt, loss_fn, train.Batch(x, y, torch.arange(len(x))), 1, step, None)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_dp_step_by_hand(method):
    """C = 5 clips only the norm-10 example (the norm-5 one sits on C: not clipped):
    Σ ḡ_i = (3, 4) + ½(6, 8) + (0.75, 1) = (6.75, 9), ‖·‖ = 11.25; B = 4 and lr = 1 give
    w = (0.5, −0.25) − (6.75, 9)/4 = (−1.1875, −2.5). Loss = mean(0.5, 1, 0.125) = 13/24."""
    model = _Dot()
    model.fc.bias.grad = torch.ones(1)  # a stale gradient of the frozen bias is cleared
    step = privacy.DPStep(0.0, 5.0, expected_batch_size=4, sample_rate=0.5, method=method, loss_fn=_dot_loss)
    ctx = _ctx(model, _X, _Y)  # fit's cross-entropy is overridden by the step's loss_fn
    loss = step(ctx)
    assert float(loss) == pytest.approx(13 / 24, rel=1e-6)
    assert torch.allclose(model.fc.weight, torch.tensor([[-1.1875, -2.5]]), rtol=1e-6)
    assert model.fc.bias.grad is None and float(model.fc.bias) == 0.0
    assert ctx.grad_evals == 1 and step.steps == 1
    assert step.last == pytest.approx({"batch": 3, "mean_norm": 16.25 / 3, "clipped": 1 / 3,
                                       "signal": 11.25 / 4, "noise": 0.0}, rel=1e-6)
    assert step.history == [step.last]
    assert step.epsilon(1e-5) == math.inf  # σ = 0


def test_dp_step_noise_and_its_gauge():
    """σ = 2, C = 5, B = 4, P = 2 trainable coordinates: noise gauge σC√P/B = 2.5√2, and the
    update is −(Σ ḡ_i + σC·n)/B with n the generator's first draw."""
    model = _Dot()
    step = privacy.DPStep(2.0, 5.0, 4, 0.5, loss_fn=_dot_loss, noise_generator=torch.Generator().manual_seed(5))
    step(_ctx(model, _X, _Y))
    n = torch.randn((1, 2), generator=torch.Generator().manual_seed(5))
    ref = torch.tensor([[0.5, -0.25]]) - (torch.tensor([[6.75, 9.0]]) + 10.0 * n) / 4
    assert torch.allclose(model.fc.weight, ref, rtol=1e-6)
    assert step.last["noise"] == pytest.approx(2.5 * math.sqrt(2), rel=1e-12)
    assert step.last["signal"] == pytest.approx(11.25 / 4, rel=1e-6)


def test_dp_step_on_an_empty_batch_and_with_views():
    model = _Dot()
    step = privacy.DPStep(0.0, 5.0, 4, 0.5, loss_fn=_dot_loss)
    out = step(_ctx(model, torch.zeros(0, 2), torch.zeros(0)))
    assert out.shape == () and float(out) == 0.0
    assert step.last == {"batch": 0, "mean_norm": 0.0, "clipped": 0.0, "signal": 0.0, "noise": 0.0}
    assert torch.equal(model.fc.weight, torch.tensor([[0.5, -0.25]])) and step.steps == 1
    # K = 2 identical views: the same update as K = 1
    views = privacy.DPStep(0.0, 5.0, 4, 0.5, views=2, loss_fn=_dot_loss)
    views(_ctx(model, _X, _Y))
    assert torch.allclose(model.fc.weight, torch.tensor([[-1.1875, -2.5]]), rtol=1e-6)
    assert views.last["batch"] == 3 and views.last["mean_norm"] == pytest.approx(16.25 / 3, rel=1e-6)


def test_dp_step_stops_at_the_budget_without_updating():
    """q = 1, σ = 5: closed-form ε(2) = 1.158 ≤ 1.3 < ε(3) = 1.446, so 2 steps; the 3rd and 4th calls change
    nothing, return the batch loss (no graph) and record the first stopped step."""
    sigma, delta, target = 5.0, 1e-5, 1.3
    assert _max_steps_ref(target, sigma, delta) == 2
    model = _Dot()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest")
        step = privacy.DPStep(sigma, 5.0, 4, 1.0, loss_fn=_dot_loss, delta=delta, stop_at_epsilon=target,
                              noise_generator=torch.Generator().manual_seed(0))
        for t in (1, 2):
            step(_ctx(model, _X, _Y, step=t))
        assert step.epsilon() == pytest.approx(_gaussian_rdp_epsilon(sigma, 2, delta)[0], rel=1e-12)
    w = model.fc.weight.detach().clone()
    for t in (3, 4):
        ctx = _ctx(model, _X, _Y, step=t)
        out = step(ctx)
        assert float(out) == pytest.approx(float(_dot_loss(model(_X), _Y).detach()), rel=1e-6) and not out.requires_grad
        assert ctx.grad_evals == 0
    assert torch.equal(model.fc.weight, w) and step.steps == 2 and step.stopped_at == 3
    assert float(step(_ctx(model, torch.zeros(0, 2), torch.zeros(0), step=5))) == 0.0


def test_dp_step_refuses_batchnorm_even_when_the_budget_is_spent():
    """A budget smaller than one step: the first call already takes the no-update path, which
    must still check the model."""
    step = privacy.DPStep(1.0, 1.0, 4, 0.5, delta=1e-5, stop_at_epsilon=1e-3)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="BatchNorm mixes the examples"):
        step(_ctx(model, torch.randn(3, 2), torch.tensor([0, 1, 0])))
    assert step.stopped_at is None and step.steps == 0


def test_without_opacus_the_accountant_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # import → ImportError
    with pytest.raises(ImportError, match=_full("the privacy accountant needs Opacus: pip install 'opacus>=1.5,<2'")):
        privacy.epsilon(1.0, 0.5, 1, 1e-5)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_norms_below_one_and_the_dtype_of_a_bfloat16_model(method):
    """Under ``_dot_loss`` the norms are ‖x_i‖ exactly: 5/8, 10/8, 1.25/8 (below 1 too)."""
    sums, norms, _ = privacy.clipped_grad_sum(_Dot(), _X / 8, _Y, max_grad_norm=1.0, loss_fn=_dot_loss,
                                              method=method)
    assert torch.allclose(norms, torch.tensor([0.625, 1.25, 0.15625]), rtol=1e-6)
    # clipped sum: (0.375, 0.5) + 0.8·(0.75, 1) + (0.09375, 0.125) = (1.06875, 1.425)
    assert torch.allclose(sums[0], torch.tensor([[1.06875, 1.425]]), rtol=1e-6) and sums[1] is None
    model = nn.Linear(3, 2).to(torch.bfloat16)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sums, norms, loss = privacy.clipped_grad_sum(model, x, torch.tensor([0, 1, 1, 0]), max_grad_norm=1.0,
                                                 method=method)
    assert norms.dtype == sums[0].dtype == torch.bfloat16


def test_dp_step_passes_augment_generator_method_and_chunk_size_on():
    seen = []

    def augment(v, g):
        seen.append(g)
        return v

    gen = torch.Generator()
    step = privacy.DPStep(0.0, 5.0, 4, 0.5, views=2, augment=augment, generator=gen, loss_fn=_dot_loss)
    model = _Dot()
    step(_ctx(model, _X, _Y))
    assert len(seen) == 2 and all(g is gen for g in seen)
    assert torch.allclose(model.fc.weight, torch.tensor([[-1.1875, -2.5]]), rtol=1e-6)
    with pytest.raises(ValueError, match="^method='ghost' supports Linear"):
        privacy.DPStep(0.0, 1.0, 4, 0.5, method="ghost")(_ctx(nn.Bilinear(2, 2, 2), _X, _Y))
    with pytest.raises(ValueError, match=_full("chunk_size must be an integer >= 1 (examples per micro-batch), got 0")):
        privacy.DPStep(0.0, 1.0, 4, 0.5, chunk_size=0, loss_fn=_dot_loss)(_ctx(_Dot(), _X, _Y))


def test_an_unknown_accountant_is_refused_even_at_sigma_0():
    """σ = 0 short-cuts to ε = ∞ and 0 steps; the accountant's name is checked before that."""
    assert privacy.epsilon(0.0, 0.1, 10, 1e-5) == math.inf and privacy.max_steps(1.0, 1e-5, 0.0, 0.1) == 0
    for call in (lambda: privacy.epsilon(0.0, 0.1, 10, 1e-5, "gdp"),
                 lambda: privacy.max_steps(1.0, 1e-5, 0.0, 0.1, "gdp")):
        with pytest.raises(ValueError, match=r"^unknown accountant 'gdp'; valid accountants: rdp, prv$"):
            call()
