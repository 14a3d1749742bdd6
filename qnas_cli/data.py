"""Real image datasets, read offline, with deterministic splits, batches and augmentation.

``--data`` specs:
- ``fashion-mnist`` (default) or ``fashion-mnist:DIR``: the IDX files of Debian's
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``cifar10:DIR``: the standard ``cifar-10-batches-py`` folder (DIR may be it or its parent).
- ``imagefolder:DIR``: ``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*``, any size, RGB or grayscale
  (decided from all the files; a mixed set needs ``imagefolder-rgb:DIR`` or ``imagefolder-gray:DIR``,
  which convert every image). Every file is decoded by one recipe, ``decode_image``.

The training set is split once, with a fixed seed that does not depend on the training seed,
into ``train`` and a held-out ``search`` split (what search ranks subnets on; never the test set).
Every batch is a pure function of (seed, epoch, step, rank): resuming replays the same data.
"""
from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "install it with: sudo apt-get install dataset-fashion-mnist (or pass fashion-mnist:DIR)"
SPLIT_SEED = 20240601  # fixed: the search split must not move when the training seed does
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ImageSource:
    """Images as uint8 (N, C, H, W) batches, read on demand; ``labels`` (N,) without decoding."""

    labels: Tensor

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class TensorSource(ImageSource):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels  # uint8 (N, C, H, W), int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[idx], self.labels[idx]


class FileSource(ImageSource):
    """Image files, decoded with PIL and resized to ``size`` x ``size`` when read."""

    def __init__(self, files: list[Path], labels: list[int], channels: int, size: int) -> None:
        self.files, self.labels, self.channels, self.size = files, torch.tensor(labels), channels, size

    def __len__(self) -> int:
        return len(self.files)

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.empty(len(idx), self.channels, self.size, self.size, dtype=torch.uint8)
        for k, i in enumerate(idx.tolist()):
            out[k] = torch.from_numpy(decode_image(self.files[i], self.channels, self.size))
        return out, self.labels[idx]


def decode_image(path: Path, channels: int, size: int) -> np.ndarray:
    """The one decode recipe for image files, torchvision's evaluation convention: convert to gray
    or RGB, resize the shorter side to ``size`` (bilinear; PIL antialiases when shrinking), then
    centre-crop ``size`` x ``size``. Aspect ratio is kept. Returns uint8 (C, size, size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            # torchvision.transforms.Resize(size): the shorter side becomes size, the longer is truncated
            new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            im = im.resize(new, Image.BILINEAR)
            left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))  # CenterCrop's offsets
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except OSError as e:  # PIL's UnidentifiedImageError included
        raise UserError(f"cannot read image {path}: {e}") from None
    return arr.reshape(size, size, -1).transpose(2, 0, 1).copy()


class Subset(ImageSource):
    def __init__(self, base: ImageSource, indices: Tensor) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.get(self.indices[idx])

    @property
    def labels(self) -> Tensor:
        return self.base.labels[self.indices]


@dataclass
class Dataset:
    spec: str
    train: ImageSource
    search: ImageSource
    test: ImageSource
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, ...]
    pad: int  # random-crop padding for augmentation (pixels of the stored size)
    flip: bool
    decode_size: int  # side of the stored (or decoded) square images, before to_input resizes them
    decode: str  # how a stored image was made from the file, in words (the export report repeats it)
    class_names: tuple[str, ...] = ()  # what each label means (the exported file's labels)

    def describe(self) -> dict:
        return {
            "spec": self.spec, "num_classes": self.num_classes, "in_channels": self.in_channels,
            "train": len(self.train), "search": len(self.search), "test": len(self.test),
            "mean": list(self.mean), "std": list(self.std), "decode_size": self.decode_size,
        }

    def preprocessing(self, resolution: int) -> dict:
        """Every step from an image file to the network's input at ``resolution``: what a deployer reproduces."""
        resize = "none" if resolution == self.decode_size else \
            f"bilinear, antialiased (torch.nn.functional.interpolate), {self.decode_size} -> {resolution} px"
        return {"decode": self.decode, "resize": resize,
                "normalisation": {"mean": list(self.mean), "std": list(self.std), "of": "pixels / 255"}}


# The datasets' own class names, in label order (Fashion-MNIST's README, CIFAR-10's batches.meta).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGEFOLDER_CHANNELS = {"imagefolder": None, "imagefolder-rgb": 3, "imagefolder-gray": 1}  # None: from the files


