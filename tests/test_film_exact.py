"""Exact cases of landscape_lib.film where the reference tests are blind: the layers' defaults and
options (eps, momentum, dtype, track_running_stats) against PyTorch's own layers, the random
inits replayed draw by draw from the generator, and the error messages in full."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from landscape_lib import film


def test_member_layers_take_pytorchs_defaults():
    bn, ref = film.MemberBatchNorm(2, 3), nn.BatchNorm1d(3)
    assert (bn.eps, bn.momentum, bn.track_running_stats, bn.affine) == (ref.eps, ref.momentum, True, True)
    assert film.MemberLayerNorm(2, 4).eps == nn.LayerNorm(4).eps
    assert film.MemberGroupNorm(2, 2, 4).eps == nn.GroupNorm(2, 4).eps
    # one feature, one member: the smallest valid sizes
    one = film.MemberBatchNorm(1, 1)
    assert one.gamma.shape == (1, 1)
    assert film.FiLMEnsemble(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), 1).members == 1


@pytest.mark.parametrize("bad", [0, True, 2.0])
def test_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match=r"^num_features must be a positive integer, got "):
        film.MemberBatchNorm(2, bad)
    with pytest.raises(ValueError, match=r"^the number of members must be a positive integer, got "):
        film.MemberBatchNorm(bad, 3)


def test_extract_member_rejects_a_bool_index():
    conv = film.convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), 2)
    with pytest.raises(ValueError, match=r"^member index must be in 0\.\.1, got True$"):
        film.extract_member(conv, True)


def test_dtype_and_options_reach_every_tensor():
    f64 = torch.float64
    bn = film.MemberBatchNorm(2, 3, dtype=f64)
    assert {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)} == {f64}
    for layer in (film.MemberLayerNorm(2, 4, dtype=f64), film.MemberGroupNorm(2, 2, 4, dtype=f64)):
        assert layer.weight.dtype == f64 and layer.bias.dtype == f64
    # no running statistics, still an affine
    free = film.MemberBatchNorm(2, 3, track_running_stats=False)
    assert free.affine and free.weight.shape == (6,) and free.running_mean is None


def test_a_5d_input_is_batch_norm_3d_per_member():
    torch.manual_seed(0)
    layer = film.MemberBatchNorm(2, 3).double()
    x = torch.randn(4, 3, 2, 2, 2, dtype=torch.float64)  # B·M = 4 rows: samples 0, 1 for members 0, 1
    out = layer(x)
    ref = nn.BatchNorm3d(3).double()
    for m in range(2):
        torch.testing.assert_close(out[m::2], ref(x[m::2]), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="2-D to 5-D"):
        film._AnyBatchNorm(3)(torch.randn(2, 3, 1, 1, 1, 1))


class Odd(nn.Module):
    """Every convertible norm, each with options other than the defaults."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8, eps=0.5, momentum=0.3)
        self.ln = nn.LayerNorm(8, eps=0.25)
        self.gn = nn.GroupNorm(2, 8, eps=0.75)
        self.cum = nn.BatchNorm1d(8, momentum=None)  # a cumulative average

    def forward(self, x):
        return self.cum(self.gn(self.ln(self.bn(self.fc(x)))))


def test_options_survive_conversion_and_extraction():
    torch.manual_seed(0)
    net = Odd().double()
    conv = film.convert(net, 3, init="copy")
    assert (conv.bn.eps, conv.bn.momentum, conv.ln.eps, conv.gn.eps, conv.cum.momentum) == (0.5, 0.3, 0.25, 0.75, None)
    x = torch.randn(6, 5, dtype=torch.float64)
    ens = film.FiLMEnsemble(conv)
    assert ens.net is conv
    out = ens(x)  # identical members: each is the original network, eps and all
    for m in range(3):
        torch.testing.assert_close(out[m], net(x), rtol=1e-10, atol=1e-12)
    for m in range(3):
        plain = film.extract_member(conv, m)
        assert (plain.bn.eps, plain.bn.momentum, plain.ln.eps, plain.gn.eps) == (0.5, 0.3, 0.25, 0.75)
        assert plain.cum.momentum is None and plain.bn.affine and plain.bn.track_running_stats
        assert type(plain.bn) is nn.BatchNorm1d


