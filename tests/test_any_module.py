"""Planes and curvature on models this library did not write: torchvision's MobileNetV3-small,
VisionTransformer and ResNet (BasicBlock, [1, 1, 1, 1]), and ``nn.TransformerEncoder`` in a small
classifier. Tiny inputs keep every test to at most about three seconds of CPU time on one thread
(MobileNet's curvature test is the slowest: every product runs nearly the whole network).

References: a plane point is checked against a hand evaluation (the point's weights loaded
into a copy of the model, which is then called); a Hessian against central finite differences
of plain ``torch.autograd`` gradients of the model in float64, on a block of parameters
(``HVPOperator(weights=...)``) small enough to difference column by column. Those gradients run
PyTorch's own kernels (CPU flash attention, native ``hardsigmoid``), which have first
derivatives only; the operator's composites (``curvature.second_order_kernels``) must give the
same second derivatives. ResNet's smallest tensors are too large to difference cheaply, so its
top eigenvalue is checked by two independent methods instead (ARPACK and power iteration).
"""
from __future__ import annotations

import copy
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_lib import curvature as C
from landscape_lib import directions, landscape
from landscape_lib import params as P

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed")


class EncoderClassifier(nn.Module):
    """Sequences [B, T, 4] → a linear embedding, one ``nn.TransformerEncoderLayer``, mean
    pooling, a linear head."""

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def build(name: str, dtype=torch.float32):
    """``(model in eval mode, x, y)``; BatchNorm statistics estimated on a few inputs, so that
    eval mode is not the identity."""
    torch.manual_seed(0)
    if name == "encoder":
        model, x = EncoderClassifier(), torch.randn(4, 5, 4)
    else:
        import torchvision
        from torchvision.models.resnet import BasicBlock, ResNet
        if name == "mobilenet_v3_small":
            model, x = torchvision.models.mobilenet_v3_small(num_classes=3), torch.randn(2, 3, 32, 32)
        elif name == "vit":
            model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                         num_heads=2, hidden_dim=8, mlp_dim=16,
                                                         num_classes=3)
            nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at 0
            x = torch.randn(2, 3, 16, 16)
        elif name == "resnet":
            model, x = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3), torch.randn(2, 3, 32, 32)
        else:
            raise ValueError(name)
    model, x = model.to(dtype), x.to(dtype)
    P.recompute_bn(model, torch.randn(8, *x.shape[1:], dtype=dtype))
    y = torch.arange(len(x)) % 3
    return model.eval(), x, y


MODELS = [pytest.param("mobilenet_v3_small", marks=needs_torchvision),
          pytest.param("vit", marks=needs_torchvision),
          pytest.param("resnet", marks=needs_torchvision),
          "encoder"]


