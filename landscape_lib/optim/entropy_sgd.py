"""Entropy-SGD: gradient descent on the local entropy, with an SGLD inner loop on fresh batches.

Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina, "Entropy-SGD:
Biasing Gradient Descent Into Wide Valleys", ICLR 2017 (arXiv 1611.01838); official code
``ucla-vision/entropy-sgd`` (Lua, and a PyTorch port ``python/optim.py``).

The **local entropy** of ``f`` at ``x``, with scope ``γ`` and temperature ``ε²``, is

.. math::

    F(x, γ) = \\log \\int \\exp\\Big(-\\frac{1}{ε^2}\\big(f(x')
              + \\tfrac{γ}{2}\\lVert x - x'\\rVert^2\\big)\\Big)\\, dx' ,

large where a lot of low-loss volume surrounds ``x`` (the paper's ``β = 1``: ``ε = 1``). Its
gradient is ``−∇F = (γ/ε²)(x − ⟨x'⟩)``, with ``⟨x'⟩`` the mean of the local Gibbs measure
``∝ exp(−(f(x') + γ/2 ‖x − x'‖²)/ε²)``. One outer step (the ICLR algorithm and the code):

1. ``γ_t = γ₀ (1 + γ₁)^t`` (**scoping**: ``t`` counts outer steps and really increments — the
   PyTorch port initialises it and never increments it, so scoping is silently off there);
   ``x' ← x``, ``μ ← x``.
2. ``L`` times, each on a **fresh minibatch** ``Ξ_ℓ``, one SGLD step (:func:`.sgld.sgld_step_`)
   on ``U(x') = f_{Ξ_ℓ}(x') + γ_t/2 ‖x − x'‖²`` and an exponential average:

   .. math::  x' \\leftarrow x' - η' \\big(∇f_{Ξ_ℓ}(x') + γ_t (x' - x)\\big) + \\sqrt{2η'}\\,ε\\,ξ,
              \\qquad μ \\leftarrow (1 - α) μ + α x' .

3. Outer step along ``x − μ`` (the code folds ``γ/ε²`` into the learning rate ``η``), with
   Nesterov momentum as in the **PyTorch port** (the variant followed here; the Lua code keeps
   momentum on the plain gradient and steps along ``x − μ`` without it):

   .. math::  d = x - μ, \\quad b \\leftarrow m b + d, \\quad x \\leftarrow x - η\\,(d + m b)
              \\;\\;(\\text{plain momentum: } x \\leftarrow x - η b).

**Cost.** The first inner gradient is evaluated at ``x' = x`` on the step's own batch, and it is
also the loss the step reports, so an outer step costs ``L`` gradient evaluations on ``L``
batches (the official code spends one more, ``L + 1``, evaluating ``f(x)`` only to report it).
Under ``train.fit`` (``fresh_batch_per_closure = True``) every closure call after the first
draws a fresh batch from the stream and counts one gradient evaluation, so the history's
``effective_epochs`` — gradient evaluations per pass over the data — is the paper's
"epochs × L" and comparisons with SGD are at equal cost.

Weight decay ``λ`` is added to the inner gradient (the sampled loss is ``f + λ/2 ‖x'‖²``). With
BatchNorm in train mode the running statistics are updated at the perturbed points ``x'``;
recompute them before evaluating (``params.recompute_bn``), as the code's ``dry_feed`` does.
Defaults follow the code: ``L = 20``, ``η' = 0.1``, ``ε = 1e-4``, ``α = 0.25``
(``μ ← 0.75 μ + 0.25 x'``), ``γ₀ = 0.03``, ``γ₁ = 1e-3``, Nesterov momentum 0.9.
"""
from __future__ import annotations

import math

import torch

from .sgld import sgld_step_


def _positive(v, name: str) -> float:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def _non_negative(v, name: str, what: str = "") -> float:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be >= 0{what}, got {v!r}")
    return float(v)


