"""Padam: partially adaptive momentum estimation, GadamX's base optimizer.

**Padam** — partially adaptive momentum estimation (Chen & Gu, "Closing the Generalization Gap
of Adaptive Gradient Methods in Training Deep Neural Networks", IJCAI 2020, arXiv 1806.06763),
in the form used by GadamX (Granziol, Wan, Albanie, Roberts, "Iterative Averaging in the Quest
for Best Test Error", arXiv 2003.01247; official code ``diegogranziol/Gadam``,
``base_optimizers/padam.py``). For each parameter tensor, with gradient ``g_t``:

.. math::
    m_t &= β_1 m_{t-1} + (1 - β_1) g_t, \\qquad v_t = β_2 v_{t-1} + (1 - β_2) g_t^2, \\\\
    \\hat v_t &= \\max(\\hat v_{t-1}, v_t) \\quad \\text{(AMSGrad; } \\hat v_t = v_t \\text{ without it)}, \\\\
    θ_t &= θ_{t-1}(1 - ηλ) - η\\,\\frac{\\sqrt{1 - β_2^t}}{1 - β_1^t}\\;
          \\frac{m_t}{(\\sqrt{\\hat v_t} + ε)^{2p}} .

``p`` (``partial``) interpolates between SGD with momentum (``p = 0``, up to the bias
correction) and Adam/AMSGrad (``p = ½``); GadamX uses ``p = 1/8`` (the code's ``--partial
0.125``; its ``Padam`` class defaults to 1/4). As in the official code the denominator is
``(√v̂ + ε)`` raised to ``2p`` and the bias correction ``√(1 − β_2^t)`` is applied to the step
size whatever ``p`` is. The weight decay ``λ`` is *decoupled* (``θ ← θ(1 − ηλ)`` before the
update, as ``AdamW``) by default, which is what GadamX uses; ``decoupled_weight_decay=False``
adds ``λθ`` to the gradient instead (L2, plain Padam). With ``p = ½`` and ``ε = 0`` Padam is
exactly ``torch.optim.AdamW`` (or ``Adam``) with ``amsgrad=amsgrad``.
"""
from __future__ import annotations

import math

import torch


class Padam(torch.optim.Optimizer):
    """Partially adaptive Adam with AMSGrad and decoupled weight decay (GadamX's base optimizer).

    Defaults follow the GadamX code: ``lr=0.1``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``partial=1/8``, ``amsgrad=True``, decoupled weight decay.
    """

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, partial: float = 0.125,
                 amsgrad: bool = True, decoupled_weight_decay: bool = True):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        if not 0.0 <= partial <= 0.5:
            raise ValueError(f"partial must lie in [0, 0.5] (0: SGD-like, 0.5: Adam), got {partial}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        partial=partial, amsgrad=bool(amsgrad),
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults)

    def step(self, closure=None):
        """One Padam step; ``closure`` re-evaluates the loss (returned)."""
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
                wd, partial = group["weight_decay"], group["partial"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if grad.is_sparse:
                        raise RuntimeError("Padam does not support sparse gradients")
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = torch.zeros_like(p)
                    # decoupled decay θ ← θ(1 − ηλ), or L2: g ← g + λθ
                    if wd != 0:
                        if group["decoupled_weight_decay"]:
                            p.mul_(1.0 - lr * wd)
                        else:
                            grad = grad.add(p, alpha=wd)
                    state["step"] += 1
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    # m_t, v_t: exponential moving averages of g and g²
                    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    if group["amsgrad"]:
                        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                        v_hat = state["max_exp_avg_sq"]
                    else:
                        v_hat = v
                    # θ ← θ − η √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v̂ + ε)^{2p}
                    denom = (v_hat.sqrt() + eps).pow(2.0 * partial)
                    step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                    p.addcdiv_(m, denom, value=-step_size)
            return loss
