"""Datasets read offline: the real Fashion-MNIST files, CIFAR-10 batches, image folders."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from qnas_cli.data import augment, decode_image, epoch_batches, load_dataset, to_input
from qnas_cli.errors import UserError


def test_fashion_mnist_real_files(fmnist):
    assert (fmnist.num_classes, fmnist.in_channels) == (10, 1)
    assert len(fmnist.train) + len(fmnist.search) == 60000 and len(fmnist.test) == 10000
    x, y = fmnist.train.get(torch.arange(64))
    assert x.dtype == torch.uint8 and x.shape == (64, 1, 28, 28) and y.min() >= 0 and y.max() <= 9
    xt, _ = fmnist.test.get(torch.arange(10))
    assert xt.float().std() > 10  # real images, not blanks
    # train and search are disjoint and the split does not depend on anything but the dataset
    tr, se = set(fmnist.train.indices.tolist()), set(fmnist.search.indices.tolist())
    assert not tr & se and len(se) == 5000
    assert torch.equal(load_dataset("fashion-mnist").search.indices, fmnist.search.indices)


def test_to_input_normalises_and_resizes(fmnist):
    x, _ = fmnist.test.get(torch.arange(256))
    z = to_input(x, fmnist, 28)
    assert abs(z.mean().item()) < 0.2 and 0.7 < z.std().item() < 1.3
    assert to_input(x, fmnist, 32).shape == (256, 1, 32, 32)


def test_batches_are_sharded_deterministic_and_disjoint():
    a = epoch_batches(1000, 32, seed=3, epoch=1, rank=0, world=2)
    b = epoch_batches(1000, 32, seed=3, epoch=1, rank=1, world=2)
    assert [t.tolist() for t in a] == [t.tolist() for t in epoch_batches(1000, 32, 3, 1, 0, 2)]
    assert not set(torch.cat(a).tolist()) & set(torch.cat(b).tolist())
    assert torch.cat(a).tolist() != torch.cat(epoch_batches(1000, 32, 3, 2, 0, 2)).tolist()


def test_augment_is_a_crop_and_flip_of_the_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    y = augment(x, 0, True, g)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    assert torch.equal(augment(x, 2, True, torch.Generator().manual_seed(1)), augment(x, 2, True, torch.Generator().manual_seed(1)))


def test_crop_with_padding_takes_every_offset_of_the_padded_image():
    """Each output is the window at some (dy, dx) of the zero-padded image, and the offsets vary:
    a crop stuck at one offset (0, 0 or the centre) fails."""
    pad, n = 2, 200
    x = torch.randint(1, 256, (n, 2, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))  # no zeros
    z = augment(x, pad, False, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(n):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(z[i], padded[i, :, dy : dy + 6, dx : dx + 7])]
        assert len(found) == 1, f"image {i} is no crop of its padded self"
        offsets.append(found[0])
    assert set(offsets) == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}  # all 25, uniform draws


def _write_cifar(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 20))}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


def test_cifar10_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(f"cifar10:{tmp_path}", search_size=10)
    assert (ds.in_channels, ds.num_classes, len(ds.train), len(ds.test)) == (3, 10, 90, 20)
    assert ds.train.get(torch.arange(4))[0].shape == (4, 3, 32, 32)


def test_cifar10_pickle_cannot_run_code(tmp_path):
    _write_cifar(tmp_path / "c")
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "c" / "data_batch_1", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(UserError, match="forbidden"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", search_size=10)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_imagefolder_any_size(tmp_path, mode, channels):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                shape = (rng.integers(20, 60), rng.integers(20, 60)) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", search_size=2, load_size=24)
    assert (ds.in_channels, ds.num_classes, len(ds.train), len(ds.search), len(ds.test)) == (channels, 2, 10, 2, 4)
    x, y = ds.test.get(torch.arange(4))
    assert x.shape == (4, channels, 24, 24) and y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("w, h", [(40, 40), (60, 23), (23, 60), (17, 31), (300, 11)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_is_torchvisions_resize_then_centre_crop(tmp_path, w, h, mode):
    """One recipe for every image file: torchvision's evaluation convention, aspect ratio kept."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    rng = np.random.default_rng(w * h)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    with Image.open(path) as im:
        ref = CenterCrop(12)(Resize(12, interpolation=InterpolationMode.BILINEAR)(im.convert(mode)))
    got = decode_image(path, 1 if mode == "L" else 3, 12)
    assert got.shape == (1 if mode == "L" else 3, 12, 12)
    assert np.array_equal(got, np.asarray(ref).reshape(12, 12, -1).transpose(2, 0, 1))


