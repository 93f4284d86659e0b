"""What a weight-only run does with ``gptq`` checkpoints: export each quantized model, find the exported ones.

``--export_gptq DIR`` writes ``DIR/<method>/`` per quantizing method (:func:`export_checkpoint`);
``--load_gptq DIR`` evaluates the checkpoints under ``DIR`` that match the run's settings
(:func:`exported_methods`, then :func:`read_exported`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from common.config import ConfigError
from common.export.checkpoint import (
    CheckpointError,
    GptqSettings,
    GptqTensors,
    read_gptq_checkpoint,
    read_quantization_config,
    write_gptq_checkpoint,
    write_gptq_shards,
)
from common.methods import METHODS
from common.run_settings import RunSettings

logger = logging.getLogger(__name__)

COMPARED_KEYS = ("bits", "group_size", "desc_act", "sym")
"""The checkpoint settings that must equal the run's for its checkpoints to be evaluated as the run's."""


def gptq_settings(config: RunSettings, method: str) -> GptqSettings:
    """The checkpoint's ``quantization_config`` for a run's settings."""
    return GptqSettings(bits=config.w_bits, group_size=config.w_groupsize, desc_act=config.act_order,
                        sym=not config.w_asym, damp_percent=config.percdamp, method=method)


def export_checkpoint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path,
                      config: RunSettings, method: str) -> Path:
    """Write ``<folder>/<method>/`` (see :mod:`common.export.checkpoint`); returns it."""
    model.to("cpu")
    written = write_gptq_checkpoint(model, folder / method, gptq_settings(config, method), tokenizer)
    logger.info("%s: wrote the gptq checkpoint %s", method, written)
    return written


def export_blocks(shards: Iterable[dict[str, torch.Tensor]], count: int, model_config: Mapping[str, Any],
                  tokenizer: PreTrainedTokenizerBase, folder: Path, config: RunSettings, method: str) -> Path:
    """Write ``<folder>/<method>/`` from ``count`` shards produced one at a time (a model held one block at a time,
    see :func:`common.llama.blockwise_run.exported_shards`); returns it."""
    written = write_gptq_shards(shards, count, model_config, folder / method, gptq_settings(config, method), tokenizer)
    logger.info("%s: wrote the gptq checkpoint %s", method, written)
    return written


def exported_methods(config: RunSettings, folder: Path) -> list[str]:
    """The methods to evaluate from ``folder``: the full-precision reference and every quantizing method with
    a checkpoint folder whose settings are this run's; ``ConfigError`` naming ``load_gptq`` otherwise."""
    methods = []
    for method in config.methods:
        checkpoint = folder / method / "config.json"
        if METHODS[method].quantized and not checkpoint.is_file():
            continue
        if METHODS[method].quantized:
            try:
                stored = read_quantization_config(checkpoint.parent)
            except CheckpointError as error:
                raise ConfigError(f"load_gptq: {error}") from None
            expected = gptq_settings(config, method).as_dict()
            differ = [key for key in COMPARED_KEYS if stored.get(key) != expected[key]]
            if differ:
                raise ConfigError(f"load_gptq: {checkpoint} was quantized with other settings than this run's ("
                                  + ", ".join(f"{key}: {stored.get(key)!r} vs {expected[key]!r}" for key in differ)
                                  + "); give the config it was exported with")
        methods.append(method)
    if not any(METHODS[m].quantized for m in methods):
        raise ConfigError(f"load_gptq: {folder} holds no <method>/config.json for any of {config.methods}")
    return methods


def read_exported_tensors(folder: Path, method: str) -> GptqTensors:
    """The tensors of ``folder/<method>/``, read (and dequantized) one at a time; ``ConfigError`` naming
    ``load_gptq``."""
    try:
        return GptqTensors(folder / method)
    except CheckpointError as error:
        raise ConfigError(f"load_gptq: {error}") from None


def read_exported(folder: Path, method: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``folder/<method>/`` encodes (this repo's reader); ``ConfigError`` naming ``load_gptq``."""
    try:
        return read_gptq_checkpoint(folder / method, dtype=dtype)[0]
    except CheckpointError as error:
        raise ConfigError(f"load_gptq: {error}") from None
