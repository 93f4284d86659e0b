"""The gptq checkpoint format: packing against a bit-by-bit float64 reference of its dequantization."""

from __future__ import annotations

import pytest
import torch

from common.export.gptq_format import ZERO_OFFSETS, pack_linear, pack_rows, unpack_linear, unpack_rows
from common.quant.quantizers import WeightGrid, rtn_quantize
from common.solvers import gptaq
from common.solvers.column_loop import SolverConfig
from common.solvers.references import statistics
from common.tests.solver_layers import layer


def _bit(words: list[int], position: int) -> int:
    """Bit ``position`` of the little-endian bit string the int32 ``words`` form."""
    return (words[position // 32] & 0xFFFFFFFF) >> (position % 32) & 1


def _reference_value(column_words: list[int], index: int, bits: int) -> int:
    """Value ``index`` of a packed column, read bit by bit: value ``k`` of each 32-value chunk starts at bit
    ``bits · k`` of the chunk's ``bits`` words."""
    chunk, k = divmod(index, 32)
    words = column_words[chunk * bits:(chunk + 1) * bits]
    return sum(_bit(words, bits * k + b) << b for b in range(bits))


def _reference_dequantize(packed: dict[str, torch.Tensor], bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The format's definition in float64: ``W[r, c] = scales[g, r] · (q[c, r] − (qzero[g, r] + offset))``
    (offset 1 for ``checkpoint_format: gptq``, 0 for ``gptq_v2``)."""
    qweight, qzeros = packed["qweight"].tolist(), packed["qzeros"].tolist()
    scales, g_idx = packed["scales"].double(), packed["g_idx"].tolist()
    columns, rows = len(g_idx), scales.shape[1]
    weight = torch.empty(rows, columns, dtype=torch.float64)
    for r in range(rows):
        column_words = [row[r] for row in qweight]
        for c in range(columns):
            g = g_idx[c]
            zero = _reference_value(qzeros[g], r, bits) + zero_offset
            weight[r, c] = scales[g, r] * (_reference_value(column_words, c, bits) - zero)
    return weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    values = torch.randint(0, 2**bits, (96, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    assert torch.equal(unpack_rows(packed, bits, 96), values)


def test_four_bit_layout_is_eight_nibbles_per_word():
    values = torch.arange(32, dtype=torch.int32).remainder(16)[:, None]
    packed = pack_rows(values, 4)
    expected = [sum(int(v) << (4 * k) for k, v in enumerate(values[w * 8:(w + 1) * 8, 0])) for w in range(4)]
    assert [word & 0xFFFFFFFF for word in packed[:, 0].tolist()] == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("options", [{}, {"groupsize": 16}, {"groupsize": 16, "act_order": True},
                                     {"groupsize": 16, "act_order": True, "static_groups": True}])
def test_packed_solve_dequantizes_to_the_solver_weight(bits, sym, options):
    weight, x_full, x_quant = layer(m=32, n=64)
    hessian, drift = statistics(x_full, x_quant)
    config = SolverConfig.of(bits=bits, sym=sym, grid="gptq", **options)
    result = gptaq.solve(weight.float(), hessian.float(), drift.float(), config)
    for checkpoint_format, zero_offset in ZERO_OFFSETS.items():
        packed = pack_linear(result.grid.codes(result.weight), result.grid, zero_offset)
        assert packed["qweight"].shape == (64 * bits // 32, 32) and packed["qzeros"].shape[1] == 32 * bits // 32
        assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
        reference = _reference_dequantize(packed, bits, zero_offset)
        assert torch.equal(reference, result.weight.double()), checkpoint_format
        assert torch.equal(unpack_linear(packed, bits, zero_offset=zero_offset), result.weight), checkpoint_format


def test_only_gptq_v2_stores_a_zero_point_of_zero():
    grid = WeightGrid(torch.full((1, 32), 0.5), torch.zeros(1, 32), torch.zeros(64, dtype=torch.int64), 15)
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"zero points must lie in 1\.\.15"):
        pack_linear(codes, grid)
    packed = pack_linear(codes, grid, ZERO_OFFSETS["gptq_v2"])
    assert torch.equal(unpack_linear(packed, 4, zero_offset=ZERO_OFFSETS["gptq_v2"]), grid.dequantize(codes))


def test_unstorable_grids_are_refused():
    weight = torch.randn(32, 64)
    weight[0] = weight[0].abs()
    quantized, grid = rtn_quantize(weight, bits=4)
    with pytest.raises(ValueError, match=r"zero points must lie in 1\.\.15 .* w_grid: gptq"):
        pack_linear(grid.codes(quantized), grid)
    quantized, grid = rtn_quantize(weight, bits=4, sym=True)
    with pytest.raises(ValueError, match="scales are not float16 values"):
        pack_linear(grid.codes(quantized), grid)
    quantized, grid = rtn_quantize(weight, bits=5, grid_format="gptq")
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\) to be stored in the gptq format, got 5"):
        pack_linear(grid.codes(quantized), grid)
