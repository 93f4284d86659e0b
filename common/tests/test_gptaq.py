"""The layer solver against float64 naive references and the invariants GPTQ/GPTAQ must satisfy."""

from __future__ import annotations

import pytest
import torch

import common.solvers.column_loop as column_loop
from common.methods import METHODS
from common.quant.quantizers import ActivationQuantizer, rtn_quantize, rtn_quantize_weight
from common.solvers import gptaq, gptq, references
from common.solvers.column_loop import SolverConfig, factorize
from common.solvers.gptaq import drift_correction, quantize_weight
from common.solvers.references import statistics
from common.solvers.statistics import CalibrationError, CalibrationStatistics
from common.tests.solver_layers import OPTIONS, layer, output_error, structured_drift_layer

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


class TestStatistics:
    def test_match_definition_and_any_leading_shape(self):
        _, x_full, x_quant = layer(tokens=60)
        stats = CalibrationStatistics(40, asymmetric=True, dtype=torch.float64)
        stats.add(x_quant.reshape(3, 4, 5, 40), x_full.reshape(3, 4, 5, 40))
        hessian, drift = statistics(x_full, x_quant)
        torch.testing.assert_close(stats.hessian(), hessian, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.drift(), drift, rtol=1e-12, atol=1e-12)
        assert stats.rows == 60

    @pytest.mark.parametrize("splits", [[60], [1, 59], [7, 13, 40], [20, 20, 20]])
    def test_sample_count_independent_of_batching(self, splits):
        _, x_full, x_quant = layer(tokens=60)
        stats = CalibrationStatistics(40, asymmetric=True, dtype=torch.float64)
        for xf, xq in zip(x_full.split(splits), x_quant.split(splits), strict=True):
            stats.add(xq, xf)
        hessian, drift = statistics(x_full, x_quant)
        torch.testing.assert_close(stats.hessian(), hessian, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.drift(), drift, rtol=1e-12, atol=1e-12)

    def test_float32_accumulation_close_to_float64(self):
        _, x_full, x_quant = layer(tokens=500)
        stats = CalibrationStatistics(40, asymmetric=True)
        for xf, xq in zip(x_full.float().split(64), x_quant.float().split(64), strict=True):
            stats.add(xq, xf)
        hessian, drift = statistics(x_full, x_quant)
        torch.testing.assert_close(stats.hessian().double(), hessian, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.drift().double(), drift, rtol=1e-5, atol=1e-5)

    def test_gptq_statistics_have_no_drift(self):
        stats = CalibrationStatistics(4, asymmetric=False)
        stats.add(torch.randn(5, 4))
        assert stats.drift() is None

    def test_errors(self):
        stats = CalibrationStatistics(4, asymmetric=True, name="blk.0.q_proj")
        with pytest.raises(CalibrationError, match=r"blk\.0\.q_proj"):
            stats.hessian()
        with pytest.raises(ValueError, match="last dimension 4"):
            stats.add(torch.randn(3, 5), torch.randn(3, 5))
        with pytest.raises(ValueError, match="x_full"):
            stats.add(torch.randn(3, 4))
        with pytest.raises(ValueError, match="dtype"):
            CalibrationStatistics(4, asymmetric=False, dtype=torch.float16)


