"""The ``compressed-tensors`` ``pack-quantized`` format of one quantized linear, packed and unpacked.

The format vLLM reads natively and llm-compressor writes (library ``compressed-tensors``, layout of its
releases 0.18 to 0.20). A linear with weight ``W`` [out, in] on a grid ``W[r, c] = scale[r, g] · (q[r, c] −
zero[r, g])``, ``g = c // group_size`` (one group per row without groups), integer codes ``q`` and zero points
in ``0..2**bits − 1``, is stored as:

* ``weight_packed`` int32 [out, ceil(in · bits / 32)]: the codes packed along the input dimension in the
  layout of :mod:`common.export.bit_packing`. The library quantizes to signed values ``q − 2**(bits−1)`` and
  adds ``2**(bits−1)`` back before packing, so the stored values are the codes ``q`` themselves;
* ``weight_scale`` [out, groups] in the model's dtype;
* ``weight_shape`` int64 [2]: ``(out, in)``;
* ``weight_zero_point`` int32 [ceil(out · bits / 32), groups], asymmetric grids only: the zero points packed
  the same way along the output dimension. A symmetric grid stores none: its zero point is ``2**(bits−1)``.

The library dequantizes ``(q − zero) · scale`` in the scale's dtype. Scales that are values of the model's
dtype therefore give back exactly the solver's weights in that dtype (the float32 weights themselves for a
float32 model). The format keeps no column permutation (the library dropped ``g_idx`` in 0.20): columns
quantized in act_order must keep the original groups (``static_groups``).
"""

from __future__ import annotations

from typing import Any

import torch

from common.export.bit_packing import MAX_BITS, pack_rows, packed_length, unpack_rows
from common.quant.quantizers import WeightGrid

BITS = tuple(range(1, MAX_BITS + 1))
"""Bit widths the format stores."""

PARTS = ("weight_packed", "weight_scale", "weight_shape")
"""The tensors of every packed linear, ``<module>.<name>``; asymmetric grids add ``weight_zero_point``."""

ZERO_POINT = "weight_zero_point"


def check_format_bits(bits: int, name: str = "bits") -> int:
    if bits not in BITS:
        raise ValueError(f"{name} must be in 1..{MAX_BITS} to be stored in the compressed-tensors format, "
                         f"got {bits!r}")
    return bits


def _original_groups(grid: WeightGrid, columns: int) -> int:
    """The group size the grid's ``g_idx`` follows (``columns`` for one group); ``ValueError`` if the groups
    are not consecutive runs of columns."""
    groups = grid.scales.shape[0]
    size = columns // groups if groups and columns % groups == 0 else 0
    expected = torch.arange(columns, device=grid.g_idx.device) // max(size, 1)
    if not size or not torch.equal(grid.g_idx.to(torch.int64), expected):
        raise ValueError("the columns' groups are not consecutive runs of input columns (act_order with dynamic "
                         "groups), which the compressed-tensors format cannot hold: quantize with static_groups: "
                         "true, or export the gptq format")
    return size


def pack_linear(codes: torch.Tensor, grid: WeightGrid, sym: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` (in ``dtype``), ``weight_shape`` and, unless ``sym``,
    ``weight_zero_point`` of a linear with integer ``codes`` [out, in] on ``grid``."""
    bits = check_format_bits(grid.bits)
    out, columns = codes.shape
    _original_groups(grid, columns)
    zeros = grid.zeros.round()
    if sym and not bool((zeros == 2 ** (bits - 1)).all()):
        raise ValueError(f"a symmetric grid must have every zero point at {2 ** (bits - 1)} to be stored as one "
                         f"in the compressed-tensors format")
    scales = grid.scales.to(dtype)
    if not torch.equal(scales.to(grid.scales.dtype), grid.scales):
        raise ValueError(f"scales are not {dtype} values: the compressed-tensors format stores them in the model's "
                         f"dtype, so the checkpoint would not reproduce the weights; quantize with w_grid: gptq "
                         f"(float16 scales) for a float16 model, or run in float32")
    packed = {
        "weight_packed": pack_rows(codes.T.contiguous(), bits).T.contiguous(),
        "weight_scale": scales.T.contiguous(),
        "weight_shape": torch.tensor([out, columns], dtype=torch.int64),
    }
    if not sym:
        packed[ZERO_POINT] = pack_rows(zeros.T.to(torch.int64).contiguous(), bits)
    return packed


def unpack_linear(tensors: dict[str, torch.Tensor], bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] a packed linear stores (``scale · (q − zero)``, computed in ``dtype``)."""
    check_format_bits(bits)
    packed, scale, shape = (tensors[key] for key in PARTS)
    if shape.numel() != 2:
        raise ValueError(f"weight_shape must hold (out, in), got {shape.tolist()}")
    out, columns = (int(size) for size in shape)
    groups = scale.shape[1] if scale.ndim == 2 else 0
    if (packed.shape != (out, packed_length(columns, bits)) or scale.shape[0] != out or not groups
            or columns % groups):
        raise ValueError(f"inconsistent packed linear: weight_packed {tuple(packed.shape)}, weight_scale "
                         f"{tuple(scale.shape)}, weight_shape {(out, columns)}")
    codes = unpack_rows(packed.T.contiguous(), bits, columns).T
    if ZERO_POINT in tensors:
        zeros = unpack_rows(tensors[ZERO_POINT], bits, out)
    else:
        zeros = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.int32)
    g_idx = torch.arange(columns) // (columns // groups)
    grid = WeightGrid(scale.T.to(dtype), zeros.T.to(dtype), g_idx, 2**bits - 1)
    return grid.dequantize(codes)


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool,
                        ignore: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: one group of every ``Linear`` but those in ``ignore``."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "group" if group_size > 0 else "channel",
        "group_size": group_size if group_size > 0 else None,
        "actorder": "weight" if act_order else None,  # the order of calibration only: nothing stored
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
