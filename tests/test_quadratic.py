"""Tests for landscape_lib.quadratic against hand-derived one-dimensional results and Monte Carlo."""
import numpy as np
import pytest

from landscape_lib import quadratic as Q


def one_d(lam=2.0, w_star=1.0):
    return Q.Quadratic(np.array([lam]), np.array([w_star]))


def test_gradient_descent_converges_at_the_linear_rate():
    # zero noise: w_t − w* = (1 − ηλ)^t (w_0 − w*) exactly, so L(w_n) = ½ λ (1 − ηλ)^{2n} (w_0 − w*)²
    q, lr, n, w0 = one_d(lam=2.0, w_star=1.5), 0.2, 37, -0.5
    hand = 0.5 * 2.0 * (1 - lr * 2.0) ** (2 * n) * (w0 - 1.5) ** 2
    sim = Q.simulate(q, lr=lr, steps=n, sigma2=0.0, w0=w0, runs=1)
    exact = Q.expected_losses(q, lr=lr, steps=n, sigma2=0.0, w0=w0)
    assert sim.final == pytest.approx(hand, rel=1e-10)
    assert exact.final == pytest.approx(hand, rel=1e-10)


def test_gradient_descent_oscillating_regime():
    # 1 < ηλ < 2: a = 1 − ηλ is negative, the error flips sign but still shrinks
    q, lr, n = one_d(lam=3.0, w_star=0.0), 0.6, 9
    hand = 0.5 * 3.0 * (1 - 1.8) ** (2 * n) * 1.0
    assert Q.expected_losses(q, lr=lr, steps=n, sigma2=0.0, w0=1.0).final == pytest.approx(hand, rel=1e-10)
    assert Q.simulate(q, lr=lr, steps=n, sigma2=0.0, w0=1.0, runs=1).final == pytest.approx(hand, rel=1e-10)


def test_stationary_variance_closed_form_and_monte_carlo():
    lam, lr, sigma2, b = 2.0, 0.3, 1.0, 4
    v = Q.stationary_variance(lr, lam, sigma2, b)
    # v = (1 − ηλ)² v + (ηλ)² σ²/B  ⇒  v = ηλσ²/(B(2 − ηλ))
    assert v == pytest.approx((lr * lam) ** 2 * sigma2 / b / (1 - (1 - lr * lam) ** 2))
    q = one_d(lam=lam, w_star=0.0)
    exact = Q.expected_losses(q, lr=lr, steps=500, sigma2=sigma2, batch_size=b)
    assert exact.final == pytest.approx(0.5 * lam * v, rel=1e-9)
    sim = Q.simulate(q, lr=lr, steps=60, sigma2=sigma2, batch_size=b, runs=40000, seed=1)
    # E L = ½ λ v; the Monte-Carlo mean of ½λw² has relative s.e. √2/√runs ≈ 0.7 %
    assert sim.final == pytest.approx(0.5 * lam * v, rel=0.03)


def test_average_of_stationary_ar1_matches_hand_formula():
    # Var of the mean of m stationary AR(1) samples → v (1 + a)/((1 − a) m) for large m
    lam, lr, m = 1.0, 0.5, 20000
    a = 1 - lr * lam
    q = one_d(lam=lam, w_star=0.0)
    v = Q.stationary_variance(lr, lam, 1.0, 1)
    exact = Q.expected_losses(q, lr=lr, steps=2 * m, sigma2=1.0, batch_size=1, average_from=m + 1)
    assert exact.averaged == pytest.approx(0.5 * lam * v * (1 + a) / ((1 - a) * m), rel=1e-3)


def test_weight_decay_fixed_point():
    # σ = 0, many steps: w → pλw*/(γ + pλ), so L = ½ Σ λ (γ w*/(γ + pλ))²
    q = Q.Quadratic(np.array([4.0, 1.0, 0.25]), np.array([1.0, -2.0, 0.5]))
    gamma, p = 0.3, np.array([1.0, 2.0, 0.5])
    hand = 0.5 * np.sum(q.eigenvalues * (gamma * q.w_star / (gamma + p * q.eigenvalues)) ** 2)
    exact = Q.expected_losses(q, lr=0.1, steps=3000, sigma2=0.0, weight_decay=gamma, precond=p)
    sim = Q.simulate(q, lr=0.1, steps=3000, sigma2=0.0, weight_decay=gamma, precond=p, runs=1)
    assert exact.final == pytest.approx(hand, rel=1e-8)
    assert sim.final == pytest.approx(hand, rel=1e-8)
    assert exact.averaged == pytest.approx(hand, rel=1e-8)


