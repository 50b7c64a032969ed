"""Multirate SGD: fast parameters step every batch, slow ones take a fresh gradient every k.

Vlaar & Leimkuhler, "Multirate training of neural networks", ICML 2022 (PMLR 162:22342–22360);
official code ``TiffanyVlaar/MultirateTrainingOfNNs`` (``Optimizer_multirate.py``).

The parameters are split into a **fast** part θ_F and a **slow** part θ_S. With SGD with
momentum µ as the base and the optimizer's ``lr`` = h/k (as in the official code), one *cycle* of
``k`` batches is (Algorithm 1, linear drift):

.. math::
    p_S &\\leftarrow µ\\,p_S + ∇_{θ_S} L_{B_1}(θ) \\quad\\text{(slow gradient: once per cycle)}\\\\
    \\text{for } i = 1..k:\\quad p_F &\\leftarrow µ\\,p_F + ∇_{θ_F} L_{B_i}(θ), \\qquad
    θ_F \\leftarrow θ_F - \\mathrm{lr}\\,p_F, \\qquad θ_S \\leftarrow θ_S - \\mathrm{lr}\\,p_S .

The slow part **drifts** along its frozen momentum between slow gradients (``drift=True``); with
``drift=False`` it moves once per cycle, ``θ_S ← θ_S − k·lr·p_S``, and stands still otherwise.
Either way the slow part's update per cycle is heavy ball with step ``k·lr``, so it is stable on a
quadratic of curvature λ only while ``k·lr·λ < 2(1 + µ)``: the largest stable learning rate
shrinks by k (:func:`stable_lr`).

**What this implementation does per batch** (one :meth:`MultirateSGD.step` per batch, the first
of every cycle *slow*): the slow step's single backward pass gives the gradients of both parts
on batch B_1, so a cycle costs one full backward plus ``k − 1`` backward passes through the fast
part only, and the fast part moves k times per cycle, as Algorithm 1. (The official code instead
spends the slow batch on the slow momentum alone: k − 1 fast moves per k batches.) With ``k = 1``
every step is slow and the optimizer *is* ``torch.optim.SGD(lr, momentum)``; the momentum
buffers start at the first gradient, as PyTorch's (the official ``initmom``).

**Cost.** On fast steps :func:`multirate_step` runs every module whose parameters are all slow
under ``torch.no_grad`` (when its input needs no gradient, i.e. a slow backbone before a fast
head), so the backward pass runs through the fast part only and the backbone's activations are
not stored. With backward ≈ 2 × forward and a small head a cycle costs ≈ ``(k + 2)/(3k)`` of
training everything (:func:`predicted_cost_ratio`; 0.47 at k = 5).

**Partitions** (:func:`partition`): ``"layer"`` (fast = layers by index among the modules that
hold parameters, default the last, the head), ``"name"`` (fast = parameters whose name starts with
one of the given prefixes) and ``"random"``: every element is slow with probability
``slow_fraction``, the mask redrawn at the start of every cycle from the optimizer's seeded
``generator`` (the paper's random-subgroup regulariser). A random partition needs the full
backward on every step (its slow elements share tensors with fast ones): it regularises, it
does not save compute.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

ROLES = ("fast", "slow", "random")
PARTITIONS = ("layer", "name", "random")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (slow steps every k batches) must be an integer >= 1 (1 = plain SGD), "
                         f"got {k!r}")
    return k


def predicted_cost_ratio(k: int, backward_over_forward: float = 2.0, head_fraction: float = 0.0) -> float:
    """Cost of a multirate cycle relative to training everything for ``k`` batches.

    A slow step costs forward ``F`` + full backward ``B``; a fast step ``F`` + the head's backward
    ``head_fraction·B``: ``(F + B + (k−1)(F + head_fraction·B)) / (k(F + B))``, which is
    ``(k + 2)/(3k)`` for ``B = 2F`` and a negligible head.
    """
    k = _check_k(k)
    f, b = 1.0, float(backward_over_forward)
    return (f + b + (k - 1) * (f + head_fraction * b)) / (k * (f + b))


def stable_lr(k: int, curvature: float, momentum: float = 0.9) -> float:
    """Largest stable ``lr`` of the slow part on a quadratic of curvature ``curvature``: per cycle
    it is heavy ball with step ``k·lr``, stable iff ``k·lr·λ < 2(1 + µ)``."""
    k = _check_k(k)
    if not curvature > 0:
        raise ValueError(f"curvature must be positive, got {curvature}")
    return 2.0 * (1.0 + momentum) / (k * curvature)


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that hold parameters of their own, in registration order (input to output for
    the book's models): the units of a ``by="layer"`` partition."""
    return [(n, m) for n, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def partition(model: nn.Module, by: str = "layer", *, fast=(-1,),
              slow_fraction: float = 0.5) -> list[dict]:
    """Param groups for :class:`MultirateSGD`.

    by="layer"
        ``fast`` holds indices into :func:`layers` (negative from the end; default ``(-1,)``, the
        head); the other layers are slow.
    by="name"
        ``fast`` holds name prefixes (``"out"``, ``"features.conv4"``, ``"out.weight"``); a
        parameter is fast when its dotted name equals a prefix or starts with ``prefix + "."``.
    by="random"
        One group with ``role="random"``: each element is slow with probability
        ``slow_fraction``, redrawn every cycle.
    """
    if by not in PARTITIONS:
        raise ValueError(f"unknown partition {by!r}; valid partitions: {', '.join(PARTITIONS)}")
    named = list(model.named_parameters())
    if by == "random":
        if not 0.0 <= slow_fraction <= 1.0:
            raise ValueError(f"slow_fraction must lie in [0, 1], got {slow_fraction}")
        return [{"params": [p for _, p in named], "role": "random", "slow_fraction": float(slow_fraction)}]
    if isinstance(fast, (str, int)):
        fast = (fast,)
    if by == "layer":
        units = layers(model)
        idx = set()
        for i in fast:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(units) <= i < len(units):
                raise ValueError(f"layer index {i!r} out of range: the model has {len(units)} layers "
                                 f"with parameters ({', '.join(n for n, _ in units)})")
            idx.add(i % len(units))
        fast_ids = {id(p) for j in idx for p in units[j][1].parameters(recurse=False)}
    else:
        names = [n for n, _ in named]
        for pre in fast:
            if not any(n == pre or n.startswith(pre + ".") for n in names):
                raise ValueError(f"no parameter named {pre!r} or under it; parameter names: "
                                 f"{', '.join(names)}")
        fast_ids = {id(p) for n, p in named
                    if any(n == pre or n.startswith(pre + ".") for pre in fast)}
    groups = [{"params": [p for _, p in named if id(p) in fast_ids], "role": "fast"},
              {"params": [p for _, p in named if id(p) not in fast_ids], "role": "slow"}]
    if not groups[0]["params"] or not groups[1]["params"]:
        raise ValueError(f"partition by {by} with fast={tuple(fast)} leaves the "
                         f"{'fast' if not groups[0]['params'] else 'slow'} part empty")
    return groups


class MultirateSGD(torch.optim.Optimizer):
    """SGD with momentum whose param groups are ``role="fast"``, ``"slow"`` or ``"random"``.

    One :meth:`step` per batch; every ``k``-th step (the first of each cycle, see
    :attr:`next_is_slow`) is a slow step and needs the gradients of all parameters; the other
    steps read only the fast parameters' gradients (and, in a random group, those of the
    elements that are fast this cycle). ``lr`` is h/k and acts on both parts (the official
    code's convention); ``weight_decay`` adds ``λθ`` to a gradient wherever one is used.
    ``generator`` draws the random partitions' masks (default: seeded from the global RNG).
    Counters: ``slow_steps`` (= full backward passes needed) and ``fast_steps``. A group without
    a ``role`` is fast, so ``MultirateSGD(model.parameters(), ...)`` is plain SGD with momentum;
    :func:`partition` makes the groups.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, k: int = 5, *, drift: bool = True,
                 weight_decay: float = 0.0, slow_fraction: float = 0.5,
                 generator: torch.Generator | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.k = _check_k(k)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, role="fast",
                        slow_fraction=slow_fraction, drift=bool(drift))
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["role"] not in ROLES:
                raise ValueError(f"unknown role {g['role']!r}; valid roles: {', '.join(ROLES)}")
            if not 0.0 <= g["slow_fraction"] <= 1.0:
                raise ValueError(f"slow_fraction must lie in [0, 1], got {g['slow_fraction']}")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,))))
        self.steps = self.slow_steps = self.fast_steps = 0
        self._slow_modules: tuple = (None, [])  # (weak reference to the model, its modules)

    @property
    def next_is_slow(self) -> bool:
        """Whether the next :meth:`step` is a slow one (needs the full backward pass)."""
        return self.steps % self.k == 0

    def slow_params(self) -> list[torch.Tensor]:
        """The parameters of the ``role="slow"`` groups."""
        return [p for g in self.param_groups if g["role"] == "slow" for p in g["params"]]

    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The current slow masks of the random groups (``True`` = slow this cycle)."""
        return {p: self.state[p]["slow_mask"] for g in self.param_groups if g["role"] == "random"
                for p in g["params"] if "slow_mask" in self.state[p]}

    def _redraw(self) -> None:
        for g in self.param_groups:
            if g["role"] == "random":
                for p in g["params"]:
                    m = torch.rand(p.shape, generator=self.generator, device=self.generator.device)
                    self.state[p]["slow_mask"] = (m < g["slow_fraction"]).to(p.device)

    def step(self, closure=None):
        """One batch's update (slow if :attr:`next_is_slow`); ``closure`` computes the loss."""
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            slow = self.next_is_slow
            if slow:
                self._redraw()
            k = self.k
            for g in self.param_groups:
                lr, mu, wd, role, drift = g["lr"], g["momentum"], g["weight_decay"], g["role"], g["drift"]
                for p in g["params"]:
                    state = self.state[p]
                    fresh = slow or role != "slow"  # this step reads this tensor's gradient
                    if fresh and p.grad is None:
                        if slow:
                            raise RuntimeError("a slow step needs the gradient of every parameter; "
                                               "one has none (was the backward run in full?)")
                        continue
                    if fresh:
                        d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = d.clone()
                        elif role == "random" and not slow:  # slow elements keep a frozen buffer
                            buf.copy_(torch.where(state["slow_mask"], buf, buf * mu + d))
                        else:
                            buf.mul_(mu).add_(d)
                    else:
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            continue
                    # positions: fast (and slow with drift) move lr·buf each step; without drift the
                    # slow part jumps k·lr·buf at the slow step and stands still otherwise
                    if role == "fast":
                        p.add_(buf, alpha=-lr)
                    elif role == "slow":
                        if drift:
                            p.add_(buf, alpha=-lr)
                        elif slow:
                            p.add_(buf, alpha=-lr * k)
                    else:  # random: fast elements move lr·buf, slow ones as the slow role
                        s_slow = 1.0 if drift else (float(k) if slow else 0.0)
                        if s_slow == 1.0:
                            p.add_(buf, alpha=-lr)
                        else:
                            p.sub_(torch.where(state["slow_mask"], buf * s_slow, buf), alpha=lr)
            self.steps += 1
            if slow:
                self.slow_steps += 1
            else:
                self.fast_steps += 1
            return loss

    def slow_modules(self, model: nn.Module) -> list[nn.Module]:
        """The largest submodules of ``model`` whose parameters are all slow (cached)."""
        ref, cached = self._slow_modules
        if ref is None or ref() is not model:
            slow = {id(p) for p in self.slow_params()}
            out: list[nn.Module] = []

            def visit(m: nn.Module) -> None:
                ps = list(m.parameters())
                if ps and all(id(p) in slow for p in ps):
                    out.append(m)
                    return
                for c in m.children():
                    visit(c)

            visit(model)
            self._slow_modules = (weakref.ref(model), out)
            cached = out
        return cached

    def state_dict(self):
        sd = super().state_dict()
        sd["multirate"] = {"steps": self.steps, "slow_steps": self.slow_steps,
                           "fast_steps": self.fast_steps, "generator": self.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("multirate", None)
        super().load_state_dict(state_dict)
        for state in self.state.values():  # Optimizer.load_state_dict casts state to the param's dtype
            if "slow_mask" in state:
                state["slow_mask"] = state["slow_mask"].bool()
        if extra is not None:
            self.steps, self.slow_steps = extra["steps"], extra["slow_steps"]
            self.fast_steps = extra["fast_steps"]
            self.generator.set_state(extra["generator"])

    def forward_context(self, model: nn.Module):
        """Context for the forward pass of the next step: on a fast step every all-slow module of
        ``model`` whose inputs need no gradient runs under ``torch.no_grad`` (so the backward
        stops at the fast part); on a slow step nothing changes."""
        if self.next_is_slow:
            return nullcontext()
        return _no_grad_modules(self.slow_modules(model))


@contextmanager
def _no_grad_modules(modules):
    stack: list = []

    def pre(mod, args):
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            stack.append(None)  # a fast part upstream needs the gradient through this module
        else:
            stack.append(torch.is_grad_enabled())
            torch.set_grad_enabled(False)

    def post(mod, args, out):
        prev = stack.pop()
        if prev is not None:
            torch.set_grad_enabled(prev)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre),
                                             m.register_forward_hook(post))]
    try:
        with torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()


def multirate_step(ctx) -> torch.Tensor:
    """The ``train.fit`` step for :class:`MultirateSGD`: forward (slow modules under ``no_grad``
    on fast steps), backward, one optimizer step. Every step counts one gradient evaluation; the
    optimizer's ``slow_steps`` counts the full backward passes."""
    opt = ctx.optimizer
    if not isinstance(opt, MultirateSGD):
        raise TypeError(f"multirate_step needs a MultirateSGD optimizer, got {type(opt).__name__}")
    with opt.forward_context(ctx.model):
        loss = ctx.backward()
    opt.step()
    return loss