def test_a_wide_image_is_cropped_not_stretched(tmp_path):
    from PIL import Image

    img = np.zeros((20, 60), dtype=np.uint8)
    img[:, 20:40] = 255  # black | white | black thirds: a stretched image keeps the black, a centre crop does not
    Image.fromarray(img, "L").save(tmp_path / "wide.png")
    assert decode_image(tmp_path / "wide.png", 1, 10)[:, :, 1:-1].min() == 255


def _image_folder(root, modes: dict[str, str]) -> None:
    """DIR/{train,val}/CLASS/NAME.png in the given PIL modes (name -> mode), two classes."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for name, mode in modes.items():
                shape = (30, 40, 3) if mode == "RGB" else (30, 40)
                Image.fromarray(np.full(shape, 99, np.uint8), mode).save(root / split / cls / f"{name}.png")


def test_channels_come_from_every_file_and_a_mixed_set_is_refused(tmp_path):
    _image_folder(tmp_path, {"0_gray": "L", "1_rgb": "RGB", "2_rgb": "RGB"})  # the first file is grayscale
    with pytest.raises(UserError, match=r"mixes 4 grayscale images .* and 8 colour ones .* imagefolder-rgb:"):
        load_dataset(f"imagefolder:{tmp_path}", search_size=1, load_size=16)
    rgb = load_dataset(f"imagefolder-rgb:{tmp_path}", search_size=1, load_size=16)
    gray = load_dataset(f"imagefolder-gray:{tmp_path}", search_size=1, load_size=16)
    assert (rgb.in_channels, gray.in_channels) == (3, 1)
    assert rgb.test.get(torch.arange(3))[0].shape == (3, 3, 16, 16)
    assert "resize the shorter side to 16 px" in rgb.preprocessing(12)["decode"] and rgb.describe()["decode_size"] == 16


@pytest.mark.parametrize("spec, words", [
    ("mnist", "unknown dataset 'mnist'"),
    ("fashion-mnist:/nonexistent", "/nonexistent does not exist; install it with"),
    ("cifar10", "needs the folder"),
    ("cifar10:/nonexistent", "CIFAR-10 not found"),
    ("imagefolder:/nonexistent", "is missing"),
])
def test_missing_or_unknown_datasets_explain_themselves(spec, words):
    with pytest.raises(UserError, match=words):
        load_dataset(spec)


def test_truncated_idx_file_is_named(tmp_path):
    import gzip
    import shutil

    from qnas_cli.data import FASHION_MNIST_DIR

    for f in FASHION_MNIST_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(raw[:1000])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_limited_evaluations_draw_every_class_from_a_class_sorted_image_folder(tmp_path):
    """An image folder lists files class by class: a limited evaluation, a calibration set and a
    search-fitness subset are seeded, class-stratified and the same every time, never the first N."""
    from PIL import Image

    from qnas_cli.data import calibration_indices, ordered_batches, stratified_indices

    rng = np.random.default_rng(0)
    classes = ("a", "b", "c", "d", "e")
    for split, n in (("train", 12), ("val", 8)):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", search_size=10, load_size=8)
    assert ds.test.labels.tolist() == sorted(ds.test.labels.tolist())  # class by class, as on disk
    labels = torch.cat([y for _, y in ordered_batches(ds.test, 4, limit=10)])
    assert torch.bincount(labels, minlength=5).tolist() == [2, 2, 2, 2, 2]
    again = torch.cat([y for _, y in ordered_batches(ds.test, 3, limit=10)])
    assert labels.tolist() == again.tolist()
    for source, count in ((ds.train, 25), (ds.search, 5), (ds.test, 7)):
        idx = stratified_indices(source, count, seed=3)
        counts = torch.bincount(source.labels[idx], minlength=5).double()
        share = count * torch.bincount(source.labels, minlength=5).double() / len(source)
        assert len(set(idx.tolist())) == count and (counts - share).abs().max() <= 1  # each class its share
        assert torch.equal(idx, calibration_indices(source, count, seed=3))
    assert not torch.equal(stratified_indices(ds.train, 25, 0), stratified_indices(ds.train, 25, 1))