@pytest.mark.parametrize("every", [1, 7])
def test_simulation_matches_exact_expectations(every):
    q = Q.make(6, n_outliers=2, outlier_range=(2.0, 4.0), seed=3)
    kw = dict(lr=0.2, steps=120, batch_size=2, sigma2=1.0, weight_decay=0.05,
              precond=np.linspace(0.5, 1.5, 6), w0=np.full(6, 0.7), average_from=31, average_every=every)
    exact = Q.expected_losses(q, **kw)
    sim = Q.simulate(q, runs=20000, seed=5, **kw)
    for got, want, runs in ((sim.final, exact.final, sim.final_runs),
                            (sim.averaged, exact.averaged, sim.averaged_runs)):
        se = runs.std() / np.sqrt(len(runs))
        assert abs(got - want) < 4 * se, (got, want, se)
    assert sim.n_averaged == (120 - 31) // every + 1


def test_averaging_helps_in_noisy_sharp_directions():
    # a sharp direction at a large learning rate: the average removes most of the noise
    q = one_d(lam=10.0, w_star=0.0)
    e = Q.expected_losses(q, lr=0.15, steps=2000, sigma2=1.0, batch_size=1)
    assert e.averaged < 0.01 * e.final


def test_trace_and_defaults():
    q = Q.make(20, seed=0)
    r = Q.simulate(q, lr=0.05, steps=100, runs=3, record_every=25)
    assert list(r.steps) == [25, 50, 75, 100]
    assert r.trace.shape == (4,) and r.n_averaged == 50  # second half, every step
    assert r.final_runs.shape == (3,)


def test_spectrum_shape():
    lam = Q.spectrum(100, n_outliers=4, outlier_range=(5.0, 20.0), seed=1)
    assert lam.shape == (100,) and np.all(np.diff(lam) <= 0)
    assert np.all((lam[:4] >= 5) & (lam[:4] <= 20)) and lam[4] < 5
    assert Q.stability_limit(Q.Quadratic(lam, np.zeros(100))) == pytest.approx(2 / lam[0])


def test_bad_input_is_rejected():
    q = one_d(lam=2.0)
    with pytest.raises(ValueError, match="unstable"):
        Q.simulate(q, lr=1.0, steps=10)
    with pytest.raises(ValueError, match="average_from"):
        Q.expected_losses(q, lr=0.1, steps=10, average_from=11)
    with pytest.raises(ValueError, match="lr must be positive"):
        Q.simulate(q, lr=0.0, steps=10)
    with pytest.raises(ValueError, match="non-negative"):
        Q.Quadratic(np.array([-1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="lr·λ"):
        Q.stationary_variance(1.5, 2.0)


@pytest.mark.parametrize("average_from,every,w_bar", [
    (2, 1, (0.75 + 0.875 + 0.9375) / 3),  # iterates 2, 3, 4
    (1, 2, (0.5 + 0.875) / 2),            # iterates 1, 3
    (None, 1, (0.875 + 0.9375) / 2),      # default: the second half, steps 3 and 4
    (4, 3, 0.9375),                       # only the last
])
def test_a_short_noise_free_run_has_the_hand_averaged_iterate(average_from, every, w_bar):
    """λ = 2, w* = 1, w0 = 0, η = 0.25, σ² = 0: w_t = 0.5 w_{t−1} + 0.5, i.e. 0.5, 0.75, 0.875,
    0.9375; E L = ½λ(w̄ − 1)² exactly, from both the closed form and the simulation."""
    q = Q.Quadratic(np.array([2.0]), np.array([1.0]))
    kw = dict(lr=0.25, steps=4, sigma2=0.0, average_from=average_from, average_every=every)
    exp = Q.expected_losses(q, **kw)
    sim = Q.simulate(q, runs=2, **kw)
    assert exp.averaged == pytest.approx((w_bar - 1) ** 2, rel=1e-12)
    assert sim.averaged == pytest.approx((w_bar - 1) ** 2, rel=1e-12)
    assert exp.final == pytest.approx(0.0625 ** 2, rel=1e-12) and sim.final == pytest.approx(0.0625 ** 2)


def test_two_noisy_steps_have_the_hand_variance():
    """One direction, λ = 2, η = 0.25, weight decay γ = 1: a = 1 − ηγ − ηλ = 0.25, c = 0.5.
    With w* = 0 and noise s² = σ²/B = 4: Var w1 = c²s² = 1, Var w2 = a²·1 + 1 = 1.0625,
    Cov(w1, w2) = a·1 = 0.25, so Var((w1 + w2)/2) = (1 + 1.0625 + 0.5)/4 and E L = ½λ·Var."""
    q = Q.Quadratic(np.array([2.0]), np.array([0.0]))
    exp = Q.expected_losses(q, lr=0.25, steps=2, batch_size=1, sigma2=4.0, weight_decay=1.0,
                            average_from=1)
    assert exp.averaged == pytest.approx(2.5625 / 4, rel=1e-12)
    assert exp.final == pytest.approx(1.0625, rel=1e-12)
