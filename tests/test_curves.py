"""Tests for landscape_lib.curves: Bezier/polychain curves between solutions.

References: exact endpoint weights and outputs; hand-computed Bernstein and hat coefficients;
the analytic optimum of the uniform-in-t objective on a quadratic bowl; BatchNorm statistics
recomputed independently with torch's ``swa_utils.update_bn`` at hand-built points of the curve.
"""
import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from landscape_lib import curves, data, models, params as P, train


def _mlp(seed, norm="none"):
    torch.manual_seed(seed)
    return models.MLP(6, hidden=(8, 8), n_classes=3, norm=norm)


def _pair(norm="none"):
    a, b = _mlp(0, norm), _mlp(1, norm)
    return a, b, P.weights(a), P.weights(b)


# --- geometry ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", curves.KINDS)
@pytest.mark.parametrize("n_bends", [0, 1, 2])
def test_endpoints_reproduce_the_end_models_exactly(kind, n_bends):
    ma, mb, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], kind=kind, n_bends=n_bends)
    x = torch.randn(5, 6)
    for t, w_end, m_end in ((0.0, wa, ma), (1.0, wb, mb)):
        w = curve.weights(t)
        assert list(w) == list(w_end)
        assert all(torch.equal(w[k], w_end[k]) for k in w)
        with torch.no_grad():
            assert torch.equal(curve.eval()(x, t), m_end.eval()(x))


def _random_bend(kind):
    """A one-bend curve between a pair of networks, its bend moved off the straight line."""
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], kind=kind, n_bends=1)
    with torch.no_grad():
        for p in curve.parameters():
            p.normal_()
    return curve, wa, wb, curve.bend_points()[0]


def test_bezier_matches_hand_computation_at_t_0_3():
    curve, wa, wb, theta = _random_bend("bezier")
    w = curve.weights(0.3)
    # (1−t)² = 0.49, 2t(1−t) = 0.42, t² = 0.09
    for k in w:
        assert torch.allclose(w[k], 0.49 * wa[k] + 0.42 * theta[k] + 0.09 * wb[k], atol=1e-6)
    # cubic (two bends): 0.343, 0.441, 0.189, 0.027
    assert np.allclose(curves.bezier_coefficients(0.3, 4), [0.343, 0.441, 0.189, 0.027])
    assert math.isclose(sum(curves.bezier_coefficients(0.77, 6)), 1.0)


def test_polychain_formula_and_continuity_at_one_half():
    curve, wa, wb, theta = _random_bend("polychain")
    mid = curve.weights(0.5)
    assert all(torch.equal(mid[k], theta[k]) for k in mid)
    left, right = curve.weights(0.5 - 1e-6), curve.weights(0.5 + 1e-6)
    assert all(torch.allclose(left[k], right[k], atol=1e-4) for k in mid)
    # φ(t) = 2(tθ + (½−t)ŵ₁) on [0, ½] and 2((t−½)ŵ₂ + (1−t)θ) on [½, 1]
    for t in (0.2, 0.8):
        w = curve.weights(t)
        for k in w:
            ref = (2 * (t * theta[k] + (0.5 - t) * wa[k]) if t <= 0.5
                   else 2 * ((t - 0.5) * wb[k] + (1 - t) * theta[k]))
            assert torch.allclose(w[k], ref, atol=1e-6)


@pytest.mark.parametrize("kind", curves.KINDS)
@pytest.mark.parametrize("n_bends", [1, 3])
def test_untrained_curve_is_the_straight_segment(kind, n_bends):
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], kind=kind, n_bends=n_bends)
    for t in (0.1, 0.37, 0.5, 0.9):
        w, ref = curve.weights(t), P.lerp(wa, wb, t)
        assert all(torch.allclose(w[k], ref[k], atol=1e-6) for k in w)


def test_more_than_two_endpoints_polychain_passes_through_all():
    ms = [_mlp(s) for s in range(3)]
    ws = [P.weights(m) for m in ms]
    curve = curves.Curve(ms[0], ws, kind="polychain", n_bends=1)
    assert curve.n_points == 5 and len(list(curve.parameters())) == 2 * len(ws[0])
    for t, w_ref in ((0.0, ws[0]), (0.5, ws[1]), (1.0, ws[2])):
        w = curve.weights(t)
        assert all(torch.equal(w[k], w_ref[k]) for k in w)