def _replay(members, features, init, gain, seed, dtype=torch.float64):
    """γ, β of one layer drawn as init_film_ documents it, from a fresh generator: Xavier-uniform
    on (M, C) is U(−a, a), a = gain·√(6/(M + C)); Bernoulli is ±gain with probability ½ each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in (1.0, 0.0):
        if init == "bernoulli":
            s = torch.empty(members, features).bernoulli_(0.5, generator=g)
            out.append(((2 * s - 1) * gain).to(dtype))
        else:
            a = gain * math.sqrt(6.0 / (members + features))
            noise = torch.empty(members, features, dtype=dtype).uniform_(-a, a, generator=g)
            out.append(noise if init == "xavier" else start + noise)
    return out


@pytest.mark.parametrize("init,gain", [("xavier", None), ("bernoulli", None), ("perturb", 0.3)])
def test_random_inits_replay_from_the_generator_alone(init, gain):
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)).double()
    torch.manual_seed(1)
    conv = film.convert(net, 3, init=init, gain=gain, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(2)  # the global RNG plays no part
    ens = film.FiLMEnsemble(net, 3, init=init, gain=gain, generator=torch.Generator().manual_seed(7))
    want = _replay(3, 4, init, 1.0 if gain is None else gain, 7)
    for layer in (conv[1], ens.net[1]):
        torch.testing.assert_close(layer.gamma, want[0], rtol=0, atol=1e-15)
        torch.testing.assert_close(layer.beta, want[1], rtol=0, atol=1e-15)


def test_film_ensemble_passes_its_norm_filter_on():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    ens = film.FiLMEnsemble(net, 2, norms=("layer",))
    assert isinstance(ens.net[1], nn.BatchNorm1d) and isinstance(ens.net[2], film.MemberLayerNorm)


def test_messages_in_full():
    with pytest.raises(ValueError) as err:
        film.init_film_(nn.Linear(2, 2))
    assert str(err.value) == ("not a member layer: Linear; valid layers: MemberBatchNorm, MemberLayerNorm, "
                              "MemberGroupNorm")
    with pytest.raises(ValueError) as err:
        film.init_film_(film.MemberBatchNorm(2, 3), "bernoulli", gain=0.0)
    assert str(err.value).startswith("init 'bernoulli' with gain 0 sets every γ to 0")
    with pytest.raises(ValueError) as err:
        film.convert(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 2, norms=("layer", "group"))
    assert str(err.value) == ("Sequential has no normalisation layer of the types layer, group to make "
                              "member-conditioned (valid norm types: batch, layer, group); build it with a "
                              "norm, e.g. models.MLP(..., norm='batch')")
    conv = film.convert(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 2)
    with pytest.raises(ValueError) as err:
        film.FiLMEnsemble(conv, gain=1.0)
    assert str(err.value) == "the model is converted already: leave out init and gain"
    assert film.FiLMEnsemble(conv, 2).members == 2
    with pytest.raises(ValueError, match="has 2 members, not 3"):
        film.FiLMEnsemble(conv, 3)
    with pytest.raises(ValueError) as err:
        film.MemberBatchNorm(2, 3)(torch.randn(5, 3))
    assert str(err.value).startswith("the batch has 5 rows, not a multiple of the 2 members")
    # 2-D logits are refused even when their second size matches the labels
    with pytest.raises(ValueError, match=r"need member logits \[M, B, K\]"):
        film.ensemble_loss(torch.randn(3, 3), torch.zeros(3, dtype=torch.long))


def test_conversion_keeps_dtype_statistics_choice_and_layers_without_tensors():
    f64 = torch.float64
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                        nn.BatchNorm1d(4, track_running_stats=False),
                        nn.LayerNorm(4, elementwise_affine=False)).to(f64)
    conv = film.convert(net, 2, init="copy")
    for i in (1, 2, 3):
        assert conv[i].weight.dtype == f64 and conv[i].bias.dtype == f64
    assert conv[3].running_mean is None and not conv[3].track_running_stats
    assert isinstance(conv[4], film.MemberLayerNorm)  # no tensor of its own: the default dtype, γ = 1, β = 0
    assert torch.equal(conv[4].weight, torch.ones(2, 4)) and torch.equal(conv[4].bias, torch.zeros(2, 4))
