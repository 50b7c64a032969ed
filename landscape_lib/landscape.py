"""Loss along lines and over planes in weight space, and the summaries the papers read off them.

A landscape is the loss evaluated at many weight-space points

.. math::  θ(c) = θ^* + \\sum_i c_i\\, d_i ,\\qquad f(c) = L(θ(c)) ,

with ``c = α`` on a line (one direction) and ``c = (α, β)`` on a plane (two). Each point needs
one forward pass over a fixed evaluation set (a training subset: the same points everywhere,
so the surface is deterministic). Two strategies compute the same numbers:

* ``loop`` — one forward pass per point through a private copy of the model whose weights are
  rewritten in place (two ``torch._foreach`` ops per point on a plane). For tiny models on one
  CPU thread this is at the FLOP floor of a per-point method (``benchmarks/peers.py`` measures it
  against a bare ``model(x)`` per point and against loss-landscapes): a 41×41 plane over a
  40-100-100-10 MLP on 1000 points is 1681 small matrix products.
* ``vmap`` — stack a chunk of points ``θ[m] = θ* + C[m]·D`` (one ``einsum`` per tensor) and map
  the model over them with ``torch.func.vmap``. On a GPU, where small models are launch-bound,
  this is what makes planes cheap; on one CPU thread the extra memory traffic makes it slower.
  Where ``vmap`` cannot batch an operation of the model (data-dependent control flow,
  ``.item()``, outputs of data-dependent shape such as ``nonzero`` or boolean-mask indexing),
  ``vmap`` raises on the first chunk and the evaluation falls back to ``loop`` with a
  :class:`VmapFallbackWarning` naming the model class and the reason. (Operations that merely
  lack a fast batching rule, like ``nn.MultiheadAttention``'s inference fast path, run through
  PyTorch's own slower per-point fallback, with PyTorch's performance warning.)

``strategy="auto"`` takes ``vmap`` on CUDA and ``loop`` elsewhere (measured, see the tests and
the README's benchmark). BatchNorm is explicit: ``bn="keep"`` evaluates in eval mode with the
centre's running statistics; ``bn="recompute"`` re-estimates them at every point on
``bn_data`` (a loop, since it runs the model in train mode).

Shape summaries (Vlaar & Frankle 2022; Li et al. 2018; Garipov et al. 2018): :func:`max_rise`,
:func:`is_monotone`, :func:`barrier`, :func:`nonconvex_fraction`. The sharpness of a slice is
:func:`.curvature.slice_sharpness`, beside the other sharpness measures.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from . import params as P
from .train import cross_entropy

BN_MODES = ("keep", "recompute")
STRATEGIES = ("auto", "loop", "vmap")

Weights = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VmapFallbackWarning(UserWarning):
    """``strategy="vmap"`` could not batch the model and the per-point loop ran instead."""


class _VmapUnsupported(Exception):
    """Raised by the first ``vmap`` chunk when ``vmap`` cannot batch an operation."""


def _vmap_cannot_batch(err: BaseException) -> bool:
    """Whether ``err`` is ``torch.func.vmap`` refusing an operation (its own messages start
    with ``vmap:``; an operation without any batching rule says "Batching rule not implemented")
    rather than an error of the model itself."""
    msg = str(err)
    return isinstance(err, RuntimeError) and (
        msg.startswith("vmap:") or "Batching rule not implemented" in msg
        or "does not yet have a batching rule" in msg)


def grid(radius: float, n: int) -> np.ndarray:
    """``n`` equally spaced coefficients on ``[−radius, radius]``."""
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if n < 1:
        raise ValueError(f"a grid needs at least one point, got n={n}")
    return np.linspace(-radius, radius, n)


def _coeffs(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a grid needs at least one point")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _caller_level() -> int:
    """``stacklevel`` for a warning raised in this module: the first frame outside it."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def resolve_strategy(strategy: str, device: torch.device, bn: str) -> str:
    """Pick ``loop`` or ``vmap`` (see the module docstring) and check the combination."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; valid bn modes: {', '.join(BN_MODES)}")
    if bn == "recompute":
        if strategy == "vmap":
            raise ValueError("bn='recompute' runs the model in train mode at every point and "
                             "needs strategy 'loop' (or 'auto')")
        return "loop"
    if strategy == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return strategy


@dataclass
class Points:
    """Loss and accuracy at a list of weight-space points (NumPy arrays, one entry per point)."""

    loss: np.ndarray
    acc: np.ndarray


def evaluate(model: nn.Module, center: Weights, directions: Sequence[Weights],
             coeffs: np.ndarray, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn: LossFn = cross_entropy, bn: str = "keep", bn_data: torch.Tensor | None = None,
             strategy: str = "auto", chunk_size: int | None = None, group="auto") -> Points:
    """Loss and accuracy at ``center + Σ_i coeffs[p, i]·directions[i]`` for every row ``p``.

    ``loss_fn`` must return the mean loss over a batch (like ``F.cross_entropy``). With
    ``strategy="vmap"`` (or ``"auto"`` on CUDA), a model or loss that ``torch.func.vmap`` cannot
    batch is evaluated by the loop instead, with a :class:`VmapFallbackWarning`.

    **Sharded over ranks.** When ``torch.distributed`` is initialised, the points are split over
    the ranks of ``group`` (``"auto"``: the default group; a ``ProcessGroup``; ``None``: do not
    shard): rank ``r`` of ``R`` evaluates the ``r``-th of ``R`` contiguous blocks of rows, and an
    ``all_gather`` gives every rank the whole result, identical to the one-process one (each point
    is evaluated exactly as it would be alone). Works with ``gloo`` on CPUs and ``nccl`` on GPUs
    (launch with ``torchrun --nproc-per-node N``); every rank must call with the same arguments.
    """
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if coeffs.ndim != 2 or coeffs.shape[1] != len(directions):
        raise ValueError(f"coeffs must have shape [points, {len(directions)}], got {coeffs.shape}")
    if coeffs.shape[0] == 0:
        raise ValueError("no points to evaluate: a grid needs at least one point")
    for d in directions:
        missing = set(d) - set(center)
        if missing:
            raise KeyError(f"direction has keys the centre lacks: {sorted(missing)[:5]}")
        for k, v in d.items():
            if not center[k].is_floating_point() and bool(v.any()):
                raise ValueError(f"a direction moves {k!r}, an integer tensor ({center[k].dtype}) of the "
                                 "centre: directions move floating-point weights only")
    # zero entries for integer tensors move nothing: drop them (the loop's in-place adds refuse
    # a float coefficient on an integer tensor)
    directions = [{k: v for k, v in d.items() if center[k].is_floating_point()} for d in directions]
    device = next(iter(center.values())).device
    how = resolve_strategy(strategy, device, bn)
    if bn == "recompute" and bn_data is None:
        raise ValueError("bn='recompute' needs bn_data (training inputs to re-estimate statistics)")
    pg = _process_group(group)
    if pg is not None:
        return _evaluate_sharded(pg, model, center, directions, coeffs, x, y, loss_fn=loss_fn, bn=bn,
                                 bn_data=bn_data, strategy=strategy, chunk_size=chunk_size)
    was_training = model.training
    model.eval()
    try:
        if how == "vmap":
            try:
                return _evaluate_vmap(model, center, directions, coeffs, x, y, loss_fn,
                                      256 if chunk_size is None else chunk_size)
            except _VmapUnsupported as err:
                warnings.warn(f"torch.func.vmap cannot batch {type(model).__name__} "
                              f"({str(err.__cause__).splitlines()[0]}); evaluating point by point "
                              "(strategy='loop')",
                              VmapFallbackWarning, stacklevel=_caller_level())
        return _evaluate_loop(model, center, directions, coeffs, x, y, loss_fn, bn, bn_data)
    finally:
        model.train(was_training)


def _process_group(group):
    """The process group to shard over, or None (not distributed, one rank, or ``group=None``)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group != "auto":
            raise ValueError("a process group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group, e.g. under torchrun)")
        return None
    pg = dist.group.WORLD if group == "auto" else group
    return pg if dist.get_world_size(pg) > 1 else None


