"""Predictive metrics and ensembles: accuracy, NLL, ECE, Brier, reliability, disagreement,
temperature scaling, and averaging the predictions of several models.

Every metric takes class probabilities ``probs [N, K]`` (rows sum to one) and labels ``y [N]``:

* accuracy — ``mean 1[argmax p = y]``;
* NLL — ``−mean log p_y`` (probabilities clamped at 1e-12);
* Brier score — ``mean Σ_k (p_k − 1[y = k])²`` (the multi-class form, in [0, 2]);
* ECE (Guo et al. 2017; Naeini et al. 2015) — split the confidences ``max_k p_k`` into
  ``n_bins`` equal-width bins ``B_m`` on [0, 1] and take
  ``Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|`` (15 bins by default, as in the SWAG and FGE code);
  :func:`reliability` returns the per-bin data for a reliability diagram;
* disagreement — the fraction of inputs on which two members' top classes differ;
* KL diversity — the mean over inputs of ``KL(p_a ‖ p_b) = Σ_k p_a,k log(p_a,k / p_b,k)``
  between two members' predictions, averaged over ordered pairs for an ensemble (the
  diversity measure of FreeTickets, Liu et al. 2022, and FiLM-Ensemble, Turkoglu et al. 2022).

An ensemble's prediction is the **mean of its members' probabilities** (not of their logits),
as in the FGE, SWAG and deep-ensembles code: :func:`average` and :class:`ProbabilityAverager`.

Members come from training runs: :class:`Members` collects them from one ``train.fit`` run —
at given epochs (a ``callbacks`` entry: snapshot ensembles at SGDR's restarts, Huang et al.
2017), or at given steps (an ``on_step`` hook: FGE's snapshot at the middle of every triangular
cycle, Garipov et al. 2018, :meth:`Members.fge`) — keeping each member's test probabilities and,
if asked, its weights.

Temperature scaling (Guo et al. 2017) fits one scalar ``T > 0`` minimising the NLL of
``softmax(logits / T)`` on held-out data (:func:`fit_temperature`, L-BFGS on ``log T``).

Which library does what: the metrics run on torch tensors where the predictions are (on a GPU
too), so they are written here in a few lines each. scikit-learn's ``log_loss`` and
``accuracy_score`` compute the same NLL and accuracy on NumPy arrays and serve as the tests'
reference; its ``brier_score_loss`` and ``calibration_curve`` are binary-only, so the
multi-class Brier score and the ECE are checked against hand-computed cases (torchmetrics'
``MulticlassCalibrationError`` would be the same ECE, but not worth a dependency for it).
Temperature scaling uses ``torch.optim.LBFGS``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn


def _check(probs: torch.Tensor, y: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [N, K], got shape {tuple(probs.shape)}")
    if y.shape != probs.shape[:1]:
        raise ValueError(f"labels must be [N] = [{probs.shape[0]}], got {tuple(y.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("no predictions to score")


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label."""
    _check(probs, y)
    return float((probs.argmax(1) == y).float().mean())


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels."""
    _check(probs, y)
    p = probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12)
    return float(-p.double().log().mean())


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score ``mean Σ_k (p_k − 1[y = k])²``."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).double().mean())


def reliability(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict:
    """Per-bin confidence, accuracy and count for equal-width confidence bins on [0, 1].

    Bins are ``(m/n, (m+1)/n]`` (the first also takes 0); empty bins have NaN accuracy and
    confidence.
    """
    _check(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    conf = conf.double()
    # bin m is (edges[m], edges[m+1]] with edges[m] = m/n exactly; searchsorted compares with
    # the edges themselves (ceil(conf·n) − 1 misfiles confidences on an edge, 7/25 for one,
    # where (7/25)·25 rounds above 7)
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=conf.device) / n_bins
    idx = (torch.searchsorted(edges, conf.contiguous(), right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)
    nan = torch.full_like(counts, float("nan"))
    return {"edges": edges.tolist(),
            "confidence": torch.where(counts > 0, sum_conf / counts.clamp_min(1), nan).tolist(),
            "accuracy": torch.where(counts > 0, sum_acc / counts.clamp_min(1), nan).tolist(),
            "count": counts.long().tolist()}


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins."""
    return ece_from_bins(reliability(probs, y, n_bins))


def ece_from_bins(r: dict) -> float:
    """``Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|`` from :func:`reliability`'s output (empty bins
    contribute nothing); what :func:`ece` returns, for a caller that holds the bins already."""
    n = sum(r["count"])
    if n == 0:
        raise ValueError("the reliability bins hold no points")
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"])
                     if c > 0))


