r"""FiLM-Ensemble: an implicit ensemble of ``M`` members that share one network and differ only
in their normalisation layers' scale and shift (Turkoglu et al., NeurIPS 2022,
`arXiv:2206.00050 <https://arxiv.org/abs/2206.00050>`_; official code ``prs-eth/FILM-Ensemble``,
``models/CBN.py``).

**Member-conditioned normalisation.** The batch is replicated ``M`` times, *sample-major*
(``x.repeat_interleave(M, 0)``: row ``b·M + m`` is sample ``b`` seen by member ``m``). Every
normalisation layer normalises member ``m``'s rows with member ``m``'s own statistics and then
applies member ``m``'s own feature-wise linear modulation (FiLM):

.. math:: \mathrm{out}_{b,m} = γ_m ⊙ \frac{h_{b,m} − μ_m}{\sqrt{σ_m^2 + ε}} + β_m ,

* :class:`MemberBatchNorm` — ``μ_m, σ²_m`` are the batch statistics of member ``m``'s ``B`` rows
  (and all positions), with running estimates per member. It is PyTorch's BatchNorm over
  ``M·C`` channels after a reshape ``(B·M, C, …) → (B, M·C, …)`` (no copy): channel
  ``m·C + c`` of the reshaped tensor is channel ``c`` of member ``m`` (the reshape the card
  suggests; the official ``CBN2D`` computes the same with an *unbiased* variance, PyTorch's BN
  and this layer use the biased one);
* :class:`MemberLayerNorm` and :class:`MemberGroupNorm` — the statistics are per row already
  (nothing to separate), so the layer normalises without affine and applies ``γ_m, β_m``.

**Initialisation and the gain** (:func:`init_film_`). Diversity comes from initialising the
``(M, C)`` matrices ``γ`` and ``β`` with large random values, scaled by a gain ``g``:

* ``"xavier"`` (the official default): ``γ, β ~ U(−a, a)`` with
  ``a = g·\sqrt{6/(M + C)}`` (``torch.nn.init.xavier_uniform_`` on the ``(M, C)`` matrix), zero
  centred, so some channels start sign-flipped or nearly dead;
* ``"bernoulli"`` (official option): ``γ, β ∈ \{−g, +g\}`` with probability ½ each;
* ``"perturb"`` (the card's suggestion for keeping accuracy): the layer's own affine plus the
  Xavier noise, ``γ_m = γ + U(−a, a)``, ``β_m = β + U(−a, a)`` — for a fresh layer
  ``γ ≈ 1 + g·U``; ``g = 0`` gives identical members;
* ``"copy"``: every member takes the layer's own ``γ, β`` (and its running statistics): ``M``
  identical copies of the network (``gain`` must be 0).

**The ensemble** (:class:`FiLMEnsemble`). ``forward(x)`` repeats the batch, runs the network
once and returns the members' logits with shape ``(M, B, K)``; the training loss
(:func:`ensemble_loss`) is the cross-entropy over all ``M·B`` rows with the targets repeated,
so every member sees the same samples; the prediction is the mean of the members'
probabilities, ``p(y|x) = (1/M) Σ_m softmax(z_m)`` (:meth:`FiLMEnsemble.predict_proba` gives
the members', :func:`landscape_lib.ensembles.average` their mean). Metrics, diversity
(disagreement, KL) and reliability diagrams are those of :mod:`landscape_lib.ensembles`.

**Memory.** The members share every weight; each converted layer adds ``2·C·(M − 1)``
parameters (and ``2·C·(M − 1)`` running statistics for BatchNorm) to the single network
(:func:`footprint`). The compute grows with ``M``: every sample goes through the network ``M``
times.

What is PyTorch's: the BatchNorm arithmetic and running statistics (``_BatchNorm``, so
``torch.optim.swa_utils.update_bn`` and ``momentum=None`` work unchanged), ``F.layer_norm``,
``F.group_norm``, ``xavier_uniform_``. What is ours: the member layout, the conversion of any
model's norm layers (:func:`convert`), the inverse (:func:`extract_member`), the wrapper and
the loss.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

INITS = ("xavier", "bernoulli", "perturb", "copy")
NORM_TYPES = ("batch", "layer", "group")
_CONVERTIBLE = {"batch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
                "layer": (nn.LayerNorm,), "group": (nn.GroupNorm,)}


def _check_members(members) -> int:
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"the number of members must be a positive integer, got {members!r}")
    return members


def _split(x: torch.Tensor, members: int) -> int:
    """The number of samples ``B`` in a member-replicated batch of ``B·M`` rows."""
    if x.dim() < 2:
        raise ValueError(f"a FiLM layer needs inputs [B·M, C, ...], got shape {tuple(x.shape)}")
    if x.shape[0] % members:
        raise ValueError(f"the batch has {x.shape[0]} rows, not a multiple of the {members} members: "
                         "replicate it with x.repeat_interleave(M, 0) (FiLMEnsemble does)")
    return x.shape[0] // members


class _AnyBatchNorm(_BatchNorm):
    """PyTorch's batch norm for inputs of any dimension (a member extracted from a
    :class:`MemberBatchNorm` built directly, whose input dimension is unknown)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"batch norm expects 2-D to 5-D input, got {input.dim()}-D")


