"""A noisy quadratic model (NQM): SGD, weight decay and iterate averaging, simulated and exact.

Granziol, Wan, Albanie, Roberts, "Iterative Averaging in the Quest for Best Test Error"
(arXiv 2003.01247) explain iterate averaging (IA) on a high-dimensional quadratic whose batch
loss is the true loss with a randomly perturbed minimiser. This module is the book's version
of that model. In the eigenbasis of the Hessian ``H = diag(λ)`` (any quadratic is one after a
rotation) the true loss is

.. math::  L(w) = \\tfrac12 \\sum_i λ_i (w_i - w^*_i)^2 ,

and step ``t`` sees the gradient of a batch loss whose minimiser is shifted by noise,

.. math::  g_t = λ \\odot (w_{t-1} - w^* - ε_t), \\qquad ε_t \\sim N(0, s^2 I),\\quad s^2 = σ^2 / B ,

(``B`` the batch size). SGD with decoupled weight decay ``γ`` and an optional fixed diagonal
preconditioner ``p`` (``p = 1``: SGD; ``p_i ≠ 1`` mimics an adaptive method) is

.. math::  w_t = (1 - ηγ)\\, w_{t-1} - η\\, p \\odot g_t = a \\odot w_{t-1} + c \\odot (w^* - ε_t),
           \\qquad a = 1 - ηγ - ηpλ,\\ c = ηpλ .

Each coordinate is a Gaussian AR(1) process, so everything is exact (:func:`expected_losses`):

* mean ``m_t = m_∞ + a^t (w_0 - m_∞)`` with ``m_∞ = c w^*/(1 - a)``;
* variance ``v_t = c^2 s^2 (1 - a^{2t})/(1 - a^2)`` and ``Cov(w_s, w_t) = a^{t-s} v_s`` (s ≤ t);
* for plain SGD (``γ = 0, p = 1``) the stationary variance is
  ``v_∞ = η λ s^2 / (2 - η λ)`` (:func:`stationary_variance`), i.e. an expected loss
  ``½ λ v_∞`` per direction: noise grows with the learning rate;
* the IA average ``w̄`` of the iterates ``t ∈ {t_0, t_0 + k, …} ∩ [1, n]`` (``m`` of them) has mean
  ``m_∞ + (w_0 - m_∞) a^{t_0}(1 - a^{km})/(m(1 - a^k))`` and variance
  ``m^{-2} Σ_j v_{t_j} [1 + 2 a^k (1 - a^{k(m-1-j)})/(1 - a^k)]``.

``E L(w) = ½ Σ_i λ_i [(E w_i - w^*_i)^2 + Var w_i]`` for the final iterate and for the average.
The flat directions (λ ≈ 0) carry the *bias* ``(w_0 - w^*)`` that only a large ``ηλ`` removes,
the sharp ones the *noise* that averaging removes: hence IA prefers a larger learning rate
than the final iterate (the paper's first prediction), and averaging every ``k`` steps is
nearly as good as every step (the second).

:func:`simulate` runs the recursion itself for many independent runs (the experiment);
:func:`expected_losses` is the closed form (the theory); the tests check one against the
other, and both against hand-derived one-dimensional cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quadratic:
    """``L(w) = ½ Σ λ_i (w_i − w*_i)²``: eigenvalues ``λ ≥ 0`` and minimiser ``w*``."""

    eigenvalues: np.ndarray
    w_star: np.ndarray

    def __post_init__(self):
        lam, ws = np.asarray(self.eigenvalues, float), np.asarray(self.w_star, float)
        if lam.ndim != 1 or lam.shape != ws.shape or lam.size == 0:
            raise ValueError(f"eigenvalues and w_star must be non-empty vectors of one length, "
                             f"got shapes {lam.shape} and {ws.shape}")
        if np.any(lam < 0) or not np.all(np.isfinite(lam)):
            raise ValueError("eigenvalues must be finite and non-negative")
        object.__setattr__(self, "eigenvalues", lam)
        object.__setattr__(self, "w_star", ws)

    @property
    def dim(self) -> int:
        return self.eigenvalues.size

    def loss(self, w: np.ndarray) -> np.ndarray:
        """True loss of ``w`` (shape ``[..., d]``; one value per leading index)."""
        e = np.asarray(w, float) - self.w_star
        return 0.5 * np.sum(self.eigenvalues * e * e, axis=-1)


def spectrum(d: int = 500, *, n_outliers: int = 5, outlier_range: tuple[float, float] = (5.0, 20.0),
             bulk_shape: float = 0.5, bulk_scale: float = 0.4, seed: int = 0) -> np.ndarray:
    """A neural-network-like Hessian spectrum: a few large outliers and a bulk near zero.

    ``n_outliers`` eigenvalues uniform on ``outlier_range``; the other ``d − n_outliers`` from a
    Gamma(``bulk_shape``, scale ``bulk_scale``) distribution (many almost flat directions).
    Sorted in decreasing order.
    """
    if d < 1 or not 0 <= n_outliers <= d:
        raise ValueError(f"need d >= 1 and 0 <= n_outliers <= d, got d={d}, n_outliers={n_outliers}")
    lo, hi = outlier_range
    if not 0 <= lo <= hi:
        raise ValueError(f"outlier_range must satisfy 0 <= low <= high, got {outlier_range}")
    if bulk_shape <= 0 or bulk_scale <= 0:
        raise ValueError(f"bulk_shape and bulk_scale must be positive, got {bulk_shape}, {bulk_scale}")
    rng = np.random.default_rng(seed)
    lam = np.concatenate([rng.uniform(lo, hi, n_outliers),
                          rng.gamma(bulk_shape, bulk_scale, d - n_outliers)])
    return np.sort(lam)[::-1].copy()


def make(d: int = 500, *, seed: int = 0, **spectrum_kwargs) -> Quadratic:
    """A random quadratic: :func:`spectrum` eigenvalues and ``w* ~ N(0, I/d)``."""
    lam = spectrum(d, seed=seed, **spectrum_kwargs)
    w_star = np.random.default_rng(seed + 1).normal(0.0, 1.0 / np.sqrt(d), d)
    return Quadratic(lam, w_star)


def stationary_variance(lr: float, eigenvalue: float, sigma2: float = 1.0, batch_size: int = 1) -> float:
    """Stationary ``Var w`` of SGD on ``½λ(w − w*)²`` with minimiser noise ``σ²/B``:
    ``η λ σ² / (B (2 − η λ))`` (solve ``v = (1 − ηλ)² v + (ηλ)² σ²/B``)."""
    _check_positive(lr=lr, batch_size=batch_size)
    if sigma2 < 0:
        raise ValueError(f"sigma2 must be >= 0, got {sigma2}")
    if not 0 < lr * eigenvalue < 2:
        raise ValueError(f"need 0 < lr·λ < 2 for a stationary distribution, got {lr * eigenvalue}")
    return lr * eigenvalue * sigma2 / (batch_size * (2.0 - lr * eigenvalue))


def stability_limit(q: Quadratic, weight_decay: float = 0.0, precond: np.ndarray | None = None) -> float:
    """The largest stable learning rate: ``2 / max_i(γ + p_i λ_i)`` (``|a_i| < 1`` for all i)."""
    p = _precond(q, precond)
    top = float(np.max(weight_decay + p * q.eigenvalues))
    return np.inf if top <= 0 else 2.0 / top


@dataclass
class Result:
    """Losses of the final iterate and of the iterate average.

    ``final`` and ``averaged`` are means over runs of ``L(w_n)`` and ``L(w̄)``; ``*_runs`` the
    per-run values; ``steps``/``trace`` (when recorded) the mean over runs of ``L(w_t)``.
    """

    final: float
    averaged: float
    final_runs: np.ndarray
    averaged_runs: np.ndarray
    n_averaged: int
    steps: np.ndarray | None = None
    trace: np.ndarray | None = None


@dataclass
class Expected:
    """Exact ``E L`` of the final iterate and of the average, in total and per direction."""

    final: float
    averaged: float
    final_per_direction: np.ndarray
    averaged_per_direction: np.ndarray


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")


def _precond(q: Quadratic, precond) -> np.ndarray:
    if precond is None:
        return np.ones(q.dim)
    p = np.broadcast_to(np.asarray(precond, float), (q.dim,)).copy()
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("preconditioner entries must be finite and non-negative")
    return p


def _setup(q, lr, steps, batch_size, sigma2, weight_decay, precond, w0, average_from, average_every):
    _check_positive(lr=lr, steps=steps, batch_size=batch_size, average_every=average_every)
    if sigma2 < 0 or weight_decay < 0:
        raise ValueError(f"sigma2 and weight_decay must be >= 0, got {sigma2}, {weight_decay}")
    p = _precond(q, precond)
    limit = stability_limit(q, weight_decay, p)
    if lr >= limit:
        raise ValueError(f"lr {lr} is unstable for this quadratic: it must stay below "
                         f"2 / max(γ + p·λ) = {limit:.4g}")
    start = steps // 2 + 1 if average_from is None else int(average_from)
    if not 1 <= start <= steps:
        raise ValueError(f"average_from must be a step in 1..{steps}, got {start}")
    w0 = np.zeros(q.dim) if w0 is None else np.broadcast_to(np.asarray(w0, float), (q.dim,)).copy()
    a = 1.0 - lr * weight_decay - lr * p * q.eigenvalues
    c = lr * p * q.eigenvalues
    return a, c, w0, start, sigma2 / batch_size


def simulate(q: Quadratic, *, lr: float, steps: int, batch_size: int = 32, sigma2: float = 1.0,
             weight_decay: float = 0.0, precond: np.ndarray | None = None, w0: np.ndarray | None = None,
             average_from: int | None = None, average_every: int = 1, runs: int = 10, seed: int = 0,
             record_every: int = 0) -> Result:
    """Run noisy SGD on ``q`` ``runs`` times (vectorised over runs) and average its iterates.

    ``w_0 = w0`` (default 0); the average is the equal mean of ``w_t`` for
    ``t = average_from, average_from + average_every, … ≤ steps`` (default: the second half,
    every step). ``record_every > 0`` also records the mean loss of the iterates every that
    many steps.
    """
    a, c, w0, start, s2 = _setup(q, lr, steps, batch_size, sigma2, weight_decay, precond, w0,
                                 average_from, average_every)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    rng = np.random.default_rng(seed)
    s = np.sqrt(s2)
    w = np.tile(w0, (runs, 1))  # [runs, d]
    total, count = np.zeros_like(w), 0
    rec_steps, trace = [], []
    for t in range(1, steps + 1):
        eps = rng.standard_normal(w.shape) * s
        # w_t = a w_{t-1} + c (w* − ε_t): one SGD step with decoupled decay, preconditioned
        w = a * w + c * (q.w_star - eps)
        if t >= start and (t - start) % average_every == 0:
            total += w
            count += 1
        if record_every and t % record_every == 0:
            rec_steps.append(t)
            trace.append(float(q.loss(w).mean()))
    final_runs = q.loss(w)
    avg_runs = q.loss(total / count)
    return Result(float(final_runs.mean()), float(avg_runs.mean()), final_runs, avg_runs, count,
                  np.array(rec_steps) if record_every else None,
                  np.array(trace) if record_every else None)


def _geom(r: np.ndarray, n) -> np.ndarray:
    """``Σ_{j<n} r^j = (1 − r^n)/(1 − r)``, with the limit ``n`` where ``r → 1``."""
    r = np.asarray(r, float)
    n = np.asarray(n, float)
    near = np.abs(1.0 - r) < 1e-12
    safe = np.where(near, 0.5, r)
    return np.where(near, n, (1.0 - safe ** n) / (1.0 - safe))


def expected_losses(q: Quadratic, *, lr: float, steps: int, batch_size: int = 32, sigma2: float = 1.0,
                    weight_decay: float = 0.0, precond: np.ndarray | None = None,
                    w0: np.ndarray | None = None, average_from: int | None = None,
                    average_every: int = 1) -> Expected:
    """Exact ``E L(w_n)`` and ``E L(w̄)`` for the settings of :func:`simulate` (module docstring)."""
    a, c, w0, start, s2 = _setup(q, lr, steps, batch_size, sigma2, weight_decay, precond, w0,
                                 average_from, average_every)
    lam, ws = q.eigenvalues, q.w_star
    one_minus_a = 1.0 - a
    fixed = np.where(np.abs(one_minus_a) > 0, c * ws / np.where(one_minus_a == 0, 1.0, one_minus_a), w0)
    # final iterate: mean and variance after `steps` steps
    mean_n = fixed + a ** steps * (w0 - fixed)
    var_n = c * c * s2 * _geom(a * a, steps)
    final_dir = 0.5 * lam * ((mean_n - ws) ** 2 + var_n)
    # the average of t_j = start + j k, j = 0..m-1
    k = average_every
    m = (steps - start) // k + 1
    mean_avg = fixed + (w0 - fixed) * a ** start * _geom(a ** k, m) / m
    t_j = start + k * np.arange(m)[:, None]  # [m, 1]
    v_j = c * c * s2 * _geom(a * a, t_j)  # [m, d]: Var w_{t_j}
    # Σ_{l=1}^{m-1-j} a^{lk} = a^k Σ_{l<m-1-j} a^{lk}
    tail = a ** k * _geom(a ** k, (m - 1 - np.arange(m))[:, None])
    var_avg = (v_j * (1.0 + 2.0 * tail)).sum(0) / m ** 2
    avg_dir = 0.5 * lam * ((mean_avg - ws) ** 2 + var_avg)
    return Expected(float(final_dir.sum()), float(avg_dir.sum()), final_dir, avg_dir)
