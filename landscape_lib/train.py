"""Training and evaluation: one loop for every optimizer in the book.

:func:`fit` runs epochs of mini-batches from a :class:`~landscape_lib.data.Dataset` held on the
device. It has two seams, so that every method of the book trains through the same loop:

* ``sampler=`` — which examples form each batch of an epoch. :class:`Shuffled` (the default: a
  seeded permutation cut into batches), :class:`Poisson` (every example joins a batch
  independently with probability ``q``, as DP-SGD's privacy accounting assumes) and
  :class:`RandomSubsets` (independent random subsets, e.g. for a short stability probe).
* ``step=`` — what one batch does. The default, :func:`closure_step`, is the closure protocol of
  ``torch.optim``: ``optimizer.step(closure)``, where plain SGD/Adam evaluate the closure once
  and closure-based methods (SAM's two passes, Entropy-SGD's inner Langevin loop) as often as
  they need. A step is any function ``step(ctx) -> loss`` of a :class:`StepContext`, which holds
  the model, the optimizer, the loss function and the batch, and offers
  :meth:`StepContext.backward` (zero the gradients, forward, backward: one gradient evaluation),
  :meth:`StepContext.closure` and :meth:`StepContext.next_batch` (a *fresh* batch from the same
  stream). Per-sample gradients (DP-SGD), augmentation multiplicity or a multirate forward under
  ``no_grad`` are steps of their own.

**The batch stream.** The sampler draws every epoch's batches from ``generator`` (so a seed fixes
the order on every device). Augmentation is applied **once per batch**, when the batch is drawn,
from its own ``augment_generator``: every closure call of a step sees the same augmented batch,
and however often an optimizer calls its closure, the batch order is that of plain SGD with the
same seed. A step that asks for fresh batches (``next_batch``; an optimizer with
``fresh_batch_per_closure = True`` under :func:`closure_step`) consumes them from the stream, so
no batch is used twice within an epoch; when an epoch's batches run out mid-step, the next ones
come from the next epoch's order, and that epoch has fewer batches left. An epoch ends with the
step that consumed its last batch.

**Counting.** The history counts optimizer steps (``step``), batches consumed (``batches``),
gradient evaluations (``grad_evals``: one per :meth:`StepContext.backward`) and
**effective epochs** = gradient evaluations / batches per epoch, so methods that spend several
gradient evaluations per step (SAM: 2, Entropy-SGD: L) are compared at equal cost.

Learning-rate schedules are ``torch.optim.lr_scheduler`` objects stepped per ``"batch"`` (once per
batch *consumed*), per ``"epoch"`` or with a ``"fractional"`` epoch argument
(``CosineAnnealingWarmRestarts`` as SGDR anneals: ``step(epoch + i/n)`` with ``i`` the batches
consumed so far in the epoch). Every record has the learning rate of every param group.

Divergence is detected: a non-finite loss stops training with :class:`Diverged`, naming the
epoch, the step, the learning rate and the optimizer's hyperparameters. :func:`fork` makes an
exact copy of a run in progress (weights, buffers, optimizer state, batch order), for
experiments that branch. The progress bar is ``tqdm``; it is silent under the book's runner
(``LANDSCAPE_QUIET=1``) or with ``progress=False``.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset

SCHEDULER_STEPS = ("batch", "epoch", "fractional")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diverged(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


@dataclass
class History:
    """Per-epoch records of a run: ``epoch``, ``step``, ``batches``, ``grad_evals``,
    ``effective_epochs``, ``lr`` (param group 0), ``lrs`` (every group), ``train_loss`` and,
    when evaluated, ``test_loss``/``test_acc`` plus whatever callbacks added."""

    records: list[dict] = field(default_factory=list)

    def __getitem__(self, key: str) -> np.ndarray:
        """The column ``key`` over epochs that recorded it."""
        vals = [r[key] for r in self.records if key in r]
        if not vals:
            known = sorted({k for r in self.records for k in r})
            raise KeyError(f"no record has {key!r}; recorded keys: {', '.join(known)}")
        return np.asarray(vals)

    def last(self, key: str):
        """The latest recorded value of ``key``."""
        return self[key][-1]

    def __len__(self) -> int:
        return len(self.records)


def quiet() -> bool:
    """Whether progress bars are off (``LANDSCAPE_QUIET=1``, set by the runner)."""
    return os.environ.get("LANDSCAPE_QUIET", "0") not in ("", "0", "false", "False")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits for ``x`` in eval mode (mode restored afterwards), computed in chunks."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(xb) for xb in x.split(batch_size)])
    finally:
        model.train(was)


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Softmax probabilities for ``x`` in eval mode."""
    return predict_logits(model, x, batch_size).softmax(-1)


