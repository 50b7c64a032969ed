"""Weight averaging and its posterior: SWA, EMA, periodic and multi-round SWA, iterate averaging, SWAG.

Everything here stands on ``torch.optim.swa_utils``: :class:`~torch.optim.swa_utils.AveragedModel`
holds every average (equal weights by default, or an EMA through ``multi_avg_fn``),
``get_swa_multi_avg_fn`` / ``get_ema_multi_avg_fn`` do the arithmetic, and ``update_bn``
(through :func:`landscape_lib.params.recompute_bn`) re-estimates BatchNorm statistics of an
average, which were never seen in training.

**SWA** (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, UAI 2018, arXiv 1803.05407). At the end
of every epoch from ``start`` on, ``θ̄ ← (n·θ̄ + θ)/(n+1)``, ``n ← n+1``
(:func:`epoch_callback` around an ``AveragedModel``), then BN recompute (:func:`finalize`).

**EMA** with warm-up: ``θ̄ ← d_n θ̄ + (1−d_n) θ`` with ``d_n = min(β, (1+n)/(10+n))`` after
``n`` earlier updates (:func:`ema`, :func:`ema_decay`, updated per step by :func:`step_hook`).

**PSWA, DSWA, TSWA** (Guo, Jin, Liu, "Stochastic Weight Averaging Revisited", Applied Sciences
2023, arXiv 2201.00519). SWA over periods of ``P`` epochs; at the end of each period the model
is **replaced by the average** (BN recomputed), SGD restarts from it with a **fresh optimizer**
(momentum buffers empty) and the average is reset (:func:`periodic_swa`, :func:`restart`).
DSWA/TSWA are 2/3 rounds of SWA, each started from the previous average
(:func:`multi_round_swa`).

**Iterate averaging for any optimizer** (Granziol, Wan, Albanie, Roberts, arXiv 2003.01247):
:class:`IterateAveraging` wraps an optimizer and keeps the equal average of its iterates from
step ``start_step`` on, every ``every`` steps; :func:`gadam` is AdamW (decoupled weight decay)
+ IA, the paper's Gadam.

**SWAG** (Maddox, Garipov, Izmailov, Vetrov, Wilson, NeurIPS 2019, arXiv 1902.02476), on the
flattened parameters θ_i ∈ R^d collected once per epoch (:class:`SWAG`):

.. math::
    θ̄ = \\tfrac1n Σ_i θ_i,\\quad \\overline{θ^2} = \\tfrac1n Σ_i θ_i^2,\\quad
    Σ_{diag} = \\mathrm{diag}(\\max(\\overline{θ^2} − θ̄^2, 10^{-30})),\\quad
    Σ_{lr} = \\tfrac{1}{K−1} D̂ D̂^⊤,

where the columns of ``D̂`` are the last ``K`` deviations ``D_i = θ_i − θ̄_i`` from the running
mean *after* including θ_i (as the official code). The posterior is ``N(θ̄, scale·(Σ_diag +
Σ_lr))``; the paper's ½ is ``scale = 0.5`` and a sample is

.. math::
    θ̃ = θ̄ + \\sqrt{scale}\\,\\big(Σ_{diag}^{1/2} z_1 + D̂ z_2/\\sqrt{K−1}\\big),
    \\qquad z_1 ∼ N(0, I_d),\\ z_2 ∼ N(0, I_K)

(``scale`` multiplies the covariance, its square root the noise). :func:`bma` averages the
predicted probabilities of ``S`` samples, each with its BatchNorm statistics recomputed.

The learning-rate schedules that feed these averages (SWA's, FGE's triangular cycle,
``per_batch``) live in :mod:`landscape_lib.schedules`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from . import ensembles
from . import params as P
from . import schedules
from . import train as T
from .data import Dataset, n_batches

MakeOptimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


# --- SWA and EMA on AveragedModel -----------------------------------------------------------

def ema_decay(n: int, decay: float = 0.999, warmup: bool = True) -> float:
    """The EMA decay after ``n`` earlier updates: ``min(β, (1+n)/(10+n))`` with warm-up, else β.

    The warm-up keeps an early EMA from being dominated by the initial weights (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)`` rule).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if n < 0:
        raise ValueError(f"number of updates must be >= 0, got {n}")
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


