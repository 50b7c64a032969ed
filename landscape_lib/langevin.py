"""Training as sampling: a splitting integrator over param groups (LaLa, AdLaLa, LOL, heavy ball).

Leimkuhler, Matthews, Vlaar, "Partitioned integrators for thermodynamic parameterization of
neural networks", Foundations of Data Science 1(4), 2019 (arXiv 1908.11843); official code
``TiffanyVlaar/ThermodynamicParameterizationOfNNs`` (``Optimizer_AdLaLa.py``).

Every parameter block (a param group) follows its own stochastic dynamics. Langevin (La):

.. math::
    dθ = p\\,dt, \\qquad dp = -∇L\\,dt - γ p\\,dt + \\sqrt{2γτ}\\,dW ,

and Adaptive Langevin (AdLa, a stochastic-gradient Nosé–Hoover thermostat) for a tensor of
``N`` scalars, whose friction ξ adapts until the kinetic energy sits at ``Nτ/2`` whatever the
(unknown) gradient noise:

.. math::
    dθ = p\\,dt, \\qquad dp = -∇L\\,dt - ξ p\\,dt + σ_A\\,dW, \\qquad dξ = ε\\,(p^⊤p - Nτ)\\,dt .

The dynamics are split into exactly solvable sub-steps of length ``t`` (a fraction of ``h``):

==========  ====================================================  ============================
letter      update                                                 name
==========  ====================================================  ============================
``A``       θ ← θ + t p                                            drift
``B``       p ← p − t g̃(θ)                                         kick (minibatch gradient)
``O``       p ← e^{−γt} p + √(τ(1 − e^{−2γt})) R                   Ornstein–Uhlenbeck
``O∞``      p ← √τ R                                               overdamped limit γ → ∞
``C``       p ← e^{−ξt} p                                          thermostat friction
``D``       p ← p + σ_A √t R                                       additive noise
``E``       ξ ← ξ + t ε (p^⊤p − Nτ)                                thermostat update
==========  ====================================================  ============================

A group's **scheme** is the string of sub-steps between two gradient evaluations, beginning and
ending with the kick ``B``: e.g. ``"BAOAB"`` (Langevin, BAOAB), ``"BACDEDCAB"`` (Adaptive
Langevin as the official code: A C D E D C A with the two E half-steps merged into one E_h),
``"BAO∞AB"`` (overdamped Langevin, the LOL scheme's second block). Each letter's length is
``h`` divided by how often it occurs, so ``"BAOAB"`` is B_{h/2} A_{h/2} O_h A_{h/2} B_{h/2}.

**One gradient per step.** The trailing B_{h/2} of one step and the leading B_{h/2} of the next
use the same gradient, so they merge into one B_h. In PyTorch's order (``zero_grad → backward
→ step``: the gradient is already at the current θ), :meth:`SplittingOptimizer.step` does the
kick B_h — on the very first call the one-off initial half-kick B_{h/2} from p = 0 (the
official code's ``stepMom``) — and then the rest of the scheme (``AOA``, ``ACDEDCA``, ...). The
positions are exactly those of the official loop (``stepAOA``, forward, backward, ``stepB``).

**Named schemes** (:data:`SCHEMES`): ``"la"`` (BAOAB), ``"adla"`` (BACDEDCAB), ``"overdamped"``
(BAO∞AB) and ``"heavy_ball"`` (BAOAB at τ = 0: p ← e^{−γh} p, plain momentum SGD). The paper's
methods are partitions into such groups: LaLa = La everywhere; AdLaLa = AdLa on the input layer,
La elsewhere; LOL = La on one block, overdamped on the other (:func:`partition`).

**Thermostats.** ξ is one scalar per parameter *tensor*, with N = that tensor's number of
elements, as the official code does (weight and bias have separate thermostats). With
``replica_dims = 1`` the leading dimension of every tensor indexes independent replicas (the
seeds of a batched model, :class:`~landscape_lib.models.Stacked`): then ξ has one entry per
replica and N counts the elements of one replica. ``state[p]["xi"]`` holds it; the group's
``thermostat`` entry says where it lives ("one ξ per tensor", "one ξ per replica of each
tensor", or None for a group without E).

**Kinetic temperature** of a tensor: T = p^⊤p / N. It is recorded (``state[p]["kinetic"]``) at
the point where the thermostat acts: at the (first) E sub-step for AdLa, right after the
(first) O or O∞ for Langevin groups, after the kick otherwise. Measured after the full kick the
AdLa tensors read several times τ (the card's pitfall); at the E-step the thermostat pins them
to τ. :class:`TemperatureMonitor` collects these per step, with the ξ traces.

**Units.** ``lr`` in a group *is* the step size h (so schedulers scale h, as in the official
code's ``lr=h``). :func:`to_sgd` / :func:`from_sgd` convert between (h, γ, τ) and PyTorch SGD's
(lr, momentum): at τ = 0 BAOAB is ``v ← c v − h g``, ``θ ← θ + h(1 + c)/2 · v`` with
c = e^{−γh}, i.e. exactly ``torch.optim.SGD(lr = h²(1 + c)/2, momentum = c)`` (with the
initial kick a full B_h, ``initial_kick="full"``; the default half-kick halves the first step).

**Constraints** (chapter 17) compose per group through the group key ``constraint``: an object
with ``project_position(param, momentum, t)`` (called after every A sub-step of length ``t``,
in place: the SHAKE position solve, which may also correct ``momentum`` by the same constraint
force, p ← p + (θ_projected − θ_drifted)/t) and ``project_momentum(param, momentum)`` (after every
sub-step that changes the momentum, in place: the RATTLE tangent projection), or ``None`` (the
default). ``momentum`` is a view of the optimizer's buffer: modify it in place.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

SUBSTEPS = ("A", "B", "O", "O∞", "C", "D", "E")
SCHEMES = {"la": "BAOAB", "adla": "BACDEDCAB", "overdamped": "BAO∞AB", "heavy_ball": "BAOAB"}
INITIAL_KICKS = ("half", "full")
_TOKEN = re.compile(r"O∞|Oinf|[A-Z]")


def parse_scheme(scheme: str) -> tuple[tuple[str, float], ...]:
    """A scheme string (or a name in :data:`SCHEMES`) as ``((letter, fraction of h), ...)``.

    ``"O∞"`` may be written ``"Oinf"``. The scheme must begin and end with ``B`` and hold no
    other ``B`` (one gradient per step)."""
    if not isinstance(scheme, str):
        raise ValueError(f"scheme must be a string, got {type(scheme).__name__}")
    text = SCHEMES.get(scheme.lower(), scheme)
    raw = _TOKEN.findall(text)
    if "".join(raw) != text or not raw:
        raise ValueError(f"cannot read scheme {scheme!r}; write it with the sub-steps "
                         f"{', '.join(SUBSTEPS)} (e.g. 'BAOAB') or name one of "
                         f"{', '.join(SCHEMES)}")
    tokens = ["O∞" if t == "Oinf" else t for t in raw]
    bad = [t for t in tokens if t not in SUBSTEPS]
    if bad:
        raise ValueError(f"unknown sub-step {bad[0]!r} in scheme {scheme!r}; valid sub-steps: "
                         f"{', '.join(SUBSTEPS)}; named schemes: {', '.join(SCHEMES)}")
    if len(tokens) < 2 or tokens[0] != "B" or tokens[-1] != "B" or tokens.count("B") != 2:
        raise ValueError(f"scheme {scheme!r} must begin and end with the kick B and have no other B "
                         "(one gradient per step), e.g. 'BAOAB' or 'BACDEDCAB'")
    counts = {t: tokens.count(t) for t in tokens}
    return tuple((t, 1.0 / counts[t]) for t in tokens)


# --- units -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SGDUnits:
    """PyTorch SGD's units: ``buf ← momentum·buf + g``, ``θ ← θ − lr·buf``, plus the standard
    deviation ``noise`` of Gaussian noise added to ``buf`` per step (0 at τ = 0)."""
    lr: float
    momentum: float
    noise: float = 0.0


@dataclass(frozen=True)
class LangevinUnits:
    """Step size ``h``, friction ``gamma`` and temperature ``tau``."""
    h: float
    gamma: float
    tau: float = 0.0


def _check_h_gamma_tau(h, gamma, tau):
    if not (isinstance(h, (int, float)) and h > 0 and math.isfinite(h)):
        raise ValueError(f"step size h must be a positive number, got {h!r}")
    if not (isinstance(gamma, (int, float)) and gamma >= 0):
        raise ValueError(f"friction gamma must be >= 0 (math.inf: overdamped), got {gamma!r}")
    if not (isinstance(tau, (int, float)) and tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"temperature tau must be >= 0, got {tau!r}")


def to_sgd(h: float, gamma: float, tau: float = 0.0) -> SGDUnits:
    """(h, γ, τ) of BAOAB → SGD's (lr, momentum, noise).

    With c = e^{−γh} and velocity v (after the kick), BAOAB is ``v ← c v − h g``,
    ``θ ← θ + h(1 + c)/2 · v``. Writing buf = −v/h gives ``buf ← c buf + g``,
    ``θ ← θ − h²(1 + c)/2 · buf``: lr = h²(1 + c)/2, momentum = c. The O-step's noise
    √(τ(1 − c²)) R on p is noise of standard deviation √(τ(1 − c²))/h on buf.
    """
    _check_h_gamma_tau(h, gamma, tau)
    c = math.exp(-gamma * h)
    return SGDUnits(lr=h * h * (1 + c) / 2, momentum=c, noise=math.sqrt(tau * (1 - c * c)) / h)


def from_sgd(lr: float, momentum: float, noise: float = 0.0) -> LangevinUnits:
    """SGD's (lr, momentum, noise) → (h, γ, τ) of BAOAB, the inverse of :func:`to_sgd`
    (momentum 0 is γ = ∞, the overdamped limit)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    c = float(momentum)
    h = math.sqrt(2 * lr / (1 + c))
    gamma = math.inf if c == 0 else -math.log(c) / h
    tau = (noise * h) ** 2 / (1 - c * c)
    return LangevinUnits(h=h, gamma=gamma, tau=tau)


