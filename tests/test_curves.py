"""Tests for landscape_lib.curves: Bezier/polychain curves between solutions.

References: exact endpoint weights and outputs; hand-computed Bernstein and hat coefficients;
the analytic optimum of the uniform-in-t objective on a quadratic bowl; BatchNorm statistics
recomputed independently with torch's ``swa_utils.update_bn`` at hand-built points of the curve.
"""
import copy
import math
import re
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


def _msg(text):
    """The whole error message, literally (a prefix or suffix added to it does not match)."""
    return "^" + re.escape(text) + "$"


def test_coefficients_by_hand_at_the_ends_the_middle_and_the_knots():
    assert curves.bezier_coefficients(0.0, 3) == [1.0, 0.0, 0.0]
    assert curves.bezier_coefficients(1.0, 3) == [0.0, 0.0, 1.0]
    assert curves.bezier_coefficients(0.5, 3) == [0.25, 0.5, 0.25]
    assert curves.bezier_coefficients(0.5, 5) == [0.0625, 0.25, 0.375, 0.25, 0.0625]
    assert curves.bezier_coefficients(0.25, 2) == [0.75, 0.25]
    assert curves.polychain_coefficients(0.0, 3) == [1.0, 0.0, 0.0]
    assert curves.polychain_coefficients(0.5, 3) == [0.0, 1.0, 0.0]
    assert curves.polychain_coefficients(1.0, 3) == [0.0, 0.0, 1.0]
    assert curves.polychain_coefficients(0.25, 3) == [0.5, 0.5, 0.0]
    assert curves.polychain_coefficients(0.625, 5) == [0.0, 0.0, 0.5, 0.5, 0.0]  # n·t = 2.5
    assert curves.polychain_coefficients(0.75, 5) == [0.0, 0.0, 0.0, 1.0, 0.0]  # on a knot
    assert curves.polychain_coefficients(0.25, 2) == [0.75, 0.25]
    assert curves.coefficients("bezier", 0.25, 3) == [0.5625, 0.375, 0.0625]
    assert curves.coefficients("polychain", 0.25, 3) == [0.5, 0.5, 0.0]


def test_coefficients_reject_bad_input_with_the_limits():
    for f in (curves.bezier_coefficients, curves.polychain_coefficients):
        with pytest.raises(ValueError, match=_msg("a curve needs at least 2 control points, got 1")):
            f(0.5, 1)
        for t in (-0.5, 1.5):
            with pytest.raises(ValueError, match=_msg(f"t must lie in [0, 1], got {t}")):
                f(t, 3)
    with pytest.raises(ValueError, match=_msg("unknown curve kind 'spline'; valid kinds: bezier, polychain")):
        curves.coefficients("spline", 0.5, 3)


def _hand_curve(points, kind="bezier", n_bends=1):
    """A curve of ``nn.Linear(d, 1, bias=False)`` through the hand-picked weight rows ``points``."""
    return curves.Curve(nn.Linear(len(points[0]), 1, bias=False),
                        [{"weight": torch.tensor([p])} for p in points], kind=kind, n_bends=n_bends)


def _rows(dicts):
    return [d["weight"].squeeze(0).tolist() for d in dicts]