def metrics(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score in one dict."""
    return {"acc": accuracy(probs, y), "nll": nll(probs, y), "ece": ece(probs, y, n_bins),
            "brier": brier(probs, y)}


def average(member_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble prediction: the mean of the members' probabilities."""
    if len(member_probs) == 0:
        raise ValueError("an ensemble needs at least one member")
    return torch.stack(list(member_probs)).mean(0)


def disagreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Fraction of inputs on which two models predict different classes."""
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"shapes differ: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    return float((probs_a.argmax(1) != probs_b.argmax(1)).float().mean())


def mean_disagreement(member_probs: Sequence[torch.Tensor]) -> float:
    """Mean pairwise disagreement over all pairs of members (0 for a single member)."""
    m = len(member_probs)
    if m < 2:
        return 0.0
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    return sum(disagreement(member_probs[i], member_probs[j]) for i, j in pairs) / len(pairs)


def kl_divergence(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Mean over inputs of ``KL(p_a ‖ p_b)`` (probabilities clamped at 1e-12)."""
    if probs_a.shape != probs_b.shape or probs_a.dim() != 2:
        raise ValueError(f"need two [N, K] tensors of one shape, got {tuple(probs_a.shape)} and "
                         f"{tuple(probs_b.shape)}")
    a, b = probs_a.double().clamp_min(1e-12), probs_b.double().clamp_min(1e-12)
    return float((probs_a.double() * (a.log() - b.log())).sum(1).mean())


def mean_kl_diversity(member_probs: Sequence[torch.Tensor]) -> float:
    """Mean ``KL(p_i ‖ p_j)`` over all ordered pairs ``i ≠ j`` of members (0 for one member)."""
    m = len(member_probs)
    if m < 2:
        return 0.0
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    return sum(kl_divergence(member_probs[i], member_probs[j]) for i, j in pairs) / len(pairs)


class ProbabilityAverager:
    """Running mean of members' probabilities (e.g. FGE snapshots, SWAG samples)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor) -> None:
        """Add one member's probabilities."""
        p = probs.detach().double()
        if self.total is not None and p.shape != self.total.shape:
            raise ValueError(f"member has shape {tuple(p.shape)}, ensemble {tuple(self.total.shape)}")
        self.total = p.clone() if self.total is None else self.total + p
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        """The ensemble's probabilities so far."""
        if self.total is None:
            raise ValueError("no member added yet")
        return (self.total / self.count).float()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017)."""
    _check(logits, y)
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


# --- collecting members from a training run --------------------------------------------------

class Members:
    """Ensemble members collected during one ``train.fit`` run.

    A member is taken at the end of every epoch in ``epochs`` (use :meth:`callback` in
    ``fit(callbacks=...)``), or after every optimizer step ``t`` with ``t`` in ``steps`` or
    ``t ≥ start`` and ``(t − start) % every == 0`` (use :meth:`hook` in ``fit(on_step=...)``).
    For each member it keeps the probabilities it predicts for ``x`` (eval mode; BatchNorm
    statistics as the model has them) and, with ``keep_weights=True``, a copy of its parameters
    and buffers (``params.state``). ``when`` lists the epochs or steps at which members were
    taken.
    """

    def __init__(self, x: torch.Tensor, *, epochs: Iterable[int] | None = None,
                 steps: Iterable[int] | None = None, every: int | None = None, start: int = 1,
                 keep_weights: bool = False, batch_size: int = 4096):
        given = [epochs is not None, steps is not None, every is not None]
        if sum(given) != 1:
            raise ValueError("say when to take members: exactly one of epochs=[...], steps=[...] "
                             "or every=N (steps, from start)")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ValueError(f"start must be a positive integer (1-based step), got {start!r}")
        self.x, self.batch_size, self.keep_weights = x, batch_size, bool(keep_weights)
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.steps = None if steps is None else {int(t) for t in steps}
        self.every, self.start = every, start
        self.probs: list[torch.Tensor] = []
        self.weights: list[dict] = []
        self.when: list[int] = []

    @classmethod
    def fge(cls, x: torch.Tensor, *, cycle: float, steps_per_epoch: int, start_epoch: float = 0,
            **kwargs) -> "Members":
        """FGE's members (Garipov et al. 2018): one at the middle of every cycle of
        ``cycle`` epochs of :func:`~landscape_lib.schedules.triangular_lr`, after the steps of
        the cycle's first half, when the rate has come down to its minimum α₂. Steps count from
        the start of the cycling run (``start_epoch`` shifts them when the run continues a
        history)."""
        period = cycle * steps_per_epoch
        if period != int(period) or period < 2:
            raise ValueError(f"a cycle must be a whole number (>= 2) of steps, got "
                             f"{cycle} epochs × {steps_per_epoch} steps")
        offset = round(start_epoch * steps_per_epoch)
        return cls(x, every=int(period), start=offset + int(period) // 2, **kwargs)

    def _take(self, model: nn.Module, t: int) -> None:
        from . import params as P
        from .train import predict_proba

        self.probs.append(predict_proba(model, self.x, self.batch_size))
        if self.keep_weights:
            self.weights.append(P.state(model))
        self.when.append(int(t))

    def callback(self) -> Callable:
        """A ``train.fit`` callback taking members at the end of the chosen epochs."""
        if self.epochs is None:
            raise ValueError("these members are taken at steps: use .hook() in fit(on_step=...)")

        def cb(epoch: int, model: nn.Module):
            if epoch in self.epochs:
                self._take(model, epoch)

        return cb

    def hook(self) -> Callable:
        """A ``train.fit`` ``on_step`` hook taking members after the chosen steps."""
        if self.epochs is not None:
            raise ValueError("these members are taken at epochs: use .callback() in fit(callbacks=...)")

        def hook(step: int, model: nn.Module, optimizer) -> None:
            due = (step in self.steps) if self.steps is not None else (
                step >= self.start and (step - self.start) % self.every == 0)
            if due:
                self._take(model, step)

        return hook

    def __len__(self) -> int:
        return len(self.probs)

    def mean(self) -> torch.Tensor:
        """The ensemble's prediction: the mean of the members' probabilities."""
        return average(self.probs)

    def running(self) -> list[torch.Tensor]:
        """The ensemble's prediction after 1, 2, …, M members."""
        avg, out = ProbabilityAverager(), []
        for p in self.probs:
            avg.add(p)
            out.append(avg.mean)
        return out