# --- the optimizer ---------------------------------------------------------------------------

class SplittingOptimizer(torch.optim.Optimizer):
    """A splitting integrator whose param groups each carry a scheme over A, B, O, O∞, C, D, E.

    Group keys (constructor arguments are the defaults): ``scheme`` (a string or a name in
    :data:`SCHEMES`), ``lr`` = the step size h (``h=`` in the constructor), ``tau`` (τ ≥ 0),
    ``gamma`` (γ ≥ 0, for O), ``sigma`` (σ_A ≥ 0, for D), ``eps`` (ε ≥ 0, for E), ``xi0`` (the
    thermostats' initial value), ``replica_dims`` (0 or 1: leading dimensions that index
    independent replicas), ``initial_kick`` ("half": B_{h/2}, the integrator's; "full": B_h,
    which makes the τ = 0 scheme exactly SGD) and ``constraint`` (None, or an object with
    ``project_position`` / ``project_momentum``; see the module docstring). A group given
    ``h=`` instead of ``lr=`` has it renamed. The named scheme ``"heavy_ball"`` sets τ = 0.

    Defaults are the official spiral settings: h = 0.25, τ = 1e-4, γ = 0.1, σ_A = 0.01,
    ε = 0.05, ξ₀ = 0.1. ``generator`` draws the noise (default: the global RNG).
    ``record_temperature=False`` skips the kinetic-temperature probe of groups without a
    thermostat (their p^⊤p, one reduction per step); thermostatted groups always have it.

    **State.** ``state[p]``: ``momentum`` (p, same shape as the tensor), ``xi`` (its thermostat:
    a scalar, or one per replica), ``kinetic`` (the
    latest T = p^⊤p/N at the measuring sub-step), ``n_per_replica`` (N).
    """

    def __init__(self, params, h: float = 0.25, *, scheme: str = "la", tau: float = 1e-4,
                 gamma: float = 0.1, sigma: float = 0.01, eps: float = 0.05, xi0: float = 0.1,
                 replica_dims: int = 0, initial_kick: str = "half", constraint=None,
                 generator: torch.Generator | None = None, record_temperature: bool = True):
        defaults = dict(lr=h, scheme=scheme, tau=tau, gamma=gamma, sigma=sigma, eps=eps, xi0=xi0,
                        replica_dims=replica_dims, initial_kick=initial_kick, constraint=constraint)
        self._check(defaults, "defaults")
        self.generator = generator
        self.record_temperature = bool(record_temperature)
        self.steps = 0
        self._cache: dict[int, dict] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "h" in param_group:
            if "lr" in param_group:
                raise ValueError("give a group either h or lr (they are the same step size), not both")
            param_group = dict(param_group)
            param_group["lr"] = param_group.pop("h")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if str(group["scheme"]).lower() == "heavy_ball":
            group["tau"] = 0.0
        self._check(group, f"param group {len(self.param_groups) - 1}")
        group["substeps"] = parse_scheme(group["scheme"])
        group["thermostat"] = (None if all(t != "E" for t, _ in group["substeps"]) else
                               "one ξ per replica of each tensor" if group["replica_dims"]
                               else "one ξ per tensor")

    @staticmethod
    def _check(g: dict, where: str) -> None:
        try:
            _check_h_gamma_tau(g["lr"], g["gamma"], g["tau"])
            parse_scheme(g["scheme"])
            for key in ("sigma", "eps"):
                if not (isinstance(g[key], (int, float)) and g[key] >= 0):
                    raise ValueError(f"{key} must be >= 0, got {g[key]!r}")
            if g["replica_dims"] not in (0, 1):
                raise ValueError(f"replica_dims must be 0 or 1, got {g['replica_dims']!r}")
            if g["initial_kick"] not in INITIAL_KICKS:
                raise ValueError(f"unknown initial_kick {g['initial_kick']!r}; valid choices: "
                                 f"{', '.join(INITIAL_KICKS)}")
            c = g["constraint"]
            if c is not None and not (callable(getattr(c, "project_position", None))
                                      and callable(getattr(c, "project_momentum", None))):
                raise ValueError("a constraint needs project_position(param, momentum, t) and "
                                 "project_momentum(param, momentum) methods (or None)")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def hyperparameters(self) -> list[dict]:
        """Each group's scheme and hyperparameters (for messages and provenance)."""
        return [{"scheme": g["scheme"], "h": g["lr"], "tau": g["tau"], "gamma": g["gamma"],
                 "sigma": g["sigma"], "eps": g["eps"]} for g in self.param_groups]

    def _flat(self, gi: int, group: dict) -> dict:
        """The group's momenta as one flat buffer (per-tensor views of it are ``state[p]``'s
        ``momentum``), its thermostats ξ as one vector (views: ``state[p]["xi"]``) and the
        per-element index of the thermostat (or temperature probe) each element belongs to.
        Elementwise sub-steps then cost one operation per group, not one per tensor. Rebuilt
        from the per-tensor state when that is no longer a view of the buffer (after
        ``load_state_dict``)."""
        params = group["params"]
        cache = self._cache.get(gi)
        if cache is not None and cache["params"] == [id(p) for p in params]:
            st0 = self.state.get(params[0], {})
            if st0.get("momentum") is cache["views"][0] and \
                    st0["momentum"].data_ptr() == cache["views"][0].data_ptr():
                return cache
        p0 = params[0]
        if any(p.dtype != p0.dtype or p.device != p0.device for p in params):
            raise ValueError("every tensor of a param group must have the same dtype and device")
        rd = group["replica_dims"]
        has_e = any(t == "E" for t, _ in group["substeps"])
        old = [self.state[p].get("momentum") for p in params]
        first = any(m is None for m in old)
        flat = (torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
                if first else torch.cat([m.reshape(-1) for m in old]))
        views, ids, counts, xi_old, offset, j = [], [], [], [], 0, 0
        for p in params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
            k = p.shape[0] if rd else 1
            per = p.numel() // k
            ids.append(torch.arange(j, j + k, device=p.device).repeat_interleave(per))
            counts += [per] * k
            st = self.state[p]
            xi_old.append(st["xi"].reshape(-1) if "xi" in st else
                          torch.full((k,), float(group["xi0"]), dtype=p.dtype, device=p.device))
            j += k
        xi = torch.cat(xi_old) if has_e else None
        kinetic = torch.full((j,), float("nan"), dtype=p0.dtype, device=p0.device)
        j = 0
        for p, v in zip(params, views):
            k = p.shape[0] if rd else 1
            st = self.state[p]
            st["momentum"] = v
            st["n_per_replica"] = p.numel() // k
            st["kinetic"] = kinetic[j:j + k] if rd else kinetic[j]
            if has_e:
                st["xi"] = xi[j:j + k] if rd else xi[j]
            j += k
        cache = dict(params=[id(p) for p in params], flat=flat, views=views, xi=xi,
                     ids=torch.cat(ids), counts=torch.tensor(counts, dtype=p0.dtype,
                                                           device=p0.device),
                     kinetic=kinetic, first=first)
        self._cache[gi] = cache
        return cache

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype,
                           device=like.device)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Kick with the current gradient (B_h; B_{h/2} from p = 0 on the first call), then the
        rest of each group's scheme. ``closure`` (optional) computes the gradient first."""
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.steps += 1
            for gi, group in enumerate(self.param_groups):
                if not group["params"]:
                    continue
                c = self._flat(gi, group)
                h, tau, gamma = group["lr"], group["tau"], group["gamma"]
                sigma, eps = group["sigma"], group["eps"]
                constraint, subs = group["constraint"], group["substeps"]
                flat, views, ids, xi = c["flat"], c["views"], c["ids"], c["xi"]
                params = group["params"]
                measure = ("E" if xi is not None else
                           "O" if any(t in ("O", "O∞") for t, _ in subs) else "B")
                record = self.record_temperature or measure == "E"

                def sq():  # p^T p per thermostat / probe
                    return torch.zeros_like(c["counts"]).index_add_(0, ids, flat * flat)

                # B: the merged kick (trailing B_{h/2} + leading B_{h/2}), or the initial one
                kick = h / 2 if (c["first"] and group["initial_kick"] == "half") else h
                c["first"] = False
                with_grad = [(v, p.grad) for v, p in zip(views, params) if p.grad is not None]
                if with_grad:
                    torch._foreach_add_([v for v, _ in with_grad], [g for _, g in with_grad],
                                        alpha=-kick)
                if constraint is not None:
                    for p, v in zip(params, views):
                        constraint.project_momentum(p, v)
                measured = False
                if measure == "B" and record:
                    torch.div(sq(), c["counts"], out=c["kinetic"])
                for letter, frac in subs[1:-1]:
                    t = frac * h
                    if letter == "A":
                        torch._foreach_add_(params, views, alpha=t)
                        if constraint is not None:
                            for p, v in zip(params, views):
                                constraint.project_position(p, v, t)
                        continue
                    if letter == "O":
                        damp = math.exp(-gamma * t)
                        flat.mul_(damp).add_(self._noise(flat), alpha=math.sqrt(tau * (1 - damp * damp)))
                    elif letter == "O∞":
                        flat.copy_(self._noise(flat)).mul_(math.sqrt(tau))
                    elif letter == "C":
                        flat.mul_(torch.exp(xi * -t)[ids])
                    elif letter == "D":
                        flat.add_(self._noise(flat), alpha=sigma * math.sqrt(t))
                    elif letter == "E":
                        s2 = sq()
                        if not measured:
                            torch.div(s2, c["counts"], out=c["kinetic"])
                            measured = True
                        xi.add_(s2 - c["counts"] * tau, alpha=t * eps)
                        continue
                    if constraint is not None:
                        for p, v in zip(params, views):
                            constraint.project_momentum(p, v)
                    if measure == "O" and letter in ("O", "O∞") and not measured and record:
                        torch.div(sq(), c["counts"], out=c["kinetic"])
                        measured = True
            return loss