def hand(model, point, x, y):
    m = copy.deepcopy(model)
    P.load(m, point)
    m.eval()
    with torch.no_grad():
        out = m(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_plane_equals_a_hand_evaluation(name, strategy):
    """In float64, so that any difference is a bug and not float32 rounding amplified by a deep
    net (in float32, MobileNet's vmap plane differs from the hand evaluation by up to 1e-5
    relative at these radii, 1e-3 at four times them; in float64 by 1e-12)."""
    model, x, y = build(name, torch.float64)
    w = P.weights(model)
    g = torch.Generator().manual_seed(1)
    d1, d2 = (directions.random(w, generator=g) for _ in range(2))
    a, b = np.array([-0.1, 0.0, 0.075]), np.array([-0.05, 0.06])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = landscape.plane(model, w, d1, d2, a, b, x, y, strategy=strategy, bn="keep",
                            chunk_size=4)
    fell_back = [r for r in rec if issubclass(r.category, landscape.VmapFallbackWarning)]
    # With torch 2.14 vmap batches all four (nn.MultiheadAttention's inference fast path through
    # PyTorch's own slow per-point fallback, with its performance warning); where vmap cannot
    # batch a model, the warning must say which one.
    assert strategy == "vmap" or not fell_back
    for r in fell_back:
        assert f"cannot batch {type(model).__name__}" in str(r.message)
    assert s.loss.shape == (2, 3)
    for j, bb in enumerate(b):
        for i, aa in enumerate(a):
            loss, acc = hand(model, P.combine(w, [d1, d2], [aa, bb]), x, y)
            assert s.loss[j, i] == pytest.approx(loss, rel=1e-9)
            assert s.acc[j, i] == pytest.approx(acc)
    assert len(np.unique(np.round(s.loss, 6))) > 1  # the plane is not flat


def fd_block(model, x, y, names, h=1e-6):
    """The Hessian block of ``names`` by central differences of autograd gradients (float64)."""
    params = dict(model.named_parameters())
    block = [params[k] for k in names]
    flat0 = torch.cat([p.detach().reshape(-1) for p in block])

    def gradient(flat):
        with torch.no_grad():
            i = 0
            for p in block:
                p.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
        gs = torch.autograd.grad(F.cross_entropy(model(x), y), block)
        return torch.cat([g.reshape(-1) for g in gs])

    cols = []
    try:
        for i in range(len(flat0)):
            e = torch.zeros_like(flat0)
            e[i] = h
            cols.append((gradient(flat0 + e) - gradient(flat0 - e)) / (2 * h))
    finally:
        gradient(flat0)  # restores the weights
    H = torch.stack(cols, 1)
    # a step across a kink (ReLU, hardswish, ...) spoils one column but not its row
    assert (H - H.T).norm() <= 1e-6 * H.norm(), "finite differences crossed a kink: lower h"
    return 0.5 * (H + H.T)


# Parameter blocks whose second derivatives pass through the kernels that lack them natively:
# MobileNet's first squeeze-excitation bottleneck (8 parameters ahead of its hardsigmoid gate,
# with nearly the whole network downstream), and the attention input projections (216
# parameters ahead of scaled-dot-product attention) of the ViT and the encoder.
BLOCKS = {
    "mobilenet_v3_small": ["features.1.block.1.fc1.bias"],
    "vit": ["encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
            "encoder.layers.encoder_layer_0.self_attention.in_proj_bias"],
    "encoder": ["encoder.layers.0.self_attn.in_proj_weight",
                "encoder.layers.0.self_attn.in_proj_bias"],
}


@pytest.mark.parametrize("name", [pytest.param("mobilenet_v3_small", marks=needs_torchvision),
                                  pytest.param("vit", marks=needs_torchvision), "encoder"])
def test_hvp_and_top_eigenvalue_match_a_finite_difference_hessian(name):
    model, x, y = build(name, torch.float64)
    w = P.weights(model)
    names = BLOCKS[name]
    H = fd_block(model, x, y, names)
    lam = torch.linalg.eigvalsh(H)[-1].item()
    block = {k: w[k] for k in names}
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # auto runs the cached graph here (a double backward, as reverse-over-reverse, which is the
    # same autograd path and is left out for time); forward-over-reverse is the other AD path
    for mode in ("auto", "forward-over-reverse"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing noisy, in any mode
            op = C.HVPOperator(model, x, y, weights=block, mode=mode)
            hv = op.mv(v)
        assert (hv - H @ v).norm() <= 1e-6 * hv.norm(), mode
        assert op.mode == ("cached-graph" if mode == "auto" else mode)
    top = C.extremal_eigs(op, which="LA", tol=1e-10)
    assert lam > 0 and top.values[0] == pytest.approx(lam, rel=1e-6)


@needs_torchvision
def test_resnet_top_eigenvalue_by_arpack_and_power_iteration():
    """The block of the last BatchNorm (1,024 parameters): eigsh against power iteration, whose
    Rayleigh quotients approach λ_max from below; and one product against finite differences."""
    model, x, y = build("resnet", torch.float64)
    w = P.weights(model)
    names = ["layer4.0.bn2.weight", "layer4.0.bn2.bias"]
    block = {k: w[k] for k in names}
    op = C.HVPOperator(model, x, y, weights=block)
    top = C.extremal_eigs(op, which="LA", tol=1e-10)
    assert op.mode == "cached-graph"  # every op of a ResNet has a double backward
    reverse = C.HVPOperator(model, x, y, weights=block, mode="reverse-over-reverse")
    power = C.power_iteration(reverse, iters=300, tol=1e-10, generator=torch.Generator().manual_seed(0))
    lam = top.values[0]
    assert lam > 0 and power.converged
    assert power.eigenvalue <= lam * (1 + 1e-9)
    assert power.eigenvalue == pytest.approx(lam, rel=1e-6)
    # one product, both modes, against central differences of autograd gradients along v
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [dict(model.named_parameters())[k] for k in names]
    start = [p.detach().clone() for p in params]
    grads = []
    for sgn in (1, -1):
        with torch.no_grad():
            for p, p0, dv in zip(params, start, P.from_vector(v, block).values()):
                p.copy_(p0 + sgn * 1e-5 * dv)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x), y), params)]))
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    fd = (grads[0] - grads[1]) / 2e-5
    for o in (op, reverse):
        hv = o.mv(v)
        assert (hv - fd).norm() <= 1e-6 * hv.norm(), o.mode
