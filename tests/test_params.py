import copy

import pytest
import torch

from landscape_lib import models, params


@pytest.fixture
def net():
    torch.manual_seed(0)
    return models.MLP(6, (5, 4), 3, norm="batch")


def test_weights_are_detached_copies(net):
    w = params.weights(net)
    w["fc1.weight"].add_(1.0)
    assert not torch.equal(w["fc1.weight"], net.fc1.weight)
    assert list(w) == [n for n, _ in net.named_parameters()]
    assert "bn1.running_mean" in params.state(net)


def test_vector_round_trip_matches_torch(net):
    w = params.weights(net)
    v = params.to_vector(w)
    assert torch.equal(v, torch.nn.utils.parameters_to_vector(net.parameters()))
    back = params.from_vector(v, w)
    assert all(torch.equal(back[k], w[k]) for k in w)
    with pytest.raises(ValueError, match="entries"):
        params.from_vector(v[:-1], w)


def test_combine_lerp_sub_dot(net):
    a = params.weights(net)
    b = {k: torch.randn_like(v) for k, v in a.items()}
    d = params.sub(b, a)
    mid = params.lerp(a, b, 0.25)
    assert all(torch.allclose(mid[k], a[k] + 0.25 * d[k], atol=1e-6) for k in a)
    c = params.combine(a, [d], [0.25])
    assert all(torch.allclose(c[k], mid[k], atol=1e-6) for k in a)
    assert params.dot(d, d) == pytest.approx(params.norm(d) ** 2)
    assert params.dot(d, d) == pytest.approx(float(params.to_vector(d).double().pow(2).sum()), rel=1e-9)


def test_layerwise_lerp_moves_only_one_layer(net):
    a, b = params.state(net), {k: v + 1 for k, v in params.state(net).items()}
    groups = params.layer_groups(net)
    assert list(groups) == ["fc1", "bn1", "fc2", "bn2", "out"]
    only = groups["fc2"]
    half = params.lerp(a, b, 0.5, only=only, rest="b")
    for k in a:
        expected = (a[k] + b[k]) / 2 if k in only else b[k]
        assert torch.allclose(half[k].float(), expected.float())
    with pytest.raises(KeyError):
        params.lerp(a, b, 0.5, only=["nope"])
    with pytest.raises(ValueError, match="'a' or 'b'"):
        params.lerp(a, b, 0.5, rest="c")


def test_functional_forward_equals_loading_the_weights(net):
    net.eval()
    x = torch.randn(7, 6)
    w = {k: v * 1.1 for k, v in params.weights(net).items()}
    out = params.forward(net, w, x)
    other = copy.deepcopy(net)
    params.load(other, w)
    assert torch.allclose(out, other(x), atol=1e-6)
    # the module itself is untouched
    assert not torch.allclose(net(x), out)


def test_stack_and_vmap_equal_a_loop(net):
    net.eval()
    x = torch.randn(7, 6)
    points = [{k: v + 0.1 * i for k, v in params.weights(net).items()} for i in range(3)]
    stacked = params.stack(points)
    out = torch.func.vmap(lambda p: params.forward(net, p, x))(stacked)
    for i, p in enumerate(points):
        assert torch.allclose(out[i], params.forward(net, p, x), atol=1e-6)


def test_recompute_bn_is_cumulative_average(net):
    x = torch.randn(64, 6)
    params.recompute_bn(net, x, batch_size=16)
    # with cumulative averaging over equal batches the running mean is the mean of batch means,
    # i.e. the mean of fc1's pre-activations over the data
    with torch.no_grad():
        h = net.fc1(x)
    assert torch.allclose(net.bn1.running_mean, h.mean(0), atol=1e-5)
    net.eval()
    params.recompute_bn(net, x)
    assert not net.training  # the mode is restored
    assert params.has_batchnorm(net) and not params.has_batchnorm(models.MLP(6, (4,), 2))
