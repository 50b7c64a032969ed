import hashlib
import math
import pickle

import numpy as np
import pytest
import torch

from landscape_lib import data


def test_mnist1d_matches_the_package_defaults(mnist1d):
    ds = mnist1d
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.n_classes == 10 and set(ds.y_train.unique().tolist()) == set(range(10))
    # standardised feature-wise with training statistics
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(40), atol=1e-4)
    assert torch.allclose(ds.x_train.std(0), torch.ones(40), atol=1e-3)
    # the same data every time (the package's seed 42, cached)
    again = data.load("mnist1d")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_mnist1d_equals_the_package_generator():
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    ds = data.load("mnist1d", standardize=False)
    assert np.allclose(ds.x_train.numpy(), raw["x"], atol=1e-6)
    assert np.array_equal(ds.y_test.numpy(), raw["y_test"])


def test_digits_and_synthetic_sets():
    d = data.load("digits")
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64) and d.n_classes == 10
    s = data.load("spirals", n_samples=400, seed=1)
    assert s.x_train.shape[1] == 2 and len(s.x_train) + len(s.x_test) == 400 and s.n_classes == 2
    assert torch.equal(data.load("spirals", n_samples=400, seed=1).x_train, s.x_train)
    assert not torch.equal(data.load("spirals", n_samples=400, seed=2).x_train, s.x_train)
    m = data.load("moons", n_samples=300)
    assert m.n_classes == 2 and len(m.x_train) == 150


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="valid datasets: mnist1d, digits, spirals, moons, cifar10, cifar100"):
        data.load("imagenet")


