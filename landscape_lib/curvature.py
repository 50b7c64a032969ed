"""Curvature of the loss: Hessian-vector products, extremal eigenvalues, spectra, trace, sharpness.

Everything here works on the loss of a fixed data subset ``(x, y)``,

.. math::  L(θ) = \\frac{1}{N}\\sum_{i=1}^{N} \\ell(f(x_i; θ), y_i) \\;(+\\tfrac{λ_{wd}}{2}\\lVert θ\\rVert^2),

with ``θ`` the trainable parameters of any ``nn.Module`` (as a dict, see :mod:`.params`). The
Hessian ``H = ∇²L`` is never formed; every method needs only products ``Hv``.

* **Hessian-vector product** (Pearlmutter 1994), in one of two AD compositions (``mode=``):
  *forward-over-reverse*, ``Hv = ∂/∂ε ∇L(θ + εv)|_{ε=0}``, is ``torch.func.jvp`` of
  ``torch.func.grad`` of the loss written through ``functional_call``; *reverse-over-reverse*,
  ``Hv = ∇_θ⟨∇L(θ), v⟩``, is ``torch.autograd`` double backward. ``"auto"`` takes the first
  and falls back to the second, once, where an operation has no forward-mode derivative
  (``grid_sample``, ``cdist``, ``huber_loss``, a custom ``autograd.Function`` without ``jvp``).
  Fused kernels that have only a first derivative in either mode (CPU flash attention,
  ``hardsigmoid``) are swapped for composites of the same function while products run
  (:func:`second_order_kernels`). A large data set is split into chunks ``c`` of ``n_c``
  points, ``Hv = Σ_c (n_c/N) H_c v`` (each chunk loss is a mean). BatchNorm runs in eval mode
  (running statistics: the loss is a sum over points) unless ``bn="train"`` is asked for
  (batch statistics, which make the Hessian depend on the chunking; running statistics are
  never updated). Weight decay ``λ_wd`` adds ``λ_wd·v``. :class:`HVPOperator` wraps this as a
  ``scipy.sparse.linalg.LinearOperator`` (float64 on the SciPy side) and counts its calls.
* **Extremal eigenvalues**: :func:`extremal_eigs` is ``scipy.sparse.linalg.eigsh`` (implicitly
  restarted Lanczos, ARPACK) with ``which='LA'`` (largest) or ``'SA'`` (smallest, algebraic);
  :func:`power_iteration` is the plain baseline ``v ← Hv/‖Hv‖`` with the Rayleigh quotient
  ``vᵀHv`` (it finds the eigenvalue of largest *magnitude*).
* **Lanczos** (:func:`lanczos`), ``m`` steps with full re-orthogonalisation: ``HV_m = V_m T_m +
  β_m v_{m+1} e_mᵀ`` with ``T_m`` tridiagonal (float64). Its eigenpairs ``T_m = U Θ Uᵀ`` give
  Ritz values ``θ_k`` and weights ``w_k = U_{0k}²``.
* **Stochastic Lanczos quadrature** (Golub & Meurant; Ghorbani, Krishnan & Xiao 2019; used by
  Granziol, Zohren & Roberts, JMLR 2022): the spectral density
  ``φ(λ) = (1/P) Σ_i δ(λ − λ_i)`` is estimated from ``n_vec`` random starts ``v`` as

  .. math::  φ(λ) ≈ \\frac{1}{n_{vec}} \\sum_{v} \\sum_{k=1}^{m} w_k^{(v)}\\, 𝒩(λ; θ_k^{(v)}, σ^2),

  because ``Σ_k w_k g(θ_k)`` is the Gauss quadrature of ``vᵀg(H)v/‖v‖²`` (exact for
  polynomials of degree < 2m) and ``E[vᵀg(H)v]/‖v‖² = tr g(H)/P`` (:func:`slq_density`).
* **Hutchinson's trace estimator**: ``tr H = E[vᵀHv]`` for Rademacher or Gaussian ``v``
  (:func:`hutchinson_trace`).
* **Sharpness**, the rise of the loss within a radius ρ of θ, three ways (all here, so that the
  word means one family of measures): along one slice, ``½[f(−ρ) + f(ρ)] − f(0)`` of a
  :class:`.landscape.Line` ``f(α) = L(θ + αd)`` (:func:`slice_sharpness`, Li et al. 2018's
  1-D plots; ``≈ ½ρ² dᵀHd``); averaged over random directions, ``E_u[L(θ + ρu)] − L(θ)`` over
  ``u`` uniform on the unit sphere (or filter-normalised Gaussian directions scaled by ρ,
  :mod:`.directions`; :func:`random_sharpness`, ``≈ ρ² tr(H)/(2n)``); and the worst case
  ``max_{‖ε‖≤ρ} L(θ + ε) − L(θ)`` approximated by projected gradient ascent that starts from
  SAM's first-order solution ``ε = ρ ∇L/‖∇L‖`` (Foret et al. 2021; Keskar et al. 2017;
  :func:`worst_case_sharpness`, ``≈ ½ρ² λ_max`` at a minimum).
* **Largest stable learning rate** (:func:`critical_learning_rate`): bisection on the learning
  rate of a few optimizer steps from the current weights. Gradient descent on a quadratic is
  stable iff ``η < 2/λ_max``; Granziol et al. (2022) predict ``η_max(B) ≈ 2/λ_max(H_B)`` for SGD
  (linear in ``B`` while the batch noise dominates) and ``∝ √B`` for Adam.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import directions as D
from . import params as P
from .train import cross_entropy

BN_MODES = ("eval", "train")
WHICH = ("LA", "SA", "LM")
DISTRIBUTIONS = ("rademacher", "gaussian")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weights = Mapping[str, torch.Tensor]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (1, 2, 3, ...), got {value!r}")
    return int(value)


def _positive(value, name: str) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
            and value > 0):
        raise ValueError(f"{name} must be a positive finite number (> 0), got {value!r}")
    return float(value)


def _choice(value, valid, name: str):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")
    return value


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str = "eval"):
    """Run ``model`` in eval mode (``"eval"``) or in train mode with BatchNorm using batch
    statistics but *not* updating its running statistics (``"train"``); restore afterwards."""
    _choice(mode, BN_MODES, "bn mode")
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in bns]
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            for m in bns:  # batch statistics, no in-place update of the running ones
                m.track_running_stats = False
        yield model
    finally:
        for m, t in zip(bns, tracked):
            m.track_running_stats = t
        model.train(was_training)


def _chunks(x: torch.Tensor, y: torch.Tensor, chunk_size: int | None):
    n = len(x)
    if chunk_size is None or chunk_size >= n:
        return [(x, y, 1.0)]
    return [(xc, yc, len(xc) / n) for xc, yc in zip(x.split(chunk_size), y.split(chunk_size))]


# --- Hessian-vector products -------------------------------------------------------------------

class _CompositeKernels(TorchFunctionMode):
    """Calls to functions whose PyTorch kernel has no second derivative go to a composite of
    the same function instead; everything else passes through unchanged.

    ``F.hardsigmoid`` (MobileNetV3's squeeze-excitation gate): ``hardsigmoid_backward`` has
    neither a forward-mode derivative nor a double backward; ``relu6(x + 3)/6`` is the same
    function, with the same derivative mask ``−3 < x < 3``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            x = args[0]
            inplace = args[1] if len(args) > 1 else kwargs.get("inplace", False)
            out = F.relu6(x + 3.0) / 6.0
            return x.copy_(out) if inplace else out
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_order_kernels():
    """Run a model so that it can be differentiated twice, in either order.

    Some fused kernels implement only a first derivative: scaled-dot-product attention's CPU
    flash kernel (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, torchvision's
    VisionTransformer) and ``hardsigmoid`` (torchvision's MobileNetV3). Inside this context
    attention runs on PyTorch's ``MATH`` backend (the same softmax attention written as
    matrix products) and ``hardsigmoid`` as ``relu6(x + 3)/6``: the same function, so the same
    Hessian, and both AD modes of :class:`HVPOperator` work through them.
    """
    with sdpa_kernel([SDPBackend.MATH]), _CompositeKernels(), warnings.catch_warnings():
        # torch's own forward-AD set-up for some backward formulas still calls torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                category=FutureWarning)
        yield


def _forward_ad_unsupported(err: BaseException) -> bool:
    """Whether ``err`` says that an operation in the model has no forward-mode derivative
    (rather than that the model is wrong): the errors PyTorch raises for an ATen operation
    without a forward-AD formula, a custom ``autograd.Function`` without ``jvp``, and an
    old-style ``autograd.Function`` (no ``setup_context``) under ``torch.func``."""
    msg = str(err)
    if isinstance(err, NotImplementedError):
        return "forward AD" in msg or "forward mode AD" in msg
    return isinstance(err, RuntimeError) and "functorch transforms" in msg


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _forward_over_reverse(loss, w, v, state):
    """``Hv = ∂/∂ε ∇L(θ + εv)|_{ε=0}``: ``torch.func.jvp`` (forward mode) of ``torch.func.grad``
    (reverse mode). One forward and one backward pass, both carrying tangents."""
    return jvp(grad(loss), (w,), (v,))[1]


def _reverse_over_reverse(loss, w, v, state):
    """``Hv = ∇_θ ⟨∇L(θ), v⟩``: plain ``torch.autograd`` double backward (the gradient's graph
    is kept with ``create_graph=True`` and differentiated again along ``v``). Works where an
    operation has a double backward but no forward-mode derivative, including old-style
    ``autograd.Function`` s that ``torch.func`` cannot transform."""
    names = list(w)
    leaves = [w[k].detach().requires_grad_() for k in names]
    with torch.enable_grad():
        g = torch.autograd.grad(loss(dict(zip(names, leaves))), leaves, create_graph=True,
                                allow_unused=True, materialize_grads=True)
        # a gradient component that does not depend on θ has zero second derivative
        live = [i for i, gi in enumerate(g) if gi.requires_grad]
        hv = [torch.zeros_like(t) for t in leaves]
        if live:
            parts = torch.autograd.grad([g[i] for i in live], leaves,
                                        grad_outputs=[v[names[i]] for i in live],
                                        allow_unused=True, materialize_grads=True)
            hv = list(parts)
    return dict(zip(names, hv))


def _cached_graph(loss, w, v, state):
    """``Hv = ∇_θ ⟨g, v⟩`` through the gradient graph ``g = ∇L(θ)`` of this chunk, built once
    with ``create_graph=True`` and kept in ``state`` (PyHessian's way): every later product is
    a single backward pass through it, with no forward pass. The graph holds its chunk's saved
    activations and the first backward's intermediates for the operator's life; the bytes it
    holds are counted while it is built (``state["bytes"]``). Weights changed in place since
    (their version counters moved) make it rebuild the graph, so the product is always at the
    current weights, as in the other modes."""
    versions = [t._version for t in w.values()]
    if state.get("versions") != versions:
        names = list(w)
        leaves = [w[k].detach().requires_grad_() for k in names]
        seen: dict[tuple[int, int], int] = {}

        def pack(t):
            if t.device.type != "meta":
                seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = \
                    t.untyped_storage().nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            g = torch.autograd.grad(loss(dict(zip(names, leaves))), leaves, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        live = [i for i, gi in enumerate(g) if gi.requires_grad]
        state.update(names=names, leaves=leaves, live=live, g=[g[i] for i in live], versions=versions,
                     bytes=sum(seen.values()) + sum(g[i].numel() * g[i].element_size() for i in live))
    names, leaves, live = state["names"], state["leaves"], state["live"]
    if not live:  # the gradient does not depend on θ
        return {k: torch.zeros_like(t) for k, t in zip(names, leaves)}
    with torch.enable_grad():
        parts = torch.autograd.grad(state["g"], leaves, grad_outputs=[v[names[i]] for i in live],
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
    return dict(zip(names, parts))


# The products, by mode name: ``f(loss, w, v, state) -> Hv`` for one data chunk's loss
# ``loss(w)`` at θ = ``w`` along ``v``. ``state`` is a dict the operator keeps for this mode and
# chunk across products (the cached graph lives there). "auto" tries the modes in AUTO_ORDER.
_PRODUCTS = {"cached-graph": _cached_graph,
             "forward-over-reverse": _forward_over_reverse,
             "reverse-over-reverse": _reverse_over_reverse}
AUTO_ORDER = ("cached-graph", "forward-over-reverse", "reverse-over-reverse")
HVP_MODES = ("auto", *_PRODUCTS)


class HVPOperator:
    """The Hessian of ``loss_fn(model(x), y)`` (+ weight decay) at ``weights``, as an operator.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is evaluated through ``functional_call`` and never modified.
    x, y
        The fixed data subset defining the loss (a mean over its points).
    loss_fn
        ``loss_fn(outputs, y) -> scalar`` averaged over the batch (default cross-entropy).
    weights
        The point θ (a dict like :func:`.params.weights`); default: the model's parameters. A
        dict with only some of the parameters gives the Hessian block of those (the others
        stay at the model's values).
    chunk_size
        Split the data into chunks of this many points (bounds memory); the result is the
        chunk-size-weighted sum of the chunks' HVPs, equal to the unchunked one in eval mode.
    bn
        ``"eval"`` (default: BatchNorm running statistics) or ``"train"`` (batch statistics).
    weight_decay
        ``λ_wd ≥ 0`` added to the Hessian (the Hessian of ``L + λ_wd/2 ‖θ‖²``).
    mode
        How a product is differentiated (all give the same ``Hv`` up to rounding):

        * ``"cached-graph"``: reverse-over-reverse through the gradient graph of every chunk,
          built by the first product and kept; each product is then one backward pass (the
          fastest: about 2.5× fewer operations than forward-over-reverse on an MLP, see
          ``benchmarks/peers.py``). Memory: the graph of *all* chunks for the operator's life,
          about the saved activations of a forward and a backward pass over all ``N`` points
          (``op.cache_bytes`` after the first product).
        * ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, one forward
          and one backward pass with tangents per product. Memory: one chunk's passes at a
          time, freed after each product.
        * ``"reverse-over-reverse"``: ``torch.autograd`` double backward, building and dropping
          one chunk's gradient graph per product. Memory: as forward-over-reverse; it works
          where an operation lacks a forward-mode derivative.
        * ``"auto"`` (default): the first product tries them in that order and keeps the first
          that runs, and keeps ``"cached-graph"`` only if the graph of all chunks (measured on
          the first one, times the number of chunks) fits in ``cache_limit``.
    cache_limit
        Bytes the cached graphs may hold under ``mode="auto"`` (default: a quarter of the
        device's free memory, from ``torch.cuda.mem_get_info`` on CUDA and the operating
        system's available memory otherwise, at most 4 GiB on a CPU).

    ``op.mv(v)`` multiplies a flat torch vector (any float dtype, returns float64 on the model's
    device); ``op.hvp(v_dict)`` a weight dict; ``op.linear_operator()`` is the SciPy view
    (float64). ``op.calls`` counts Hessian-vector products of all three kinds. ``op.mode`` is
    the mode that runs (``"auto"`` until the first product has chosen); ``op.auto_log`` says,
    for each mode ``"auto"`` passed over, why; ``op.forward_ad_error`` is the first line of the
    error that made ``"auto"`` leave forward-over-reverse, or None.
    Products run inside :func:`second_order_kernels`.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn = cross_entropy, *, weights: Weights | None = None,
                 chunk_size: int | None = None, bn: str = "eval", weight_decay: float = 0.0,
                 mode: str = "auto", cache_limit: int | None = None):
        _choice(bn, BN_MODES, "bn mode")
        _choice(mode, HVP_MODES, "HVP mode")
        if cache_limit is not None and not (isinstance(cache_limit, int) and cache_limit >= 0):
            raise ValueError(f"cache_limit must be a number of bytes >= 0, got {cache_limit!r}")
        if chunk_size is not None:
            _positive_int(chunk_size, "chunk_size")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.weights = OrderedDict((k, v.detach()) for k, v in
                                   (P.weights(model) if weights is None else weights).items())
        if not self.weights:
            raise ValueError("weights is empty: the Hessian needs at least one parameter")
        names = dict(model.named_parameters())
        unknown = [k for k in self.weights if k not in names]
        if unknown:
            raise ValueError(f"weights has keys that are not parameters of the model: {unknown[:5]}; "
                             f"valid names include {list(names)[:5]}")
        self.buffers = OrderedDict((k, b.detach()) for k, b in model.named_buffers())
        self.chunk_size, self.bn, self.weight_decay = chunk_size, bn, float(weight_decay)
        self.mode, self.forward_ad_error, self.auto_log = mode, None, {}
        self.cache_limit = cache_limit
        self._state: dict = {}  # per (mode, chunk), for the product functions
        self.n = sum(v.numel() for v in self.weights.values())
        first = next(iter(self.weights.values()))
        self.device, self.dtype = first.device, first.dtype
        self.calls = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cached gradient graphs (0 unless mode ``"cached-graph"`` runs)."""
        return sum(st.get("bytes", 0) for (m, _), st in self._state.items() if m == "cached-graph")

    def _n_chunks(self) -> int:
        return 1 if self.chunk_size is None else -(-len(self.x) // self.chunk_size)

    def reset_calls(self) -> None:
        """Set the HVP counter back to zero."""
        self.calls = 0

    def _chunk_loss(self, xc, yc):
        def loss(w):
            return self.loss_fn(functional_call(self.model, (w, self.buffers), (xc,)), yc)
        return loss

    def loss(self, weights: Weights | None = None) -> float:
        """``L(θ)`` on the subset (including the weight-decay term) at ``weights`` (default θ)."""
        w = self.weights if weights is None else weights
        total = 0.0
        with bn_mode(self.model, self.bn), torch.no_grad():
            for xc, yc, frac in _chunks(self.x, self.y, self.chunk_size):
                total += frac * float(self._chunk_loss(xc, yc)(w))
        if self.weight_decay:
            total += 0.5 * self.weight_decay * P.norm(w) ** 2
        return total

    def gradient(self, weights: Weights | None = None) -> "OrderedDict[str, torch.Tensor]":
        """``∇L(θ)`` as a weight dict (including weight decay)."""
        w = self.weights if weights is None else weights
        out = OrderedDict((k, torch.zeros_like(v)) for k, v in w.items())
        names = list(w)
        with bn_mode(self.model, self.bn), torch.enable_grad():
            for xc, yc, frac in _chunks(self.x, self.y, self.chunk_size):
                # plain autograd (not torch.func), so that any autograd.Function works
                leaves = [w[k].detach().requires_grad_() for k in names]
                g = torch.autograd.grad(self._chunk_loss(xc, yc)(dict(zip(names, leaves))), leaves,
                                        allow_unused=True, materialize_grads=True)
                for k, gk in zip(names, g):
                    out[k].add_(gk, alpha=frac)
        if self.weight_decay:
            for k in out:
                out[k].add_(w[k], alpha=self.weight_decay)
        return out

    def hvp(self, v: Weights) -> "OrderedDict[str, torch.Tensor]":
        """``Hv`` for a direction given as a weight dict (same keys and shapes as θ)."""
        P.keys_like(self.weights, v)
        tangent = {k: v[k].to(device=self.device, dtype=w.dtype) for k, w in self.weights.items()}
        return self._hvp(tangent)

    def _hvp(self, tangent) -> "OrderedDict[str, torch.Tensor]":
        """``Hv`` for a checked tangent dict (θ's keys, shapes, device and dtype)."""
        fast = self._cached_fast(tangent) if self.mode == "cached-graph" else None
        if fast is not None:
            out = fast
        elif self.mode != "auto":
            out = self._product(self.mode, tangent)
        else:  # the first product: forward-over-reverse if every operation has a forward AD rule
            out = self._auto_product(tangent)
        # weight decay: ∇²(λ/2 ‖θ‖²) v = λ v
        if self.weight_decay:
            for k in out:
                out[k].add_(tangent[k], alpha=self.weight_decay)
        self.calls += 1
        return out

    def _product(self, mode: str, tangent) -> "OrderedDict[str, torch.Tensor]":
        """``Σ_c (n_c/N) H_c v`` over the data chunks ``c``, each ``H_c v`` by ``mode``."""
        product, w = _PRODUCTS[mode], dict(self.weights)
        chunks = list(_chunks(self.x, self.y, self.chunk_size))
        # once every chunk's graph is cached at the current weights, a product is one backward
        # pass per chunk: no forward runs, so neither the BatchNorm mode nor the composite
        # kernels matter, and their contexts are skipped (about 10 % of a small product)
        versions = [t._version for t in w.values()]
        ready = mode == "cached-graph" and all(
            self._state.get((mode, c), {}).get("versions") == versions for c in range(len(chunks)))
        out = None
        with contextlib.ExitStack() as stack:
            if not ready:
                stack.enter_context(bn_mode(self.model, self.bn))
                stack.enter_context(second_order_kernels())
            for c, (xc, yc, frac) in enumerate(chunks):
                try:
                    hv = product(self._chunk_loss(xc, yc), w, tangent,
                                 self._state.setdefault((mode, c), {}))
                except (NotImplementedError, RuntimeError) as err:
                    if (mode == "forward-over-reverse" and _forward_ad_unsupported(err)
                            and type(err) in (NotImplementedError, RuntimeError)):
                        raise type(err)(f"{err}\nHVPOperator: mode='reverse-over-reverse' (or "
                                        "'auto') differentiates twice in reverse mode "
                                        "instead") from err
                    raise
                if len(chunks) == 1:
                    out = OrderedDict((k, hv[k].detach()) for k in tangent)
                    break
                if out is None:
                    out = OrderedDict((k, torch.zeros_like(t)) for k, t in tangent.items())
                for k in out:
                    out[k].add_(hv[k].detach(), alpha=frac)
        return out

    def _auto_product(self, tangent) -> "OrderedDict[str, torch.Tensor]":
        """The first product under ``mode="auto"``: try the modes in ``AUTO_ORDER``, keep the
        first that runs (and, for the cached graph, fits ``cache_limit``)."""
        failures = []
        for mode in AUTO_ORDER:
            if mode == "cached-graph" and self._n_chunks() > 1:
                # measure one chunk's graph before building them all
                probe = self._chunk_graph_bytes(tangent)
                if probe is not None and probe * self._n_chunks() > self._cache_limit():
                    self.auto_log[mode] = (f"the cached graphs would hold about "
                                           f"{probe * self._n_chunks() / 2**20:.0f} MiB, over the "
                                           f"limit of {self._cache_limit() / 2**20:.0f} MiB")
                    continue
            try:
                out = self._product(mode, tangent)
            except (NotImplementedError, RuntimeError) as err:
                self._state = {k: v for k, v in self._state.items() if k[0] != mode}
                if mode == "forward-over-reverse":
                    if not _forward_ad_unsupported(err):
                        raise
                    self.forward_ad_error = _first_line(err)
                self.auto_log[mode] = _first_line(err)
                failures.append(f"{mode} failed ({_first_line(err)})")
                continue
            if mode == "cached-graph" and self.cache_bytes > self._cache_limit():
                self.auto_log[mode] = (f"the cached graph holds {self.cache_bytes / 2**20:.0f} MiB, "
                                       f"over the limit of {self._cache_limit() / 2**20:.0f} MiB")
                self._state = {k: v for k, v in self._state.items() if k[0] != mode}
                continue
            self.mode = mode
            return out
        raise RuntimeError(f"no Hessian-vector product for {type(self.model).__name__}: "
                           + "; ".join(failures))

    def _chunk_graph_bytes(self, tangent) -> int | None:
        """Bytes of the first chunk's cached graph (built and dropped), or None if it fails."""
        xc, yc, _ = next(iter(_chunks(self.x, self.y, self.chunk_size)))
        state: dict = {}
        try:
            with bn_mode(self.model, self.bn), second_order_kernels():
                _cached_graph(self._chunk_loss(xc, yc), dict(self.weights), tangent, state)
        except (NotImplementedError, RuntimeError):
            return None
        return state["bytes"]

    def _cache_limit(self) -> int:
        if self.cache_limit is not None:
            return self.cache_limit
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free // 4
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = 4 * 2**30
        return min(avail // 4, 4 * 2**30)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """``Hv`` for a flat vector ``v`` (length ``n``); returns float64 on the model's device."""
        if v.numel() != self.n:
            raise ValueError(f"vector has {v.numel()} entries, the operator needs {self.n}")
        vd = P.from_vector(v.reshape(-1).to(device=self.device, dtype=self.dtype), self.weights)
        return P.to_vector(self._hvp(dict(vd))).double()

    def _cached_fast(self, tangent) -> "OrderedDict[str, torch.Tensor] | None":
        """One backward pass through the cached graph of a single chunk, when it is built at
        the current weights (None otherwise: then :meth:`_product` builds it). The same
        ``torch.autograd.grad`` call as :func:`_cached_graph`, without its bookkeeping: the
        Python around a small product is a measurable share of it."""
        st = self._state.get(("cached-graph", 0))
        if st is None or len(self._state) != 1 or "g" not in st or not st["live"]:
            return None
        if st["versions"] != [t._version for t in self.weights.values()]:
            return None
        names = st["names"]
        parts = torch.autograd.grad(st["g"], st["leaves"],
                                    grad_outputs=[tangent[names[i]] for i in st["live"]],
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
        return OrderedDict(zip(names, parts))

    def _np_matvec(self, v: np.ndarray) -> np.ndarray:
        out = self.mv(torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1)))
        return out.cpu().numpy()

    def linear_operator(self) -> spla.LinearOperator:
        """The Hessian as a float64 ``scipy.sparse.linalg.LinearOperator`` (symmetric)."""
        return spla.LinearOperator(self.shape, matvec=self._np_matvec, rmatvec=self._np_matvec,
                                   dtype=np.float64)


# --- a common view of operators: HVPOperator, dense matrices, SciPy operators ---------------

def _matvec(op) -> tuple[int, torch.device, Callable[[torch.Tensor], torch.Tensor]]:
    """``(n, device, f)`` with ``f`` mapping a float64 torch vector to float64 ``op·v``."""
    if isinstance(op, HVPOperator):
        return op.n, op.device, op.mv
    if isinstance(op, torch.Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a matrix operator must be square, got shape {tuple(op.shape)}")
        A = op.double()
        return A.shape[0], A.device, lambda v: A @ v.to(A.device, torch.float64)
    if isinstance(op, np.ndarray) or hasattr(op, "matvec"):
        lin = spla.aslinearoperator(op)
        if lin.shape[0] != lin.shape[1]:
            raise ValueError(f"operator must be square, got shape {lin.shape}")
        return lin.shape[0], torch.device("cpu"), lambda v: torch.as_tensor(
            np.asarray(lin.matvec(v.detach().cpu().numpy()), dtype=np.float64).reshape(-1))
    raise TypeError("op must be an HVPOperator, a square torch/numpy matrix or a "
                    f"scipy LinearOperator, got {type(op).__name__}")


def _calls(op) -> int:
    return op.calls if isinstance(op, HVPOperator) else 0


def _random_vector(n: int, distribution: str, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    _choice(distribution, DISTRIBUTIONS, "distribution")
    if distribution == "rademacher":
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v.to(device)


# --- power iteration -----------------------------------------------------------------------

@dataclass
class PowerResult:
    """Power iteration: the eigenvalue estimate, its eigenvector, the Rayleigh quotient after
    every HVP (``history``), the number of HVPs and whether ``tol`` was reached."""

    eigenvalue: float
    eigenvector: torch.Tensor
    history: np.ndarray
    n_hvp: int
    converged: bool


def power_iteration(op, iters: int = 100, tol: float = 1e-6, *, v0: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> PowerResult:
    """Plain power iteration ``v ← Hv/‖Hv‖``, one HVP per step.

    Returns the Rayleigh quotient ``vᵀHv`` (``‖v‖ = 1``) of the eigenvalue of largest
    **magnitude**; stops when it changes by less than ``tol`` relative, or after ``iters``.
    The error of the Rayleigh quotient decays like ``(λ₂/λ₁)^{2k}``.
    """
    iters = _positive_int(iters, "iters")
    tol = _positive(tol, "tol")
    n, device, f = _matvec(op)
    v = _random_vector(n, "gaussian", generator, device) if v0 is None else v0.double().to(device)
    v = v / v.norm()
    history, converged, lam = [], False, float("nan")
    for _ in range(iters):
        w = f(v)
        new = float(v @ w)  # Rayleigh quotient of the current unit vector
        history.append(new)
        norm = w.norm()
        if norm == 0:
            lam, converged = 0.0, True
            break
        v = w / norm
        if len(history) > 1 and abs(new - lam) <= tol * abs(new):
            lam, converged = new, True
            break
        lam = new
    return PowerResult(lam, v, np.asarray(history), len(history), converged)


# --- eigsh ---------------------------------------------------------------------------------

@dataclass
class EigResult:
    """Eigenvalues (ascending) from ``eigsh``, their eigenvectors (columns), the HVP count and
    whether all ``k`` converged within ``maxiter`` (if not, only the converged ones are kept)."""

    values: np.ndarray
    vectors: np.ndarray
    n_hvp: int
    converged: bool = True


def extremal_eigs(op, k: int = 1, which: str = "LA", *, tol: float = 0.0, ncv: int | None = None,
                  maxiter: int | None = None, v0: np.ndarray | None = None,
                  seed: int | None = 0) -> EigResult:
    """The ``k`` largest (``which="LA"``), smallest (``"SA"``) or largest-magnitude (``"LM"``)
    eigenvalues by ``scipy.sparse.linalg.eigsh`` on the operator.

    ``tol`` is ARPACK's relative accuracy of the Ritz values (0: machine precision); bound
    ``ncv`` (Lanczos basis size, default ``max(2k+1, 20)``) and ``maxiter`` (restarts) on big
    operators. ``v0`` defaults to a seeded Gaussian so results are reproducible.

    A smaller ``ncv`` for small ``k`` does not save products: on the trained MNIST-1D MLP of
    ``benchmarks/peers.py``, ``k = 1`` at ``tol = 1e-6`` took 19–25 products for ``ncv`` from 4
    to 16 against 21 at the default (ARPACK restarts more often with a smaller basis), so the
    default stays. For one eigenvalue to a tolerance, :func:`lanczos` with ``tol`` stops
    earlier (12 products to 1e-6 there).
    """
    k = _positive_int(k, "k")
    _choice(which, WHICH, "which")
    if not (tol >= 0):
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    n, _, _ = _matvec(op)
    if k >= n:
        raise ValueError(f"k must be in 1..{n - 1} (eigsh needs k < n), got {k}")
    if ncv is not None and not (k < ncv <= n):
        raise ValueError(f"ncv must be in {k + 1}..{n}, got {ncv}")
    if maxiter is not None:
        _positive_int(maxiter, "maxiter")
    lin = op.linear_operator() if isinstance(op, HVPOperator) else spla.aslinearoperator(op)
    if v0 is None:
        v0 = np.random.default_rng(seed).standard_normal(n)
    before = _calls(op)
    converged = True
    try:
        vals, vecs = spla.eigsh(lin, k=k, which=which, tol=tol, ncv=ncv, maxiter=maxiter, v0=v0)
    except spla.ArpackNoConvergence as err:
        if len(err.eigenvalues) == 0:
            raise RuntimeError(f"eigsh found no converged eigenvalue ({which}) in maxiter={maxiter} "
                               f"restarts with tol={tol:g}; raise maxiter or tol") from err
        vals, vecs, converged = err.eigenvalues, err.eigenvectors, False
    order = np.argsort(vals)
    return EigResult(vals[order], vecs[:, order], _calls(op) - before, converged)


# --- Lanczos -------------------------------------------------------------------------------

@dataclass
class LanczosResult:
    """``m`` Lanczos steps: the tridiagonal ``T`` (diagonal ``alpha``, off-diagonal ``beta``,
    float64), the Ritz values (ascending) and weights (squared first components of T's
    eigenvectors, summing to 1), the basis ``V`` (``[m, n]``, rows orthonormal) if kept, and
    the number of HVPs. With a stopping tolerance, ``error_bounds`` bounds ``|λ − θ|`` for
    every Ritz value (see :func:`lanczos`) and ``converged`` says whether the top ``k`` met it."""

    alpha: np.ndarray
    beta: np.ndarray
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    n_hvp: int
    basis: torch.Tensor | None = None
    error_bounds: np.ndarray | None = None
    converged: bool | None = None

    def ritz_at(self, j: int) -> np.ndarray:
        """The Ritz values after the first ``j`` steps (from the leading ``j×j`` block of T)."""
        j = _positive_int(j, "j")
        if j > len(self.alpha):
            raise ValueError(f"j must be in 1..{len(self.alpha)}, got {j}")
        return ritz(self.alpha[:j], self.beta[:j - 1])[0]

    def ritz_vector(self, k: int) -> torch.Tensor:
        """The Ritz vector ``Vᵀu_k`` of ``ritz_values[k]`` (``k = -1``: the top one), where ``u_k``
        is T's k-th eigenvector: unit norm, Rayleigh quotient ``θ_k``. Needs ``keep_basis=True``;
        a good start vector for ``extremal_eigs``."""
        if self.basis is None:
            raise ValueError("ritz_vector needs the Lanczos basis: run lanczos(..., keep_basis=True)")
        m = len(self.alpha)
        if not -m <= k < m:
            raise ValueError(f"k must be in -{m}..{m - 1}, got {k}")
        u = (np.ones(1) if m == 1 else
             scipy.linalg.eigh_tridiagonal(self.alpha, self.beta)[1][:, k])
        return self.basis.T @ torch.as_tensor(u, dtype=self.basis.dtype, device=self.basis.device)


def ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and weights ``(θ_k, U_{0k}²)`` of the symmetric tridiagonal ``T(alpha, beta)``."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if len(alpha) == 1:
        return alpha.copy(), np.ones(1)
    theta, U = scipy.linalg.eigh_tridiagonal(alpha, np.asarray(beta, dtype=np.float64))
    return theta, U[0] ** 2


def ritz_error_bounds(theta: np.ndarray, last: np.ndarray, beta: float) -> np.ndarray:
    """Error estimates ``|λ − θ_i|`` for Ritz values ``θ_i`` of ``T_j`` whose eigenvectors end in
    ``last[i]``, after a step whose next off-diagonal is ``beta``.

    The residual of the Ritz pair is ``r_i = ‖H y_i − θ_i y_i‖ = β |u_i[-1]|``, so some
    eigenvalue lies within ``r_i`` of ``θ_i`` (a rigorous bound); when the other eigenvalues
    are at least ``gap_i`` away, within ``r_i² / gap_i`` (Kato–Temple; Parlett, *The Symmetric
    Eigenvalue Problem*, §11.7). The true gap is unknown, so ``gap_i`` is estimated as the
    distance to the nearest other Ritz value less that value's residual (the usual practical
    rule), and the smaller of the two is returned.
    """
    r = beta * np.abs(last)
    if len(theta) == 1:
        return r
    others = np.array([np.min(np.abs(np.delete(theta, i) - theta[i]) - np.delete(r, i))
                       for i in range(len(theta))])
    quad = np.where(others > 0, r ** 2 / np.maximum(others, 1e-300), np.inf)
    return np.minimum(r, quad)


def lanczos(op, m: int, *, v0: torch.Tensor | None = None, distribution: str = "rademacher",
            generator: torch.Generator | None = None, reorth: bool = True,
            keep_basis: bool = False, tol: float = 0.0, k: int = 1) -> LanczosResult:
    """Up to ``m`` steps of Lanczos from ``v0`` (default: a random Rademacher/Gaussian vector).

    With ``reorth=True`` every new vector is re-orthogonalised (twice, classical Gram–Schmidt)
    against all previous ones, which prevents the spurious duplicate "ghost" Ritz values of
    plain Lanczos. The basis is kept in float64 on the operator's device (``m·n`` numbers). If
    an invariant subspace is found (``β ≈ 0``) the iteration stops early.

    **Stopping rule.** With ``tol > 0`` it also stops as soon as the ``k`` largest Ritz values
    are each within ``tol·|θ|`` of an eigenvalue by the estimate of :func:`ritz_error_bounds`
    (checked after every step; the estimates are in ``error_bounds``). The top eigenvalue of a
    trained network's Hessian, well separated from the bulk, typically needs 10–15 products for
    ``tol = 1e-6``, where ``eigsh`` needs its basis of ``ncv ≥ 2k + 1`` plus restarts.
    """
    m = _positive_int(m, "m")
    k = _positive_int(k, "k")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    n, device, f = _matvec(op)
    m = min(m, n)
    v = _random_vector(n, distribution, generator, device) if v0 is None else v0.double().to(device)
    v = v / v.norm()
    keep = reorth or keep_basis
    # the basis grows by doubling, so an early stop does not pay for m rows
    V = torch.empty(min(m, 16), n, dtype=torch.float64, device=device) if keep else None
    alpha, beta = [], []
    prev, b_prev = torch.zeros_like(v), 0.0
    before = _calls(op)
    bounds, converged = None, None
    for j in range(m):
        if V is not None:
            if j == len(V):
                V = torch.cat([V, torch.empty(min(len(V), m - len(V)), n, dtype=V.dtype, device=device)])
            V[j] = v
        w = f(v)
        a = float(v @ w)
        alpha.append(a)
        # three-term recurrence: w = Hv_j − α_j v_j − β_{j−1} v_{j−1}
        w = w - a * v - b_prev * prev
        if reorth:
            for _ in range(2):  # full re-orthogonalisation against v_0..v_j
                w = w - V[:j + 1].T @ (V[:j + 1] @ w)
        b = float(w.norm())
        if tol > 0:
            theta, U = (np.asarray(alpha), np.ones((1, 1))) if j == 0 else \
                scipy.linalg.eigh_tridiagonal(np.asarray(alpha), np.asarray(beta))
            bounds = ritz_error_bounds(theta, U[-1], b)
            top = slice(max(0, len(theta) - k), None)
            converged = len(theta) >= k and bool(np.all(bounds[top] <= tol * np.abs(theta[top])))
            if converged:
                break
        if b <= 1e-10 * max(1.0, abs(a)):  # invariant subspace: T is exact (also at the last step)
            converged = True if tol > 0 else None
            if bounds is not None:
                bounds = np.zeros_like(bounds)
            break
        if j == m - 1:
            break
        beta.append(b)
        prev, b_prev, v = v, b, w / b
    alpha_arr, beta_arr = np.asarray(alpha), np.asarray(beta[:len(alpha) - 1])
    theta, weights = ritz(alpha_arr, beta_arr)
    basis = V[:len(alpha)] if (keep_basis and V is not None) else None
    return LanczosResult(alpha_arr, beta_arr, theta, weights, _calls(op) - before, basis,
                         bounds, converged)


# --- stochastic Lanczos quadrature ----------------------------------------------------------

@dataclass
class SpectralDensity:
    """An SLQ estimate: the smoothed density on ``grid``, the nodes/weights of every start
    vector (``[n_vec, ≤m]``, padded with NaN/0), ``sigma`` and the HVP count."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    n_hvp: int

    def moment(self, p: int) -> float:
        """``(1/n_vec) Σ_v Σ_k w_k θ_k^p``: an unbiased estimate of ``tr(H^p)/n`` for
        ``p < 2m`` (from the quadrature nodes, not the smoothed curve)."""
        nodes = np.nan_to_num(self.nodes)
        return float(np.mean(np.sum(self.weights * nodes ** p, axis=1)))


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                     sigma: float) -> np.ndarray:
    """``Σ_k w_k 𝒩(λ; θ_k, σ²)`` on ``grid`` (rows of ``nodes``/``weights`` averaged)."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    mask = np.isfinite(nodes)
    z = (grid[None, None, :] - np.where(mask, nodes, 0.0)[..., None]) / sigma
    kern = np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    return np.mean(np.sum(np.where(mask, weights, 0.0)[..., None] * kern, axis=1), axis=0)


def slq_density(op, m: int = 80, n_vec: int = 1, *, sigma: float | None = None,
                grid: np.ndarray | None = None, n_grid: int = 512, distribution: str = "rademacher",
                generator: torch.Generator | None = None) -> SpectralDensity:
    """Spectral density of the operator by stochastic Lanczos quadrature.

    ``n_vec`` independent Lanczos runs of ``m`` steps (full re-orthogonalisation); the
    Gaussian kernel width ``sigma`` defaults to 1 % of the spread of the Ritz values and the
    grid to ``n_grid`` points covering them with a margin of ``5σ``.
    """
    m, n_vec, n_grid = (_positive_int(m, "m"), _positive_int(n_vec, "n_vec"),
                        _positive_int(n_grid, "n_grid"))
    runs = [lanczos(op, m, distribution=distribution, generator=generator) for _ in range(n_vec)]
    width = max(len(r.ritz_values) for r in runs)
    nodes = np.full((n_vec, width), np.nan)
    weights = np.zeros((n_vec, width))
    for i, r in enumerate(runs):
        nodes[i, :len(r.ritz_values)] = r.ritz_values
        weights[i, :len(r.ritz_weights)] = r.ritz_weights
    lo, hi = np.nanmin(nodes), np.nanmax(nodes)
    if sigma is None:
        sigma = 0.01 * max(hi - lo, 1e-12 + abs(hi))
    sigma = _positive(sigma, "sigma")
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    grid = np.asarray(grid, dtype=np.float64)
    return SpectralDensity(grid, gaussian_density(nodes, weights, grid, sigma), nodes, weights,
                           sigma, sum(r.n_hvp for r in runs))


# --- Hutchinson ----------------------------------------------------------------------------

@dataclass
class TraceResult:
    """Hutchinson's estimate of ``tr H``: the mean, its standard error and the samples."""

    trace: float
    stderr: float
    samples: np.ndarray


def hutchinson_trace(op, n_samples: int = 100, *, distribution: str = "rademacher",
                     generator: torch.Generator | None = None) -> TraceResult:
    """``tr H ≈ (1/S) Σ_s v_sᵀ H v_s`` with Rademacher (default) or Gaussian ``v_s``.

    The Rademacher variance is ``2 Σ_{i≠j} H_ij²`` per sample (smaller than Gaussian's
    ``2‖H‖_F²``).
    """
    n_samples = _positive_int(n_samples, "n_samples")
    n, device, f = _matvec(op)
    samples = []
    for _ in range(n_samples):
        v = _random_vector(n, distribution, generator, device)
        samples.append(float(v @ f(v)))
    s = np.asarray(samples)
    stderr = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("inf")
    return TraceResult(float(s.mean()), stderr, s)


# --- sharpness -----------------------------------------------------------------------------

@dataclass
class Sharpness:
    """``value = perturbed_loss − loss``: the rise of the loss within radius ρ."""

    value: float
    loss: float
    perturbed_loss: float
    rho: float
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0))


def slice_sharpness(line, radius: float) -> float:
    """Mean rise ``½[f(−ρ) + f(ρ)] − f(0)`` of a 1-D slice ``f(α) = L(θ + αd)``.

    ``line`` is a :class:`.landscape.Line` (its ``alphas`` and ``loss``; between grid points the
    loss is interpolated linearly) and ``radius`` is ρ in units of α, so the points are
    ``θ ± ρd``. Averaging the two sides cancels the gradient term: for a smooth loss the value
    is ``½ρ² dᵀHd + O(ρ⁴)``.

    How it relates to the other two measures: for ``d = u`` drawn uniformly on the unit sphere
    it is the mean of an antithetic pair (``u``, ``−u``) of :func:`random_sharpness` samples at
    ρ, so its average over directions is the same ``ρ² tr(H)/(2n)``; for filter-normalised
    directions (:func:`.directions.random`, as in Li et al.'s plots) it is the antithetic form of
    ``random_sharpness(..., filter_normalized=True)``. The true worst case
    (:func:`worst_case_sharpness`, radius ``ρ‖d‖``) bounds it from above.
    """
    radius = _positive(radius, "radius")
    order = np.argsort(line.alphas)
    a = np.asarray(line.alphas, dtype=np.float64)[order]
    f = np.asarray(line.loss, dtype=np.float64)[order]
    if -radius < a[0] - 1e-12 or radius > a[-1] + 1e-12:
        raise ValueError(f"radius {radius} lies outside the slice [{a[0]}, {a[-1]}]: the slice must "
                         "reach α = −radius and α = +radius")
    at = lambda t: float(np.interp(t, a, f))  # noqa: E731
    return 0.5 * (at(-radius) + at(radius)) - at(0.0)


def _unit_sphere(w: Weights, generator: torch.Generator | None) -> "OrderedDict[str, torch.Tensor]":
    d = OrderedDict((k, torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device))
                    for k, v in w.items())
    s = P.norm(d)
    return OrderedDict((k, t / s) for k, t in d.items())


def random_sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float,
                     n_samples: int = 10, *, loss_fn: LossFn = cross_entropy,
                     weights: Weights | None = None, filter_normalized: bool = False,
                     bn: str = "eval", generator: torch.Generator | None = None) -> Sharpness:
    """Average rise ``(1/S) Σ_s L(θ + ρu_s) − L(θ)``.

    ``u_s`` is uniform on the unit sphere of the whole parameter vector (so ``‖ρu‖ = ρ``), or,
    with ``filter_normalized=True``, a filter-normalised Gaussian direction
    (:func:`.directions.random`: each filter of ``u`` has the norm of θ's filter, biases and
    norm parameters do not move), so that ρ is a *relative* radius. For a quadratic with
    Hessian ``H`` the unit-sphere version is ``ρ² tr(H)/(2n)``.
    """
    rho = _positive(rho, "rho")
    n_samples = _positive_int(n_samples, "n_samples")
    op = HVPOperator(model, x, y, loss_fn, weights=weights, bn=bn)
    base = op.loss()
    rises = []
    for _ in range(n_samples):
        u = (D.random(op.weights, norm="filter", generator=generator) if filter_normalized
             else _unit_sphere(op.weights, generator))
        rises.append(op.loss(P.combine(op.weights, [u], [rho])) - base)
    r = np.asarray(rises)
    return Sharpness(float(r.mean()), base, base + float(r.mean()), rho, r)


def worst_case_sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float,
                         steps: int = 10, *, step_size: float = 0.5,
                         loss_fn: LossFn = cross_entropy, weights: Weights | None = None,
                         bn: str = "eval", generator: torch.Generator | None = None) -> Sharpness:
    """``max_{‖ε‖≤ρ} L(θ + ε) − L(θ)``, approximated from below by projected gradient ascent.

    Start at SAM's first-order solution ``ε₀ = ρ g/‖g‖`` (``g = ∇L(θ)``; a random point on the
    sphere if ``g = 0``); then ``steps`` times ``ε ← Π_ρ(ε + step_size·ρ·∇L(θ+ε)/‖∇L(θ+ε)‖)``,
    with ``Π_ρ`` the projection onto the ball. The best value seen is returned, so the estimate
    never decreases with more steps (``steps=0`` is SAM's one-step approximation).
    """
    rho = _positive(rho, "rho")
    step_size = _positive(step_size, "step_size")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (0, 1, 2, ...), got {steps!r}")
    op = HVPOperator(model, x, y, loss_fn, weights=weights, bn=bn)
    base = op.loss()
    g = op.gradient()
    gn = P.norm(g)
    eps = (OrderedDict((k, t * (rho / gn)) for k, t in g.items()) if gn > 0
           else OrderedDict((k, t * rho) for k, t in _unit_sphere(op.weights, generator).items()))
    best = op.loss(P.combine(op.weights, [eps], [1.0]))
    history = [best]
    for _ in range(steps):
        g = op.gradient(P.combine(op.weights, [eps], [1.0]))
        gn = P.norm(g)
        if gn == 0:
            break
        eps = OrderedDict((k, eps[k] + g[k] * (step_size * rho / gn)) for k in eps)
        en = P.norm(eps)
        if en > rho:  # projection onto the ball of radius ρ
            eps = OrderedDict((k, t * (rho / en)) for k, t in eps.items())
        value = op.loss(P.combine(op.weights, [eps], [1.0]))
        history.append(value)
        best = max(best, value)
    return Sharpness(best - base, base, best, rho, np.asarray(history) - base)


# --- the largest stable learning rate --------------------------------------------------------

@dataclass
class CriticalLR:
    """Bisection for the largest stable learning rate: the estimate ``lr`` (geometric mean of
    the final bracket ``[stable, diverged]``) and every trial ``(lr, diverged, final loss)``."""

    lr: float
    stable: float
    diverged: float
    trials: list


def _diverges(model: nn.Module, start: Mapping[str, torch.Tensor], x, y, make_optimizer,
              lr: float, batch_size: int, steps: int, blowup: float, seed: int,
              loss_fn: LossFn, initial: float) -> tuple[bool, float]:
    """Train ``steps`` steps from ``start`` at ``lr`` with ``train.fit`` (one epoch of ``steps``
    random batches); diverged if training stopped on a non-finite loss or the final loss on
    ``(x, y)`` exceeds ``blowup``·initial."""
    from . import train as T
    from .data import Dataset

    P.load(model, start)
    opt = make_optimizer(model.parameters(), lr)
    probe = Dataset("probe", x, y, x[:1], y[:1], 0)
    try:  # the same batches for every trial: a generator seeded alike
        T.fit(model, probe, optimizer=opt, epochs=1, sampler=T.RandomSubsets(batch_size, steps),
              loss_fn=loss_fn, generator=torch.Generator().manual_seed(seed), eval_every=0,
              progress=False)
    except T.Diverged:
        return True, float("inf")
    with torch.no_grad():
        model.eval()
        final = float(loss_fn(model(x), y))
    return (not math.isfinite(final)) or final > blowup * initial, final


def critical_learning_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           make_optimizer: Callable, batch_size: int, *,
                           lr_range: tuple[float, float] = (1e-3, 10.0), steps: int = 100,
                           blowup: float = 3.0, rel_tol: float = 0.1, seed: int = 0,
                           loss_fn: LossFn = F.cross_entropy, max_expand: int = 6) -> CriticalLR:
    """The largest learning rate at which ``steps`` optimizer steps from the model's current
    weights do not diverge, by bisection on a log scale.

    ``make_optimizer(params, lr)`` builds the optimizer (e.g. ``lambda p, lr:
    torch.optim.SGD(p, lr)``); batches of ``batch_size`` are drawn from ``(x, y)`` with the
    same seed in every trial (common random numbers). "Diverged" means a non-finite loss, or a
    final loss on all of ``(x, y)`` above ``blowup`` times the initial one. The bracket
    ``lr_range`` is widened (×4 per try, at most ``max_expand`` times) until its low end is
    stable and its high end diverges; bisection stops when ``diverged/stable ≤ 1 + rel_tol``.
    The model's weights are restored afterwards. For SGD on a quadratic with full batches the
    answer is ``2/λ_max``.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    steps = _positive_int(steps, "steps")
    rel_tol, blowup = _positive(rel_tol, "rel_tol"), _positive(blowup, "blowup")
    lo, hi = (_positive(v, "lr_range bounds") for v in lr_range)
    if lo >= hi:
        raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range}")
    start = P.state(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        initial = float(loss_fn(model(x), y))
    trials: list = []

    def test(lr):
        div, final = _diverges(model, start, x, y, make_optimizer, lr, batch_size, steps,
                               blowup, seed, loss_fn, initial)
        trials.append((lr, div, final))
        return div

    try:
        for _ in range(max_expand):
            if not test(lo):
                break
            lo, hi = lo / 4, lo
        else:
            raise ValueError(f"even lr={hi:g} diverges; lower lr_range")  # hi: the last lr tried
        for _ in range(max_expand):
            if test(hi):
                break
            lo, hi = hi, hi * 4
        else:
            raise ValueError(f"even lr={lo:g} is stable; raise lr_range")  # lo: the last lr tried
        while hi / lo > 1 + rel_tol:
            mid = math.sqrt(lo * hi)
            if test(mid):
                hi = mid
            else:
                lo = mid
    finally:
        P.load(model, start)
        model.train(was_training)
    return CriticalLR(math.sqrt(lo * hi), lo, hi, trials)