def _evaluate_sharded(pg, model, center, directions, coeffs, x, y, **kwargs) -> Points:
    """This rank's contiguous block of the rows, then an all_gather of every rank's results."""
    import torch.distributed as dist

    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    bounds = np.linspace(0, len(coeffs), world + 1).round().astype(int)
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = (evaluate(model, center, directions, coeffs[lo:hi], x, y, group=None, **kwargs)
            if hi > lo else Points(np.zeros(0), np.zeros(0)))
    longest = int(np.max(np.diff(bounds)))
    # gloo and nccl gather tensors of one shape on the group's device: pad every block to the
    # longest, as float64 [2, longest] (loss, accuracy)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" \
        else torch.device("cpu")
    block = torch.zeros(2, longest, dtype=torch.float64, device=device)
    block[0, :hi - lo] = torch.as_tensor(mine.loss, dtype=torch.float64)
    block[1, :hi - lo] = torch.as_tensor(mine.acc, dtype=torch.float64)
    parts = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(parts, block, group=pg)
    loss = np.concatenate([parts[r][0, :bounds[r + 1] - bounds[r]].cpu().numpy() for r in range(world)])
    acc = np.concatenate([parts[r][1, :bounds[r + 1] - bounds[r]].cpu().numpy() for r in range(world)])
    return Points(loss, acc)


