"""Vision datasets for the STR experiments (Kusupati et al., ICML 2020, section 5.1).

- ``fashion_mnist`` (default): a class-balanced subset of Fashion-MNIST (Xiao, Rasul and Vollgraf,
  Zalando 2017, MIT) shipped in ``vision/assets/`` (500 train + 100 test images per class, 28x28
  grayscale). It is written once as an ImageFolder tree of PNGs in the cache, so the default run
  goes through the same ImageFolder path as ImageNet.
- ``imagenet``: ImageFolder ``train/`` and ``val/`` with the paper's transforms
  (RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224), ImageNet mean and std).
- ``cifar10``: torchvision's CIFAR10 on a locally present copy (never downloads).
- ``imagefolder``: any tree with ``train/<class>/*`` and ``val/<class>/*``.

Images are opened with PIL and converted to "RGB" (or "L" for grayscale datasets), so grayscale,
palette and RGBA files load (alpha is dropped). An unreadable or truncated image raises
``UnreadableImageError`` naming the file; ``skip_bad_images=True`` instead decodes every file once
at construction, drops the unreadable ones and warns with their count.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from strlowrank.method.cache import build_once, cache_root

DATASETS = ("fashion_mnist", "imagenet", "cifar10", "imagefolder")
ASSET = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"
# Folder names keep the original label order under ImageFolder's alphabetical class sort.
FASHION_CLASSES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
FASHION_MEAN_STD = ((0.2860,), (0.3530,))  # Fashion-MNIST train set, pixels scaled to [0, 1]
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class UnreadableImageError(OSError):
    """An image file that PIL cannot open or decode (truncated, corrupt, not an image).

    A DataLoader worker re-raises it in the main process as ``UnreadableImageError("Caught ...
    Original Traceback ...")``; only the original one-line message is kept, so that the command
    line still prints one line with train.workers > 0.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# --------------------------------------------------------------------------- Fashion-MNIST asset


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): 2 zero bytes, a type byte (0x08 = uint8), a byte with
    the number of dims d, d big-endian int32 sizes, then the data in C order."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(x) for x in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def _find_idx(idx_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise ValueError(f"no {stem}[.gz] in {idx_dir}")


def _balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class drawn without replacement, sorted."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(int(labels.max()) + 1)
    ]
    return np.sort(np.concatenate(picks))


def build_subset_from_idx(
    idx_dir: str | Path,
    out_path: str | Path,
    per_class_train: int = 500,
    per_class_test: int = 100,
    seed: int = 0,
) -> Path:
    """Make the shipped class-balanced Fashion-MNIST subset from the original IDX files.

    ``idx_dir`` holds train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte (optionally .gz), e.g.
    /usr/share/datasets/fashion-mnist from Debian's ``dataset-fashion-mnist``. Writes a compressed
    npz with x_train [N, 28, 28] uint8, y_train [N] uint8, x_test, y_test, the source indices
    train_index / test_index into the original files, and the class folder names.
    """
    idx_dir, rng = Path(idx_dir), np.random.default_rng(seed)
    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", per_class_train),
        ("test", "t10k", per_class_test),
    ):
        x = read_idx(_find_idx(idx_dir, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find_idx(idx_dir, f"{prefix}-labels-idx1-ubyte"))
        index = _balanced_indices(y, per_class, rng)
        arrays |= {f"x_{split}": x[index], f"y_{split}": y[index], f"{split}_index": index}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, classes=np.array(FASHION_CLASSES), **arrays)
    return out_path


def _write_png_tree(root: Path) -> None:
    """The shipped subset as train/<class>/<i>.png (x_train, y_train) and val/<class>/<i>.png
    (x_test, y_test) under root."""
    with np.load(ASSET) as npz:
        classes = [str(c) for c in npz["classes"]]
        for split, key in (("train", "train"), ("val", "test")):
            for c in classes:
                (root / split / c).mkdir(parents=True)
            for i, (img, label) in enumerate(zip(npz[f"x_{key}"], npz[f"y_{key}"])):
                Image.fromarray(img).save(root / split / classes[label] / f"{i:05d}.png")


