"""QuaRot + GPTQ/GPTAQ for Llama models: ``python -m fake_quant.main --config fake_quant/configs/<x>.yaml``.

One run rotates the model once, then evaluates the same rotated model in full precision and quantized
with RTN, GPTQ and GPTAQ (same seed, same calibration windows), and writes ``results/<name>.csv`` (a row
per metric, a column per method) with a sidecar JSON of settings, timings and per-layer errors.
Weight-only runs can also write each quantized model as a ``gptq`` checkpoint (``--export_gptq DIR``) and
evaluate such checkpoints again with this repo's reader (``--load_gptq DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from safetensors.torch import load_model as load_saved_model

from common import distributed
from common.cli import run_cli
from common.config import ConfigError
from common.device import pick_device
from common.export.checkpoint import (
    CheckpointError,
    GptqSettings,
    read_gptq_checkpoint,
    read_quantization_config,
    write_gptq_checkpoint,
)
from common.files import atomic_write, atomic_write_json
from common.llama.experiment import (
    DTYPES,
    PerExample,
    add_quantizers,
    compare_rotated,
    evaluate,
    load_data,
    load_model,
    load_tokenizer,
    preflight,
    quantizing,
    write_llama_run,
)
from common.llama.loading import ModelLoadError
from common.lm.corpora import CorpusUnavailableError
from common.lm.zeroshot import ZeroShotUnavailableError
from common.methods import METHODS
from common.pipeline import metric_rows
from common.profile import start_profile
from common.quant.qlinear import set_input_quantization
from fake_quant.rotation import RotationInfo, rotate_model
from fake_quant.settings import LlamaRunConfig

logger = logging.getLogger("fake_quant")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def build_quantizable_model(config: LlamaRunConfig):
    """Load, rotate and wrap the model: returns ``(model, rotation_info or None)``."""
    model = load_model(config)
    rotation = None
    if config.rotate:
        rotation = rotate_model(model, mode=config.rotate_mode, seed=config.seed, k_bits=config.k_bits,
                                v_bits=config.v_bits, kv_clip_ratio=config.kv_clip_ratio,
                                online=config.rotate_online)
    add_quantizers(model, config)
    return model, rotation


def save_qmodel(model, folder: Path, method: str, config: LlamaRunConfig, rotation: RotationInfo | None) -> None:
    """Write ``<folder>/<method>.safetensors`` (tensors shared by tied weights stored once) and ``settings.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    atomic_write(folder / f"{method}.safetensors", lambda tmp: save_model(model, tmp, metadata={"method": method}))
    atomic_write_json(folder / "settings.json", {
        "settings": dataclasses.asdict(config),
        "rotation": dataclasses.asdict(rotation) if rotation else None,
    })


def gptq_settings(config: LlamaRunConfig, method: str) -> GptqSettings:
    """The checkpoint's ``quantization_config`` for a run's settings."""
    return GptqSettings(bits=config.w_bits, group_size=config.w_groupsize, desc_act=config.act_order,
                        sym=not config.w_asym, damp_percent=config.percdamp, method=method)


def export_checkpoint(model, tokenizer, config: LlamaRunConfig, method: str) -> Path:
    """Write ``<export_gptq>/<method>/`` (see :mod:`common.export.checkpoint`)."""
    model.to("cpu")
    folder = write_gptq_checkpoint(model, Path(config.export_gptq) / method, gptq_settings(config, method), tokenizer)
    logger.info("%s: wrote the gptq checkpoint %s", method, folder)
    return folder


def exported_methods(config: LlamaRunConfig) -> list[str]:
    """The methods to evaluate from ``load_gptq``: the full-precision reference (from ``model``) and every
    quantizing method with a checkpoint folder whose settings are this run's; ``ConfigError`` otherwise."""
    folder = Path(config.load_gptq)
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
            differ = [key for key in ("bits", "group_size", "desc_act", "sym") if stored.get(key) != expected[key]]
            if differ:
                raise ConfigError(f"load_gptq: {checkpoint} was quantized with other settings than this run's ("
                                  + ", ".join(f"{key}: {stored.get(key)!r} vs {expected[key]!r}" for key in differ)
                                  + "); give the config it was exported with")
        methods.append(method)
    if not any(METHODS[m].quantized for m in methods):
        raise ConfigError(f"load_gptq: {folder} holds no <method>/config.json for any of {config.methods}")
    return methods


def evaluate_checkpoints(config: LlamaRunConfig) -> tuple[Path, Path]:
    """Evaluate every checkpoint under ``load_gptq`` (and the full-precision model) and write the result files."""
    methods = exported_methods(config)
    config.check_outputs()
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    timer = start_profile(device)
    preflight(config, timer, calibrate=False)
    with timer("data"):
        tokenizer = load_tokenizer(config)
        _, eval_sets = load_data(tokenizer, config, calibrate=False)
    with timer("load"):
        model = load_model(config)
    results: dict[str, dict[str, float]] = {}
    per_example: PerExample = {}
    for method in methods:
        with timer(f"read {method}"):
            try:
                evaluated = model if not METHODS[method].quantized else read_gptq_checkpoint(
                    Path(config.load_gptq) / method, dtype=DTYPES[config.dtype])[0]
            except CheckpointError as error:
                raise ConfigError(f"load_gptq: {error}") from None
        with timer(f"evaluate {method}"):
            results[method] = evaluate(evaluated, tokenizer, config, method, eval_sets, device,
                                       per_example.setdefault(method, {}))
        evaluated.to("cpu")
        del evaluated  # one checkpoint in memory at a time
    return write_llama_run(config, metric_rows(results, methods), settings=dataclasses.asdict(config), layers={},
                           timer=timer, device=device, metadata={"rotation": None, "checkpoints": config.load_gptq},
                           per_example={config.setting: per_example})


