"""Curves between solutions in weight space: Bezier curves and polygonal chains, trained through
``torch.func.functional_call`` for any ``nn.Module``.

**Mode connectivity** (Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, NeurIPS 2018,
arXiv 1802.10026; code ``timgaripov/dnn-mode-connectivity``). Two independently trained networks
``ŵ₁, ŵ₂`` are joined by a curve ``φ_θ(t)``, ``t ∈ [0, 1]``, ``φ(0) = ŵ₁``, ``φ(1) = ŵ₂``, whose
bends ``θ`` are trained so that the loss is low *along the whole curve*. With control points
``P_0 = ŵ₁, P_1 … P_{n−1} = θ, P_n = ŵ₂``, the curve is ``φ(t) = Σ_j c_j(t) P_j`` with

* **Bezier** — the Bernstein basis ``c_j(t) = C(n, j) tʲ (1−t)ⁿ⁻ʲ``; one bend (``n = 2``) is the
  quadratic ``φ(t) = (1−t)² ŵ₁ + 2t(1−t) θ + t² ŵ₂``;
* **PolyChain** — hat functions on the knots ``j/n``: ``c_j(t) = max(0, 1 − |n t − j|)``; one bend
  is the chain ``ŵ₁ → θ → ŵ₂`` with ``φ(½) = θ``.

The objective is the loss averaged uniformly over ``t``,

.. math::  ℓ(θ) = E_{t∼U[0,1]} \\big[ L(φ_θ(t)) + ½·wd·‖φ_θ(t)‖² \\big],

estimated with **one** ``t`` per mini-batch; the weight decay acts on the point on the curve,
not on the bends (the optimiser's own weight decay is 0), as in the official code. Endpoints are
frozen (buffers), bends are the only ``nn.Parameter`` s, initialised on the straight segment
(``P_j = (1 − j/n)·ŵ₁ + (j/n)·ŵ₂``, the midpoint for one bend), so an untrained curve *is* the
straight line; ``n_bends=0`` gives the line itself (the official ``--num_bends=3`` counts
both endpoints: it is ``n_bends=1`` here). More than two fixed points are allowed
(bends are inserted between consecutive ones); a polychain passes through all of them, a Bezier
curve only through the first and the last.

**BatchNorm.** During training the template model runs in train mode (batch statistics); its
running statistics are shared by all ``t`` and meaningless. :func:`evaluate` therefore
re-estimates them at every ``φ(t)`` on training inputs (``torch.optim.swa_utils.update_bn`` via
:func:`~landscape_lib.params.recompute_bn`), as the official ``eval_curve.py`` does, and
returns, besides the values at each ``t``, the segment lengths ``dl_i = ‖φ(t_i) − φ(t_{i−1})‖``
for the **arc-length–weighted average** ``Σ_i ½(v_{i−1} + v_i)·dl_i / Σ_i dl_i`` (the ``int``
column of ``eval_curve.py``; the uniform-in-t mean over-weights slow segments).

**The plane through the curve** (the paper's Figure 1 and footnote 1): Gram–Schmidt on
``ŵ₂ − ŵ₁`` and ``θ − ŵ₁`` (:func:`~landscape_lib.directions.plane_through`). A one-bend curve
lies in it exactly; :func:`project` gives the curve's coordinates there.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import data as D, directions, params as P, schedules, train

KINDS = ("bezier", "polychain")

Weights = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    return t


def bezier_coefficients(t: float, n_points: int) -> list[float]:
    """Bernstein weights ``C(n, j) tʲ (1−t)ⁿ⁻ʲ`` of ``n_points = n + 1`` control points."""
    t = _check_t(t)
    if n_points < 2:
        raise ValueError(f"a curve needs at least 2 control points, got {n_points}")
    n = n_points - 1
    return [math.comb(n, j) * t ** j * (1.0 - t) ** (n - j) for j in range(n_points)]


def polychain_coefficients(t: float, n_points: int) -> list[float]:
    """Hat-function weights ``max(0, 1 − |n t − j|)`` of a chain through the knots ``j/n``."""
    t = _check_t(t)
    if n_points < 2:
        raise ValueError(f"a curve needs at least 2 control points, got {n_points}")
    n = n_points - 1
    return [max(0.0, 1.0 - abs(n * t - j)) for j in range(n_points)]


def coefficients(kind: str, t: float, n_points: int) -> list[float]:
    """``c_j(t)`` of a ``bezier`` or ``polychain`` curve with ``n_points`` control points."""
    if kind not in KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return (bezier_coefficients if kind == "bezier" else polychain_coefficients)(t, n_points)


class Curve(nn.Module):
    """A curve ``φ(t) = Σ_j c_j(t) P_j`` through frozen endpoints with trainable bends.

    Parameters
    ----------
    model
        Any ``nn.Module``; a private deep copy serves as the template evaluated through
        ``functional_call`` (its parameters are not the curve's parameters).
    endpoints
        Two (or more) weight dicts ``{name: tensor}`` (``params.weights(model)``) with the keys
        and shapes of the model's trainable parameters.
    kind
        ``"bezier"`` or ``"polychain"``.
    n_bends
        Trainable control points between each pair of consecutive endpoints (0: the straight
        segment; 1: the paper's quadratic Bezier / one-bend chain).

    ``curve.weights(t)`` is the weight dict at ``t`` (differentiable in the bends);
    ``curve(x, t)`` is the model's output there, and ``curve(x)`` in train mode samples
    ``t ~ U[0, 1]`` (one per call, i.e. per mini-batch) and remembers it for :meth:`penalty`.
    """

    def __init__(self, model: nn.Module, endpoints: Sequence[Weights], kind: str = "bezier",
                 n_bends: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown curve kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if isinstance(n_bends, bool) or not isinstance(n_bends, int) or n_bends < 0:
            raise ValueError(f"n_bends must be a non-negative integer, got {n_bends!r}")
        if len(endpoints) < 2:
            raise ValueError(f"a curve needs at least two endpoints, got {len(endpoints)}")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        first = None
        for e in endpoints:
            missing, extra = set(names) - set(e), set(e) - set(names)
            if missing or extra:
                raise ValueError(f"endpoint keys do not match the model's parameters: missing "
                                 f"{sorted(missing)[:5]}, unknown {sorted(extra)[:5]}")
            # Keys are matched by name, in the model's order: an endpoint may list them in any
            # order (the shapes are compared with the first endpoint's, also in that order).
            ordered = OrderedDict((k, e[k]) for k in names)
            first = ordered if first is None else first
            P.keys_like(ordered, first)
        self.kind, self.n_bends, self.names = kind, n_bends, names
        self.generator = generator
        # The template is not a submodule: its tensors must not show up in curve.parameters().
        template = copy.deepcopy(model)
        for p in template.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "template", template)
        # Control points in order: fixed, n_bends bends, fixed, ...; bends on the segment.
        self.bends = nn.ModuleList()
        self._slots: list[tuple[str, int]] = []  # ("fixed", i) or ("bend", i) per control point
        for i, e in enumerate(endpoints):
            for j, k in enumerate(names):
                self.register_buffer(f"end{i}_{j}", e[k].detach().clone())
            self._slots.append(("fixed", i))
            if i + 1 < len(endpoints):
                for b in range(1, n_bends + 1):
                    a = b / (n_bends + 1)
                    nxt = endpoints[i + 1]
                    self.bends.append(nn.ParameterList(
                        [nn.Parameter(torch.lerp(e[k].detach(), nxt[k].detach(), a).clone())
                         for k in names]))
                    self._slots.append(("bend", len(self.bends) - 1))
        self.n_endpoints = len(endpoints)
        self.last_t: float | None = None
        self.last_weights: OrderedDict | None = None

    # --- geometry -------------------------------------------------------------------------

    @property
    def n_points(self) -> int:
        """Number of control points (endpoints and bends)."""
        return len(self._slots)

    def _tensors(self, slot: tuple[str, int]) -> list[torch.Tensor]:
        what, i = slot
        if what == "fixed":
            return [getattr(self, f"end{i}_{j}") for j in range(len(self.names))]
        return list(self.bends[i])

    def control_points(self) -> list["OrderedDict[str, torch.Tensor]"]:
        """The control points ``P_0 … P_n`` as weight dicts (detached copies)."""
        return [OrderedDict((k, v.detach().clone()) for k, v in zip(self.names, self._tensors(s)))
                for s in self._slots]

    def endpoints(self) -> list["OrderedDict[str, torch.Tensor]"]:
        """The frozen points, in order."""
        return [p for p, s in zip(self.control_points(), self._slots) if s[0] == "fixed"]

    def bend_points(self) -> list["OrderedDict[str, torch.Tensor]"]:
        """The trainable bends θ, in order (detached copies)."""
        return [p for p, s in zip(self.control_points(), self._slots) if s[0] == "bend"]

    def coefficients(self, t: float) -> list[float]:
        """``c_j(t)`` for this curve's control points."""
        return coefficients(self.kind, t, self.n_points)

    def weights(self, t: float) -> "OrderedDict[str, torch.Tensor]":
        """``φ(t) = Σ_j c_j(t) P_j`` as a weight dict (differentiable in the bends)."""
        coeffs = self.coefficients(t)
        points = [self._tensors(s) for s in self._slots]
        out = OrderedDict()
        for j, k in enumerate(self.names):
            value = None
            for c, pts in zip(coeffs, points):
                if c != 0.0:
                    value = c * pts[j] if value is None else value + c * pts[j]
            out[k] = value
        return out

    # --- as a module ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """The model's output at ``φ(t)``; ``t=None`` draws ``t ~ U[0, 1]`` (train mode only)."""
        if t is None:
            if not self.training:
                raise ValueError("a curve in eval mode needs an explicit t; random t is for "
                                 "training (use curves.evaluate to evaluate along the curve)")
            t = float(torch.rand((), generator=self.generator))
        w = self.weights(t)
        self.last_t, self.last_weights = float(t), w
        self.template.train(self.training)
        return functional_call(self.template, (w,), (x,), tie_weights=True, strict=False)

    def penalty(self, weight_decay: float) -> torch.Tensor:
        """``½·wd·‖φ(t)‖²`` at the ``t`` of the last forward pass (the point, not the bends)."""
        if self.last_weights is None:
            raise RuntimeError("call the curve on a batch first: the penalty is taken at its t")
        return 0.5 * weight_decay * sum((v ** 2).sum() for v in self.last_weights.values())

    def model_at(self, t: float) -> nn.Module:
        """A stand-alone copy of the model with the weights ``φ(t)`` (buffers of the template)."""
        m = copy.deepcopy(self.template)
        with torch.no_grad():
            P.load(m, self.weights(t))
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    def train(self, mode: bool = True) -> "Curve":
        super().train(mode)
        self.template.train(mode)
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .double() also move the (unregistered) template.
        super()._apply(fn, *args, **kwargs)
        self.template._apply(fn, *args, **kwargs)
        return self


def curve_loss(curve: Curve, weight_decay: float, loss_fn: LossFn = F.cross_entropy) -> LossFn:
    """``loss(out, y) = loss_fn(out, y) + ½·wd·‖φ(t)‖²`` at the ``t`` the curve just sampled."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss_fn(out, y)
        return value + curve.penalty(weight_decay) if weight_decay > 0 else value

    return loss


def fit(curve: Curve, data: D.Dataset, *, epochs: int, lr: float, weight_decay: float = 5e-4,
        momentum: float = 0.9, batch_size: int = 128, final_lr_ratio: float = 0.01,
        loss_fn: LossFn = F.cross_entropy, **fit_kwargs) -> train.History:
    """Train the bends: one ``t ~ U[0, 1]`` per batch, loss ``L(φ(t)) + ½·wd·‖φ(t)‖²``.

    SGD with momentum (optimiser weight decay 0) and the official code's schedule (the SWA
    shape, :func:`~landscape_lib.schedules.swa_lr`): ``lr`` for the first 50 % of the epochs,
    linear decay to ``final_lr_ratio·lr`` by 90 %, then constant. Runs through
    :func:`landscape_lib.train.fit` (progress bar, divergence detection, history; no test
    evaluation, which has no meaning at a random ``t``); ``fit_kwargs`` go there (``augment``,
    ``generator``, ``callbacks``, ``progress``...).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 < final_lr_ratio <= 1:
        raise ValueError(f"final_lr_ratio must lie in (0, 1], got {final_lr_ratio}")
    if not list(curve.parameters()):
        raise ValueError("the curve has no bends to train (n_bends=0 is the straight line)")
    opt = torch.optim.SGD(curve.parameters(), lr=lr, momentum=momentum, weight_decay=0.0)
    steps = D.n_batches(len(data.x_train), batch_size)
    sched = schedules.per_batch(opt, lambda e: schedules.swa_lr(
        e, lr_init=lr, swa_lr=lr * final_lr_ratio, swa_start=max(epochs, 1)), steps)
    fit_kwargs.setdefault("desc", f"{curve.kind} curve")
    return train.fit(curve, data, optimizer=opt, scheduler=sched, epochs=epochs,
                     batch_size=batch_size, loss_fn=curve_loss(curve, weight_decay, loss_fn),
                     eval_every=0, **fit_kwargs)


# --- evaluation along the curve ----------------------------------------------------------

def arc_average(values, dl) -> float:
    """``Σ_i ½(v_{i−1} + v_i)·dl_i / Σ_i dl_i``: the arc-length–weighted mean of ``values``."""
    v, d = np.asarray(values, dtype=np.float64), np.asarray(dl, dtype=np.float64)
    if v.shape != d.shape or v.size < 2:
        raise ValueError("arc_average needs matching values and lengths with at least 2 points")
    if d[1:].sum() <= 0:
        raise ValueError("the curve has zero length")
    return float(np.sum(0.5 * (v[:-1] + v[1:]) * d[1:]) / np.sum(d[1:]))


@dataclass
class CurveStats:
    """Values at the points ``ts`` of a curve (NumPy arrays, one entry per ``t``).

    ``dl[i] = ‖φ(t_i) − φ(t_{i−1})‖`` (``dl[0] = 0``); ``sq_norm[i] = ‖φ(t_i)‖²``;
    ``*_nll`` is the mean cross-entropy (``loss_fn``), ``*_acc`` the accuracy.
    """

    ts: np.ndarray
    dl: np.ndarray
    sq_norm: np.ndarray
    train_nll: np.ndarray
    train_acc: np.ndarray
    test_nll: np.ndarray
    test_acc: np.ndarray

    @property
    def train_err(self) -> np.ndarray:
        return 1.0 - self.train_acc

    @property
    def test_err(self) -> np.ndarray:
        return 1.0 - self.test_acc

    @property
    def length(self) -> float:
        """Length of the polygon through the evaluated points (≈ the curve's arc length)."""
        return float(self.dl.sum())

    def train_loss(self, weight_decay: float) -> np.ndarray:
        """``nll + ½·wd·‖φ(t)‖²``: the training objective (``eval_curve.py``'s "train loss")."""
        return self.train_nll + 0.5 * weight_decay * self.sq_norm

    def summary(self, values) -> dict[str, float]:
        """``start, end, min, max, avg`` (uniform in t) and ``int`` (arc-length weighted)."""
        v = np.asarray(values, dtype=np.float64)
        return {"start": float(v[0]), "end": float(v[-1]), "min": float(v.min()),
                "max": float(v.max()), "avg": float(v.mean()), "int": arc_average(v, self.dl)}


def evaluate(curve: Curve, ts, x_train: torch.Tensor, y_train: torch.Tensor,
             x_test: torch.Tensor, y_test: torch.Tensor, *, bn_data: torch.Tensor | None = None,
             loss_fn: LossFn = train.cross_entropy, batch_size: int = 4096) -> CurveStats:
    """Loss and accuracy at each ``t`` in ``ts`` on train and test data.

    For models with BatchNorm the running statistics are re-estimated at every ``φ(t)`` on
    ``bn_data`` (default: ``x_train``) before evaluating in eval mode.
    """
    with torch.no_grad():
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        if ts.size == 0:
            raise ValueError("no values of t to evaluate: pass at least one")
        for t in ts:
            _check_t(t)
        bn_data = x_train if bn_data is None else bn_data
        work = copy.deepcopy(curve.template)
        rows, dl, sq, prev = [], [], [], None
        for t in ts:
            w = curve.weights(float(t))
            vec = P.to_vector(w)
            dl.append(0.0 if prev is None else float((vec - prev).double().norm()))
            sq.append(float(vec.double().pow(2).sum()))
            prev = vec
            P.load(work, w)
            P.recompute_bn(work, bn_data, batch_size=batch_size)
            work.eval()
            row = []
            for x, y in ((x_train, y_train), (x_test, y_test)):
                out = torch.cat([work(xb) for xb in x.split(batch_size)])
                row += [float(loss_fn(out, y)), float((out.argmax(1) == y).float().mean())]
            rows.append(row)
        r = np.asarray(rows)
        return CurveStats(ts=ts, dl=np.asarray(dl), sq_norm=np.asarray(sq), train_nll=r[:, 0],
                          train_acc=r[:, 1], test_nll=r[:, 2], test_acc=r[:, 3])


# --- the plane through the curve ---------------------------------------------------------

def plane(curve: Curve, bend: int | None = None) -> directions.Plane:
    """The plane through the first endpoint, the last endpoint and a bend (Gram–Schmidt).

    ``bend`` indexes :meth:`Curve.bend_points` (default: the middle one). The plane has
    ``origin = ŵ₁``, ``u ∥ ŵ₂ − ŵ₁`` and ``v`` the part of ``θ − ŵ₁`` orthogonal to ``u``;
    a one-bend curve between two endpoints lies in it exactly.
    """
    bends = curve.bend_points()
    if not bends:
        raise ValueError("a curve without bends (the straight line) spans no plane")
    i = len(bends) // 2 if bend is None else bend
    if not 0 <= i < len(bends):
        raise ValueError(f"bend index {i} out of range 0..{len(bends) - 1}")
    ends = curve.endpoints()
    return directions.plane_through(ends[0], ends[-1], bends[i])


def project(curve: Curve, pl: directions.Plane, ts) -> np.ndarray:
    """Coordinates ``[len(ts), 2]`` of ``φ(t)`` projected onto the plane ``pl``."""
    with torch.no_grad():
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        return np.array([pl.project(curve.weights(float(t))) for t in ts])