def _write_fake_cifar(root, n_per_batch=6, hundred=False):
    """Small files in the real CIFAR python format (pickled dicts of uint8 rows)."""
    g = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    n_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    names = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    sums = {}
    for name in names[0] + names[1]:
        entry = {"data": g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 label_key: g.integers(0, n_classes, n_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    meta_name = "meta" if hundred else "batches.meta"
    meta_key = "fine_label_names" if hundred else "label_names"
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(n_classes)]}))
    sums[meta_name] = hashlib.md5((folder / meta_name).read_bytes()).hexdigest()
    return names, sums, meta_name, meta_key


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loads_real_format_files_through_torchvision(tmp_path, monkeypatch, hundred):
    from torchvision import datasets

    names, sums, meta_name, meta_key = _write_fake_cifar(tmp_path, hundred=hundred)
    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    # torchvision checks the md5 of the real files; point it at ours instead.
    monkeypatch.setattr(cls, "train_list", [[n, sums[n]] for n in names[0]])
    monkeypatch.setattr(cls, "test_list", [[n, sums[n]] for n in names[1]])
    monkeypatch.setattr(cls, "meta", {"filename": meta_name, "key": meta_key, "md5": sums[meta_name]})
    ds = data.load("cifar100" if hundred else "cifar10", root=tmp_path, download=False, standardize=False)
    n_train = 6 * len(names[0])
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.n_classes == (100 if hundred else 10)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    # pixel layout: row r of the pickle is [R(1024) G(1024) B(1024)], each 32x32 row-major
    entry = pickle.loads((tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
                          / names[0][0]).read_bytes())
    first = torch.tensor(entry["data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(ds.x_train[0], first)
    std = data.load("cifar100" if hundred else "cifar10", root=tmp_path, download=False)
    assert torch.allclose(std.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", root=tmp_path, download=False)


def test_label_noise_flips_exactly_the_fraction(mnist1d):
    noisy = data.with_label_noise(mnist1d, 0.3, seed=0)
    changed = (noisy.y_train != mnist1d.y_train).float().mean().item()
    assert changed == pytest.approx(0.3, abs=1e-3)
    assert torch.equal(noisy.y_test, mnist1d.y_test)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.with_label_noise(mnist1d, 1.5)


def test_class_split_relabels(mnist1d):
    sub = data.class_split(mnist1d, [3, 7])
    assert sub.n_classes == 2 and set(sub.y_train.tolist()) == {0, 1}
    assert len(sub.x_train) == int(((mnist1d.y_train == 3) | (mnist1d.y_train == 7)).sum())
    assert torch.equal(sub.x_train[sub.y_train == 1][0], mnist1d.x_train[mnist1d.y_train == 7][0])
    with pytest.raises(ValueError, match="distinct values in 0..9"):
        data.class_split(mnist1d, [3, 3])


def test_batches_cover_every_point_once_and_follow_the_seed():
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    got = torch.cat([yb for _, yb in data.batches(x, y, 3, generator=torch.Generator().manual_seed(0))])
    assert sorted(got.tolist()) == list(range(10))
    again = torch.cat([yb for _, yb in data.batches(x, y, 3, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(got, again)
    assert [len(b[1]) for b in data.batches(x, y, 3, shuffle=False, drop_last=True)] == [3, 3, 3]
    assert data.n_batches(10, 3) == 4 and data.n_batches(10, 3, drop_last=True) == 3
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(x, y, 0))


def test_crop_flip_equals_a_per_image_reference():
    x = torch.randn(5, 3, 8, 8)
    out = data.crop_flip(x, torch.Generator().manual_seed(1), pad=2)
    # reference: the same random draws, applied image by image with padding and slicing
    g = torch.Generator().manual_seed(1)
    offs = torch.randint(0, 5, (2, 5), generator=g)
    flips = torch.rand(5, generator=g) < 0.5
    for b in range(5):
        padded = torch.nn.functional.pad(x[b], (2, 2, 2, 2))
        i, j = int(offs[0, b]), int(offs[1, b])
        ref = padded[:, i:i + 8, j:j + 8]
        if flips[b]:
            ref = ref.flip(2)
        assert torch.equal(out[b], ref)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        data.crop_flip(torch.randn(3, 8))


def test_subsets_are_fixed(mnist1d):
    a = mnist1d.train_subset(100, seed=0)
    b = mnist1d.train_subset(100, seed=0)
    assert torch.equal(a[0], b[0]) and len(a[0]) == 100
    with pytest.raises(ValueError, match="positive"):
        mnist1d.train_subset(0)


def test_shift_jitter_rolls_each_example_and_adds_noise():
    x = torch.arange(20.0).reshape(2, 10)
    g = torch.Generator().manual_seed(0)
    out = data.shift_jitter(x, g, max_shift=3, noise=0.0)
    for row, orig in zip(out, x):  # each row is a circular shift of its input by |s| <= 3
        shifts = [s for s in range(-3, 4) if torch.equal(row, torch.roll(orig, s))]
        assert len(shifts) == 1
    seen = {int(((data.shift_jitter(x[:1], torch.Generator().manual_seed(s), 3, 0.0)[0, 0] - x[0, 0]) % 10))
            for s in range(40)}
    assert seen == {0, 1, 2, 3, 7, 8, 9}  # shifts -3..3
    noisy = data.shift_jitter(torch.zeros(4000, 1, 10), torch.Generator().manual_seed(1), 0, 0.1)
    assert noisy.shape == (4000, 1, 10) and abs(float(noisy.std()) - 0.1) < 0.003
    assert torch.equal(data.shift_jitter(x, None, 0, 0.0), x)
    with pytest.raises(ValueError, match="signals"):
        data.shift_jitter(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="max_shift must be an integer >= 0"):
        data.shift_jitter(x, max_shift=-1)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_stand_in_cifar_loads_through_torchvision_with_the_real_shapes(tmp_path, monkeypatch, name, classes):
    """run --stand-in-data: random images in the real file format, read by torchvision's own
    CIFAR classes (with the stand-in files' MD5 sums), of the real image shape and, by default,
    the real set sizes."""
    monkeypatch.setenv("LANDSCAPE_STAND_IN", "1")
    data.write_stand_in_cifar(tmp_path, name, n_train=250, n_test=40)
    ds = data.load(name, root=tmp_path, standardize=False)
    assert ds.name == f"{name} (stand-in)" and ds.n_classes == classes
    assert ds.x_train.shape == (250, 3, 32, 32) and ds.x_test.shape == (40, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and 0.0 <= float(ds.x_train.min()) <= float(ds.x_train.max()) <= 1.0
    assert 0 <= int(ds.y_train.min()) and int(ds.y_train.max()) < classes
    folder = tmp_path / data.CIFAR_FILES[name][0]
    first = pickle.loads((folder / data.CIFAR_FILES[name][1][0]).read_bytes())
    assert torch.allclose(ds.x_train[0], torch.tensor(first["data"][0].reshape(3, 32, 32)) / 255)
    # written once: a second load reads the same files
    again = data.load(name, root=tmp_path, standardize=False)
    assert torch.equal(again.x_train, ds.x_train)
    monkeypatch.delenv("LANDSCAPE_STAND_IN")
    with pytest.raises(RuntimeError, match="could not load"):  # without the flag: the real files
        data.load(name, root=tmp_path, download=False)


def test_stand_in_cifar_has_the_real_sizes_by_default(tmp_path):
    lists = data.write_stand_in_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    sizes = [len(pickle.loads((folder / f).read_bytes())["data"]) for f, _ in lists["train_list"]]
    assert sizes == [10000] * 5
    assert len(pickle.loads((folder / "test_batch").read_bytes())["data"]) == 10000
    with pytest.raises(ValueError, match="valid: cifar10, cifar100"):
        data.write_stand_in_cifar(tmp_path, "svhn")


def test_root_spirals_follow_the_square_root_law():
    """Noise-free, every point lies on r = radius·√t at angle 2π·turns·√t (arm 1) or its
    reflection (arm 2); the draw is deterministic per seed and the arms are balanced."""
    x, y = data.root_spirals(201, seed=3, noise=0.0, turns=2.0, radius=1.5)
    assert x.shape == (200, 2) and x.dtype == torch.float32 and y.tolist() == [0] * 100 + [1] * 100
    arm1, arm2 = x[:100].double(), x[100:].double()
    torch.testing.assert_close(arm2, -arm1)
    s = arm1.norm(dim=1) / 1.5  # √t
    assert float(s.max()) < 1.0
    angle = torch.atan2(arm1[:, 1], arm1[:, 0])
    expected = 2 * math.pi * 2.0 * s
    # the angle agrees modulo 2π
    assert torch.allclose(torch.remainder(angle - expected + math.pi, 2 * math.pi) - math.pi,
                          torch.zeros_like(angle), atol=1e-5)
    a, b = data.root_spirals(50, seed=7), data.root_spirals(50, seed=7)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], data.root_spirals(50, seed=8)[0])
    with pytest.raises(ValueError, match="n >= 2"):
        data.root_spirals(1, seed=0)
