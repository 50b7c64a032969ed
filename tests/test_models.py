import pytest
import torch
from torch import nn

from landscape_lib import models


@pytest.mark.parametrize("name,shape,kw", [
    ("mlp", (40,), dict(hidden=(16, 16), norm="batch")),
    ("mlp", (40,), dict(hidden=(16,), norm="layer", act="tanh")),
    ("cnn1d", (40,), dict(channels=(4, 4))),
    ("resmlp", (40,), dict(width=8, n_blocks=3, skip=False)),
    ("resnet", (3, 32, 32), dict(depth=8, norm="group")),
    ("resnet", (3, 32, 32), dict(depth=8, skip=False, norm="none")),
    ("vgg", (3, 32, 32), dict(depth=9, norm="batch")),
])
def test_build_gives_logits_of_the_right_shape(name, shape, kw):
    net = models.build(name, input_shape=shape, n_classes=7, **kw)
    assert isinstance(net, nn.Module)
    assert net(torch.randn(2, *shape)).shape == (2, 7)


def test_layer_counts_and_names():
    mlp = models.MLP(40, (100, 100), 10, norm="batch")
    names = [n for n, _ in mlp.named_parameters()]
    assert names[:4] == ["fc1.weight", "fc1.bias", "bn1.weight", "bn1.bias"] and names[-1] == "out.bias"
    res = models.ResMLP(40, 8, n_blocks=20)
    linear = sum(isinstance(m, nn.Linear) for m in res.modules())
    assert linear == 2 * 20 + 2
    r56 = models.ResNet(56)
    convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in r56.modules())
    assert convs + 1 == 56  # 3x3 convs plus the classifier
    vgg16 = models.VGG(16)
    weights = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in vgg16.modules())
    assert weights == 16


def test_skip_switch_changes_the_function_not_the_parameters():
    torch.manual_seed(0)
    a = models.ResMLP(10, 8, 2, skip=True).eval()
    b = models.ResMLP(10, 8, 2, skip=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 10)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("call,match", [
    (lambda: models.build("transformer", input_shape=(4,), n_classes=2), "valid models: mlp, cnn1d"),
    (lambda: models.MLP(4, (8,), 2, norm="instance"), "valid norms: batch, group, layer, none"),
    (lambda: models.MLP(4, (8,), 2, act="swish"), "valid activations"),
    (lambda: models.ResNet(21), "6n\\+2"),
    (lambda: models.VGG(13), "valid depths: 9, 11, 16"),
    (lambda: models.build("resnet", input_shape=(40,), n_classes=2), "image inputs"),
    (lambda: models.MLP(0, (8,), 2), "positive"),
])
def test_bad_arguments_name_the_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scale_init_scales_weights_only():
    torch.manual_seed(0)
    net = models.MLP(4, (8,), 2, norm="batch")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    models.scale_init(net, 3.0)
    after = net.state_dict()
    assert torch.allclose(after["fc1.weight"], 3 * before["fc1.weight"])
    assert torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert torch.equal(after["bn1.weight"], before["bn1.weight"])
    with pytest.raises(ValueError, match="positive"):
        models.scale_init(net, 0)
    assert models.count_parameters(net) == 4 * 8 + 8 + 2 * 8 + 8 * 2 + 2
