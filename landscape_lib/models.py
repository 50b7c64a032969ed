"""Models: plain ``nn.Module`` s, named so that layer-wise experiments read well.

* :class:`MLP` — ``in → hidden… → classes`` with optional batch/layer/group norm. Layers are
  named ``fc1, bn1, fc2, …, out`` so parameter names say which layer they belong to.
* :class:`CNN1d` — a small 1-D convolutional net for MNIST-1D.
* :class:`ResMLP` — a residual MLP with a ``skip`` switch: the CPU-scale stand-in for Li et
  al.'s ResNet vs ResNet-noshort experiment (``stem → nb × [Linear-Norm-ReLU-Linear-Norm
  (+identity)] → ReLU → head``).
* :class:`ResNet` — the CIFAR ResNet of He et al. (2016): depth ``6n+2``, stages of 16k, 32k and
  64k channels (``width=k`` gives Wide-ResNet-style widening), ``skip=False`` for the
  "noshort" variant of Li et al. (2018), ``norm`` in ``batch/group/layer/none``.
* :class:`VGG` — VGG-9/11/16 for CIFAR, with or without batch norm.
* :class:`WideResNet` — Zagoruyko & Komodakis's pre-activation WRN-``depth``-``k`` (depth
  ``6n+4``), the network of the SGDR, SWA, SWAG, FreeTickets and DP-at-scale papers.
* :class:`ViT` — a tiny Vision Transformer (pre-LayerNorm blocks, a class token, learned
  position embeddings) over 2-D patches of images or 1-D patches of sequences such as MNIST-1D.
* :class:`WSConv2d`, :class:`WSCNN`, :func:`ws_wide_resnet` — networks without BatchNorm for
  differentially private training (De, Berrada, Hayes, Smith, Balle 2022, arXiv 2204.13650):
  weight-standardised convolutions (Qiao et al. 2019, arXiv 1903.10520) followed by GroupNorm,
  so that no layer mixes the examples of a batch and per-example gradients are well defined.
* :class:`Stacked`, :func:`stacked_loss` — S seeds of one network as one module (batched seeds:
  ``torch.func.stack_module_state`` + ``vmap``, or ``baddbmm`` for a plain MLP).

:func:`build` makes any of them by name and checks the name. Every model accepts inputs of any
shape it can flatten or convolve; none needs special layers for the landscape tools, which
work through ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

NORMS = ("batch", "group", "layer", "none")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
MODELS = ("mlp", "cnn1d", "resmlp", "resnet", "vgg", "wrn", "vit", "wscnn", "wswrn")


def _check_norm(norm: str | None) -> str:
    norm = "none" if norm is None else norm
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return norm


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: "
                         f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def norm_1d(norm: str, features: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``[B, features]`` activations (identity for ``"none"``)."""
    norm = _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "layer":
        return nn.LayerNorm(features)
    if norm == "group":
        return nn.GroupNorm(min(groups, features), features)
    return nn.Identity()


def norm_2d(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``[B, C, H, W]`` maps; ``layer`` is GroupNorm with one group."""
    norm = _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    return nn.Identity()


class MLP(nn.Sequential):
    """Fully connected classifier ``in_dim → hidden[0] → … → n_classes``.

    Each hidden layer is ``fc{i}`` (Linear), then ``bn{i}`` (the norm, if any), then
    ``act{i}``. Inputs are flattened first, so images work too.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256), n_classes: int = 10,
                 norm: str | None = "none", act: str = "relu"):
        norm = _check_norm(norm)
        if in_dim < 1 or n_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer sizes must be positive: in_dim={in_dim}, "
                             f"hidden={tuple(hidden)}, n_classes={n_classes}")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        prev = in_dim
        for i, width in enumerate(hidden, start=1):
            layers.append((f"fc{i}", nn.Linear(prev, width)))
            if norm != "none":
                layers.append((f"bn{i}" if norm == "batch" else f"norm{i}", norm_1d(norm, width)))
            layers.append((f"act{i}", _act(act)))
            prev = width
        layers.append(("out", nn.Linear(prev, n_classes)))
        super().__init__(OrderedDict(layers))


