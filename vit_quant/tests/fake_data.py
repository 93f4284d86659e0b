"""Writers of small fake datasets (IDX files) and embedded-model weights for the vit_quant tests."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from vit_quant.embedded_model import EmbeddedRecipe
from vit_quant.embedded_weights import write_embedded

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write ``array`` as an IDX file (big-endian header + data), gzipped to ``<path>.gz`` if ``gz``.

    Returns the path written.
    """
    header = struct.pack(">BBBB", 0, 0, _TYPE_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_fashion_folder(
    folder: Path, n_train: int = 40, n_test: int = 20, *, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fake Fashion-MNIST folder (random uint8 pixels [N, 28, 28], labels 0..9).

    Returns the train (pixels, labels) written.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", pixels, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        written[prefix] = (pixels, labels)
    return written["train"]


TINY_RECIPE = EmbeddedRecipe(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, epochs=1, batch_size=16)
"""A tiny embedded ViT (block linears of 32 and 64 inputs) for tests that run the pipeline."""


def write_tiny_embedded(weights: Path, recipe: EmbeddedRecipe = TINY_RECIPE, seed: int = 0) -> Path:
    """A randomly initialized ``recipe`` model written as :mod:`vit_quant.train_embedded` writes one (float16
    weights + record); returns ``weights``."""
    torch.manual_seed(seed)
    record = {"recipe": dataclasses.asdict(recipe), "test_top1": 10.0}
    write_embedded(recipe.build_model(), record, weights)
    return weights
