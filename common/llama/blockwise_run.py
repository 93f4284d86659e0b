"""A Llama run held one block at a time, that resumes where a killed run stopped.

:func:`compare_blockwise` quantizes and evaluates a :class:`common.llama.blockwise.BlockwiseLlama` with each
method in turn, never holding more than one decoder block: calibration walks the blocks with the engine
(:func:`common.engine.model.quantize_blocks`), which keeps each quantized block in a file; the evaluation
computes perplexity layer by layer (:func:`common.lm.perplexity.blockwise_window_nlls`) from the same files.

Everything finished is kept in a :class:`RunCheckpoint` folder: per method, the quantized blocks and the
calibration's state after each block (:mod:`common.engine.resume`), then the evaluated metrics. Rerunning the
same command resumes from the last finished block of the method it was in, and writes the same result files
(apart from timings) as a run never interrupted. The folder records what it belongs to
(:func:`run_identity`); a rerun with anything different refuses, naming what changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import __version__ as transformers_version

from common import distributed
from common.config import ConfigError
from common.engine.model import quantize_blocks
from common.engine.resume import BlockFiles, CalibrationCheckpoint, SavingBlocks, file_bytes
from common.export.checkpoint import ExportSettings, packed_state
from common.export.runs import Exporter
from common.files import atomic_write_json, json_text
from common.llama.adapter import LlamaAdapter
from common.llama.blockwise import BlockwiseLlama
from common.llama.experiment import perplexity_metrics
from common.llama.settings import LlamaSettings
from common.lm.perplexity import blockwise_window_nlls
from common.methods import METHODS
from common.pipeline import calibration_settings, log_report, metric_rows
from common.profile import StageProfile
from common.quant.qlinear import set_input_quantization
from common.results.provenance import source_digest
from common.results.runs import MetricRow

logger = logging.getLogger(__name__)

IDENTITY = "identity.json"
METRICS = "metrics.json"
RUN_SETTINGS_IGNORED = ("restart", "keep_checkpoint", "checkpoint_dir")
"""Settings that say how to treat the checkpoint, not what it holds."""


def run_identity(config: LlamaSettings, data: Mapping[str, str], model_files: list[dict[str, object]],
                 trees: Sequence[str]) -> dict[str, Any]:
    """What a run's checkpoint belongs to: its settings, the data's hashes, the model's files, the code (a hash
    of the sources of ``trees``), the torch and transformers versions and the number of processes."""
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in RUN_SETTINGS_IGNORED}
    return {
        "settings": json.loads(json_text(settings)),
        "data_sha256": dict(data),
        "model_files": model_files,
        "code_sha256": source_digest(trees),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "world_size": distributed.world_size(),
    }


class RunCheckpoint:
    """A run's finished work in ``folder``: ``identity.json`` and, per method, ``<method>/`` with its quantized
    blocks, its calibration state and, once evaluated, ``metrics.json``.

    Args:
        folder: the checkpoint folder.
        identity: :func:`run_identity` of this run.
        restart: discard what the folder holds instead of resuming from it.

    Raises ``ConfigError`` (before any work) when the folder belongs to a different run, naming what differs,
    or holds files no run wrote (it would delete them once the run succeeds, or with ``restart``).
    """

    def __init__(self, folder: Path, identity: Mapping[str, Any], *, restart: bool = False) -> None:
        self.folder = Path(folder)
        kept = self.folder / IDENTITY
        check_checkpoint_folder(self.folder)
        if restart and self.folder.exists() and distributed.is_main():
            shutil.rmtree(self.folder)
        distributed.barrier()
        if kept.is_file():
            differ = _differences(json.loads(kept.read_text()), json.loads(json_text(identity)))
            if differ:
                raise ConfigError(f"checkpoint {self.folder} belongs to another run ({'; '.join(differ)}): rerun "
                                  f"with the same settings, data, model and code to resume, or pass --restart to "
                                  f"discard it")
            logger.info("resuming from checkpoint %s (%.1f MiB)", self.folder, file_bytes(self.folder) / 2**20)
        elif distributed.is_main():
            atomic_write_json(kept, identity)
        distributed.barrier()

    def method_folder(self, method: str) -> Path:
        return self.folder / method

    def metrics(self, method: str) -> dict[str, Any] | None:
        """What :meth:`keep_metrics` kept for ``method``, or ``None``."""
        path = self.method_folder(method) / METRICS
        return json.loads(path.read_text()) if path.is_file() else None

    def keep_metrics(self, method: str, kept: Mapping[str, Any]) -> None:
        if distributed.is_main():
            atomic_write_json(self.method_folder(method) / METRICS, kept)
        distributed.barrier()

    def disk_bytes(self) -> int:
        return file_bytes(self.folder) if self.folder.exists() else 0

    def remove(self) -> None:
        """Delete the folder (after the result files are written)."""
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def check_checkpoint_folder(folder: Path) -> None:
    """``folder`` is new, empty or a run's checkpoint; else ``ConfigError`` naming ``checkpoint_dir``: a run deletes
    its checkpoint folder once it succeeds (and with ``restart``), so it must not hold anything else."""
    if folder.is_dir() and not (folder / IDENTITY).is_file() and any(folder.iterdir()):
        raise ConfigError(f"checkpoint_dir: {folder} holds files this tool did not write (no {IDENTITY}): a run's "
                          f"checkpoint folder is deleted once the run succeeds; give a new or empty folder")


def _differences(kept: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"name: kept -> current"`` for each leaf that differs."""
    out = []
    for key in sorted(set(kept) | set(current)):
        a, b = kept.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_blockwise(
    llama: BlockwiseLlama,
    config: LlamaSettings,
    methods: Sequence[str],
    *,
    calibration: torch.Tensor | None,
    eval_sets: Mapping[str, torch.Tensor],
    device: torch.device,
    timer: StageProfile,
    checkpoint: RunCheckpoint,
    per_example: dict[str, dict[str, Any]],
    exporter: Exporter | None = None,
) -> tuple[list[MetricRow], dict[str, list[dict[str, Any]]]]:
    """Quantize (each quantizing method) and evaluate ``llama`` with every method, one block in memory at a
    time, resuming from ``checkpoint``; ``exporter``, if given, writes each quantized method's checkpoint.
    Returns the metric rows and the per-layer records per method (as :func:`common.pipeline.compare_methods`);
    ``per_example`` receives each method's per-example data."""
    results: dict[str, dict[str, float]] = {}
    layers: dict[str, list[dict[str, Any]]] = {}
    adapter = LlamaAdapter()
    offload_device = torch.device("cpu") if config.offload else device
    for method in methods:
        kept = checkpoint.metrics(method)
        if kept is None:
            kept = _run_method(llama, adapter, config, method, calibration, eval_sets, device, offload_device,
                               timer, checkpoint, exporter)
        else:
            logger.info("%s: finished in an earlier run, read from %s", method, checkpoint.method_folder(method))
            for stage, seconds in kept["stages"].items():
                timer.add(stage, seconds)
        results[method] = kept["metrics"]
        per_example[method] = kept["per_example"]
        if kept["layers"] is not None:
            layers[method] = kept["layers"]
    return metric_rows(results, methods), layers


