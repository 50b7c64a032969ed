"""Dynamic sparse training: masks, ERK densities, drop/grow (RigL, SET), re-exploration,
global re-pruning, dead units and sparse training FLOPs.

Papers: Evci et al., *Rigging the Lottery* (ICML 2020, arXiv 1911.11134) — RigL, ERK, the cosine
drop fraction and the FLOP rules; Mocanu et al. 2018 — SET (random growth); Liu et al.,
*FreeTickets* (ICLR 2022) — one-shot re-exploration; Yin et al., *Sup-tickets* (UAI 2022) —
global magnitude re-pruning of a superposed network.

**Masks.** A :class:`SparseMasker` holds one binary mask ``m_l`` per chosen weight ``W_l`` (the
``weight`` of ``nn.Linear``/``nn.Conv*`` modules by default; biases and normalisation parameters
stay dense). Masking is done by **zeroing weights**, not by a ``W ⊙ m`` forward: the weights are
multiplied by their masks at the start and after every optimizer step, and the gradients are
multiplied by the masks before the step, so the optimizer's momentum never moves a masked weight.
Because the weights themselves are zero, ``W.grad`` after a backward pass is the **dense**
gradient ``∂L/∂W`` — exactly what RigL's growth criterion needs on update steps.

**Densities** ``d_l`` with a global density ``D`` over the masked layers (``N_l`` weights each):

* ``uniform`` — ``d_l = D``;
* ``er`` (Erdős–Rényi) — ``d_l = ε (n_in + n_out) / (n_in n_out)``;
* ``erk`` (Erdős–Rényi-Kernel) — ``d_l = ε (n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)``,
  i.e. ``Σ shape / Π shape`` of the weight tensor;

where ε solves ``Σ_l d_l N_l = D Σ_l N_l``. A layer with ``d_l > 1`` is made dense and ε is
solved again over the others, until no layer is over-full (the loop of ``rigl/sparse_utils.py``).
Counts are then made integers with a largest-remainder rounding, so the masks hold **exactly**
``round(D Σ N_l)`` ones. Within a layer the ones are placed uniformly at random.

**Drop and grow** (one update, per layer, ``k = ⌊f(t) · |active_l|⌋``):

* drop the ``k`` active weights with the smallest ``|W|`` (plus N(0, σ²) tie-breaking noise,
  σ = 1e-5 as in the official code);
* grow ``k`` among all positions not kept (just-dropped ones included): the largest
  ``|∂L/∂W|`` (RigL, ``grow="gradient"``) or uniformly at random from a seeded generator
  (SET, ``grow="random"``);
* newly grown weights start at 0 and their optimizer state (SGD momentum, Adam moments) is
  reset to 0; a just-dropped weight that is grown again keeps its value (``reinit_when_same =
  False``); the per-layer count is unchanged.

**Schedule** (:class:`DropSchedule`): an update every ``ΔT`` steps while ``t < T_end``, with drop
fraction ``f(t) = (α/2)(1 + cos(π t / T_end))``. As in the official TF optimizer, no SGD update is
applied on a mask-update step (``skip_update=True``).

**Re-exploration** (:meth:`SparseMasker.reexplore`, FreeTickets' global exploration with rate
``q``): one drop/grow with fraction ``q`` in every layer at once. **Global re-pruning**
(:func:`global_magnitude_masks`, Sup-tickets): keep the ``round(D Σ N_l)`` largest ``|W|`` over
all masked layers together (the per-layer densities then drift away from ERK).

**FLOPs** (RigL paper, Appendix H): with ``f_D`` the dense and ``f_S = Σ_l d_l f_l`` the sparse
forward FLOPs of the masked layers, a training step costs ``3 f_S`` (forward; backward with
respect to activations and to weights, each ≈ the forward), a dense step ``3 f_D``, and RigL's
update step ``2 f_S + f_D`` (the weight gradient is dense there), so RigL averages
``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` per step. :func:`layer_flops` counts ``f_l`` from the
layer shapes (``2 · n_in · n_out`` per output position) and is checked against
``torch.utils.flop_counter.FlopCounterMode`` on the dense model in the tests. The savings are
theoretical: PyTorch runs dense kernels on zeroed weights.

What is PyTorch's: the modules, autograd, ``torch.topk``, ``FlopCounterMode``. What is ours:
everything above (``torch.nn.utils.prune`` has static masks only).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

DISTRIBUTIONS = ("uniform", "er", "erk")
GROW_RULES = ("gradient", "random")
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_density(density: float, what: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{what} must lie in (0, 1] (a fraction of weights kept; "
                         f"sparsity = 1 - density), got {density!r}")
    return float(density)


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    """The unnormalised density of one layer: Σ dims / Π dims (ERK) or over (n_out, n_in) (ER)."""
    if distribution == "erk":
        dims = list(shape)
    else:  # er: only the two channel dimensions
        dims = list(shape[:2])
    return sum(dims) / math.prod(dims)


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float,
                    distribution: str = "erk", dense: Iterable[str] = ()) -> dict[str, float]:
    """Per-layer densities ``d_l`` with ``Σ d_l N_l = density · Σ N_l`` (real-valued).

    ``shapes`` maps layer names to weight shapes ``(n_out, n_in, *kernel)``; layers named in
    ``dense`` are kept dense (and count towards the budget). Under ``er``/``erk`` layers whose
    density would exceed 1 are made dense and ε is solved again (the RigL loop).
    """
    density = _check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid choices: "
                         f"{', '.join(DISTRIBUTIONS)}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    dense = set(dense)
    unknown = dense - set(sizes)
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not masked; masked layers: "
                         f"{', '.join(sizes)}")
    target = density * sum(sizes.values())
    if sum(sizes[n] for n in dense) > target + 1e-9:
        raise ValueError(f"the layers kept dense ({sorted(dense)}) already hold more than "
                         f"density {density} of the weights")
    raw = {n: (1.0 if distribution == "uniform" else _raw_score(s, distribution))
           for n, s in shapes.items()}
    while True:
        free = [n for n in sizes if n not in dense]
        if not free:
            break
        budget = target - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1]
        if not over:
            break
        dense.update(over)  # over-full layers become dense; solve ε again over the rest
    out = {}
    for n in sizes:
        out[n] = 1.0 if n in dense else eps * raw[n]
    return out


def layer_counts(shapes: Mapping[str, Sequence[int]], density: float, distribution: str = "erk",
                 dense: Iterable[str] = ()) -> dict[str, int]:
    """Integer numbers of ones per layer summing to exactly ``round(density · Σ N_l)``
    (largest-remainder rounding of :func:`layer_densities`, never above ``N_l``)."""
    d = layer_densities(shapes, density, distribution, dense)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = round(density * sum(sizes.values()))
    exact = {n: d[n] * sizes[n] for n in sizes}
    counts = {n: min(sizes[n], math.floor(exact[n] + 1e-9)) for n in sizes}
    left = total - sum(counts.values())
    order = sorted((n for n in sizes if counts[n] < sizes[n]),
                   key=lambda n: exact[n] - counts[n], reverse=True)
    i = 0
    while left > 0 and order:
        n = order[i % len(order)]
        if counts[n] < sizes[n]:
            counts[n] += 1
            left -= 1
        i += 1
    return counts


def maskable(model: nn.Module) -> list[str]:
    """Names of the modules a :class:`SparseMasker` masks by default (Linear and Conv)."""
    return [n for n, m in model.named_modules() if isinstance(m, MASKABLE)]


def _random_mask(shape, count: int, generator: torch.Generator | None, device) -> torch.Tensor:
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:count]] = True
    return mask.view(shape).to(device)


@dataclass(frozen=True)
class DropSchedule:
    """Mask updates every ``delta_t`` steps while ``t < t_end``, with the cosine drop fraction
    ``f(t) = (alpha/2)(1 + cos(π t / t_end))`` (RigL defaults: α = 0.3, ΔT = 100,
    T_end = 0.75 × the total number of steps)."""

    alpha: float = 0.3
    delta_t: int = 100
    t_end: int = 1

    def __post_init__(self):
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"delta_t (ΔT, steps between mask updates) must be an integer >= 1, "
                             f"got {self.delta_t!r}")
        if isinstance(self.t_end, bool) or not isinstance(self.t_end, int) or self.t_end < 1:
            raise ValueError(f"t_end (the last step with mask updates) must be an integer >= 1, "
                             f"got {self.t_end!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (the initial drop fraction) must lie in [0, 1], "
                             f"got {self.alpha!r}")

    @classmethod
    def for_run(cls, total_steps: int, *, alpha: float = 0.3, delta_t: int = 100,
                end_fraction: float = 0.75) -> "DropSchedule":
        """The schedule with ``T_end = end_fraction · total_steps``."""
        return cls(alpha=alpha, delta_t=delta_t, t_end=max(1, int(end_fraction * total_steps)))

    def is_update(self, t: int) -> bool:
        return t % self.delta_t == 0 and t < self.t_end

    def fraction(self, t: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * min(t, self.t_end) / self.t_end))


class SparseMasker:
    """Masks over the weights of chosen modules, and the sparse training step for ``train.fit``.

    >>> masker = SparseMasker(model, density=0.05, distribution="erk", grow="gradient",
    ...                       schedule=DropSchedule.for_run(steps, delta_t=50))   # doctest: +SKIP
    >>> train.fit(model, data, optimizer=opt, epochs=40, step=masker.step)        # doctest: +SKIP

    ``modules``: module names (as in ``model.named_modules()``) or module objects; default every
    ``nn.Linear``/``nn.Conv{1,2,3}d``. ``dense``: names among them kept dense. ``schedule=None``
    is static sparse training. ``grow``: ``"gradient"`` (RigL) or ``"random"`` (SET).
    ``generator`` seeds the initial masks, the random growth and the drop tie-breaking noise
    (default: one drawn from the global RNG). ``masks``: start from given masks (a ticket, a
    re-pruned network) instead of random ones; ``density`` may then be ``None``.
    """

    def __init__(self, model: nn.Module, density: float | None, *, distribution: str = "erk",
                 modules: Iterable[str | nn.Module] | None = None, dense: Iterable[str] = (),
                 grow: str = "gradient", schedule: DropSchedule | None = None,
                 skip_update: bool = True, tie_noise: float = 1e-5,
                 generator: torch.Generator | None = None,
                 masks: Mapping[str, torch.Tensor] | None = None):
        if density is not None or masks is None:
            _check_density(density)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; valid choices: "
                             f"{', '.join(DISTRIBUTIONS)}")
        if grow not in GROW_RULES:
            raise ValueError(f"unknown grow rule {grow!r}; valid choices: {', '.join(GROW_RULES)}")
        if schedule is not None and not isinstance(schedule, DropSchedule):
            raise TypeError(f"schedule must be a DropSchedule or None, got {type(schedule).__name__}")
        self.model, self.distribution = model, distribution
        self.density = None if density is None else float(density)
        self.grow, self.schedule, self.skip_update = grow, schedule, skip_update
        self.tie_noise = float(tie_noise)
        self.generator = (torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
                          if generator is None else generator)
        self.names = self._resolve(model, modules)
        named = dict(model.named_modules())
        self.weights: dict[str, nn.Parameter] = {n: named[n].weight for n in self.names}
        shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        if masks is not None:
            missing = [n for n in self.names if n not in masks]
            if missing:
                raise ValueError(f"masks= lacks the masked modules {missing}; masked: "
                                 f"{', '.join(self.names)}")
            bad = [n for n in self.names if tuple(masks[n].shape) != shapes[n]]
            if bad:
                raise ValueError(f"masks of {bad} do not have their weights' shapes")
            self.masks = {n: masks[n].to(torch.bool).to(self.weights[n].device)
                          for n in self.names}
            self.counts = {n: int(m.sum()) for n, m in self.masks.items()}
            total = sum(self.counts.values())
            self.density = total / sum(math.prod(s) for s in shapes.values())
        else:
            self.counts = layer_counts(shapes, density, distribution, dense)
            self.masks = {n: _random_mask(shapes[n], self.counts[n], self.generator, w.device)
                          for n, w in self.weights.items()}
        self._float: dict[str, torch.Tensor] = {}
        self.updates: list[dict] = []  # one record per mask update
        self._refresh()
        self.apply()

    # -- set-up -----------------------------------------------------------------------------
    @staticmethod
    def _resolve(model: nn.Module, modules) -> list[str]:
        named = dict(model.named_modules())
        valid = [n for n, m in named.items()
                 if isinstance(getattr(m, "weight", None), nn.Parameter) and n]
        if modules is None:
            names = [n for n, m in named.items() if isinstance(m, MASKABLE)]
            if not names:
                raise ValueError("the model has no Linear/Conv module to mask; pass modules= "
                                 f"naming modules with a weight: {', '.join(valid) or 'none'}")
            return names
        ids = {id(m): n for n, m in named.items()}
        names = []
        for m in modules:
            name = m if isinstance(m, str) else ids.get(id(m))
            if name is None or name not in named:
                raise ValueError(f"{m!r} is not a module of the model; modules with a weight: "
                                 f"{', '.join(valid)}")
            if not isinstance(getattr(named[name], "weight", None), nn.Parameter):
                raise ValueError(f"module {name!r} ({type(named[name]).__name__}) has no weight "
                                 f"to mask; modules with a weight: {', '.join(valid)}")
            names.append(name)
        if not names:
            raise ValueError(f"no modules to mask; modules with a weight: {', '.join(valid)}")
        return names

    def _refresh(self) -> None:
        self._float = {n: m.to(self.weights[n].dtype) for n, m in self.masks.items()}
        self._w = [self.weights[n] for n in self.names]
        self._m = [self._float[n] for n in self.names]

    # -- masking ----------------------------------------------------------------------------
    def apply(self) -> None:
        """Zero the masked weights (after every optimizer step)."""
        with torch.no_grad():
            torch._foreach_mul_(self._w, self._m)

    def mask_grads(self) -> None:
        """Zero the gradients of masked weights (before the optimizer step)."""
        with torch.no_grad():
            grads = [w.grad for w in self._w]
            if any(g is None for g in grads):
                pairs = [(g, m) for g, m in zip(grads, self._m) if g is not None]
                if pairs:
                    torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])
                return
            torch._foreach_mul_(grads, self._m)

    def set_masks(self, masks: Mapping[str, torch.Tensor], optimizer=None) -> None:
        """Replace the masks (e.g. by :func:`global_magnitude_masks`), zero the weights outside
        them and reset the optimizer state of connections that were not active before."""
        old = self.masks
        self.masks = {n: masks[n].to(torch.bool).to(self.weights[n].device) for n in self.names}
        self.counts = {n: int(m.sum()) for n, m in self.masks.items()}
        self._refresh()
        self.apply()
        if optimizer is not None:
            self._reset_state(optimizer, {n: self.masks[n] & ~old[n] for n in self.names})

    def _reset_state(self, optimizer, new: Mapping[str, torch.Tensor]) -> None:
        """Optimizer state of newly grown connections → 0; state of inactive ones → 0."""
        with torch.no_grad():
            for n in self.names:
                w = self.weights[n]
                state = optimizer.state.get(w, {})
                keep = self._float[n] * (~new[n]).to(w.dtype)
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.shape == w.shape:
                        v.mul_(keep)

    # -- drop and grow ----------------------------------------------------------------------
    def drop_grow(self, fraction: float, optimizer=None, *, grow: str | None = None) -> dict:
        """One drop/grow of ``⌊fraction · |active_l|⌋`` connections in every layer: drop the
        smallest ``|W|``, grow the largest ``|∂L/∂W|`` (``W.grad`` must hold the dense gradient)
        or random positions. Returns per-layer numbers of changed connections."""
        with torch.no_grad():
            grow = self.grow if grow is None else grow
            if grow not in GROW_RULES:
                raise ValueError(f"unknown grow rule {grow!r}; valid choices: {', '.join(GROW_RULES)}")
            if not 0 <= fraction <= 1:
                raise ValueError(f"drop fraction must lie in [0, 1], got {fraction!r}")
            changed, new_masks = {}, {}
            for n in self.names:
                w, mask = self.weights[n], self.masks[n]
                flat_mask = mask.reshape(-1)
                active = flat_mask.nonzero().squeeze(1)
                k = math.floor(fraction * active.numel())
                if k == 0:
                    new_masks[n], changed[n] = mask, 0
                    continue
                # drop: the k active weights of smallest |W| (+ tie-breaking noise)
                score = w.reshape(-1)[active].abs()
                if self.tie_noise > 0:
                    score = score + self.tie_noise * torch.randn(
                        score.shape, generator=self.generator).to(score.device)
                dropped = active[torch.topk(score, k, largest=False).indices]
                kept = flat_mask.clone()
                kept[dropped] = False
                # grow: k positions among all not kept (just-dropped included)
                if grow == "gradient":
                    if w.grad is None:
                        raise RuntimeError(f"RigL growth needs the dense gradient of {n!r}.weight; "
                                           "run a backward pass first")
                    gscore = w.grad.reshape(-1).abs().clone()
                else:
                    gscore = torch.rand(flat_mask.shape, generator=self.generator).to(w.device)
                gscore[kept] = -math.inf
                grown = torch.topk(gscore, k).indices
                new = kept.clone()
                new[grown] = True
                new_masks[n] = new.view(mask.shape)
                changed[n] = int((new & ~flat_mask).sum())
            new_conn = {n: new_masks[n] & ~self.masks[n] for n in self.names}
            self.masks = new_masks
            self._refresh()
            self.apply()  # dropped weights → 0; regrown just-dropped ones keep their value
            for n in self.names:  # newly grown start at 0 (they were masked, hence already 0)
                self.weights[n].data[new_conn[n]] = 0
            if optimizer is not None:
                self._reset_state(optimizer, new_conn)
            return changed

    def reexplore(self, q: float, optimizer=None, *, grow: str | None = None,
                  batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                  loss_fn=nn.functional.cross_entropy) -> dict:
        """FreeTickets' global exploration: drop the fraction ``q`` of the active weights of
        every layer by magnitude and grow as many (by gradient or at random) in one go. With
        ``batch=(x, y)`` the dense gradient for growth is computed on it first (train mode)."""
        if not 0 <= q <= 1:
            raise ValueError(f"re-exploration rate q must lie in [0, 1], got {q!r}")
        if batch is not None and (grow or self.grow) == "gradient":
            was = self.model.training
            self.model.train()
            self.model.zero_grad(set_to_none=True)
            loss_fn(self.model(batch[0]), batch[1]).backward()
            self.model.train(was)
        out = self.drop_grow(q, optimizer, grow=grow)
        if batch is not None:
            self.model.zero_grad(set_to_none=True)
        self.updates.append({"step": None, "fraction": q, "changed": sum(out.values()),
                             "kind": "reexplore"})
        return out

    def fork(self, model: nn.Module) -> "SparseMasker":
        """The same masker (masks, settings, generator state, update log) over ``model``, a copy
        of this masker's model (e.g. from ``train.fork``), so a run can branch."""
        names = dict(model.named_modules())
        missing = [n for n in self.names if n not in names]
        if missing:
            raise ValueError(f"the model lacks the masked modules {missing}")
        new = copy.copy(self)
        new.model = model
        new.weights = {n: names[n].weight for n in self.names}
        new.masks = {n: m.clone() for n, m in self.masks.items()}
        new.counts = dict(self.counts)
        new.updates = [dict(u) for u in self.updates]
        g = torch.Generator(device=self.generator.device)
        g.set_state(self.generator.get_state())
        new.generator = g
        new._refresh()
        return new

    # -- the training step for train.fit -----------------------------------------------------
    def step(self, ctx) -> torch.Tensor:
        """A ``train.fit`` step: forward/backward, then on an update step of the schedule a
        drop/grow (with the dense gradient of this batch) and, unless ``skip_update=False``, no
        weight update; otherwise masked gradients, ``optimizer.step()``, masked weights."""
        loss = ctx.backward()
        t = ctx.step
        if self.schedule is not None and self.schedule.is_update(t):
            f = self.schedule.fraction(t)
            changed = self.drop_grow(f, ctx.optimizer)
            self.updates.append({"step": t, "fraction": f, "changed": sum(changed.values()),
                                 "kind": self.grow})
            if self.skip_update:
                return loss
        self.mask_grads()
        ctx.optimizer.step()
        self.apply()
        return loss

    # -- diagnostics ------------------------------------------------------------------------
    def layer_density(self) -> dict[str, float]:
        return {n: float(m.float().mean()) for n, m in self.masks.items()}

    def global_density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(
            m.numel() for m in self.masks.values())

    def dead_units(self) -> dict[str, int]:
        """Per layer, the output units (rows/filters) whose fan-in is 0."""
        return dead_units(self.masks)