def test_control_points_of_three_endpoints_with_bends_on_each_segment():
    curve = _hand_curve([[0.0, 0.0], [3.0, 0.0], [3.0, 6.0]], kind="polychain", n_bends=2)
    assert curve.n_points == 7 and curve.n_endpoints == 3 and len(list(curve.parameters())) == 4
    approx = pytest.approx
    assert _rows(curve.control_points()) == [[0, 0], approx([1, 0]), approx([2, 0]), [3, 0],
                                             approx([3, 2]), approx([3, 4]), [3, 6]]
    assert _rows(curve.endpoints()) == [[0, 0], [3, 0], [3, 6]]
    assert _rows(curve.bend_points()) == [approx([1, 0]), approx([2, 0]), approx([3, 2]), approx([3, 4])]
    # knots at j/6: t = ¼ is halfway between P_1 and P_2, t = ¾ between P_4 and P_5
    for t, ref in ((0.25, [1.5, 0.0]), (0.5, [3.0, 0.0]), (0.75, [3.0, 3.0]), (1.0, [3.0, 6.0])):
        assert _rows([curve.weights(t)]) == [approx(ref)]
    # the points are copies: changing one changes nothing in the curve
    curve.control_points()[1]["weight"].zero_()
    assert _rows(curve.bend_points())[0] == approx([1, 0])
    # a Bezier curve through three fixed points and no bends: ¼ P_0 + ½ P_1 + ¼ P_2 at t = ½
    bezier = _hand_curve([[0.0, 0.0], [3.0, 0.0], [3.0, 6.0]], n_bends=0)
    assert bezier.n_points == 3 and bezier.n_endpoints == 3 and not list(bezier.parameters())
    assert _rows([bezier.weights(0.5)]) == [[2.25, 1.5]]


def test_the_curve_copies_the_endpoints_and_leaves_the_model_alone():
    ma, _, wa, wb = _pair()
    wa0 = copy.deepcopy(wa)
    curve = curves.Curve(ma, [wa, wb])
    for v in wa.values():
        v.add_(1.0)
    w = curve.weights(0.0)
    assert all(torch.equal(w[k], wa0[k]) for k in w)
    assert all(p.requires_grad for p in ma.parameters())
    assert not any(p.requires_grad for p in curve.template.parameters())


def test_frozen_parameters_are_not_on_the_curve_and_get_no_gradient():
    ma, mb = _mlp(0), _mlp(1)
    for m in (ma, mb):
        m.fc1.requires_grad_(False)
    curve = curves.Curve(ma, [P.weights(ma), P.weights(mb)])
    assert curve.names == ["fc2.weight", "fc2.bias", "out.weight", "out.bias"]
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(curve.train()(x, 0.5), y).backward()
    assert all(p.grad is not None for p in curve.parameters())
    assert all(p.grad is None for p in curve.template.parameters())
    # at t = 1: model b's trainable layers after model a's frozen first layer
    ref = copy.deepcopy(mb)
    ref.fc1.load_state_dict(ma.fc1.state_dict())
    with torch.no_grad():
        assert torch.equal(curve(x, 1.0), ref(x))


def test_random_t_is_drawn_from_the_curves_generator():
    torch.manual_seed(0)
    ma, _, wa, wb = _pair()
    curve = curves.Curve(ma, [wa, wb], generator=torch.Generator().manual_seed(3)).train()
    assert curve.last_t is None and curve.last_weights is None
    replay = torch.Generator().manual_seed(3)
    mid = {k: (wa[k] + wb[k]) / 2 for k in wa}
    x = torch.randn(2, 6)
    for _ in range(2):
        out = curve(x)
        t = float(torch.rand((), generator=replay))
        assert curve.last_t == t
        ref = copy.deepcopy(ma)
        ref.load_state_dict(_hand_bezier(wa, mid, wb, t))
        with torch.no_grad():
            assert torch.allclose(out, ref(x), atol=1e-6)