class _Tied(nn.Module):
    """A linear autoencoder whose decoder reuses the encoder's weight: one shared parameter."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3, bias=False)
        self.dec = nn.Linear(3, 3, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.enc(x))


def test_a_tied_weight_takes_the_point_of_the_curve_in_both_layers():
    torch.manual_seed(0)
    ma, mb = _Tied(), _Tied()
    wa, wb = P.weights(ma), P.weights(mb)
    assert list(wa) == ["enc.weight"]
    curve = curves.Curve(ma, [wa, wb], kind="polychain", n_bends=0).eval()
    x = torch.randn(4, 3)
    for t in (0.25, 1.0):
        w = (1 - t) * wa["enc.weight"] + t * wb["enc.weight"]
        with torch.no_grad():
            assert torch.allclose(curve(x, t), x @ w.T @ w.T, atol=1e-6)
            assert torch.allclose(curve.model_at(t)(x), x @ w.T @ w.T, atol=1e-6)


def _reversed(w):
    return OrderedDict(reversed(list(w.items())))


def test_endpoint_dicts_may_list_the_keys_in_any_order():
    ma, _, wa, wb = _pair()
    ordered = curves.Curve(ma, [wa, wb], n_bends=1)
    for ends in ([_reversed(wa), wb], [wa, _reversed(wb)], [_reversed(wa), _reversed(wb)]):
        curve = curves.Curve(ma, ends, n_bends=1)
        assert curve.names == list(wa)
        for t, w_ref in ((0.0, wa), (1.0, wb)):
            assert all(torch.equal(curve.weights(t)[k], w_ref[k]) for k in wa)
        w, w_ordered = curve.weights(0.3), ordered.weights(0.3)
        assert list(w) == list(w_ordered) and all(torch.equal(w[k], w_ordered[k]) for k in w)
    bad = _reversed(wb)
    bad["fc1.weight"] = torch.zeros(8, 5)
    with pytest.raises(ValueError, match=r"shape mismatch for fc1.weight: \(8, 5\) vs \(8, 6\)"):
        curves.Curve(ma, [_reversed(wa), bad])


def test_plane_contains_a_one_bend_curve():
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], kind="bezier")
    with torch.no_grad():
        for p in curve.parameters():
            p.add_(torch.randn_like(p))
    pl = curves.plane(curve)
    ts = np.linspace(0, 1, 7)
    xy = curves.project(curve, pl, ts)
    assert np.allclose(xy[0], [0, 0], atol=1e-4)
    assert np.allclose(xy[-1], [P.norm(P.sub(wb, wa)), 0], atol=1e-4)
    for t, (x, y) in zip(ts, xy):
        rebuilt = P.combine(pl.origin, [pl.u, pl.v], [x, y])
        w = curve.weights(float(t))
        assert all(torch.allclose(rebuilt[k], w[k], atol=1e-4) for k in w)
    with pytest.raises(ValueError, match="no plane"):
        curves.plane(curves.Curve(ma, [wa, wb], n_bends=0))


def test_arc_average_against_hand_computation():
    # segments of length 1 and 3 with trapezoid values ½(0+1) and ½(1+0): (0.5·1 + 0.5·3)/4
    assert math.isclose(curves.arc_average([0.0, 1.0, 0.0], [0.0, 1.0, 3.0]), 0.5)
    assert math.isclose(curves.arc_average([1.0, 3.0], [0.0, 2.0]), 2.0)
    with pytest.raises(ValueError):
        curves.arc_average([1.0], [0.0])


# --- training ------------------------------------------------------------------------------

def test_gradients_reach_only_the_bends():
    ma, _, wa, wb = _pair(norm="batch")
    curve = curves.Curve(ma, [wa, wb], kind="bezier", n_bends=2)
    assert len(list(curve.parameters())) == 2 * len(wa)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    curve.train()
    loss = curves.curve_loss(curve, 1e-3)(curve(x, 0.4), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in curve.parameters())
    assert all(not b.requires_grad for b in curve.buffers())
    assert all(p.grad is None for p in curve.template.parameters())
    assert all(p.grad is None for p in ma.parameters())


def test_penalty_is_on_the_point_of_the_curve():
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], kind="bezier")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    out = curve.train()(x, 0.3)
    w = curve.weights(0.3)
    ref = F.cross_entropy(out, y) + 0.5 * 0.01 * sum((v ** 2).sum() for v in w.values())
    assert torch.allclose(curves.curve_loss(curve, 0.01)(out, y), ref)


def _bowl(d=4, n=64, seed=0):
    """Least squares with an orthonormal design: MSE(w) = ‖w − w*‖² exactly."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * math.sqrt(n)  # xᵀx / n = I
    w_star = torch.randn(1, d, generator=g)
    y = x @ w_star.T
    return data.Dataset("bowl", x, y, x, y, 1), w_star


def _objective(curve, w_star, w, n=400):
    """E_t ‖φ(t) − w*‖² on a midpoint grid, for the bend ``w``."""
    ts = (np.arange(n) + 0.5) / n
    ends = curve.endpoints()
    pts = [ends[0]["weight"], w, ends[1]["weight"]]
    return float(np.mean([(sum(c * p for c, p in zip(curve.coefficients(t), pts)) - w_star)
                          .pow(2).sum() for t in ts]))