# --- partitions ------------------------------------------------------------------------------

def partition(model: nn.Module, rules: Sequence[tuple[str, Mapping]] | Mapping[str, Mapping],
              default: Mapping | None = None) -> list[dict]:
    """Param groups by parameter name: ``rules`` maps a glob pattern (``"fc1.*"``) to group
    settings; a parameter joins the first rule it matches, or ``default`` (an error if a
    parameter matches nothing and there is no default). Each group gets a ``name``."""
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    groups = [dict(settings, params=[], name=pattern) for pattern, settings in items]
    rest = dict(default or {}, params=[], name="rest")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for (pattern, _), g in zip(items, groups):
            if fnmatch(name, pattern):
                g["params"].append(p)
                break
        else:
            if default is None:
                raise ValueError(f"parameter {name!r} matches no rule ({', '.join(p for p, _ in items)}) "
                                 "and no default was given")
            rest["params"].append(p)
    empty = [g["name"] for g in groups if not g["params"]]
    if empty:
        names = ", ".join(n for n, _ in model.named_parameters())
        raise ValueError(f"rule(s) {', '.join(empty)} match no parameter; parameters: {names}")
    return groups + ([rest] if rest["params"] else [])


def adlala(model: nn.Module, first: str, *, h: float = 0.25, tau: float = 1e-4,
           gamma: float = 0.1, sigma: float = 0.01, eps: float = 0.05, xi0: float = 0.1,
           replica_dims: int = 0, **kw) -> SplittingOptimizer:
    """AdLaLa: Adaptive Langevin on the parameters matching ``first`` (a glob, e.g. the input
    layer ``"fc1.*"``), Langevin (BAOAB) on the rest; the official spiral defaults."""
    groups = partition(model, {first: dict(scheme="adla")}, default=dict(scheme="la"))
    return SplittingOptimizer(groups, h, tau=tau, gamma=gamma, sigma=sigma, eps=eps, xi0=xi0,
                              replica_dims=replica_dims, **kw)