def ensure_fashion_mnist_tree(cache_dir: str | Path | None = None) -> Path:
    """Write the shipped subset once as an ImageFolder tree and return its root.

    Location: ``<cache_dir>/fashion_mnist_subset``, where cache_dir defaults to
    `strlowrank.method.cache.cache_root()`. Built with `strlowrank.method.cache.build_once`
    (temporary sibling, renamed into place under an inter-process lock) with the npz's SHA-256 as
    its key, so concurrent runs build it once and a changed asset rebuilds it.
    """
    target = Path(cache_dir or cache_root()) / "fashion_mnist_subset"
    digest = hashlib.sha256(ASSET.read_bytes()).hexdigest()
    return build_once(target, _write_png_tree, key=digest)


# --------------------------------------------------------------------------- image loading


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open ``path`` with PIL, decode it fully and convert to ``mode`` ("RGB" or "L").

    Raises:
        UnreadableImageError: naming the file, if it is truncated, corrupt or not an image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in datasets.folder.IMG_EXTENSIONS


def _check_split(split_dir: Path) -> None:
    """Clear errors for a missing split folder, no class folders, or an empty class folder."""
    if not split_dir.is_dir():
        raise ValueError(f"missing split folder {split_dir} (expected {split_dir}/<class>/<image>)")
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image>)")
    for c in classes:
        if not any(_is_image(f) for f in c.rglob("*")):
            raise ValueError(f"class folder {c} holds no image files")


def _drop_unreadable(ds: datasets.ImageFolder) -> list[str]:
    """Decode every sample once; remove unreadable ones from ``ds`` and return their paths."""
    bad = []
    for path, _ in ds.samples:
        try:
            ds.loader(path)
        except UnreadableImageError:
            bad.append(path)
    if bad:
        bad_set = set(bad)
        keep = [(p, y) for p, y in ds.samples if p not in bad_set]
        ds.samples = ds.imgs = keep
        ds.targets = [y for _, y in keep]
        warnings.warn(
            f"skipped {len(bad)} unreadable images under {ds.root}, e.g. {bad[0]}", stacklevel=3
        )
    return bad


