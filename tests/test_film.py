"""FiLM-Ensemble (``landscape_lib.film``) against independent references.

The reference for member ``m`` is always a plain copy of the original model whose norm layers
carry member ``m``'s ``γ_m, β_m`` (and running statistics), set by hand here from the member
layer's ``(M, C)`` tensors, and run by PyTorch's own ``BatchNorm``/``LayerNorm``/``GroupNorm``
on the batch alone — no reshape trick, no replication. Member ``m``'s rows of the ensemble's
batch are ``m, M + m, 2M + m, …`` (sample-major), which the wrapper hides behind
``(M, B, K)`` logits.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_lib import ensembles, film, models, train
from landscape_lib.data import Dataset

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed")
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class TokenNet(nn.Module):
    """[B, T, 6] → Linear → LayerNorm(8) → mean over T → Linear; LayerNorm on 3-D input."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.embed(x))).mean(1))


def _randomise(model: nn.Module) -> nn.Module:
    """Give every norm layer a non-trivial affine and running statistics (a 'trained' model)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, NORMS) and getattr(mod, "weight", None) is not None:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return model


def _reference(original: nn.Module, converted: nn.Module, m: int) -> nn.Module:
    """A copy of ``original`` carrying member ``m``'s affine and statistics (set by hand)."""
    ref = copy.deepcopy(original)
    layers = dict(converted.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not isinstance(mod, NORMS):
                continue
            fl = layers[name]
            M = fl.members
            mod.weight.copy_(fl.weight.reshape(M, *mod.weight.shape)[m])
            mod.bias.copy_(fl.bias.reshape(M, *mod.bias.shape)[m])
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(fl.running_mean.reshape(M, -1)[m])
                mod.running_var.copy_(fl.running_var.reshape(M, -1)[m])
    return ref


def _cases():
    torch.manual_seed(0)
    return {
        "mlp-batch": (models.MLP(12, (16, 16), 5, norm="batch"), torch.randn(6, 12)),
        "mlp-layer": (models.MLP(12, (16,), 5, norm="layer"), torch.randn(6, 12)),
        "cnn1d-batch": (models.CNN1d(20, (4, 6), 5, norm="batch"), torch.randn(6, 20)),
        "cnn1d-group": (models.CNN1d(20, (8, 8), 5, norm="group"), torch.randn(6, 20)),
        "resnet-batch": (models.ResNet(8, 4, norm="batch"), torch.randn(4, 3, 8, 8)),
        "tokens-layer": (TokenNet(), torch.randn(5, 4, 6)),
    }


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identical_members_are_copies_of_the_single_model(case, mode):
    net, x = _cases()[case]
    net = _randomise(net)
    M = 3
    ens = film.FiLMEnsemble(net, M, init="copy")
    single = copy.deepcopy(net)
    getattr(ens, mode)()
    getattr(single, mode)()
    out = ens(x)
    ref = single(x)
    assert out.shape == (M, x.shape[0], ref.shape[-1])
    for m in range(M):
        torch.testing.assert_close(out[m], ref, rtol=1e-5, atol=1e-5)
    if mode == "train":  # every member's running statistics moved as the single model's did
        layers = dict(ens.net.named_modules())
        for name, mod in single.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                for m in range(M):
                    torch.testing.assert_close(layers[name].running_mean.view(M, -1)[m], mod.running_mean)
                    torch.testing.assert_close(layers[name].running_var.view(M, -1)[m], mod.running_var)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("init", ["xavier", "bernoulli", "perturb"])
def test_member_m_is_the_single_model_with_member_m_affine(case, init):
    net, x = _cases()[case]
    net = _randomise(net)
    M = 3
    ens = film.FiLMEnsemble(net, M, init=init, gain=2.0, generator=torch.Generator().manual_seed(0))
    refs = [_reference(net, ens.net, m) for m in range(M)]
    for mode in ("eval", "train"):
        getattr(ens, mode)()
        out = ens(x)
        for m, ref in enumerate(refs):
            getattr(ref, mode)()
            torch.testing.assert_close(out[m], ref(x), rtol=1e-4, atol=1e-5)
    # members differ (distinct γ, β)
    assert (out[0] - out[1]).abs().max() > 1e-3
    # after the training-mode pass, member m's running statistics are its reference's
    layers = dict(ens.net.named_modules())
    for m, ref in enumerate(refs):
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                torch.testing.assert_close(layers[name].running_mean.view(M, -1)[m], mod.running_mean)
                torch.testing.assert_close(layers[name].running_var.view(M, -1)[m], mod.running_var)


@pytest.mark.parametrize("case", ["mlp-batch", "cnn1d-group", "tokens-layer"])
def test_extract_member_equals_the_reference(case):
    net, x = _cases()[case]
    ens = film.FiLMEnsemble(_randomise(net), 2, gain=3.0, generator=torch.Generator().manual_seed(2))
    ens.eval()
    for m in range(2):
        plain = film.extract_member(ens, m).eval()
        assert not film.member_layers(plain)
        torch.testing.assert_close(plain(x), ens(x)[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain(x), _reference(net, ens.net, m).eval()(x))
    with pytest.raises(ValueError, match="0..1"):
        film.extract_member(ens, 2)


def test_gradient_of_the_ensemble_loss_is_the_mean_of_member_losses():
    """∂L/∂γ_m of the ensemble loss = (1/M) ∂ℓ_m/∂γ of member m's own network; and the shared
    weights get the mean of the members' gradients."""
    torch.manual_seed(0)
    net = models.MLP(12, (16,), 5, norm="batch")
    M = 3
    ens = film.FiLMEnsemble(net, M, gain=2.0, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(7, 12), torch.randint(0, 5, (7,))
    film.ensemble_loss(ens(x), y).backward()
    shared = torch.zeros_like(net.fc1.weight)
    for m in range(M):
        ref = _reference(net, ens.net, m)
        F.cross_entropy(ref(x), y).backward()
        torch.testing.assert_close(ens.net.bn1.weight.grad.view(M, -1)[m], ref.bn1.weight.grad / M,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ens.net.bn1.bias.grad.view(M, -1)[m], ref.bn1.bias.grad / M, rtol=1e-4, atol=1e-6)
        shared += ref.fc1.weight.grad / M
    torch.testing.assert_close(ens.net.fc1.weight.grad, shared, rtol=1e-4, atol=1e-6)


@needs_torchvision
def test_torchvision_resnet18_members():
    """A model this library did not write: torchvision's ResNet-18 (20 BatchNorm2d layers,
    in-place ReLUs) on 2 images of 16×16, M = 2."""
    import torchvision

    torch.manual_seed(0)
    net = _randomise(torchvision.models.resnet18(num_classes=4))
    x = torch.randn(2, 3, 16, 16)
    ens = film.FiLMEnsemble(net, 2, gain=1.0, generator=torch.Generator().manual_seed(0))
    assert len(film.member_layers(ens.net)) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 20
    for mode in ("eval", "train"):
        getattr(ens, mode)()
        out = ens(x)
        for m in range(2):
            ref = _reference(net, ens.net, m)
            getattr(ref, mode)()
            torch.testing.assert_close(out[m], ref(x), rtol=1e-4, atol=1e-4)
    same = film.FiLMEnsemble(net, 2, init="copy").eval()
    torch.testing.assert_close(same(x)[1], copy.deepcopy(net).eval()(x), rtol=1e-4, atol=1e-4)


def test_init_gain():
    """Xavier: U(−a, a) with a = g√(6/(M+C)) (range and variance a²/3); Bernoulli: ±g; perturb
    at gain 0 is the layer's own affine; the draw is reproducible from a generator."""
    M, C, g = 4, 500, 3.0
    a = film.init_bound(M, C, g)
    assert a == pytest.approx(g * (6 / (M + C)) ** 0.5)
    layer = film.init_film_(film.MemberBatchNorm(M, C), "xavier", g, torch.Generator().manual_seed(0))
    for p in (layer.gamma, layer.beta):
        assert p.abs().max() <= a and p.abs().max() > 0.95 * a
        assert float(p.detach().var()) == pytest.approx(a * a / 3, rel=0.1)
        assert abs(float(p.detach().mean())) < 0.05 * a
    again = film.init_film_(film.MemberBatchNorm(M, C), "xavier", g, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.weight, layer.weight)
    b = film.init_film_(film.MemberLayerNorm(M, C), "bernoulli", g, torch.Generator().manual_seed(0))
    assert set(b.weight.unique().tolist()) == {-g, g}
    assert 0.4 < float((b.weight > 0).float().mean()) < 0.6
    p = film.init_film_(film.MemberGroupNorm(M, 4, 8), "perturb", 0.0)
    assert torch.equal(p.weight, torch.ones(M, 8)) and torch.equal(p.bias, torch.zeros(M, 8))
    p = film.init_film_(film.MemberGroupNorm(M, 4, 8), "perturb", 1.0)
    assert (p.weight - 1).abs().max() <= film.init_bound(M, 8, 1.0) and (p.weight - 1).abs().max() > 0


def test_footprint_adds_2CM_per_layer():
    net = models.MLP(40, (32, 16), 10, norm="batch")
    M = 4
    ens = film.FiLMEnsemble(net, M, gain=1.0)
    a, b = film.footprint(net), film.footprint(ens)
    assert b["parameters"] - a["parameters"] == 2 * (32 + 16) * (M - 1)
    assert b["buffers"] - a["buffers"] == 2 * (32 + 16) * (M - 1)
    assert b["bytes"] == 4 * (b["parameters"] + b["buffers"])


def test_metrics_and_training_through_fit():
    """FiLMEnsemble trains through train.fit with ensemble_loss; its probabilities feed the
    ensembles metrics; identical members have zero disagreement and KL diversity."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 12), torch.randint(0, 3, (96,))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = Dataset("toy", x[:64], y[:64], x[64:], y[64:], 3)
    net = models.MLP(12, (16,), 3, norm="batch")
    same = film.FiLMEnsemble(net, 3, init="copy")
    probs = same.predict_proba(ds.x_test, batch_size=10)
    assert probs.shape == (3, 32, 3)
    assert ensembles.mean_disagreement(list(probs)) == 0.0
    assert ensembles.mean_kl_diversity(list(probs)) == pytest.approx(0.0, abs=1e-9)
    ens = film.FiLMEnsemble(net, 3, gain=4.0, generator=torch.Generator().manual_seed(0))
    before = film.ensemble_loss(ens(ds.x_train), ds.y_train).item()
    hist = train.fit(ens, ds, optimizer=torch.optim.Adam(ens.parameters(), lr=1e-2), epochs=15,
                     batch_size=16, loss_fn=film.ensemble_loss, eval_every=0,
                     generator=torch.Generator().manual_seed(0))
    assert hist.last("train_loss") < 0.7 * before
    probs = ens.predict_proba(ds.x_test)
    assert ensembles.mean_kl_diversity(list(probs)) > 0
    mean = ensembles.average(list(probs))
    torch.testing.assert_close(mean.sum(1), torch.ones(32))
    assert set(ensembles.metrics(mean, ds.y_test)) >= {"acc", "nll", "ece"}


def test_bad_input_names_the_choices():
    net = models.MLP(12, (16,), 3, norm="batch")
    with pytest.raises(ValueError, match="valid inits: xavier, bernoulli, perturb, copy"):
        film.FiLMEnsemble(net, 2, init="gaussian")
    with pytest.raises(ValueError, match="valid norm types: batch, layer, group"):
        film.convert(net, 2, norms=("instance",))
    with pytest.raises(ValueError, match="no normalisation layer.*valid norm types"):
        film.convert(models.MLP(12, (16,), 3), 2)
    with pytest.raises(ValueError, match="positive integer"):
        film.FiLMEnsemble(net, 0)
    with pytest.raises(ValueError, match="dead network"):
        film.FiLMEnsemble(net, 2, init="xavier", gain=0.0)
    with pytest.raises(ValueError, match="gain 0"):
        film.FiLMEnsemble(net, 2, init="copy", gain=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        film.FiLMEnsemble(net, 2, gain=-1.0)
    with pytest.raises(ValueError, match="valid layers"):
        film.init_film_(nn.BatchNorm1d(4))
    layer = film.MemberBatchNorm(3, 4)
    with pytest.raises(ValueError, match="multiple of the 3 members"):
        layer(torch.randn(4, 4))
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"\[M, B, K\]"):
        film.ensemble_loss(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))
    ens = film.FiLMEnsemble(net, 2)
    with pytest.raises(ValueError, match="leave out init and gain"):
        film.FiLMEnsemble(ens.net, init="xavier")
    assert film.FiLMEnsemble(ens.net).members == 2
