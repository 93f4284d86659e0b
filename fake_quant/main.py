"""QuaRot + GPTQ/GPTAQ for Llama models: ``python -m fake_quant.main --config fake_quant/configs/<x>.yaml``.

One run rotates the model once, then evaluates the same rotated model in full precision and quantized
with RTN, GPTQ and GPTAQ (same seed, same calibration windows), and writes ``results/<name>.csv`` (a row
per metric, a column per method) with a sidecar JSON of settings, timings and per-layer errors.
Weight-only runs can also write each quantized model as a checkpoint (``--export_gptq DIR``, in
``--export_format`` gptq, gptq_v2 or compressed-tensors) and evaluate such checkpoints again with this repo's
reader (``--load_gptq DIR``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_model as load_saved_model

from common import distributed
from common.cli import run_cli
from common.engine.resume import CheckpointError
from common.export.checkpoint import CheckpointError as ExportedCheckpointError
from common.export.runs import Exporter, exported_methods, read_exported, read_exported_tensors
from common.export.saved_models import (
    check_saved_models,
    load_saved_settings,
    prepare_save_folder,
    save_quantized_model,
)
from common.llama.adapter import add_layer_quantizers
from common.llama.blockwise import BlockwiseLlama, CheckpointTensors
from common.llama.blockwise_run import (
    RunCheckpoint,
    check_checkpoint_folder,
    compare_blockwise,
    evaluate_blockwise,
    run_identity,
)
from common.llama.experiment import (
    DTYPES,
    PerExample,
    activation_quantizer_options,
    add_quantizers,
    compare_rotated,
    data_identity,
    evaluate,
    load_data,
    load_model,
    load_tokenizer,
    model_folder,
    preflight,
    quantizing,
    write_llama_run,
)
from common.llama.loading import ModelLoadError
from common.llama.rotation import LlamaShape
from common.lm.corpora import CorpusUnavailableError
from common.lm.zeroshot import ZeroShotUnavailableError
from common.methods import METHODS
from common.pipeline import metric_rows
from common.quant.qlinear import set_input_quantization
from common.run import Run, start_run
from fake_quant.rotation import QuaRot, RotationInfo, rotate_model
from fake_quant.settings import LlamaRunConfig

logger = logging.getLogger("fake_quant")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def build_quantizable_model(config: LlamaRunConfig):
    """Load, rotate and wrap the model: returns ``(model, rotation_info or None)``."""
    model = load_model(config)
    rotation = rotate_model(model, **rotation_options(config)) if config.rotate else None
    add_quantizers(model, config)
    return model, rotation


def rotation_options(config: LlamaRunConfig) -> dict[str, object]:
    """The keyword arguments of QuaRot (:func:`fake_quant.rotation.rotate_model`, :meth:`QuaRot.build`) from the
    run's settings."""
    return {"mode": config.rotate_mode, "seed": config.seed, "k_bits": config.k_bits, "v_bits": config.v_bits,
            "kv_clip_ratio": config.kv_clip_ratio, "online": config.rotate_online}


def blockwise_model(config: LlamaRunConfig) -> tuple[BlockwiseLlama, RotationInfo | None]:
    """The model one block at a time, each block rotated (QuaRot) and given its quantizers as it is read."""
    options = activation_quantizer_options(config)
    llama = BlockwiseLlama(model_folder(config), DTYPES[config.dtype],
                           add_quantizers=lambda layer: add_layer_quantizers(layer, **options))
    if not config.rotate:
        return llama, None
    plan = QuaRot.build(LlamaShape.from_config(llama.config), llama.config._attn_implementation,
                        **rotation_options(config))
    llama.set_rotation(plan, plan.info.attn_implementation)
    return llama, plan.info


def preflight_blockwise(config: LlamaRunConfig) -> None:
    """:func:`preflight`, a local model folder must hold a safetensors checkpoint (read one block at a time), and
    the checkpoint folder must be the run's own (:func:`check_checkpoint_folder`)."""
    preflight(config, calibrate=config.calibrates)
    if Path(config.model).is_dir():
        CheckpointTensors(config.model)
    check_checkpoint_folder(config.checkpoint_folder)


def _exporter(config: LlamaRunConfig, tokenizer) -> Exporter | None:
    """The writer of ``export_gptq``'s checkpoints, or ``None``."""
    if not config.export_gptq:
        return None
    return Exporter(Path(config.export_gptq), config.export_format, config, DTYPES[config.dtype], tokenizer)


def run_blockwise(config: LlamaRunConfig) -> tuple[Path, Path]:
    """:func:`run` one block in memory at a time, resuming from the run's checkpoint folder."""
    started, _ = start_run(config, lambda: preflight_blockwise(config))
    timer, device = started.timer, started.device
    with timer("data"):
        tokenizer = load_tokenizer(config)
        calibration, eval_sets = load_data(tokenizer, config, calibrate=config.calibrates)
    with timer("load and rotate"):
        llama, rotation = blockwise_model(config)
    identity = run_identity(config, data_identity(config), llama.tensors.identity(), trees=("common", "fake_quant"))
    checkpoint = RunCheckpoint(config.checkpoint_folder, identity, restart=config.restart)
    per_example: PerExample = {}
    rows, layers = compare_blockwise(llama, config, config.methods, calibration=calibration, eval_sets=eval_sets,
                                     device=device, timer=timer, checkpoint=checkpoint, per_example=per_example,
                                     exporter=_exporter(config, tokenizer))
    rotation_settings = dataclasses.asdict(rotation) if rotation else None
    paths = write_llama_run(started, rows, layers=layers, metadata={"rotation": rotation_settings},
                            per_example={config.setting: per_example})
    if config.keep_checkpoint:
        logger.info("checkpoint kept: %s (%.1f MiB)", checkpoint.folder, checkpoint.disk_bytes() / 2**20)
    else:
        checkpoint.remove()
    return paths


