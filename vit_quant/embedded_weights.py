"""The embedded ViT's weights file: float16 safetensors beside a JSON record holding its recipe and SHA-256.

The repository ships one (:data:`SHIPPED_WEIGHTS`, written by ``make train-embedded-vit``); any file written by
:mod:`vit_quant.train_embedded` loads the same way (``--checkpoint FILE.safetensors`` with ``model: embedded``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer

from common.files import HISTORY, atomic_write_set, json_text, move_to_history, write_text
from vit_quant.data import DEFAULT_FASHION_MNIST_DIR
from vit_quant.embedded_model import EmbeddedRecipe

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "embedded_vit.safetensors"
"""The embedded model the runs use unless given another file."""


class EmbeddedWeightsError(ValueError):
    """A weights file or its record is missing, unreadable, or does not match."""


def record_path(weights: Path) -> Path:
    """The JSON record beside ``weights`` (``X.safetensors`` -> ``X.json``)."""
    return weights.with_suffix(".json")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fashion_mnist_identity(data_path: str | Path | None) -> dict[str, str]:
    """SHA-256 of each Fashion-MNIST file in ``data_path`` (default: the Debian package's folder)."""
    folder = Path(data_path) if data_path else DEFAULT_FASHION_MNIST_DIR
    return {path.name: sha256_of(path) for path in sorted(folder.glob("*-ubyte*"))}


def write_embedded(model: torch.nn.Module, record: dict[str, Any], weights: Path) -> list[Path]:
    """Write ``model``'s state in float16 to ``weights`` and ``record`` plus the file's SHA-256 beside it, as
    one set (both complete before either appears); a pair already there is first moved to ``history/`` beside
    it. Returns where an earlier pair went."""
    tensors = {name: value.detach().to("cpu", torch.float16).contiguous() for name, value in model.state_dict().items()}
    data = safetensors.torch.save(tensors)
    record = {**record, "weights_sha256": hashlib.sha256(data).hexdigest()}
    moved = move_to_history([weights, record_path(weights)], weights.parent / HISTORY)
    atomic_write_set([(weights, lambda tmp: Path(tmp).write_bytes(data)),
                      (record_path(weights), lambda tmp: write_text(tmp, json_text(record)))])
    return moved


def read_record(weights: Path) -> dict[str, Any]:
    """The record beside ``weights``; :class:`EmbeddedWeightsError` naming the file when it is missing or bad."""
    path = record_path(weights)
    if not weights.is_file() or not path.is_file():
        raise EmbeddedWeightsError(
            f"{weights}: no embedded ViT weights there (with {path.name} beside them); "
            "train them with `make train-embedded-vit` (python -m vit_quant.train_embedded)")
    try:
        record = json.loads(path.read_text())
        EmbeddedRecipe(**record["recipe"])
    except (ValueError, KeyError, TypeError) as error:
        raise EmbeddedWeightsError(f"{path}: not a record written by vit_quant.train_embedded ({error})") from None
    return record


def checked_record(weights: Path = SHIPPED_WEIGHTS) -> dict[str, Any]:
    """The record beside ``weights`` once the file's SHA-256 matches it; :class:`EmbeddedWeightsError` naming
    the file otherwise."""
    record = read_record(weights)
    if sha256_of(weights) != record.get("weights_sha256"):
        raise EmbeddedWeightsError(f"{weights}: SHA-256 differs from the one in {record_path(weights).name} "
                                   "(the file was changed or damaged; retrain with `make train-embedded-vit`)")
    return record


def load_embedded(weights: Path = SHIPPED_WEIGHTS) -> tuple[VisionTransformer, dict[str, Any]]:
    """The model in ``weights`` (float32, eval mode, CPU) and its record, after :func:`checked_record`."""
    record = checked_record(weights)
    model = EmbeddedRecipe(**record["recipe"]).build_model()
    state = safetensors.torch.load_file(str(weights))
    model.load_state_dict({name: value.float() for name, value in state.items()}, strict=True)
    return model.eval(), record
