"""Exact and boundary tests of landscape_lib.curvature (Lanczos, SLQ, Hutchinson, sharpness,
critical learning rate) against hand-computed values and closed forms."""
from __future__ import annotations

import copy
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import nn

from landscape_lib import curvature as C
from landscape_lib import params as P
from test_curvature import dense_hessian, least_squares_problem, tiny_data, tiny_mlp


def mse(out, t):
    return F.mse_loss(out.squeeze(-1), t)


def sgd(p, lr):
    return torch.optim.SGD(p, lr=lr)


def anisotropic_quadratic():
    """L(w) = (w1² + 9 w2²)/2 (inputs e1 and 3·e2, targets 0, mean squared error) at w = (1, 1)."""
    lin = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    xs = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    return lin, xs, torch.zeros(2, dtype=torch.float64)


def scalar_quadratic(w=1.0):
    """L(w) = w² (x = 1, y = 0): one SGD step maps w to (1 − 2 lr) w."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(w)
    return model, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


# --- ritz, ritz_at, ritz_vector, ritz_error_bounds ------------------------------------------

def test_ritz_of_a_hand_tridiagonal():
    theta, w = C.ritz(np.array([2.0, 2.0]), np.array([1.0]))
    np.testing.assert_allclose(theta, [1.0, 3.0], atol=1e-14)
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-14)
    a = np.array([5.0])
    theta, w = C.ritz(a, np.zeros(0))
    assert theta.tolist() == [5.0] and w.tolist() == [1.0]
    theta[0] = 9.0
    assert a[0] == 5.0  # a copy


def test_ritz_at_uses_the_leading_block():
    res = C.LanczosResult(np.array([2.0, 2.0, 5.0]), np.array([1.0, 0.0]), None, None, 0)
    assert res.ritz_at(1).tolist() == [2.0]
    np.testing.assert_allclose(res.ritz_at(2), [1.0, 3.0], atol=1e-14)
    np.testing.assert_allclose(res.ritz_at(3), [1.0, 3.0, 5.0], atol=1e-14)
    with pytest.raises(ValueError, match=r"^j must be in 1\.\.3, got 4$"):
        res.ritz_at(4)
    with pytest.raises(ValueError, match="j must be a positive integer"):
        res.ritz_at(0)


def test_ritz_vector_checks_and_values():
    res = C.LanczosResult(np.array([2.0, 2.0]), np.array([1.0]), None, None, 0)
    with pytest.raises(ValueError, match=r"^ritz_vector needs the Lanczos basis: run "
                                         r"lanczos\(\.\.\., keep_basis=True\)$"):
        res.ritz_vector(0)
    basis = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float32)
    res.basis = basis
    for k in (2, -3):
        with pytest.raises(ValueError, match=rf"^k must be in -2\.\.1, got {k}$"):
            res.ritz_vector(k)
    top = res.ritz_vector(-1)
    assert top.dtype == torch.float32
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(np.abs(top.numpy()), [0.0, s, s], atol=1e-7)
    assert float(top[1] * top[2]) > 0  # eigenvector (1, 1) of θ = 3
    low = res.ritz_vector(-2)
    np.testing.assert_allclose(np.abs(low.numpy()), [0.0, s, s], atol=1e-7)
    assert float(low[1] * low[2]) < 0  # eigenvector (1, −1) of θ = 1
    torch.testing.assert_close(res.ritz_vector(0), low)
    one = C.LanczosResult(np.array([4.0]), np.zeros(0), None, None, 0,
                          torch.tensor([[0.6, 0.8]], dtype=torch.float64))
    assert one.ritz_vector(0).tolist() == [0.6, 0.8]
    assert one.ritz_vector(-1).tolist() == [0.6, 0.8]


def test_ritz_error_bounds_by_hand():
    assert C.ritz_error_bounds(np.array([1.0]), np.array([-0.5]), 2.0).tolist() == [1.0]
    b = C.ritz_error_bounds(np.array([0.0, 1.0, 5.0]), np.array([0.1, -0.1, 0.1]), 1.0)
    np.testing.assert_allclose(b, [0.01 / 0.9, 0.01 / 0.9, 0.01 / 3.9], rtol=1e-12)
    # overlapping residual intervals: no gap, the plain residual
    b = C.ritz_error_bounds(np.array([0.0, 0.1]), np.array([1.0, 1.0]), 1.0)
    assert b.tolist() == [1.0, 1.0]
    # different residuals: the gap of θ_i subtracts the *other* value's residual
    b = C.ritz_error_bounds(np.array([0.0, 10.0]), np.array([0.1, 0.2]), 1.0)
    np.testing.assert_allclose(b, [0.01 / 9.8, 0.04 / 9.9], rtol=1e-12)


# --- lanczos --------------------------------------------------------------------------------

def test_lanczos_on_a_diagonal_matrix_by_hand():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    res = C.lanczos(A, 10, v0=torch.ones(4, dtype=torch.float32), keep_basis=True)
    assert len(res.alpha) == 4 and len(res.beta) == 3
    assert res.alpha[0] == pytest.approx(2.5, abs=1e-14)
    assert res.beta[0] == pytest.approx(math.sqrt(1.25), abs=1e-14)
    np.testing.assert_allclose(res.ritz_values, [1, 2, 3, 4], atol=1e-12)
    np.testing.assert_allclose(res.ritz_weights, [0.25] * 4, atol=1e-12)
    assert res.n_hvp == 0 and res.error_bounds is None and res.converged is None
    assert res.basis.shape == (4, 4) and res.basis.dtype == torch.float64
    torch.testing.assert_close(res.basis[0], torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(res.basis @ res.basis.T, torch.eye(4, dtype=torch.float64))
    top = res.ritz_vector(-1)
    np.testing.assert_allclose(np.abs(top.numpy()), [0, 0, 0, 1], atol=1e-10)
    plain = C.lanczos(A, 4, v0=torch.ones(4), reorth=False)
    assert plain.basis is None
    np.testing.assert_allclose(plain.ritz_values, [1, 2, 3, 4], atol=1e-10)
    assert C.lanczos(A, 4, v0=torch.ones(4)).basis is None
    two = C.lanczos(A, 2, v0=torch.ones(4), keep_basis=True)
    assert len(two.alpha) == 2 and two.basis.shape == (2, 4)


def test_lanczos_invariant_subspace_stops_early():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    res = C.lanczos(A, 4, v0=torch.ones(4))
    np.testing.assert_allclose(res.alpha, [1.5, 1.5], atol=1e-14)
    np.testing.assert_allclose(res.beta, [0.5], atol=1e-14)
    np.testing.assert_allclose(res.ritz_values, [1.0, 2.0], atol=1e-14)
    assert res.converged is None and res.error_bounds is None
    res = C.lanczos(A, 4, v0=torch.ones(4), tol=1e-12)
    assert res.converged is True and res.error_bounds.tolist() == [0.0, 0.0]
    assert len(res.alpha) == 2


def test_lanczos_basis_grows_past_16_rows():
    d = torch.arange(1.0, 21.0, dtype=torch.float64)
    res = C.lanczos(torch.diag(d), 20, v0=torch.ones(20), keep_basis=True)
    assert res.basis.shape == (20, 20)
    torch.testing.assert_close(res.basis @ res.basis.T, torch.eye(20, dtype=torch.float64))
    np.testing.assert_allclose(res.ritz_values, d.numpy(), atol=1e-9)
    res = C.lanczos(torch.diag(d), 17, v0=torch.ones(20), keep_basis=True)
    assert res.basis.shape == (17, 20) and len(res.alpha) == 17


def test_lanczos_tol_on_a_separated_top_eigenvalue():
    A = torch.diag(torch.tensor([1.0, 1.1, 1.2, 100.0], dtype=torch.float64))
    res = C.lanczos(A, 4, v0=torch.ones(4), tol=1e-6)
    assert res.converged is True and len(res.alpha) < 4
    assert abs(res.ritz_values[-1] - 100.0) <= 1e-6 * 100
    assert len(res.error_bounds) == len(res.alpha)
    res1 = C.lanczos(A, 1, v0=torch.ones(4), tol=1e-6)  # one step: not yet converged
    assert res1.converged is False and len(res1.error_bounds) == 1
    res_k = C.lanczos(A, 2, v0=torch.ones(4), tol=1e-6, k=3)  # fewer Ritz values than k
    assert res_k.converged is False


def test_lanczos_bad_tol_and_k():
    A = torch.eye(3, dtype=torch.float64)
    for tol in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"^tol must be >= 0, got {tol!r}$"):
            C.lanczos(A, 2, tol=tol)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        C.lanczos(A, 2, k=0)
    with pytest.raises(ValueError, match="valid choices: rademacher, gaussian"):
        C.lanczos(A, 2, distribution="uniform")


def test_lanczos_random_start_is_rademacher_or_gaussian():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    res = C.lanczos(A, 1, generator=torch.Generator().manual_seed(0), keep_basis=True)
    assert sorted(set(np.abs(res.basis[0].numpy()).round(12))) == [round(1 / math.sqrt(3), 12)]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, generator=g, dtype=torch.float64)
    res = C.lanczos(A, 1, distribution="gaussian", generator=torch.Generator().manual_seed(0),
                    keep_basis=True)
    torch.testing.assert_close(res.basis[0], v / v.norm())


# --- SLQ ------------------------------------------------------------------------------------

def test_moment_averages_rows_and_skips_padding():
    sd = C.SpectralDensity(np.zeros(1), np.zeros(1), np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]]),
                           np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]), 1.0, 0)
    assert sd.moment(0) == pytest.approx(1.0)
    assert sd.moment(1) == pytest.approx((1.5 + 3.0) / 2)
    assert sd.moment(2) == pytest.approx((2.5 + 9.0) / 2)


def test_gaussian_density_by_hand():
    c = 1 / math.sqrt(2 * math.pi)
    d = C.gaussian_density(np.array([0.0]), np.array([1.0]), np.array([0.0, 1.0, 2.0]), 1.0)
    np.testing.assert_allclose(d, [c, c * math.exp(-0.5), c * math.exp(-2)], rtol=1e-14)
    d = C.gaussian_density(np.array([[1.0, np.nan], [3.0, 0.0]]), np.array([[1.0, 0.7], [0.5, 0.5]]),
                           np.array([1.0, 3.0]), 2.0)
    at1 = (c / 2 + 0.5 * c / 2 * math.exp(-0.5) + 0.5 * c / 2 * math.exp(-1 / 8)) / 2
    at3 = (c / 2 * math.exp(-0.5) + 0.5 * c / 2 + 0.5 * c / 2 * math.exp(-9 / 8)) / 2
    np.testing.assert_allclose(d, [at1, at3], rtol=1e-14)


def test_slq_on_a_diagonal_matrix_by_hand():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    sd = C.slq_density(A, m=4, n_vec=2, n_grid=5, generator=torch.Generator().manual_seed(0))
    assert sd.nodes.shape == (2, 4) and sd.n_hvp == 0
    np.testing.assert_allclose(sd.nodes, [[1, 2, 3, 4]] * 2, atol=1e-12)
    np.testing.assert_allclose(sd.weights, [[0.25] * 4] * 2, atol=1e-12)  # Rademacher: v_i² = 1/4
    assert sd.sigma == pytest.approx(0.04)  # 1 % of max(4 − 1, |4|)
    np.testing.assert_allclose(sd.grid, np.linspace(0.8, 4.2, 5), atol=1e-12)
    ref = [sum(0.25 * math.exp(-0.5 * ((g - t) / 0.04) ** 2) / (0.04 * math.sqrt(2 * math.pi))
               for t in (1, 2, 3, 4)) for g in sd.grid]
    np.testing.assert_allclose(sd.density, ref, rtol=1e-10)
    sd = C.slq_density(A, m=4, sigma=0.5, grid=[1, 2], generator=torch.Generator().manual_seed(0))
    assert sd.sigma == 0.5 and sd.grid.dtype == np.float64 and sd.grid.tolist() == [1.0, 2.0]
    assert len(C.slq_density(A, m=4).grid) == 512
    with pytest.raises(ValueError, match="n_grid must be a positive integer"):
        C.slq_density(A, m=4, n_grid=0)


def test_slq_default_sigma_uses_the_spread_or_the_scale():
    sd = C.slq_density(torch.diag(torch.tensor([1.0, 11.0], dtype=torch.float64)), m=2, n_grid=3)
    assert sd.sigma == pytest.approx(0.11)  # max(spread 10, |11|) = 11
    sd = C.slq_density(torch.diag(torch.tensor([-9.0, 1.0], dtype=torch.float64)), m=2, n_grid=3)
    assert sd.sigma == pytest.approx(0.1)  # max(spread 10, |1|) = 10
    sd = C.slq_density(torch.eye(2, dtype=torch.float64) * 3, m=2, n_grid=3)
    assert sd.sigma == pytest.approx(0.03)  # no spread: 1 % of |θ|
    sd = C.slq_density(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
                       m=3, distribution="gaussian", generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(sd.weights[0], (v ** 2 / (v ** 2).sum()).numpy(), atol=1e-12)
    assert sd.n_hvp == 0


# --- Hutchinson -----------------------------------------------------------------------------

def test_hutchinson_exact_on_a_diagonal_and_gaussian_samples():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    res = C.hutchinson_trace(A, 4)
    assert res.samples.tolist() == [6.0] * 4 and res.trace == 6.0 and res.stderr == 0.0
    assert C.hutchinson_trace(A, 1).stderr == math.inf
    assert len(C.hutchinson_trace(A).samples) == 100
    res = C.hutchinson_trace(A, 3, distribution="gaussian", generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = []
    for _ in range(3):
        v = torch.randn(3, generator=g, dtype=torch.float64)
        ref.append(float(v[0] ** 2 + 2 * v[1] ** 2 + 3 * v[2] ** 2))
    np.testing.assert_allclose(res.samples, ref, rtol=1e-14)
    assert res.trace == pytest.approx(sum(ref) / 3, rel=1e-14)
    assert res.stderr == pytest.approx(statistics.stdev(ref) / math.sqrt(3), rel=1e-12)


# --- sharpness ------------------------------------------------------------------------------

def test_slice_sharpness_by_hand():
    line = SimpleNamespace(alphas=[1.0, -1.0, 0.0], loss=[5.0, 3.0, 1.0])
    assert C.slice_sharpness(line, 1.0) == 3.0
    assert C.slice_sharpness(line, 0.5) == 0.5 * (2.0 + 3.0) - 1.0
    assert C.slice_sharpness(line, 1.0 + 5e-13) == 3.0
    for alphas, r in (([-1.0, 0.0, 2.0], 1.5), ([-2.0, 0.0, 1.0], 1.5), ([-1.0, 0.0, 1.0], 1.5)):
        lo, hi = min(alphas), max(alphas)
        with pytest.raises(ValueError, match=rf"^radius 1\.5 lies outside the slice \[{lo}, {hi}\]: the "
                                             r"slice must reach α = −radius and α = \+radius$"):
            C.slice_sharpness(SimpleNamespace(alphas=alphas, loss=[0.0, 0.0, 0.0]), r)
    with pytest.raises(ValueError, match="radius must be a positive"):
        C.slice_sharpness(line, 0.0)


def test_unit_sphere_keeps_dtype_and_is_normalised_randn():
    w = {"a": torch.zeros(2, 3, dtype=torch.float32), "b": torch.zeros(4, dtype=torch.float64)}
    u = C._unit_sphere(w, torch.Generator().manual_seed(0))
    assert list(u) == ["a", "b"] and u["a"].dtype == torch.float32 and u["b"].dtype == torch.float64
    assert u["a"].shape == (2, 3) and u["b"].shape == (4,)
    g = torch.Generator().manual_seed(0)
    ra, rb = torch.randn(2, 3, generator=g), torch.randn(4, generator=g, dtype=torch.float64)
    s = math.sqrt(float((ra.double() ** 2).sum() + (rb ** 2).sum()))
    torch.testing.assert_close(u["a"], ra / s)
    torch.testing.assert_close(u["b"], rb / s)


def test_random_sharpness_samples_are_half_rho_squared_uHu():
    model, x, y, loss_fn, H = least_squares_problem(n=16, d=3)
    rho = 0.3
    res = C.random_sharpness(model, x, y, rho, 3, loss_fn=loss_fn, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = []
    for _ in range(3):
        u = torch.randn(1, 3, generator=g, dtype=torch.float64).reshape(-1)
        u = u / u.norm()
        ref.append(float(0.5 * rho ** 2 * u @ H @ u))
    np.testing.assert_allclose(res.samples, ref, rtol=1e-8)
    with torch.no_grad():
        base = float(loss_fn(model(x), y))
    assert res.loss == pytest.approx(base, rel=1e-14) and res.rho == rho
    assert res.value == pytest.approx(np.mean(ref), rel=1e-8)
    assert res.perturbed_loss == pytest.approx(base + np.mean(ref), rel=1e-12)
    assert len(C.random_sharpness(model, x, y, rho, loss_fn=loss_fn).samples) == 10
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        C.random_sharpness(model, x, y, rho, 0, loss_fn=loss_fn)


def test_random_sharpness_filter_normalized_scales_by_the_weight_norm():
    model, x, y, loss_fn, H = least_squares_problem(n=16, d=3)
    wn = float(model.weight.norm())
    lam = torch.linalg.eigvalsh(H)
    res = C.random_sharpness(model, x, y, 0.1, 4, loss_fn=loss_fn, filter_normalized=True,
                             generator=torch.Generator().manual_seed(0))
    lo, hi = 0.5 * (0.1 * wn) ** 2 * float(lam[0]), 0.5 * (0.1 * wn) ** 2 * float(lam[-1])
    assert np.all(res.samples >= lo * (1 - 1e-9)) and np.all(res.samples <= hi * (1 + 1e-9))
    plain = C.random_sharpness(model, x, y, 0.1, 4, loss_fn=loss_fn, generator=torch.Generator().manual_seed(0))
    assert not np.allclose(res.samples, plain.samples)


def test_worst_case_sharpness_of_w_squared_by_hand():
    model, x, y = scalar_quadratic(1.0)  # L = w², g = 2, H = 2
    res = C.worst_case_sharpness(model, x, y, 0.5, 3, loss_fn=mse)
    assert res.loss == 1.0 and res.perturbed_loss == 2.25 and res.value == 1.25 and res.rho == 0.5
    assert res.samples.tolist() == [1.25] * 4
    res = C.worst_case_sharpness(model, x, y, 0.5, 0, loss_fn=mse)
    assert res.samples.tolist() == [1.25]
    assert len(C.worst_case_sharpness(model, x, y, 0.5, loss_fn=mse).samples) == 11
    model0, _, _ = scalar_quadratic(0.0)  # g = 0: a random point on the sphere, L = ρ²
    res = C.worst_case_sharpness(model0, x, y, 0.5, 2, loss_fn=mse, generator=torch.Generator().manual_seed(0))
    assert res.value == 0.25 and res.samples.tolist() == [0.25] * 3


def test_worst_case_sharpness_steps_inside_the_ball():
    # L = w², w = 1, ρ = 2: ε₀ = 2 (L = 9); the step 2 + s·2·6/6 = 2 + 2s leaves the ball, back to 2
    model, x, y = scalar_quadratic(1.0)
    res = C.worst_case_sharpness(model, x, y, 2.0, 1, step_size=0.25, loss_fn=mse)
    assert res.samples.tolist() == [8.0, 8.0]
    # L = (w1² + 9 w2²)/2 at w = (1, 1): L = 5, g = (1, 9); SAM's point is w + g/‖g‖
    lin, xs, ys = anisotropic_quadratic()
    res = C.worst_case_sharpness(lin, xs, ys, 1.0, 5, loss_fn=mse)
    s = math.sqrt(82)
    sam = ((1 + 1 / s) ** 2 + 9 * (1 + 9 / s) ** 2) / 2 - 5
    assert res.samples[0] == pytest.approx(sam, rel=1e-12) and len(res.samples) == 6
    assert res.value == max(res.samples) and res.value > sam
    assert res.value <= s + 4.5  # L(θ + ε) − L(θ) ≤ ‖g‖ρ + λ_max ρ²/2 on the ball
    assert res.perturbed_loss == pytest.approx(5 + res.value, rel=1e-14)


def test_worst_case_sharpness_bad_arguments():
    model, x, y = scalar_quadratic(1.0)
    for steps in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"^steps must be a non-negative integer \(0, 1, 2, \.\.\.\), "
                                             rf"got {steps!r}$"):
            C.worst_case_sharpness(model, x, y, 0.5, steps, loss_fn=mse)
    with pytest.raises(ValueError, match="step_size must be a positive"):
        C.worst_case_sharpness(model, x, y, 0.5, 1, step_size=0.0, loss_fn=mse)


# --- critical learning rate -----------------------------------------------------------------

def test_diverges_on_w_squared_by_hand():
    model, x, y = scalar_quadratic(1.0)
    start = P.state(model)
    # one step: w = 1 − 2 lr, final loss (1 − 2 lr)²
    assert C._diverges(model, start, x, y, sgd, 1.0, 1, 1, 1.0, 0, mse, 1.0) == (False, 1.0)
    assert C._diverges(model, start, x, y, sgd, 1.5, 1, 1, 3.0, 0, mse, 1.0) == (True, 4.0)
    assert C._diverges(model, start, x, y, sgd, 1.5, 1, 2, 3.0, 0, mse, 1.0) == (True, 16.0)
    assert C._diverges(model, start, x, y, sgd, 0.25, 1, 1, 3.0, 0, mse, 1.0) == (False, 0.25)
    assert C._diverges(model, start, x, y, sgd, 1e300, 1, 1, 3.0, 0, mse, 1.0) == (True, math.inf)


def test_critical_learning_rate_bisection_on_w_squared_by_hand():
    model, x, y = scalar_quadratic(1.0)
    # diverged iff (1 − 2 lr)² > 3, i.e. lr > (1 + √3)/2 ≈ 1.366
    res = C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(1.0, 2.0), steps=1, loss_fn=mse)
    lrs = [1.0, 2.0, math.sqrt(2), 2 ** 0.25, math.sqrt(2 ** 0.25 * 2 ** 0.5)]
    assert [t[0] for t in res.trials] == pytest.approx(lrs)
    assert [t[1] for t in res.trials] == [(1 - 2 * lr) ** 2 > 3 for lr in lrs]
    assert [t[2] for t in res.trials] == pytest.approx([(1 - 2 * lr) ** 2 for lr in lrs])
    assert res.stable == pytest.approx(lrs[-1]) and res.diverged == pytest.approx(math.sqrt(2))
    assert res.lr == pytest.approx(math.sqrt(lrs[-1] * math.sqrt(2)))
    assert model.weight.item() == 1.0 and model.training


def test_critical_learning_rate_widens_the_bracket():
    model, x, y = scalar_quadratic(1.0)
    model.eval()
    res = C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(0.1, 0.2), steps=1, loss_fn=mse,
                                   rel_tol=10.0)
    assert [t[0] for t in res.trials] == pytest.approx([0.1, 0.2, 0.8, 3.2])
    assert (res.stable, res.diverged) == pytest.approx((0.8, 3.2)) and not model.training
    res = C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(4.0, 8.0), steps=1, loss_fn=mse,
                                   rel_tol=10.0)
    assert [t[0] for t in res.trials] == pytest.approx([4.0, 1.0, 4.0])
    assert (res.stable, res.diverged) == pytest.approx((1.0, 4.0))


def test_critical_learning_rate_gives_up_after_max_expand():
    model, x, y = scalar_quadratic(1.0)
    # the message names the last learning rate tried (4 ** k), not the next, untried one
    with pytest.raises(ValueError, match=r"^even lr=4 diverges; lower lr_range$"):
        C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(4.0, 8.0), steps=1, loss_fn=mse, max_expand=1)
    with pytest.raises(ValueError, match=r"^even lr=4 diverges; lower lr_range$"):
        C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(4096.0, 8192.0), steps=1, loss_fn=mse)
    with pytest.raises(ValueError, match=r"^even lr=0\.001 is stable; raise lr_range$"):
        C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(1e-4, 1e-3), steps=1, loss_fn=mse, max_expand=1)
    assert model.weight.item() == 1.0 and model.training
    for bad, match in (((0.0, 1.0), "lr_range bounds must be a positive"),
                       ((1.0, 1.0), r"^lr_range must be \(low, high\) with 0 < low < high, got \(1\.0, 1\.0\)$")):
        with pytest.raises(ValueError, match=match):
            C.critical_learning_rate(model, x, y, sgd, 1, lr_range=bad, steps=1, loss_fn=mse)
    for kw, name in (({"steps": 0}, "steps"), ({"rel_tol": 0.0}, "rel_tol"), ({"blowup": -1.0}, "blowup")):
        with pytest.raises(ValueError, match=f"^{name} must be a positive"):
            C.critical_learning_rate(model, x, y, sgd, 1, loss_fn=mse, **{"steps": 1, **kw})
    with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
        C.critical_learning_rate(model, x, y, sgd, 0, loss_fn=mse)


def test_hvp_counts_are_the_products_of_this_call():
    model, x, y, loss_fn, H = least_squares_problem(n=8, d=3)
    op = C.HVPOperator(model, x, y, loss_fn)
    op.mv(torch.ones(3, dtype=torch.float64))  # an earlier product is not counted
    assert C.lanczos(op, 2).n_hvp == 2
    assert C.slq_density(op, m=2, n_vec=2).n_hvp == 4
    res = C.lanczos(op, 3, v0=torch.ones(3), tol=1e-8)
    np.testing.assert_allclose(res.ritz_values, torch.linalg.eigvalsh(H).numpy(), rtol=1e-9)
    assert res.n_hvp == len(res.alpha)


def test_defaults_and_boundaries():
    d = torch.arange(1.0, 82.0, dtype=torch.float64)
    sd = C.slq_density(torch.diag(d), n_grid=3)
    assert sd.nodes.shape == (1, 80)  # m = 80, n_vec = 1 by default
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert C.hutchinson_trace(A, 2).stderr == 0.0  # two samples: a finite standard error
    line = SimpleNamespace(alphas=[-1.0, 0.0, 1.0], loss=[3.0, 1.0, 5.0])
    assert C.slice_sharpness(line, 1 + 1e-12) == 3.0  # exactly on the tolerance edge
    model, x, y = scalar_quadratic(1.0)
    # rel_tol: bisection stops once diverged/stable ≤ 1 + rel_tol (here = 2 at once)
    res = C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(1.0, 2.0), steps=1, loss_fn=mse, rel_tol=1.0)
    assert [t[0] for t in res.trials] == [1.0, 2.0]


def test_sharpness_at_given_weights_and_with_a_generator():
    model, x, y, loss_fn, H = least_squares_problem(n=16, d=3)
    opt = P.weights(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # the model elsewhere: the weights argument decides
    res = C.random_sharpness(model, x, y, 0.3, 2, loss_fn=loss_fn, weights=opt,
                             generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = []
    for _ in range(2):
        u = torch.randn(3, generator=g, dtype=torch.float64)
        u = u / u.norm()
        ref.append(float(0.5 * 0.09 * u @ H @ u))
    np.testing.assert_allclose(res.samples, ref, rtol=1e-8)
    f1 = C.random_sharpness(model, x, y, 0.3, 2, loss_fn=loss_fn, weights=opt, filter_normalized=True,
                            generator=torch.Generator().manual_seed(5))
    f2 = C.random_sharpness(model, x, y, 0.3, 2, loss_fn=loss_fn, weights=opt, filter_normalized=True,
                            generator=torch.Generator().manual_seed(5))
    assert f1.samples.tolist() == f2.samples.tolist()


def test_worst_case_default_step_size_is_half():
    lin, xs, ys = anisotropic_quadratic()
    a = C.worst_case_sharpness(lin, xs, ys, 1.0, 2, loss_fn=mse)
    b = C.worst_case_sharpness(lin, xs, ys, 1.0, 2, step_size=0.5, loss_fn=mse)
    c = C.worst_case_sharpness(lin, xs, ys, 1.0, 2, step_size=1.5, loss_fn=mse)
    assert a.samples.tolist() == b.samples.tolist() != c.samples.tolist()


# --- HVPOperator, power iteration and the sharpness measures: arguments where a bug shows ----

class WithUnused(nn.Module):
    """A linear map and a parameter the forward pass never reads (its gradient is None)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x)