class TestAgainstNaiveReference:
    @pytest.mark.parametrize("options", OPTIONS)
    @pytest.mark.parametrize("method", ["gptq", "gptaq"])
    def test_matches_reference(self, options, method):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        d = drift if method == "gptaq" else None
        expected = references.gptq(weight, hessian, bits=3, **options) if d is None else references.gptaq(
            weight, hessian, d, bits=3, **options)
        got = quantize_weight(weight, hessian, d, bits=3, blocksize=16, **options)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)

    @pytest.mark.parametrize("blocksize", [1, 5, 16, 40, 128])
    @pytest.mark.parametrize("options", OPTIONS)
    def test_blocked_equals_unblocked(self, blocksize, options):
        weight, x_full, x_quant = layer(seed=1)
        hessian, drift = statistics(x_full, x_quant)
        unblocked = quantize_weight(weight, hessian, drift, bits=3, blocksize=40, **options)
        blocked = quantize_weight(weight, hessian, drift, bits=3, blocksize=blocksize, **options)
        torch.testing.assert_close(blocked, unblocked, rtol=0, atol=1e-9)

    @pytest.mark.parametrize("groupsize", [-1, 8, 20])
    def test_official_form(self, groupsize):
        weight, x_full, x_quant = layer(seed=2)
        hessian, drift = statistics(x_full, x_quant)
        for blocksize in (7, 16):
            expected = references.gptaq_official(weight, hessian, drift, bits=3, blocksize=blocksize,
                                                 groupsize=groupsize)
            got = quantize_weight(weight, hessian, drift, bits=3, blocksize=blocksize, groupsize=groupsize,
                                  lazy_update="official")
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)

    def test_official_form_depends_on_blocksize_exact_does_not(self):
        weight, x_full, x_quant = layer(seed=3, drift=0.5)
        hessian, drift = statistics(x_full, x_quant)
        official = [
            quantize_weight(weight, hessian, drift, bits=3, blocksize=b, lazy_update="official") for b in (4, 40)
        ]
        exact = [quantize_weight(weight, hessian, drift, bits=3, blocksize=b) for b in (4, 40)]
        assert not torch.allclose(official[0], official[1])
        torch.testing.assert_close(exact[0], exact[1], rtol=0, atol=1e-9)
        torch.testing.assert_close(official[1], exact[1], rtol=0, atol=1e-9)  # one block: the forms agree


