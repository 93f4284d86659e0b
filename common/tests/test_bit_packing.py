"""Integer codes packed into int32 words, against a bit-by-bit reading of the layout."""

from __future__ import annotations

import math

import pytest
import torch

from common.export.bit_packing import pack_rows, packed_length, unpack_rows
from common.tests.bit_strings import bit_string_values


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows", [32, 96, 70, 5])
def test_every_width_and_length_matches_the_bit_string(bits, rows):
    values = torch.randint(0, 2**bits, (rows, 3), generator=torch.Generator().manual_seed(bits * rows),
                           dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (math.ceil(rows * bits / 32), 3)
    assert packed_length(rows, bits) == packed.shape[0]
    for column in range(3):
        assert bit_string_values(packed[:, column].tolist(), rows, bits) == values[:, column].tolist()
    assert torch.equal(unpack_rows(packed, bits, rows), values)


def test_padding_bits_are_zero():
    packed = pack_rows(torch.full((5, 1), 7, dtype=torch.int32), 3)  # 15 bits used of one word
    assert packed.shape == (1, 1) and packed[0, 0].item() == int("111" * 5, 2)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"values must lie in 0\.\.15"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        pack_rows(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match="64 values of 4 bits take 8 words, got 7"):
        unpack_rows(torch.zeros(7, 1, dtype=torch.int32), 4, 64)
