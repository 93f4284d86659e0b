"""The ``gptq`` checkpoint format (``checkpoint_format: gptq``) of one quantized linear, packed and unpacked.

A linear ``y = x Wᵀ + b`` with ``W`` [out, in] on a grid ``W[r, c] = scales[g, r] · (q[r, c] − zero[g, r])``,
``g = g_idx[c]``, integer codes ``q`` and zero points in ``0..2**bits − 1``, is stored as:

* ``qweight`` int32 [in · bits / 32, out]: the codes transposed ([in, out]) and packed along the input
  dimension: every 32 consecutive input rows form one little-endian bit string of ``32 · bits`` bits, value
  ``k`` at bit offset ``bits · k``, cut into ``bits`` int32 words (so at 3 bits values straddle words);
* ``qzeros`` int32 [groups, out · bits / 32]: ``zero − 1`` (``checkpoint_format: gptq``, whose readers add
  the 1 back) or ``zero`` (``gptq_v2``), packed the same way along the output dimension;
* ``scales`` float16 [groups, out];
* ``g_idx`` int32 [in]: the group of each input column (``c // group_size`` unless the columns were
  quantized in another order, ``desc_act``).

Zero points must therefore lie in ``1..2**bits − 1`` (``0..2**bits − 1`` for ``gptq_v2``), and scales must
be float16 values for the stored model to compute what the solver's weights compute
(:data:`common.quant.quantizers.GRIDS`, ``"gptq"``).
"""

from __future__ import annotations

import torch

from common.export.bit_packing import WORD_BITS, pack_rows, unpack_rows
from common.quant.quantizers import WeightGrid

BITS = (2, 3, 4, 8)
"""Bit widths the format stores."""

PARTS = ("qweight", "qzeros", "scales", "g_idx")
"""The tensors of one packed linear, ``<module>.<name>``."""

ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
"""What each ``checkpoint_format`` subtracts from the zero points it stores: ``gptq`` keeps ``zero − 1`` (its
readers add the 1 back), ``gptq_v2`` the zero points themselves."""


def check_format_bits(bits: int, name: str = "bits") -> int:
    if bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS} to be stored in the gptq format, got {bits!r}")
    return bits


def _check_multiple(size: int, what: str) -> None:
    if size % WORD_BITS:
        raise ValueError(f"the gptq format packs {what} in words of {WORD_BITS} values: it must be a multiple of "
                         f"{WORD_BITS}, got {size}")


def pack_linear(codes: torch.Tensor, grid: WeightGrid,
                zero_offset: int = ZERO_OFFSETS["gptq"]) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of a linear with integer ``codes`` [out, in] on ``grid``,
    its zero points stored less ``zero_offset`` (:data:`ZERO_OFFSETS`)."""
    bits = check_format_bits(grid.bits)
    out, columns = codes.shape
    _check_multiple(columns, "the input dimension")
    _check_multiple(out, "the output dimension (of the zero points)")
    zeros = grid.zeros.round()
    if int(zeros.min()) < zero_offset or int(zeros.max()) > grid.maxq:
        raise ValueError(f"zero points must lie in {zero_offset}..{grid.maxq} to be stored in the gptq format "
                         f"(zero − {zero_offset} in {bits} bits); quantize with w_grid: gptq")
    scales = grid.scales.to(torch.float16)
    if not torch.equal(scales.to(grid.scales.dtype), grid.scales):
        raise ValueError("scales are not float16 values: the checkpoint would not reproduce the weights; "
                         "quantize with w_grid: gptq")
    return {
        "qweight": pack_rows(codes.T.contiguous(), bits),
        "qzeros": pack_rows((zeros.to(torch.int64) - zero_offset).T.contiguous(), bits).T.contiguous(),
        "scales": scales.contiguous(),
        "g_idx": grid.g_idx.to(torch.int32).contiguous(),
    }


def unpack_linear(tensors: dict[str, torch.Tensor], bits: int, dtype: torch.dtype = torch.float32,
                  zero_offset: int = ZERO_OFFSETS["gptq"]) -> torch.Tensor:
    """The weight [out, in] a packed linear stores (``scales · (q − (qzero + zero_offset))``, in ``dtype``)."""
    qweight, qzeros, scales, g_idx = (tensors[key] for key in ("qweight", "qzeros", "scales", "g_idx"))
    check_format_bits(bits)
    codes = unpack_rows(qweight, bits, qweight.shape[0] * WORD_BITS // bits)
    zeros = unpack_rows(qzeros.T.contiguous(), bits, qzeros.shape[1] * WORD_BITS // bits).T + zero_offset
    index = g_idx.to(torch.int64)
    if codes.shape != (g_idx.numel(), scales.shape[1]) or int(index.min()) < 0 or int(index.max()) >= len(scales):
        raise ValueError(f"inconsistent packed linear: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"g_idx {tuple(g_idx.shape)} (max {int(index.max())})")
    grid = WeightGrid(scales.to(dtype), zeros.to(dtype), index, 2**bits - 1)
    return grid.dequantize(codes.T)