class EntropySGD(torch.optim.Optimizer):
    """Entropy-SGD (see the module docstring for the equations).

    Parameters
    ----------
    lr
        Outer step ``η`` along ``x − μ``.
    L
        SGLD steps per outer step (an integer ≥ 1): ``L`` gradient evaluations, ``L`` batches.
    inner_lr
        ``η'``, the SGLD step.
    noise
        ``ε ≥ 0``, the SGLD noise scale (temperature ``ε²``; 0: deterministic inner descent).
    alpha
        ``α ∈ (0, 1]``, the weight of the new sample in ``μ ← (1 − α)μ + αx'``.
    gamma0, gamma1
        Scope ``γ_t = γ₀ (1 + γ₁)^t``, both ≥ 0.
    momentum, nesterov
        Outer momentum ``m ∈ [0, 1)`` on ``x − μ``; Nesterov (the PyTorch port) or plain.
    weight_decay
        ``λ ≥ 0`` in the inner gradient.
    generator
        For the SGLD noise (CPU generator by default: reproducible across devices).
    """

    fresh_batch_per_closure = True  # train.fit's closure step draws a new batch per call

    def __init__(self, params, lr: float = 1.0, *, L: int = 20, inner_lr: float = 0.1,
                 noise: float = 1e-4, alpha: float = 0.25, gamma0: float = 0.03,
                 gamma1: float = 1e-3, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None):
        _positive(lr, "lr")
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"L (SGLD steps per outer step) must be an integer >= 1, got {L!r}")
        _positive(inner_lr, "inner_lr (the SGLD step η')")
        _non_negative(noise, "noise", " (the SGLD noise scale ε; 0 means no noise)")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
        _non_negative(gamma0, "gamma0", " (the scope γ₀)")
        _non_negative(gamma1, "gamma1", " (the scoping rate γ₁)")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        _non_negative(weight_decay, "weight_decay")
        defaults = dict(lr=lr, L=L, inner_lr=float(inner_lr), noise=float(noise),
                        alpha=float(alpha), gamma0=float(gamma0), gamma1=float(gamma1),
                        momentum=float(momentum), nesterov=bool(nesterov),
                        weight_decay=float(weight_decay), t=0)
        super().__init__(params, defaults)
        self.generator = generator

    def gamma(self, group: int = 0) -> float:
        """The scope ``γ_t = γ₀(1 + γ₁)^t`` the *next* outer step uses (``t`` steps taken)."""
        g = self.param_groups[group]
        return g["gamma0"] * (1.0 + g["gamma1"]) ** g["t"]

    def step(self, closure=None):
        """One outer step; ``closure`` is called ``L`` times (fresh batches under ``train.fit``).

        Returns the first closure's loss (at ``x``, on the step's batch). ``state[p]["mu"]`` keeps
        the last ``μ`` (the estimate of ``⟨x'⟩``).
        """
        with torch.no_grad():
            if closure is None:
                raise ValueError("EntropySGD needs a closure (zero_grad, forward, backward, return "
                                 "loss): the inner loop evaluates it L times")
            L = {g["L"] for g in self.param_groups}
            if len(L) != 1:
                raise ValueError(f"every param group must have the same L, got {sorted(L)}")
            L = L.pop()
            gammas = [self.gamma(i) for i in range(len(self.param_groups))]
            # x (kept), μ ← x; x' lives in the parameters during the inner loop
            anchors = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
            means = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
            loss = None
            for ell in range(L):
                with torch.enable_grad():
                    out = closure()
                if ell == 0:
                    loss = out
                for group, gamma, xs, mus in zip(self.param_groups, gammas, anchors, means):
                    a = group["alpha"]
                    live = [j for j, p in enumerate(group["params"]) if p.grad is not None]
                    ps = [group["params"][j] for j in live]
                    if not ps:
                        continue
                    x_, mu_ = [xs[j] for j in live], [mus[j] for j in live]
                    # dx' = ∇f(x') + λx' + γ(x' − x)
                    d = torch._foreach_sub(ps, x_)
                    torch._foreach_mul_(d, gamma)
                    torch._foreach_add_(d, [p.grad for p in ps])
                    if group["weight_decay"]:
                        torch._foreach_add_(d, ps, alpha=group["weight_decay"])
                    sgld_step_(ps, d, group["inner_lr"], group["noise"], self.generator)
                    # μ ← (1 − α)μ + αx'
                    torch._foreach_mul_(mu_, 1.0 - a)
                    torch._foreach_add_(mu_, ps, alpha=a)
            # outer step from x along x − μ, with (Nesterov) momentum
            for group, xs, mus in zip(self.param_groups, anchors, means):
                m = group["momentum"]
                for p, x, mu in zip(group["params"], xs, mus):
                    p.copy_(x)
                    d = x - mu
                    state = self.state[p]
                    if m > 0:
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = d.clone()
                        else:
                            buf.mul_(m).add_(d)
                        d = d.add(buf, alpha=m) if group["nesterov"] else buf
                    p.add_(d, alpha=-group["lr"])
                    state["mu"] = mu
                group["t"] += 1
            return loss
