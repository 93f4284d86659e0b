"""One rule per setting: the command line's settings and the Python API accept and refuse the same values."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from common.methods import METHOD_PARAMETERS, METHODS
from common.quant.quantizers import ActivationQuantizer, WeightQuantizer, rtn_quantize_weight
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
def test_a_method_parameter_is_refused_alike_by_the_settings_and_the_solver_config(parameter, value):
    with pytest.raises(ConfigError, match=f"{parameter} must be"):
        RunSettings(**{parameter: value})
    with pytest.raises(ConfigError, match=f"{parameter} must be"):
        SolverConfig(bits=4, parameters={parameter: value})
    with pytest.raises(ConfigError, match=f"{parameter} must be"):
        SolverConfig.of(bits=4, **{parameter: value})
    with pytest.raises(ConfigError, match=f"{parameter} must be"):
        SolverConfig(bits=4).with_parameters(**{parameter: value})


def test_an_unknown_solver_parameter_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"a solver parameter must be one of \('alpha'.*got 'alhpa'"):
        SolverConfig.of(bits=4, alhpa=0.5)


def test_every_method_parameter_is_a_run_setting_with_its_declared_default_and_meaning():
    fields = {field.name: field for field in dataclasses.fields(RunSettings)}
    for name, parameter in METHOD_PARAMETERS.items():
        assert fields[name].default == parameter.default
        assert fields[name].metadata["help"] == parameter.meaning
        assert parameter.value(SolverConfig(bits=4)) == parameter.default


def test_a_zero_scale_is_accepted():
    weight, x_full, x_quant = layer(m=8, n=16, tokens=64)
    hessian, drift = statistics(x_full, x_quant)
    for name in METHOD_PARAMETERS:
        RunSettings(**{name: 0.0})
        for method in METHODS.values():
            if name in {p.name for p in method.parameters}:
                config = method.solver_config(SolverConfig(bits=4, parameters={name: 0.0}))
                assert torch.isfinite(method.solve(weight, hessian, drift, config).weight).all()


ONE_BIT_SYMMETRIC = [  # (how the grid is asked for, the call) — each a 1-bit symmetric grid: levels {-s, 0}
    ("RunSettings weights", lambda: RunSettings(w_bits=1, w_asym=False)),
    ("RunSettings activations", lambda: RunSettings(a_bits=1, a_asym=False)),
    ("SolverConfig", lambda: SolverConfig(bits=1, sym=True)),
    ("rtn_quantize_weight", lambda: rtn_quantize_weight(torch.randn(4, 8), bits=1, sym=True)),
    ("WeightQuantizer", lambda: WeightQuantizer(1, sym=True)),
    ("ActivationQuantizer", lambda: ActivationQuantizer(1, sym=True)),
]


@pytest.mark.parametrize("call", [call for _, call in ONE_BIT_SYMMETRIC], ids=[name for name, _ in ONE_BIT_SYMMETRIC])
def test_a_one_bit_symmetric_grid_is_refused_everywhere(call):
    with pytest.raises(ValueError, match=r"must be at least 2 for a symmetric grid .* levels \{-s, 0\}"):
        call()


def test_a_one_bit_asymmetric_grid_is_accepted_and_keeps_a_level_off_zero():
    RunSettings(w_bits=1, a_bits=1)
    SolverConfig(bits=1)
    weight = torch.tensor([[-0.2, 0.9, 1.0, -0.1]])  # levels {0, 1.2}: the zero point follows the range
    assert rtn_quantize_weight(weight, bits=1).tolist() == [[0.0, 1.2000000476837158, 1.2000000476837158, 0.0]]


def _path_settings():
    from fake_quant.settings import LlamaRunConfig
    from spinquant.settings import SpinQuantConfig
    from vit_quant.settings import VitRunConfig

    return [(cls, field.name) for cls in (LlamaRunConfig, SpinQuantConfig, VitRunConfig)
            for field in dataclasses.fields(cls) if field.metadata.get("path")]


NEEDS = {  # what a path setting needs beside it to be accepted at all
    "export_gptq": {"a_bits": 16, "w_grid": "gptq", "rotate": False},
    "save_qmodel_path": {"model_loading": "whole"},
    "load_qmodel_path": {"model_loading": "whole"},
    "checkpoint": {"model": "deit_tiny_patch16_224"},
}


@pytest.mark.parametrize(("cls", "name"), _path_settings(), ids=lambda value: getattr(value, "__name__", value))
def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(cls, name):
    config = cls(**{name: "~/gptaq-somewhere", **NEEDS.get(name, {})})
    assert getattr(config, name) == os.path.expanduser("~/gptaq-somewhere") != "~/gptaq-somewhere"


def test_solver_config_of_sorts_fields_from_parameters():
    config = SolverConfig.of(bits=3, blocksize=8, alpha=0.5, parameters={"qep_alpha": 0.1})
    assert (config.bits, config.blocksize) == (3, 8)
    assert dict(config.parameters) == {"qep_alpha": 0.1, "alpha": 0.5}
    assert dict(config.with_parameters(alpha=0.0).parameters) == {"qep_alpha": 0.1, "alpha": 0.0}