def load_saved_settings(config: LlamaRunConfig) -> tuple[LlamaRunConfig, list[str]]:
    """The saved run's model/rotation/quantization settings with this run's evaluation settings."""
    folder = Path(config.load_qmodel_path)
    settings_file = folder / "settings.json"
    if not settings_file.is_file():
        raise ConfigError(f"load_qmodel_path: {folder} holds no settings.json (save one with --save_qmodel_path)")
    try:
        saved = json.loads(settings_file.read_text(encoding="utf-8"))["settings"]
        evaluation = {name: getattr(config, name) for name in config.evaluation_settings()}
        merged = LlamaRunConfig(**{**saved, **evaluation, "save_qmodel_path": None,
                                   "load_qmodel_path": config.load_qmodel_path})
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"load_qmodel_path: {settings_file} is not a settings file this version wrote "
                          f"({type(error).__name__}: {error})") from None
    methods = [m for m in merged.methods if not METHODS[m].quantized or (folder / f"{m}.safetensors").is_file()]
    return merged, methods


def check_saved_models(folder: Path, methods: list[str], model: torch.nn.Module) -> None:
    """Every saved ``<method>.safetensors`` is readable and holds this model's tensors (names and shapes).

    Read from the files' headers alone, before any evaluation; ``ConfigError`` names the file.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for method in methods:
        if not METHODS[method].quantized:
            continue
        path = folder / f"{method}.safetensors"
        try:
            with safe_open(str(path), "pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            load_file(str(path))  # reads every tensor: a truncated file fails here
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ConfigError(f"load_qmodel_path: {path} is not a readable safetensors file ({error})") from None
        unknown = sorted(set(shapes) - set(expected))
        wrong = sorted(name for name in shapes.keys() & expected.keys() if shapes[name] != expected[name])
        missing = sorted(name for name in set(expected) - set(shapes) if not _tied_alias(model, name, shapes))
        if unknown or wrong or missing:
            details = "; ".join(f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                                for label, names in (("unknown tensors", unknown), ("other shapes", wrong),
                                                     ("missing tensors", missing)) if names)
            raise ConfigError(f"load_qmodel_path: {path} does not hold this model's weights ({details})")


def _tied_alias(model: torch.nn.Module, name: str, stored: dict[str, tuple[int, ...]]) -> bool:
    """Whether ``name`` shares its tensor with a stored one (tied weights are saved once)."""
    state = model.state_dict()
    pointer = state[name].data_ptr()
    return any(state[other].data_ptr() == pointer for other in stored if other in state)


def run(config: LlamaRunConfig) -> tuple[Path, Path]:
    """Run every method of ``config`` and write the result files; returns their paths."""
    if config.load_gptq:
        return evaluate_checkpoints(config)
    methods = list(config.methods)
    if config.load_qmodel_path:
        config, methods = load_saved_settings(config)
    config.check_outputs()
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    timer = start_profile(device)
    saved = Path(config.load_qmodel_path) if config.load_qmodel_path else None
    calibrate = config.calibrates and saved is None
    preflight(config, timer, calibrate=calibrate)
    with timer("data"):
        tokenizer = load_tokenizer(config)
        calibration, eval_sets = load_data(tokenizer, config, calibrate=calibrate)
    with timer("load and rotate"):
        model, rotation = build_quantizable_model(config)
    if saved is not None:
        check_saved_models(saved, methods, model)
    quantize_method = quantizing(model, config, calibration, device)

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
            save_qmodel(model, Path(config.save_qmodel_path), method, config, rotation)
        if config.export_gptq and writes:
            began = time.perf_counter()
            export_checkpoint(model, tokenizer, config, method)
            report.add_part("export", time.perf_counter() - began, 0.0)
        return report

    per_example: PerExample = {}
    rows, layers = compare_rotated(model, tokenizer, config, methods, prepare=prepare, eval_sets=eval_sets,
                                   device=device, timer=timer, per_example=per_example)
    return write_llama_run(config, rows, settings=dataclasses.asdict(config), layers=layers, timer=timer,
                           device=device, metadata={"rotation": dataclasses.asdict(rotation) if rotation else None},
                           per_example={config.setting: per_example})


def main(argv: list[str] | None = None) -> int:
    expected = (ModelLoadError, CorpusUnavailableError, ZeroShotUnavailableError)
    return run_cli(LlamaRunConfig, run, argv, __doc__.splitlines()[0], expected)


if __name__ == "__main__":
    sys.exit(main())