def evaluate_checkpoints(config: LlamaRunConfig) -> tuple[Path, Path]:
    """Evaluate every checkpoint under ``load_gptq`` (and the full-precision model) and write the result files."""
    folder = Path(config.load_gptq)
    methods = exported_methods(config, folder, config.export_format)
    started, _ = start_run(config, lambda: preflight(config, calibrate=False))
    timer = started.timer
    with timer("data"):
        tokenizer = load_tokenizer(config)
        _, eval_sets = load_data(tokenizer, config, calibrate=False)
    if config.model_loading == "blockwise":
        return _evaluate_checkpoints_blockwise(started, config, folder, methods, eval_sets)
    with timer("load"):
        model = load_model(config)
    results: dict[str, dict[str, float]] = {}
    per_example: PerExample = {}
    for method in methods:
        with timer(f"read {method}"):
            evaluated = read_exported(folder, method, DTYPES[config.dtype]) if METHODS[method].quantized else model
        with timer(f"evaluate {method}"):
            results[method] = evaluate(evaluated, tokenizer, config, method, eval_sets, started.device,
                                       per_example.setdefault(method, {}))
        evaluated.to("cpu")
        del evaluated  # one checkpoint in memory at a time
    return write_llama_run(started, metric_rows(results, methods), layers={},
                           metadata={"rotation": None, "checkpoints": config.load_gptq},
                           per_example={config.setting: per_example})


def _evaluate_checkpoints_blockwise(started: Run, config: LlamaRunConfig, folder: Path, methods: list[str],
                                    eval_sets: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """:func:`evaluate_checkpoints` reading each checkpoint (and the full-precision model) one block at a time."""
    results: dict[str, dict[str, float]] = {}
    per_example: PerExample = {}
    dtype = DTYPES[config.dtype]
    for method in methods:
        with started.timer(f"evaluate {method}"):
            if METHODS[method].quantized:
                exported = folder / method
                llama = BlockwiseLlama(exported, dtype, tensors=read_exported_tensors(folder, method))
            else:
                llama = BlockwiseLlama(model_folder(config), dtype)
            results[method] = evaluate_blockwise(llama, config, method, eval_sets, started.device,
                                                 per_example.setdefault(method, {}))
    return write_llama_run(started, metric_rows(results, methods), layers={},
                           metadata={"rotation": None, "checkpoints": config.load_gptq},
                           per_example={config.setting: per_example})


def run(config: LlamaRunConfig) -> tuple[Path, Path]:
    """Run every method of ``config`` and write the result files; returns their paths."""
    if config.load_gptq:
        return evaluate_checkpoints(config)
    if config.model_loading == "blockwise":
        return run_blockwise(config)
    methods = list(config.methods)
    if config.load_qmodel_path:
        config, methods = load_saved_settings(config, config.evaluation_settings())
    saved = Path(config.load_qmodel_path) if config.load_qmodel_path else None
    calibrate = config.calibrates and saved is None
    started, _ = start_run(config, lambda: preflight(config, calibrate=calibrate))
    timer, device = started.timer, started.device
    with timer("data"):
        tokenizer = load_tokenizer(config)
        calibration, eval_sets = load_data(tokenizer, config, calibrate=calibrate)
    with timer("load and rotate"):
        model, rotation = build_quantizable_model(config)
    rotation_settings = dataclasses.asdict(rotation) if rotation else None
    if saved is not None:
        check_saved_models(saved, methods, model)
    quantize_method = quantizing(model, config, calibration, device)
    exporter = _exporter(config, tokenizer)
    if config.save_qmodel_path and distributed.is_main():
        prepare_save_folder(Path(config.save_qmodel_path))

    def prepare(method: str):
        if saved is not None:
            if not METHODS[method].quantized:
                set_input_quantization(model, False)
            else:
                where = str(next(model.parameters()).device)
                load_saved_model(model, str(saved / f"{method}.safetensors"), device=where)
            return None
        report = quantize_method(method)
        writes = METHODS[method].quantized and distributed.is_main()  # every rank holds the same weights
        if config.save_qmodel_path and writes:
            save_quantized_model(model, Path(config.save_qmodel_path), method, dataclasses.asdict(config),
                                 rotation_settings)
        if exporter is not None and writes:
            began = time.perf_counter()
            exporter.write_model(model, method)
            report.add_part("export", time.perf_counter() - began, 0.0)
        return report

    per_example: PerExample = {}
    rows, layers = compare_rotated(model, tokenizer, config, methods, prepare=prepare, eval_sets=eval_sets,
                                   device=device, timer=timer, per_example=per_example)
    return write_llama_run(started, rows, layers=layers, metadata={"rotation": rotation_settings},
                           per_example={config.setting: per_example})


def main(argv: list[str] | None = None) -> int:
    expected = (ModelLoadError, CorpusUnavailableError, ZeroShotUnavailableError, CheckpointError,
                ExportedCheckpointError)
    return run_cli(LlamaRunConfig, run, argv, __doc__.splitlines()[0], expected)


if __name__ == "__main__":
    sys.exit(main())
