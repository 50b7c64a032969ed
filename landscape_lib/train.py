"""Training and evaluation: one loop for every optimizer in the book.

:func:`fit` runs epochs of shuffled mini-batches from a :class:`~landscape_lib.data.Dataset`
held on the device. Every step goes through ``optimizer.step(closure)``, the closure protocol
of ``torch.optim``: plain SGD/Adam evaluate the closure once, while closure-based methods
(SAM's two passes, Entropy-SGD's inner Langevin loop) call it as often as they need. An
optimizer that sets ``fresh_batch_per_closure = True`` gets a new mini-batch at every closure
call (Entropy-SGD's inner loop samples fresh batches).

Learning-rate schedules are ``torch.optim.lr_scheduler`` objects stepped per ``"epoch"``, per
``"batch"`` or with a ``"fractional"`` epoch argument (``CosineAnnealingWarmRestarts`` as
SGDR anneals: ``step(epoch + i/n)``).

Divergence is detected: a non-finite loss stops training with :class:`Diverged`, naming the
epoch, the step, the learning rate and the optimizer's hyperparameters. The progress bar is
``tqdm``; it is silent under the book's runner (``LANDSCAPE_QUIET=1``) or with
``progress=False``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, batches, n_batches

SCHEDULER_STEPS = ("batch", "epoch", "fractional")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diverged(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


@dataclass
class History:
    """Per-epoch records of a run: ``epoch``, ``step``, ``lr``, ``train_loss`` and, when
    evaluated, ``test_loss``/``test_acc`` plus whatever callbacks added."""

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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn: LossFn = F.cross_entropy, batch_size: int = 4096) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    logits = predict_logits(model, x, batch_size)
    return {"loss": float(loss_fn(logits, y)),
            "acc": float((logits.argmax(1) == y).float().mean())}


def _default_generator() -> torch.Generator:
    # Drawn from the global RNG, so seed_everything(seed) fixes the batch order too.
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def fit(model: nn.Module, data: Dataset, *, optimizer: torch.optim.Optimizer, epochs: int,
        batch_size: int = 128, scheduler=None, scheduler_step: str = "batch",
        loss_fn: LossFn = F.cross_entropy, augment: Callable | None = None,
        generator: torch.Generator | None = None, eval_every: int = 1,
        callbacks: list[Callable] | None = None, on_step: list[Callable] | None = None,
        progress: bool | None = None, desc: str = "train", start_epoch: int = 0,
        history: History | None = None) -> History:
    """Train ``model`` on ``data`` and return its :class:`History`.

    Parameters
    ----------
    optimizer
        Any ``torch.optim.Optimizer``; it is stepped with a closure.
    epochs, batch_size
        Number of passes and mini-batch size; the last partial batch is kept.
    scheduler, scheduler_step
        An lr scheduler and when to step it: ``"batch"`` (after every optimizer step),
        ``"epoch"`` (after every epoch) or ``"fractional"`` (``scheduler.step(epoch + i/n)``
        before step ``i`` of an epoch with ``n`` batches, for ``CosineAnnealingWarmRestarts``).
    augment
        ``augment(x_batch, generator) -> x_batch`` applied to training batches (e.g.
        :func:`~landscape_lib.data.crop_flip`).
    eval_every
        Evaluate on the test set every this many epochs and after the last (0: never).
    callbacks
        ``callback(epoch, model) -> dict | None`` after each epoch (1-based ``epoch``); a
        returned dict is merged into the epoch's record (e.g. the SWA average's accuracy).
    on_step
        ``hook(step, model, optimizer)`` after every optimizer step (EMA updates, masks).
    start_epoch, history
        Continue a run: epochs are numbered from ``start_epoch + 1`` and appended to
        ``history``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if scheduler_step not in SCHEDULER_STEPS:
        raise ValueError(f"unknown scheduler_step {scheduler_step!r}; valid choices: "
                         f"{', '.join(SCHEDULER_STEPS)}")
    history = History() if history is None else history
    generator = _default_generator() if generator is None else generator
    callbacks, on_step = list(callbacks or []), list(on_step or [])
    fresh = bool(getattr(optimizer, "fresh_batch_per_closure", False))
    n = n_batches(len(data.x_train), batch_size)
    step = history.records[-1]["step"] if history.records else 0
    show = (not quiet()) if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, leave=False)
    model.train()
    try:
        for e in range(start_epoch, start_epoch + epochs):
            it: Iterator = batches(data.x_train, data.y_train, batch_size, generator=generator)
            total, count, i = torch.zeros((), device=data.device), 0, 0
            while True:
                try:
                    xb, yb = next(it)
                except StopIteration:
                    break
                if scheduler is not None and scheduler_step == "fractional":
                    scheduler.step(e + i / n)
                current = [xb, yb]

                def closure():
                    if fresh and closure.calls > 0:
                        nxt = next(it, None)
                        if nxt is not None:
                            current[0], current[1] = nxt
                    closure.calls += 1
                    xin = current[0] if augment is None else augment(current[0], generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xin), current[1])
                    loss.backward()
                    return loss

                closure.calls = 0
                loss = optimizer.step(closure)
                if loss is None:
                    raise TypeError(f"{type(optimizer).__name__}.step(closure) returned None; "
                                    "the training loop needs the closure's loss")
                step += 1
                i += 1
                if not torch.isfinite(loss.detach()):
                    raise Diverged(_divergence_message(e + 1, step, loss, optimizer))
                total += loss.detach()
                count += 1
                for hook in on_step:
                    hook(step, model, optimizer)
                if scheduler is not None and scheduler_step == "batch":
                    scheduler.step()
            if scheduler is not None and scheduler_step == "epoch":
                scheduler.step()
            record = {"epoch": e + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": float(total) / max(count, 1)}
            last = e == start_epoch + epochs - 1
            if eval_every and ((e + 1 - start_epoch) % eval_every == 0 or last):
                ev = evaluate(model, data.x_test, data.y_test, loss_fn=loss_fn)
                record.update(test_loss=ev["loss"], test_acc=ev["acc"])
                model.train()
            for cb in callbacks:
                extra = cb(e + 1, model)
                model.train()
                if extra:
                    record.update(extra)
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise Diverged(_divergence_message(e + 1, step, float("nan"), optimizer,
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
    lr = optimizer.param_groups[0].get("lr")
    hyper = {k: v for k, v in optimizer.defaults.items()
             if isinstance(v, (int, float, bool, tuple)) and k not in ("foreach", "fused",
                                                                        "capturable",
                                                                        "differentiable",
                                                                        "maximize")}
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return (f"training diverged: non-finite {what} ({value}) at epoch {epoch}, step {step}; "
            f"{type(optimizer).__name__} with lr={lr}, hyperparameters {hyper}. "
            f"Try a smaller learning rate.")

