r"""Differentially private training: DP-SGD with per-example clipping, Gaussian noise,
augmentation multiplicity, Poisson sampling and an accountant.

**DP-SGD** (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, CCS 2016, arXiv
1607.00133) as scaled up by De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy
Differentially Private Image Classification through Scale" (arXiv 2204.13650, 2022). Each step
samples a batch :math:`\mathcal B_t` by **Poisson sampling** (every example independently with
probability :math:`q`; :class:`landscape_lib.train.Poisson`), and for each example :math:`i`

.. math::
    g_i = \frac1K \sum_{k=1}^{K} ∇_θ\, ℓ\big(θ; \mathrm{aug}_k(x_i), y_i\big)
    \qquad \text{(augmentation multiplicity: average the K views } \textit{before } \text{clipping)}

.. math::
    \bar g_i = g_i \min\Big(1, \frac{C}{\lVert g_i \rVert_2}\Big), \qquad
    \hat g = \frac{1}{B}\Big(\sum_{i ∈ \mathcal B_t} \bar g_i + \mathcal N(0, σ^2 C^2 I)\Big),

with :math:`B = qN` the **expected** batch size, a public constant (dividing by the realised
:math:`|\mathcal B_t|` would leak it). The update is any ``torch.optim`` step on :math:`\hat g`
(plain SGD in the paper); an EMA of the iterates (:func:`landscape_lib.averaging.ema`, with
warm-up) is free post-processing.

**Per-example gradients, two ways.**

* ``method="vmap"``: ``torch.func.vmap(grad(functional_call(...)))`` over the examples, each
  seeing its K views as a batch of K, in micro-batches of ``chunk_size`` examples so that at
  most ``chunk_size × P`` floats are held (P parameters). Works for any model without
  cross-example layers.
* ``method="ghost"`` (book-keeping): one forward pass records every layer's input, one backward
  pass gives the gradient with respect to every layer's *output*, and the per-example norms come
  from those without per-example parameter gradients where that is cheaper (Goodfellow 2015,
  arXiv 1510.01799; Li, Tramèr, Liang, Hashimoto 2022 "ghost clipping", arXiv 2110.05679; Bu,
  Wang, Zha, Karypis 2022 "book-keeping", arXiv 2210.00038). For a linear layer with input rows
  :math:`a_{i,t}` and output gradients :math:`δ_{i,t}` (t over positions, here the K views and any
  sequence axis) the per-example weight gradient is :math:`G_i = \sum_t δ_{i,t} a_{i,t}^\top` and

  .. math:: \lVert G_i \rVert_F^2 = \big\langle A_i A_i^\top,\, Δ_i Δ_i^\top \big\rangle
            \quad (= \lVert a_i\rVert^2 \lVert δ_i\rVert^2 \text{ for one position}),

  so the K views of augmentation multiplicity are positions of a sequence. The clipped sum is
  then one product, :math:`\sum_i c_i G_i = (c ∘ Δ)^\top A`, with no second backward pass.
  Convolutions (im2col), weight-standardised convolutions (the standardisation's vector-Jacobian
  product applied per example), GroupNorm and LayerNorm have their own rules; a model with any
  other parametrised layer uses ``"vmap"`` (``method="auto"`` picks).

**Accounting.** The Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism (Mironov
2017, arXiv 1702.07476; Mironov, Talwar, Zhang 2019, arXiv 1908.10530), composed over the steps
and converted to :math:`(ε, δ)`, comes from Opacus (``opacus.accountants``; ``"prv"`` selects
its PRV accountant, Gopi, Lee, Wutschitz 2021). :func:`noise_multiplier` calibrates σ to a
target ε for a number of steps; :func:`max_steps` finds how many steps a fixed σ affords; and
:class:`DPStep` can stop updating once the budget is spent (jax_privacy's
``stop_training_at_epsilon``). Hyper-parameter tuning on the private data is not accounted for.

**No BatchNorm.** BatchNorm normalises each example with statistics of the whole batch, so an
example's gradient depends on the others and per-example clipping no longer bounds one
example's influence; :func:`check_model` refuses it (use GroupNorm, LayerNorm, WS-Conv).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from . import models

METHODS = ("auto", "ghost", "vmap")
# Rényi orders for the RDP accountant: Opacus' defaults (1.1 … 63) and larger ones, which the
# optimum reaches at large ε with small σ (Opacus warns "Optimal order is the largest alpha").
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256]
ACCOUNTANTS = ("rdp", "prv")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


# --- validation -----------------------------------------------------------------------------

def _check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must lie in the open interval (0, 1), got {delta!r}")
    return float(delta)


def _check_clip(max_grad_norm: float) -> float:
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)
            and max_grad_norm > 0):
        raise ValueError(f"clipping norm C (max_grad_norm) must be a finite number > 0, "
                         f"got {max_grad_norm!r}")
    return float(max_grad_norm)


def _check_sigma(noise_multiplier: float) -> float:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
            and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier σ must be a finite number >= 0, "
                         f"got {noise_multiplier!r}")
    return float(noise_multiplier)


def _check_views(views: int) -> int:
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"augmentation multiplicity K (views) must be an integer >= 1, "
                         f"got {views!r}")
    return views


def _check_rate(sample_rate: float) -> float:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sampling rate q must lie in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {steps!r}")
    return steps


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; valid accountants: "
                         f"{', '.join(ACCOUNTANTS)}")
    return accountant


def check_model(model: nn.Module) -> nn.Module:
    """Return ``model`` if no layer mixes the examples of a batch, else raise naming the layers.

    BatchNorm (any ``_BatchNorm`` or ``SyncBatchNorm``) is refused: in training mode it
    normalises each example with the batch's statistics, so one example changes every other
    example's gradient and clipping per example no longer bounds its influence.
    """
    bad = [name or type(model).__name__ for name, m in model.named_modules()
           if isinstance(m, _BATCHNORMS)]
    if bad:
        raise ValueError(f"DP-SGD needs per-example gradients, but BatchNorm mixes the examples of "
                         f"a batch (layers: {', '.join(bad)}). Allowed normalisation layers: "
                         f"GroupNorm, LayerNorm, or none; use models.WSConv2d + GroupNorm "
                         f"(models.WSCNN, models.ws_wide_resnet) or MLP(norm='group'/'layer')")
    return model


# --- accounting (Opacus) -----------------------------------------------------------------------

def _opacus_accountant(name: str):
    try:
        from opacus.accountants import create_accountant
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the privacy accountant needs Opacus: pip install 'opacus>=1.5,<2'") from exc
    return create_accountant(mechanism=_check_accountant(name))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (rate ``sample_rate``, noise σ) at δ.

    σ = 0 gives ε = ∞ (no privacy)."""
    sigma, q = _check_sigma(noise_multiplier), _check_rate(sample_rate)
    steps, delta = _check_steps(steps), _check_delta(delta)
    _check_accountant(accountant)  # before the σ = 0 shortcut, which would skip it
    if sigma == 0:
        return math.inf
    acc = _opacus_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        # the PRV accountant bounds its domain with an RDP computation whose order range it
        # does not expose; its warning is about that bound, not about the ε returned
        if accountant == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta, **_orders(accountant)))


