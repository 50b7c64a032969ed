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
    ("wrn", (3, 32, 32), dict(depth=10, width=1, dropout=0.3)),
    ("wrn", (3, 32, 32), dict(depth=10, width=2, norm="group")),
    ("vit", (3, 32, 32), dict(patch=8, dim=16, depth=1, heads=2)),
    ("vit", (40,), dict(patch=4, dim=16, depth=2, heads=4)),
    ("vit", (2, 40), dict(patch=5, dim=8, depth=1, heads=1)),
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
    (lambda: models.WideResNet(20), "6n\\+4"),
    (lambda: models.WideResNet(16, width=0), "positive"),
    (lambda: models.WideResNet(16, norm="instance"), "valid norms"),
    (lambda: models.ViT((3, 32, 32), patch=5), "multiple of patch"),
    (lambda: models.ViT((40,), dim=10, heads=4), "divisible"),
    (lambda: models.ViT((1, 2, 3, 4)), "\\(L,\\), \\(C, L\\) or \\(C, H, W\\)"),
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


@pytest.mark.parametrize("depth,width,classes,count", [
    (28, 10, 10, 36_479_194), (28, 10, 100, 36_536_884), (16, 10, 100, 17_174_324)])
def test_wide_resnet_has_the_published_parameter_counts(depth, width, classes, count):
    """Counts of the reference WRN implementations (pre-activation, bias-free convolutions)."""
    net = models.WideResNet(depth, width, n_classes=classes)
    assert models.count_parameters(net) == count
    convs3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules())
    assert convs3 == 1 + 2 * 3 * (depth - 4) // 6


def test_wide_resnet_blocks_are_pre_activation_and_groupnorm_has_the_asked_groups():
    torch.manual_seed(0)
    block = models.PreActBlock(4, 4, 1, "batch", 0.0).eval()
    x = torch.randn(2, 4, 6, 6)
    a = torch.relu(block.bn1(x))
    ref = x + block.conv2(torch.relu(block.bn2(block.conv1(a))))
    assert torch.allclose(block(x), ref)
    gn = models.WideResNet(16, 4, norm="group", groups=16)
    norms = [m for m in gn.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 16 for m in norms)


def test_vit_attention_equals_torch_multihead_attention():
    """The hand-written attention against nn.MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    att = models.Attention(16, 4)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(att.qkv.weight)
        ref.in_proj_bias.copy_(att.qkv.bias)
        ref.out_proj.weight.copy_(att.proj.weight)
        ref.out_proj.bias.copy_(att.proj.bias)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(att(x), ref(x, x, x, need_weights=False)[0], atol=1e-6)


def test_vit_parameter_count_and_token_count():
    dim, depth, mlp, patch, classes = 16, 2, 2, 4, 10
    vit = models.ViT((3, 32, 32), classes, patch=patch, dim=dim, depth=depth, heads=2, mlp_ratio=mlp)
    tokens = (32 // patch) ** 2 + 1
    block = (2 * 2 * dim) + (3 * dim * dim + 3 * dim) + (dim * dim + dim) \
        + (dim * mlp * dim + mlp * dim) + (mlp * dim * dim + dim)
    expected = (3 * patch * patch * dim + dim) + dim + tokens * dim + depth * block \
        + 2 * dim + dim * classes + classes
    assert models.count_parameters(vit) == expected
    assert vit.pos.shape == (1, tokens, dim)


def test_vit_and_wrn_work_with_the_landscape_tools():
    """Both go through torch.func: the vmap path equals the per-point loop."""
    import numpy as np
    from landscape_lib import directions, landscape, params
    torch.manual_seed(0)
    for net, x in [(models.ViT((40,), 10, dim=16, depth=1, heads=2), torch.randn(16, 40)),
                   (models.WideResNet(10, 1, norm="group"), torch.randn(4, 3, 32, 32))]:
        net.eval()
        y = torch.randint(0, 10, (x.shape[0],))
        w = params.weights(net)
        d = directions.random(w, norm="filter", generator=torch.Generator().manual_seed(1))
        coeffs = np.linspace(-1, 1, 5)[:, None]
        loop = landscape.evaluate(net, w, [d], coeffs, x, y, strategy="loop")
        vm = landscape.evaluate(net, w, [d], coeffs, x, y, strategy="vmap", chunk_size=2)
        assert np.allclose(loop.loss, vm.loss, rtol=1e-4, atol=1e-6)


def test_factory_builds_a_fresh_model_per_call_for_the_data():
    from landscape_lib import data as D

    ds = D.Dataset("toy", torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), torch.zeros(2, 5),
                   torch.zeros(2, dtype=torch.long), 3)
    state = torch.random.get_rng_state()
    make = models.factory(ds, "mlp", hidden=(7,), norm="batch")
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing built yet
    a, b = make(), make()
    assert a is not b and a.fc1.in_features == 5 and a.out.out_features == 3
    assert isinstance(a.bn1, torch.nn.BatchNorm1d)
    assert not torch.equal(a.fc1.weight, b.fc1.weight)  # two draws of the initialisation
    torch.manual_seed(0)
    ref = models.build("mlp", input_shape=(5,), n_classes=3, hidden=(7,), norm="batch")
    torch.manual_seed(0)
    assert torch.equal(make().fc1.weight, ref.fc1.weight)
    with pytest.raises(ValueError, match="valid models: mlp"):
        models.factory(ds, "transformer")


# --- networks without BatchNorm for DP-SGD (chapter 19) --------------------------------------

def test_ws_conv_standardises_each_output_channel():
    torch.manual_seed(0)
    conv = models.WSConv2d(3, 4, 3, padding=1, eps=1e-8)
    x = torch.randn(2, 3, 5, 5)
    w = conv.weight.detach()
    flat = w.reshape(4, -1)
    ref_w = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True)).reshape(w.shape)
    ref = torch.nn.functional.conv2d(x, ref_w, conv.bias, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    # the output does not change when a channel's kernel is shifted and scaled
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.7)
    assert torch.allclose(conv(x), ref, atol=1e-4)
    with pytest.raises(ValueError, match="eps must be positive"):
        models.WSConv2d(3, 4, 3, eps=0.0)


def test_wscnn_and_ws_wrn_have_no_batchnorm():
    cnn = models.build("wscnn", input_shape=(64,), n_classes=10)
    assert cnn(torch.randn(3, 64)).shape == (3, 10)
    assert models.count_parameters(cnn) == 10026  # 160 + 32 + 4640 + 64 + 5130
    wrn = models.build("wswrn", input_shape=(3, 32, 32), n_classes=10, depth=16, width=4)
    kinds = {type(m) for m in wrn.modules()}
    assert models.WSConv2d in kinds and torch.nn.GroupNorm in kinds
    assert not any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm)) for m in wrn.modules())
    assert not any(type(m) is torch.nn.Conv2d for m in wrn.modules())
    assert 2.7e6 < models.count_parameters(wrn) < 2.8e6  # WRN-16-4: 2.7M parameters
    assert wrn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="not a square image"):
        models.WSCNN((40,))
    with pytest.raises(ValueError, match="multiples of groups"):
        models.WSCNN((64,), channels=(6,), groups=4)