def ema(model: nn.Module, decay: float = 0.999, warmup: bool = True,
        use_buffers: bool = False) -> AveragedModel:
    """An ``AveragedModel`` keeping the EMA ``θ̄ ← d_n θ̄ + (1 − d_n) θ`` of ``model``.

    The update is ``swa_utils.get_ema_multi_avg_fn(d_n)`` with the decay of :func:`ema_decay`
    (``d_n`` for the update that follows ``n`` earlier ones; the first update copies θ).
    ``use_buffers=True`` averages the BatchNorm buffers too, as ``AveragedModel`` does.
    """
    ema_decay(0, decay, warmup)  # validates

    def update(ema_params, current_params, n_averaged):
        d = ema_decay(int(n_averaged), decay, warmup)
        get_ema_multi_avg_fn(d)(ema_params, current_params, n_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=use_buffers)


def _check_schedule(start: int, every: int, what: str) -> None:
    if start < 1:
        raise ValueError(f"{what} must be >= 1 (1-based), got {start}")
    if every < 1:
        raise ValueError(f"averaging frequency 'every' must be >= 1, got {every}")


def finalize(averaged: AveragedModel | nn.Module, bn_data: torch.Tensor | None) -> nn.Module:
    """The averaged network, ready to evaluate: BatchNorm statistics recomputed on ``bn_data``.

    An average's weights were never used in training, so the running statistics it carries
    (those of the last iterate, with ``use_buffers=False``) do not match it. Returns the inner
    module of an ``AveragedModel`` (or the module itself).
    """
    module = averaged.module if isinstance(averaged, AveragedModel) else averaged
    if bn_data is not None:
        P.recompute_bn(module, bn_data)
    elif P.has_batchnorm(module):
        raise ValueError("the model has BatchNorm: pass bn_data (training inputs) to recompute "
                         "the statistics of the averaged weights")
    return module


def epoch_callback(averaged: AveragedModel, *, start: int = 1, every: int = 1,
                   eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                   bn_data: torch.Tensor | None = None, prefix: str = "swa") -> Callable:
    """A ``train.fit`` callback: ``averaged.update_parameters(model)`` at the end of epochs
    ``start, start + every, …`` (1-based, the SWA paper's per-epoch averaging).

    With ``eval_data = (x, y)`` the average is evaluated after every epoch once it holds a
    model (BN recomputed on ``bn_data`` first) and the record gets ``{prefix}_loss`` and
    ``{prefix}_acc``.
    """
    _check_schedule(start, every, "start epoch")

    def callback(epoch: int, model: nn.Module):
        if epoch >= start and (epoch - start) % every == 0:
            averaged.update_parameters(model)
        if eval_data is None or int(averaged.n_averaged) == 0:
            return None
        module = finalize(averaged, bn_data)
        ev = T.evaluate(module, *eval_data)
        return {f"{prefix}_loss": ev["loss"], f"{prefix}_acc": ev["acc"]}

    return callback


def step_hook(averaged: AveragedModel, *, start_step: int = 1, every: int = 1) -> Callable:
    """A ``train.fit`` ``on_step`` hook: update ``averaged`` after steps ``start_step``,
    ``start_step + every``, … (per-iteration EMA or SWA)."""
    _check_schedule(start_step, every, "start step")

    def hook(step: int, model: nn.Module, optimizer) -> None:
        if step >= start_step and (step - start_step) % every == 0:
            averaged.update_parameters(model)

    return hook


# --- periodic SWA (PSWA) and multi-round SWA (DSWA, TSWA) ------------------------------------

