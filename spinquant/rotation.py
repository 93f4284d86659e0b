"""SpinQuant's rotations of a Llama model: learned ``R1`` / ``R2``, online Hadamards ``R3`` / ``R4``.

Liu et al., "SpinQuant: LLM Quantization with Learned Rotations" (2024), built from the shared pieces of
:mod:`common.llama.rotation` (see its docstring for the conventions):

* ``R1`` [hidden, hidden]: the residual-stream rotation (learned);
* ``R2`` [head_dim, head_dim], one per layer: the value/o_proj head rotation (learned);
* ``R3``: a Hadamard on queries and keys after RoPE, only when the K cache is quantized (fixed, online);
* ``R4``: a Hadamard on the down_proj input (fixed, fused into down_proj and applied online).

Unlike QuaRot there is no online rotation of the o_proj input: ``R2`` alone rotates it, head by head.
Both learned rotations start from random Hadamard matrices (:func:`initial_rotation`), which is also the
untrained "QuaRot-style" baseline a SpinQuant run reports beside the learned rotation.

Rotation files (safetensors, "``R.bin``" of the official code): ``R1`` and ``R2.<layer>`` in float64 (the
optimizer's exact orthogonal iterates), optionally the optimizer's ``momentum.R1`` / ``momentum.R2.<layer>``,
and string metadata: the model's sizes (``shape``), the training ``settings``, ``step`` and ``losses``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from common.files import atomic_write
from common.llama.rotation import (
    LlamaShape,
    OnlineTransform,
    check_kv_attention,
    fuse_down_proj_online,
    install_kv_quantizers,
    online_transform,
    prepare_for_rotation,
    rotate_weights_,
)
from common.quant.hadamard import random_hadamard_matrix
from common.quant.quantizers import FULL_PRECISION_BITS

ORTHOGONALITY_TOLERANCE = 1e-4
"""Largest ``max |RᵀR − I|`` accepted in a rotation file (float32-trained rotations reach ~1e-6)."""

_R2_SEED_OFFSET = 1000
_ONLINE_SEED_OFFSET = {"down_proj": 2, "k": 3}


class RotationFileError(ValueError):
    """A rotation file cannot be used with this model (the message names the file and the mismatch)."""


@dataclass
class SpinRotation:
    """The learned rotations of one model, and where training stands.

    Attributes:
        r1: ``R1`` [hidden, hidden], float64, orthogonal.
        r2: one ``R2`` [head_dim, head_dim] per layer, float64, orthogonal.
        step: optimizer steps taken so far.
        losses: the training loss of every step taken (nats per token).
        momentum: the optimizer's momentum buffers (same keys as the file's tensors), for resuming.
    """

    r1: torch.Tensor
    r2: list[torch.Tensor]
    step: int = 0
    losses: list[float] = field(default_factory=list)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"R1": R1, "R2.0": ..., ...}``: the rotation matrices by file key."""
        return {"R1": self.r1, **{f"R2.{i}": r for i, r in enumerate(self.r2)}}


def initial_rotation(shape: LlamaShape, seed: int) -> SpinRotation:
    """Random Hadamard ``R1`` (seed ``seed``) and ``R2`` per layer (seeds ``seed + 1000 + layer``), float64."""
    r1 = random_hadamard_matrix(shape.hidden_size, seed=seed)
    r2 = [random_hadamard_matrix(shape.head_dim, seed=seed + _R2_SEED_OFFSET + i) for i in range(shape.num_layers)]
    return SpinRotation(r1, r2)