def evaluate_blockwise(llama: BlockwiseLlama, config: LlamaSettings, label: str,
                       eval_sets: Mapping[str, torch.Tensor], device: torch.device, found: dict[str, Any],
                       load_block: Callable[[int], torch.nn.Module] | None = None) -> dict[str, float]:
    """``{<corpus>_ppl: perplexity}`` of ``llama`` computed layer by layer (blocks from ``load_block``, default
    ``llama.load``); ``found`` receives each window's mean NLL as :func:`common.llama.experiment.evaluate`'s
    ``per_example`` does."""
    return perplexity_metrics(label, eval_sets, found, lambda dataset, windows: blockwise_window_nlls(
        llama.embedded, load_block or llama.load, llama.final, windows, batch_size=config.eval_batch_size,
        device=device, desc=f"{label} {dataset}"))


def exported_shards(llama: BlockwiseLlama, files: BlockFiles,
                    settings: ExportSettings) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint tensors of a quantized blockwise model, one decoder block at a time (its quantized linears
    packed as ``settings`` says), then the tensors outside the blocks: the shards
    :func:`common.export.checkpoint.model_shards` makes of the same model in memory."""
    for index in range(len(llama)):
        block = llama.load(index)
        files.load_into(index, block)
        yield packed_state(block, settings, f"model.layers.{index}.")
    yield {name: tensor.contiguous() for name, tensor in llama.outside_blocks().items()}




def _run_method(llama: BlockwiseLlama, adapter: LlamaAdapter, config: LlamaSettings, method: str,
                calibration: torch.Tensor | None, eval_sets: Mapping[str, torch.Tensor], device: torch.device,
                offload_device: torch.device, timer: StageProfile, checkpoint: RunCheckpoint,
                exporter: Exporter | None) -> dict[str, Any]:
    """Quantize and evaluate one method; returns (and keeps) its metrics, per-example data, records and stage
    times."""
    files = BlockFiles(checkpoint.method_folder(method), adapter)
    quantized = METHODS[method].quantized
    before = dict(timer.seconds)
    report = None
    if quantized:
        settings = calibration_settings(method, config, device=device, offload_device=offload_device)
        stage = f"quantize {method}"
        with timer(stage):
            report = quantize_blocks(SavingBlocks(llama.load, len(llama), files), llama.embedded, adapter,
                                     settings, [calibration] if calibration is not None else [],
                                     checkpoints=CalibrationCheckpoint(files.folder))
        for part, (seconds, flops) in report.parts.items():
            timer.add(f"{stage}: {part}", seconds, flops)
        log_report(report)
        logger.info("checkpoint %s: %.1f MiB on disk", checkpoint.folder, checkpoint.disk_bytes() / 2**20)
        if exporter is not None and distributed.is_main():
            with timer(f"export {method}"):
                settings = exporter.settings(method)
                exporter.write_shards(settings, exported_shards(llama, files, settings), len(llama) + 1,
                                      llama.config.to_dict())

    def load_block(index: int):
        block = llama.load(index)
        if quantized:
            files.load_into(index, block)
        set_input_quantization(block, quantized)
        return block

    metrics: dict[str, float] = {}
    found: dict[str, Any] = {}
    with timer(f"evaluate {method}"):
        if distributed.is_main():
            metrics = evaluate_blockwise(llama, config, method, eval_sets, device, found, load_block)
    distributed.wait_for_main(f"evaluate {method}")
    kept = {
        "metrics": metrics,
        "per_example": found,
        "layers": [dataclasses.asdict(layer) for layer in report.layers] if report is not None else None,
        "stages": {stage: seconds - before.get(stage, 0.0) for stage, seconds in timer.seconds.items()
                   if seconds != before.get(stage, 0.0)},
    }
    checkpoint.keep_metrics(method, kept)
    return kept