def load_dataset(spec: str, search_size: int | None = None, load_size: int = 32) -> Dataset:
    """Parse a ``--data`` spec and open the dataset. ``load_size``: decode size for image folders."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        images, labels, test_images, test_labels = _read_fashion_mnist(Path(arg) if arg else FASHION_MNIST_DIR)
        return _split(spec, TensorSource(images, labels), TensorSource(test_images, test_labels), FASHION_MNIST_CLASSES, 1,
                      (0.2860,), (0.3530,), pad=2, flip=True, search_size=search_size,
                      decode_size=images.shape[-1], decode="the dataset's 28x28 grayscale images as stored")
    if kind == "cifar10":
        if not arg:
            raise UserError("--data cifar10 needs the folder: cifar10:DIR (the 'cifar-10-batches-py' folder)")
        train, test = _read_cifar10(Path(arg))
        return _split(spec, train, test, CIFAR10_CLASSES, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                      pad=4, flip=True, search_size=search_size, decode_size=32,
                      decode="the dataset's 32x32 RGB images as stored")
    if kind in IMAGEFOLDER_CHANNELS:
        if not arg:
            raise UserError(f"--data {kind} needs the folder: {kind}:DIR (with DIR/train/CLASS/* and DIR/val/CLASS/*)")
        train, test, classes, channels = _read_imagefolder(Path(arg), load_size, IMAGEFOLDER_CHANNELS[kind])
        mean, std = ((0.5,), (0.25,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return _split(spec, train, test, classes, channels, mean, std, pad=load_size // 8, flip=True,
                      search_size=search_size, decode_size=load_size, decode=_decode_words(channels, load_size))
    raise UserError(f"--data: unknown dataset {kind!r} (use fashion-mnist, fashion-mnist:DIR, cifar10:DIR, imagefolder:DIR, "
                    "imagefolder-rgb:DIR or imagefolder-gray:DIR)")


def _decode_words(channels: int, size: int) -> str:
    """``decode_image`` in words."""
    return (f"PIL: convert to {'grayscale (L)' if channels == 1 else 'RGB'}, resize the shorter side to {size} px "
            f"(bilinear), centre crop {size}x{size}")


def _split(spec: str, full: ImageSource, test: ImageSource, classes: tuple[str, ...], channels: int, mean, std,
           pad: int, flip: bool, search_size: int | None, decode_size: int, decode: str) -> Dataset:
    n = len(full)
    search_size = search_size or max(1, min(5000, n // 10))  # 5,000 of Fashion-MNIST's or CIFAR's 60k/50k
    if not 0 < search_size < n:
        raise UserError(f"search split of {search_size} images does not fit a training set of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return Dataset(spec, Subset(full, perm[search_size:].sort().values), Subset(full, perm[:search_size].sort().values),
                   test, len(classes), channels, tuple(mean), tuple(std), pad, flip, decode_size, decode, tuple(classes))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise UserError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"Fashion-MNIST not found: no {stem}[.gz] in {folder}; {FASHION_MNIST_HINT}")


def _read_fashion_mnist(folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not folder.is_dir():
        raise UserError(f"Fashion-MNIST not found: {folder} does not exist; {FASHION_MNIST_HINT}")
    arrays = [_read_idx(_find(folder, s)) for s in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    tr_x, tr_y, te_x, te_y = (torch.from_numpy(a.copy()) for a in arrays)
    if (tr_x.dim(), te_x.dim(), tr_y.dim(), te_y.dim()) != (3, 3, 1, 1) or (len(tr_x), len(te_x)) != (len(tr_y), len(te_y)) \
            or max(tr_y.max(), te_y.max()) > 9:
        raise UserError(f"Fashion-MNIST in {folder} is inconsistent: {tuple(tr_x.shape)} / {tuple(te_x.shape)} images "
                        f"for {tuple(tr_y.shape)} / {tuple(te_y.shape)} labels (train / test), labels must be 0-9")
    return tr_x[:, None], tr_y.long(), te_x[:, None], te_y.long()


def _read_cifar10(folder: Path) -> tuple[TensorSource, TensorSource]:
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / name
        if not path.is_file():
            raise UserError(f"CIFAR-10 not found: no {name} in {folder} (expected the 'cifar-10-batches-py' folder)")
        try:  # the official pickles hold only numpy arrays and lists; refuse anything else
            with open(path, "rb") as f:
                d = _SafeUnpickler(f, encoding="bytes").load()
            return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways; all mean a bad file
            raise UserError(f"{path} is not a CIFAR-10 batch file: {type(e).__name__}: {e}") from None
    parts = [load(f"data_batch_{i}") for i in range(1, 6)]
    test = load("test_batch")
    train = TensorSource(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                         torch.from_numpy(np.concatenate([p[1] for p in parts])).long())
    return train, TensorSource(torch.from_numpy(test[0].copy()), torch.from_numpy(test[1]).long())


class _SafeUnpickler(pickle.Unpickler):
    """Only numpy's array reconstruction is allowed: a CIFAR file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name}")