def dead_units(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per layer, the number of output units (rows of a Linear, filters of a Conv) with no
    active incoming weight."""
    return {n: int((m.reshape(m.shape[0], -1).sum(1) == 0).sum()) for n, m in masks.items()}


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Masks keeping the ``round(density · Σ N_l)`` largest ``|W|`` over all layers together
    (Sup-tickets' re-pruning of a superposed network; ties broken by position)."""
    with torch.no_grad():
        _check_density(density)
        names = list(weights)
        flat = torch.cat([weights[n].detach().reshape(-1).abs().float().cpu() for n in names])
        keep = round(density * flat.numel())
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        # a stable descending sort, not topk: topk does not order ties by position
        mask[torch.sort(flat, descending=True, stable=True).indices[:keep]] = True
        out, i = {}, 0
        for n in names:
            size = weights[n].numel()
            out[n] = mask[i:i + size].view(weights[n].shape).to(weights[n].device)
            i += size
        return out


# --- FLOPs ------------------------------------------------------------------------------------

def layer_flops(model: nn.Module, example: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, int]:
    """Dense forward FLOPs per example of each Linear/Conv layer (``names``, default all), from
    one forward pass of ``example`` (a batch) with hooks: ``2 · n_in · n_out`` per output
    position for a Linear, ``2 · (C_in/groups) · Π kernel · C_out`` per output position for a
    Conv (multiply-adds counted as 2, biases not counted, as in ``FlopCounterMode``)."""
    named = dict(model.named_modules())
    names = [n for n, m in named.items() if isinstance(m, MASKABLE)] if names is None else list(names)
    out: dict[str, int] = {}
    hooks = []
    batch = example.shape[0]

    def hook_for(name):
        def hook(mod, inp, outp):
            w = mod.weight
            if isinstance(mod, nn.Linear):
                positions = outp.numel() // outp.shape[-1]
                f = 2 * w.shape[0] * w.shape[1] * positions
            else:
                positions = outp[0, 0].numel() * outp.shape[0]
                f = 2 * w[0].numel() * w.shape[0] * positions
            out[name] = out.get(name, 0) + f // batch
        return hook

    for n in names:
        hooks.append(named[n].register_forward_hook(hook_for(n)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def training_flops(dense_flops: Mapping[str, int], densities: Mapping[str, float], *,
                   steps: int, batch_size: int, method: str = "static",
                   delta_t: int | None = None, t_end: int | None = None) -> float:
    """Training FLOPs of ``steps`` steps of ``batch_size`` examples by the RigL paper's rules:
    ``3 f_S`` per example and step (``3 f_D`` for ``method="dense"``); for ``"rigl"`` the
    ``⌊(T_end − 1)/ΔT⌋`` update steps cost ``2 f_S + f_D`` instead. ``"set"`` and ``"static"``
    cost ``3 f_S`` (random growth needs no dense gradient). Layers missing from ``densities``
    count as dense."""
    methods = ("dense", "static", "set", "rigl")
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(methods)}")
    f_d = float(sum(dense_flops.values()))
    f_s = float(sum(f * densities.get(n, 1.0) for n, f in dense_flops.items()))
    if method == "dense":
        return 3 * f_d * steps * batch_size
    total = 3 * f_s * steps
    if method == "rigl":
        if delta_t is None or t_end is None:
            raise ValueError("method='rigl' needs delta_t and t_end")
        n_updates = len(range(delta_t, min(t_end, steps + 1), delta_t))
        total += n_updates * (f_d - f_s)
    return total * batch_size


# --- superposition of tickets (Sup-tickets) ------------------------------------------------------

SUPERPOSITIONS = ("caa", "cima")


def superposition(model: nn.Module, rule: str = "caa", lam: float = 0.5):
    """An ``AveragedModel`` of ``model`` that superposes tickets (Yin et al. 2022), buffers
    included (``use_buffers=True``, as the official code averages the whole ``state_dict``):

    * ``"caa"`` — cumulative average ``θ̄_k = (1 − 1/(k+1)) θ̄_{k−1} + θ_k/(k+1)``
      (``AveragedModel``'s default equal average);
    * ``"cima"`` — ``θ̄_k = (1 − λ) θ̄_{k−1} + λ θ_k`` (``get_ema_multi_avg_fn(1 − λ)``).

    Call ``update_parameters(model)`` with the phase-1 model and after each cycle's ticket."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if rule not in SUPERPOSITIONS:
        raise ValueError(f"unknown superposition {rule!r}; valid choices: {', '.join(SUPERPOSITIONS)}")
    if rule == "caa":
        return AveragedModel(model, use_buffers=True)
    if not 0 < lam <= 1:
        raise ValueError(f"lam must lie in (0, 1], got {lam!r}")
    return AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(1 - lam))


def reprune(model: nn.Module, density: float, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Global magnitude re-pruning in place: keep the ``round(density · Σ N_l)`` largest ``|W|``
    over the weights of ``names`` (default: every Linear/Conv), zero the rest; returns the masks."""
    with torch.no_grad():
        named = dict(model.named_modules())
        names = maskable(model) if names is None else list(names)
        missing = [n for n in names if not isinstance(getattr(named.get(n), "weight", None), torch.Tensor)]
        if missing:
            raise ValueError(f"modules {missing} have no weight; maskable: {', '.join(maskable(model))}")
        weights = {n: named[n].weight for n in names}
        masks = global_magnitude_masks(weights, density)
        for n, w in weights.items():
            w.mul_(masks[n].to(w.dtype))
        return masks
