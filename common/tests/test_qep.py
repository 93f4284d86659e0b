"""QEP against its definition in float64: the corrected weight, then GPTQ; invariants and its effect."""

from __future__ import annotations

import pytest
import torch

from common.solvers import qep, references
from common.solvers.column_loop import SolverConfig, factorize
from common.solvers.gptaq import quantize_weight
from common.solvers.references import statistics
from common.tests.solver_layers import OPTIONS, assert_blocksize_free, layer, output_error, structured_drift_layer

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _solve(weight, hessian, drift, **options):
    return qep.solve(weight, hessian, drift, SolverConfig.of(**{"bits": 3, **options})).weight


@pytest.mark.parametrize("qep_alpha", [0.5, 1.0])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_the_definition(options, qep_alpha):
    weight, x_full, x_quant = layer(seed=2)
    hessian, drift = statistics(x_full, x_quant)
    got = _solve(weight, hessian, drift, blocksize=16, qep_alpha=qep_alpha, **options)
    expected = references.qep(weight, hessian, drift, bits=3, qep_alpha=qep_alpha, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("options", OPTIONS)
def test_blocked_equals_unblocked(options):
    weight, x_full, x_quant = layer(seed=3)
    hessian, drift = statistics(x_full, x_quant)
    assert_blocksize_free(lambda b: _solve(weight, hessian, drift, blocksize=b, **options))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_drift_it_is_gptq_bitwise(options, dtype):
    weight, x_full, _ = layer(seed=4)
    hessian, drift = statistics(x_full.to(dtype), x_full.to(dtype))
    assert not torch.any(drift)
    w = weight.to(dtype)
    gptq = quantize_weight(w, hessian, bits=3, blocksize=16, **options)
    assert torch.equal(_solve(w, hessian, drift, blocksize=16, **options), gptq)


@pytest.mark.parametrize("options", OPTIONS)
def test_zero_scale_is_gptq_bitwise(options):
    weight, x_full, x_quant = layer(seed=4)
    hessian, drift = statistics(x_full, x_quant)
    gptq = quantize_weight(weight, hessian, bits=3, blocksize=16, **options)
    assert torch.equal(_solve(weight, hessian, drift, blocksize=16, qep_alpha=0.0, **options), gptq)


def test_full_correction_alone_is_the_least_squares_weight():
    """With ``α_qep = 1`` and no damping the correction is ``argmin ‖X̃ Ŵᵀ − X Wᵀ‖`` (float64 least squares)."""
    weight, x_full, x_quant = layer(seed=5)
    hessian, drift = statistics(x_full, x_quant)
    factorization = factorize(hessian, 0.0, "layer")
    corrected = qep.drift_corrected(weight.clone(), drift, factorization, 1.0)
    least_squares = torch.linalg.lstsq(x_quant, x_full @ weight.T).solution.T
    torch.testing.assert_close(corrected, least_squares, rtol=0, atol=1e-9)
    wide = weight.repeat(3, 1)  # more rows than columns: the other product order
    torch.testing.assert_close(qep.drift_corrected(wide, drift, factorization, 1.0), least_squares.repeat(3, 1),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("qep_alpha", [0.5, 1.0])
def test_reduces_the_output_error_under_structured_drift(qep_alpha, margin):
    ratios = []
    for seed in range(5):
        weight, x_full, x_quant = structured_drift_layer(seed)
        hessian, drift = statistics(x_full, x_quant)
        gptq = quantize_weight(weight, hessian, bits=4)
        corrected = qep.solve(weight, hessian, drift, SolverConfig.of(bits=4, qep_alpha=qep_alpha)).weight
        ratios.append(output_error(corrected, weight, x_full, x_quant) / output_error(gptq, weight, x_full, x_quant))
    margin(f"QEP / GPTQ output error, worst of 5 layers, qep_alpha {qep_alpha}", max(ratios), below=0.9)


def test_needs_the_drift_and_refuses_a_non_finite_or_negative_scale():
    weight, x_full, x_quant = layer()
    hessian, drift = statistics(x_full, x_quant)
    with pytest.raises(ValueError, match="fc1: this method needs the drift statistic D"):
        qep.solve(weight, hessian, None, SolverConfig(bits=4), name="fc1")
    with pytest.raises(ValueError, match="qep_alpha must be a finite number"):
        qep.solve(weight, hessian, drift, SolverConfig.of(bits=4, qep_alpha=float("nan")))
    with pytest.raises(ValueError, match=r"qep_alpha must be >= 0 \(QEP's correction scale"):
        qep.solve(weight, hessian, drift, SolverConfig.of(bits=4, qep_alpha=-1.0))