def _orders(accountant: str) -> dict:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


@functools.lru_cache(maxsize=512)  # a pure function of its arguments; a bisection costs ~0.1-1 s
def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest σ (to ``tolerance`` in ε) for which ``steps`` steps at ``sample_rate`` are
    ``(target_epsilon, delta)``-DP: Opacus' ``get_noise_multiplier`` (a bisection on the
    accountant's ε, with Opacus' default Rényi orders; :func:`epsilon` of the result, over more
    orders, can only be smaller)."""
    eps, delta = _check_epsilon(target_epsilon), _check_delta(delta)
    q, steps = _check_rate(sample_rate), _check_steps(steps)
    _opacus_accountant(accountant)  # checks the name and that Opacus is there
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # the bisection's trial σ far below the answer have their optimum at Opacus' largest
        # order; at the returned σ it is inside the range (epsilon() uses more orders anyway)
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                          steps=steps, accountant=accountant,
                                          epsilon_tolerance=tolerance))


def max_steps(target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              accountant: str = "rdp", limit: int = 10**7) -> int:
    """The largest number of steps at σ and ``sample_rate`` whose ε stays ≤ ``target_epsilon``
    (0 if even one step exceeds it), by doubling then bisection on the accountant, capped at
    ``limit`` (the cap is returned only where its ε fits the budget too)."""
    eps, delta = _check_epsilon(target_epsilon), _check_delta(delta)
    sigma, q = _check_sigma(noise_multiplier), _check_rate(sample_rate)
    _check_accountant(accountant)
    if sigma == 0:
        return 0
    spent = lambda t: epsilon(sigma, q, t, delta, accountant)  # noqa: E731
    if spent(1) > eps:
        return 0
    lo, hi = 1, 2
    while True:
        if hi > limit:  # the doubling passed the cap: the answer is limit or lies in [lo, limit)
            if spent(limit) <= eps:
                return limit
            hi = limit
            break
        if spent(hi) > eps:
            break
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # spent(lo) <= eps < spent(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if spent(mid) <= eps else (lo, mid)
    return lo


# --- per-example gradients with torch.func --------------------------------------------------

def _split_views(x: torch.Tensor, y: torch.Tensor, views: int):
    """Rows ``i·K + k`` are view ``k`` of example ``i``: shapes ``[B, K, ...]`` and ``[B, K]``."""
    if len(x) % views:
        raise ValueError(f"{len(x)} rows are not a whole number of examples with K={views} views")
    b = len(x) // views
    return x.reshape(b, views, *x.shape[1:]), y.reshape(b, views)


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     loss_fn: LossFn = F.cross_entropy, views: int = 1,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [B, *param.shape]}`` of the trainable parameters.

    ``x`` holds ``B·K`` rows, example ``i``'s ``K`` views in rows ``i·K … i·K + K − 1``; the
    gradient of example ``i`` is that of ``loss_fn`` (a mean over rows, like
    ``F.cross_entropy``) on its K views, i.e. the mean of the K views' gradients. Computed as
    ``vmap(grad(functional_call))`` in micro-batches of ``chunk_size`` examples.
    """
    check_model(model)
    views = _check_views(views)
    xv, yv = _split_views(x, y, views)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def example_loss(p, xk, yk):  # one example: its K views as a batch of K
        return loss_fn(functional_call(model, (p, frozen, buffers), (xk,)), yk)

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    size = len(xv) if chunk_size is None else _check_chunk(chunk_size)
    parts = [per_example(params, xc, yc) for xc, yc in zip(xv.split(size), yv.split(size))]
    if not parts:
        return {n: params[n].new_zeros((0, *params[n].shape)) for n in names}
    return {n: torch.cat([g[n] for g in parts]) for n in names}


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (examples per micro-batch), "
                         f"got {chunk_size!r}")
    return chunk_size


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / ‖g_i‖)`` per example (1 for a zero gradient)."""
    c = _check_clip(max_grad_norm)
    return (c / norms.clamp_min(1e-12)).clamp(max=1.0)


def _flat_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()))


# --- ghost / book-keeping clipping ------------------------------------------------------------

def ghost_supported(model: nn.Module) -> bool:
    """Whether every parametrised layer of ``model`` has a book-keeping rule (Linear, Conv1d/2d
    without groups or string padding, WSConv2d, GroupNorm, LayerNorm).

    The rules assume what every model in :mod:`landscape_lib.models` does: each layer is called
    once per forward pass, on a tensor whose first axis holds the batch's rows (a layer applied
    to a transposed batch would need ``method="vmap"``)."""
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(m) not in (nn.Linear, nn.Conv1d, nn.Conv2d, models.WSConv2d, nn.GroupNorm,
                           nn.LayerNorm):
            return False
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (
                m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros"):
            return False
    return True


class _Layer:
    """One parametrised layer seen by the book-keeping pass: its input and output."""

    def __init__(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor):
        self.module, self.inp, self.out = module, inp, out


def _linear_rule(m: nn.Linear, a: torch.Tensor, d: torch.Tensor, b: int):
    # a: [B·K, ..., d_in], d: [B·K, ..., d_out] → positions t over the K views and middle axes
    a = a.reshape(b, -1, a.shape[-1])
    d = d.reshape(b, -1, d.shape[-1])
    t = a.shape[1]
    if t == 1:
        sq = a[:, 0].pow(2).sum(1) * d[:, 0].pow(2).sum(1)  # ‖δ_i‖² ‖a_i‖²
        w_grad = None
    elif t * t * (a.shape[2] + d.shape[2]) < t * a.shape[2] * d.shape[2]:
        # ghost norm ⟨A Aᵀ, Δ Δᵀ⟩ with t×t Gram matrices
        sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
        w_grad = None
    else:  # materialise G_i = Σ_t δ_t a_tᵀ when that is cheaper
        w_grad = torch.bmm(d.transpose(1, 2), a)
        sq = w_grad.pow(2).sum((1, 2))
    parts = {"weight": sq}
    if m.bias is not None and m.bias.requires_grad:
        parts["bias"] = d.sum(1).pow(2).sum(1)

    def clipped(c: torch.Tensor) -> dict:
        out = {"weight": (w_grad * c[:, None, None]).sum(0) if w_grad is not None else
               (d * c[:, None, None]).reshape(-1, d.shape[2]).T @ a.reshape(-1, a.shape[2])}
        if "bias" in parts:
            out["bias"] = (d.sum(1) * c[:, None]).sum(0)
        return out

    return {k: v for k, v in parts.items() if getattr(m, k).requires_grad}, clipped


def _ws_stats(m: models.WSConv2d):
    """``Ŵ`` as ``[C_out, n]``, ``r = (var + ε)^{-1/2}`` and ``κ = var/(var + ε)`` per channel."""
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    var = w.var(1, unbiased=False)
    r = torch.rsqrt(var + m.eps)
    return (w - w.mean(1, keepdim=True)) * r[:, None], r, var / (var + m.eps)


def _ws_pullback(m: models.WSConv2d, g_hat: torch.Tensor) -> torch.Tensor:
    r"""The gradient through the weight standardisation ``Ŵ = (W − μ) r``, ``r = (var +
    ε)^{-1/2}`` per output channel: the vector-Jacobian product

    .. math:: ∂L/∂W = r\,\big(G − \operatorname{mean}(G) − Ŵ \operatorname{mean}(G ∘ Ŵ)\big)

    (means over each channel's ``n`` entries) of ``G = ∂L/∂Ŵ``."""
    w_hat, r, _ = _ws_stats(m)
    g = g_hat.reshape(w_hat.shape)
    out = r[:, None] * (g - g.mean(1, keepdim=True) - w_hat * (g * w_hat).mean(1, keepdim=True))
    return out.reshape(m.weight.shape)


def _conv_rule(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor, b: int,
               out: torch.Tensor):
    # im2col: patches P_i [n = C_in·k, K·T] and output gradients Δ_i [C_out, K·T] per example
    # (K views × T positions); the per-example kernel gradient is G_i = Δ_i P_iᵀ.
    a_in = a
    if isinstance(m, nn.Conv1d):
        a = a.unsqueeze(2)
        kernel, stride = (1, *m.kernel_size), (1, *m.stride)
        padding, dilation = (0, *m.padding), (1, *m.dilation)
    else:
        kernel, stride, padding, dilation = m.kernel_size, m.stride, m.padding, m.dilation
    patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    c_out, t, n = d.shape[1], patches.shape[2], patches.shape[1]
    d_full = d
    patches = patches.reshape(b, -1, n, t).transpose(1, 2).reshape(b, n, -1)
    d = d.reshape(b, -1, c_out, t).transpose(1, 2).reshape(b, c_out, -1)
    kt = d.shape[2]
    # per (example, output channel): ‖G_i[o]‖², by t×t Gram matrices or by materialising G_i
    if kt * kt * (n + c_out) < kt * n * c_out:
        gram = torch.bmm(patches.transpose(1, 2), patches)  # [B, KT, KT]
        row_sq = (torch.bmm(d, gram) * d).sum(2)
    else:
        row_sq = torch.bmm(d, patches.transpose(1, 2)).pow(2).sum(2)
    ws = isinstance(m, models.WSConv2d)
    if ws:
        # ‖r(G − Ḡ − Ŵ·mean(G∘Ŵ))‖² per channel = r²(‖G‖² − n·Ḡ² − n·m²(2 − κ)), with
        # Σ_j G[o,j] = Δ_o·(Σ_j P[j,:]) and ⟨G_o, Ŵ_o⟩ = Δ_o·(Ŵ P)_o, the conv's output without bias
        _, r, kappa = _ws_stats(m)
        g_sum = torch.bmm(d, patches.sum(1).unsqueeze(2)).squeeze(2)  # [B, C_out]
        pre = out.detach()
        if m.bias is not None:
            pre = pre - m.bias.detach().view(1, -1, *([1] * (pre.dim() - 2)))
        pre = pre.reshape(b, -1, c_out, t).transpose(1, 2).reshape(b, c_out, -1)
        g_w = (d * pre).sum(2)  # [B, C_out]
        row_sq = r.pow(2) * (row_sq - g_sum.pow(2) / n - g_w.pow(2) / n * (2 - kappa))
    parts = {"weight": row_sq.clamp_min(0).sum(1)}
    bias = d.sum(2) if m.bias is not None and m.bias.requires_grad else None
    if bias is not None:
        parts["bias"] = bias.pow(2).sum(1)

    def clipped(c: torch.Tensor) -> dict:
        # Σ_i c_i Δ_i P_iᵀ: the convolution's own weight gradient of the rescaled Δ
        scale = c.repeat_interleave(len(d_full) // b).view(-1, *([1] * (d_full.dim() - 1)))
        g_hat = torch.ops.aten.convolution_backward(
            d_full * scale, a_in, m.weight.detach(), None, m.stride, m.padding, m.dilation, False,
            [0] * len(m.stride), 1, [False, True, False])[1]
        res = {"weight": _ws_pullback(m, g_hat) if ws else g_hat}
        if bias is not None:
            res["bias"] = c @ bias
        return res

    return ({k: v for k, v in parts.items() if getattr(m, k).requires_grad}, clipped)


def _norm_rule(m: nn.GroupNorm | nn.LayerNorm, a: torch.Tensor, d: torch.Tensor, b: int):
    # per-example affine gradients: γ ← Σ δ ∘ x̂, β ← Σ δ over views and positions
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)
        shape = (b, -1, m.num_channels, d[0].numel() // m.num_channels)
        gam = (d * xhat).reshape(shape).sum((1, 3))
        bet = d.reshape(shape).sum((1, 3))
    else:
        shape = m.normalized_shape
        xhat = F.layer_norm(a, shape, eps=m.eps)
        n = math.prod(shape)
        gam = (d * xhat).reshape(b, -1, n).sum(1)
        bet = d.reshape(b, -1, n).sum(1)
    per = {"weight": gam, "bias": bet}
    per = {k: v for k, v in per.items()
           if getattr(m, k, None) is not None and getattr(m, k).requires_grad}
    parts = {k: v.pow(2).sum(1) for k, v in per.items()}

    def clipped(c: torch.Tensor) -> dict:
        return {k: (c @ v).reshape(getattr(m, k).shape) for k, v in per.items()}

    return parts, clipped


def _ghost_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                       loss_fn: LossFn, views: int):
    b = len(x) // views
    layers: list[_Layer] = []
    seen: set[int] = set()

    def hook(module, inputs, output):
        if id(module) in seen:
            raise RuntimeError(f"layer {type(module).__name__} is called twice in one forward pass;"
                               " use method='vmap'")
        seen.add(id(module))
        layers.append(_Layer(module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    # Σ_i ℓ_i with ℓ_i the mean over example i's K views = B · (mean over all B·K rows)
    loss = loss_fn(logits, y)
    outs = [layer.out for layer in layers]
    d_outs = torch.autograd.grad(loss * b, outs)
    rules = []
    for layer, d in zip(layers, d_outs):
        m = layer.module
        if isinstance(m, nn.Linear):
            rules.append((m, *_linear_rule(m, layer.inp, d, b)))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            rules.append((m, *_conv_rule(m, layer.inp, d, b, layer.out)))
        else:
            rules.append((m, *_norm_rule(m, layer.inp, d, b)))
    sq = torch.zeros(b, device=x.device, dtype=logits.dtype)
    for _, parts, _ in rules:
        for v in parts.values():
            sq = sq + v
    norms = sq.clamp_min(0).sqrt()
    c = clip_factors(norms, max_grad_norm)
    sums = {}
    for m, _, clipped in rules:
        for k, v in clipped(c).items():
            sums[id(getattr(m, k))] = v
    return sums, norms, loss.detach()


def clipped_grad_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     max_grad_norm: float, loss_fn: LossFn = F.cross_entropy, views: int = 1,
                     method: str = "auto", chunk_size: int | None = None):
    """``Σ_i ḡ_i`` (per-example gradients clipped to norm ``C``), the per-example norms
    ``‖g_i‖`` before clipping, and the batch's mean loss.

    Returns ``(sums, norms, loss)`` with ``sums`` a list aligned with ``model.parameters()``
    (trainable ones; ``None`` for frozen ones). ``x`` holds ``B·K`` rows as in
    :func:`per_sample_grads`; ``chunk_size`` examples are processed at a time (default: all),
    which bounds the memory of either method. ``method``: ``"ghost"`` (book-keeping, for models of Linear,
    Conv, WSConv2d, GroupNorm and LayerNorm layers), ``"vmap"`` (any model), ``"auto"`` (ghost
    where supported).
    """
    check_model(model)
    views, c = _check_views(views), _check_clip(max_grad_norm)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    params = list(model.parameters())
    b = len(x) // views
    if len(x) % views:
        raise ValueError(f"{len(x)} rows are not a whole number of examples with K={views} views")
    if b == 0:  # an empty Poisson batch: nothing to clip, only noise will be added
        zeros = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        return zeros, x.new_zeros(0), torch.zeros((), device=x.device)
    use_ghost = method == "ghost" or (method == "auto" and ghost_supported(model))
    if method == "ghost" and not ghost_supported(model):
        raise ValueError("method='ghost' supports Linear, Conv1d/Conv2d (groups=1, numeric "
                         "padding), WSConv2d, GroupNorm and LayerNorm layers only; use "
                         "method='vmap' or 'auto'")
    size = b if chunk_size is None else _check_chunk(chunk_size)
    if use_ghost:  # micro-batches of `size` examples, each one forward and one backward pass
        total = {id(p): torch.zeros_like(p) for p in params if p.requires_grad}
        norms, losses = [], []
        for start in range(0, b, size):
            rows = slice(start * views, (start + size) * views)
            by_id, nrm, loss = _ghost_clipped_sum(model, x[rows], y[rows], c, loss_fn, views)
            for k, v in by_id.items():
                if k in total:
                    total[k] += v
            norms.append(nrm)
            losses.append(loss * len(nrm))
        return ([total[id(p)] if p.requires_grad else None for p in params], torch.cat(norms),
                torch.stack(losses).sum() / b)
    names = {id(p): n for n, p in model.named_parameters()}
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    norms, losses = [], []
    for start in range(0, b, size):
        xs = x[start * views:(start + size) * views]
        ys = y[start * views:(start + size) * views]
        g = per_sample_grads(model, xs, ys, loss_fn=loss_fn, views=views)
        nrm = _flat_norms(g)
        f = clip_factors(nrm, c)
        for n in sums:
            sums[n] += torch.tensordot(f, g[n], dims=1)  # Σ_i c_i g_i of this micro-batch
        norms.append(nrm)
        with torch.no_grad():
            losses.append(loss_fn(model(xs), ys) * len(xs))
    loss = torch.stack(losses).sum() / len(x)
    return [sums[names[id(p)]] if p.requires_grad else None for p in params], torch.cat(norms), loss


def noisy_mean(sums, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
               generator: torch.Generator | None = None):
    """``(Σ_i ḡ_i + N(0, σ²C² I)) / B`` for each tensor of ``sums`` (``None`` stays ``None``).

    ``B`` is the **expected** batch size. The noise is drawn on the CPU from ``generator``
    (so a seed fixes it on every device) and moved to each tensor's device.
    """
    sigma, c = _check_sigma(noise_multiplier), _check_clip(max_grad_norm)
    if not (isinstance(expected_batch_size, (int, float)) and expected_batch_size > 0):
        raise ValueError(f"expected batch size must be > 0, got {expected_batch_size!r}")
    out = []
    for s in sums:
        if s is None:
            out.append(None)
            continue
        noise = torch.randn(s.shape, generator=generator, dtype=s.dtype) if sigma > 0 else None
        total = s if noise is None else s + sigma * c * noise.to(s.device)
        out.append(total / expected_batch_size)
    return out


# --- the DP step for train.fit ------------------------------------------------------------------

def augmult(x: torch.Tensor, y: torch.Tensor, views: int, augment: Callable | None,
            generator: torch.Generator | None):
    """``K`` views of each example, rows ``i·K + k`` = ``augment`` drawn afresh for view ``k``
    of example ``i`` (views are identical copies without ``augment``)."""
    views = _check_views(views)
    if augment is None:
        xs = x.repeat_interleave(views, 0)
    else:
        xs = torch.stack([augment(x, generator) for _ in range(views)], 1).reshape(-1, *x.shape[1:])
    return xs, y.repeat_interleave(views, 0)


@dataclass
class DPStep:
    """DP-SGD as a ``train.fit`` step: ``train.fit(..., sampler=train.Poisson(q),
    step=DPStep(σ, C, expected_batch_size=q·N, sample_rate=q))``.

    Each call takes ``ctx.batch`` (Poisson-sampled), draws ``views`` augmented copies of each
    example with ``augment(x, generator)`` (then ``fit``'s own ``augment`` should be ``None``),
    computes the clipped sum (:func:`clipped_grad_sum`), adds noise and divides by
    ``expected_batch_size`` (:func:`noisy_mean`), writes the result to ``p.grad`` and calls
    ``ctx.optimizer.step()``; it counts one gradient evaluation per step (``views`` forward
    views of the batch are its inputs) and one step of the accountant.

    ``stop_at_epsilon`` (with ``delta``): before each step the accountant checks whether taking
    it would exceed the budget; once it would, the step makes no update, spends no privacy and
    returns the batch loss without computing a gradient (``stopped_at`` records the first such
    step). Use :func:`max_steps` to size ``epochs`` instead where possible.

    After each step, ``last`` holds the step's statistics: the realised batch size, the mean
    per-example norm, the fraction clipped, ``‖mean clipped gradient‖ = ‖Σ ḡ_i‖ / B`` (the
    signal) and the noise's per-coordinate standard deviation ``σC/B`` times ``√P`` (the
    noise norm), for the noise-vs-signal gauge; ``history`` keeps every step's ``last``.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    sample_rate: float
    views: int = 1
    augment: Callable | None = None
    generator: torch.Generator | None = None
    noise_generator: torch.Generator | None = None
    method: str = "auto"
    chunk_size: int | None = None
    loss_fn: LossFn | None = None
    accountant: str = "rdp"
    delta: float | None = None
    stop_at_epsilon: float | None = None
    steps: int = 0
    stopped_at: int | None = None
    last: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def __post_init__(self):
        _check_sigma(self.noise_multiplier)
        _check_clip(self.max_grad_norm)
        _check_views(self.views)
        _check_rate(self.sample_rate)
        _check_accountant(self.accountant)
        if not (isinstance(self.expected_batch_size, (int, float)) and self.expected_batch_size > 0):
            raise ValueError(f"expected batch size must be > 0, got {self.expected_batch_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.delta is not None:
            _check_delta(self.delta)
        if self.stop_at_epsilon is not None:
            _check_epsilon(self.stop_at_epsilon)
            if self.delta is None:
                raise ValueError("stop_at_epsilon needs delta (a number in (0, 1))")
            self._budget = max_steps(self.stop_at_epsilon, self.delta, self.noise_multiplier,
                                     self.sample_rate, self.accountant)
        else:
            self._budget = None
        self._checked: set[int] = set()

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far (at ``delta``, default the step's ``delta``)."""
        d = self.delta if delta is None else delta
        if d is None:
            raise ValueError("give delta (a number in (0, 1)) to compute ε")
        if self.steps == 0:
            return 0.0
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps, d, self.accountant)

    def __call__(self, ctx) -> torch.Tensor:
        model = ctx.model
        if id(model) not in self._checked:
            check_model(model)
            self._checked.add(id(model))
        loss_fn = self.loss_fn or ctx.loss_fn
        x, y = ctx.batch.x, ctx.batch.y
        if self._budget is not None and self.steps >= self._budget:
            if self.stopped_at is None:
                self.stopped_at = ctx.step
            with torch.no_grad():
                return loss_fn(model(x), y) if len(x) else torch.zeros(())
        xs, ys = augmult(x, y, self.views, self.augment, self.generator)
        sums, norms, loss = clipped_grad_sum(model, xs, ys, max_grad_norm=self.max_grad_norm,
                                             loss_fn=loss_fn, views=self.views,
                                             method=self.method, chunk_size=self.chunk_size)
        grads = noisy_mean(sums, self.noise_multiplier, self.max_grad_norm,
                           self.expected_batch_size, self.noise_generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(model.parameters(), grads):
            if g is not None:
                p.grad = g
        ctx.optimizer.step()
        ctx.count_grad_evals()
        self.steps += 1
        n_params = sum(s.numel() for s in sums if s is not None)
        signal = math.sqrt(sum(float(s.pow(2).sum()) for s in sums if s is not None))
        self.last = {"batch": len(x), "mean_norm": float(norms.mean()) if len(norms) else 0.0,
                     "clipped": float((norms > self.max_grad_norm).float().mean()) if len(norms) else 0.0,
                     "signal": signal / self.expected_batch_size,
                     "noise": self.noise_multiplier * self.max_grad_norm
                     * math.sqrt(n_params) / self.expected_batch_size}
        self.history.append(self.last)
        return loss if len(x) else torch.zeros(())