# PyTorch's CPU log_softmax is vectorised along a row only from this many classes on
SLOW_LOG_SOFTMAX_BELOW = 16


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""``F.cross_entropy(logits, target)`` (the mean over a batch of class indices), the
    default loss wherever the library only *evaluates* a model (planes, Hessian products,
    :func:`evaluate`):

    .. math:: \ell(z, y) = \frac1N \sum_i \Big(\log \sum_c e^{z_{ic}} - z_{i y_i}\Big).

    The same function, computed differently where that is faster: on a CPU with fewer than
    ``SLOW_LOG_SOFTMAX_BELOW`` = 16 classes, as ``logsumexp − gather``. PyTorch's CPU
    ``log_softmax`` kernel runs a scalar loop along rows shorter than 16 (measured, torch 2.14,
    one thread, 1000 rows: 140 µs for 10 classes, 13 µs for 16; ``logsumexp`` + ``gather``
    40 µs): a 41×41 plane of the 40-100-100-10 MNIST-1D MLP on 1000 points takes 0.69 s
    instead of 0.88 s, its Hessian-vector product 3–4 % less (``benchmarks/peers.py``).
    Everything else — GPUs, 16 classes or more, probability targets, extra dimensions — goes to
    ``F.cross_entropy`` itself. Training keeps ``F.cross_entropy`` (a change in the last
    bit of every step would change every trained network). Class indices must lie in
    ``[0, C)`` (``gather`` raises otherwise; ``F.cross_entropy``'s ``ignore_index`` is not
    supported on the fast path).
    """
    if (logits.ndim == 2 and logits.shape[1] < SLOW_LOG_SOFTMAX_BELOW and logits.device.type == "cpu"
            and not target.is_floating_point() and target.ndim == 1):
        return (torch.logsumexp(logits, 1) - logits.gather(1, target.unsqueeze(1)).squeeze(1)).mean()
    return F.cross_entropy(logits, target)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn: LossFn = cross_entropy, batch_size: int = 4096) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    logits = predict_logits(model, x, batch_size)
    return {"loss": float(loss_fn(logits, y)),
            "acc": float((logits.argmax(1) == y).float().mean())}


def _default_generator() -> torch.Generator:
    # Drawn from the global RNG, so seed_everything(seed) fixes the batch order too.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in exactly the state of ``generator`` (same device)."""
    out = torch.Generator(device=generator.device)
    out.set_state(generator.get_state())
    return out


# --- samplers: which examples make up each batch of an epoch ----------------------------------