def prepare_model(model: LlamaForCausalLM, *, seed: int, k_bits: int, v_bits: int, kv_clip_ratio: float) -> LlamaShape:
    """Make ``model`` ready for ``R1``/``R2``: untie, fold norms, fuse ``R4``, install ``R3`` and KV quantizers.

    Everything here preserves the model's function in full precision (KV quantizers aside). ``R3`` is
    installed when ``k_bits < 16``; KV quantizers when either cache is quantized.
    """
    kv_on = k_bits < FULL_PRECISION_BITS or v_bits < FULL_PRECISION_BITS
    if kv_on:
        check_kv_attention(model)
    shape = prepare_for_rotation(model)
    fuse_down_proj_online(model, online_transform(shape.intermediate_size, seed=seed + _ONLINE_SEED_OFFSET["down_proj"],
                                                  what="R4 (down_proj online rotation)"))
    if kv_on:
        k_rotation: OnlineTransform | None = None
        if k_bits < FULL_PRECISION_BITS:
            k_rotation = online_transform(shape.head_dim, seed=seed + _ONLINE_SEED_OFFSET["k"], what="R3 (K rotation)")
        install_kv_quantizers(model, k_rotation, k_bits=k_bits, v_bits=v_bits, clip_ratio=kv_clip_ratio)
    return shape


def fuse_rotation(model: LlamaForCausalLM, rotation: SpinRotation) -> None:
    """Fuse ``R1`` and every ``R2`` into the weights of a model made ready by :func:`prepare_model` (float64)."""
    rotate_weights_(model, residual=rotation.r1, heads=rotation.r2)


def _orthogonality_error(matrix: torch.Tensor) -> float:
    identity = torch.eye(matrix.shape[0], dtype=torch.float64)
    return (matrix.double().T @ matrix.double() - identity).abs().max().item()


def save_rotation(path: str | Path, rotation: SpinRotation, shape: LlamaShape, settings: dict[str, Any]) -> Path:
    """Write ``rotation`` (matrices, momentum, step, losses) with the model's sizes and ``settings``, atomically."""
    tensors = {key: value.detach().double().cpu().contiguous() for key, value in rotation.tensors().items()}
    tensors.update({f"momentum.{key}": v.detach().double().cpu().contiguous() for key, v in rotation.momentum.items()})
    metadata = {
        "shape": json.dumps(dataclasses.asdict(shape), sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True),
        "step": str(rotation.step),
        "losses": json.dumps(rotation.losses),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_rotation(path: str | Path, shape: LlamaShape) -> tuple[SpinRotation, dict[str, Any]]:
    """Read a rotation file for a model of ``shape``; returns the rotation and the settings it was trained with.

    Raises:
        RotationFileError: the file is missing or unreadable, was made for another model (sizes differ),
            lacks a matrix, or holds a matrix that is not orthogonal.
    """
    path = Path(path)
    if not path.is_file():
        raise RotationFileError(f"rotation file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise RotationFileError(f"rotation file {path} is not a readable safetensors file: {error}") from None
    saved_shape = json.loads(metadata.get("shape", "{}"))
    expected = dataclasses.asdict(shape)
    differ = {k: (saved_shape.get(k), v) for k, v in expected.items() if saved_shape.get(k) != v}
    if differ:
        details = ", ".join(f"{k} {saved!r} in the file vs {model!r} in the model"
                            for k, (saved, model) in differ.items())
        raise RotationFileError(f"rotation file {path} was made for another model: {details}")
    wanted = {"R1": shape.hidden_size, **{f"R2.{i}": shape.head_dim for i in range(shape.num_layers)}}
    for key, size in wanted.items():
        matrix = tensors.get(key)
        if matrix is None or tuple(matrix.shape) != (size, size):
            found = "missing" if matrix is None else f"shape {tuple(matrix.shape)}"
            raise RotationFileError(f"rotation file {path}: {key} must be [{size}, {size}], {found}")
        if not torch.isfinite(matrix).all():
            raise RotationFileError(f"rotation file {path}: {key} contains NaN or Inf")
        error = _orthogonality_error(matrix)
        if not error <= ORTHOGONALITY_TOLERANCE:
            raise RotationFileError(f"rotation file {path}: {key} is not orthogonal (max |RᵀR − I| = {error:.2e})")
    rotation = SpinRotation(
        r1=tensors["R1"].double(),
        r2=[tensors[f"R2.{i}"].double() for i in range(shape.num_layers)],
        step=int(metadata.get("step", "0")),
        losses=[float(v) for v in json.loads(metadata.get("losses", "[]"))],
        momentum={k.removeprefix("momentum."): v.double() for k, v in tensors.items() if k.startswith("momentum.")},
    )
    return rotation, json.loads(metadata.get("settings", "{}"))
