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


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_quadratic_stores_float_vectors_and_rejects_bad_shapes():
    q = Q.Quadratic([0, 2], [1, 0])  # integer lists; a zero eigenvalue is allowed
    assert isinstance(q.eigenvalues, np.ndarray) and q.eigenvalues.dtype == np.float64
    assert isinstance(q.w_star, np.ndarray) and q.w_star.dtype == np.float64
    # the loss reduces the last axis only: [2, 3, d] points give [2, 3] losses
    w = np.zeros((2, 3, 2))
    w[1, 2] = [1.0, 3.0]
    loss = q.loss(w)
    assert loss.shape == (2, 3)
    assert loss[0, 0] == 0.0 and loss[1, 2] == 9.0  # ½·0·(0 − 1)² + ½·2·0², ½·0·0² + ½·2·3²
    for lam, ws in [([1.0, 2.0], [1.0]), ([[1.0]], [[1.0]]), ([], [])]:
        with pytest.raises(ValueError, match="non-empty vectors of one length"):
            Q.Quadratic(lam, ws)
    for lam in ([-1.0], [np.inf]):
        with pytest.raises(ValueError, match="^eigenvalues must be finite and non-negative$"):
            Q.Quadratic(lam, [0.0])


def test_spectrum_defaults_and_boundaries():
    lam = Q.spectrum()
    assert lam.shape == (500,) and np.sum(lam >= 5.0) == 5
    # the bulk is Gamma(0.5, scale 0.4): mean 0.2, standard error 0.4·√0.5/√495 ≈ 0.013
    assert abs(lam[5:].mean() - 0.2) < 0.05
    np.testing.assert_array_equal(lam, Q.spectrum(seed=0))
    assert not np.array_equal(lam, Q.spectrum(seed=1))
    assert Q.spectrum(1, n_outliers=1).shape == (1,)          # d = 1 and n_outliers = d
    assert np.all(Q.spectrum(3, n_outliers=0) < 5.0)          # no outliers
    np.testing.assert_array_equal(Q.spectrum(4, n_outliers=2, outlier_range=(7.0, 7.0))[:2], [7.0, 7.0])
    assert np.all(Q.spectrum(3, n_outliers=3, outlier_range=(0.0, 1.0)) <= 1.0)  # low = 0
    with pytest.raises(ValueError, match="need d >= 1"):
        Q.spectrum(0, n_outliers=0)
    with pytest.raises(ValueError, match="need d >= 1"):
        Q.spectrum(3, n_outliers=4)
    for kw in (dict(bulk_shape=0.0), dict(bulk_scale=0.0)):
        with pytest.raises(ValueError, match="must be positive"):
            Q.spectrum(3, n_outliers=0, **kw)


def test_make_uses_its_seed_and_spectrum_arguments():
    q = Q.make()
    assert q.dim == 500
    np.testing.assert_array_equal(q.eigenvalues, Q.spectrum(500, seed=0))
    np.testing.assert_array_equal(Q.make(30, seed=3).eigenvalues, Q.spectrum(30, seed=3))
    np.testing.assert_array_equal(Q.make(30, seed=3).w_star, Q.make(30, seed=3).w_star)
    assert np.all(Q.make(30, n_outliers=0).eigenvalues < 5.0)
    # w* ~ N(0, I/d): mean ≈ 0 (s.e. 1/d), ‖w*‖² ≈ 1 (s.e. √(2/d))
    ws = Q.make(2000, seed=1).w_star
    assert abs(ws.mean()) < 0.005 and abs(np.sum(ws ** 2) - 1.0) < 0.15


def test_stationary_variance_hand_values_and_boundaries():
    assert Q.stationary_variance(0.5, 1.0) == pytest.approx(1 / 3, rel=1e-12)  # σ² = 1, B = 1
    # ηλ = 1, σ² = 4, B = 2: 1·4/(2·1)
    assert Q.stationary_variance(0.5, 2.0, sigma2=4.0, batch_size=2) == pytest.approx(2.0, rel=1e-12)
    assert Q.stationary_variance(0.5, 1.0, sigma2=0.0) == 0.0
    assert Q.stationary_variance(0.5, 1.0, sigma2=0.5) == pytest.approx(1 / 6, rel=1e-12)
    with pytest.raises(ValueError, match="^lr must be positive"):
        Q.stationary_variance(-0.5, -1.0)  # ηλ = 0.5 would be stationary
    with pytest.raises(ValueError, match="^batch_size must be positive"):
        Q.stationary_variance(0.5, 1.0, batch_size=0)
    with pytest.raises(ValueError, match="sigma2 must be >= 0"):
        Q.stationary_variance(0.5, 1.0, sigma2=-1.0)
    for lr, lam, got in [(0.5, 0.0, "0.0"), (1.0, 2.0, "2.0"), (1.25, 2.0, "2.5")]:
        with pytest.raises(ValueError, match=rf"got {got}$"):
            Q.stationary_variance(lr, lam)


