"""One rule per setting: the command line's settings and the Python API accept and refuse the same values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.methods import METHOD_PARAMETERS, METHODS
from common.rules import ConfigError
from common.run_settings import RunSettings
from common.solvers.column_loop import SolverConfig
from common.solvers.references import statistics
from common.tests.solver_layers import layer

SHARED = [  # (RunSettings field, SolverConfig field, a refused value, the message both give)
    ("blocksize", "blocksize", 0, "blocksize must be a positive integer"),
    ("percdamp", "percdamp", -0.1, "percdamp must be >= 0"),
    ("percdamp", "percdamp", float("inf"), "percdamp must be a finite number"),
    ("w_groupsize", "groupsize", 0, "groupsize must be -1 or a positive integer"),
    ("w_bits", "bits", 17, "bits must be an integer in 1..16"),
    ("lazy_update", "lazy_update", "fast", "lazy_update must be one of"),
]


@pytest.mark.parametrize(("run_field", "solver_field", "value", "message"), SHARED)
def test_a_solver_setting_is_refused_alike_by_the_settings_and_the_api(run_field, solver_field, value, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings(**{run_field: value})
    with pytest.raises(ValueError, match=message):
        SolverConfig(bits=4, **{solver_field: value}) if solver_field != "bits" else SolverConfig(bits=value)


@pytest.mark.parametrize("parameter", list(METHOD_PARAMETERS))
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_method_parameter_is_refused_alike_by_the_settings_and_by_every_method_that_reads_it(parameter, value):
    with pytest.raises(ConfigError, match=f"{parameter} must be"):
        RunSettings(**{parameter: value})
    weight, x_full, x_quant = layer(m=8, n=16, tokens=64)
    hessian, drift = statistics(x_full, x_quant)
    readers = [method for method in METHODS.values() if parameter in {p.name for p in method.parameters}]
    assert readers
    for method in readers:
        config = method.solver_config(SolverConfig(bits=4, **{parameter: value}))
        with pytest.raises(ConfigError, match=f"{parameter} must be"):
            method.solve(weight.float(), hessian.float(), drift.float(), config, name="layer")


def test_every_method_parameter_has_its_declared_default_in_both_settings():
    run_defaults = {field.name: field.default for field in dataclasses.fields(RunSettings)}
    solver_defaults = {field.name: field.default for field in dataclasses.fields(SolverConfig)}
    for name, parameter in METHOD_PARAMETERS.items():
        assert run_defaults[name] == parameter.default == solver_defaults[name]


def test_a_zero_scale_is_accepted():
    weight, x_full, x_quant = layer(m=8, n=16, tokens=64)
    hessian, drift = statistics(x_full, x_quant)
    for name in METHOD_PARAMETERS:
        RunSettings(**{name: 0.0})
        for method in METHODS.values():
            if name in {p.name for p in method.parameters}:
                config = method.solver_config(SolverConfig(bits=4, **{name: 0.0}))
                assert torch.isfinite(method.solve(weight, hessian, drift, config).weight).all()
