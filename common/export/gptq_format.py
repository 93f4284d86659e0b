"""The ``gptq`` checkpoint format (``checkpoint_format: gptq``) of one quantized linear, packed and unpacked.

A linear ``y = x Wᵀ + b`` with ``W`` [out, in] on a grid ``W[r, c] = scales[g, r] · (q[r, c] − zero[g, r])``,
``g = g_idx[c]``, integer codes ``q`` and zero points in ``0..2**bits − 1``, is stored as:

* ``qweight`` int32 [in · bits / 32, out]: the codes transposed ([in, out]) and packed along the input
  dimension: every 32 consecutive input rows form one little-endian bit string of ``32 · bits`` bits, value
  ``k`` at bit offset ``bits · k``, cut into ``bits`` int32 words (so at 3 bits values straddle words);
* ``qzeros`` int32 [groups, out · bits / 32]: ``zero − 1`` (the format's convention: its readers add the 1
  back), packed the same way along the output dimension;
* ``scales`` float16 [groups, out];
* ``g_idx`` int32 [in]: the group of each input column (``c // group_size`` unless the columns were
  quantized in another order, ``desc_act``).

Zero points must therefore lie in ``1..2**bits − 1``, and scales must be float16 values for the stored model
to compute what the solver's weights compute (:data:`common.quant.quantizers.GRIDS`, ``"gptq"``).
"""

from __future__ import annotations

import torch

from common.quant.quantizers import WeightGrid

BITS = (2, 3, 4, 8)
"""Bit widths the format stores."""

WORD_BITS = 32


def check_format_bits(bits: int, name: str = "bits") -> int:
    if bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS} to be stored in the gptq format, got {bits!r}")
    return bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [rows, cols] (integers in ``0..2**bits − 1``) along the rows: int32 [rows · bits / 32, cols].

    ``rows`` must be a multiple of 32.
    """
    check_format_bits(bits)
    rows, cols = values.shape
    if rows % WORD_BITS:
        raise ValueError(f"the packed dimension must be a multiple of {WORD_BITS}, got {rows}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values must lie in 0..{2**bits - 1} to be packed in {bits} bits")
    chunks = values.to(torch.int64).reshape(rows // WORD_BITS, WORD_BITS, cols)
    words = torch.zeros(rows // WORD_BITS, bits, cols, dtype=torch.int64, device=values.device)
    for k in range(WORD_BITS):
        word, shift = divmod(bits * k, WORD_BITS)
        words[:, word] |= (chunks[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= chunks[:, k] >> (WORD_BITS - shift)
    return _as_int32(words.reshape(rows * bits // WORD_BITS, cols))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [rows · bits / 32, cols] to int32 values [rows, cols]."""
    check_format_bits(bits)
    words_total, cols = packed.shape
    if words_total % bits:
        raise ValueError(f"a {bits}-bit packed tensor must have a multiple of {bits} rows, got {words_total}")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(words_total // bits, bits, cols)
    mask = 2**bits - 1
    values = torch.empty(words.shape[0], WORD_BITS, cols, dtype=torch.int64, device=packed.device)
    for k in range(WORD_BITS):
        word, shift = divmod(bits * k, WORD_BITS)
        value = words[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (words[:, word + 1] << (WORD_BITS - shift))
        values[:, k] = value & mask
    return values.reshape(-1, cols).to(torch.int32)


def pack_linear(codes: torch.Tensor, grid: WeightGrid) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of a linear with integer ``codes`` [out, in] on ``grid``."""
    bits = check_format_bits(grid.bits)
    zeros = grid.zeros.round()
    if int(zeros.min()) < 1 or int(zeros.max()) > grid.maxq:
        raise ValueError(f"zero points must lie in 1..{grid.maxq} to be stored in the gptq format (zero − 1 in "
                         f"{bits} bits); quantize with w_grid: gptq")
    scales = grid.scales.to(torch.float16)
    if not torch.equal(scales.to(grid.scales.dtype), grid.scales):
        raise ValueError("scales are not float16 values: the checkpoint would not reproduce the weights; "
                         "quantize with w_grid: gptq")
    return {
        "qweight": pack_rows(codes.T.contiguous(), bits),
        "qzeros": pack_rows((zeros.to(torch.int64) - 1).T.contiguous(), bits).T.contiguous(),
        "scales": scales.contiguous(),
        "g_idx": grid.g_idx.to(torch.int32).contiguous(),
    }


def unpack_linear(tensors: dict[str, torch.Tensor], bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] a packed linear stores (``scales · (q − zero)``, computed in ``dtype``)."""
    qweight, qzeros, scales, g_idx = (tensors[key] for key in ("qweight", "qzeros", "scales", "g_idx"))
    codes = unpack_rows(qweight, bits)
    zeros = unpack_rows(qzeros.T.contiguous(), bits).T + 1
    index = g_idx.to(torch.int64)
    if codes.shape != (g_idx.numel(), scales.shape[1]) or int(index.min()) < 0 or int(index.max()) >= len(scales):
        raise ValueError(f"inconsistent packed linear: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"g_idx {tuple(g_idx.shape)} (max {int(index.max())})")
    grid = WeightGrid(scales.to(dtype), zeros.to(dtype), index, 2**bits - 1)
    return grid.dequantize(codes.T)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``0..2**32 − 1`` as int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