def restart(model: nn.Module, averaged: AveragedModel, make_optimizer: MakeOptimizer,
            bn_data: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """PSWA's restart: load the average (BN recomputed on ``bn_data``) into ``model`` and
    return a **fresh** optimizer for it (empty momentum buffers, as the official code's new
    ``torch.optim.SGD``)."""
    if int(averaged.n_averaged) == 0:
        raise ValueError("the average holds no model yet: nothing to restart from")
    module = finalize(averaged, bn_data)
    P.load(model, P.state(module))
    return make_optimizer(model.parameters())


@dataclass
class PeriodicResult:
    """What :func:`periodic_swa` returns.

    ``history`` has one record per epoch (``test_acc``/``test_loss``: the SGD iterate;
    ``avg_acc``/``avg_loss``: the current period's average, where evaluated); ``rounds`` one
    dict per period (``epoch``, ``acc``, ``loss`` of its final average); ``average`` the last
    period's average (BN recomputed)."""

    history: T.History
    rounds: list[dict] = field(default_factory=list)
    average: nn.Module | None = None


def periodic_swa(model: nn.Module, data: Dataset, *, make_optimizer: MakeOptimizer, epochs: int,
                 period: int, start: int = 0, lr_at: Callable[[float], float] | None = None,
                 bn_data: torch.Tensor | None = None, batch_size: int = 128,
                 generator: torch.Generator | None = None, eval_every: int = 1,
                 augment: Callable | None = None, restart_last: bool = True) -> PeriodicResult:
    """Periodic SWA (PSWA, Guo et al. 2023) with ``train.fit``.

    Plain training for ``start`` epochs, then periods of ``period`` epochs: average the model
    at the end of every epoch of the period, and at its end :func:`restart` from the average
    with a fresh optimizer and a new, empty average. ``lr_at(e)`` (a function of the
    fractional epoch, e.g. :func:`~landscape_lib.schedules.swa_lr`) sets the learning rate per
    batch across restarts, so the backbone run with the same ``lr_at`` and ``generator`` sees the
    same learning rates and batches. ``restart_last=False`` leaves the final iterate in ``model``
    instead of the last average. ``eval_every``: evaluate the running average every this many epochs (and at each
    period's end; 0: only at the ends).
    """
    if period < 1:
        raise ValueError(f"period must be >= 1 epoch, got {period}")
    if start < 0 or epochs < start:
        raise ValueError(f"need 0 <= start <= epochs, got start={start}, epochs={epochs}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    bn_data = data.x_train if bn_data is None else bn_data
    generator = T._default_generator() if generator is None else generator
    steps = n_batches(len(data.x_train), batch_size)
    history = T.History()
    result = PeriodicResult(history)

    def fit(opt, n, callbacks=()):
        sched = None if lr_at is None else schedules.per_batch(opt, lr_at, steps, start_epoch=len(history))
        T.fit(model, data, optimizer=opt, epochs=n, batch_size=batch_size, scheduler=sched,
              generator=generator, augment=augment, callbacks=list(callbacks),
              start_epoch=len(history), history=history, progress=False)

    optimizer = make_optimizer(model.parameters())
    if start:
        fit(optimizer, start)
    while len(history) < epochs:
        first, n = len(history) + 1, min(period, epochs - len(history))
        averaged = AveragedModel(model)
        end = first + n - 1

        def evaluate_average(epoch, m, averaged=averaged, first=first, end=end):
            averaged.update_parameters(m)
            if epoch == end or (eval_every and (epoch - first + 1) % eval_every == 0):
                ev = T.evaluate(finalize(averaged, bn_data), data.x_test, data.y_test)
                return {"avg_loss": ev["loss"], "avg_acc": ev["acc"]}
            return None

        fit(optimizer, n, [evaluate_average])
        rec = history.records[-1]
        result.rounds.append({"epoch": rec["epoch"], "acc": rec["avg_acc"], "loss": rec["avg_loss"]})
        result.average = averaged.module
        if len(history) < epochs or restart_last:
            optimizer = restart(model, averaged, make_optimizer, bn_data)
    return result


def multi_round_swa(model: nn.Module, data: Dataset, *, make_optimizer: MakeOptimizer,
                    rounds: int, epochs_per_round: int, **kwargs) -> PeriodicResult:
    """SWA, then SWA again from the average, ``rounds`` times (DSWA: 2, TSWA: 3; Guo et al.).

    The same loop as :func:`periodic_swa` from epoch 0 with ``period = epochs_per_round``:
    ``result.rounds[r]`` is the average of round ``r + 1``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return periodic_swa(model, data, make_optimizer=make_optimizer, period=epochs_per_round,
                        epochs=rounds * epochs_per_round, start=0, **kwargs)


# --- iterate averaging for any optimizer (Gadam) ---------------------------------------------

class IterateAveraging(torch.optim.Optimizer):
    """Wrap any optimizer and keep the equal average of its iterates (IA).

    After the wrapped optimizer's step number ``start_step`` (1-based) and every ``every``
    steps after it, ``θ̄ ← θ̄ + (θ − θ̄)/(n + 1)`` with ``swa_utils.get_swa_multi_avg_fn``. The
    iterates themselves are trained as usual; :meth:`averaged_copy` gives a model with the
    averaged weights (recompute its BatchNorm statistics before evaluating it). The wrapper
    shares the wrapped optimizer's ``param_groups``, so lr schedulers work on either.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, start_step: int = 1, every: int = 1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"IterateAveraging wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_schedule(start_step, every, "start_step")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.start_step, self.every = int(start_step), int(every)
        self.steps, self.n_averaged = 0, 0
        self._avg_fn = get_swa_multi_avg_fn()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _average(self) -> None:
        with torch.no_grad():
            params = self._params()
            if self.n_averaged == 0:
                for p in params:
                    self.state[p]["ia_mean"] = p.detach().clone()
            else:
                self._avg_fn([self.state[p]["ia_mean"] for p in params], [p.detach() for p in params],
                             self.n_averaged)
            self.n_averaged += 1

    def step(self, closure=None):
        """One step of the wrapped optimizer, then the averaging update if it is due."""
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps >= self.start_step and (self.steps - self.start_step) % self.every == 0:
            self._average()
        return loss

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (whose parameters this optimizer trains) with the averages."""
        if self.n_averaged == 0:
            raise ValueError(f"no iterate averaged yet (averaging starts at step {self.start_step}, "
                             f"{self.steps} steps taken)")
        out = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(model.parameters(), out.parameters()):
                if p in self.state and "ia_mean" in self.state[p]:
                    q.copy_(self.state[p]["ia_mean"])
        return out

    def state_dict(self) -> dict:
        return {"base": self.optimizer.state_dict(), "ia": super().state_dict(),
                "steps": self.steps, "n_averaged": self.n_averaged}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["ia"])
        self.param_groups = self.optimizer.param_groups
        self.steps, self.n_averaged = int(state_dict["steps"]), int(state_dict["n_averaged"])


def gadam(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 5e-4, start_step: int = 1, every: int = 1,
          eps: float = 1e-8) -> IterateAveraging:
    """Gadam (Granziol et al.): AdamW (decoupled weight decay) + iterate averaging."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return IterateAveraging(torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                                              weight_decay=weight_decay),
                            start_step=start_step, every=every)


# --- SWAG ------------------------------------------------------------------------------------

class SWAG:
    """SWA-Gaussian (Maddox et al. 2019) over the flattened trainable parameters of a model.

    ``collect(model)`` once per collection point (:meth:`callback` does it in ``train.fit``);
    ``mean``, ``variance`` (the clamped diagonal), ``deviations`` (``[rank, d]``, rows ``D_i``)
    and :meth:`sample` as in the module docstring. ``max_rank`` is K (20 in the paper).
    Moments are stored in ``dtype`` (float32 by default, as the official code even under AMP).
    Σ_lr divides by ``rank − 1``, the number of stored deviations minus one; the official code
    divides by ``max_num_models − 1`` even before K models are collected (the same once
    ``n ≥ K``).
    """

    def __init__(self, model: nn.Module, max_rank: int = 20, var_clamp: float = 1e-30,
                 dtype: torch.dtype = torch.float32):
        if max_rank < 0:
            raise ValueError(f"max_rank must be >= 0, got {max_rank}")
        if not var_clamp > 0:
            raise ValueError(f"var_clamp must be positive, got {var_clamp}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        d = sum(p.numel() for p in self.params)
        device = self.params[0].device
        self.max_rank, self.var_clamp, self.dtype = int(max_rank), float(var_clamp), dtype
        self.n = 0
        self.mean = torch.zeros(d, dtype=dtype, device=device)
        self.sq_mean = torch.zeros(d, dtype=dtype, device=device)
        self._dev = torch.zeros(max_rank, d, dtype=dtype, device=device)  # ring buffer of D_i
        self._next = 0  # slot for the next deviation

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        """Number of stored deviations, ``min(n, K)``."""
        return min(self.n, self.max_rank)

    def collect(self, model: nn.Module) -> None:
        """Add the model's current parameters θ_i to the moments and the deviation buffer."""
        with torch.no_grad():
            theta = parameters_to_vector([p for p in model.parameters() if p.requires_grad])
            if theta.numel() != self.dim:
                raise ValueError(f"model has {theta.numel()} trainable parameters, SWAG holds {self.dim}")
            theta = theta.to(self.dtype)
            w = 1.0 / (self.n + 1)
            # θ̄ ← (n θ̄ + θ)/(n+1),  θ̄₂ ← (n θ̄₂ + θ²)/(n+1)
            self.mean.mul_(1 - w).add_(theta, alpha=w)
            self.sq_mean.mul_(1 - w).add_(theta * theta, alpha=w)
            # D_i = θ_i − θ̄ with the *updated* mean; overwrite the oldest of the last K
            if self.max_rank > 0:
                self._dev[self._next].copy_(theta - self.mean)
                self._next = (self._next + 1) % self.max_rank
            self.n += 1

    def callback(self, start: int = 1, every: int = 1) -> Callable:
        """A ``train.fit`` callback collecting at the end of epochs ``start, start + every, …``."""
        _check_schedule(start, every, "start epoch")

        def cb(epoch: int, model: nn.Module):
            if epoch >= start and (epoch - start) % every == 0:
                self.collect(model)

        return cb

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"SWAG has collected {self.n} model(s); this needs at least {k}")

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal of Σ_diag: ``max(θ̄₂ − θ̄², var_clamp)``."""
        self._need(1)
        return (self.sq_mean - self.mean ** 2).clamp_min(self.var_clamp)

    @property
    def deviations(self) -> torch.Tensor:
        """The stored deviations ``D̂ᵀ`` as rows ``[rank, d]`` (oldest first)."""
        r = self.rank
        if r < self.max_rank:
            return self._dev[:r]
        return torch.roll(self._dev, -self._next, dims=0)

    def covariance(self, use_lowrank: bool = True, max_dim: int = 5000) -> torch.Tensor:
        """The dense ``Σ_diag + Σ_lr`` (``d × d``, for small models and tests only)."""
        if self.dim > max_dim:
            raise ValueError(f"a dense {self.dim}×{self.dim} covariance is too large "
                             f"(max_dim={max_dim})")
        cov = torch.diag(self.variance)
        if use_lowrank:
            self._need(2)
            dhat = self.deviations
            cov = cov + dhat.T @ dhat / (self.rank - 1)
        return cov

    def sample(self, scale: float = 0.5, use_lowrank: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw ``θ̃ ∼ N(θ̄, scale·(Σ_diag + Σ_lr))`` (Σ_lr dropped for SWAG-diagonal).

        ``scale = 0`` returns θ̄ (SWA). The Gaussians are drawn on the CPU from ``generator``
        so a seed gives the same samples on every device.
        """
        with torch.no_grad():
            if scale < 0:
                raise ValueError(f"scale must be >= 0, got {scale}")
            self._need(2 if use_lowrank else 1)
            z1 = torch.randn(self.dim, generator=generator, dtype=self.dtype).to(self.mean.device)
            # Σ_diag^{1/2} z₁: the standard deviation, not the variance, scales the noise
            noise = self.variance.sqrt() * z1
            if use_lowrank:
                z2 = torch.randn(self.rank, generator=generator, dtype=self.dtype).to(self.mean.device)
                noise += (self.deviations.T @ z2) / (self.rank - 1) ** 0.5
            return self.mean + scale ** 0.5 * noise

    def load(self, model: nn.Module, theta: torch.Tensor) -> nn.Module:
        """Write a flat vector (θ̄ or a sample) into ``model``'s trainable parameters."""
        with torch.no_grad():
            params = [p for p in model.parameters() if p.requires_grad]
            vector_to_parameters(theta.to(params[0].dtype), params)
            return model


@dataclass
class BMAResult:
    """``probs``: the Bayesian model average ``(1/S) Σ_s p(y | x, θ̃_s)``; ``members``: each
    sample's probabilities."""

    probs: torch.Tensor
    members: list[torch.Tensor]


def bma(model: nn.Module, swag: SWAG, x: torch.Tensor, *, bn_data: torch.Tensor | None,
        n_samples: int = 30, scale: float = 0.5, use_lowrank: bool = True,
        generator: torch.Generator | None = None, batch_size: int = 4096) -> BMAResult:
    """Bayesian model averaging over SWAG samples (Maddox et al., Alg. 1).

    For each of ``n_samples`` draws: load θ̃_s into a copy of ``model``, recompute its BatchNorm
    statistics on ``bn_data`` (``params.recompute_bn``), predict probabilities for ``x``;
    average the probabilities (``ensembles.ProbabilityAverager``).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    work = copy.deepcopy(model)
    if bn_data is None and P.has_batchnorm(work):
        raise ValueError("the model has BatchNorm: pass bn_data to recompute the statistics "
                         "of every sample")
    avg, members = ensembles.ProbabilityAverager(), []
    for _ in range(n_samples):
        swag.load(work, swag.sample(scale, use_lowrank, generator))
        if bn_data is not None:
            P.recompute_bn(work, bn_data)
        probs = T.predict_proba(work, x, batch_size)
        members.append(probs)
        avg.add(probs)
    return BMAResult(avg.mean, members)