def test_stability_limit_uses_the_preconditioner_and_flat_quadratics():
    q = Q.Quadratic([1.0, 3.0], [0.0, 0.0])
    assert Q.stability_limit(q, precond=[4.0, 1.0]) == pytest.approx(0.5)   # 2 / max(4, 3)
    assert Q.stability_limit(q, precond=[0.0, 1.0]) == pytest.approx(2 / 3)  # p = 0 is allowed
    assert Q.stability_limit(Q.Quadratic([0.0], [0.0])) == np.inf
    assert Q.stability_limit(Q.Quadratic([0.5], [0.0])) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="preconditioner entries"):
        Q.stability_limit(q, precond=[-1.0, 1.0])
    with pytest.raises(ValueError, match="unstable"):  # stable without p, not with p = 4
        Q.simulate(Q.Quadratic([1.0], [0.0]), lr=1.0, steps=2, precond=[4.0])


@pytest.mark.parametrize("kw,name", [(dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
                                     (dict(average_every=0), "average_every")])
def test_setup_rejects_non_positive_counts(kw, name):
    args = {"lr": 0.1, "steps": 4, **kw}
    for f in (Q.simulate, Q.expected_losses):
        with pytest.raises(ValueError, match=f"^{name} must be positive"):
            f(one_d(), **args)


def test_setup_rejects_a_negative_sigma2_or_weight_decay_alone():
    for kw in (dict(sigma2=-1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError, match="sigma2 and weight_decay"):
            Q.expected_losses(one_d(), lr=0.1, steps=4, **kw)


def test_noise_free_weight_decay_run_with_odd_steps_and_defaults():
    """λ = 1, w* = 1, η = 0.5, γ = 0.5: a = 0.25, c = 0.5, fixed point 2/3 ≠ w*. From w0 = 0:
    w = 0.5, 0.625, 0.65625. Three steps: the default average is over steps 2..3 (3 // 2 + 1)."""
    q = Q.Quadratic([1.0], [1.0])
    kw = dict(lr=0.5, steps=3, sigma2=0.0, weight_decay=0.5)
    w = [0.5, 0.625, 0.65625]
    exp = Q.expected_losses(q, **kw)
    sim = Q.simulate(q, runs=1, record_every=1, **kw)
    final, avg = 0.5 * (w[2] - 1) ** 2, 0.5 * ((w[1] + w[2]) / 2 - 1) ** 2
    for r in (exp, sim):
        assert r.final == pytest.approx(final, rel=1e-12)
        assert r.averaged == pytest.approx(avg, rel=1e-12)
    np.testing.assert_allclose(exp.final_per_direction, [final], rtol=1e-12)
    np.testing.assert_allclose(exp.averaged_per_direction, [avg], rtol=1e-12)
    assert sim.n_averaged == 2
    np.testing.assert_allclose(sim.trace, [0.5 * (x - 1) ** 2 for x in w], rtol=1e-12)
    # from w0 = 2 (above the fixed point): w = 1, 0.75, 0.6875
    exp2 = Q.expected_losses(q, w0=2.0, average_from=1, **kw)
    assert exp2.final == pytest.approx(0.5 * 0.3125 ** 2, rel=1e-12)
    assert exp2.averaged == pytest.approx(0.5 * ((1 + 0.75 + 0.6875) / 3 - 1) ** 2, rel=1e-12)


def test_a_flat_direction_keeps_its_start_and_adds_nothing():
    """λ = 0 (a = 1, the geometric sums at their limit n): the flat coordinate stays at w0 and
    contributes 0; the sharp one (λ = 2, η = 0.25, σ² = 0) is the hand run above."""
    q = Q.Quadratic([0.0, 2.0], [1.0, 1.0])
    exp = Q.expected_losses(q, lr=0.25, steps=4, sigma2=1.0, batch_size=1, average_from=4)
    np.testing.assert_array_equal(exp.final_per_direction[0], 0.0)
    np.testing.assert_array_equal(exp.averaged_per_direction[0], 0.0)
    # sharp direction with noise s² = 1: Var w4 = c² s² Σ_{j<4} a^{2j}, a = 0.5, c = 0.5
    var4 = 0.25 * (1 + 0.25 + 0.0625 + 0.015625)
    assert exp.final == pytest.approx(0.5 * 2 * (0.0625 ** 2 + var4), rel=1e-12)
    assert exp.averaged == pytest.approx(exp.final, rel=1e-12)
    assert Q._geom(np.array([1.0, -1.0, 0.5]), 3).tolist() == [3.0, 1.0, 1.75]


def test_simulate_defaults_and_seed():
    q = one_d()
    r = Q.simulate(q, lr=0.1, steps=5)
    explicit = Q.simulate(q, lr=0.1, steps=5, batch_size=32, sigma2=1.0, runs=10, seed=0)
    assert r.final_runs.shape == (10,) and r.steps is None and r.trace is None
    np.testing.assert_array_equal(r.final_runs, explicit.final_runs)
    assert not np.array_equal(r.final_runs, Q.simulate(q, lr=0.1, steps=5, seed=1).final_runs)
    e = Q.expected_losses(q, lr=0.1, steps=5)
    e_explicit = Q.expected_losses(q, lr=0.1, steps=5, batch_size=32, sigma2=1.0)
    assert e.final == e_explicit.final and e.averaged == e_explicit.averaged
    assert e.final != Q.expected_losses(q, lr=0.1, steps=5, batch_size=33).final