class Sampler(Protocol):
    """Draws one epoch of batches as index tensors (CPU, long) into the training set."""

    def epoch(self, n: int, generator: torch.Generator) -> list[torch.Tensor]: ...

    def batches_per_epoch(self, n: int) -> int: ...


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (1, 2, 3, ...), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Shuffled:
    """A seeded permutation of the ``n`` training points cut into batches of ``batch_size``
    (the last partial batch kept unless ``drop_last``): ``torch.randperm(n, generator)`` once per
    epoch, exactly as :func:`landscape_lib.data.batches`."""

    batch_size: int
    drop_last: bool = False

    def __post_init__(self):
        _positive_int(self.batch_size, "batch_size")

    def epoch(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(n, generator=generator)
        stop = n - n % self.batch_size if self.drop_last else n
        return list(order[:stop].split(self.batch_size))

    def batches_per_epoch(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


@dataclass(frozen=True)
class Poisson:
    """Poisson sampling: each of the ``n`` points joins each batch independently with probability
    ``rate`` (the sampling DP-SGD's accountants assume; Abadi et al. 2016). A batch's size is
    Binomial(n, rate), so it varies and can be zero; its **expected** size is ``rate·n``. An
    epoch is ``round(1/rate)`` batches (one expected pass over the data)."""

    rate: float

    def __post_init__(self):
        if not (isinstance(self.rate, (int, float)) and 0 < self.rate <= 1):
            raise ValueError(f"sampling rate must lie in (0, 1], got {self.rate!r}")

    @classmethod
    def expected(cls, batch_size: int, n: int) -> "Poisson":
        """The Poisson sampler whose expected batch size is ``batch_size`` of ``n`` points."""
        _positive_int(batch_size, "batch_size")
        if batch_size > n:
            raise ValueError(f"expected batch size {batch_size} exceeds the {n} training points")
        return cls(batch_size / n)

    def expected_batch_size(self, n: int) -> float:
        return self.rate * n

    def epoch(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        out = []
        for _ in range(self.batches_per_epoch(n)):
            keep = torch.rand(n, generator=generator) < self.rate
            out.append(keep.nonzero().squeeze(1))
        return out

    def batches_per_epoch(self, n: int) -> int:
        return max(1, round(1 / self.rate))


@dataclass(frozen=True)
class RandomSubsets:
    """``batches`` independent random subsets of ``batch_size`` distinct points per epoch
    (``torch.randperm(n)[:batch_size]`` each), for short probes that should not depend on
    where an epoch boundary falls."""

    batch_size: int
    batches: int

    def __post_init__(self):
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.batches, "batches")

    def epoch(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randperm(n, generator=generator)[:self.batch_size] for _ in range(self.batches)]

    def batches_per_epoch(self, n: int) -> int:
        return self.batches


# --- the batch stream and the step seam -------------------------------------------------------

class Batch(NamedTuple):
    """One mini-batch: inputs (augmented, if ``fit`` augments), labels and their indices into the
    training set (CPU)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


class _Stream:
    """The epochs' batches, drawn one epoch at a time from the sampler, augmented when drawn.

    ``current`` holds the current epoch's remaining index tensors; a step that reaches past it
    draws the following epochs' orders early (``ahead``, each with its count of consumed
    batches), and :meth:`new_epoch` then starts from them instead of drawing again.
    """

    def __init__(self, data: Dataset, sampler, generator, augment, augment_generator):
        self.data, self.sampler, self.generator = data, sampler, generator
        self.augment, self.augment_generator = augment, augment_generator
        self.n = len(data.x_train)
        self.current: list[torch.Tensor] = []
        self.consumed = 0  # batches of the current epoch consumed so far
        self.ahead: list[list] = []  # [remaining index tensors, consumed] of later epochs

    def new_epoch(self) -> None:
        if self.ahead:
            self.current, self.consumed = self.ahead.pop(0)
        else:
            self.current, self.consumed = self.sampler.epoch(self.n, self.generator), 0

    @property
    def epoch_done(self) -> bool:
        return not self.current

    def next(self) -> Batch:
        if self.current:
            idx = self.current.pop(0)
            self.consumed += 1
        else:  # a step reached past the epoch: take the next epoch's order
            entry = next((a for a in self.ahead if a[0]), None)
            if entry is None:
                entry = [self.sampler.epoch(self.n, self.generator), 0]
                self.ahead.append(entry)
            idx = entry[0].pop(0)
            entry[1] += 1
        i = idx.to(self.data.x_train.device)
        x, y = self.data.x_train[i], self.data.y_train[i]
        if self.augment is not None:
            x = self.augment(x, self.augment_generator)
        return Batch(x, y, idx)


@dataclass
class StepContext:
    """What a step function sees: the run's pieces and the current batch.

    ``epoch`` is 1-based; ``step`` is the number of this optimizer step (1-based, counted across
    ``fit`` calls that continue a history). ``grad_evals`` and ``batches`` count what this step
    has spent so far.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    batch: Batch
    epoch: int
    step: int
    _stream: _Stream
    grad_evals: int = 0
    batches: int = 1

    def next_batch(self) -> Batch:
        """A fresh batch from the stream (never one already used in this epoch)."""
        self.batches += 1
        return self._stream.next()

    def count_grad_evals(self, n: int = 1) -> None:
        """Count ``n`` gradient evaluations done by the step itself (e.g. per-sample gradients of
        one batch count as one)."""
        self.grad_evals += int(n)

    def backward(self, batch: Batch | None = None) -> torch.Tensor:
        """Zero the gradients, compute ``loss_fn(model(x), y)`` on ``batch`` (default: this step's
        batch), backpropagate, and return the loss (one gradient evaluation)."""
        b = self.batch if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(b.x), b.y)
        loss.backward()
        self.grad_evals += 1
        return loss

    def closure(self, fresh: bool = False) -> Callable[[], torch.Tensor]:
        """A ``torch.optim`` closure over this step's batch. With ``fresh=True`` every call after
        the first draws a fresh batch (Entropy-SGD's inner loop)."""
        calls = [0]

        def closure():
            if fresh and calls[0] > 0:
                self.batch = self.next_batch()
            calls[0] += 1
            return self.backward()

        return closure


Step = Callable[[StepContext], torch.Tensor]


