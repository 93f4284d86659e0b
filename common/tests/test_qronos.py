"""Qronos: the fast form against the literal definition (float64 least squares per row and column)."""

from __future__ import annotations

import pytest
import torch

from common.solvers import qep, qronos, references
from common.solvers.column_loop import SolverConfig
from common.solvers.gptaq import quantize_weight
from common.solvers.references import statistics
from common.tests.solver_layers import OPTIONS, assert_blocksize_free, layer, output_error, structured_drift_layer

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _fast(weight, x_full, x_quant, **options):
    hessian, drift = statistics(x_full, x_quant)
    return qronos.solve(weight, hessian, drift, SolverConfig.of(**{"bits": 3, "blocksize": 8, **options})).weight


@pytest.mark.parametrize("options", OPTIONS)
def test_fast_form_equals_the_literal_definition(options):
    weight, x_full, x_quant = layer(m=6, n=40, tokens=120, drift=0.3, seed=7)
    expected = references.qronos(weight, x_full, x_quant, bits=3, **options)
    fast = _fast(weight, x_full, x_quant, **options)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-9)
    hessian, drift = statistics(x_full, x_quant)
    gptq = quantize_weight(weight, hessian, bits=3, blocksize=8, **options)
    full_qep = qep.solve(weight, hessian, drift, SolverConfig.of(bits=3, blocksize=8, qep_alpha=1.0, **options)).weight
    assert not torch.equal(fast, gptq) and not torch.equal(fast, full_qep)  # the comparison is not vacuous


def test_after_the_first_column_the_correction_is_the_iterate():
    """The derivation's claim: from ``t = 2`` on, step 1's coordinate minimum ``c_t`` is the iterate ``v_t``."""
    weight, x_full, x_quant = layer(m=3, n=16, tokens=60, drift=0.3, seed=8)
    trace = []
    references.qronos(weight, x_full, x_quant, bits=3, trace=trace)
    assert len(trace) == 3 * 15
    assert max(abs(c - v) for _, c, v in trace) < 1e-9


@pytest.mark.parametrize("options", OPTIONS)
def test_blocked_equals_unblocked(options):
    weight, x_full, x_quant = layer(seed=9)
    assert_blocksize_free(lambda b: _fast(weight, x_full, x_quant, blocksize=b, **options), (1, 5, 40))


@pytest.mark.parametrize("options", OPTIONS)
def test_without_drift_it_is_gptq(options):
    weight, x_full, _ = layer(seed=10)
    hessian, _ = statistics(x_full, x_full)
    gptq = quantize_weight(weight, hessian, bits=3, blocksize=8, **options)
    torch.testing.assert_close(_fast(weight, x_full, x_full, **options), gptq, rtol=0, atol=1e-9)


def test_reduces_the_output_error_under_structured_drift(margin):
    ratios = []
    for seed in range(5):
        weight, x_full, x_quant = structured_drift_layer(seed)
        hessian, drift = statistics(x_full, x_quant)
        gptq = quantize_weight(weight, hessian, bits=4)
        corrected = qronos.solve(weight, hessian, drift, SolverConfig(bits=4)).weight
        ratios.append(output_error(corrected, weight, x_full, x_quant) / output_error(gptq, weight, x_full, x_quant))
    margin("Qronos / GPTQ output error, worst of 5 layers", max(ratios), below=0.9)


def test_needs_the_drift():
    weight, x_full, x_quant = layer()
    hessian, _ = statistics(x_full, x_quant)
    with pytest.raises(ValueError, match=r"blk\.2\.fc1: this method needs the drift statistic D"):
        qronos.solve(weight, hessian, None, SolverConfig(bits=4), name="blk.2.fc1")