def image_folder_pair(
    root: str | Path,
    train_tf: T.Compose,
    val_tf: T.Compose,
    mode: str = "RGB",
    skip_bad_images: bool = False,
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """ImageFolder datasets for ``root/train`` and ``root/val`` with the same class list."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data directory {root} does not exist")
    for split in ("train", "val"):
        _check_split(root / split)
    loader = partial(load_image, mode=mode)
    train = datasets.ImageFolder(str(root / "train"), train_tf, loader=loader)
    val = datasets.ImageFolder(str(root / "val"), val_tf, loader=loader)
    if train.classes != val.classes:
        raise ValueError(
            f"{root}: train/ and val/ class folders differ: "
            f"{sorted(set(train.classes) ^ set(val.classes))}"
        )
    if skip_bad_images:
        _drop_unreadable(train)
        _drop_unreadable(val)
    return train, val


# --------------------------------------------------------------------------- transforms


def _normalize(mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> list:
    return [T.ToTensor(), T.Normalize(*mean_std)]


def imagenet_transforms(
    image_size: int = 224, mean_std: tuple = IMAGENET_MEAN_STD
) -> tuple[T.Compose, T.Compose]:
    """The paper's transforms: train RandomResizedCrop(size) + flip; val Resize(size * 256/224) +
    CenterCrop(size) (224 -> Resize(256) + CenterCrop(224)); both ToTensor + Normalize."""
    train = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *_normalize(mean_std)]
    )
    resize = round(image_size * 256 / 224)
    val = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *_normalize(mean_std)])
    return train, val


def small_image_transforms(
    image_size: int, native: int, mean_std: tuple, augment: bool = True
) -> tuple[T.Compose, T.Compose]:
    """For 28/32 px data: fit to ``image_size`` (zero-pad an even size gap, else resize), then
    train: RandomCrop(image_size, padding=4) + flip; both: ToTensor + Normalize."""
    gap = image_size - native
    if gap == 0:
        fit = []
    elif gap > 0 and gap % 2 == 0:
        fit = [T.Pad(gap // 2)]
    else:
        fit = [T.Resize((image_size, image_size))]
    aug = [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(fit + aug + _normalize(mean_std)), T.Compose(fit + _normalize(mean_std))


# --------------------------------------------------------------------------- entry point


def _cifar10(root: Path, image_size: int, augment: bool) -> tuple:
    base = root / "cifar-10-batches-py"
    if not base.is_dir():
        raise ValueError(
            f"CIFAR-10 not found: expected {base} (the python version of the dataset, "
            "unpacked; this project never downloads)"
        )
    train_tf, val_tf = small_image_transforms(image_size, 32, CIFAR10_MEAN_STD, augment)
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=False)
        val = datasets.CIFAR10(str(root), train=False, transform=val_tf, download=False)
    except RuntimeError as err:
        raise ValueError(f"CIFAR-10 under {root} is incomplete or corrupted: {err}") from err
    return train, val


def input_size(name: str, image_size: int | None = None) -> int:
    """The model input side of dataset ``name``: ``image_size``, else 28 for fashion_mnist (its
    native size: no padding, about 25% fewer MACs than 32), 32 cifar10, 224 otherwise."""
    return image_size or {"fashion_mnist": 28, "cifar10": 32}.get(name, 224)


def build_datasets(
    name: str = "fashion_mnist",
    root: str | Path | None = None,
    image_size: int | None = None,
    *,
    augment: bool = True,
    grayscale: bool = False,
    skip_bad_images: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, Dataset, int, int]:
    """Build (train_ds, val_ds, num_classes, in_chans) for one of ``DATASETS``.

    Args:
        name: "fashion_mnist" (root None: the shipped subset's cached PNG tree; 1 channel),
            "imagenet", "cifar10" or "imagefolder" (root required).
        root: data directory (ImageFolder datasets: holds train/ and val/).
        image_size: model input side; default 28 for fashion_mnist, 32 cifar10, 224 otherwise.
        augment: train-time augmentation for fashion_mnist / cifar10 (crop + flip).
        grayscale: "imagefolder" only: load as 1-channel "L" images.
        skip_bad_images: ImageFolder datasets: drop unreadable files (decodes all files once).
        cache_dir: where the Fashion-MNIST tree is written (default $STRLOWRANK_CACHE).
    Samples are (tensor [in_chans, image_size, image_size], int label).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "fashion_mnist":
        size = input_size(name, image_size)
        path = Path(root) if root is not None else ensure_fashion_mnist_tree(cache_dir)
        tfs = small_image_transforms(size, 28, FASHION_MEAN_STD, augment)
        train, val = image_folder_pair(path, *tfs, mode="L", skip_bad_images=skip_bad_images)
        return train, val, len(train.classes), 1
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data directory (--data-dir)")
    if name == "cifar10":
        if not Path(root).is_dir():
            raise ValueError(f"data directory {root} does not exist")
        train, val = _cifar10(Path(root), input_size(name, image_size), augment)
        return train, val, 10, 3
    mode = "L" if grayscale and name == "imagefolder" else "RGB"
    mean_std = ((0.5,), (0.5,)) if mode == "L" else IMAGENET_MEAN_STD
    train_tf, val_tf = imagenet_transforms(input_size(name, image_size), mean_std)
    train, val = image_folder_pair(root, train_tf, val_tf, mode, skip_bad_images)
    return train, val, len(train.classes), 1 if mode == "L" else 3


def write_toy_tree(
    root: str | Path,
    classes: int = 3,
    train_per_class: int = 12,
    val_per_class: int = 4,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """A tiny ImageFolder tree of random RGB PNGs whose brightness encodes the class.

    For smoke tests and the notebooks' tiny mode (seconds, not minutes). Existing trees are kept;
    a new one is built once (`strlowrank.method.cache.build_once`).
    """

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for c in range(classes):
                folder = tmp / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    level = 40 + c * 160 // max(classes - 1, 1)
                    img = np.clip(rng.normal(level, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(folder / f"{i}.png")

    return build_once(root, build, key="toy")
