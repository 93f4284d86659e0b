"""The comparison every tree runs: one model, several methods of :mod:`common.methods`, the same data.

Trees describe their run with a :class:`common.run_settings.RunSettings` subclass and supply how to
prepare and evaluate the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from common import distributed
from common.engine.adapter import ModelAdapter
from common.engine.model import quantize_model
from common.engine.settings import CalibrationReport, CalibrationSettings
from common.methods import METHOD_PARAMETERS, get_method
from common.profile import StageProfile
from common.quant.qlinear import clear_weight_grids, set_input_quantization
from common.results.intervals import MEAN_SUFFIXES
from common.results.runs import STDERR_SUFFIX, MetricRow
from common.run_settings import RunSettings
from common.solvers.column_loop import SolverConfig
from common.weight_files import WeightSnapshot

logger = logging.getLogger(__name__)


def solver_config(settings: RunSettings) -> SolverConfig:
    """The layer-solver settings of a run (each method applies its own overrides; RTN uses the grid only)."""
    return SolverConfig(
        bits=settings.w_bits,
        sym=not settings.w_asym,
        groupsize=settings.w_groupsize,
        act_order=settings.act_order,
        static_groups=settings.static_groups,
        percdamp=settings.percdamp,
        blocksize=settings.blocksize,
        mse=settings.w_clip,
        lazy_update=settings.lazy_update,
        grid=settings.w_grid,
        parameters={name: getattr(settings, name) for name in METHOD_PARAMETERS},
    )


def quantize(
    model: nn.Module,
    adapter: ModelAdapter,
    method: str,
    settings: RunSettings,
    calibration_batches: Sequence[Any],
    *,
    device: torch.device,
    offload_device: torch.device | None = None,
) -> CalibrationReport | None:
    """Quantize ``model`` in place with ``method``; the full-precision reference switches activation
    quantization off instead."""
    spec = get_method(method, "methods")
    if not spec.quantized:
        set_input_quantization(model, False)
        return None
    calibration = calibration_settings(method, settings, device=device, offload_device=offload_device)
    report = quantize_model(model, adapter, calibration, calibration_batches)
    set_input_quantization(model, True)
    log_report(report)
    return report


def calibration_settings(method: str, settings: RunSettings, *, device: torch.device,
                         offload_device: torch.device | None = None) -> CalibrationSettings:
    """The engine's settings for quantizing with ``method`` (a quantizing method) in a run of ``settings``."""
    solver = solver_config(settings)
    return CalibrationSettings(
        method=method,
        solver=solver,
        act_quant_during_calibration=settings.act_quant_during_calibration,
        batch_size=settings.calib_batch_size,
        device=device,
        offload_device=offload_device,
        linear_solvers={name: solver.with_parameters(qep_alpha=0.0) for name in settings.qep_exclude},
    )


def log_report(report: CalibrationReport) -> None:
    """Log a calibrated method's mean relative output error."""
    if get_method(report.method).calibrated:
        logger.info("%s: mean relative output error %.4e over %d layers", report.method, report.mean_output_error(),
                    len(report.layers))


def compare_methods(
    model: nn.Module,
    methods: Sequence[str],
    *,
    prepare: Callable[[str], CalibrationReport | None],
    evaluate: Callable[[str], dict[str, float]],
    timer: StageProfile,
    stage_prefix: str = "",
    evaluation_flops: Callable[[], float] | None = None,
) -> tuple[list[MetricRow], dict[str, list[dict[str, Any]]]]:
    """Run ``prepare(method)`` then ``evaluate(method)`` for each method, from the same starting weights.

    ``evaluate`` returns ``{metric: value}``; metrics ending in ``_ppl`` are lower-is-better, those ending in
    ``_stderr`` are standard errors (see :mod:`common.results.runs`). Returns the
    metric rows (one per metric, a value per method) and the per-layer calibration records per method.
    ``stage_prefix`` (e.g. the rotation's name) starts the timer's stage names when a run compares
    several models. ``evaluation_flops`` (called once, before the first method, outside every stage) gives
    the FLOPs of one evaluation for the profile.
    """
    prefix = f"{stage_prefix} " if stage_prefix else ""
    results: dict[str, dict[str, float]] = {}
    layers: dict[str, list[dict[str, Any]]] = {}
    flops = evaluation_flops() if evaluation_flops is not None and distributed.is_main() else None
    with WeightSnapshot(model) as start:
        for method in methods:
            _compare_one(model, method, start, prepare, evaluate, timer, prefix, results, layers)
            timer.add(f"{prefix}evaluate {method}", 0.0, flops)
    return metric_rows(results, methods), layers


def metric_rows(results: dict[str, dict[str, float]], methods: Sequence[str]) -> list[MetricRow]:
    """One row per metric of ``results`` (``{method: {metric: value}}``), a value per method in ``methods``'
    order; perplexities, per-example means (:data:`MEAN_SUFFIXES`: NLL, KL) and standard errors are
    lower-is-better."""
    names = list(dict.fromkeys(name for values in results.values() for name in values))
    return [
        MetricRow(name, higher_is_better=not name.endswith(("_ppl", *MEAN_SUFFIXES, STDERR_SUFFIX)),
                  values={m: results[m][name] for m in methods if name in results.get(m, {})})
        for name in names
    ]


def _compare_one(model: nn.Module, method: str, start: WeightSnapshot, prepare, evaluate, timer: StageProfile,
                 prefix: str, results: dict, layers: dict) -> None:
    start.restore(model)
    clear_weight_grids(model)
    set_input_quantization(model, True)
    stage = f"{prefix}quantize {method}"
    with timer(stage):
        report = prepare(method)
    if report is not None:
        layers[method] = [dataclasses.asdict(layer) for layer in report.layers]
        for part, (seconds, flops) in report.parts.items():
            timer.add(f"{stage}: {part}", seconds, flops)
    with timer(f"{prefix}evaluate {method}"):
        results[method] = evaluate(method) if distributed.is_main() else {}
    distributed.wait_for_main(f"{prefix}evaluate {method}")  # the other ranks wait without a time limit