def _by_tensor(model, center, directions):
    """One entry per tensor of the model that ``center`` names: names of one tensor (a tied
    weight, a module used twice) form a group. Returns ``(groups, center, directions)`` keyed by
    each group's first name: the centre is the group's last name's value (as writing every name
    into the shared tensor in turn leaves it), and a direction moves the tensor by the sum of
    its entries over the group's names (absent if it names none)."""
    slots = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    groups: dict[int, list[str]] = {}
    for k in center:
        groups.setdefault(id(slots[k]) if k in slots else id(k), []).append(k)
    groups_list = list(groups.values())
    c = {g[0]: center[g[-1]] for g in groups_list}
    ds = []
    for d in directions:
        out = {}
        for g in groups_list:
            parts = [d[k] for k in g if k in d]
            if parts:
                out[g[0]] = sum(parts[1:], parts[0])
        ds.append(out)
    return groups_list, c, ds


def _evaluate_loop(model, center, directions, coeffs, x, y, loss_fn, bn, bn_data) -> Points:
    """One forward pass per point through a private copy of the model, whose tensors are
    rewritten in place for every point: ``θ(c) = ((θ* + c_0 d_0) + c_1 d_1) + …`` by
    ``torch._foreach`` ops over all tensors (the same arithmetic, in the same order, as building
    it tensor by tensor). The partial sum before the last direction is kept while the leading
    coefficients do not change (along a row of a plane), so most points cost one copy and one
    add. Calling the copy directly costs nothing over a bare ``model(x)``; ``functional_call``
    per point cost about 6 % more on a small MLP. Loss and accuracy stay tensors until the end
    (no synchronisation per point on a GPU)."""
    work = copy.deepcopy(model)
    work.requires_grad_(False)
    slots = {**dict(work.named_parameters(remove_duplicate=False)),
             **dict(work.named_buffers(remove_duplicate=False))}
    unknown = [k for k in center if k not in slots]
    if unknown:
        raise KeyError(f"the centre has keys that are not parameters or buffers of the model: "
                       f"{unknown[:5]}; valid names include {list(slots)[:5]}")
    _, center, directions = _by_tensor(work, center, directions)
    names = list(center)
    src = [center[k] for k in names]
    dst = [slots[k] for k in names]
    prefix = [t.clone() for t in src] if len(directions) > 1 else None
    # per direction: (the model's tensors it moves, the prefix's tensors it moves, its tensors)
    moves = [([slots[k] for k in names if k in d],
              [prefix[i] for i, k in enumerate(names) if k in d] if prefix is not None else [],
              [d[k] for k in names if k in d]) for d in directions]
    losses, hits = [], []
    work.eval()
    prefix_key = None
    # inference mode skips autograd's bookkeeping; recomputing BatchNorm statistics writes
    # buffers in train mode, which plain no_grad keeps simple
    with (torch.no_grad() if bn == "recompute" else torch.inference_mode()):
        for row in np.asarray(coeffs, dtype=np.float64).tolist():
            if prefix is None:
                torch._foreach_copy_(dst, src)
            else:
                if row[:-1] != prefix_key:
                    torch._foreach_copy_(prefix, src)
                    for (_, pre, d), a in zip(moves, row[:-1]):
                        if a != 0.0 and d:
                            torch._foreach_add_(pre, d, alpha=a)
                    prefix_key = row[:-1]
                torch._foreach_copy_(dst, prefix)
            to, _, d = moves[-1]
            if row[-1] != 0.0 and d:
                torch._foreach_add_(to, d, alpha=row[-1])
            if bn == "recompute":
                P.recompute_bn(work, bn_data)
                work.eval()
            out = work(x)
            losses.append(loss_fn(out, y).detach())
            hits.append((out.argmax(1) == y).sum())
    loss = torch.stack(losses).double().cpu().numpy()
    acc = torch.stack(hits).double().cpu().numpy() / len(y)
    return Points(loss, acc)


