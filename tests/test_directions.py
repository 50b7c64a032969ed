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
