"""Constrained Langevin dynamics: c-CoLA, o-CoLA, C-SGD and C-SGLD as one ``torch.optim.Optimizer``.

Leimkuhler, Pouchon, Vlaar, Storkey, "Better training using weight-constrained stochastic
dynamics" (ICML 2021) and "Constraint-based regularization of neural networks" (arXiv
2006.10114); official code ``TiffanyVlaar/ConstrainedNNtraining`` (``cCoLAud``, ``oCoLAud``).

Every param group carries its own **constraint** (``None``, or a manifold of
:mod:`landscape_lib.manifolds`: circle, sphere, Stiefel), so a group is *(parameters,
constraint)*; the rest of the group's settings (``lr``, ``momentum``, ``temperature``,
``weight_decay``, ``dynamics``) are the familiar ones. The constraint ``g(q) = 0`` is exact after
every step (SHAKE solved to tolerance), and the invariant measure of the continuous dynamics is
the Gibbs density ``∝ exp(−L(θ)/τ)`` restricted to the manifold.

**Units.** The optimizer uses PyTorch's SGD *buffer* units, so that the unconstrained scheme at
``τ = 0`` is ``torch.optim.SGD(lr, momentum)`` step for step (a unit test checks it). In the
velocity units of the circle code (``p ← c p − h g̃``, ``θ ← θ + h p``, ``c = e^{−γh}``) this is
``lr = h²`` and ``momentum = c``, with ``p = −h·buf``; the temperature ``τ`` is then the kinetic
temperature of ``p`` (and the Gibbs temperature of the mean training loss).

**Underdamped step** (``dynamics="underdamped"``, c-CoLA-ud / o-CoLA-ud; ``Π_q`` is the tangent
projection at ``q``, ``f = ∇L + λ_wd θ`` the force lifted to the constrained coordinates ``q``):

.. math::
    \\text{O:}\\; b &\\leftarrow Π_q\\big(μ b + \\sqrt{(1-μ^2)τ/\\mathrm{lr}}\\,R\\big), \\qquad
    \\text{B:}\\; b \\leftarrow Π_q(b + f), \\\\
    \\text{A (SHAKE):}\\; q' &= q - \\mathrm{lr}\\,b + ∇g(q)λ \\text{ with } g(q') = 0, \\qquad
    \\text{RATTLE:}\\; b \\leftarrow Π_{q'}\\big((q - q')/\\mathrm{lr}\\big).

**Overdamped step** (``dynamics="overdamped"``, c/o-CoLA-od; C-SGLD without momentum):
``q' = SHAKE(q, q − lr f + √(2 lr τ) R)``. With ``τ = 0`` the schemes are constrained SGD and
momentum SGD ("C-SGD"); with ``τ > 0`` they sample ("C-SGLD").

Divergence is detected: a non-finite gradient or weight, or a SHAKE solve that does not converge
(the step is too large for the constraint), raises :class:`landscape_lib.train.Diverged` naming
the step, the group and its hyperparameters.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from .. import manifolds
from ..train import Diverged

DYNAMICS = ("underdamped", "overdamped")


def _check_group(group: dict) -> None:
    lr, mu, tau, wd = group["lr"], group["momentum"], group["temperature"], group["weight_decay"]
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr (the step size) must be a positive number, got {lr!r}")
    if not (isinstance(mu, (int, float)) and 0 <= mu < 1):
        raise ValueError(f"momentum must lie in [0, 1) (momentum = exp(-γh)), got {mu!r}")
    if not (isinstance(tau, (int, float)) and tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"temperature (the noise level τ) must be >= 0, got {tau!r}")
    if not (isinstance(wd, (int, float)) and wd >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
    if group["dynamics"] not in DYNAMICS:
        raise ValueError(f"unknown dynamics {group['dynamics']!r}; valid choices: {', '.join(DYNAMICS)}")


class ConstrainedLangevin(torch.optim.Optimizer):
    """Constrained (stochastic) momentum SGD / Langevin dynamics with a constraint per group.

    ``constraint`` is ``None``/``"none"``, ``"circle"``, ``"sphere"``, ``"stiefel"`` (with
    ``radius=`` for circle and sphere) or a :class:`~landscape_lib.manifolds.Manifold`; each
    group may override it. Parameters are projected onto their manifold when the group is added
    (``init_project``). ``generator`` draws the noise (default: the global RNG).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, temperature: float = 0.0,
                 weight_decay: float = 0.0, dynamics: str = "underdamped", constraint=None,
                 radius: float | None = None, generator: torch.Generator | None = None):
        self.generator = generator
        self._steps = 0
        defaults = dict(lr=lr, momentum=momentum, temperature=temperature,
                        weight_decay=weight_decay, dynamics=dynamics, constraint=constraint,
                        radius=radius)
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        name, radius = group["constraint"], group["radius"]
        if isinstance(name, str) and name in ("circle", "sphere"):
            if radius is None:
                raise ValueError(f"the {name} constraint needs radius= (a positive number)")
            manifold = manifolds.make(name, r=radius)
        else:
            manifold = manifolds.make(name)
        group["manifold"] = manifold
        if manifold is None:
            return
        with torch.no_grad():
            for p in group["params"]:
                manifold.check(p)
                state = self.state[p]
                q = manifold.init_project(p, state)
                manifold.write(p, q, state)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype,
                           device=self.generator.device).to(like.device)

    def _diverged(self, i: int, group: dict, what: str, err: Exception | None = None) -> Diverged:
        hyper = {k: group[k] for k in ("lr", "momentum", "temperature", "weight_decay", "dynamics")}
        return Diverged(f"{type(self).__name__} diverged at step {self._steps}, param group {i} "
                        f"({group['manifold']!r}): {what}; hyperparameters {hyper}. "
                        "Try a smaller lr.")

    def step(self, closure: Callable | None = None):
        """One step of every group; ``closure`` re-evaluates the loss (returned)."""
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._steps += 1
            for i, group in enumerate(self.param_groups):
                lr, mu, tau = group["lr"], group["momentum"], group["temperature"]
                wd, manifold = group["weight_decay"], group["manifold"]
                under = group["dynamics"] == "underdamped"
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad
                    if not torch.isfinite(g).all():
                        raise self._diverged(i, group, "non-finite gradient")
                    if wd:
                        g = g.add(p, alpha=wd)
                    state = self.state[p]
                    if manifold is None:
                        self._free_step(p, g, state, lr, mu, tau, under)
                        continue
                    q = manifold.coords(p, state)
                    f = manifold.lift(g)
                    if under:
                        buf = state.get("momentum_buffer")
                        buf = torch.zeros_like(q) if buf is None else buf
                        buf = buf.mul(mu)                                      # O
                        if tau > 0:  # (without noise μ·b is tangent already: b is RATTLE's)
                            buf.add_(self._noise(q), alpha=math.sqrt((1 - mu * mu) * tau / lr))
                            buf = manifold.tangent(q, buf)
                        buf = manifold.tangent(q, buf + f)                     # B
                        trial = q - lr * buf                                   # A
                    else:
                        trial = q - lr * f
                        if tau > 0:
                            trial.add_(self._noise(q), alpha=math.sqrt(2 * lr * tau))
                    try:
                        q_new, iters = manifold.solve_position(q, trial)      # SHAKE
                    except manifolds.NotConverged as err:
                        raise self._diverged(i, group, str(err)) from err
                    if not torch.isfinite(q_new).all():
                        raise self._diverged(i, group, "non-finite weights")
                    if under:                                                  # RATTLE
                        state["momentum_buffer"] = manifold.tangent(q_new, (q - q_new) / lr)
                    state["shake_iters"] = iters
                    manifold.write(p, q_new, state)
            return loss

    def _free_step(self, p, g, state, lr, mu, tau, under):
        # unconstrained: exactly torch.optim.SGD(lr, momentum) at τ = 0
        if under and mu > 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(mu).add_(g)
            if tau > 0:
                buf.add_(self._noise(p), alpha=math.sqrt((1 - mu * mu) * tau / lr))
            p.add_(buf, alpha=-lr)
        else:
            p.add_(g, alpha=-lr)
            if tau > 0:
                p.add_(self._noise(p), alpha=math.sqrt((2 if not under else 1) * lr * tau))
        if not torch.isfinite(p).all():
            raise Diverged(f"{type(self).__name__} diverged at step {self._steps}: non-finite "
                           f"weights (lr={lr}, momentum={mu}, temperature={tau})")

    # --- monitors -----------------------------------------------------------------------------
    def residuals(self) -> list[dict]:
        """The constraint residual of every constrained parameter: ``group``, ``index``,
        ``shape``, ``constraint`` and ``residual`` (see each manifold's ``residual``)."""
        with torch.no_grad():
            out = []
            for i, group in enumerate(self.param_groups):
                m = group["manifold"]
                if m is None:
                    continue
                for j, p in enumerate(group["params"]):
                    out.append(dict(group=i, index=j, shape=tuple(p.shape), constraint=repr(m),
                                    residual=m.residual(m.coords(p, self.state[p]))))
            return out

    def max_residual(self) -> float:
        """The largest constraint residual over all constrained parameters (0 if none)."""
        return max((r["residual"] for r in self.residuals()), default=0.0)


def constrained_groups(model: nn.Module, constraint, *, radius=None, skip: Iterable[str] = (),
                       **group_options) -> list[dict]:
    """Param groups for ``model``: every weight with ``ndim ≥ 2`` whose name is not in ``skip``
    gets ``constraint`` (one group each, so that radii can differ), the rest (biases,
    normalisation parameters, skipped weights) one unconstrained group.

    ``radius`` is a number or a function ``radius(name, param) -> float`` (e.g. the card's
    ``κ/√fan_in`` with :func:`landscape_lib.manifolds.radius_by_fan_in`)."""
    skip = set(skip)
    names = {n for n, _ in model.named_parameters()}
    unknown = skip - names
    if unknown:
        raise ValueError(f"skip names {sorted(unknown)} are not parameters of the model; "
                         f"valid names: {', '.join(sorted(names))}")
    groups, free = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and name not in skip:
            r = radius(name, p) if callable(radius) else radius
            groups.append(dict(params=[p], constraint=constraint, radius=r, name=name, **group_options))
        else:
            free.append(p)
    if free:
        groups.append(dict(params=free, constraint=None, name="unconstrained", **group_options))
    return groups