def _evaluate_vmap(model, center, directions, coeffs, x, y, loss_fn, chunk_size) -> Points:
    with torch.no_grad():
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        buffers = dict(model.named_buffers())
        # one entry per tensor (tied names share one, as in the loop)
        groups, base, dirs = _by_tensor(model, center, directions)
        # integer tensors of the centre (BatchNorm's num_batches_tracked in a state_dict) are
        # held as they are, the same for every point, as the loop copies them
        fixed = {k: v for k, v in base.items() if not v.is_floating_point()}
        base = {k: v for k, v in base.items() if k not in fixed}
        if not base:
            raise ValueError("the centre has no floating-point tensor to move")
        held = {k: fixed[g[0]] for g in groups if g[0] in fixed for k in g}
        groups = [g for g in groups if g[0] in base]
        dtype = next(iter(base.values())).dtype
        device = next(iter(base.values())).device
        # D[k]: [n_dirs, *shape] (zeros where a direction leaves a tensor alone)
        stacked = {k: torch.stack([d[k] if k in d else torch.zeros_like(c) for d in dirs])
                   for k, c in base.items()}

        def logits(theta):
            return functional_call(model, ({**buffers, **held, **theta},), (x,), tie_weights=False)

        batched = vmap(logits)
        batched_loss = vmap(loss_fn, in_dims=(0, None))
        losses, accs = [], []
        for start in range(0, len(coeffs), chunk_size):
            cm = torch.as_tensor(coeffs[start:start + chunk_size], dtype=dtype, device=device)
            # θ[m] = θ* + Σ_i C[m, i] D_i  for every tensor, as one contraction
            moved = {k: base[k].unsqueeze(0) + torch.tensordot(cm, stacked[k], dims=1) for k in base}
            theta = {k: moved[g[0]] for g in groups for k in g}
            try:
                out = batched(theta)  # [m, N, classes]
                loss = batched_loss(out, y)
            except RuntimeError as err:
                # the first chunk tells whether vmap can batch this model and loss at all
                if start == 0 and _vmap_cannot_batch(err):
                    raise _VmapUnsupported() from err
                raise
            losses.append(loss.double().cpu())
            accs.append((out.argmax(-1) == y).double().mean(1).cpu())
        return Points(torch.cat(losses).numpy(), torch.cat(accs).numpy())


@dataclass
class Line:
    """A 1-D slice: ``loss[i] = L(center + alphas[i]·direction)``."""

    alphas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray


