"""Directions in weight space: random (filter-, layer- or globally normalised), between two
solutions, principal components of a trajectory, and planes through three points.

**Filter normalisation** (Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018, arXiv 1712.09913).
ReLU networks are invariant to rescaling a layer by ``c`` and the next by ``1/c``, so the raw
distance ``‖d‖`` means different things at different solutions. Draw ``d ~ N(0, I)`` and give
every *filter* (a conv output channel, or a row of a linear weight matrix) the norm of the
matching filter of the weights θ:

.. math::  d_{i,j} \\leftarrow \\frac{d_{i,j}}{\\lVert d_{i,j} \\rVert}\\, \\lVert θ_{i,j} \\rVert

(layer ``i``, filter ``j``). Biases and normalisation parameters (1-D tensors) get direction
0 (the official code's ``--xignore biasbn``) or, with ``ignore_biasbn=False``, a copy of their
own values. ``layer`` normalisation uses whole tensors instead of filters; ``global`` rescales
the whole direction to ``‖θ‖`` (one scalar, so scale symmetries still distort it); ``none``
leaves the Gaussian as drawn.

**Trajectory PCA.** Stack ``θ_k − θ_final`` over saved iterates, centre the rows and take the
top right-singular vectors: the plane in which the optimisation path actually moved.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from . import params as P

NORMALIZATIONS = ("filter", "layer", "global", "none")

Weights = Mapping[str, torch.Tensor]


def _weights_of(center: Weights | nn.Module) -> Weights:
    return P.weights(center) if isinstance(center, nn.Module) else center


def normalize(direction: Weights, weights: Weights, norm: str = "filter",
              ignore_biasbn: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Normalise ``direction`` against ``weights`` (see the module docstring); returns a copy."""
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {norm!r}; valid normalizations: "
                         f"{', '.join(NORMALIZATIONS)}")
    P.keys_like(direction, weights)
    out = OrderedDict()
    for k, d in direction.items():
        w = weights[k]
        d = d.clone()
        if norm == "global":
            pass  # rescaled as a whole below
        elif d.dim() <= 1:
            # Biases and BN gains/shifts: zero (biasbn ignored) or the weights themselves.
            d = torch.zeros_like(d) if ignore_biasbn else w.clone()
        elif norm == "filter":
            # One scale per output filter: rows of a Linear weight, output channels of a conv.
            d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            scale = w_rows.norm(dim=1) / (d_rows.norm(dim=1) + 1e-10)
            d = (d_rows * scale[:, None]).view_as(d)
        elif norm == "layer":
            d = d * (w.norm() / (d.norm() + 1e-10))
        out[k] = d
    if norm == "global":
        if ignore_biasbn:
            out = OrderedDict((k, torch.zeros_like(v) if v.dim() <= 1 else v) for k, v in out.items())
        scale = P.norm(weights) / (P.norm(out) + 1e-10)
        out = OrderedDict((k, v * scale) for k, v in out.items())
    return out


def random(center: Weights | nn.Module, *, norm: str = "filter", ignore_biasbn: bool = True,
           generator: torch.Generator | None = None) -> "OrderedDict[str, torch.Tensor]":
    """A Gaussian direction shaped like ``center`` (a weight dict or a model), normalised.

    The Gaussian is drawn on the CPU from ``generator`` so that a seed gives the same direction
    on every device.
    """
    w = _weights_of(center)
    raw = OrderedDict((k, torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device))
                      for k, v in w.items())
    return normalize(raw, w, norm=norm, ignore_biasbn=ignore_biasbn)


def between(a: Weights | nn.Module, b: Weights | nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The direction ``b − a``: α = 0 is ``a``, α = 1 is ``b`` along ``a + α(b − a)``."""
    return P.sub(_weights_of(b), _weights_of(a))


def orthonormalize(directions: Sequence[Weights]) -> list["OrderedDict[str, torch.Tensor]"]:
    """Gram–Schmidt: orthonormal directions spanning the same space (in order)."""
    out: list[OrderedDict] = []
    for d in directions:
        v = OrderedDict((k, t.clone()) for k, t in d.items())
        for u in out:
            c = P.dot(v, u)
            for k in v:
                v[k].sub_(u[k], alpha=c)
        n = P.norm(v)
        if n < 1e-12:
            raise ValueError("directions are linearly dependent")
        out.append(OrderedDict((k, t / n) for k, t in v.items()))
    return out


@dataclass
class PCA:
    """Principal directions of a trajectory around ``center``.

    ``directions[i]`` are orthonormal, ``explained[i]`` the fraction of variance along each,
    ``coords[k]`` the coordinates of trajectory point ``k`` in the plane (``(θ_k − center)·d_i``).
    """

    center: Weights
    directions: list
    explained: torch.Tensor
    coords: torch.Tensor


def pca(trajectory: Sequence[Weights], center: Weights | None = None, k: int = 2) -> PCA:
    """PCA of a list of weight dicts (Li et al. §7); ``center`` defaults to the last point."""
    if len(trajectory) < 2:
        raise ValueError("a trajectory needs at least two points for PCA")
    if k < 1:
        raise ValueError(f"number of components must be >= 1, got {k}")
    center = trajectory[-1] if center is None else center
    rows = torch.stack([P.to_vector(P.sub(t, center)) for t in trajectory]).double()
    centred = rows - rows.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(k, vh.shape[0])
    var = s ** 2
    explained = (var[:k] / var.sum()).float()
    dirs = [P.from_vector(vh[i].to(rows.dtype).float(), center) for i in range(k)]
    dirs = [OrderedDict((n, t.clone().to(center[n].device)) for n, t in d.items()) for d in dirs]
    coords = rows.float() @ vh[:k].float().T
    return PCA(center=center, directions=dirs, explained=explained, coords=coords.cpu())


@dataclass
class Plane:
    """An orthonormal plane ``origin + x·u + y·v`` through three points, with their coordinates."""

    origin: Weights
    u: Weights
    v: Weights
    points: torch.Tensor  # [3, 2] coordinates of (a, b, c)

    def project(self, w: Weights) -> tuple[float, float]:
        """Coordinates of ``w`` projected onto the plane."""
        d = P.sub(w, self.origin)
        return P.dot(d, self.u), P.dot(d, self.v)


def plane_through(a: Weights, b: Weights, c: Weights) -> Plane:
    """The plane through three weight dicts: ``u ∥ b − a``, ``v`` the part of ``c − a`` ⟂ ``u``."""
    u, v = orthonormalize([P.sub(b, a), P.sub(c, a)])
    pts = torch.tensor([[0.0, 0.0],
                        [P.dot(P.sub(b, a), u), 0.0],
                        [P.dot(P.sub(c, a), u), P.dot(P.sub(c, a), v)]])
    return Plane(origin=a, u=u, v=v, points=pts)