def bn_net(seed=7):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():  # running statistics far from any batch's
        net[1].running_mean.uniform_(-2.0, 2.0)
        net[1].running_var.uniform_(3.0, 5.0)
    return net


def data8(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)


def train_mode_grad(net, x, y, sizes):
    """Σ_c (n_c/N) ∇L_c by plain autograd on a train-mode copy, each chunk with its own batch
    statistics (BatchNorm's running statistics do not enter a train-mode forward pass)."""
    ref = copy.deepcopy(net).train()
    total = [torch.zeros_like(p) for p in ref.parameters()]
    start, loss = 0, 0.0
    for s in sizes:
        xc, yc = x[start:start + s], y[start:start + s]
        lc = F.cross_entropy(ref(xc), yc)
        for t, gk in zip(total, torch.autograd.grad(lc, list(ref.parameters()))):
            t.add_(gk, alpha=s / len(x))
        loss += s / len(x) * float(lc.detach())
        start += s
    return loss, P.to_vector(dict(zip([k for k, _ in ref.named_parameters()], total)))


def test_hvp_operator_gradient_and_loss_in_train_mode_use_each_chunks_batch_statistics():
    net, (x, y) = bn_net(), data8()
    for chunk, sizes in ((None, [8]), (3, [3, 3, 2])):
        op = C.HVPOperator(net, x, y, bn="train", chunk_size=chunk)
        loss, grad = train_mode_grad(net, x, y, sizes)
        torch.testing.assert_close(P.to_vector(op.gradient()), grad, rtol=1e-10, atol=1e-12)
        assert op.loss() == pytest.approx(loss, rel=1e-12)
    whole = P.to_vector(C.HVPOperator(net, x, y, bn="train").gradient())
    chunked = P.to_vector(C.HVPOperator(net, x, y, bn="train", chunk_size=3).gradient())
    evald = P.to_vector(C.HVPOperator(net, x, y).gradient())
    assert (whole - chunked).abs().max() > 1e-3 and (whole - evald).abs().max() > 1e-3  # all differ