class CNN1d(nn.Module):
    """1-D convolutional classifier for sequences ``[B, L]`` or ``[B, C, L]``.

    ``conv{i}``: Conv1d(kernel 5, stride 2, padding 2) → norm → ReLU, then a linear head on
    the flattened features (the shape of Greydanus's MNIST-1D ConvBase).
    """

    def __init__(self, length: int = 40, channels: Sequence[int] = (32, 32, 32),
                 n_classes: int = 10, in_channels: int = 1, norm: str | None = "none"):
        super().__init__()
        norm = _check_norm(norm)
        self.in_channels = in_channels
        blocks: list[tuple[str, nn.Module]] = []
        prev, size = in_channels, length
        for i, c in enumerate(channels, start=1):
            blocks.append((f"conv{i}", nn.Conv1d(prev, c, 5, stride=2, padding=2)))
            if norm == "batch":
                blocks.append((f"bn{i}", nn.BatchNorm1d(c)))
            elif norm != "none":
                blocks.append((f"norm{i}", nn.GroupNorm(1 if norm == "layer" else min(8, c), c)))
            blocks.append((f"act{i}", nn.ReLU()))
            prev, size = c, (size + 1) // 2
        self.features = nn.Sequential(OrderedDict(blocks))
        self.out = nn.Linear(prev * size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.out(self.features(x).flatten(1))


class ResidualBlock1d(nn.Module):
    """``y = ReLU(f(x) + x)`` with ``f = Linear-Norm-ReLU-Linear-Norm``; without skip ``ReLU(f(x))``."""

    def __init__(self, width: int, norm: str = "batch", skip: bool = True):
        super().__init__()
        self.skip = skip
        self.fc1, self.bn1 = nn.Linear(width, width), norm_1d(norm, width)
        self.fc2, self.bn2 = nn.Linear(width, width), norm_1d(norm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))
        return torch.relu(h + x if self.skip else h)


