"""Stochastic-gradient Langevin dynamics: the one SGLD step of the book.

**SGLD** (Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics",
ICML 2011) is the Euler–Maruyama discretisation of the overdamped Langevin diffusion
``dθ = −∇U(θ) dt + √(2T) dW``, whose stationary law is the Gibbs measure ``∝ exp(−U(θ)/T)``:

.. math::  θ \\leftarrow θ - η\\, ∇U(θ) + \\sqrt{2η}\\; ε\\; ξ, \\qquad ξ \\sim \\mathcal N(0, I),

with step ``η`` and noise scale ``ε = √T`` (temperature ``T = ε²``). With a stochastic
gradient ``∇U`` is a minibatch estimate. For a quadratic ``U = ½ a θ²`` the chain is an AR(1)
process with stationary mean 0 and variance ``T / (a (1 − ηa/2))`` (exact for the discrete
chain; ``T/a`` as ``η → 0``), which the unit tests check.

Used by Entropy-SGD's inner loop (:mod:`.entropy_sgd`, Chaudhari et al. 2017, whose code writes
the same step as noise ``ε/√(η/2)`` added to the gradient, then ``θ ← θ − η·dθ``) and by the
Langevin chapters. :class:`SGLD` is the step as a ``torch.optim.Optimizer``.
"""
from __future__ import annotations

import math

import torch


def _check(lr: float, noise: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"the SGLD step size must be positive, got {lr!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"the SGLD noise scale ε must be >= 0 (temperature ε²), got {noise!r}")


def gaussian_like(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``N(0, I)`` shaped like ``p``, drawn on the generator's device (CPU by default, so a seed
    gives the same draws on every device) and moved to ``p``'s."""
    device = generator.device if generator is not None else p.device
    return torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device).to(p.device)


def sgld_step_(p, grad, lr: float, noise: float,
               generator: torch.Generator | None = None):
    """In place: ``p ← p − lr·grad + √(2·lr)·noise·ξ`` (one SGLD step at temperature noise²).

    ``p`` and ``grad`` are tensors, or equally long lists of tensors (updated with
    ``torch._foreach`` ops; the noise for all of them is one draw from ``generator``, split).
    ``noise = 0`` is plain gradient descent (no random numbers are drawn). Returns ``p``.
    """
    with torch.no_grad():
        _check(lr, noise)
        ps, gs = ([p], [grad]) if isinstance(p, torch.Tensor) else (list(p), list(grad))
        if len(ps) != len(gs):
            raise ValueError(f"{len(ps)} tensors but {len(gs)} gradients")
        if not ps:
            return p
        torch._foreach_add_(ps, gs, alpha=-lr)
        if noise > 0:
            first = ps[0]
            flat = gaussian_like(torch.empty(sum(q.numel() for q in ps), dtype=first.dtype, device=first.device),
                                 generator)
            xi = [z.view_as(q) for z, q in zip(flat.split([q.numel() for q in ps]), ps)]
            torch._foreach_add_(ps, xi, alpha=math.sqrt(2.0 * lr) * noise)
        return p


class SGLD(torch.optim.Optimizer):
    """SGLD on every parameter: ``θ ← θ − lr·(g + λθ) + √(2·lr)·noise·ξ`` (λ: weight decay, a
    Gaussian prior). The closure, if given, is evaluated once and its loss returned."""

    def __init__(self, params, lr: float = 1e-3, noise: float = 1.0, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None):
        _check(lr, noise)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, noise=noise, weight_decay=weight_decay))
        self.generator = generator

    def step(self, closure=None):
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                gs = [p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                      for p in ps]
                sgld_step_(ps, gs, group["lr"], group["noise"], self.generator)
            return loss