def _line_with_bias():
    """φ(t) of nn.Linear(2, 1) from w = (1, 2), b = 1 to w = (3, 4), b = 3; φ(½) = (2, 3), 2."""
    return curves.Curve(nn.Linear(2, 1), [{"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([1.0])},
                                          {"weight": torch.tensor([[3.0, 4.0]]), "bias": torch.tensor([3.0])}],
                        n_bends=0)


def test_penalty_and_curve_loss_by_hand():
    curve = _line_with_bias()
    with pytest.raises(RuntimeError, match=_msg("call the curve on a batch first: the penalty is taken at its t")):
        curve.penalty(0.1)
    x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([[4.0]])
    out = curve(x, 0.5)  # 2 + 3 + 2
    assert out.item() == 7.0 and curve.last_t == 0.5
    assert curve.penalty(0.1).item() == pytest.approx(0.85)  # ½·0.1·(4 + 9 + 4)
    assert curves.curve_loss(curve, 0.1, F.mse_loss)(out, y).item() == pytest.approx(9.85)  # (7 − 4)² + 0.85
    assert curves.curve_loss(curve, 0.0, F.mse_loss)(out, y).item() == 9.0
    # without weight decay the loss is loss_fn alone: no penalty, so no forward pass needed
    assert curves.curve_loss(_line_with_bias(), 0.0, F.mse_loss)(out, y).item() == 9.0
    # the default loss is the cross-entropy: two equal logits give log 2
    assert curves.curve_loss(curve, 0.0)(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=_msg("weight_decay must be >= 0, got -0.1")):
        curves.curve_loss(curve, -0.1)


def test_model_at_is_a_trainable_copy_at_the_point():
    curve = _line_with_bias()
    m = curve.model_at(0.5)
    assert m.weight.tolist() == [[2.0, 3.0]] and m.bias.tolist() == [2.0]
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        m.weight.zero_()
    assert curve.model_at(0.5).weight.tolist() == [[2.0, 3.0]]
    assert not any(p.requires_grad for p in curve.template.parameters())


def test_modes_and_dtype_reach_the_template():
    ma, _, wa, wb = _pair(norm="batch")
    curve = curves.Curve(ma, [wa, wb])
    ref = copy.deepcopy(ma)
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert curve.eval() is curve and not curve.training and not curve.template.training
        assert torch.allclose(curve(x, 0.0), ref.eval()(x), atol=1e-6)  # running statistics
        assert curve.train() is curve and curve.training and curve.template.training
        assert torch.allclose(curve(x, 0.0), ref.train()(x), atol=1e-6)  # batch statistics
    assert curve.double() is curve
    assert all(p.dtype == torch.float64 for p in [*curve.template.parameters(), *curve.parameters()])
    with torch.no_grad():
        assert curve.eval()(x.double(), 0.5).dtype == torch.float64


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


def test_plane_and_projection_of_a_hand_made_cubic():
    curve = _hand_curve([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], n_bends=2)
    with torch.no_grad():
        curve.bends[0][0].copy_(torch.tensor([[0.5, 1.0, 0.0]]))
        curve.bends[1][0].copy_(torch.tensor([[1.5, 0.0, 3.0]]))
    pl = curves.plane(curve)  # the middle one of two bends: the second
    assert _rows([pl.origin, pl.u, pl.v]) == [[0, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert _rows([curves.plane(curve, bend=1).v, curves.plane(curve, bend=0).v]) == [[0, 0, 1], [0, 1, 0]]
    for bad in (2, -1):
        with pytest.raises(ValueError, match=_msg(f"bend index {bad} out of range 0..1")):
            curves.plane(curve, bend=bad)
    # φ(½) = ⅛·0 + ⅜·(½, 1, 0) + ⅜·(1.5, 0, 3) + ⅛·(2, 0, 0) = (1, 0.375, 1.125)
    np.testing.assert_allclose(curves.project(curve, pl, [0.0, 0.5, 1.0]), [[0, 0], [1.0, 1.125], [2, 0]],
                               atol=1e-6)
    np.testing.assert_allclose(curves.project(curve, pl, 0.5), [[1.0, 1.125]], atol=1e-6)
    # three endpoints: u points from the first to the last, v to the default (second) bend
    chain = _hand_curve([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0]], kind="polychain")
    pl = curves.plane(chain)
    assert _rows([pl.origin, pl.u]) == [[0, 0, 0], [1, 0, 0]] and _rows([pl.v]) == [pytest.approx([0, 1, 0])]
    with pytest.raises(ValueError, match=_msg("a curve without bends (the straight line) spans no plane")):
        curves.plane(_hand_curve([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], n_bends=0))


def test_arc_average_against_hand_computation():
    # segments of length 1 and 3 with trapezoid values ½(0+1) and ½(1+0): (0.5·1 + 0.5·3)/4
    assert math.isclose(curves.arc_average([0.0, 1.0, 0.0], [0.0, 1.0, 3.0]), 0.5)
    assert math.isclose(curves.arc_average([1.0, 3.0], [0.0, 2.0]), 2.0)
    with pytest.raises(ValueError):
        curves.arc_average([1.0], [0.0])


def test_arc_average_ignores_dl0_and_works_in_float64():
    assert curves.arc_average([1.0, 3.0], [5.0, 2.0]) == 2.0  # dl[0] is no segment
    assert curves.arc_average([1.0, 3.0], [0.0, 0.5]) == 2.0  # a length below 1
    # float32 inputs: 2²⁴ + 1 exists in float64 only
    assert curves.arc_average(np.array([2.0 ** 24, 1.0], dtype=np.float32), [0.0, 1.0]) == 8388608.5
    assert curves.arc_average([1.0, 1.0, 1.0], np.array([0.0, 2.0 ** 24, 1.0], dtype=np.float32)) == 1.0
    st = curves.CurveStats(*(np.zeros(3),) * 7)
    st.dl = np.array([0.0, 1.0, 1.0])
    assert st.summary(np.array([2.0 ** 24, 1.0, 0.0], dtype=np.float32))["avg"] == (2.0 ** 24 + 1) / 3
    msg = _msg("arc_average needs matching values and lengths with at least 2 points")
    for v, d in (([1.0], [0.0]), ([1.0, 2.0, 3.0], [0.0, 1.0])):
        with pytest.raises(ValueError, match=msg):
            curves.arc_average(v, d)
    with pytest.raises(ValueError, match=_msg("the curve has zero length")):
        curves.arc_average([1.0, 2.0], [0.0, 0.0])


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


def test_fit_takes_hand_computed_sgd_steps():
    # two full-batch steps on MSE + ½·wd·‖φ(t)‖² (default wd 5e-4, momentum 0.9) of a one-bend
    # Bezier curve of a linear model: ∂/∂θ = 2t(1−t)·((2/N)·Σ_i r_i x_i + wd·φ(t)), r = φ(t)x − y
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    y = torch.tensor([[1.0], [2.0], [0.0], [1.0]])
    curve = curves.Curve(nn.Linear(2, 1, bias=False), [{"weight": a}, {"weight": b}],
                         generator=torch.Generator().manual_seed(1))
    hist = curves.fit(curve, data.Dataset("four", x, y, x, y, 1), epochs=2, lr=0.1, batch_size=4,
                      loss_fn=F.mse_loss, progress=False)
    replay = torch.Generator().manual_seed(1)
    a, b, x, y = a.double(), b.double(), x.double(), y.double()
    theta, buf = torch.tensor([[0.5, 0.5]], dtype=torch.float64), None
    for _ in range(2):
        t = float(torch.rand((), generator=replay))
        phi = (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t ** 2 * b
        r = x @ phi.T - y
        g = 2 * t * (1 - t) * (2 / 4 * (r * x).sum(0, keepdim=True) + 5e-4 * phi)
        buf = g if buf is None else 0.9 * buf + g
        theta = theta - 0.1 * buf
    assert torch.allclose(curve.bend_points()[0]["weight"].double(), theta, rtol=0, atol=1e-6)
    # lr for the first half (epoch 1 ends at t = ½), the default final_lr_ratio 0.01 at the end
    assert hist["lr"].tolist() == [0.1, pytest.approx(1e-3)]


def _tiny_regression(n):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return data.Dataset("tiny", x, x.sum(1, keepdim=True), x, x.sum(1, keepdim=True), 1)


def _tiny_curve():
    return _hand_curve([[1.0, 0.0], [0.0, 1.0]])


def test_fit_schedule_per_batch_default_batches_and_keywords(capsys):
    # 4 points in batches of 2: lr 0.1 to epoch 5, linear to 0.05 at epoch 9, then constant
    hist = curves.fit(_tiny_curve(), _tiny_regression(4), epochs=10, lr=0.1, batch_size=2,
                      final_lr_ratio=0.5, loss_fn=F.mse_loss, progress=False)
    assert hist["step"].tolist() == list(range(2, 21, 2))
    np.testing.assert_allclose(hist["lr"], [0.1] * 5 + [0.0875, 0.075, 0.0625, 0.05, 0.05], rtol=1e-12)
    # 129 points in the default batches of 128: two steps; one epoch ends at final_lr_ratio·lr;
    # the keywords reach train.fit (callbacks, the progress bar) and there is no test evaluation
    seen = []
    hist = curves.fit(_tiny_curve(), _tiny_regression(129), epochs=1, lr=0.1, loss_fn=F.mse_loss,
                      progress=True, callbacks=[lambda e, m: seen.append(e)])
    assert hist["step"].tolist() == [2] and seen == [1]
    assert hist["lr"].tolist() == [pytest.approx(1e-3)]
    assert "test_loss" not in hist.records[0]
    assert re.search(r"\rbezier curve: ", capsys.readouterr().err)
    hist = curves.fit(_tiny_curve(), _tiny_regression(4), epochs=1, lr=0.1, batch_size=2,
                      final_lr_ratio=1.0, loss_fn=F.mse_loss, progress=False)
    assert hist["lr"].tolist() == [0.1]


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


def test_evaluate_a_straight_line_by_hand():
    # logits (3t, 4t) at x = 1 and (−3t, −4t) at x = −1, label 1: cross-entropy log(1 + e^(∓t));
    # a tie at t = 0 goes to class 0
    curve = curves.Curve(nn.Linear(1, 2, bias=False), [{"weight": torch.zeros(2, 1)},
                                                      {"weight": torch.tensor([[3.0], [4.0]])}], n_bends=0)
    x_train, x_test, y = torch.ones(1, 1), -torch.ones(1, 1), torch.ones(1, dtype=torch.long)
    st = curves.evaluate(curve, [0, 0.5, 1], x_train, y, x_test, y)
    assert st.ts.dtype == np.float64 and st.ts.tolist() == [0.0, 0.5, 1.0]
    assert st.dl.tolist() == [0.0, 2.5, 2.5] and st.length == 5.0
    assert st.sq_norm.tolist() == [0.0, 6.25, 25.0]
    np.testing.assert_allclose(st.train_nll, [math.log(2), math.log1p(math.exp(-0.5)), math.log1p(math.exp(-1))],
                               rtol=1e-6)
    np.testing.assert_allclose(st.test_nll, [math.log(2), math.log1p(math.exp(0.5)), math.log1p(math.exp(1))],
                               rtol=1e-6)
    assert st.train_acc.tolist() == [0.0, 1.0, 1.0] and st.test_acc.tolist() == [0.0, 0.0, 0.0]
    st = curves.evaluate(curve, 0.5, x_train, y, x_test, y)
    assert st.ts.tolist() == [0.5] and st.dl.tolist() == [0.0]
    with pytest.raises(ValueError, match=_msg("no values of t to evaluate: pass at least one")):
        curves.evaluate(curve, [], x_train, y, x_test, y)
    with pytest.raises(ValueError, match=_msg("t must lie in [0, 1], got 2.0")):
        curves.evaluate(curve, [0.5, 2.0], x_train, y, x_test, y)


def _bn_reference(ma, wa, wb, t, batches):
    """The untrained curve's point φ(t) with statistics from torch's update_bn on ``batches``."""
    mid = {k: (wa[k] + wb[k]) / 2 for k in wa}
    ref = copy.deepcopy(ma)
    ref.load_state_dict(_hand_bezier(wa, mid, wb, t), strict=False)
    update_bn([(b,) for b in batches], ref)
    return ref.eval()


@pytest.mark.parametrize("n_bn, batch_size", [(10, 4), (4100, None)])
def test_evaluate_recomputes_batchnorm_on_bn_data_in_batches(n_bn, batch_size):
    # 4100 points in the default batches of 4096: [4096, 4]
    ma, _, wa, wb = _pair(norm="batch")
    curve = curves.Curve(ma, [wa, wb])
    g = torch.Generator().manual_seed(5)
    x, bn_data = torch.randn(6, 6, generator=g), 3 + torch.randn(n_bn, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    kw = {} if batch_size is None else {"batch_size": batch_size}
    st = curves.evaluate(curve, [0.5], x, y, x, y, bn_data=bn_data, **kw)
    ref = _bn_reference(ma, wa, wb, 0.5, bn_data.split(batch_size or 4096))
    with torch.no_grad():
        out = ref(x)
    assert st.train_nll[0] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)


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
    with pytest.raises(ValueError, match=_msg("unknown curve kind 'spline'; valid kinds: bezier, polychain")):
        curves.Curve(ma, [wa, wb], kind="spline")
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=_msg(f"n_bends must be a non-negative integer, got {bad!r}")):
            curves.Curve(ma, [wa, wb], n_bends=bad)
    with pytest.raises(ValueError, match=_msg("a curve needs at least two endpoints, got 1")):
        curves.Curve(ma, [wa])
    with pytest.raises(ValueError, match="keys"):
        curves.Curve(ma, [wa, {k: v for k, v in list(wb.items())[1:]}])
    # the first five missing or unknown names, sorted
    with pytest.raises(ValueError, match=_msg("endpoint keys do not match the model's parameters: missing "
                                              "['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight', 'out.bias'], "
                                              "unknown []")):
        curves.Curve(ma, [wa, {}])
    extra = dict(wb, **{f"extra{i}": torch.zeros(1) for i in range(6)})
    with pytest.raises(ValueError, match=_msg("endpoint keys do not match the model's parameters: missing [], "
                                              "unknown ['extra0', 'extra1', 'extra2', 'extra3', 'extra4']")):
        curves.Curve(ma, [wa, extra])
    curve = curves.Curve(ma, [wa, wb])
    with pytest.raises(ValueError, match=_msg("t must lie in [0, 1], got 1.5")):
        curve.weights(1.5)
    with pytest.raises(ValueError, match=_msg("a curve in eval mode needs an explicit t; random t is for training "
                                              "(use curves.evaluate to evaluate along the curve)")):
        curve.eval()(torch.randn(2, 6))
    ds = data.Dataset("toy", torch.randn(8, 6), torch.zeros(8, dtype=torch.long),
                      torch.randn(8, 6), torch.zeros(8, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=_msg("the curve has no bends to train (n_bends=0 is the straight line)")):
        curves.fit(curves.Curve(ma, [wa, wb], n_bends=0), ds, epochs=1, lr=0.1)
    for lr in (0.0, -0.1):
        with pytest.raises(ValueError, match=_msg(f"lr must be positive, got {lr}")):
            curves.fit(curve, ds, epochs=1, lr=lr)
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match=_msg(f"final_lr_ratio must lie in (0, 1], got {ratio}")):
            curves.fit(curve, ds, epochs=1, lr=0.1, final_lr_ratio=ratio)


def test_evaluate_integer_ts_as_floats_and_leaves_the_template_alone():
    # ts = [0, 1] (integers): the stats hold them as float64; evaluating loads each φ(t) into a
    # deep copy, so the curve's template keeps its own weights (here: all 7)
    template = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        template.weight.fill_(7.0)
    curve = curves.Curve(template, [{"weight": torch.zeros(2, 1)}, {"weight": torch.tensor([[3.0], [4.0]])}],
                         n_bends=0)
    before = {k: v.clone() for k, v in curve.template.state_dict().items()}
    x, y = torch.ones(1, 1), torch.ones(1, dtype=torch.long)
    st = curves.evaluate(curve, [0, 1], x, y, x, y)
    assert st.ts.dtype == np.float64 and st.ts.tolist() == [0.0, 1.0]
    assert st.sq_norm.tolist() == [0.0, 25.0]
    for k, v in curve.template.state_dict().items():
        assert torch.equal(v, before[k])
