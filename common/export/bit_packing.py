"""Integer codes packed into int32 words, the layout the ``gptq`` and ``compressed-tensors`` formats share.

Along the packed dimension, every 32 consecutive values form one little-endian bit string of ``32 · bits``
bits (value ``k`` at bit offset ``bits · k``), cut into ``bits`` int32 words: at 3, 5, 6 or 7 bits values
straddle words. A length that is not a multiple of 32 is padded with zeros to the next one and the words
past ``ceil(length · bits / 32)`` are dropped (compressed-tensors' convention; the gptq format only stores
multiples of 32).
"""

from __future__ import annotations

import math

import torch

WORD_BITS = 32
MAX_BITS = 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS} to be packed, got {bits!r}")


def packed_length(length: int, bits: int) -> int:
    """Words that ``length`` values of ``bits`` bits take: ``ceil(length · bits / 32)``."""
    return math.ceil(length * bits / WORD_BITS)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [rows, cols] (integers in ``0..2**bits − 1``) along the rows: int32
    [ceil(rows · bits / 32), cols]."""
    _check_bits(bits)
    rows, cols = values.shape
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values must lie in 0..{2**bits - 1} to be packed in {bits} bits")
    padded = math.ceil(rows / WORD_BITS) * WORD_BITS
    chunks = torch.zeros(padded, cols, dtype=torch.int64, device=values.device)
    chunks[:rows] = values.to(torch.int64)
    chunks = chunks.reshape(padded // WORD_BITS, WORD_BITS, cols)
    words = torch.zeros(padded // WORD_BITS, bits, cols, dtype=torch.int64, device=values.device)
    for k in range(WORD_BITS):
        word, shift = divmod(bits * k, WORD_BITS)
        words[:, word] |= (chunks[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= chunks[:, k] >> (WORD_BITS - shift)
    return _as_int32(words.reshape(-1, cols)[:packed_length(rows, bits)])


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [ceil(rows · bits / 32), cols] to int32 values [rows, cols]."""
    _check_bits(bits)
    words_total, cols = packed.shape
    if words_total != packed_length(rows, bits):
        raise ValueError(f"{rows} values of {bits} bits take {packed_length(rows, bits)} words, got {words_total}")
    groups = math.ceil(rows / WORD_BITS)
    words = torch.zeros(groups * bits, cols, dtype=torch.int64, device=packed.device)
    words[:words_total] = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(groups, bits, cols)
    mask = 2**bits - 1
    values = torch.empty(groups, WORD_BITS, cols, dtype=torch.int64, device=packed.device)
    for k in range(WORD_BITS):
        word, shift = divmod(bits * k, WORD_BITS)
        value = words[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (words[:, word + 1] << (WORD_BITS - shift))
        values[:, k] = value & mask
    return values.reshape(-1, cols)[:rows].to(torch.int32)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``0..2**32 − 1`` as int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
