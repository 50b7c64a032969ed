"""Parameters as dicts of tensors: copy, combine, flatten, stack, evaluate, recompute BatchNorm.

Every landscape experiment is arithmetic on weights. The book keeps weights as ordered dicts
``{name: tensor}`` (the names of ``model.named_parameters()``), so that

* a point in weight space is ``θ = θ* + Σ_i c_i d_i`` (:func:`combine`),
* a straight path is ``θ(α) = (1−α)θ_a + αθ_b`` (:func:`lerp`), for all keys or only some (the
  layer-wise interpolation of Vlaar & Frankle 2022),
* a model is evaluated at any such point without copying it: ``f(x; θ)`` through
  ``torch.func.functional_call`` (:func:`forward`), and many points at once by stacking them
  (:func:`stack`) and mapping with ``torch.func.vmap``.

BatchNorm keeps running statistics as *buffers*, which are not parameters: a weight-space
point says nothing about them. The book makes the choice explicit everywhere: keep the
buffers of the centre (``bn="keep"``), or re-estimate them at the new weights on training data
(:func:`recompute_bn`, which is ``torch.optim.swa_utils.update_bn``: cumulative averaging over
one pass in train mode).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.optim.swa_utils import update_bn


def weights(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Detached copies of the trainable parameters, in ``named_parameters`` order."""
    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters()
                       if p.requires_grad)


def buffers(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Detached copies of the buffers (BatchNorm running mean/var and batch counters)."""
    return OrderedDict((n, b.detach().clone()) for n, b in model.named_buffers())


def state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Parameters and buffers together: everything needed to restore the model exactly."""
    out = weights(model)
    out.update(buffers(model))
    return out


@torch.no_grad()
def load(model: nn.Module, values: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``values`` (parameters and/or buffers, by name) into ``model`` in place."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = [k for k in values if k not in own]
    if unknown:
        raise KeyError(f"model has no parameter or buffer named {unknown[:5]}")
    for k, v in values.items():
        own[k].copy_(v)
    return model


def keys_like(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise if two weight dicts do not have the same keys and shapes."""
    if list(a) != list(b):
        raise ValueError("weight dicts have different keys: "
                         f"{sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"shape mismatch for {k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}")


def combine(center: Mapping[str, torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]],
            coeffs: Sequence[float]) -> "OrderedDict[str, torch.Tensor]":
    """``θ = center + Σ_i coeffs[i]·directions[i]`` (keys of ``center``; a direction may omit
    keys, which then do not move)."""
    if len(directions) != len(coeffs):
        raise ValueError(f"{len(directions)} directions but {len(coeffs)} coefficients")
    out = OrderedDict()
    for k, c in center.items():
        v = c.clone()
        for d, a in zip(directions, coeffs):
            if k in d and a != 0:
                v.add_(d[k], alpha=float(a))
        out[k] = v
    return out


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float,
         only: Iterable[str] | None = None, rest: str = "b") -> "OrderedDict[str, torch.Tensor]":
    """``(1−α)·a + α·b`` key by key.

    With ``only``, just those keys move; the others are taken from ``rest`` (``"a"`` or
    ``"b"``). ``lerp(θ₀, θ_T, α, only=layer_keys)`` is Vlaar & Frankle's layer-wise path:
    every layer trained, one layer on its way back to initialisation. Integer buffers (BatchNorm's
    ``num_batches_tracked``) are taken from ``rest`` rather than interpolated.
    """
    if rest not in ("a", "b"):
        raise ValueError(f"rest must be 'a' or 'b', got {rest!r}")
    keys_like(a, b)
    moving = set(a) if only is None else set(only)
    missing = moving - set(a)
    if missing:
        raise KeyError(f"unknown keys {sorted(missing)[:5]}")
    out = OrderedDict()
    for k in a:
        if k in moving and a[k].is_floating_point():
            out[k] = torch.lerp(a[k], b[k], float(alpha))
        else:
            out[k] = (a if rest == "a" else b)[k].clone()
    return out


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """``a − b`` key by key (e.g. the direction from one solution to another)."""
    keys_like(a, b)
    return OrderedDict((k, a[k] - b[k]) for k in a)


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Euclidean inner product of two weight dicts (over the keys of ``a``)."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def norm(a: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of a weight dict viewed as one vector."""
    return dot(a, a) ** 0.5


def to_vector(d: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a weight dict into one flat vector (``named_parameters`` order)."""
    return torch.cat([v.reshape(-1) for v in d.values()])


def from_vector(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Split a flat vector back into a dict shaped like ``like``."""
    total = sum(v.numel() for v in like.values())
    if vec.numel() != total:
        raise ValueError(f"vector has {vec.numel()} entries, the dict needs {total}")
    out, i = OrderedDict(), 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def stack(dicts: Sequence[Mapping[str, torch.Tensor]]) -> "OrderedDict[str, torch.Tensor]":
    """Stack weight dicts along a new leading dimension, for ``torch.func.vmap``."""
    if not dicts:
        raise ValueError("nothing to stack")
    return OrderedDict((k, torch.stack([d[k] for d in dicts])) for k in dicts[0])


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
            buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``f(x; θ)`` via ``functional_call``: the module's own tensors are not touched.

    Buffers default to the module's (e.g. BatchNorm's running statistics in eval mode).
    """
    if buffers is None:
        buffers = dict(model.named_buffers())
    return functional_call(model, ({**buffers, **params},), (x,), tie_weights=False, strict=False)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (whose statistics depend on the weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> nn.Module:
    """Re-estimate BatchNorm running statistics at the model's current weights.

    Resets the statistics and runs one pass over ``x`` in train mode with cumulative averaging
    (``momentum=None``), which is exactly ``torch.optim.swa_utils.update_bn``; the model's
    train/eval mode is restored. A no-op for models without BatchNorm.
    """
    if has_batchnorm(model):
        update_bn([(xb,) for xb in x.split(batch_size)], model)
    return model


def layer_groups(model: nn.Module) -> "OrderedDict[str, list[str]]":
    """Parameter names grouped by the module that owns them, in order.

    ``{"fc1": ["fc1.weight", "fc1.bias"], "bn1": [...], ...}``: the units of a layer-wise
    interpolation.
    """
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups

