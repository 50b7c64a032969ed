"""SAM, ASAM and SAM-ON: sharpness-aware minimisation with a parameter filter by module type.

**SAM** (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021, arXiv 2010.01412) minimises the worst loss in a ball of
radius ρ, ``min_w max_{‖ε‖≤ρ} L(w + ε)``, to first order. One step on a batch ``B``:

.. math::
    g &= ∇L_B(w), \\qquad ε = ρ\\,\\frac{g}{\\lVert g\\rVert_2} \\quad\\text{(ascent to the worst point)}, \\\\
    \\tilde g &= ∇L_B(w + ε), \\qquad w \\leftarrow \\mathrm{base\\_step}(w, \\tilde g)
    \\quad\\text{(descent from } w \\text{ with the gradient found at } w + ε).

**ASAM** (Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning", ICML 2021, arXiv 2102.11600), element-wise, scales the ball by
``T_w = |w| + η`` so that the radius is relative to each weight:

.. math::  ε = ρ\\,\\frac{T_w^2\\, g}{\\lVert T_w\\, g\\rVert_2}
           \\qquad (\\ell_\\infty \\text{ ball: } ε = ρ\\,T_w \\operatorname{sign} g).

As in the ASAM and SAM-ON code, biases get ``T = 1`` unless ``normalize_bias=True``.

**SAM-ON** (Mueller, Vlaar, Rolnick, Hein, "Normalization Layers Are All That Sharpness-Aware
Minimization Needs", NeurIPS 2023, arXiv 2306.04226) perturbs *only* the affine parameters of
the normalisation layers, ``N``: ``ε_j = 0`` for ``j ∉ N``, and the norm in the denominator is
taken over ``N`` only (all of ρ goes to ``N``). The second gradient and the base step still
cover every parameter. Here the set is chosen **by module type** (``perturb=``), never by
parameter name (the official code matches names containing "norm"/"bn", which misses e.g.
torchvision's ``downsample.1``):

* ``"all"`` — every parameter (SAM, ASAM);
* ``"norm"`` — the ``weight``/``bias`` of every BatchNorm, GroupNorm, LayerNorm (and RMSNorm,
  InstanceNorm) module (SAM-ON, ASAM-ON);
* ``"no-norm"`` — every parameter except those (the paper's "no-norm" ablation);
* ``"random"`` — ``n_random`` coordinates drawn uniformly without replacement from
  ``generator`` among the non-norm coordinates (``random_from="no-norm"``, default) or all
  coordinates (``random_from="all"``): the random-sparse control at SAM-ON's sparsity. The mask
  is drawn once, at construction, and kept.

**BatchNorm statistics.** The second forward pass runs in train mode at ``w + ε``. With
``bn="freeze"`` (default) the running mean/variance (and ``num_batches_tracked``) are left as
the first pass set them, so they are updated **once per step**, at ``w``; the second pass still
normalises with its own batch statistics, as SAM needs. ``bn="update"`` lets the second pass
update them too (the official SAM-ON code's behaviour: twice per step, once at a perturbed
point). The same holds for InstanceNorm with ``track_running_stats=True``. Freezing needs the
model (``model=`` or a module passed as ``params``).

The closure is the ``torch.optim`` protocol (zero the gradients, forward, backward, return the
loss); ``train.fit``'s default step passes one, so one SAM step is two gradient evaluations on
the *same* batch, and the history's ``effective_epochs`` counts both.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

PERTURB = ("all", "norm", "no-norm", "random")
RANDOM_FROM = ("no-norm", "all")
BN_POLICIES = ("freeze", "update")
P_NORMS = (2, math.inf)

NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d (with affine)
    nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters (``weight``, ``bias``) of every normalisation module of ``model``
    (by type: :data:`NORM_TYPES`), in module order."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _check_ball(rho, eta, p) -> None:
    """The ball's options, as the constructor and :meth:`SAM.add_param_group` take them."""
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number (the radius of the ball), got {rho!r}")
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if p not in P_NORMS:
        raise ValueError(f"unknown p {p!r}; valid choices: 2, math.inf")