@dataclass
class Surface:
    """A 2-D slice: ``loss[j, i] = L(center + alphas[i]·d1 + betas[j]·d2)`` (rows are β)."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray


def line(model: nn.Module, center: Weights, direction: Weights, alphas, x: torch.Tensor,
         y: torch.Tensor, **kwargs) -> Line:
    """Loss and accuracy along ``center + α·direction`` for each α (see :func:`evaluate`)."""
    a = _coeffs(alphas, "alphas")
    pts = evaluate(model, center, [direction], a[:, None], x, y, **kwargs)
    return Line(a, pts.loss, pts.acc)


def plane(model: nn.Module, center: Weights, d1: Weights, d2: Weights, alphas, betas,
          x: torch.Tensor, y: torch.Tensor, **kwargs) -> Surface:
    """Loss and accuracy over ``center + α·d1 + β·d2`` on the grid ``betas × alphas``."""
    a, b = _coeffs(alphas, "alphas"), _coeffs(betas, "betas")
    aa, bb = np.meshgrid(a, b, indexing="ij")  # [len(a), len(b)]: α slow, β fast
    coeffs = np.stack([aa.ravel(), bb.ravel()], 1)
    pts = evaluate(model, center, [d1, d2], coeffs, x, y, **kwargs)
    shape = (len(a), len(b))
    return Surface(a, b, pts.loss.reshape(shape).T.copy(), pts.acc.reshape(shape).T.copy())


def states(model: nn.Module, points: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor,
           y: torch.Tensor, *, loss_fn: LossFn = cross_entropy, bn: str = "keep",
           bn_data: torch.Tensor | None = None) -> Points:
    """Loss and accuracy at arbitrary weight dicts (which may carry buffers too).

    For paths that are not straight lines in one set of coordinates: interpolations that carry
    BatchNorm buffers along (Li et al.'s ``dir_type=states``), points on curves. ``bn`` as in
    :func:`evaluate`: ``keep`` uses the buffers in each point (or the model's), ``recompute``
    re-estimates them at each point on ``bn_data``.
    """
    with torch.no_grad():
        if not points:
            raise ValueError("no points to evaluate: a path needs at least one point")
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; valid bn modes: {', '.join(BN_MODES)}")
        if bn == "recompute" and bn_data is None:
            raise ValueError("bn='recompute' needs bn_data (training inputs to re-estimate statistics)")
        work = copy.deepcopy(model)
        losses, accs = [], []
        for point in points:
            P.load(work, point)
            if bn == "recompute":
                P.recompute_bn(work, bn_data)
            work.eval()
            out = work(x)
            losses.append(loss_fn(out, y).item())
            accs.append((out.argmax(1) == y).float().mean().item())
        return Points(np.array(losses), np.array(accs))


# --- shape summaries -------------------------------------------------------------------------

def max_rise(values) -> float:
    """``max_k [L_k − min_{j≤k} L_j]``: the largest climb above the best value seen so far.

    Zero for a path that never goes up (Vlaar & Frankle's non-monotonicity measure).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("empty path")
    return float(np.max(v - np.minimum.accumulate(v)))


def is_monotone(values, tol: float = 1e-3) -> bool:
    """Whether ``L(α_{k+1}) ≤ L(α_k) + tol`` for every step (non-increasing up to ``tol``)."""
    if tol < 0:
        raise ValueError(f"tolerance must be non-negative, got {tol}")
    v = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.diff(v) <= tol))


def barrier(alphas, values) -> float:
    """``max_α [L(α) − ((1−α)L(0) + αL(1))]`` on a path sampled at ``alphas`` ⊂ [0, 1].

    The height of the bump above the straight chord between the endpoints (Garipov et al.'s
    and Frankle et al.'s loss barrier); ≤ 0 means no barrier.
    """
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if a.shape != v.shape or a.size < 2:
        raise ValueError("barrier needs matching alphas and values with at least two points")
    i0, i1 = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(a - 1.0)))
    if abs(a[i0]) > 1e-9 or abs(a[i1] - 1.0) > 1e-9:
        raise ValueError("barrier needs the endpoints α = 0 and α = 1 among the alphas")
    inside = (a >= 0) & (a <= 1)
    chord = (1 - a) * v[i0] + a * v[i1]
    return float(np.max((v - chord)[inside]))


def nonconvex_fraction(surface: Surface, rel: float = 0.05) -> float:
    """Share of interior grid points where the 2-D slice is locally non-convex.

    At each interior point the 2×2 Hessian of ``f(α, β) = L(θ + αδ + βη)`` is estimated by
    central finite differences (``f_αα, f_ββ, f_αβ`` on the grid spacing); the point counts as
    non-convex when that 2×2 matrix has ``λ_min < −rel·|λ_max|``.

    This is *not* the test Li et al. map. They compute the extreme eigenvalues of the full
    Hessian ``∇²L`` at each point of the plane (Lanczos) and plot ``|λ_min/λ_max|``. The slice's
    Hessian is the restriction ``Dᵀ ∇²L D`` of the full one to the plane (``D = [δ, η]``): a
    negative eigenvalue of it is a direction of negative curvature of ``L``, so a point counted
    here is non-convex in the full space as well, but ``∇²L`` can have negative curvature off
    the plane that the slice does not see, and the 2×2 ratio is not the full ratio. For
    ``rel ≥ 0`` the fraction is therefore only a **lower bound** of the share of points with
    ``λ_min(∇²L) < 0`` (up to the finite-difference error at the scale of the grid spacing, which
    measures curvature averaged over one grid step, not at a point).
    """
    f = np.asarray(surface.loss, dtype=np.float64)
    if f.shape[0] < 3 or f.shape[1] < 3:
        raise ValueError("non-convex fraction needs a grid of at least 3×3 points")
    ha = float(np.mean(np.diff(surface.alphas)))
    hb = float(np.mean(np.diff(surface.betas)))
    c = f[1:-1, 1:-1]
    faa = (f[1:-1, 2:] - 2 * c + f[1:-1, :-2]) / ha ** 2
    fbb = (f[2:, 1:-1] - 2 * c + f[:-2, 1:-1]) / hb ** 2
    fab = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / (4 * ha * hb)
    mean = (faa + fbb) / 2
    root = np.sqrt(((faa - fbb) / 2) ** 2 + fab ** 2)
    lmax, lmin = mean + root, mean - root
    bad = lmin < -rel * np.abs(lmax)
    return float(bad.mean())