def _read_imagefolder(root: Path, size: int, channels: int | None) -> tuple[FileSource, FileSource, list[str], int]:
    def scan(split: str, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"image folder: {folder} is missing (expected {root}/train/CLASS/* and {root}/val/CLASS/*)")
        names = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not names:
            raise UserError(f"image folder: {folder} has no class subfolders")
        files, labels = [], []
        for k, name in enumerate(names):
            found = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in IMAGE_EXTS) if (folder / name).is_dir() else []
            files += found
            labels += [k] * len(found)
        if not files:
            raise UserError(f"image folder: no images ({', '.join(IMAGE_EXTS)}) under {folder}")
        return files, labels, names

    tr_files, tr_labels, classes = scan("train", None)
    va_files, va_labels, _ = scan("val", classes)
    channels = channels or _channels_of(root, tr_files + va_files)
    return (FileSource(tr_files, tr_labels, channels, size), FileSource(va_files, va_labels, channels, size),
            classes, channels)


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _channels_of(root: Path, files: list[Path]) -> int:
    """1 or 3, from every file's header (not the first file's alone); a mixed set is refused."""
    from PIL import Image

    gray, colour = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                (gray if im.mode in GRAY_MODES else colour).append(f)
        except OSError as e:  # PIL's UnidentifiedImageError included
            raise UserError(f"cannot read image {f}: {e}") from None
    if gray and colour:
        raise UserError(f"image folder {root} mixes {len(gray)} grayscale images (e.g. {gray[0]}) and {len(colour)} colour "
                        f"ones (e.g. {colour[0]}): say how to convert them, --data imagefolder-rgb:{root} or "
                        f"imagefolder-gray:{root}")
    return 1 if gray else 3


# ---- batches ---------------------------------------------------------------------------------

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[Tensor]:
    """This rank's index batches for one epoch: a seeded permutation, sharded, last partial batch dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = perm[rank::world]
    steps = len(mine) // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def augment(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop with zero padding and horizontal flip, per image, from ``gen``. x: uint8 (N, C, H, W)."""
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def to_input(x: Tensor, data: Dataset, resolution: int) -> Tensor:
    """uint8 (N, C, H, W) -> normalised float at ``resolution`` (bilinear, antialiased)."""
    x = x.float().div_(255.0)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


def ordered_batches(source: ImageSource, batch_size: int, limit: int | None = None, seed: int = 0):
    """Evaluation batches: every image in file order, or, with ``limit``, the seeded
    class-stratified subset of ``limit`` images (``stratified_indices``), never the first files:
    an image folder lists its files class by class."""
    if limit is None or limit >= len(source):
        idx = torch.arange(len(source))
    else:
        idx = stratified_indices(source, limit, seed).sort().values
    for i in range(0, len(idx), batch_size):
        yield source.get(idx[i : i + batch_size])


def stratified_indices(source: ImageSource, count: int, seed: int = 0) -> Tensor:
    """``count`` images, each class in proportion to its share, drawn by a seeded permutation:
    the same subset for the same source, count and seed.

    Every image gets its rank within its class in the permuted order; ranking all images by
    (rank + 1/2) / class size interleaves the classes evenly, and the first ``count`` are taken.
    """
    count = min(count, len(source))
    perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    ranked = source.labels[perm]
    position = torch.empty(len(perm), dtype=torch.float64)
    for c in torch.unique(ranked).tolist():
        where = (ranked == c).nonzero().flatten()
        position[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    return perm[torch.sort(position, stable=True).indices[:count]]


def calibration_indices(source: ImageSource, count: int, seed: int = 0) -> Tensor:
    """The fixed, seeded, class-stratified images of BN calibration and scale initialisation."""
    return stratified_indices(source, count, seed)