def closure_step(ctx: StepContext) -> torch.Tensor:
    """The default step: ``optimizer.step(closure)``; an optimizer with
    ``fresh_batch_per_closure = True`` gets a fresh batch at every closure call after the first."""
    fresh = bool(getattr(ctx.optimizer, "fresh_batch_per_closure", False))
    loss = ctx.optimizer.step(ctx.closure(fresh=fresh))
    if loss is None:
        raise TypeError(f"{type(ctx.optimizer).__name__}.step(closure) returned None; "
                        "the training loop needs the closure's loss")
    return loss


# --- fit ------------------------------------------------------------------------------------

def fit(model: nn.Module, data: Dataset, *, optimizer: torch.optim.Optimizer, epochs: int,
        batch_size: int = 128, sampler: Sampler | None = None, step: Step = closure_step,
        scheduler=None, scheduler_step: str = "batch", loss_fn: LossFn = F.cross_entropy,
        augment: Callable | None = None, generator: torch.Generator | None = None,
        augment_generator: torch.Generator | None = None, eval_every: int = 1,
        callbacks: list[Callable] | None = None, on_step: list[Callable] | None = None,
        progress: bool | None = None, desc: str = "train", start_epoch: int = 0,
        history: History | None = None) -> History:
    """Train ``model`` on ``data`` and return its :class:`History`.

    Parameters
    ----------
    optimizer
        Any ``torch.optim.Optimizer``.
    epochs
        Number of epochs (passes of the sampler over the data).
    batch_size, sampler
        The default sampler is ``Shuffled(batch_size)``; a ``sampler`` replaces it (and
        ``batch_size`` is then unused).
    step
        ``step(ctx) -> loss``: what one batch does (default :func:`closure_step`).
    scheduler, scheduler_step
        An lr scheduler and when to step it: ``"batch"`` (once per batch consumed),
        ``"epoch"`` (after every epoch) or ``"fractional"`` (``scheduler.step(epoch + i/n)``
        before a step, ``i`` the batches consumed so far in the epoch of ``n``).
    augment, augment_generator
        ``augment(x_batch, generator) -> x_batch`` applied once to every training batch when it
        is drawn (e.g. :func:`~landscape_lib.data.crop_flip`), from ``augment_generator``
        (default: a new generator seeded from the global RNG).
    generator
        Orders the batches (default: a new generator seeded from the global RNG).
    eval_every
        Evaluate on the test set every this many epochs and after the last (0: never).
    callbacks
        ``callback(epoch, model) -> dict | None`` after each epoch (1-based ``epoch``); a
        returned dict is merged into the epoch's record (e.g. the SWA average's accuracy).
    on_step
        ``hook(step, model, optimizer)`` after every optimizer step (EMA updates, masks).
    start_epoch, history
        Continue a run: epochs are numbered from ``start_epoch + 1`` and appended to
        ``history``; the step, batch and gradient counters continue from its last record.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if sampler is None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampler = Shuffled(int(batch_size))
    if scheduler_step not in SCHEDULER_STEPS:
        raise ValueError(f"unknown scheduler_step {scheduler_step!r}; valid choices: "
                         f"{', '.join(SCHEDULER_STEPS)}")
    if not callable(step):
        raise TypeError(f"step must be a function step(ctx) -> loss, got {type(step).__name__}")
    history = History() if history is None else history
    generator = _default_generator() if generator is None else generator
    if augment is not None and augment_generator is None:
        augment_generator = _default_generator()
    callbacks, on_step = list(callbacks or []), list(on_step or [])
    stream = _Stream(data, sampler, generator, augment, augment_generator)
    per_epoch = sampler.batches_per_epoch(len(data.x_train))
    last = history.records[-1] if history.records else {}
    n_step = last.get("step", 0)
    n_batches, n_grads = last.get("batches", 0), last.get("grad_evals", 0)
    show = (not quiet()) if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, leave=False)
    model.train()
    try:
        for e in range(start_epoch, start_epoch + epochs):
            stream.new_epoch()
            total, count = torch.zeros((), device=data.device), 0
            while not stream.epoch_done:
                if scheduler is not None and scheduler_step == "fractional":
                    scheduler.step(e + stream.consumed / per_epoch)
                n_step += 1
                ctx = StepContext(model, optimizer, loss_fn, stream.next(), e + 1, n_step, stream)
                loss = step(ctx)
                loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
                if not torch.isfinite(loss):
                    raise Diverged(_divergence_message(e + 1, n_step, loss, optimizer))
                n_batches += ctx.batches
                n_grads += ctx.grad_evals
                total += loss.to(total.device)
                count += 1
                for hook in on_step:
                    hook(n_step, model, optimizer)
                if scheduler is not None and scheduler_step == "batch":
                    for _ in range(ctx.batches):
                        scheduler.step()
            if scheduler is not None and scheduler_step == "epoch":
                scheduler.step()
            record = {"epoch": e + 1, "step": n_step, "batches": n_batches, "grad_evals": n_grads,
                      "effective_epochs": n_grads / per_epoch,
                      "lr": optimizer.param_groups[0]["lr"],
                      "lrs": [g["lr"] for g in optimizer.param_groups],
                      # mean over the steps that started in this epoch (NaN if none did: steps
                      # of earlier epochs consumed all its batches)
                      "train_loss": float(total) / count if count else float("nan")}
            final = e == start_epoch + epochs - 1
            if eval_every and ((e + 1 - start_epoch) % eval_every == 0 or final):
                ev = evaluate(model, data.x_test, data.y_test, loss_fn=loss_fn)
                record.update(test_loss=ev["loss"], test_acc=ev["acc"])
                model.train()
            for cb in callbacks:
                extra = cb(e + 1, model)
                model.train()
                if extra:
                    record.update(extra)
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise Diverged(_divergence_message(e + 1, n_step, float("nan"), optimizer,
                                                   what="weights"))
            history.records.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                 if k in ("train_loss", "test_acc")})
    finally:
        if bar is not None:
            bar.close()
    return history


def _divergence_message(epoch: int, step: int, loss, optimizer, what: str = "loss") -> str:
    lrs = [g.get("lr") for g in optimizer.param_groups]
    lr = lrs[0] if len(set(lrs)) == 1 else lrs
    hyper = {k: v for k, v in optimizer.defaults.items()
             if isinstance(v, (int, float, bool, tuple)) and k not in ("foreach", "fused",
                                                                        "capturable",
                                                                        "differentiable",
                                                                        "maximize")}
    if callable(getattr(optimizer, "hyperparameters", None)):  # per-group (langevin)
        hyper = optimizer.hyperparameters()
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return (f"training diverged: non-finite {what} ({value}) at epoch {epoch}, step {step}; "
            f"{type(optimizer).__name__} with lr={lr}, hyperparameters {hyper}. "
            f"Try a smaller learning rate.")


# --- forking a run ----------------------------------------------------------------------------

class Fork(NamedTuple):
    """An exact copy of a run in progress: ``model, optimizer, generator`` (``generator`` is
    ``None`` when none was given)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None


