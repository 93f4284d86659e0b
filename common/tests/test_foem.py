"""FOEM against its definition in float64 (:func:`common.solvers.references.foem`), and its invariants."""

from __future__ import annotations

import pytest
import torch

from common.methods import METHODS
from common.rules import ConfigError
from common.solvers import foem, references
from common.solvers.column_loop import SolverConfig
from common.solvers.gptaq import quantize_weight
from common.solvers.references import statistics
from common.tests.solver_layers import OPTIONS, assert_blocksize_free, layer

pytestmark = pytest.mark.numerics  # float results against references: CI reruns them on other kernels


def _solve(weight, hessian, **options):
    return foem.solve(weight, hessian, None, SolverConfig.of(**{"bits": 3, **options})).weight


@pytest.mark.parametrize("beta", [0.1, 0.2])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_the_definition(options, beta):
    weight, _, x_quant = layer(seed=2)
    hessian, _ = statistics(x_quant, x_quant)
    got = _solve(weight, hessian, blocksize=16, foem_beta=beta, **options)
    expected = references.foem(weight, hessian, beta=beta, bits=3, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("options", OPTIONS)
def test_blocked_equals_unblocked(options):
    weight, _, x_quant = layer(seed=3)
    hessian, _ = statistics(x_quant, x_quant)
    assert_blocksize_free(lambda b: _solve(weight, hessian, blocksize=b, **options))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_beta_is_gptq_bitwise(options, dtype):
    weight, _, x_quant = layer(seed=4)
    hessian, _ = statistics(x_quant.to(dtype), x_quant.to(dtype))
    w = weight.to(dtype)
    gptq = quantize_weight(w, hessian, bits=3, blocksize=16, **options)
    assert torch.equal(_solve(w, hessian, blocksize=16, foem_beta=0.0, **options), gptq)


def test_first_column_is_gptqs_and_the_rest_differ():
    """Column 0 has nothing to pull (``w = w₀``); later columns see the first-order term."""
    weight, _, x_quant = layer(seed=5)
    hessian, _ = statistics(x_quant, x_quant)
    gptq = quantize_weight(weight, hessian, bits=3, blocksize=16)
    got = _solve(weight, hessian, blocksize=16)
    assert torch.equal(got[:, 0], gptq[:, 0])
    assert not torch.equal(got, gptq)


def test_beta_is_scale_free():
    """``β`` multiplies weight differences: scaling ``H`` by any factor leaves the result unchanged."""
    weight, _, x_quant = layer(seed=6)
    hessian, _ = statistics(x_quant, x_quant)
    torch.testing.assert_close(_solve(weight, 1000.0 * hessian), _solve(weight, hessian), rtol=0, atol=1e-9)


def test_reads_h_alone():
    assert METHODS["foem"].statistics == ("H",) and not METHODS["foem"].needs_full_precision_stream
    weight, _, x_quant = layer(seed=7)
    hessian, drift = statistics(x_quant + 0.5, x_quant)
    assert torch.equal(foem.solve(weight, hessian, drift, SolverConfig(bits=3)).weight, _solve(weight, hessian))


@pytest.mark.parametrize("beta", [-0.1, float("nan"), float("inf")])
def test_a_bad_beta_is_refused_naming_the_setting(beta):
    weight, _, x_quant = layer(seed=8)
    hessian, _ = statistics(x_quant, x_quant)
    with pytest.raises(ConfigError, match="foem_beta"):
        _solve(weight, hessian, foem_beta=beta)


@pytest.mark.parametrize("groupsize", [-1, 8, 20])
def test_official_form_matches_the_authors_code(groupsize):
    """``foem_official``: no pull at block starts, group grids from block-start values (GPTQModel's loop)."""
    weight, _, x_quant = layer(seed=9)
    hessian, _ = statistics(x_quant, x_quant)
    method = METHODS["foem_official"]
    for blocksize in (7, 16):
        expected = references.foem_official(weight, hessian, bits=3, blocksize=blocksize, groupsize=groupsize)
        config = method.solver_config(SolverConfig(bits=3, blocksize=blocksize, groupsize=groupsize))
        got = method.solve(weight, hessian, None, config).weight
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_official_form_depends_on_blocksize_and_agrees_with_the_definition_in_one_block_of_one():
    """Its pull skips each block's first column: with blocks of 1 it never pulls (GPTQ with FOEM's shifted
    error), with one block it pulls every column but the first (the definition)."""
    weight, _, x_quant = layer(seed=10)
    hessian, _ = statistics(x_quant, x_quant)
    method = METHODS["foem_official"]
    official = [method.solve(weight, hessian, None, method.solver_config(SolverConfig(bits=3, blocksize=b))).weight
                for b in (4, 1000)]
    assert not torch.equal(official[0], official[1])
    torch.testing.assert_close(official[1], _solve(weight, hessian, blocksize=1000), rtol=0, atol=1e-9)