@pytest.mark.parametrize("kind, factor", [("bezier", 0.75), ("polychain", 0.25)])
def test_trained_curve_reaches_the_analytic_optimum_on_a_quadratic_bowl(kind, factor):
    # For L(w) = ‖w − w*‖² and endpoints w* + δ₁, w* + δ₂, the bend minimising E_t L(φ(t)) is
    # θ* = w* − ¾(δ₁ + δ₂) for the quadratic Bezier (E[t(1−t)³] = 1/20, E[t²(1−t)²] = 1/30)
    # and w* − ¼(δ₁ + δ₂) for the one-bend polychain.
    torch.manual_seed(0)
    ds, w_star = _bowl()
    d1, d2 = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])
    curve = curves.Curve(nn.Linear(4, 1, bias=False),
                         [{"weight": w_star + d1}, {"weight": w_star + d2}], kind=kind)
    target = w_star - factor * (d1 + d2)
    init = curve.bend_points()[0]["weight"]
    hist = curves.fit(curve, ds, epochs=1000, lr=0.1, weight_decay=0.0, final_lr_ratio=1e-3,
                      batch_size=len(ds.x_train), loss_fn=F.mse_loss, progress=False)
    theta = curve.bend_points()[0]["weight"]
    # one t per step is noisy SGD: the bend ends within 15 % of its starting distance ...
    assert (theta - target).norm() < 0.15 * (init - target).norm()
    # ... and the objective within 3 % of the initial gap to the analytic minimum
    best = _objective(curve, w_star, target)
    assert _objective(curve, w_star, theta) - best < 0.03 * (_objective(curve, w_star, init) - best)
    assert hist["lr"][-1] == pytest.approx(1e-4)


def test_a_curve_between_two_copies_of_the_minimum_stays_there():
    ds, w_star = _bowl()
    curve = curves.Curve(nn.Linear(4, 1, bias=False), [{"weight": w_star}, {"weight": w_star}])
    curves.fit(curve, ds, epochs=20, lr=0.1, weight_decay=0.0, batch_size=16,
               loss_fn=F.mse_loss, progress=False)
    assert torch.allclose(curve.bend_points()[0]["weight"], w_star, atol=1e-5)


def test_divergence_is_detected():
    ds, w_star = _bowl()
    curve = curves.Curve(nn.Linear(4, 1, bias=False),
                         [{"weight": w_star + 1}, {"weight": w_star - 1}])
    with pytest.raises(train.Diverged):
        curves.fit(curve, ds, epochs=50, lr=1e4, weight_decay=0.0, loss_fn=F.mse_loss,
                   progress=False)