def fork(model: nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator | None = None) -> Fork:
    """Copy a run between two :func:`fit` calls: weights, buffers (BatchNorm statistics), the
    optimizer with its state (momentum buffers, step counts, ``initial_lr``) bound to the copy's
    parameters, and the batch generator's state, so the copy continues exactly as the original
    would. Both go on independently: nothing is shared (``opt2.load_state_dict(opt.state_dict())``
    would share the momentum buffers, so each branch's steps would move the other's).

    The model and the optimizer are deep-copied *together* (one ``copy.deepcopy`` memo), which
    maps every parameter the optimizer refers to (in its groups and its state) to the copy's.
    An optimizer is copied attribute by attribute (``torch.optim.Optimizer.__getstate__`` keeps
    only its groups and state, which would drop a wrapper's own attributes), and an optimizer
    held inside another (``averaging.IterateAveraging``) is copied the same way. Schedulers are
    not copied: make a new one for the copy (``schedules.per_batch(..., start_epoch=...)``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fork needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    if foreign:
        raise ValueError(f"the optimizer trains {len(foreign)} tensor(s) that are not parameters "
                         "of the model; fork the module that owns them")
    memo: dict = {}
    model2 = copy.deepcopy(model, memo)
    optimizer2 = _copy_optimizer(optimizer, memo)
    return Fork(model2, optimizer2, None if generator is None else copy_generator(generator))


def _copy_optimizer(optimizer: torch.optim.Optimizer, memo: dict) -> torch.optim.Optimizer:
    if id(optimizer) in memo:
        return memo[id(optimizer)]
    new = object.__new__(type(optimizer))
    memo[id(optimizer)] = new
    for value in optimizer.__dict__.values():  # wrapped optimizers first, with all their attributes
        if isinstance(value, torch.optim.Optimizer):
            _copy_optimizer(value, memo)
    # An lr scheduler replaces ``optimizer.step`` on the instance by a wrapper that holds a weak
    # reference to *this* optimizer: copied, it would step the original. The copy keeps the
    # class's ``step`` (a scheduler made for the copy patches it again).
    own = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "_opt_called")}
    new.__dict__.update(copy.deepcopy(own, memo))
    return new