class TestInvariants:
    @pytest.mark.parametrize("options", OPTIONS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_gptaq_equals_gptq_without_drift(self, options, dtype):
        weight, x_full, _ = layer(seed=4)
        stats = CalibrationStatistics(40, asymmetric=True, dtype=dtype)
        stats.add(x_full.to(dtype), x_full.to(dtype))
        w = weight.to(dtype)
        gptaq = quantize_weight(w, stats.hessian(), stats.drift(), bits=3, blocksize=16, **options)
        gptq = quantize_weight(w, stats.hessian(), bits=3, blocksize=16, **options)
        assert torch.equal(gptaq, gptq)

    @pytest.mark.parametrize(("alpha", "bound"), [(0.25, 0.95), (1.0, 0.8)])
    def test_gptaq_reduces_output_error_under_structured_drift(self, alpha, bound, margin):
        """The drift an upstream quantized layer causes is a function of the input (here linear, plus a little
        noise); GPTAQ corrects it, GPTQ cannot. Measured worst of 5 layers: 0.866 (α = 0.25), 0.654 (α = 1)."""
        ratios = []
        for seed in range(5):
            weight, x_full, x_quant = structured_drift_layer(seed)
            hessian, drift = statistics(x_full, x_quant)
            gptq = quantize_weight(weight, hessian, bits=4)
            gptaq = quantize_weight(weight, hessian, drift, bits=4, alpha=alpha)
            ratios.append(output_error(gptaq, weight, x_full, x_quant) / output_error(gptq, weight, x_full, x_quant))
        margin(f"GPTAQ / GPTQ output error, worst of 5 layers, alpha {alpha}", max(ratios), below=bound)

    def test_gptaq_gains_little_on_white_activation_noise(self, margin):
        """Per-token A4 rounding of Gaussian inputs is almost independent of the input, so no weight can undo
        it: GPTAQ's gain is small but never a loss (measured worst of 5 layers: 0.992)."""
        act_quant = ActivationQuantizer(4, clip_ratio=0.9)
        ratios = []
        for seed in range(5):
            weight, x_full, _ = layer(m=48, n=64, tokens=512, seed=seed)
            x_quant = act_quant(x_full)
            hessian, drift = statistics(x_full, x_quant)
            gptq = quantize_weight(weight, hessian, bits=4)
            gptaq = quantize_weight(weight, hessian, drift, bits=4)
            ratios.append(output_error(gptaq, weight, x_full, x_quant) / output_error(gptq, weight, x_full, x_quant))
        margin("GPTAQ / GPTQ output error, white A4 noise, worst of 5 layers", max(ratios), below=1.0)

    def test_diagonal_hessian_reduces_to_rtn(self):
        """Uncorrelated inputs: no error is propagated, so GPTQ is round-to-nearest, in any column order."""
        weight = torch.randn(16, 32, dtype=torch.float64)
        hessian = torch.diag(torch.rand(32, dtype=torch.float64) + 0.5)
        for options in ({}, {"act_order": True}):
            torch.testing.assert_close(quantize_weight(weight, hessian, bits=3, **options),
                                       rtn_quantize_weight(weight, bits=3), rtol=0, atol=1e-12)
        got = quantize_weight(weight, hessian, bits=3, groupsize=8, act_order=True, static_groups=True)
        torch.testing.assert_close(got, rtn_quantize_weight(weight, bits=3, groupsize=8), rtol=0, atol=1e-12)

    def test_act_order_round_trips_the_permutation(self):
        """At high precision the result is W itself, column for column, whatever the processing order."""
        weight, x_full, x_quant = layer(seed=5)
        hessian, _ = statistics(x_full, x_quant)
        got = quantize_weight(weight, hessian, bits=14, act_order=True)
        torch.testing.assert_close(got, weight, rtol=0, atol=1e-3)

    def test_dead_columns_are_zeroed(self):
        weight, x_full, x_quant = layer()
        x_full[:, 3] = 0
        x_quant[:, 3] = 0
        hessian, drift = statistics(x_full, x_quant)
        for d in (None, drift):
            got = quantize_weight(weight, hessian, d, bits=4)
            assert torch.all(got[:, 3] == 0)
            assert torch.isfinite(got).all()

    def test_inputs_not_modified(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        hessian[:, 5] = 0
        hessian[5, :] = 0
        copies = [t.clone() for t in (weight, hessian, drift)]
        quantize_weight(weight, hessian, drift, bits=3, act_order=True, groupsize=8)
        for original, copy in zip((weight, hessian, drift), copies, strict=True):
            assert torch.equal(original, copy)

    def test_shared_hessian_gets_the_same_damping_each_time(self):
        weight, x_full, x_quant = layer()
        hessian, _ = statistics(x_full, x_quant)
        first = quantize_weight(weight, hessian, bits=3)
        for _ in range(2):
            assert torch.equal(quantize_weight(weight, hessian, bits=3), first)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_shape_dtype_device_preserved(self, dtype):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        got = quantize_weight(weight.to(dtype), hessian.float(), drift.float(), bits=4)
        assert got.dtype == dtype and got.shape == weight.shape and got.device == weight.device

    def test_sixteen_bits_returns_the_weight(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        assert torch.equal(quantize_weight(weight, hessian, drift, bits=16), weight)

    def test_result_lies_on_the_grid(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        got = quantize_weight(weight, hessian, drift, bits=2, groupsize=8)
        for row in got.reshape(-1, 8):
            assert row.unique().numel() <= 4

    def test_solve_reports_loss_and_damping(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        result = gptaq.solve(weight, hessian, drift, SolverConfig(bits=3, percdamp=0.05))
        assert result.loss > 0 and result.percdamp == 0.05 and result.seconds >= 0


class TestRecordedGrid:
    """The grid a solve reports is the one its weight lies on, as an exported checkpoint stores it."""

    @pytest.mark.parametrize("options", OPTIONS)
    def test_checkpoint_grid_matches_reference(self, options):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        expected = references.gptaq(weight, hessian, drift, bits=3, grid_format="gptq", **options)
        got = gptaq.solve(weight, hessian, drift, SolverConfig.of(bits=3, blocksize=16, grid="gptq", **options)).weight
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)

    @pytest.mark.parametrize("options", OPTIONS)
    @pytest.mark.parametrize("method", ["gptq", "gptaq", "qep", "qronos"])
    @pytest.mark.parametrize("grid", ["float", "gptq"])
    def test_codes_reproduce_the_weight_exactly(self, options, method, grid):
        weight, x_full, x_quant = layer(seed=3)
        hessian, drift = statistics(x_full, x_quant)
        config = SolverConfig.of(bits=3, blocksize=16, grid=grid, **options)
        result = METHODS[method].solve(weight.float(), hessian.float(), drift.float(), config, name="layer")
        codes = result.grid.codes(result.weight)
        assert codes.dtype == torch.int32 and 0 <= int(codes.min()) and int(codes.max()) <= 7
        assert torch.equal(result.grid.dequantize(codes), result.weight)
        groups = 40 // options["groupsize"] if "groupsize" in options else 1
        assert result.grid.scales.shape == result.grid.zeros.shape == (groups, 24)
        assert torch.bincount(result.grid.g_idx).tolist() == [40 // groups] * groups
        if grid == "gptq":
            assert torch.equal(result.grid.scales.half().float(), result.grid.scales)
            assert 1 <= int(result.grid.zeros.min()) and int(result.grid.zeros.max()) <= 7

    def test_act_order_groups_follow_the_solve_order(self):
        weight, x_full, x_quant = layer()
        hessian, _ = statistics(x_full, x_quant)
        result = gptq.solve(weight, hessian, None, SolverConfig(bits=3, groupsize=8, act_order=True))
        order = torch.argsort(torch.diagonal(hessian), descending=True)
        assert torch.equal(result.grid.g_idx[order], torch.arange(40) // 8)

    def test_rtn_grid(self):
        weight = torch.randn(6, 32)
        for groupsize, groups in ((-1, 1), (8, 4)):
            quantized, grid = rtn_quantize(weight, bits=4, groupsize=groupsize, grid_format="gptq")
            assert grid.scales.shape == (groups, 6)
            assert torch.equal(grid.dequantize(grid.codes(quantized)), quantized)
        assert rtn_quantize(weight, bits=16)[1] is None

    def test_a_changed_weight_is_not_on_its_grid(self):
        quantized, grid = rtn_quantize(torch.randn(6, 32), bits=4)
        with pytest.raises(ValueError, match="does not lie on its recorded grid"):
            grid.codes(quantized + 1e-3)


class TestErrors:
    def test_nan_statistics_name_the_layer(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        hessian[0, 0] = float("nan")
        with pytest.raises(CalibrationError, match=r"model.layers.3.mlp.up_proj.*H"):
            gptq.solve(weight, hessian, None, SolverConfig(bits=4), name="model.layers.3.mlp.up_proj")
        hessian, drift = statistics(x_full, x_quant)
        drift[1, 2] = float("inf")
        with pytest.raises(CalibrationError, match="D contains NaN or Inf"):
            gptaq.solve(weight, hessian, drift, SolverConfig(bits=4), name="fc1")

    def test_all_zero_hessian_is_an_error(self):
        weight = torch.randn(4, 6)
        with pytest.raises(CalibrationError, match="all zeros"):
            quantize_weight(weight, torch.zeros(6, 6), bits=4)

    def test_indefinite_hessian_retries_with_more_damping(self):
        weight, x_full, x_quant = layer()
        hessian, _ = statistics(x_full, x_quant)
        hessian = hessian - 0.05 * torch.diagonal(hessian).mean() * torch.eye(40, dtype=hessian.dtype)
        with pytest.warns(RuntimeWarning, match=r"blk\.1\.fc2.*retrying with 0\.1"):
            result = gptq.solve(weight, hessian, None, SolverConfig(bits=4), name="blk.1.fc2")
        assert result.percdamp == pytest.approx(0.1)
        assert torch.isfinite(result.weight).all()

    def test_hopeless_hessian_is_an_error(self):
        with pytest.raises(CalibrationError, match="not positive definite"), pytest.warns(RuntimeWarning):
            quantize_weight(torch.randn(3, 4), -torch.eye(4) * 1e9 + torch.ones(4, 4) * 1e3, bits=4)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"bits": 0}, "bits must be an integer in 1..16"),
            ({"bits": 17}, "bits must be an integer in 1..16"),
            ({"bits": 4, "groupsize": 7}, "groupsize must be -1 or a positive divisor of 40"),
            ({"bits": 4, "groupsize": 0}, "groupsize must be -1 or a positive"),
            ({"bits": 4, "blocksize": 0}, "blocksize must be a positive integer"),
            ({"bits": 4, "percdamp": -1.0}, "percdamp must be >= 0"),
            ({"bits": 4, "lazy_update": "fast"}, r"lazy_update must be one of \('exact', 'official'\)"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        with pytest.raises(ValueError, match=match):
            quantize_weight(weight, hessian, drift, **kwargs)

    def test_bad_shapes(self):
        with pytest.raises(ValueError, match=r"H must have shape \(6, 6\)"):
            quantize_weight(torch.randn(4, 6), torch.eye(5), bits=4)
        with pytest.raises(ValueError, match=r"D must have shape \(6, 6\)"):
            quantize_weight(torch.randn(4, 6), torch.eye(6), torch.eye(5), bits=4)


    @pytest.mark.parametrize(
        ("case", "error", "match"),
        [
            ("nan weight", ValueError, r"fc9: W contains 1 NaN or Inf entries"),
            ("inf weight", ValueError, r"fc9: W contains 2 NaN or Inf entries"),
            ("1-D weight", ValueError, r"fc9: W must be a 2-D floating-point tensor \[rows, columns\], got \(40,\)"),
            ("integer weight", ValueError, r"fc9: W must be a 2-D floating-point tensor"),
            ("empty weight", ValueError, r"fc9: W must not be empty"),
            ("one triangle of H", ValueError, r"fc9: H must be symmetric"),
            ("huge alpha", CalibrationError,
             r"fc9: the solve produced NaN or Inf weights from finite inputs \(alpha=1e\+30"),
        ],
    )
    def test_broken_inputs_and_results_are_refused_naming_the_layer(self, case, error, match):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full, x_quant)
        alpha = 0.25
        if case == "nan weight":
            weight[3, 5] = float("nan")
        elif case == "inf weight":
            weight[0, 0], weight[1, 1] = float("inf"), -float("inf")
        elif case == "1-D weight":
            weight = weight[0]
        elif case == "integer weight":
            weight = weight.round().to(torch.int32)
        elif case == "empty weight":
            weight = weight[:0]
        elif case == "one triangle of H":
            hessian = torch.triu(hessian)
        elif case == "huge alpha":
            alpha = 1e30
        with pytest.raises(error, match=match):
            gptaq.solve(weight, hessian, drift, SolverConfig.of(bits=4, alpha=alpha), name="fc9")

    @pytest.mark.parametrize("n", [5, 512, 513, 1100])
    def test_tiled_asymmetry_equals_the_whole_matrix_difference(self, n):
        matrix = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
        matrix = matrix + matrix.T
        matrix[n - 1, 0] += 3.0  # in the tile farthest from the diagonal
        assert column_loop._largest_asymmetry(matrix) == float((matrix - matrix.T).abs().max())

    def test_float_rounding_asymmetry_is_accepted(self):
        weight, x_full, x_quant = layer()
        hessian, drift = statistics(x_full.float(), x_quant.float())
        hessian[0, 1] *= 1 + 1e-6  # a float32 product's rounding, not a wrong matrix
        assert torch.isfinite(quantize_weight(weight.float(), hessian, drift, bits=4)).all()


class TestOutputError:
    def test_matches_direct_computation(self):
        weight, x_full, x_quant = layer()
        quantized = weight + 0.05 * torch.randn_like(weight)
        asym = CalibrationStatistics(40, asymmetric=True, dtype=torch.float64)
        asym.add(x_quant, x_full)
        expected = torch.linalg.norm(x_quant @ quantized.T - x_full @ weight.T) ** 2 / torch.linalg.norm(
            x_full @ weight.T
        ) ** 2
        reference = float(torch.linalg.norm(x_full @ weight.T) ** 2)
        assert asym.output_error(weight, quantized, reference) == pytest.approx(float(expected), rel=1e-9)
        with pytest.raises(ValueError, match="needs the reference"):
            asym.output_error(weight, quantized)
        sym = CalibrationStatistics(40, asymmetric=False, dtype=torch.float64)
        sym.add(x_quant)
        expected = torch.linalg.norm(x_quant @ (quantized - weight).T) ** 2 / torch.linalg.norm(
            x_quant @ weight.T
        ) ** 2
        assert sym.output_error(weight, quantized) == pytest.approx(float(expected), rel=1e-9)


class TestLargeLayerStructure:
    """Layers wider than one structure block (512 columns) take the blocked triangular paths."""

    def test_inverse_cholesky_factor_anddrift_correction(self):
        n = 1100
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
        hessian = 2 / x.shape[0] * x.T @ x
        drift = 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64)
        factorization = factorize(hessian, 0.01, "wide")
        upper, damp = factorization.upper, factorization.damp
        damped = hessian + damp * torch.diagonal(hessian).mean() * torch.eye(n, dtype=torch.float64)
        assert torch.equal(upper, torch.triu(upper))
        torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)
        expected = 0.25 * torch.triu(drift @ upper.T, diagonal=1) @ upper
        torch.testing.assert_close(drift_correction(drift, upper, 0.25), expected, rtol=1e-9, atol=1e-12)