def test_an_unused_parameter_has_zero_gradient_and_zero_hessian_rows_in_every_mode():
    net = WithUnused()
    x, y = data8()
    ref = F.cross_entropy(net(x), y)
    g_lin = torch.autograd.grad(ref, list(net.lin.parameters()))
    for mode in ("auto", "cached-graph", "forward-over-reverse", "reverse-over-reverse"):
        op = C.HVPOperator(net, x, y, mode=mode)
        g = op.gradient()
        assert torch.equal(g["unused"], torch.zeros(2, dtype=torch.float64))
        torch.testing.assert_close(g["lin.weight"], g_lin[0], rtol=1e-12, atol=1e-14)
        for _ in range(2):  # the second product of the cached graph is its fast path
            hv = op.hvp({k: torch.ones_like(v) for k, v in op.weights.items()})
            assert torch.equal(hv["unused"], torch.zeros(2, dtype=torch.float64)), mode
            assert hv["lin.weight"].abs().max() > 0


def test_hvp_casts_the_direction_to_the_weights_dtype():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32
    x, y = data8()
    x = x.float()
    v64 = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in net.named_parameters()}
    for mode in ("cached-graph", "forward-over-reverse", "reverse-over-reverse"):
        a = C.HVPOperator(net, x, y, mode=mode).hvp(v64)
        b = C.HVPOperator(net, x, y, mode=mode).hvp({k: v.float() for k, v in v64.items()})
        assert all(t.dtype == torch.float32 for t in a.values())
        assert all(torch.equal(a[k], b[k]) for k in a), mode


