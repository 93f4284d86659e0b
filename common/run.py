"""One path through a run, for every tree: its start (:func:`start_run`) and its result files
(:func:`write_results`).

A tree's ``run(config)`` is: ``run = start_run(config, preflight)`` (the output folders probed, the seed set,
the device picked, the profile started, and the tree's preflight run: everything that can be refused is
refused here, before any long work), then its own loading, rotation and :func:`common.pipeline.compare_methods`,
then ``write_results(run, rows, ...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.device import device_description, pick_device
from common.profile import StageProfile, start_profile
from common.results.runs import MetricRow, write_run
from common.run_settings import RunSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Run:
    """A started run: its settings, the device it computes on and its stage profile."""

    config: RunSettings
    device: torch.device
    timer: StageProfile


def start_run(config: RunSettings, preflight: Callable[[], T]) -> tuple[Run, T]:
    """Start a run of ``config``: probe its output folders, set the seed, pick the device, start the profile,
    then run ``preflight()`` (the tree's checks before any model or data is loaded) as the ``preflight``
    stage. Returns the run and what the preflight returned."""
    config.check_outputs()
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    timer = start_profile(device)
    with timer("preflight"):
        checked = preflight()
    return Run(config, device, timer), checked


def write_results(
    run: Run,
    rows: Sequence[MetricRow],
    *,
    layers: Mapping[str, Any],
    data_identity: Mapping[str, Any],
    metadata: Mapping[str, Any],
    per_example: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<results_dir>/<run name>.csv`` and ``.json`` (:func:`common.results.runs.write_run`).

    The JSON holds what every tree records (tree, seed, device, ``data_identity`` (hashes of the data),
    seconds, profile, per-layer ``layers``) and the tree's own ``metadata``; ``per_example``
    (``{row setting: {method: {metric: data}}}``) adds the paired intervals.
    """
    config, timer = run.config, run.timer
    return write_run(
        config.results_dir,
        config.run_name,
        model=config.model,
        setting=config.setting,
        rows=rows,
        settings=dataclasses.asdict(config),
        metadata={
            "tree": config.TREE,
            "seed": config.seed,
            "device": device_description(run.device),
            "data_sha256": dict(data_identity),
            "seconds": timer.seconds,
            "profile": timer.as_dict(),
            "layers": dict(layers),
            **metadata,
        },
        per_example=per_example,
    )