class MemberBatchNorm(_BatchNorm):
    """BatchNorm with per-member statistics and per-member affine ``γ, β`` of shape ``(M, C)``.

    Inputs are ``[B·M, C]``, ``[B·M, C, L]``, ``[B·M, C, H, W]`` or ``[B·M, C, D, H, W]`` in
    sample-major order; internally PyTorch's batch norm runs over ``M·C`` channels of the
    reshaped ``[B, M·C, …]``. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are
    flat ``(M·C,)`` tensors, member-major; :attr:`gamma`, :attr:`beta` are their ``(M, C)`` views.
    """

    def __init__(self, members: int, num_features: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, track_running_stats: bool = True,
                 device=None, dtype=None):
        self.members = _check_members(members)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        self.features = num_features
        super().__init__(members * num_features, eps, momentum, True, track_running_stats,
                         device=device, dtype=dtype)
        self.plain_type: type = _AnyBatchNorm  # what extract_member builds (convert: the original)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"MemberBatchNorm expects 2-D to 5-D input, got {input.dim()}-D")

    @property
    def gamma(self) -> torch.Tensor:
        """Member scales, ``(M, C)`` (a view of ``weight``)."""
        return self.weight.view(self.members, self.features)

    @property
    def beta(self) -> torch.Tensor:
        """Member shifts, ``(M, C)`` (a view of ``bias``)."""
        return self.bias.view(self.members, self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.features:
            raise ValueError(f"expected {self.features} channels in dim 1, got shape {tuple(x.shape)}")
        b = _split(x, self.members)
        # (B·M, C, …) -> (B, M·C, …): channel m·C + c is member m's channel c
        out = super().forward(x.reshape(b, self.members * self.features, *x.shape[2:]))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"members={self.members}, features={self.features}, eps={self.eps}, momentum={self.momentum}"


class _MemberAffine(nn.Module):
    """Per-member ``γ, β`` of shape ``(M, *shape)`` applied after a per-row normalisation."""

    def __init__(self, members: int, shape: tuple[int, ...], device=None, dtype=None):
        super().__init__()
        self.members = _check_members(members)
        self.weight = nn.Parameter(torch.ones(members, *shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(members, *shape, device=device, dtype=dtype))

    @property
    def gamma(self) -> torch.Tensor:
        return self.weight.view(self.members, -1)

    @property
    def beta(self) -> torch.Tensor:
        return self.bias.view(self.members, -1)

    def _modulate(self, y: torch.Tensor, before: int) -> torch.Tensor:
        """``y [B·M, *mid, *shape]`` (``shape`` starting after ``before`` dims that are not the
        batch) times member γ plus member β."""
        b = _split(y, self.members)
        shape = tuple(self.weight.shape[1:])
        mid = y.shape[1:1 + before]
        ones = (1,) * (y.dim() - 1 - before - len(shape))
        w = self.weight.view(1, self.members, *((1,) * len(mid)), *shape, *ones)
        bias = self.bias.view(1, self.members, *((1,) * len(mid)), *shape, *ones)
        return (y.view(b, self.members, *y.shape[1:]) * w + bias).view(y.shape)


class MemberLayerNorm(_MemberAffine):
    """LayerNorm over the last ``len(normalized_shape)`` dims, then member ``m``'s ``γ_m, β_m``
    (each of shape ``normalized_shape``). Inputs ``[B·M, *, *normalized_shape]``."""

    def __init__(self, members: int, normalized_shape, eps: float = 1e-5, device=None, dtype=None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        super().__init__(members, shape, device, dtype)
        self.normalized_shape, self.eps = shape, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return self._modulate(y, x.dim() - 1 - len(self.normalized_shape))

    def extra_repr(self) -> str:
        return f"members={self.members}, normalized_shape={self.normalized_shape}, eps={self.eps}"


class MemberGroupNorm(_MemberAffine):
    """GroupNorm (statistics per row and group), then member ``m``'s per-channel ``γ_m, β_m``.
    Inputs ``[B·M, C, …]``."""

    def __init__(self, members: int, num_groups: int, num_channels: int, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__(members, (num_channels,), device, dtype)
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modulate(F.group_norm(x, self.num_groups, None, None, self.eps), 0)

    def extra_repr(self) -> str:
        return f"members={self.members}, groups={self.num_groups}, channels={self.num_channels}, eps={self.eps}"


MEMBER_LAYERS = (MemberBatchNorm, MemberLayerNorm, MemberGroupNorm)


def init_bound(members: int, features: int, gain: float) -> float:
    """Half-width ``a = g·√(6/(M + C))`` of the Xavier-uniform draw of an ``(M, C)`` matrix."""
    return float(gain) * math.sqrt(6.0 / (members + features))


def init_film_(layer: nn.Module, init: str = "xavier", gain: float | None = None,
               generator: torch.Generator | None = None) -> nn.Module:
    """(Re-)initialise a member layer's ``γ, β`` in place (see the module docstring for the
    choices ``INITS``). ``"perturb"`` adds the noise to the current ``γ, β`` (for a fresh layer
    ``1`` and ``0``); ``"copy"`` leaves them as they are. ``gain=None`` is 1 (the official
    default) for the random inits and 0 for ``"copy"``. Returns the layer."""
    with torch.no_grad():
        if init not in INITS:
            raise ValueError(f"unknown FiLM init {init!r}; valid inits: {', '.join(INITS)}")
        if not isinstance(layer, MEMBER_LAYERS):
            raise ValueError(f"not a member layer: {type(layer).__name__}; valid layers: "
                             f"{', '.join(t.__name__ for t in MEMBER_LAYERS)}")
        gain = (0.0 if init == "copy" else 1.0) if gain is None else float(gain)
        if not math.isfinite(gain) or gain < 0:
            raise ValueError(f"gain must be finite and >= 0, got {gain}")
        if init == "copy":
            if gain != 0:
                raise ValueError(f"init 'copy' makes identical members and takes gain 0, got {gain}; "
                                 "for noise around the layer's own affine use init='perturb'")
            return layer
        if init in ("xavier", "bernoulli") and gain == 0:
            raise ValueError(f"init {init!r} with gain 0 sets every γ to 0 (a dead network); use "
                             "init='copy' (or 'perturb' with gain 0) for identical members")
        for p in (layer.gamma, layer.beta):        # (M, C) views of the parameters
            if init == "bernoulli":
                sign = torch.empty(p.shape, device=p.device).bernoulli_(0.5, generator=generator)
                p.copy_((2 * sign - 1) * gain)
            else:
                noise = torch.empty(p.shape, device=p.device, dtype=p.dtype)
                nn.init.xavier_uniform_(noise, gain=gain, generator=generator)
                p.copy_(noise if init == "xavier" else p + noise)
        return layer


def _member_layer(module: nn.Module, members: int) -> nn.Module:
    """A member layer holding ``members`` copies of ``module``'s affine and statistics."""
    # device and dtype from the layer's own tensors (a layer without affine: its statistics)
    ref = next(itertools.chain(module.parameters(), (b for b in module.buffers() if b.is_floating_point())),
               None)
    dev, dtype = (None, None) if ref is None else (ref.device, ref.dtype)
    if isinstance(module, _BatchNorm):
        new = MemberBatchNorm(members, module.num_features, module.eps, module.momentum,
                              module.track_running_stats, device=dev, dtype=dtype)
        new.plain_type = type(module)
        with torch.no_grad():
            if module.affine:
                new.gamma.copy_(module.weight.expand(members, -1))
                new.beta.copy_(module.bias.expand(members, -1))
            if module.track_running_stats and module.running_mean is not None:
                new.running_mean.view(members, -1).copy_(module.running_mean.expand(members, -1))
                new.running_var.view(members, -1).copy_(module.running_var.expand(members, -1))
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new
    if isinstance(module, nn.LayerNorm):
        new = MemberLayerNorm(members, module.normalized_shape, module.eps, device=dev, dtype=dtype)
    else:
        new = MemberGroupNorm(members, module.num_groups, module.num_channels, module.eps, device=dev,
                              dtype=dtype)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            new.weight.copy_(module.weight.expand_as(new.weight))
        if getattr(module, "bias", None) is not None:
            new.bias.copy_(module.bias.expand_as(new.bias))
    return new


def convert(model: nn.Module, members: int, *, init: str = "xavier", gain: float | None = None,
            norms: Iterable[str] = NORM_TYPES, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` whose normalisation layers are member-conditioned.

    Every ``BatchNorm1d/2d/3d`` (``norms`` containing ``"batch"``), ``LayerNorm`` (``"layer"``)
    and ``GroupNorm`` (``"group"``) becomes :class:`MemberBatchNorm`, :class:`MemberLayerNorm` or
    :class:`MemberGroupNorm` with ``members`` copies of the layer's affine and statistics
    (a layer without affine starts from ``γ = 1, β = 0``), then :func:`init_film_` with
    ``init``/``gain``, layer by layer in module order from ``generator``. The original
    ``model`` is not changed. The copy expects member-replicated batches: wrap it in
    :class:`FiLMEnsemble` (or use :class:`FiLMEnsemble` directly).
    """
    _check_members(members)
    norms = tuple(norms)
    bad = [n for n in norms if n not in NORM_TYPES]
    if bad:
        raise ValueError(f"unknown norm types {bad}; valid norm types: {', '.join(NORM_TYPES)}")
    kinds = tuple(t for n in norms for t in _CONVERTIBLE[n])
    if init not in INITS:  # checked before any work
        raise ValueError(f"unknown FiLM init {init!r}; valid inits: {', '.join(INITS)}")
    model = copy.deepcopy(model)
    if isinstance(model, kinds):
        return init_film_(_member_layer(model, members), init, gain, generator)
    found = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, init_film_(_member_layer(child, members), init, gain, generator))
                found += 1
    if found == 0:
        raise ValueError(f"{type(model).__name__} has no normalisation layer of the types {', '.join(norms)} "
                         f"to make member-conditioned (valid norm types: {', '.join(NORM_TYPES)}); "
                         "build it with a norm, e.g. models.MLP(..., norm='batch')")
    return model


def member_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The member-conditioned layers of ``model`` as ``(name, layer)`` pairs."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MEMBER_LAYERS)]


def members_of(model: nn.Module) -> int:
    """The number of members of a converted model (all its member layers agree)."""
    counts = {m.members for _, m in member_layers(model)}
    if len(counts) != 1:
        raise ValueError(f"expected a converted model with one member count, found {sorted(counts) or 'none'}")
    return counts.pop()


def extract_member(model: nn.Module, m: int) -> nn.Module:
    """The plain network of member ``m``: a copy of the converted ``model`` (not the wrapper)
    with every member layer replaced by an ordinary ``BatchNorm``/``LayerNorm``/``GroupNorm``
    carrying member ``m``'s ``γ_m, β_m`` (and running statistics)."""
    with torch.no_grad():
        if isinstance(model, FiLMEnsemble):
            model = model.net
        M = members_of(model)
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < M:
            raise ValueError(f"member index must be in 0..{M - 1}, got {m!r}")
        model = copy.deepcopy(model)

        def plain(layer):
            if isinstance(layer, MemberBatchNorm):
                new = layer.plain_type(layer.features, layer.eps, layer.momentum, True, layer.track_running_stats)
                new.weight.copy_(layer.gamma[m])
                new.bias.copy_(layer.beta[m])
                if layer.track_running_stats:
                    new.running_mean.copy_(layer.running_mean.view(M, -1)[m])
                    new.running_var.copy_(layer.running_var.view(M, -1)[m])
                    new.num_batches_tracked.copy_(layer.num_batches_tracked)
                return new.to(layer.weight.device)
            if isinstance(layer, MemberLayerNorm):
                new = nn.LayerNorm(layer.normalized_shape, layer.eps)
            else:
                new = nn.GroupNorm(layer.num_groups, layer.num_channels, layer.eps)
            new.weight.copy_(layer.weight[m])
            new.bias.copy_(layer.bias[m])
            return new.to(layer.weight.device)

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, MEMBER_LAYERS):
                    setattr(parent, name, plain(child))
        return model


class FiLMEnsemble(nn.Module):
    """``M`` members in one forward pass: ``forward(x [B, …]) -> logits [M, B, K]``.

    ``FiLMEnsemble(model, M, init=..., gain=...)`` converts a copy of ``model`` (:func:`convert`);
    a model converted already is used as it is (``init``/``gain`` must then be left out).
    Train it with ``loss_fn=film.ensemble_loss`` (and ``eval_every=0`` in ``train.fit``, whose
    evaluation expects ``[B, K]`` logits); evaluate with :meth:`predict_proba`.
    """

    def __init__(self, model: nn.Module, members: int | None = None, *, init: str | None = None,
                 gain: float | None = None, norms: Iterable[str] = NORM_TYPES,
                 generator: torch.Generator | None = None):
        super().__init__()
        if member_layers(model):
            if init is not None or gain is not None:
                raise ValueError("the model is converted already: leave out init and gain")
            self.net = model
            self.members = members_of(model)
            if members is not None and members != self.members:
                raise ValueError(f"the converted model has {self.members} members, not {members}")
        else:
            if members is None:
                raise ValueError("give the number of members M for a model that is not converted")
            self.net = convert(model, members, init="xavier" if init is None else init, gain=gain,
                               norms=norms, generator=generator)
            self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = self.net(x.repeat_interleave(self.members, dim=0))     # row b·M + m: sample b, member m
        return z.reshape(b, self.members, *z.shape[1:]).transpose(0, 1)   # (M, B, K)

    def predict_proba(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """The members' softmax probabilities ``[M, N, K]`` in eval mode (mode restored)."""
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                return torch.cat([self(xb).softmax(-1) for xb in x.split(batch_size)], dim=1)
            finally:
                self.train(was)


def ensemble_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over all ``M·B`` rows of member logits ``[M, B, K]``, targets repeated:
    the mean of the members' losses (the official ``targets.repeat_interleave(M)`` loss)."""
    if logits.dim() != 3 or logits.shape[1] != y.shape[0]:
        raise ValueError(f"need member logits [M, B, K] and labels [B], got {tuple(logits.shape)} "
                         f"and {tuple(y.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(logits.shape[0]))


def footprint(module: nn.Module) -> dict[str, int]:
    """Parameter and buffer counts and bytes of ``module`` (what its weights occupy in memory)."""
    p = list(module.parameters())
    b = [t for t in module.buffers() if t.is_floating_point()]
    return {"parameters": sum(t.numel() for t in p), "buffers": sum(t.numel() for t in b),
            "bytes": sum(t.numel() * t.element_size() for t in p + b)}
