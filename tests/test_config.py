import pytest
import torch

from landscape_lib import config


def test_choose_picks_the_profile_value():
    assert config.choose("smoke", smoke=1, cpu=2, gpu=3) == 1
    assert config.choose("cpu", smoke=1, cpu=2, gpu=3) == 2
    assert config.choose("gpu", smoke=1, cpu=2, gpu=3) == 3


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        config.choose("laptop", smoke=1, cpu=2, gpu=3)
    with pytest.raises(ValueError, match="valid profiles"):
        config.setup("fast")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", ""])
def test_unknown_device_names_the_choices(name):
    with pytest.raises(ValueError, match="valid devices"):
        config.resolve_device(name)


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        config.resolve_device("cuda")


def test_auto_device_and_setup():
    s = config.setup("smoke", seed=3, device="auto")
    assert s.device.type in ("cpu", "cuda")
    assert s.threads == 1 and torch.get_num_threads() == 1
    assert s.choose(smoke="a", cpu="b", gpu="c") == "a"
    assert not s.enforce_claims
    assert config.setup("cpu", 0, "cpu").enforce_claims


def test_seeding_is_reproducible():
    config.seed_everything(7)
    a = torch.randn(5)
    config.seed_everything(7)
    assert torch.equal(a, torch.randn(5))


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="non-negative integer"):
        config.seed_everything(seed)
