"""The checkpoint formats a weight-only run exports: what each stores, its ``quantization_config``, and the
packing of one linear in it.

* ``gptq``: ``qweight``/``qzeros``/``scales``/``g_idx``, zero points less one (``checkpoint_format: gptq``):
  GPTQModel, transformers (optimum), vLLM's gptq kernels (:mod:`common.export.gptq_format`).
* ``gptq_v2``: the same tensors with the zero points themselves (``checkpoint_format: gptq_v2``), what vLLM
  reads correctly for every zero point.
* ``compressed-tensors``: the ``pack-quantized`` layout, vLLM's native format and llm-compressor's output
  (:mod:`common.export.compressed_tensors_format`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from common.export import compressed_tensors_format, gptq_format
from common.quant.quantizers import WeightGrid

GPTQ, GPTQ_V2, COMPRESSED_TENSORS = "gptq", "gptq_v2", "compressed-tensors"
EXPORT_FORMATS = (GPTQ, GPTQ_V2, COMPRESSED_TENSORS)

FORMAT_BITS = {GPTQ: gptq_format.BITS, GPTQ_V2: gptq_format.BITS, COMPRESSED_TENSORS: compressed_tensors_format.BITS}
"""Weight bit widths each format stores."""

MARKERS = {GPTQ: "qweight", GPTQ_V2: "qweight", COMPRESSED_TENSORS: "weight_packed"}
"""The tensor that marks a packed linear, ``<module>.<marker>``, per format."""

PART_NAMES = {GPTQ: gptq_format.PARTS, GPTQ_V2: gptq_format.PARTS,
              COMPRESSED_TENSORS: (*compressed_tensors_format.PARTS, compressed_tensors_format.ZERO_POINT)}
"""Every tensor a packed linear of each format may hold besides its bias."""

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class CheckpointError(ValueError):
    """An exported folder that cannot be read back (missing, corrupted, truncated or inconsistent file)."""


def producer() -> str:
    """``<package>:<version>`` of this repository, the ``meta.quantizer`` entry readers log."""
    try:
        return f"gptaq-repro:{metadata.version('gptaq-repro')}"
    except metadata.PackageNotFoundError:
        return "gptaq-repro:unknown"


@dataclass(frozen=True)
class ExportSettings:
    """What a checkpoint stores and how: the ``quantization_config`` and the packing of each linear.

    Attributes:
        format: one of :data:`EXPORT_FORMATS`.
        bits: one of ``FORMAT_BITS[format]``.
        group_size: input columns per group, -1 for one group per output row.
        desc_act: the columns were quantized in act_order.
        sym: symmetric grid (every zero point ``2**(bits-1)``).
        damp_percent: the Hessian damping used (informational, gptq formats).
        method: the method that produced the weights (``gptq``, ``gptaq``, ...), kept in the gptq formats' ``meta``.
        dtype: the model's dtype (compressed-tensors stores the scales in it).
    """

    format: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    method: str
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {self.format!r}")
        if self.bits not in FORMAT_BITS[self.format]:
            raise ValueError(f"w_bits must be one of {FORMAT_BITS[self.format]} to be stored in the {self.format} "
                             f"format, got {self.bits!r}")

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``; ``ignore``: the linears left in full precision."""
        if self.format == COMPRESSED_TENSORS:
            return compressed_tensors_format.quantization_config(self.bits, self.group_size, self.sym,
                                                                 self.desc_act, ignore)
        return {
            "quant_method": "gptq",
            "checkpoint_format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": self.damp_percent,
            "pack_dtype": "int32",
            "lm_head": False,
            "meta": {"quantizer": [producer()], "method": self.method},
        }

    def pack(self, codes: torch.Tensor, grid: WeightGrid) -> dict[str, torch.Tensor]:
        """The tensors of one linear with integer ``codes`` [out, in] on ``grid``, named within the module."""
        if self.format == COMPRESSED_TENSORS:
            return compressed_tensors_format.pack_linear(codes, grid, self.sym, self.dtype)
        return gptq_format.pack_linear(codes, grid, gptq_format.ZERO_OFFSETS[self.format])


@dataclass(frozen=True)
class StoredSettings:
    """What a checkpoint's ``quantization_config`` says, whatever its format: enough to unpack it and to
    compare it with a run's settings."""

    format: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool

    def compared(self) -> dict[str, Any]:
        """The settings a run compares with its own."""
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym}

    def unpack(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight [out, in] of one packed linear (its tensors named within the module)."""
        if self.format == COMPRESSED_TENSORS:
            return compressed_tensors_format.unpack_linear(dict(parts), self.bits)
        return gptq_format.unpack_linear(dict(parts), self.bits, zero_offset=gptq_format.ZERO_OFFSETS[self.format])

    def part_names(self) -> tuple[str, ...]:
        """The tensors of one packed linear."""
        if self.format == COMPRESSED_TENSORS:
            zero = () if self.sym else (compressed_tensors_format.ZERO_POINT,)
            return (*compressed_tensors_format.PARTS, *zero)
        return gptq_format.PARTS


def stored_settings(quantization: Any, path: str) -> StoredSettings:
    """The settings a ``quantization_config`` (from the file ``path``) describes; :class:`CheckpointError` naming
    the file when no format of :data:`EXPORT_FORMATS` matches or a value is missing."""
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{path} has no quantization_config")
    method = quantization.get("quant_method")
    if method == "gptq":
        kind = quantization.get("checkpoint_format", GPTQ)
        if kind not in (GPTQ, GPTQ_V2) or quantization.get("bits") not in gptq_format.BITS:
            raise CheckpointError(f"{path}: only checkpoint_format 'gptq' or 'gptq_v2' with bits in "
                                  f"{gptq_format.BITS} can be read, got {kind!r} with bits "
                                  f"{quantization.get('bits')!r}")
        try:
            return StoredSettings(kind, quantization["bits"], int(quantization["group_size"]),
                                  bool(quantization.get("desc_act", False)), bool(quantization.get("sym", True)))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: quantization_config lacks a readable {error}") from None
    if method == COMPRESSED_TENSORS:
        return _compressed_tensors_settings(quantization, path)
    raise CheckpointError(f"{path} has no quantization_config with quant_method 'gptq' or 'compressed-tensors'")


def _compressed_tensors_settings(quantization: dict[str, Any], path: str) -> StoredSettings:
    groups = quantization.get("config_groups")
    if (quantization.get("format") != "pack-quantized" or quantization.get("quantization_status") != "compressed"
            or not isinstance(groups, dict) or len(groups) != 1):
        raise CheckpointError(f"{path}: only compressed-tensors checkpoints of one config group in the compressed "
                              f"pack-quantized format can be read")
    scheme = next(iter(groups.values()))
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(weights, dict) or weights.get("type", "int") != "int" \
            or weights.get("num_bits") not in compressed_tensors_format.BITS \
            or weights.get("strategy") not in ("group", "channel"):
        raise CheckpointError(f"{path}: only integer weights of 1..8 bits by group or channel can be read")
    group_size = weights.get("group_size") if weights.get("strategy") == "group" else -1
    return StoredSettings(COMPRESSED_TENSORS, weights["num_bits"], int(group_size or -1),
                          weights.get("actorder") is not None, bool(weights.get("symmetric", True)))
