import pytest
import torch

from landscape_lib import directions, models, params


@pytest.fixture
def weights():
    torch.manual_seed(0)
    net = models.build("resnet", input_shape=(3, 8, 8), n_classes=4, depth=8)
    return params.weights(net)


def test_filter_normalised_directions_have_the_filter_norms_of_the_weights(weights):
    d = directions.random(weights, norm="filter", generator=torch.Generator().manual_seed(1))
    for k, w in weights.items():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[k]) == 0, k  # biases / BN: ignored
            continue
        dn = d[k].reshape(w.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        assert torch.allclose(dn, wn, rtol=1e-5, atol=1e-7), k


def test_layer_and_global_normalisation(weights):
    g = torch.Generator().manual_seed(2)
    d = directions.random(weights, norm="layer", generator=g)
    for k, w in weights.items():
        if w.dim() > 1:
            assert d[k].norm() == pytest.approx(float(w.norm()), rel=1e-5)
    gl = directions.random(weights, norm="global", ignore_biasbn=False, generator=g)
    assert params.norm(gl) == pytest.approx(params.norm(weights), rel=1e-5)


def test_biasbn_copy_when_not_ignored(weights):
    d = directions.random(weights, norm="filter", ignore_biasbn=False)
    for k, w in weights.items():
        if w.dim() <= 1:
            assert torch.equal(d[k], w)


def test_filter_normalisation_is_invariant_to_relu_rescaling():
    torch.manual_seed(0)
    net = models.MLP(5, (7, 6), 3)
    w = params.weights(net)
    scaled = {k: v.clone() for k, v in w.items()}
    scaled["fc1.weight"] *= 10
    scaled["fc1.bias"] *= 10
    scaled["fc2.weight"] /= 10
    raw = directions.random(w, norm="none", generator=torch.Generator().manual_seed(3))
    x = torch.randn(20, 5)
    for alpha in (-0.7, 0.3, 1.0):
        a = params.forward(net, params.combine(w, [directions.normalize(raw, w)], [alpha]), x)
        b = params.forward(net, params.combine(scaled, [directions.normalize(raw, scaled)], [alpha]), x)
        assert torch.allclose(a, b, atol=1e-4)
        ra = params.forward(net, params.combine(w, [raw], [alpha]), x)
        rb = params.forward(net, params.combine(scaled, [raw], [alpha]), x)
        assert not torch.allclose(ra, rb, atol=1e-2)


def test_unknown_normalisation_names_the_choices(weights):
    with pytest.raises(ValueError, match="valid normalizations: filter, layer, global, none"):
        directions.random(weights, norm="batch")


def test_between_and_plane_through_three_points():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([2.0, 0.0, 0.0])}
    c = {"w": torch.tensor([1.0, 3.0, 0.0])}
    assert torch.equal(directions.between(a, b)["w"], b["w"])
    plane = directions.plane_through(a, b, c)
    assert torch.allclose(plane.points, torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]]))
    assert plane.project(c) == pytest.approx((1.0, 3.0))
    with pytest.raises(ValueError, match="linearly dependent"):
        directions.orthonormalize([b, {"w": 2 * b["w"]}])


def test_pca_recovers_a_planar_trajectory():
    torch.manual_seed(0)
    u, v = torch.randn(50), torch.randn(50)
    center = torch.randn(50)
    ts = torch.linspace(0, 1, 12)
    traj = [{"w": center + 3 * t * u + torch.sin(4 * t) * v} for t in ts]
    traj[-1] = {"w": center.clone()}
    res = directions.pca(traj, center={"w": center}, k=2)
    assert float(res.explained.sum()) == pytest.approx(1.0, abs=1e-5)
    basis = torch.stack([res.directions[0]["w"], res.directions[1]["w"]])
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    # u and v lie in the span of the two components
    for vec in (u, v):
        proj = basis.T @ (basis @ vec)
        assert torch.allclose(proj, vec, atol=1e-3)
    with pytest.raises(ValueError, match="at least two points"):
        directions.pca(traj[:1])


# --- exact hand cases --------------------------------------------------------------------------

HAND_W = {"w": torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64),
          "b": torch.tensor([12.0, 0.0], dtype=torch.float64)}  # ‖θ‖ = 13, filter norms 3 and 4
HAND_D = {"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.float64)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("norm,ignore,w_out,b_out", [
    # global: one scalar ‖θ‖/‖d‖ for the whole direction, biases included unless ignored
    ("global", False, 13 / 8 ** 0.5 * _ones(2, 3), 13 / 8 ** 0.5 * _ones(2)),
    ("global", True, 13 / 6 ** 0.5 * _ones(2, 3), _t([0.0, 0.0])),
    # filter: each row gets its filter's norm; biases zero or a copy of θ's
    ("filter", True, _t([[3.0] * 3, [4.0] * 3]) / 3 ** 0.5, _t([0.0, 0.0])),
    ("filter", False, _t([[3.0] * 3, [4.0] * 3]) / 3 ** 0.5, _t([12.0, 0.0])),
    ("layer", True, 5 / 6 ** 0.5 * _ones(2, 3), _t([0.0, 0.0])),
    ("layer", False, 5 / 6 ** 0.5 * _ones(2, 3), _t([12.0, 0.0])),
    ("none", True, _ones(2, 3), _t([0.0, 0.0])),
])
def test_normalize_on_a_hand_example(norm, ignore, w_out, b_out):
    out = directions.normalize(HAND_D, HAND_W, norm=norm, ignore_biasbn=ignore)
    torch.testing.assert_close(out["w"], w_out, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["b"], b_out, rtol=1e-9, atol=1e-12)
    assert torch.equal(HAND_D["w"], torch.ones(2, 3, dtype=torch.float64))  # input left alone


