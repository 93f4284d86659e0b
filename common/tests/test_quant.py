"""Weight and activation quantizers: grids, MSE clip search, straight-through gradients, errors."""

from __future__ import annotations

import pytest
import torch

from common.quant.quantizers import _SEARCHES, ActivationQuantizer, WeightQuantizer, _SearchMemo, rtn_quantize_weight

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _levels(row: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(row / scale)


class TestWeightQuantizer:
    @pytest.mark.parametrize("bits", [2, 3, 4, 8])
    def test_asymmetric_grid_covers_range_and_zero(self, bits):
        w = torch.randn(16, 64, dtype=torch.float64) + 0.3
        quantizer = WeightQuantizer(bits)
        scale, zero = quantizer.params(w)
        q = quantizer.quantize(w, scale, zero)
        assert torch.all(zero == torch.round(zero)) and torch.all((zero >= 0) & (zero <= 2**bits - 1))
        codes = torch.round(q / scale + zero)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        torch.testing.assert_close(q, scale * (codes - zero))
        assert torch.all((w - q).abs() <= scale / 2 + 1e-12)  # min/max range: nothing is clipped
        assert torch.all(quantizer.quantize(torch.zeros_like(w), scale, zero) == 0)  # 0 is exact

    @pytest.mark.parametrize("bits", [2, 4])
    def test_symmetric_grid_is_signed_without_zero_point(self, bits):
        w = torch.randn(8, 32, dtype=torch.float64)
        quantizer = WeightQuantizer(bits, sym=True)
        scale, zero = quantizer.params(w)
        assert torch.all(zero == 2 ** (bits - 1))
        torch.testing.assert_close(scale[:, 0], 2 * w.abs().amax(dim=1) / (2**bits - 1))
        levels = _levels(quantizer.quantize(w, scale, zero), scale)
        assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1

    def test_all_zero_row_is_kept_zero(self):
        w = torch.zeros(2, 8)
        quantizer = WeightQuantizer(4)
        scale, zero = quantizer.params(w)
        assert torch.all(quantizer.quantize(w, scale, zero) == 0)

    def test_mse_search_matches_reference_and_lowers_error(self):
        w = torch.randn(12, 128, dtype=torch.float64)
        w[:, 0] = 8.0  # an outlier makes clipping worthwhile
        plain = WeightQuantizer(3)
        searched = WeightQuantizer(3, mse=True)
        scale, zero = searched.params(w)

        def error(s, z):
            return (plain.quantize(w, s, z) - w).abs().pow(2.4).sum(dim=1)

        best = []
        for row in range(w.shape[0]):
            xmin, xmax = min(w[row].min().item(), 0.0), max(w[row].max().item(), 0.0)
            candidates = []
            for i in range(80):
                p = 1 - i / 100
                s = (p * xmax - p * xmin) / 7
                z = round(-p * xmin / s)
                candidates.append(((plain.quantize(w[row], s, z) - w[row]).abs().pow(2.4).sum().item(), s))
            best.append(min(candidates, key=lambda c: c[0])[1])
        torch.testing.assert_close(scale[:, 0], torch.tensor(best, dtype=torch.float64))
        assert torch.all(error(scale, zero) <= error(*plain.params(w)) + 1e-12)

    def test_clip_search_is_remembered_by_the_weights_exact_bytes(self, monkeypatch):
        _SEARCHES.clear()
        w = torch.randn(24, 96)
        w[:, 3] = 6.0
        quantizer = WeightQuantizer(4, mse=True)
        fresh = quantizer.params(w)
        calls = []
        search = WeightQuantizer._mse_search
        monkeypatch.setattr(WeightQuantizer, "_mse_search",
                            lambda self, *args: calls.append(1) or search(self, *args))
        remembered = quantizer.params(w.clone())
        assert calls == [] and all(a.equal(b) for a, b in zip(remembered, fresh, strict=True))
        remembered[0].mul_(2)  # a caller's in-place change stays its own
        assert quantizer.params(w)[0].equal(fresh[0]) and calls == []

        changed = w.clone()
        changed[5, 7] = torch.nextafter(changed[5, 7], torch.tensor(10.0))
        other_settings = WeightQuantizer(4, mse=True, norm=2.0)
        quantizer.params(changed)
        other_settings.params(w)
        WeightQuantizer(4, mse=True, sym=True).params(w)
        assert len(calls) == 3  # one changed bit, or any other setting, searches again
        _SEARCHES.clear()
        assert quantizer.params(changed)[0].equal(quantizer.params(changed)[0]) and len(calls) == 4

    def test_clip_search_memo_is_bounded_and_skips_weights_off_the_cpu(self):
        memo = _SearchMemo(max_bytes=3 * 2 * 10 * 4)  # three results of 10 float32 rows
        keys = [memo.key(torch.full((10, 4), float(i)), ()) for i in range(4)]
        for key in keys:
            memo.put(key, (torch.ones(10), torch.zeros(10)))
        assert memo.get(keys[0]) is None and all(memo.get(key) is not None for key in keys[1:])
        assert memo.bytes == 3 * 2 * 10 * 4
        assert memo.key(torch.ones(10, 4, device="meta"), ()) is None and memo.get(None) is None

    def test_rtn_groups(self):
        w = torch.randn(6, 32)
        grouped = rtn_quantize_weight(w, bits=2, groupsize=8)
        for row in grouped.reshape(-1, 8):
            assert row.unique().numel() <= 4
        assert rtn_quantize_weight(w, bits=16).equal(w)
        assert rtn_quantize_weight(w.bfloat16(), bits=4).dtype == torch.bfloat16

    @pytest.mark.parametrize("sym", [False, True])
    def test_checkpoint_grid_has_float16_scales_and_zero_points_in_range(self, sym):
        w = torch.randn(64, 16, dtype=torch.float64)
        w[0] = w[0].abs()  # xmin = 0: the float grid's zero point 0 is not storable
        checkpoint = WeightQuantizer(4, sym=sym, grid_format="gptq")
        scale, zero = checkpoint.params(w)
        assert torch.equal(scale.half().double(), scale)
        assert 1 <= int(zero.min()) and int(zero.max()) <= 15
        float_scale, _ = WeightQuantizer(4, sym=sym).params(w)
        assert torch.allclose(scale, float_scale, rtol=2**-11, atol=0)
        with pytest.raises(ValueError, match=r"grid_format must be one of \('float', 'gptq'\), got 'fp16'"):
            WeightQuantizer(4, grid_format="fp16")

    @pytest.mark.parametrize("bits", [0, 17, 2.5, True, "4"])
    def test_bad_bits(self, bits):
        with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.16"):
            WeightQuantizer(bits)

    def test_groupsize_must_divide(self):
        with pytest.raises(ValueError, match="groupsize must be -1 or a positive divisor of 32, got 5"):
            rtn_quantize_weight(torch.randn(2, 32), bits=4, groupsize=5)


class TestActivationQuantizer:
    @pytest.mark.parametrize("bits", [2, 4, 8])
    def test_asymmetric_per_token(self, bits):
        x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10
        q = ActivationQuantizer(bits)(x)
        assert q.shape == x.shape and q.dtype == x.dtype
        for token, original in zip(q.reshape(-1, 64), x.reshape(-1, 64), strict=True):
            assert token.unique().numel() <= 2**bits
            step = (original.max().clamp(min=0) - original.min().clamp(max=0)) / (2**bits - 1)
            assert torch.all((token - original).abs() <= step / 2 + 1e-5)

    def test_clip_ratio_shrinks_the_range(self):
        x = torch.randn(10, 64)
        q = ActivationQuantizer(4, clip_ratio=0.5)(x)
        step = 0.5 * (x.amax(dim=-1) - x.amin(dim=-1)) / 15  # the zero point's rounding may shift by half a step
        assert torch.all(q.amax(dim=-1) <= 0.5 * x.amax(dim=-1) + step / 2 + 1e-5)
        assert torch.all(q.amin(dim=-1) >= 0.5 * x.amin(dim=-1) - step / 2 - 1e-5)

    def test_symmetric_signed_grid(self):
        x = torch.randn(4, 32)
        q = ActivationQuantizer(4, sym=True)(x)
        scale = x.abs().amax(dim=-1, keepdim=True) / 7
        levels = torch.round(q / scale)
        torch.testing.assert_close(q, levels * scale)
        assert levels.min() >= -8 and levels.max() <= 7

    def test_groups_have_their_own_scale(self):
        x = torch.randn(2, 64)
        x[:, :16] *= 100
        grouped = ActivationQuantizer(4, groupsize=16)(x)
        whole = ActivationQuantizer(4)(x)
        assert (grouped - x)[:, 16:].abs().max() < (whole - x)[:, 16:].abs().max()
        torch.testing.assert_close(grouped[:, 16:32], ActivationQuantizer(4)(x[:, 16:32]))

    def test_sixteen_bits_is_identity(self):
        x = torch.randn(3, 8)
        assert ActivationQuantizer(16)(x) is x

    def test_straight_through_gradient(self):
        x = torch.randn(4, 16, requires_grad=True)
        ActivationQuantizer(4, straight_through=True)(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones_like(x))
        y = ActivationQuantizer(4, straight_through=True)(x.detach())
        torch.testing.assert_close(y, ActivationQuantizer(4)(x.detach()))

    def test_zero_token_stays_zero(self):
        assert torch.all(ActivationQuantizer(4)(torch.zeros(2, 8)) == 0)
        assert torch.all(ActivationQuantizer(4, sym=True)(torch.zeros(2, 8)) == 0)

    @pytest.mark.parametrize("clip_ratio", [0.0, -0.1, 1.5])
    def test_bad_clip_ratio(self, clip_ratio):
        with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\]"):
            ActivationQuantizer(4, clip_ratio=clip_ratio)

    def test_bad_bits_and_groups(self):
        with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.16"):
            ActivationQuantizer(0)
        with pytest.raises(ValueError, match="groupsize must be -1 or a positive integer"):
            ActivationQuantizer(4, groupsize=0)
        with pytest.raises(ValueError, match="groupsize must divide the activation's last dimension 10"):
            ActivationQuantizer(4, groupsize=4)(torch.randn(2, 10))