class ResMLP(nn.Module):
    """Residual MLP: ``stem (Linear-Norm-ReLU) → n_blocks × ResidualBlock1d → head``.

    It has ``2·n_blocks + 2`` weight layers; ``skip=False`` removes every identity shortcut
    (Li et al.'s "noshort" networks), which is what makes deep plain nets chaotic.
    """

    def __init__(self, in_dim: int, width: int = 48, n_blocks: int = 2, n_classes: int = 10,
                 norm: str = "batch", skip: bool = True):
        super().__init__()
        if n_blocks < 0 or width < 1:
            raise ValueError(f"need n_blocks >= 0 and width >= 1, got {n_blocks}, {width}")
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), norm_1d(norm, width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock1d(width, norm, skip) for _ in range(n_blocks)])
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with norm; shortcut = identity, or 1x1 conv + norm on a shape change."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, skip: bool):
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=norm == "none")
        self.bn1 = norm_2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=norm == "none")
        self.bn2 = norm_2d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          norm_2d(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + self.shortcut(x) if self.skip else h)


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): ``depth = 6n + 2`` (20, 32, 44, 56, 110, …).

    ``width`` multiplies the stage widths 16/32/64 (``width=4, depth=16`` is close to WRN-16-4,
    but with post-activation blocks), ``skip=False`` gives the no-shortcut network of Li et al.
    """

    def __init__(self, depth: int = 20, n_classes: int = 10, width: int = 1,
                 norm: str = "batch", skip: bool = True, in_channels: int = 3):
        super().__init__()
        norm = _check_norm(norm)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, "
                             f"110, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, 16 * width, 3, 1, 1, bias=norm == "none")
        self.bn1 = norm_2d(norm, 16 * width)
        stages, c_in = [], 16 * width
        for s, c in enumerate(widths):
            blocks = [BasicBlock(c_in if b == 0 else c, c, 2 if (b == 0 and s > 0) else 1, norm, skip)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean(dim=(2, 3)))


VGG_CONFIGS = {
    9: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, "M"],
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG for 32x32 inputs: conv stacks from :data:`VGG_CONFIGS`, then a 512-512-classes head.

    VGG-9 is Li et al.'s (7 conv + 2 linear layers; the 9 counts weight layers); VGG-11/16 are
    Simonyan & Zisserman's configurations A and D as used by the SWA/FGE code.
    """

    def __init__(self, depth: int = 16, n_classes: int = 10, norm: str = "batch",
                 in_channels: int = 3):
        super().__init__()
        norm = _check_norm(norm)
        if depth not in VGG_CONFIGS:
            raise ValueError(f"unknown VGG depth {depth}; valid depths: "
                             f"{', '.join(map(str, VGG_CONFIGS))}")
        layers, c = [], in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), norm_2d(norm, v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        head_hidden = 512
        if depth == 9:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, head_hidden), nn.ReLU(),
                                            nn.Linear(head_hidden, n_classes))
        else:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, head_hidden), nn.ReLU(),
                                            nn.Linear(head_hidden, head_hidden), nn.ReLU(),
                                            nn.Linear(head_hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    """The WRN block: ``norm → ReLU → conv3x3(stride) → norm → ReLU → dropout → conv3x3``, plus
    the input (or, on a change of shape, a 1x1 convolution of the pre-activated input)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dropout: float,
                 groups: int = 16):
        super().__init__()
        self.bn1 = norm_2d(norm, c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = norm_2d(norm, c_out, groups)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        h = self.conv2(self.drop(torch.relu(self.bn2(self.conv1(a)))))
        return h + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """Wide residual network WRN-d-k (Zagoruyko & Komodakis 2016) for 32x32 inputs.

    ``depth = 6n + 4`` (16, 22, 28, 40, …): a 3x3 stem with 16 channels, three groups of ``n``
    pre-activation blocks with ``16k, 32k, 64k`` channels (stride 2 at the start of groups 2
    and 3), then norm → ReLU → global average pool → linear. WRN-28-10 has 36,479,194
    parameters on CIFAR-10; ``norm="group"`` gives the GroupNorm WRN of De et al. (2022).
    """

    def __init__(self, depth: int = 16, width: int = 4, n_classes: int = 10, norm: str = "batch",
                 dropout: float = 0.0, in_channels: int = 3, groups: int = 16):
        super().__init__()
        norm = _check_norm(norm)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                             f"got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages, c_in = [], 16
        for g, c in enumerate(widths):
            stages.append(nn.Sequential(*[
                PreActBlock(c_in if b == 0 else c, c, 2 if (b == 0 and g > 0) else 1,
                            norm, dropout, groups) for b in range(n)]))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = norm_2d(norm, widths[-1], groups)
        self.fc = nn.Linear(widths[-1], n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.relu(self.bn(h)).mean(dim=(2, 3)))


class Attention(nn.Module):
    r"""Multi-head self-attention, written out so that ``torch.func`` transforms see every step:

    .. math:: \mathrm{softmax}\big(Q K^\top / \sqrt{d_h}\big) V, \qquad Q, K, V = x W_{qkv},

    per head, then an output projection. The product is written out rather than calling
    ``F.scaled_dot_product_attention``, whose fused CPU kernel has no ``vmap`` batching rule
    (``landscape``'s batched path would fall back to a slow loop); at a tiny ViT's sequence
    lengths the plain product costs nothing extra.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        out = att @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """A tiny Vision Transformer (Dosovitskiy et al. 2021).

    Inputs ``[B, C, H, W]`` are cut into ``patch x patch`` squares, inputs ``[B, L]`` or
    ``[B, C, L]`` (sequences such as MNIST-1D) into runs of ``patch`` samples; each patch is
    embedded linearly (a strided convolution), a class token and learned position embeddings are
    added, ``depth`` pre-LayerNorm blocks follow, and the class token's final LayerNorm feeds the
    linear head. The LayerNorms are the "normalisation layers" of SAM-ON on ViTs.
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int = 10, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 3:
            c, h, w = shape
            if h % patch or w % patch:
                raise ValueError(f"image size {h}x{w} is not a multiple of patch {patch}")
            self.embed: nn.Module = nn.Conv2d(c, dim, patch, patch)
            tokens = (h // patch) * (w // patch)
        elif len(shape) in (1, 2):
            c, length = (1, shape[0]) if len(shape) == 1 else shape
            if length % patch:
                raise ValueError(f"sequence length {length} is not a multiple of patch {patch}")
            self.embed = nn.Conv1d(c, dim, patch, patch)
            tokens = length // patch
        else:
            raise ValueError(f"ViT takes (L,), (C, L) or (C, H, W) inputs, got {shape}")
        if min(depth, heads, dim, mlp_ratio) < 1:
            raise ValueError("ViT depth, heads, dim and mlp_ratio must be positive")
        self.input_shape = shape
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_shape) == 1:
            x = x.reshape(x.shape[0], 1, -1)
        t = self.embed(x).flatten(2).transpose(1, 2)  # [B, tokens, dim]
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.ln(self.blocks(t))[:, 0])


def build(name: str, *, input_shape: Sequence[int], n_classes: int, **kwargs) -> nn.Module:
    """Make a model by name for inputs of ``input_shape`` (one example, no batch dimension).

    >>> build("mlp", input_shape=(40,), n_classes=10, hidden=(100, 100))
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    shape = tuple(input_shape)
    flat = 1
    for s in shape:
        flat *= s
    if name == "mlp":
        return MLP(flat, n_classes=n_classes, **kwargs)
    if name == "resmlp":
        return ResMLP(flat, n_classes=n_classes, **kwargs)
    if name == "vit":
        return ViT(shape, n_classes=n_classes, **kwargs)
    if name == "wscnn":
        return WSCNN(input_shape=shape, n_classes=n_classes, **kwargs)
    if name == "cnn1d":
        length = shape[-1]
        in_ch = shape[0] if len(shape) == 2 else 1
        return CNN1d(length=length, in_channels=in_ch, n_classes=n_classes, **kwargs)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got input_shape {shape}")
    if name == "resnet":
        return ResNet(n_classes=n_classes, in_channels=shape[0], **kwargs)
    if name == "wrn":
        return WideResNet(n_classes=n_classes, in_channels=shape[0], **kwargs)
    if name == "wswrn":
        return ws_wide_resnet(n_classes=n_classes, in_channels=shape[0], **kwargs)
    return VGG(n_classes=n_classes, in_channels=shape[0], **kwargs)


def factory(data, name: str, **kwargs) -> Callable[[], nn.Module]:
    """A function that builds a fresh ``name`` model for ``data`` (its input shape and class
    count) on ``data``'s device at every call, e.g. one network per seed.

    The name is checked at once (nothing is built, so the random state is not touched until the
    first call).

    >>> make_model = factory(ds, "mlp", hidden=(256, 256), norm="batch")  # doctest: +SKIP
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")

    def make() -> nn.Module:
        return build(name, input_shape=data.input_shape, n_classes=data.n_classes,
                     **kwargs).to(data.device)

    make.__doc__ = f"A new {name} model ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})."
    return make


@torch.no_grad()
def scale_init(model: nn.Module, scale: float) -> nn.Module:
    """Multiply every weight matrix/kernel (not biases, not norm layers) by ``scale``, in place.

    Used to vary the initialisation scale (Vlaar & Frankle 2022); returns the model.
    """
    if scale <= 0:
        raise ValueError(f"init scale must be positive, got {scale}")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.mul_(scale)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- networks without BatchNorm for DP-SGD (De et al. 2022) ----------------------------------

class WSConv2d(nn.Conv2d):
    r"""A weight-standardised 2-D convolution (Qiao et al. 2019; De et al. 2022, §3.1).

    The kernel used in the forward pass is the stored one standardised per output channel,

    .. math:: \hat W_{o} = \frac{W_o - \operatorname{mean}(W_o)}{\sqrt{\operatorname{var}(W_o) + ε}},

    mean and (biased) variance taken over the ``in_channels × kh × kw`` entries of output
    channel ``o``. It depends on the weights only, never on other examples, so per-example
    gradients stay defined; the gradient reaches ``weight`` through the standardisation.
    """

    def __init__(self, *args, eps: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        if eps <= 0:
            raise ValueError(f"WSConv2d eps must be positive, got {eps}")
        self.eps = eps

    def standardize(self, weight: torch.Tensor) -> torch.Tensor:
        """``Ŵ`` for a kernel ``weight`` of this layer's shape (a pure function of ``weight``)."""
        dims = tuple(range(1, weight.dim()))
        mean = weight.mean(dim=dims, keepdim=True)
        var = weight.var(dim=dims, keepdim=True, unbiased=False)
        return (weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardize(self.weight), self.bias)


class WSCNN(nn.Module):
    """A small image CNN without BatchNorm: ``[WSConv2d 3x3 → GroupNorm → ReLU] × len(channels)
    → flatten → Linear``, the first convolution at stride 1, the others at stride 2.

    With the defaults on 8x8 digits it is the chapter-19 network: WS-Conv(1→16) – GN(4) – ReLU –
    WS-Conv(16→32, stride 2) – GN(4) – ReLU – Linear(512 → 10). ``input_shape`` is ``(C, H, W)``,
    or ``(H·W,)`` for flattened square grey images (sklearn digits: ``(64,)``).
    """

    def __init__(self, input_shape: Sequence[int] = (64,), n_classes: int = 10,
                 channels: Sequence[int] = (16, 32), groups: int = 4):
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            side = math.isqrt(shape[0])
            if side * side != shape[0]:
                raise ValueError(f"a flat input of {shape[0]} values is not a square image; "
                                 f"pass input_shape=(C, H, W)")
            shape = (1, side, side)
        if len(shape) != 3:
            raise ValueError(f"WSCNN takes (C, H, W) or (H*W,) inputs, got {tuple(input_shape)}")
        if not channels or any(c < 1 or c % min(groups, c) for c in channels) or groups < 1:
            raise ValueError(f"channels must be positive multiples of groups={groups}, got "
                             f"{tuple(channels)}")
        self.image_shape = shape
        blocks: list[tuple[str, nn.Module]] = []
        prev, h, w = shape
        for i, c in enumerate(channels, start=1):
            stride = 1 if i == 1 else 2
            blocks += [(f"conv{i}", WSConv2d(prev, c, 3, stride, 1)),
                       (f"norm{i}", nn.GroupNorm(min(groups, c), c)), (f"act{i}", nn.ReLU())]
            prev, h, w = c, (h - 1) // stride + 1, (w - 1) // stride + 1
        self.features = nn.Sequential(OrderedDict(blocks))
        self.out = nn.Linear(prev * h * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.out(self.features(x).flatten(1))


def ws_wide_resnet(depth: int = 16, width: int = 4, n_classes: int = 10, in_channels: int = 3,
                   groups: int = 16, dropout: float = 0.0) -> WideResNet:
    """WRN-``depth``-``width`` without BatchNorm: :class:`WideResNet` with GroupNorm(``groups``)
    in place of every BatchNorm and a :class:`WSConv2d` in place of every convolution (the
    WRN-16-4 of De et al. 2022 with ``depth=16, width=4, groups=16``). The convolutions keep
    the WRN's (Kaiming) initial weights."""
    net = WideResNet(depth, width, n_classes, norm="group", dropout=dropout,
                     in_channels=in_channels, groups=groups)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                ws = WSConv2d(child.in_channels, child.out_channels, child.kernel_size,
                              child.stride, child.padding, bias=child.bias is not None)
                ws.load_state_dict(child.state_dict())
                setattr(parent, name, ws)
    return net


# --- batched seeds: S copies of one network trained as one module ----------------------------

class Stacked(nn.Module):
    """``S`` networks of one architecture as one module, for training several seeds at once.

    Every parameter of ``members[0]``'s architecture becomes one stacked parameter of shape
    ``[S, *shape]`` (``torch.func.stack_module_state``); the forward pass maps the architecture
    over the stacked parameters with ``torch.func.vmap`` (``functional_call`` per replica), so
    ``model(x)`` for a batch ``x`` of shape ``[B, ...]`` is ``[S, B, ...]``: every replica sees
    the same inputs. With :func:`stacked_loss` (the *sum* over replicas of each replica's mean
    loss) the gradient of replica ``s`` is exactly the gradient replica ``s`` would get alone,
    and any elementwise optimizer (SGD, Adam, the splitting integrator with
    ``replica_dims=1``) steps each replica as if it ran alone. Parameter names are the
    architecture's with a ``net.`` prefix (``net.fc1.weight``). Models with buffers (BatchNorm)
    are refused: their running statistics would be shared. A plain :class:`MLP` (Linear layers
    and elementwise activations) is computed with ``torch.baddbmm`` instead of ``vmap`` (the
    same numbers, fewer dispatches on a CPU; ``force_vmap = True`` uses ``vmap``).
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        import copy

        from torch.func import stack_module_state

        members = list(members)
        if not members:
            raise ValueError("Stacked needs at least one member network")
        if any(True for _ in members[0].buffers()):
            raise ValueError("Stacked does not support models with buffers (BatchNorm running "
                             "statistics); use norm='none', 'layer' or 'group'")
        params, _ = stack_module_state(members)
        self.n_replicas = len(members)
        # A plain MLP (Flatten, Linear, elementwise activations) runs as batched matrix
        # products (torch.baddbmm), which on a CPU thread costs far fewer dispatches than vmap.
        elementwise = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity)
        self.batched_matmul = isinstance(members[0], nn.Sequential) and all(
            isinstance(m, (nn.Flatten, nn.Linear) + elementwise) for m in members[0])
        self.net = copy.deepcopy(members[0])
        for name, value in params.items():
            owner, _, leaf = name.rpartition(".")
            mod = self.net.get_submodule(owner) if owner else self.net
            setattr(mod, leaf, nn.Parameter(value.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        if self.batched_matmul and not getattr(self, "force_vmap", False):
            h = x.flatten(1)
            s = self.n_replicas
            h = h.unsqueeze(0).expand(s, *h.shape)
            for m in self.net:
                if isinstance(m, nn.Linear):
                    w = m.weight.transpose(1, 2)  # [S, in, out]
                    h = (torch.baddbmm(m.bias.unsqueeze(1), h, w) if m.bias is not None
                         else torch.bmm(h, w))
                elif not isinstance(m, nn.Flatten):
                    h = m(h)
            return h
        params = dict(self.net.named_parameters())
        return vmap(lambda p, xb: functional_call(self.net, p, (xb,)),
                    in_dims=(0, None))(params, x)

    @torch.no_grad()
    def member(self, i: int) -> nn.Module:
        """Replica ``i`` as a plain network (a copy)."""
        import copy

        if not 0 <= i < self.n_replicas:
            raise ValueError(f"replica {i} out of range 0..{self.n_replicas - 1}")
        net = copy.deepcopy(self.net)
        for name, p in list(net.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            mod = net.get_submodule(owner) if owner else net
            setattr(mod, leaf, nn.Parameter(p[i].clone()))
        return net


def stacked_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """``loss(out, y)`` for a :class:`Stacked` model's output ``[S, B, ...]``: the sum over the
    ``S`` replicas of ``loss_fn``'s mean over the batch (so each replica's gradient is its own)."""

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, b = out.shape[:2]
        return loss_fn(out.reshape(s * b, *out.shape[2:]), y.repeat(s)) * s

    return loss
