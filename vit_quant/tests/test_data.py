"""Tests of vit_quant.data on small IDX files and a tiny ImageFolder tree written here."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import build_parser
from vit_quant import data
from vit_quant.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetNotFoundError,
    IdxFormatError,
    LabeledImages,
    calibration_images,
    check_fashion_mnist,
    imagenet_loaders,
    load_fashion_mnist,
    read_idx,
)
from vit_quant.settings import VitRunConfig
from vit_quant.tests.fake_data import write_fashion_folder, write_idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path: Path, gz: bool, dtype: type) -> None:
    offset = 0 if dtype is np.uint8 else -7  # negative values for the signed/float types
    array = (np.arange(30) + offset).reshape(2, 3, 5).astype(dtype)
    back = read_idx(write_idx(tmp_path / "x-idx3", array, gz=gz))
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_read_idx_bad_magic_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(struct.pack(">I", 0x12345678) + b"\0" * 16)
    with pytest.raises(IdxFormatError, match=r"bad-idx1-ubyte.*magic"):
        read_idx(bad)


def test_read_idx_truncated_and_bad_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t-idx1-ubyte", np.arange(10, dtype=np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IdxFormatError, match="data bytes"):
        read_idx(path)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match=r"broken\.gz"):
        read_idx(broken)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_shapes_and_normalization(tmp_path: Path, gz: bool) -> None:
    pixels, labels = write_fashion_folder(tmp_path, gz=gz)
    train = load_fashion_mnist("train", tmp_path)
    assert isinstance(train, LabeledImages)
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    torch.testing.assert_close(train.labels, torch.from_numpy(labels.astype(np.int64)))
    expected = (torch.from_numpy(pixels).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(train.images[:, 0], expected)
    assert train.classes == FASHION_MNIST_CLASSES and len(train.classes) == 10
    image, label = train[3]
    assert image.shape == (1, 28, 28) and int(label) == int(labels[3])
    assert len(load_fashion_mnist("test", tmp_path)) == 20


def _vit_flags() -> set[str]:
    parser = build_parser(VitRunConfig, "vit")
    return {option for action in parser._actions for option in action.option_strings}


def test_missing_folder_and_file_errors_say_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"does not exist.*make data-fashion-mnist") as info:
        load_fashion_mnist("train", tmp_path / "nowhere")
    flags = set(re.findall(r"--[a-z_]+", str(info.value)))
    assert flags == {"--data_path"} and flags <= _vit_flags()  # the hint names a flag the entry point has
    write_fashion_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*--data_path"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
        check_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def test_label_count_mismatch_is_rejected(tmp_path: Path) -> None:
    write_fashion_folder(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8), gz=False)
    with pytest.raises(IdxFormatError, match="labels"):
        load_fashion_mnist("train", tmp_path)


@pytest.mark.skipif(not data.DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_documented_constants() -> None:
    train = load_fashion_mnist("train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert abs(train.images.mean().item()) < 1e-3
    assert abs(train.images.std().item() - 1.0) < 1e-3
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_calibration_images_deterministic_subset(tmp_path: Path) -> None:
    write_fashion_folder(tmp_path, n_train=50)
    train = load_fashion_mnist("train", tmp_path)
    a, b = calibration_images(train, n=16, seed=3), calibration_images(train, n=16, seed=3)
    assert a.shape == (16, 1, 28, 28)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, calibration_images(train, n=16, seed=4))
    # Distinct rows of the dataset, and the generic (non-tensor) path picks the same ones.
    flat = train.images.flatten(1)
    rows = [int(torch.nonzero((flat == img.flatten()).all(1))[0]) for img in a]
    assert len(set(rows)) == 16
    generic = torch.utils.data.Subset(train, range(len(train)))
    torch.testing.assert_close(calibration_images(generic, n=16, seed=3), a)
    with pytest.raises(ValueError):
        calibration_images(train, n=51)


def _write_image_tree(root: Path, n_per_class: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, ext in (("n01", "JPEG"), ("n02", "png")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"img{i}.{ext}")


def test_imagenet_loaders_on_tiny_imagefolder(tmp_path: Path) -> None:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN

    _write_image_tree(tmp_path, n_per_class=3, size=(40, 50))
    # A real timm config (DeiT: 224 px, bicubic, crop_pct 0.875) on a 1-block model, random init.
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    got = imagenet_loaders(tmp_path, model, calib_size=4, batch_size=4, workers=0, seed=1)
    assert got.calibration.shape == (4, 3, 224, 224) and got.calibration.dtype == torch.float32
    assert got.data_config["input_size"] == (3, 224, 224)
    assert tuple(got.data_config["mean"]) == IMAGENET_DEFAULT_MEAN
    again = imagenet_loaders(tmp_path, model, calib_size=4, batch_size=4, workers=0, seed=1)
    torch.testing.assert_close(got.calibration, again.calibration)
    batches = list(got.val_loader)
    assert [len(y) for _, y in batches] == [4, 2]
    assert batches[0][0].shape == (4, 3, 224, 224)
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1]


def test_imagenet_loaders_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"val"):
        imagenet_loaders(tmp_path, torch.nn.Linear(1, 1), batch_size=1, workers=0)