def lala(model: nn.Module, *, h: float = 0.25, tau: float = 1e-4, gamma: float = 0.1,
         replica_dims: int = 0, **kw) -> SplittingOptimizer:
    """LaLa: Langevin (BAOAB) on every parameter, one group per layer (per-layer τ, γ can be
    set on the returned groups)."""
    from .params import layer_groups

    named = dict(model.named_parameters())
    groups = [dict(params=[named[n] for n in names], name=layer, scheme="la")
              for layer, names in layer_groups(model).items()]
    return SplittingOptimizer(groups, h, tau=tau, gamma=gamma, replica_dims=replica_dims, **kw)


def lol(model: nn.Module, first: str, *, h: float = 0.25, tau: float = 1e-4, gamma: float = 0.1,
        replica_dims: int = 0, **kw) -> SplittingOptimizer:
    """LOL: Langevin on the parameters matching ``first``, overdamped Langevin (O∞) on the rest."""
    groups = partition(model, {first: dict(scheme="la")}, default=dict(scheme="overdamped"))
    return SplittingOptimizer(groups, h, tau=tau, gamma=gamma, replica_dims=replica_dims, **kw)


def heavy_ball(model: nn.Module, *, h: float = 0.25, gamma: float = 0.1, replica_dims: int = 0,
               **kw) -> SplittingOptimizer:
    """Heavy-ball momentum SGD as the τ = 0 BAOAB scheme (= SGD with :func:`to_sgd`'s units)."""
    return SplittingOptimizer(model.parameters(), h, scheme="heavy_ball", tau=0.0, gamma=gamma,
                              replica_dims=replica_dims, **kw)


