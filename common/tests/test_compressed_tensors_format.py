"""The compressed-tensors pack-quantized format: solver weights packed, against a bit-by-bit float64 reference
of the format's dequantization ``W[r, c] = scale[r, g] · (q[r, c] − zero[r, g])``, ``g = c // group_size``."""

from __future__ import annotations

import pytest
import torch

from common.export.compressed_tensors_format import pack_linear, quantization_config, unpack_linear
from common.solvers import gptaq
from common.solvers.column_loop import SolverConfig
from common.solvers.references import statistics
from common.tests.bit_strings import bit_string_values
from common.tests.solver_layers import layer


def _reference_dequantize(packed: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The format's definition, read bit by bit: ``(q − zero) · scale`` per element, one product in the scale's
    dtype (the library's order)."""
    out, columns = packed["weight_shape"].tolist()
    scale = packed["weight_scale"]
    group_size = columns // scale.shape[1]
    if "weight_zero_point" in packed:  # packed along the output dimension: one bit string per group column
        words = packed["weight_zero_point"].T.tolist()
        zeros = [list(row) for row in zip(*[bit_string_values(column, out, bits) for column in words], strict=True)]
    else:
        zeros = [[2 ** (bits - 1)] * scale.shape[1] for _ in range(out)]
    weight = torch.empty(out, columns, dtype=scale.dtype)
    for r, row_words in enumerate(packed["weight_packed"].tolist()):
        for c, code in enumerate(bit_string_values(row_words, columns, bits)):
            g = c // group_size
            weight[r, c] = torch.tensor(code - zeros[r][g], dtype=scale.dtype) * scale[r, g]
    return weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("options", [{}, {"groupsize": 16}, {"groupsize": 16, "act_order": True,
                                                              "static_groups": True}, {"act_order": True}])
def test_packed_solve_dequantizes_to_the_solver_weight(bits, sym, options):
    weight, x_full, x_quant = layer(m=40, n=48)  # neither a multiple of 32: padded words
    hessian, drift = statistics(x_full, x_quant)
    result = gptaq.solve(weight.float(), hessian.float(), drift.float(), SolverConfig.of(bits=bits, sym=sym, **options))
    packed = pack_linear(result.grid.codes(result.weight), result.grid, sym, torch.float32)
    groups = 3 if options.get("groupsize") else 1
    assert packed["weight_packed"].dtype == torch.int32 and packed["weight_packed"].shape == (40, -(-48 * bits // 32))
    assert packed["weight_scale"].dtype == torch.float32 and packed["weight_scale"].shape == (40, groups)
    assert packed["weight_shape"].dtype == torch.int64 and packed["weight_shape"].tolist() == [40, 48]
    assert ("weight_zero_point" in packed) == (not sym)
    if not sym:
        assert packed["weight_zero_point"].shape == (-(-40 * bits // 32), groups)
    assert torch.equal(_reference_dequantize(packed, bits), result.weight)
    assert torch.equal(unpack_linear(packed, bits), result.weight)


def test_float16_scales_give_the_float16_weights():
    weight, x_full, x_quant = layer(m=32, n=64)
    hessian, drift = statistics(x_full, x_quant)
    result = gptaq.solve(weight.float(), hessian.float(), drift.float(), SolverConfig(bits=4, grid="gptq"))
    packed = pack_linear(result.grid.codes(result.weight), result.grid, False, torch.float16)
    assert packed["weight_scale"].dtype == torch.float16
    assert torch.equal(unpack_linear(packed, 4, torch.float16), result.weight.half())
    with pytest.raises(ValueError, match=r"scales are not torch\.float16 values"):
        float_grid = gptaq.solve(weight.float(), hessian.float(), drift.float(), SolverConfig(bits=4))
        pack_linear(float_grid.grid.codes(float_grid.weight), float_grid.grid, False, torch.float16)


def test_unstorable_grids_are_refused():
    weight, x_full, x_quant = layer(m=32, n=64)
    hessian, drift = statistics(x_full, x_quant)
    permuted = gptaq.solve(weight.float(), hessian.float(), drift.float(),
                           SolverConfig(bits=4, groupsize=16, act_order=True))
    with pytest.raises(ValueError, match=r"not consecutive runs of input columns .* static_groups: true"):
        pack_linear(permuted.grid.codes(permuted.weight), permuted.grid, False, torch.float32)
    asymmetric = gptaq.solve(weight.float(), hessian.float(), drift.float(), SolverConfig(bits=4))
    with pytest.raises(ValueError, match="every zero point at 8"):
        pack_linear(asymmetric.grid.codes(asymmetric.weight), asymmetric.grid, True, torch.float32)


def test_quantization_config_names_the_scheme():
    config = quantization_config(4, 128, True, True, ["lm_head"])
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                       "actorder": "weight", "dynamic": False}
    channel = quantization_config(3, -1, False, False, [])["config_groups"]["group_0"]["weights"]
    assert channel["strategy"] == "channel" and channel["group_size"] is None and channel["actorder"] is None