def test_auto_probe_is_the_first_chunks_graph_against_its_own_operator():
    """The probe of ``auto`` with chunks is the graph of the first chunk: the cached graph of an
    operator on those 3 points alone. Three chunks need 3 × that; one byte less is too little."""
    model = tiny_mlp()
    x, y = tiny_data()
    first = C.HVPOperator(model, x[:3], y[:3], mode="cached-graph")
    v = torch.ones(26, dtype=torch.float64)
    first.mv(v)
    probe = first.cache_bytes
    assert probe > 0
    fits = C.HVPOperator(model, x, y, chunk_size=3, cache_limit=3 * probe)
    fits.mv(v)
    assert fits.mode == "cached-graph" and fits.auto_log == {}
    short = C.HVPOperator(model, x, y, chunk_size=3, cache_limit=3 * probe - 1)
    short.mv(v)
    assert short.mode == "forward-over-reverse" and "cached-graph" in short.auto_log


def test_power_iteration_stops_after_100_hvps_by_default():
    """diag(1, −0.99) from (1, 1): the Rayleigh quotient (1 − 0.99^(2k+1)) / (1 + 0.99^(2k))
    still moves by about 1e-3 per step after 100 steps, far above tol = 1e-6."""
    res = C.power_iteration(torch.diag(torch.tensor([1.0, -0.99], dtype=torch.float64)),
                            v0=torch.ones(2, dtype=torch.float64))
    assert res.n_hvp == 100 and not res.converged and len(res.history) == 100
    k = 99
    assert res.history[-1] == pytest.approx((1 - 0.99 ** (2 * k + 1)) / (1 + 0.99 ** (2 * k)), rel=1e-12)


