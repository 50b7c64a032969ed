"""Tests of landscape_lib.privacy against independent references: a loop over single examples
(per-example gradients), plain autograd (a non-private step), the Gaussian law (noise), and an
independent Rényi-DP computation (the accountant)."""
import math

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


MODELS = {"mlp-gn": (_mlp, (12,)), "wscnn-gn": (_cnn, (64,)), "layernorm": (_layernorm, (12,)),
          "sequence": (_Seq, (12,)), "conv1d": (_Conv1dNet, (12,))}


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
    with pytest.raises(ValueError, match="valid methods|use method='vmap'"):
        privacy.clipped_grad_sum(vit, x, y, max_grad_norm=1.0, method="ghost")
    sums, norms, _ = privacy.clipped_grad_sum(vit, x, y, max_grad_norm=1.0, method="auto")
    ref = _loop_grads(vit, x, y)
    assert _rel(norms, torch.cat([g.reshape(4, -1) for g in ref.values()], 1).norm(dim=1)) < 1e-5


@pytest.mark.parametrize("call,match", [
    (lambda: privacy.noise_multiplier(0.0, 1e-5, 0.1, 10), r"epsilon must be a finite number > 0"),
    (lambda: privacy.noise_multiplier(-1.0, 1e-5, 0.1, 10), r"epsilon must be a finite number > 0"),
    (lambda: privacy.noise_multiplier(1.0, 0.0, 0.1, 10), r"delta must lie in the open interval \(0, 1\)"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1.0), r"delta must lie in the open interval \(0, 1\)"),
    (lambda: privacy.epsilon(-0.5, 0.1, 10, 1e-5), r"noise multiplier σ must be a finite number >= 0"),
    (lambda: privacy.epsilon(1.0, 0.0, 10, 1e-5), r"sampling rate q must lie in \(0, 1\]"),
    (lambda: privacy.epsilon(1.0, 1.5, 10, 1e-5), r"sampling rate q must lie in \(0, 1\]"),
    (lambda: privacy.epsilon(1.0, 0.1, 0, 1e-5), r"number of steps must be an integer >= 1"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, "gdp"), r"valid accountants: rdp, prv"),
    (lambda: privacy.clip_factors(torch.ones(2), 0.0), r"clipping norm C .* must be a finite number > 0"),
    (lambda: privacy.DPStep(1.0, -1.0, 10, 0.1), r"clipping norm C"),
    (lambda: privacy.DPStep(-1.0, 1.0, 10, 0.1), r"noise multiplier σ"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, views=0),
     r"augmentation multiplicity K \(views\) must be an integer >= 1"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.0), r"sampling rate q must lie in \(0, 1\]"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, method="fast"), r"valid methods: auto, ghost, vmap"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, stop_at_epsilon=2.0), r"stop_at_epsilon needs delta"),
    (lambda: privacy.DPStep(1.0, 1.0, 10, 0.1, stop_at_epsilon=0.0, delta=1e-5), r"epsilon must be"),
    (lambda: privacy.per_sample_grads(_mlp(), torch.randn(3, 12), torch.zeros(3, dtype=torch.long), views=2),
     r"not a whole number of examples with K=2"),
    (lambda: privacy.per_sample_grads(_mlp(), torch.randn(3, 12), torch.zeros(3, dtype=torch.long), chunk_size=0),
     r"chunk_size must be an integer >= 1"),
    (lambda: train.Poisson(0.0), r"sampling rate must lie in \(0, 1\]"),
])
def test_bad_input_names_what_is_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


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
