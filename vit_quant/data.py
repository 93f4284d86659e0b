"""Image data for the ViT experiments: Fashion-MNIST (the offline default) and ImageNet.

Fashion-MNIST is read straight from its four IDX files (the format of the original MNIST
distribution, parsed here with ``struct``/``numpy``). Debian ships them in the package
``dataset-fashion-mnist`` under :data:`DEFAULT_FASHION_MNIST_DIR`; any folder holding the
four files (gzipped or plain) works as well.

ImageNet is for users who have it locally: an ``ImageFolder`` tree with ``train/`` and
``val/`` sub-folders, preprocessed with timm's evaluation transform for the model.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Mean and (population) standard deviation of all 60,000 x 28 x 28 Fashion-MNIST *train*
#: pixels after scaling to [0, 1]; computed from the data as 0.286041 and 0.353024.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
#: Value of a black (background) pixel after normalization, used to pad images.
FASHION_MNIST_BACKGROUND = -FASHION_MNIST_MEAN / FASHION_MNIST_STD

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_HOW_TO_GET = (
    "Run `make data-fashion-mnist` (or `bash vit_quant/get_fashion_mnist.sh`; installs the Debian package "
    f"dataset-fashion-mnist, files in {DEFAULT_FASHION_MNIST_DIR}), or download the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) from the Fashion-MNIST project (github.com/zalandoresearch/"
    "fashion-mnist) into a folder and pass it with --data_path."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or one of its files is missing; the message says how to get it."""


class IdxFormatError(ValueError):
    """A file is not a valid IDX file (bad magic number, truncated, wrong shape)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) into a native-endian array.

    The header is a 4-byte magic number ``00 00 <type code> <number of dims>`` followed by
    one big-endian uint32 per dimension; the data follow in big-endian C order.
    Raises :class:`IdxFormatError` naming the file if it is corrupt.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero_a, zero_b, type_code, ndim = struct.unpack(">BBBB", raw[:4])
    if zero_a or zero_b or type_code not in _IDX_DTYPES:
        magic = struct.unpack(">I", raw[:4])[0]
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{magic:08x} (not an IDX file?)")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise IdxFormatError(
            f"{path}: IDX header announces dims {dims} ({expected} data bytes) "
            f"but the file holds {len(raw) - header_len} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header_len)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    """Whole content of ``path``, decompressed when it ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError) as err:
        raise IdxFormatError(f"{path}: corrupt gzip stream ({err})") from err


def find_idx_file(folder: str | Path, stem: str) -> Path:
    """Path of ``<folder>/<stem>.gz`` or else ``<folder>/<stem>``; raises if neither exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST folder {folder} does not exist. {_HOW_TO_GET}")
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"Fashion-MNIST file {folder / stem}[.gz] is missing in {folder}. {_HOW_TO_GET}")


def check_fashion_mnist(data_path: str | Path | None = None) -> Path:
    """The Fashion-MNIST folder, after checking that its four files are there (nothing is read yet); the error
    names ``data_path`` when the folder came from it."""
    folder = Path(data_path) if data_path is not None else DEFAULT_FASHION_MNIST_DIR
    try:
        for stems in _SPLIT_FILES.values():
            for stem in stems:
                find_idx_file(folder, stem)
    except DatasetNotFoundError as error:
        if data_path is None:
            raise
        raise DatasetNotFoundError(f"data_path: {error}") from None
    return folder


def check_imagenet(data_path: str | Path) -> Path:
    """The ImageNet root, after checking that it holds ``train/`` and ``val/`` folders."""
    root = Path(data_path)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DatasetNotFoundError(
                f"ImageNet folder {root / sub} does not exist: --data_path must point to an ImageNet "
                "root holding train/ and val/ in ImageFolder layout (one sub-folder per class)."
            )
    return root


class LabeledImages(TensorDataset):
    """In-memory image classification split.

    Attributes:
        images: float32 [N, C, H, W], normalized.
        labels: int64 [N], class indices into ``classes``.
        classes: class names.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"expected images [N,C,H,W] and labels [N], got {images.shape}, {labels.shape}")
        super().__init__(images, labels)
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)


def normalize_fashion_mnist(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels [N, 28, 28] in 0..255 -> float32 [N, 1, 28, 28] standardized with the train stats."""
    images = torch.from_numpy(pixels).to(torch.float32).div_(255.0)
    return images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)


def load_fashion_mnist(split: str = "train", data_path: str | Path | None = None) -> LabeledImages:
    """Load the ``"train"`` (60k) or ``"test"`` (10k) Fashion-MNIST split from IDX files.

    Args:
        split: ``"train"`` or ``"test"``.
        data_path: folder with the four IDX files; defaults to :data:`DEFAULT_FASHION_MNIST_DIR`.

    Returns:
        images float32 [N, 1, 28, 28] (normalized), labels int64 [N], the 10 class names.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    folder = Path(data_path) if data_path is not None else DEFAULT_FASHION_MNIST_DIR
    image_file, label_file = (find_idx_file(folder, stem) for stem in _SPLIT_FILES[split])
    pixels, labels = read_idx(image_file), read_idx(label_file)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise IdxFormatError(f"{image_file}: expected uint8 images [N, H, W], got {pixels.dtype} {pixels.shape}")
    if labels.shape != (pixels.shape[0],) or labels.dtype != np.uint8:
        raise IdxFormatError(
            f"{label_file}: expected {pixels.shape[0]} uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IdxFormatError(f"{label_file}: label {labels.max()} out of range 0..9")
    return LabeledImages(
        normalize_fashion_mnist(pixels), torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES
    )


def calibration_images(dataset: Dataset, n: int = 128, seed: int = 0) -> torch.Tensor:
    """``n`` distinct images drawn at random (seeded, so deterministic) from ``dataset``.

    ``dataset[i]`` must return ``(image, label)`` with image a tensor [C, H, W].
    Returns float32 [n, C, H, W]; the same ``(dataset, n, seed)`` always gives the same images.
    """
    size = len(dataset)
    if not 0 < n <= size:
        raise ValueError(f"n must be in 1..{size} (dataset size), got {n}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(size, generator=generator)[:n]
    if isinstance(dataset, LabeledImages):
        return dataset.images[indices].clone()
    return torch.stack([dataset[int(i)][0] for i in indices])


@dataclass
class ImageNetData:
    """ImageNet pieces for post-training quantization.

    Attributes:
        calibration: float32 [calib_size, 3, H, W], seeded random train images, eval transform.
        val_loader: the whole validation set in file order, batches of (images [B, 3, H, W], labels [B]).
        data_config: timm's resolved preprocessing config (input_size, mean, std, crop_pct, ...).
    """

    calibration: torch.Tensor
    val_loader: DataLoader
    data_config: dict


def imagenet_loaders(
    data_path: str | Path,
    model: torch.nn.Module,
    *,
    calib_size: int = 128,
    batch_size: int = 64,
    workers: int = 4,
    seed: int = 0,
) -> ImageNetData:
    """Calibration images and a validation loader from ``<data_path>/train`` and ``<data_path>/val``.

    Both use timm's evaluation transform for ``model`` (``resolve_data_config`` +
    ``create_transform``: resize, center crop, normalize with the model's mean/std).
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = check_imagenet(data_path)
    data_config = resolve_data_config({}, model=model)
    transform = create_transform(**data_config, is_training=False)
    train_set = ImageFolder(str(root / "train"), transform=transform)
    val_set = ImageFolder(str(root / "val"), transform=transform)
    val_loader = DataLoader(
        val_set, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
    return ImageNetData(calibration_images(train_set, calib_size, seed), val_loader, data_config)