def test_ritz_error_bounds_at_a_zero_gap_estimate():
    """θ = (0, 1), residuals (1e-310, 1): θ₀'s gap estimate is |1 − 0| − 1 = 0 exactly, so no
    Kato–Temple bound applies and the residual itself is returned (r² would underflow to 0)."""
    out = C.ritz_error_bounds(np.array([0.0, 1.0]), np.array([1e-310, 1.0]), 1.0)
    assert out[0] == 1e-310


def test_worst_case_sharpness_at_given_weights_by_hand():
    """L(w) = (w₁² + 9 w₂²)/2 at w = (1, 1) (the model itself sits at (2, −1)): g = (1, 9),
    SAM's point w + ρ g/‖g‖ with ρ = 1."""
    lin, xs, ys = anisotropic_quadratic()
    w = {"weight": lin.weight.detach().clone()}
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
    res = C.worst_case_sharpness(lin, xs, ys, 1.0, 0, loss_fn=mse, weights=w)
    s = math.sqrt(82)
    up = ((1 + 1 / s) ** 2 + 9 * (1 + 9 / s) ** 2) / 2
    assert res.loss == pytest.approx(5.0, rel=1e-14) and res.value == pytest.approx(up - 5.0, rel=1e-12)


def test_worst_case_sharpness_from_a_zero_gradient_uses_the_generator():
    """At w = 0 the gradient vanishes: the start is ρu with u = z/‖z‖, z ~ N(0, I) drawn from the
    generator, and L(ρu) = ρ² (u₁² + 9 u₂²)/2."""
    lin, xs, ys = anisotropic_quadratic()
    with torch.no_grad():
        lin.weight.zero_()
    torch.manual_seed(123)  # the global stream must not be what is used
    res = C.worst_case_sharpness(lin, xs, ys, 0.5, 0, loss_fn=mse, generator=torch.Generator().manual_seed(3))
    z = torch.randn((1, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = (z / z.norm()).flatten()
    assert res.value == pytest.approx(0.25 * float(u[0] ** 2 + 9 * u[1] ** 2) / 2, rel=1e-12)


def test_sharpness_measures_in_train_mode_use_batch_statistics():
    """bn="train": the loss, the gradient and the perturbed losses come from batch statistics,
    as a train-mode copy computes them by plain autograd; eval mode gives other numbers."""
    net, (x, y) = bn_net(), data8()
    loss, g = train_mode_grad(net, x, y, [8])
    ref = copy.deepcopy(net).train()
    w = P.weights(ref)

    def train_loss(flat):
        with torch.no_grad():
            out = torch.func.functional_call(ref, (P.from_vector(flat, w), dict(ref.named_buffers())), (x,))
            return float(F.cross_entropy(out, y))

    rho = 0.05
    theta = P.to_vector(w)
    sam = C.worst_case_sharpness(net, x, y, rho, 0, bn="train")
    assert sam.loss == pytest.approx(loss, rel=1e-12)
    assert sam.value == pytest.approx(train_loss(theta + rho * g / g.norm()) - loss, rel=1e-9)
    assert abs(C.worst_case_sharpness(net, x, y, rho, 0).value - sam.value) > 1e-4
    rnd = C.random_sharpness(net, x, y, rho, 2, bn="train", generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    for sample in rnd.samples:
        z = P.to_vector({k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in w.items()})
        assert sample == pytest.approx(train_loss(theta + rho * z / z.norm()) - loss, rel=1e-9)


def two_point_regression():
    """w·x − y on x = (1, 2), y = (1, −1) from w = 0 (mean squared error, L(0) = 1): one-point
    SGD steps are affine maps that do not commute, so the final loss depends on the batch order."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return (model, torch.tensor([[1.0], [2.0]], dtype=torch.float64),
            torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_critical_learning_rate_defaults_and_the_same_batches_whatever_the_global_seed():
    model, x, y = two_point_regression()

    def run(global_seed, **kw):
        torch.manual_seed(global_seed)  # must not matter: the batches come from ``seed``
        return C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(0.01, 1.0), loss_fn=mse,
                                        rel_tol=0.5, **kw).trials

    default = run(5)
    assert run(99) == default  # common random numbers: the global stream is never used
    assert run(0, seed=0) == default and run(0, steps=100) == default  # the defaults
    assert run(0, seed=1) != default and run(0, steps=101) != default  # and both matter here


def test_first_line_and_forward_ad_unsupported():
    assert C._first_line(ValueError("  first\nsecond ")) == "ValueError: first"
    assert C._first_line(RuntimeError("")) == "RuntimeError: "
    assert C._forward_ad_unsupported(RuntimeError("vmap: functorch transforms do not support it"))
    assert not C._forward_ad_unsupported(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert C._forward_ad_unsupported(NotImplementedError("Trying to use forward AD with foo"))
    assert C._forward_ad_unsupported(NotImplementedError("no forward mode AD formula for bar"))
    assert not C._forward_ad_unsupported(NotImplementedError("something else"))


def test_power_iteration_an_unchanged_quotient_counts_as_converged():
    """diag(1, −1) from (1, 1): the iterates alternate (1, ±1)/√2, whose Rayleigh quotient is 0
    both times, so |0 − 0| ≤ tol·0 stops it after two products (power iteration cannot separate
    eigenvalues of equal magnitude)."""
    res = C.power_iteration(torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)),
                            v0=torch.ones(2, dtype=torch.float64))
    assert res.converged and res.n_hvp == 2 and res.eigenvalue == 0.0


def test_critical_learning_rate_shows_no_progress_bar(monkeypatch, capsys):
    """Its trials call ``train.fit`` with ``progress=False``: nothing is printed even where
    progress bars are on (``LANDSCAPE_QUIET`` unset)."""
    monkeypatch.delenv("LANDSCAPE_QUIET", raising=False)
    model, x, y = scalar_quadratic(1.0)
    C.critical_learning_rate(model, x, y, sgd, 1, lr_range=(0.5, 2.0), steps=2, loss_fn=mse, rel_tol=1.0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_extremal_eigs_passes_tol_and_ncv_to_eigsh():
    """The same products and values as ``scipy.sparse.linalg.eigsh`` called directly with the same
    start vector, counted on a LinearOperator; a loose tol and a small ncv each change the count."""
    A = np.diag(np.linspace(1.0, 2.0, 40) ** 3)

    def counting():
        calls = [0]

        def mv(v):
            calls[0] += 1
            return A @ v
        return calls, spla.LinearOperator(A.shape, matvec=mv, dtype=np.float64)

    counts = {}
    for kw in ({}, {"tol": 1e-2}, {"ncv": 5}):
        mine, lin = counting()
        res = C.extremal_eigs(lin, 1, **kw)
        theirs, ref_lin = counting()
        vals, _ = spla.eigsh(ref_lin, k=1, which="LA", v0=np.random.default_rng(0).standard_normal(40),
                             **{"tol": 0.0, "ncv": None, **kw})
        assert mine[0] == theirs[0] and res.values.tolist() == vals.tolist()
        counts[str(kw)] = mine[0]
    assert len(set(counts.values())) == 3, counts


def outputs_mean(out, y):
    """A loss linear in the network's output: its last layer's bias has a constant gradient."""
    return out.mean()


@pytest.mark.parametrize("mode", ["cached-graph", "forward-over-reverse", "reverse-over-reverse"])
def test_constant_gradient_components_have_zero_hessian_rows(mode):
    """For an affine model under a linear loss the gradient does not depend on θ (H = 0); for an
    MLP the last bias's gradient is constant, so its rows of H vanish. Both against the dense
    Hessian, with and without chunks, and for a second product (the cached graph's reuse)."""
    x, y = tiny_data()
    affine = nn.Linear(3, 2).double()
    v = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    for chunk in (None, 3):
        op = C.HVPOperator(affine, x, y, outputs_mean, mode=mode, chunk_size=chunk)
        assert torch.equal(op.mv(v), torch.zeros(8, dtype=torch.float64)) and op.calls == 1
        assert torch.equal(op.mv(v), torch.zeros(8, dtype=torch.float64)) and op.calls == 2
    mlp = tiny_mlp()
    H = dense_hessian(mlp, x, y, outputs_mean)
    assert torch.equal(H[-2:], torch.zeros(2, 26, dtype=torch.float64))  # the last bias
    u = torch.linspace(-1.0, 2.0, 26, dtype=torch.float64)
    for chunk in (None, 3):
        op = C.HVPOperator(mlp, x, y, outputs_mean, mode=mode, chunk_size=chunk)
        for _ in range(2):
            hv = op.mv(u)
            torch.testing.assert_close(hv, H @ u, rtol=1e-9, atol=1e-12)
            assert torch.equal(hv[-2:], torch.zeros(2, dtype=torch.float64))


def test_lanczos_stops_on_an_exact_zero_beta():
    """v₀ = e₁ is an eigenvector of diag(1, 2, 3): w = Hv − αv = 0 exactly, so β = 0 ends the
    iteration after one product (β ≤ 1e-10·max(1, |α|) holds with equality at 0)."""
    res = C.lanczos(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 3,
                    v0=torch.tensor([1.0, 0.0, 0.0]))
    assert res.alpha.tolist() == [1.0] and res.beta.tolist() == []
    assert res.ritz_values.tolist() == [1.0] and res.converged is None


def test_lanczos_invariant_subspace_threshold_is_relative_to_alpha():
    """From e₁ on [[α, β], [β, d]]: one step gives α and the residual β exactly. The threshold
    is 1e-10·max(1, |α|): β = 1e-9 at α = 100 is an invariant subspace (1e-9 ≤ 1e-8); β = 1.5e-10
    at α = 0.5 is not (1.5e-10 > 1e-10), so a second step runs."""
    def two(a, b, d):
        return torch.tensor([[a, b], [b, d]], dtype=torch.float64)
    e1 = torch.tensor([1.0, 0.0])
    assert len(C.lanczos(two(100.0, 1e-9, 200.0), 2, v0=e1).alpha) == 1
    assert len(C.lanczos(two(0.5, 1.5e-10, 1.0), 2, v0=e1).alpha) == 2


def test_lanczos_invariant_subspace_with_tol_reports_converged():
    """β = 1e-11 after one step from e₁: the error estimate 1e-11 is above tol·|θ| = 1e-15, but
    the subspace is invariant, so T is exact: converged, with zero error bounds; without tol
    ``converged`` stays None."""
    H = torch.tensor([[1.0, 1e-11], [1e-11, 2.0]], dtype=torch.float64)
    e1 = torch.tensor([1.0, 0.0])
    res = C.lanczos(H, 2, v0=e1, tol=1e-15)
    assert res.converged is True and res.error_bounds.tolist() == [0.0] and len(res.alpha) == 1
    assert C.lanczos(H, 2, v0=e1).converged is None
    last = C.lanczos(H, 1, v0=e1, tol=1e-15)  # found at the last step allowed (m = 1): the same
    assert last.converged is True and last.error_bounds.tolist() == [0.0]


def test_lanczos_tol_stop_at_its_boundary_and_after_one_step():
    """From e₁ on [[2, 1], [1, 5]]: α₀ = 2, residual β = 1 exactly, so the one-step estimate is
    |θ − λ| ≤ 1. With tol = 0.5, 1 ≤ 0.5·2 holds with equality: it stops after one product; with
    tol = 0.4 it does not. With k = 1 a single Ritz value is enough to test."""
    H = torch.tensor([[2.0, 1.0], [1.0, 5.0]], dtype=torch.float64)
    e1 = torch.tensor([1.0, 0.0])
    res = C.lanczos(H, 2, v0=e1, tol=0.5)
    assert res.converged is True and len(res.alpha) == 1 and res.error_bounds.tolist() == [1.0]
    assert len(C.lanczos(H, 2, v0=e1, tol=0.4).alpha) == 2


def test_random_vector_distribution_message_and_ritz_dtype():
    with pytest.raises(ValueError, match=r"^unknown distribution 'uniform'; valid choices: rademacher, gaussian$"):
        C.lanczos(torch.eye(3, dtype=torch.float64), 2, distribution="uniform")
    for alpha, beta in (([5], []), (np.array([2.0, 2.0], dtype=np.float32), np.array([1.0], dtype=np.float32))):
        theta, w = C.ritz(alpha, beta)
        assert theta.dtype == np.float64 and w.dtype == np.float64
    np.testing.assert_allclose(C.ritz(np.array([2.0, 2.0], dtype=np.float32), [1.0])[0], [1.0, 3.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", ["cached-graph", "auto"])
def test_a_second_product_on_one_chunk_is_one_backward_pass_through_the_cached_graph(mode):
    """Once the single chunk's graph is built, products skip ``_product`` (no forward pass, no
    BatchNorm or kernel contexts): with ``_product`` made to fail, the second and third products
    still give H v (dense reference). Weights changed in place leave that path (rebuild)."""
    model = tiny_mlp()
    x, y = tiny_data()
    H = dense_hessian(model, x, y)
    v = torch.linspace(-1.0, 1.0, 26, dtype=torch.float64)
    op = C.HVPOperator(model, x, y, mode=mode)
    torch.testing.assert_close(op.mv(v), H @ v, rtol=1e-9, atol=1e-12)
    assert op.mode == "cached-graph"

    def no_product(*args, **kwargs):
        raise AssertionError("_product called although the cached graph is ready")

    op._product = no_product
    for _ in range(2):
        torch.testing.assert_close(op.mv(v), H @ v, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        op.weights["0.weight"].add_(0.0)  # bumps the version counter: the graph is stale
    with pytest.raises(AssertionError, match="_product called"):
        op.mv(v)


def test_a_float32_scipy_operator_is_read_in_float64():
    """A LinearOperator whose matvec returns float32 (diag(1, 2, 4) here): its products are
    converted to float64, so power iteration and Lanczos run and find λ_max = 4."""
    d = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    lin = spla.LinearOperator((3, 3), matvec=lambda v: (d * np.ravel(v)).astype(np.float32), dtype=np.float32)
    res = C.power_iteration(lin, 200, tol=1e-12, v0=torch.ones(3, dtype=torch.float64))
    assert res.eigenvalue == pytest.approx(4.0, rel=1e-9)
    np.testing.assert_allclose(C.lanczos(lin, 3, v0=torch.ones(3)).ritz_values, [1.0, 2.0, 4.0], atol=1e-6)


def test_auto_measures_the_first_chunk_with_two_chunks_too():
    """With two chunks (4 + 3 points) ``auto`` also measures one chunk's graph before building
    both, so over a limit of 0 bytes it logs the estimate, not a built graph."""
    model = tiny_mlp()
    x, y = tiny_data()
    op = C.HVPOperator(model, x, y, chunk_size=4, cache_limit=0)
    op.mv(torch.ones(26, dtype=torch.float64))
    assert op.mode == "forward-over-reverse"
    assert op.auto_log == {"cached-graph": "the cached graphs would hold about 0 MiB, over the limit of 0 MiB"}


# --- HVPOperator's bookkeeping: the cache's bytes, auto's log and errors, two chunks ---------------

def test_constructor_messages_name_the_choices_and_the_first_five_keys():
    model = tiny_mlp()
    x, y = tiny_data()
    with pytest.raises(ValueError) as err:
        C.HVPOperator(model, x, y, bn="batch")
    assert str(err.value) == "unknown bn mode 'batch'; valid choices: eval, train"
    deep = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    w = {f"extra{i}": torch.zeros(1) for i in range(6)}
    with pytest.raises(ValueError) as err:
        C.HVPOperator(deep, x, y, weights=w)  # six unknown keys, six parameters: five of each shown
    assert str(err.value) == ("weights has keys that are not parameters of the model: "
                              "['extra0', 'extra1', 'extra2', 'extra3', 'extra4']; valid names include "
                              "['0.weight', '0.bias', '2.weight', '2.bias', '4.weight']")


def test_the_cached_graph_counts_its_saved_input_and_its_gradient():
    # one point through a 1000 → 10 linear map: the graph keeps the input x (8 000 bytes, saved
    # for ∂/∂W) and the gradient g = ∇_W L (80 000 bytes, held for every later product)
    torch.manual_seed(0)
    lin = nn.Linear(1000, 10, bias=False).double()
    x, y = torch.randn(1, 1000, dtype=torch.float64), torch.tensor([3])
    op = C.HVPOperator(lin, x, y, mode="cached-graph")
    op.mv(torch.ones(10_000, dtype=torch.float64))
    assert op.cache_bytes >= x.nbytes + lin.weight.nbytes
    # and not much more: a few [1, 10] intermediates of the loss
    assert op.cache_bytes <= x.nbytes + lin.weight.nbytes + 4096


def test_auto_keeps_a_graph_exactly_at_the_limit_and_reports_mib_over_it():
    torch.manual_seed(0)
    lin = nn.Linear(1000, 100, bias=False).double()
    x, y = torch.randn(1000, 1000, dtype=torch.float64), torch.randint(0, 100, (1000,))
    v = torch.randn(100_000, dtype=torch.float64)
    ref = C.HVPOperator(lin, x, y, mode="cached-graph")
    want = ref.mv(v)
    nbytes = ref.cache_bytes
    assert nbytes >= x.nbytes  # ≥ 7.6 MiB, so the MiB figures below have digits to compare
    at = C.HVPOperator(lin, x, y, cache_limit=nbytes)  # not over the limit: kept
    torch.testing.assert_close(at.mv(v), want, rtol=1e-12, atol=0)
    assert at.mode == "cached-graph" and at.auto_log == {}
    short = C.HVPOperator(lin, x, y, cache_limit=nbytes - 2**21)
    torch.testing.assert_close(short.mv(v), want, rtol=1e-9, atol=1e-12)
    assert short.mode == "forward-over-reverse"
    held, limit = round(nbytes / 2**20), round((nbytes - 2**21) / 2**20)
    assert held - limit in (1, 2, 3)
    assert short.auto_log == {
        "cached-graph": f"the cached graph holds {held} MiB, over the limit of {limit} MiB"}
    # with two chunks the first chunk's graph is measured and the whole estimated before building
    probe = C.HVPOperator(lin, x, y, chunk_size=500)._chunk_graph_bytes(dict(ref.weights))
    assert probe >= x.nbytes // 2
    chunked = C.HVPOperator(lin, x, y, chunk_size=500, cache_limit=2 * probe - 2**21)
    torch.testing.assert_close(chunked.mv(v), want, rtol=1e-9, atol=1e-12)
    assert chunked.mode == "forward-over-reverse" and chunked._state.keys() == {("forward-over-reverse", 0),
                                                                              ("forward-over-reverse", 1)}
    held, limit = round(2 * probe / 2**20), round((2 * probe - 2**21) / 2**20)
    assert chunked.auto_log == {
        "cached-graph": f"the cached graphs would hold about {held} MiB, over the limit of {limit} MiB"}


class _Unsupported(nn.Module):
    """A model whose forward always fails, with an error that says "no forward AD" (the kind
    ``auto`` passes over) or another one."""

    def __init__(self, exc):
        super().__init__()
        self.lin, self.exc = nn.Linear(3, 2).double(), exc

    def forward(self, x):
        raise self.exc


FWD = "trying to use forward AD with boom that does not support it\nsecond line"


def test_auto_logs_every_failed_mode_and_names_the_model_when_all_fail():
    x, y = tiny_data()
    op = C.HVPOperator(_Unsupported(NotImplementedError(FWD)), x, y)
    first = "NotImplementedError: trying to use forward AD with boom that does not support it"
    with pytest.raises(RuntimeError) as err:
        op.mv(torch.ones(8, dtype=torch.float64))
    assert str(err.value) == ("no Hessian-vector product for _Unsupported: "
                              f"cached-graph failed ({first}); forward-over-reverse failed ({first}); "
                              f"reverse-over-reverse failed ({first})")
    assert op.auto_log == {m: first for m in C.AUTO_ORDER}
    assert op.forward_ad_error == first and op._state == {}


@pytest.mark.parametrize("mode", ["cached-graph", "forward-over-reverse", "reverse-over-reverse"])
def test_only_forward_over_reverse_suggests_the_reverse_mode(mode):
    x, y = tiny_data()
    v = torch.ones(8, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as err:
        C.HVPOperator(_Unsupported(NotImplementedError(FWD)), x, y, mode=mode).mv(v)
    hint = ("\nHVPOperator: mode='reverse-over-reverse' (or 'auto') differentiates twice in reverse "
            "mode instead")
    assert str(err.value) == (FWD + hint if mode == "forward-over-reverse" else FWD)
    # an error that is not about forward AD is raised as it is, in every mode
    with pytest.raises(RuntimeError) as err:
        C.HVPOperator(_Unsupported(RuntimeError("shapes do not match")), x, y, mode=mode).mv(v)
    assert str(err.value) == "shapes do not match"


@pytest.mark.parametrize("mode", ["cached-graph", "forward-over-reverse", "reverse-over-reverse"])
def test_two_chunks_sum_to_the_dense_hessian(mode):
    model = tiny_mlp()
    x, y = tiny_data(n=8)
    H = dense_hessian(model, x, y)
    v = torch.linspace(-1, 1, 26, dtype=torch.float64)
    op = C.HVPOperator(model, x, y, chunk_size=4, mode=mode)  # two chunks of 4
    assert op._n_chunks() == 2
    torch.testing.assert_close(op.mv(v), H @ v, rtol=1e-9, atol=1e-12)


class _Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.forwards = model, 0

    def forward(self, x):
        self.forwards += 1
        return self.model(x)


def test_cached_graphs_of_two_chunks_are_built_once_per_weight_version():
    model = _Counting(tiny_mlp())
    x, y = tiny_data(n=8)
    H = dense_hessian(model.model, x, y)
    v = torch.linspace(-1, 1, 26, dtype=torch.float64)
    op = C.HVPOperator(model, x, y, chunk_size=4, mode="cached-graph")
    for _ in range(3):
        torch.testing.assert_close(op.mv(v), H @ v, rtol=1e-9, atol=1e-12)
    assert model.forwards == 2  # one forward per chunk, for the first product only
    with torch.no_grad():
        op.weights["model.0.weight"].mul_(1.0)  # an in-place write moves the version counter
    op.mv(v)
    assert model.forwards == 4


@pytest.mark.parametrize("mode", ["cached-graph", "forward-over-reverse", "reverse-over-reverse"])
def test_mv_casts_a_float32_vector_to_the_weights_dtype_in_every_mode(mode):
    # a float32 vector on a float64 operator: the product is float64 and exact to rounding
    # (float32 values are exact in float64), whichever mode computes it
    model = tiny_mlp()
    x, y = tiny_data()
    H = dense_hessian(model, x, y)
    v = torch.linspace(-1, 1, 26, dtype=torch.float32)
    out = C.HVPOperator(model, x, y, mode=mode).mv(v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, H @ v.double(), rtol=1e-12, atol=1e-15)
