"""An independent bit-by-bit reading of int32 words, the reference the packing tests compare against."""

from __future__ import annotations


def bit_string_values(words: list[int], count: int, bits: int) -> list[int]:
    """The first ``count`` values of the little-endian bit string the int32 ``words`` form, ``bits`` bits each
    (value ``i`` is bits ``i·bits .. i·bits + bits − 1``)."""
    def bit(position: int) -> int:
        return (words[position // 32] & 0xFFFFFFFF) >> (position % 32) & 1

    return [sum(bit(i * bits + b) << b for b in range(bits)) for i in range(count)]