def _bias_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
            if n == "bias"}


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any base optimizer (see the module docstring).

    Parameters
    ----------
    params
        An ``nn.Module`` (its parameters, and it is the ``model``) or parameters / param groups.
    base_optimizer
        The class of the base optimizer (``torch.optim.SGD``, ``AdamW``, ...); it is built on
        SAM's own param groups with ``**base_kwargs``, so an lr scheduler on SAM drives it.
    rho
        The radius ρ > 0 (not comparable between ``perturb`` sets: the norm is over the set).
    adaptive, eta, normalize_bias
        ASAM: ``T_w = |w| + η`` (biases ``T = 1`` unless ``normalize_bias``).
    p
        The ball: ``2`` (default) or ``math.inf``.
    perturb, n_random, random_from, generator
        Which coordinates are perturbed (``"all"``, ``"norm"``, ``"no-norm"``, ``"random"``).
    model
        The module the parameters belong to (needed for every ``perturb`` but ``"all"``, for
        ``bn="freeze"`` and for telling biases apart).
    bn
        ``"freeze"`` (BatchNorm statistics updated once per step) or ``"update"`` (twice).
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, normalize_bias: bool = False,
                 p: float = 2, perturb: str = "all", n_random: int | None = None,
                 random_from: str = "no-norm", generator: torch.Generator | None = None,
                 model: nn.Module | None = None, bn: str = "freeze", **base_kwargs):
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        _check_ball(rho, eta, p)
        if perturb not in PERTURB:
            raise ValueError(f"unknown perturb filter {perturb!r}; valid choices: {', '.join(PERTURB)}")
        if random_from not in RANDOM_FROM:
            raise ValueError(f"unknown random_from {random_from!r}; valid choices: {', '.join(RANDOM_FROM)}")
        if bn not in BN_POLICIES:
            raise ValueError(f"unknown bn policy {bn!r}; valid choices: {', '.join(BN_POLICIES)}")
        if model is None and (perturb != "all" or (adaptive and not normalize_bias)):
            raise ValueError(f"perturb={perturb!r}{' with adaptive=True' if adaptive else ''} needs the "
                             "model (pass model=... or the module itself as params): parameters are "
                             "selected by module type")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                            f"got {base_optimizer!r}")
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta), p=p, **base_kwargs)
        # set before torch's __init__, whose add_param_group calls check each group against them
        self.model, self.bn, self.normalize_bias = model, bn, bool(normalize_bias)
        self.perturb, self.random_from = perturb, random_from
        super().__init__(params, defaults)
        # the base optimizer shares SAM's param groups, the list itself and not only its dicts
        # (lr, momentum, ... live in one place, and a group added later reaches both)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.base_optimizer.param_groups = self.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # per parameter, in param-group order (positions, not ids, so train.fork's copy works)
        self._masks = self._build_masks(n_random, generator)
        self._bias_ids = _bias_ids(model) if model is not None else set()
        self._is_bias = [id(q) in self._bias_ids for q in self._params()]

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (``torch.optim`` protocol), to SAM and its base optimizer alike.

        The group's ``rho``, ``eta`` and ``p`` are checked as the constructor checks them; ``p``
        must be the same in every group, since ε is taken in one ball over all of them. With
        ``perturb="random"`` the mask is drawn once over the parameters given at construction,
        so a group cannot be added later.
        """
        get = lambda k: param_group.get(k, self.defaults[k])  # noqa: E731
        p = get("p")
        _check_ball(get("rho"), get("eta"), p)
        if self.param_groups and p != self.param_groups[0]["p"]:
            raise ValueError(f"p={p!r} differs from the other groups' p={self.param_groups[0]['p']!r}: "
                             "the perturbation is taken in one ball over all groups")
        constructed = hasattr(self, "_masks")
        if constructed and self.perturb == "random":
            raise ValueError("perturb='random' draws its mask once, over the parameters given at "
                             "construction: build a new SAM to add parameters")
        if get("adaptive") and self.model is None and not self.normalize_bias:
            raise ValueError("adaptive=True in a param group needs the model (pass model=... or the "
                             "module itself as params): biases are told apart by module")
        super().add_param_group(param_group)
        if constructed:
            added, keep = self.param_groups[-1]["params"], self._keep()
            self._masks.extend(keep(q) for q in added)
            self._is_bias.extend(id(q) in self._bias_ids for q in added)

    # --- which coordinates move -----------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _build_masks(self, n_random, generator) -> list:
        """Per parameter: ``True`` (all of it), ``False`` (none) or a 0/1 tensor (some coordinates)."""
        params = self._params()
        norm_ids = {id(q) for q in norm_parameters(self.model)} if self.model is not None else set()
        if self.perturb != "random":
            if n_random is not None:
                raise ValueError(f"n_random is only used with perturb='random', not {self.perturb!r}")
            keep = self._keep()
            masks = [keep(q) for q in params]
            if not any(masks):
                raise ValueError(f"perturb={self.perturb!r} selects no parameter of this model "
                                 f"(normalisation layers are found by type: "
                                 f"{', '.join(t.__name__ for t in NORM_TYPES)})")
            return masks
        pool = [q for q in params if self.random_from == "all" or id(q) not in norm_ids]
        total = sum(q.numel() for q in pool)
        if isinstance(n_random, bool) or not isinstance(n_random, int) or not 1 <= n_random <= total:
            raise ValueError(f"perturb='random' needs n_random, an integer in 1..{total} (the "
                             f"{self.random_from} coordinates), got {n_random!r}")
        chosen = torch.randperm(total, generator=generator)[:n_random]
        flat = torch.zeros(total, dtype=torch.bool)
        flat[chosen] = True
        pool_masks = {id(q): m.view(q.shape).to(device=q.device, dtype=q.dtype)
                      for q, m in zip(pool, flat.split([q.numel() for q in pool]))}
        return [pool_masks.get(id(q), False) for q in params]

    def _keep(self) -> Callable[[torch.Tensor], bool]:
        """Whether a parameter is perturbed, for the filters that take whole tensors."""
        norm_ids = {id(q) for q in norm_parameters(self.model)} if self.model is not None else set()
        return {"all": lambda q: True, "norm": lambda q: id(q) in norm_ids,
                "no-norm": lambda q: id(q) not in norm_ids}[self.perturb]

    def perturbed_count(self) -> int:
        """How many coordinates the ascent step moves."""
        n = 0
        for q, m in zip(self._params(), self._masks):
            n += q.numel() if m is True else (0 if m is False else int(m.sum()))
        return n

    # --- the two passes -------------------------------------------------------------------

    def _scale(self, q: torch.Tensor, group: dict, is_bias: bool):
        """``T_w`` for ASAM (``|w| + η``; 1 for biases unless ``normalize_bias``), else None."""
        if not group["adaptive"] or (is_bias and not self.normalize_bias):
            return None
        return q.abs().add(group["eta"])

    def first_step(self) -> None:
        """Move to ``w + ε`` (ε from the gradients in ``.grad``); remember ε."""
        # per perturbed tensor: T·g (masked), and T (None without ASAM); p: one ball for all groups
        with torch.no_grad():
            params, tgs, scales, rhos, balls, masks, i = [], [], [], [], [], [], -1
            for group in self.param_groups:
                for q in group["params"]:
                    i += 1
                    m = self._masks[i]
                    if q.grad is None or m is False:
                        continue
                    t = self._scale(q, group, self._is_bias[i])
                    tg = q.grad if t is None else q.grad * t
                    if m is not True:
                        tg = tg * m
                    params.append(q), tgs.append(tg), scales.append(t), rhos.append(group["rho"])
                    balls.append(group["p"]), masks.append(m)
            if not params:
                self._perturbation = ([], [])
                return
            if all(b == 2 for b in balls):
                # ε = ρ T² g / ‖T g‖₂, the norm over the perturbed coordinates only (T = 1 without ASAM)
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tgs)))
                eps = [tg if t is None else tg * t for tg, t in zip(tgs, scales)]
                if len(set(rhos)) == 1:
                    eps = torch._foreach_mul(eps, rhos[0] / (norm + 1e-12))
                else:
                    eps = [e * (r / (norm + 1e-12)) for e, r in zip(eps, rhos)]
            else:
                # ℓ∞ ball: ε = ρ T sign(g)
                eps = []
                for tg, t, r, m in zip(tgs, scales, rhos, masks):
                    e = torch.sign(tg) * r
                    if t is not None:
                        e = e * t
                    eps.append(e if m is True else e * m)
            torch._foreach_add_(params, eps)
            self._perturbation = (params, eps)

    def second_step(self) -> None:
        """Go back to ``w`` and take the base optimizer's step with the gradients at ``w + ε``."""
        with torch.no_grad():
            params, eps = getattr(self, "_perturbation", ([], []))
            if params:
                torch._foreach_sub_(params, eps)
            self._perturbation = ([], [])
            self.base_optimizer.step()

    def _bn_modules(self) -> list[nn.Module]:
        if self.model is None:
            return []
        # _NormBase: BatchNorm*d, SyncBatchNorm and InstanceNorm*d, which with
        # track_running_stats=True keeps running statistics too
        return [m for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SAM step: ``closure()`` at ``w``, ascent, ``closure()`` at ``w + ε``, descent.

        Returns the loss at ``w`` (the first closure call).
        """
        if closure is None:
            raise ValueError("SAM needs a closure (zero_grad, forward, backward, return loss): "
                             "it evaluates the gradient twice per step")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        frozen = []
        if self.bn == "freeze":
            for m in self._bn_modules():
                frozen.append((m, m.momentum, m.num_batches_tracked.clone()
                               if m.num_batches_tracked is not None else None))
                m.momentum = 0.0  # running ← (1 − 0)·running + 0·batch statistics
        try:
            with torch.enable_grad():
                closure()
        finally:
            for m, momentum, tracked in frozen:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict["sam"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.base_optimizer.param_groups = self.param_groups


def sam_param_counts(model: nn.Module) -> dict[str, int]:
    """Coordinates in each ``perturb`` set of ``model``: ``all``, ``norm``, ``no-norm``."""
    total = sum(p.numel() for p in model.parameters())
    norm = sum(p.numel() for p in norm_parameters(model))
    return {"all": total, "norm": norm, "no-norm": total - norm}


__all__ = ["SAM", "norm_parameters", "sam_param_counts", "NORM_TYPES", "PERTURB"]