def _fit_and_compare(model_a, model_b, ds, ts, epochs, lr):
    wa, wb = P.weights(model_a), P.weights(model_b)
    curve = curves.Curve(model_a, [wa, wb], kind="bezier")
    before = curves.evaluate(curve, ts, ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    curves.fit(curve, ds, epochs=epochs, lr=lr, weight_decay=5e-4, batch_size=32,
               progress=False)
    after = curves.evaluate(curve, ts, ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    return curve, before, after


def test_trains_a_bezier_curve_for_an_mlp():
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = data.Dataset("toy", x, y, x[:32], y[:32], 3)
    ma, mb = _mlp(0, "batch"), _mlp(1, "batch")
    curve, before, after = _fit_and_compare(ma, mb, ds, np.linspace(0, 1, 5), epochs=15, lr=0.1)
    assert after.train_nll[1:-1].mean() < 0.8 * before.train_nll[1:-1].mean()
    # endpoints are frozen: the values at t = 0, 1 do not change
    assert np.allclose(after.train_nll[[0, -1]], before.train_nll[[0, -1]])


def _hand_bezier(wa, bend, wb, t):
    """(1−t)² ŵ₁ + 2t(1−t) θ + t² ŵ₂, written out."""
    return {k: (1 - t) ** 2 * wa[k] + 2 * t * (1 - t) * bend[k] + t ** 2 * wb[k] for k in wa}


def test_trains_a_bezier_curve_for_a_cifar_resnet_with_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(48, 3, 32, 32)
    y = torch.randint(0, 10, (48,))
    ds = data.Dataset("random-images", x, y, x[:16], y[:16], 10)
    ra, rb = models.ResNet(depth=8, width=1), models.ResNet(depth=8, width=1)
    ts = np.array([0.0, 0.5, 1.0])
    curve, before, after = _fit_and_compare(ra, rb, ds, ts, epochs=4, lr=0.1)
    assert after.train_nll[1] < before.train_nll[1]
    # BN recomputed per t: at every t the evaluator agrees with a copy of the network at the
    # hand-built point φ(t) whose statistics torch's update_bn re-estimated on the same inputs
    wa, wb, bend = P.weights(ra), P.weights(rb), curve.bend_points()[0]
    for i, t in enumerate(ts):
        ref = copy.deepcopy(ra)
        ref.load_state_dict(_hand_bezier(wa, bend, wb, float(t)), strict=False)
        update_bn([(ds.x_train,)], ref)
        ref.eval()
        with torch.no_grad():
            out = ref(ds.x_train)
        assert after.train_nll[i] == pytest.approx(F.cross_entropy(out, ds.y_train).item(), rel=1e-4)
        assert after.train_acc[i] == pytest.approx((out.argmax(1) == ds.y_train).float().mean().item())


def test_evaluate_measures_length_and_norms():
    """A bent one-bend Bezier curve evaluated at unequally spaced t: segment lengths, squared
    norms and losses against hand-built points φ(t); summary and the training loss on a
    hand-worked example where the uniform and the arc-length averages differ."""
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], n_bends=1)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in curve.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    bend = curve.bend_points()[0]
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    ts = [0.0, 0.25, 0.5, 1.0]
    st = curves.evaluate(curve, ts, x, y, x, y)
    pts = [torch.cat([v.reshape(-1) for v in _hand_bezier(wa, bend, wb, t).values()]).double() for t in ts]
    dl = [0.0] + [float((pts[i] - pts[i - 1]).norm()) for i in range(1, 4)]
    np.testing.assert_allclose(st.dl, dl, rtol=1e-5)
    assert st.length == pytest.approx(sum(dl), rel=1e-5)
    assert st.length > float((pts[-1] - pts[0]).norm()) * 1.01  # bent: longer than the chord
    np.testing.assert_allclose(st.sq_norm, [float(p @ p) for p in pts], rtol=1e-5)
    for i, t in enumerate(ts):
        m = copy.deepcopy(ma)
        m.load_state_dict(_hand_bezier(wa, bend, wb, t), strict=False)
        with torch.no_grad():
            out = m.eval()(x)
        assert st.train_nll[i] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
        assert st.test_err[i] == pytest.approx(1 - (out.argmax(1) == y).float().mean().item())
    np.testing.assert_allclose(st.train_loss(0.1), st.train_nll + 0.05 * np.array([float(p @ p) for p in pts]),
                               rtol=1e-5)
    # summary on hand numbers: values 1, 4, 2 with segment lengths 1 and 3:
    # int = (½(1+4)·1 + ½(4+2)·3)/4 = 11.5/4, avg = 7/3 (the median would be 2)
    hand = curves.CurveStats(ts=np.array([0.0, 0.5, 1.0]), dl=np.array([0.0, 1.0, 3.0]),
                             sq_norm=np.array([4.0, 1.0, 9.0]), train_nll=np.array([1.0, 4.0, 2.0]),
                             train_acc=np.array([0.5, 0.25, 1.0]), test_nll=np.zeros(3),
                             test_acc=np.array([0.9, 0.6, 0.8]))
    assert hand.summary(hand.train_nll) == pytest.approx(
        {"start": 1.0, "end": 2.0, "min": 1.0, "max": 4.0, "avg": 7 / 3, "int": 2.875})
    assert hand.summary(hand.test_err)["int"] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 0.6 * 3) / 4)
    assert hand.length == 4.0
    np.testing.assert_allclose(hand.train_loss(0.2), [1.4, 4.1, 2.9])
    np.testing.assert_allclose(hand.train_err, [0.5, 0.75, 0.0])


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_is_rejected_with_the_valid_choices():
    ma, _, wa, wb = _pair()
    with pytest.raises(ValueError, match="bezier, polychain"):
        curves.Curve(ma, [wa, wb], kind="spline")
    with pytest.raises(ValueError, match="n_bends"):
        curves.Curve(ma, [wa, wb], n_bends=-1)
    with pytest.raises(ValueError, match="two endpoints"):
        curves.Curve(ma, [wa])
    with pytest.raises(ValueError, match="keys"):
        curves.Curve(ma, [wa, {k: v for k, v in list(wb.items())[1:]}])
    curve = curves.Curve(ma, [wa, wb])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curve.weights(1.5)
    with pytest.raises(ValueError, match="explicit t"):
        curve.eval()(torch.randn(2, 6))
    ds = data.Dataset("toy", torch.randn(8, 6), torch.zeros(8, dtype=torch.long),
                      torch.randn(8, 6), torch.zeros(8, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="no bends"):
        curves.fit(curves.Curve(ma, [wa, wb], n_bends=0), ds, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        curves.fit(curve, ds, epochs=1, lr=0.0)