def test_pca_of_a_trajectory_whose_mean_is_off_the_centre():
    """Points c + t_k e0 + s_k e1 around centre 0 with a large offset c = 10 e2 and a mean
    of t of 1: the principal directions are those of the centred rows (e0, then e1; variances
    40 and 10 → explained 0.8 and 0.2), not the offset; the coordinates are (θ_k − centre)·d_i,
    not centred (the first is t_k, with its mean 1)."""
    t = torch.tensor([-3.0, -1.0, 1.0, 3.0, 5.0])
    s = torch.tensor([1.0, -2.0, 0.0, 2.0, -1.0])
    e = torch.eye(4)
    traj = [{"w": 10 * e[2] + t[k] * e[0] + s[k] * e[1]} for k in range(5)]
    res = directions.pca(traj, center={"w": torch.zeros(4)}, k=2)
    d0, d1 = res.directions[0]["w"], res.directions[1]["w"]
    assert abs(float(d0 @ e[0])) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(d1 @ e[1])) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(res.explained, torch.tensor([0.8, 0.2]), rtol=1e-6, atol=1e-6)
    signs = torch.tensor([float(d0 @ e[0]), float(d1 @ e[1])]).sign()
    torch.testing.assert_close(res.coords * signs, torch.stack([t, s], 1), rtol=1e-5, atol=1e-5)
    # the default centre is the last point
    last = directions.pca(traj, k=1)
    assert abs(float(last.directions[0]["w"] @ e[0])) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(last.coords[:, 0].abs(), (t - 5).abs(), rtol=1e-5, atol=1e-5)


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_random_is_the_seeded_gaussian_filter_normalised_by_default():
    """The default normalisation is "filter"; the raw draw is ``torch.randn`` from the given
    generator, in the weights' dtype (float64 weights give a float64 direction)."""
    w = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
         "b": torch.ones(2, dtype=torch.float64)}
    d = directions.random(w, generator=torch.Generator().manual_seed(5))
    raw = torch.randn((2, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = raw / raw.norm(dim=1, keepdim=True) * torch.tensor([[3.0], [4.0]], dtype=torch.float64)
    assert d["w"].dtype == torch.float64
    torch.testing.assert_close(d["w"], ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(d["b"], torch.zeros(2, dtype=torch.float64))
    torch.manual_seed(0)  # the global generator is not used: the same seed gives the same draw
    again = directions.random(w, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again["w"], d["w"], rtol=0, atol=0)


def test_random_and_between_accept_a_model():
    torch.manual_seed(3)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    d = directions.random(a, norm="layer", generator=torch.Generator().manual_seed(1))
    ref = directions.random(params.weights(a), norm="layer", generator=torch.Generator().manual_seed(1))
    assert list(d) == ["weight", "bias"]
    torch.testing.assert_close(d["weight"], ref["weight"], rtol=0, atol=0)
    ab = directions.between(a, b)
    torch.testing.assert_close(ab["weight"], b.weight.detach() - a.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["filter", "layer", "global"])
def test_normalize_guards_a_tiny_direction_with_1e_10(norm):
    """‖d‖ = 1e-10 (one filter, one layer): the scale is ‖θ‖ / (‖d‖ + 1e-10), so the result has
    half of θ's norm, not an infinite or doubled one."""
    w = {"w": torch.tensor([[3.0, 4.0]], dtype=torch.float64)}
    d = {"w": torch.tensor([[1e-10, 0.0]], dtype=torch.float64)}
    out = directions.normalize(d, w, norm=norm)
    torch.testing.assert_close(out["w"], torch.tensor([[2.5, 0.0]], dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_orthonormalize_threshold_is_strict_at_1e_12():
    """Only a residual norm below 1e-12 counts as dependent: norm 1e-12 itself and a short
    (norm 0.5) vector are normalised."""
    tiny = directions.orthonormalize([{"w": torch.tensor([1e-12], dtype=torch.float64)}])
    assert float(tiny[0]["w"]) == pytest.approx(1.0, rel=1e-12)
    half = directions.orthonormalize([{"w": torch.tensor([0.3, 0.4], dtype=torch.float64)}])
    torch.testing.assert_close(half[0]["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="^directions are linearly dependent$"):
        directions.orthonormalize([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}])


def test_pca_of_two_points_and_the_default_number_of_components():
    """Two points are enough; their centred rows have rank 1, so at most min(n, p) = 2
    directions come back whatever k asks (the second with zero variance); the default k is 2;
    the result keeps the centre it was given."""
    e = torch.eye(5)
    center = {"w": torch.zeros(5)}
    two = directions.pca([{"w": e[0]}, {"w": -e[0]}], center=center, k=4)
    assert len(two.directions) == 2 and two.coords.shape == (2, 2)
    assert two.center is center
    torch.testing.assert_close(two.explained, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)
    traj = [{"w": float(i) * e[0] + float(i % 2) * e[1] + float(i % 3) * e[2]} for i in range(6)]
    assert len(directions.pca(traj).directions) == 2
    with pytest.raises(ValueError, match="^a trajectory needs at least two points for PCA$"):
        directions.pca([{"w": e[0]}])
