"""Constraint manifolds for weight-constrained training: circle, sphere and Stiefel.

Leimkuhler, Pouchon, Vlaar, Storkey, "Constraint-based regularization of neural networks"
(NeurIPS 2020 OPT workshop, arXiv 2006.10114) and "Better training using weight-constrained
stochastic dynamics" (ICML 2021); official code ``TiffanyVlaar/ConstrainedNNtraining``.

A constraint keeps a parameter tensor on a manifold ``M = {q : g(q) = 0}`` for the whole of
training. Each manifold here works on the parameter's *constrained coordinates* ``q`` and offers

* ``init_project(p) -> q`` — put a parameter on the manifold (its initial projection);
* ``tangent(q, v)`` — the orthogonal projection of ``v`` onto the tangent space at ``q``,
  ``Π_q(v) = v − ∇g (∇gᵀ∇g)^{-1} ∇gᵀ v`` (the momentum projection, RATTLE's second half);
* ``solve_position(q, q_trial)`` — SHAKE: the point ``q_trial + ∇g(q) λ`` on ``M`` (a correction
  along the normal space at the *old* point ``q``), solved by iteration to ``tol``;
* ``residual(q)`` — how far ``q`` is off the manifold;
* ``coords(p, state)`` / ``write(p, q, state)`` — between the parameter and ``q``.

The three constraints:

* :class:`Circle` ``(r)`` — *magnitude control*. Every weight ``w`` gets an auxiliary
  coordinate ``ξ`` with ``w² + ξ² = r²``, so ``|w| ≤ r`` holds smoothly, with no clipping. ``q``
  stacks ``(w, ξ)`` (shape ``(2, *p.shape)``), ``ξ`` lives in the optimizer state; the loss does
  not depend on ``ξ``, so the force on ``q`` is ``(g, 0)``, and its tangent projection is the
  official code's ``p_w −= h g (1 − w²/r²)``, ``p_ξ += h g wξ/r²``. Initial projection: clamp
  ``|w| ≤ r`` (the official code takes ``√|r² − w²|``, which silently leaves the circle when
  ``|w| > r``) and ``ξ = +√(r² − w²)``.
* :class:`Sphere` ``(r)`` — every row of the (reshaped) weight, i.e. the incoming weights of
  one output unit, has norm ``r``; a 1-D tensor is one vector.
* :class:`Stiefel` — orthonormality ``WᵀW = I`` of a tall matrix (rows ≥ columns); a wide
  matrix keeps orthonormal rows (``WWᵀ = I``, handled through ``Wᵀ``); a convolution kernel
  ``(out, in, k…)`` is reshaped to ``(out, in·k…)`` first. Normal space at ``W``: ``{W S : S
  symmetric}``; ``Π_W(V) = V − W sym(WᵀV)``; SHAKE iterates ``W̃ ← W̃ − ½ W (W̃ᵀW̃ − I)`` (the
  official code's fixed point, here until ``‖W̃ᵀW̃ − I‖_F < tol`` instead of 10 times).
  Initial projection: QR with ``diag(R) > 0`` (the official code's, without its wide-matrix bug)
  or the polar factor ``UVᵀ`` (the nearest orthonormal matrix).

The optimizer that moves along these manifolds is
:class:`landscape_lib.optim.constrained.ConstrainedLangevin` (c-CoLA, o-CoLA, C-SGD, C-SGLD).
"""
from __future__ import annotations

import math

import torch

CONSTRAINTS = ("circle", "sphere", "stiefel")


class NotConverged(FloatingPointError):
    """SHAKE's position solve did not reach its tolerance (usually: the step is too large)."""


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 1e-12 if dtype == torch.float64 else 1e-3


