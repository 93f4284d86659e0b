"""Qronos: the fast form against the literal definition (float64 least squares per row and column)."""

from __future__ import annotations

import pytest
import torch

from common import qep, qronos
from common.gptaq import SolverConfig, quantize_weight
from common.quant.quantizers import WeightQuantizer
from common.tests.solver_references import OPTIONS, layer, output_error, statistics, structured_drift_layer

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)


def literal_qronos(weight, x_full, x_quant, *, bits, sym=False, groupsize=-1, act_order=False, static_groups=False,
                   percdamp=0.01, mse=False, trace=None):
    """Qronos as defined, slowly: per row ``w``, on ``F(v) = ‖X̃v − Xw‖² + λ'‖v − w‖²`` over the columns in
    solve order, ``c_t = argmin_c F(q_<t, c, v_>t)``, ``q_t = Q(c_t)``, ``v_>t = argmin F(q_≤t, ·)``, each
    a float64 least-squares problem with the ridge rows ``√λ' I`` (``λ' = N/2 · λ``, GPTQ's damping ``λ``).

    Grids: a group's (or the row's) grid from the iterate's values when its first column is quantized, with
    that column at ``c_t``; static groups from the unconstrained minimiser ``v*``. ``trace`` (a list)
    receives ``(t, c_t, v_t)`` for every column after the first.
    """
    tokens, n = x_quant.shape
    hessian = 2 / tokens * x_quant.T @ x_quant
    perm = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(n)
    ridge = tokens / 2 * percdamp * torch.diagonal(hessian).mean()
    a = torch.cat([x_quant[:, perm], ridge.sqrt() * torch.eye(n, dtype=x_quant.dtype)])
    quantizer = WeightQuantizer(bits, sym=sym, mse=mse)
    size = groupsize if groupsize > 0 else n
    result = torch.empty_like(weight)
    for row in range(weight.shape[0]):
        w = weight[row, perm]
        y = torch.cat([x_full[:, perm] @ w, ridge.sqrt() * w])
        v, q = w.clone(), torch.zeros_like(w)
        optimum = _least_squares(a, y)
        static = None
        if static_groups and groupsize > 0:
            unpermuted = torch.empty_like(optimum)
            unpermuted[perm] = optimum
            static = [quantizer.params(unpermuted[None, g:g + groupsize]) for g in range(0, n, groupsize)]
        for t in range(n):
            others = torch.cat([q[:t], v[t + 1:]])
            rest = y - torch.cat([a[:, :t], a[:, t + 1:]], dim=1) @ others
            c = torch.dot(a[:, t], rest) / torch.dot(a[:, t], a[:, t])
            if trace is not None and t > 0:
                trace.append((t, float(c), float(v[t])))
            if static is not None:
                scale, zero = static[int(perm[t]) // groupsize]
            elif t % size == 0:
                values = v.clone()
                values[t] = c
                scale, zero = quantizer.params(values[None, t:t + size])
            q[t] = quantizer.quantize(c.reshape(1, 1), scale, zero)[0, 0]
            if t + 1 < n:
                v[t + 1:] = _least_squares(a[:, t + 1:], y - a[:, :t + 1] @ q[:t + 1])
        result[row, perm] = q
    return result


def _fast(weight, x_full, x_quant, **options):
    hessian, drift = statistics(x_full, x_quant)
    return qronos.solve(weight, hessian, drift, SolverConfig(**{"bits": 3, "blocksize": 8, **options})).weight


@pytest.mark.parametrize("options", OPTIONS)
def test_fast_form_equals_the_literal_definition(options):
    weight, x_full, x_quant = layer(m=6, n=40, tokens=120, drift=0.3, seed=7)
    expected = literal_qronos(weight, x_full, x_quant, bits=3, **options)
    fast = _fast(weight, x_full, x_quant, **options)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-9)
    hessian, drift = statistics(x_full, x_quant)
    gptq = quantize_weight(weight, hessian, bits=3, blocksize=8, **options)
    full_qep = qep.solve(weight, hessian, drift, SolverConfig(bits=3, blocksize=8, qep_alpha=1.0, **options)).weight
    assert not torch.equal(fast, gptq) and not torch.equal(fast, full_qep)  # the comparison is not vacuous


def test_after_the_first_column_the_correction_is_the_iterate():
    """The derivation's claim: from ``t = 2`` on, step 1's coordinate minimum ``c_t`` is the iterate ``v_t``."""
    weight, x_full, x_quant = layer(m=3, n=16, tokens=60, drift=0.3, seed=8)
    trace = []
    literal_qronos(weight, x_full, x_quant, bits=3, trace=trace)
    assert len(trace) == 3 * 15
    assert max(abs(c - v) for _, c, v in trace) < 1e-9


@pytest.mark.parametrize("options", OPTIONS)
def test_blocked_equals_unblocked(options):
    weight, x_full, x_quant = layer(seed=9)
    results = [_fast(weight, x_full, x_quant, blocksize=b, **options) for b in (1, 5, 40)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-9)


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
