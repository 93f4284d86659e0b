"""What a weight-only run does with exported checkpoints: export each quantized model, find the exported ones.

``--export_gptq DIR`` writes ``DIR/<method>/`` per quantizing method in ``export_format``
(:class:`Exporter`); ``--load_gptq DIR`` evaluates the checkpoints under ``DIR``
that match the run's settings, whatever their format (:func:`exported_methods`, then :func:`read_exported`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from common.config import ConfigError
from common.export.checkpoint import (
    CheckpointError,
    ExportedTensors,
    ExportSettings,
    read_checkpoint,
    read_stored_settings,
    write_checkpoint,
    write_shards,
)
from common.methods import METHODS
from common.run_settings import RunSettings

logger = logging.getLogger(__name__)


@dataclass
class Exporter:
    """Writes a run's checkpoints, ``<folder>/<method>/`` in ``export_format`` (one of
    :data:`common.export.formats.EXPORT_FORMATS`), for a model in ``dtype``."""

    folder: Path
    export_format: str
    config: RunSettings
    dtype: torch.dtype
    tokenizer: PreTrainedTokenizerBase | None = None

    def settings(self, method: str) -> ExportSettings:
        """What the checkpoint of ``method`` stores."""
        config = self.config
        return ExportSettings(format=self.export_format, bits=config.w_bits, group_size=config.w_groupsize,
                              desc_act=config.act_order, sym=not config.w_asym, damp_percent=config.percdamp,
                              method=method, dtype=self.dtype)

    def write_model(self, model: torch.nn.Module, method: str) -> Path:
        """Write ``<folder>/<method>/`` from a whole quantized model; returns it."""
        model.to("cpu")
        return self._written(write_checkpoint(model, self.folder / method, self.settings(method), self.tokenizer),
                             method)

    def write_shards(self, settings: ExportSettings, shards: Iterable[dict[str, torch.Tensor]], count: int,
                     model_config: Mapping[str, Any]) -> Path:
        """Write ``<folder>/<method>/`` from ``count`` shards packed with ``settings`` and produced one at a time
        (a model held one block at a time, see :func:`common.llama.blockwise_run.exported_shards`)."""
        folder = self.folder / settings.method
        return self._written(write_shards(shards, count, model_config, folder, settings, self.tokenizer),
                             settings.method)

    def _written(self, folder: Path, method: str) -> Path:
        logger.info("%s: wrote the %s checkpoint %s", method, self.export_format, folder)
        return folder


def exported_methods(config: RunSettings, folder: Path, export_format: str) -> list[str]:
    """The methods of ``config`` to evaluate from ``folder``: the full-precision reference and every quantizing
    method, each with a checkpoint folder in ``export_format`` whose settings are this run's; ``ConfigError``
    naming ``load_gptq`` otherwise (a method without its folder included: it is never skipped)."""
    missing = [method for method in config.methods
               if METHODS[method].quantized and not (folder / method / "config.json").is_file()]
    if missing:
        present = sorted(path.parent.name for path in folder.glob("*/config.json"))
        raise ConfigError(f"load_gptq: {folder} holds no checkpoint of {missing} (no <method>/config.json; it holds "
                          f"{present or 'none'}): give methods the run exported")
    methods = []
    for method in config.methods:
        checkpoint = folder / method / "config.json"
        if METHODS[method].quantized:
            try:
                stored = read_stored_settings(checkpoint.parent).compared()
            except CheckpointError as error:
                raise ConfigError(f"load_gptq: {error}") from None
            if stored["format"] != export_format:
                raise ConfigError(f"load_gptq: {checkpoint} is a {stored['format']} checkpoint, not "
                                  f"{export_format}: give export_format: {stored['format']}")
            expected = {"bits": config.w_bits, "group_size": config.w_groupsize, "desc_act": config.act_order,
                        "sym": not config.w_asym}
            differ = [key for key in expected if stored[key] != expected[key]]
            if differ:
                raise ConfigError(f"load_gptq: {checkpoint} was quantized with other settings than this run's ("
                                  + ", ".join(f"{key}: {stored[key]!r} vs {expected[key]!r}" for key in differ)
                                  + "); give the config it was exported with")
        methods.append(method)
    if not any(METHODS[m].quantized for m in methods):
        raise ConfigError(f"load_gptq: methods must name a quantized method to read from {folder}, got "
                          f"{config.methods}")
    return methods


def read_exported_tensors(folder: Path, method: str) -> ExportedTensors:
    """The tensors of ``folder/<method>/``, read (and dequantized) one at a time; ``ConfigError`` naming
    ``load_gptq``."""
    try:
        return ExportedTensors(folder / method)
    except CheckpointError as error:
        raise ConfigError(f"load_gptq: {error}") from None


def read_exported(folder: Path, method: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``folder/<method>/`` encodes (this repo's reader); ``ConfigError`` naming ``load_gptq``."""
    try:
        return read_checkpoint(folder / method, dtype=dtype)[0]
    except CheckpointError as error:
        raise ConfigError(f"load_gptq: {error}") from None