# --- monitors --------------------------------------------------------------------------------

class TemperatureMonitor:
    """Per-step traces of each tensor's kinetic temperature (measured where its thermostat acts)
    and of its ξ, for a :class:`SplittingOptimizer`; pass :meth:`hook` to ``train.fit``'s
    ``on_step`` (or call :meth:`record` after each ``step``).

    ``names`` labels the tensors (default ``group<i>.<j>``); ``every`` thins the traces.
    Traces are arrays of shape [steps] or [steps, replicas].
    """

    def __init__(self, optimizer: SplittingOptimizer, names: Mapping[int, str] | None = None,
                 every: int = 1):
        if not isinstance(optimizer, SplittingOptimizer):
            raise TypeError(f"TemperatureMonitor needs a SplittingOptimizer, got {type(optimizer).__name__}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.optimizer, self.every = optimizer, every
        self.labels: dict[str, tuple[int, torch.Tensor]] = {}
        for gi, g in enumerate(optimizer.param_groups):
            for j, p in enumerate(g["params"]):
                label = (names or {}).get(id(p)) or f"{g.get('name', f'group{gi}')}.{j}"
                self.labels[label] = (gi, p)
        self.steps: list[int] = []
        self._kinetic: dict[str, list] = {k: [] for k in self.labels}
        self._xi: dict[str, list] = {k: [] for k in self.labels
                                    if any(t == "E" for t, _ in optimizer.param_groups[self.labels[k][0]]["substeps"])}

    @classmethod
    def for_model(cls, optimizer: SplittingOptimizer, model: nn.Module, every: int = 1):
        """A monitor whose tensors are labelled by the model's parameter names."""
        return cls(optimizer, {id(p): n for n, p in model.named_parameters()}, every)

    def record(self, step: int | None = None) -> None:
        step = self.optimizer.steps if step is None else step
        if step % self.every:
            return
        self.steps.append(step)
        for k, (gi, p) in self.labels.items():
            st = self.optimizer.state.get(p, {})
            self._kinetic[k].append(st["kinetic"].detach().clone() if "kinetic" in st else None)
            if k in self._xi:
                self._xi[k].append(st["xi"].detach().clone() if "xi" in st else None)

    def hook(self, step: int, model, optimizer) -> None:
        """``train.fit`` ``on_step`` hook."""
        self.record(step)

    def tau(self, label: str) -> float:
        return float(self.optimizer.param_groups[self.labels[label][0]]["tau"])

    @staticmethod
    def _stack(values: list) -> torch.Tensor:
        vals = [v for v in values if v is not None]
        if not vals:
            raise ValueError("nothing recorded yet")
        return torch.stack(vals).cpu()

    def kinetic(self, label: str) -> torch.Tensor:
        """T(t) of one tensor: [steps] or [steps, replicas]."""
        return self._stack(self._kinetic[label])

    def xi(self, label: str) -> torch.Tensor:
        """ξ(t) of one thermostatted tensor."""
        if label not in self._xi:
            raise KeyError(f"{label!r} has no thermostat; thermostatted tensors: {', '.join(self._xi)}")
        return self._stack(self._xi[label])

    def ratios(self, burn_in: float = 0.5) -> dict[str, torch.Tensor]:
        """Time-averaged T/τ per tensor over the steps after the first ``burn_in`` fraction
        (a scalar, or one value per replica)."""
        if not 0 <= burn_in < 1:
            raise ValueError(f"burn_in must lie in [0, 1), got {burn_in}")
        out = {}
        for k in self.labels:
            tau = self.tau(k)
            if tau <= 0:
                continue
            t = self.kinetic(k)
            out[k] = t[int(burn_in * len(t)):].mean(0) / tau
        return out
