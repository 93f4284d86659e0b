"""The comparison every tree runs: one model, several methods of :mod:`common.methods`, the same data.

Trees describe their run with a :class:`common.run_settings.RunSettings` subclass and supply how to
prepare and evaluate the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import distributed
from common.cache import cache_root
from common.calibration import (
    CalibrationReport,
    CalibrationSettings,
    ModelAdapter,
    clear_weight_grids,
    quantize_model,
    set_input_quantization,
)
from common.files import sweep_stale_temporaries
from common.gptaq import SolverConfig
from common.methods import method as get_method
from common.profile import StageProfile
from common.results.runs import STDERR_SUFFIX, MetricRow
from common.run_settings import RunSettings

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
        alpha=settings.alpha,
        mse=settings.w_clip,
        lazy_update=settings.lazy_update,
        qep_alpha=settings.qep_alpha,
        grid=settings.w_grid,
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
    solver = solver_config(settings)
    calibration = CalibrationSettings(
        method=method,
        solver=solver,
        act_quant_during_calibration=settings.act_quant_during_calibration,
        batch_size=settings.calib_batch_size,
        device=device,
        offload_device=offload_device,
        linear_solvers={name: dataclasses.replace(solver, qep_alpha=0.0) for name in settings.qep_exclude},
    )
    report = quantize_model(model, adapter, calibration, calibration_batches)
    set_input_quantization(model, True)
    if spec.calibrated:
        logger.info("%s: mean relative output error %.4e over %d layers", method, report.mean_output_error(),
                    len(report.layers))
    return report


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
    order; metrics ending in ``_ppl`` or ``_stderr`` are lower-is-better."""
    names = list(dict.fromkeys(name for values in results.values() for name in values))
    return [
        MetricRow(name, higher_is_better=not name.endswith(("_ppl", STDERR_SUFFIX)),
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


class WeightSnapshot:
    """A model's weights kept in a file, not in memory, and read back into the model's own tensors.

    ``with WeightSnapshot(model) as start: ... start.restore(model)``. The file holds the raw bytes of every
    tensor of the state dict (tied tensors once), in the cache root (``$GPTAQ_CACHE_DIR``) under a name
    carrying the process id; it is removed on exit, and one a killed run left is swept by the next
    (:func:`common.files.sweep_stale_temporaries`). Restoring reads straight into the parameters (from the
    page cache, as a rule), so a run's resident memory holds one model, not two.
    """

    def __init__(self, model: nn.Module, folder: Path | None = None) -> None:
        folder = cache_root() / "snapshots" if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(folder)
        self.path = folder / f".weights.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self.entries: list[tuple[str, int, int]] = []
        offsets: dict[tuple[int, int], int] = {}
        with open(self.path, "wb") as handle:
            for name, tensor in model.state_dict().items():
                key = (tensor.data_ptr(), tensor.nbytes)
                if key not in offsets:
                    offsets[key] = handle.tell()
                    handle.write(_raw_bytes(tensor.detach().cpu().contiguous()))
                self.entries.append((name, offsets[key], tensor.nbytes))

    def restore(self, model: nn.Module) -> None:
        """Read the saved bytes back into ``model``'s parameters and buffers, in place."""
        state = model.state_dict()
        with open(self.path, "rb") as handle, torch.no_grad():
            for name, offset, size in self.entries:
                target = state[name]
                direct = target.device.type == "cpu" and target.is_contiguous()
                buffer = target if direct else torch.empty_like(target, device="cpu").contiguous()
                handle.seek(offset)
                if handle.readinto(_raw_bytes(buffer)) != size:
                    raise OSError(f"weight snapshot {self.path} is truncated at {name}")
                if not direct:
                    target.copy_(buffer)

    def __enter__(self) -> WeightSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())