def _check_float(p: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(p):
        raise ValueError(f"the {name} constraint needs a floating-point tensor, got {p.dtype}")


class Manifold:
    """Base class: a constraint ``g(q) = 0`` on a parameter's coordinates ``q`` (see module)."""

    name = "manifold"

    def __init__(self, tol: float | None = None, max_iter: int = 100):
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        self.tol, self.max_iter = tol, max_iter

    def tolerance(self, q: torch.Tensor) -> float:
        return self.tol if self.tol is not None else _default_tol(q.dtype)

    # --- to implement -----------------------------------------------------------------------
    def check(self, p: torch.Tensor) -> None:
        """Raise ``ValueError`` if the constraint cannot apply to a tensor of ``p``'s shape."""

    def init_project(self, p: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def coords(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def write(self, p: torch.Tensor, q: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def lift(self, g: torch.Tensor) -> torch.Tensor:
        """A gradient with respect to the parameter, as a vector in ``q``'s space."""
        raise NotImplementedError

    def tangent(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def constraint(self, q: torch.Tensor) -> torch.Tensor:
        """``g(q)``, zero on the manifold (used by :meth:`residual` and the dense tests)."""
        raise NotImplementedError

    def residual(self, q: torch.Tensor) -> float:
        raise NotImplementedError

    def _shake_update(self, q: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- SHAKE ------------------------------------------------------------------------------
    def solve_position(self, q: torch.Tensor, q_trial: torch.Tensor) -> tuple[torch.Tensor, int]:
        """SHAKE: ``q_trial`` corrected along the normal space at ``q`` until it lies on the
        manifold (``residual < tol``). Returns the new point and the number of iterations;
        raises :class:`NotConverged` after ``max_iter`` iterations."""
        tol = self.tolerance(q)
        qt = q_trial.clone()
        res = self.residual(qt)
        for it in range(self.max_iter + 1):
            if res < tol:
                return qt, it
            if it == self.max_iter or not math.isfinite(res):
                break
            qt = self._shake_update(q, qt)
            res = self.residual(qt)
        raise NotConverged(f"SHAKE on the {self.name} constraint did not converge: residual "
                           f"{res:.3g} after {self.max_iter} iterations (tol {tol:g}); "
                           "the step is too large for the constraint (reduce lr)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Circle(Manifold):
    """``w² + ξ² = r²`` for every weight ``w`` with its auxiliary ``ξ`` (c-CoLA)."""

    name = "circle"

    def __init__(self, r: float, tol: float | None = None, max_iter: int = 100):
        super().__init__(tol, max_iter)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r):
            raise ValueError(f"the circle radius r must be a positive number, got {r!r}")
        self.r = float(r)

    def check(self, p):
        _check_float(p, self.name)

    def init_project(self, p, state=None):
        self.check(p)
        w = p.detach().clamp(-self.r, self.r)
        xi = (self.r ** 2 - w * w).clamp_min(0).sqrt()
        if state is not None:
            state["xi"] = xi
        return torch.stack([w, xi])

    def coords(self, p, state):
        return torch.stack([p.detach(), state["xi"]])

    def write(self, p, q, state):
        p.copy_(q[0])
        state["xi"] = q[1].clone()

    def lift(self, g):
        return torch.stack([g, torch.zeros_like(g)])

    def tangent(self, q, v):
        # λ = (w v_w + ξ v_ξ)/r² per weight; v − λ q
        lam = (q * v).sum(0, keepdim=True) / self.r ** 2
        return v - lam * q

    def constraint(self, q):
        return (q * q).sum(0) - self.r ** 2

    def residual(self, q):
        return float(self.constraint(q).abs().max()) / self.r ** 2

    def _shake_update(self, q, qt):
        # Newton on λ in |q̃ − λ q|² = r² (elementwise): φ(λ)= |q̃−λq|² − r², φ'(0) = −2 q̃·q
        phi = (qt * qt).sum(0, keepdim=True) - self.r ** 2
        dphi = 2 * (qt * q).sum(0, keepdim=True)
        return qt - (phi / dphi) * q

    def geodesic(self, q, v, t: float):
        """Exact flow along the circle from ``q`` with tangent velocity ``v`` for time ``t``
        (the official code's A step): rotation by ``ωt`` with ``ω = (ξ v_w − w v_ξ)/r²``.
        Returns the new point and velocity."""
        w, xi = q[0], q[1]
        omega = (xi * v[0] - w * v[1]) / self.r ** 2
        c, s = torch.cos(omega * t), torch.sin(omega * t)
        w2, xi2 = w * c + xi * s, xi * c - w * s
        return torch.stack([w2, xi2]), torch.stack([omega * xi2, -omega * w2])

    def __repr__(self):
        return f"Circle(r={self.r:g})"


def _rows(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(1, -1) if p.dim() == 1 else p.reshape(p.shape[0], -1)


class Sphere(Manifold):
    """Every row of the weight (reshaped to ``(out, -1)``; a vector as one row) has norm ``r``."""

    name = "sphere"

    def __init__(self, r: float = 1.0, tol: float | None = None, max_iter: int = 100):
        super().__init__(tol, max_iter)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r):
            raise ValueError(f"the sphere radius r must be a positive number, got {r!r}")
        self.r = float(r)

    def check(self, p):
        _check_float(p, self.name)
        if p.dim() < 1 or p.numel() < 2:
            raise ValueError(f"the sphere constraint needs a vector or matrix with at least 2 "
                             f"entries, got shape {tuple(p.shape)}; valid: 1-D vector (one "
                             "sphere), 2-D matrix or conv kernel (one sphere per output row)")

    def init_project(self, p, state=None):
        self.check(p)
        q = _rows(p.detach()).clone()
        n = q.norm(dim=1, keepdim=True)
        if bool((n == 0).any()):
            raise ValueError("the sphere constraint cannot project a zero row onto the sphere")
        return q * (self.r / n)

    def coords(self, p, state):
        return _rows(p.detach())

    def write(self, p, q, state):
        p.copy_(q.reshape(p.shape))

    def lift(self, g):
        return _rows(g)

    def tangent(self, q, v):
        return v - ((q * v).sum(1, keepdim=True) / self.r ** 2) * q

    def constraint(self, q):
        return (q * q).sum(1) - self.r ** 2

    def residual(self, q):
        return float(self.constraint(q).abs().max()) / self.r ** 2

    def _shake_update(self, q, qt):
        phi = (qt * qt).sum(1, keepdim=True) - self.r ** 2
        dphi = 2 * (qt * q).sum(1, keepdim=True)
        return qt - (phi / dphi) * q

    def __repr__(self):
        return f"Sphere(r={self.r:g})"


STIEFEL_INITS = ("qr", "polar")


class Stiefel(Manifold):
    """Orthonormal columns ``WᵀW = I`` (tall), rows (wide, via ``Wᵀ``); conv kernels reshaped
    to ``(out, in·k…)`` (o-CoLA). ``init`` is ``"qr"`` (``diag R > 0``) or ``"polar"``."""

    name = "stiefel"

    def __init__(self, init: str = "qr", tol: float | None = None, max_iter: int = 100):
        super().__init__(tol, max_iter)
        if init not in STIEFEL_INITS:
            raise ValueError(f"unknown Stiefel init {init!r}; valid choices: {', '.join(STIEFEL_INITS)}")
        self.init = init

    def tolerance(self, q):
        # ‖WᵀW − I‖_F of an exactly orthonormalised k-column matrix is ≈ 0.1–0.8·eps·k in
        # floating point, so the default tolerance grows with k (1.5e-5 for k = 128 in fp32)
        if self.tol is not None:
            return self.tol
        return max(_default_tol(q.dtype), torch.finfo(q.dtype).eps * q.shape[1])

    def check(self, p):
        _check_float(p, self.name)
        if p.dim() < 2:
            raise ValueError(f"the stiefel constraint needs a matrix or a conv kernel (2-D or "
                             f"more), got shape {tuple(p.shape)}; use 'sphere' or 'circle' for "
                             "vectors such as biases, or leave them unconstrained")

    @staticmethod
    def _matrix(p: torch.Tensor) -> torch.Tensor:
        m = p.reshape(p.shape[0], -1)
        return m if m.shape[0] >= m.shape[1] else m.T

    def init_project(self, p, state=None):
        self.check(p)
        m = self._matrix(p.detach()).clone()
        if self.init == "qr":
            qm, r = torch.linalg.qr(m)
            sign = torch.sign(torch.diagonal(r))
            sign[sign == 0] = 1
            return qm * sign
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        return u @ vh

    def coords(self, p, state):
        return self._matrix(p.detach())

    def write(self, p, q, state):
        m = p.reshape(p.shape[0], -1)
        p.copy_((q if m.shape[0] >= m.shape[1] else q.T).reshape(p.shape))

    def lift(self, g):
        return self._matrix(g)

    def tangent(self, q, v):
        s = q.T @ v
        return v - q @ ((s + s.T) / 2)

    def constraint(self, q):
        return q.T @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device)

    def residual(self, q):
        return float(torch.linalg.matrix_norm(self.constraint(q)))

    def _shake_update(self, q, qt):
        return qt - 0.5 * q @ self.constraint(qt)

    def __repr__(self):
        return f"Stiefel(init={self.init!r})"


def make(constraint, **kwargs) -> Manifold | None:
    """A manifold from a name (``"circle"``, ``"sphere"``, ``"stiefel"``; ``None``/``"none"``:
    unconstrained) with its keyword arguments (``r=``), or a :class:`Manifold` as it is."""
    if constraint is None or isinstance(constraint, Manifold):
        if kwargs and constraint is not None:
            raise ValueError("pass keyword arguments only with a constraint name")
        return constraint
    if constraint == "none":
        return None
    table = {"circle": Circle, "sphere": Sphere, "stiefel": Stiefel}
    if constraint not in table:
        raise ValueError(f"unknown constraint {constraint!r}; valid choices: none, "
                         f"{', '.join(CONSTRAINTS)} (or a landscape_lib.manifolds.Manifold)")
    return table[constraint](**kwargs)


def radius_by_fan_in(p: torch.Tensor, kappa: float) -> float:
    """``κ/√fan_in`` for a weight (fan_in = entries per output row): the card's per-layer radius."""
    if not kappa > 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    fan_in = p[0].numel() if p.dim() > 1 else p.numel()
    return float(kappa) / math.sqrt(fan_in)
