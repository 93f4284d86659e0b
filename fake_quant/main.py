"""QuaRot + GPTQ/GPTAQ for Llama models: ``python -m fake_quant.main --config fake_quant/configs/<x>.yaml``.

One run rotates the model once, then evaluates the same rotated model in full precision and quantized
with RTN, GPTQ and GPTAQ (same seed, same calibration windows), and writes ``results/<name>.csv`` (a row
per metric, a column per method) with a sidecar JSON of settings, timings and per-layer errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from safetensors.torch import load_model as load_saved_model

from common.calibration import set_input_quantization
from common.cli import run_cli
from common.config import ConfigError
from common.device import pick_device
from common.files import atomic_write, atomic_write_json
from common.llama.experiment import (
    PerExample,
    add_quantizers,
    compare_rotated,
    load_data,
    load_model,
    preflight,
    quantizing,
    write_llama_run,
)
from common.llama.loading import ModelLoadError
from common.lm.corpora import CorpusUnavailableError
from common.lm.zeroshot import ZeroShotUnavailableError
from common.methods import METHODS
from common.profile import start_profile
from fake_quant.rotation import RotationInfo, rotate_model
from fake_quant.settings import LlamaRunConfig

logger = logging.getLogger("fake_quant")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def build_quantizable_model(config: LlamaRunConfig):
    """Load, rotate and wrap the model: returns ``(model, tokenizer, rotation_info or None)``."""
    model, tokenizer = load_model(config)
    rotation = None
    if config.rotate:
        rotation = rotate_model(model, mode=config.rotate_mode, seed=config.seed, k_bits=config.k_bits,
                                v_bits=config.v_bits, kv_clip_ratio=config.kv_clip_ratio)
    add_quantizers(model, config)
    return model, tokenizer, rotation


def save_qmodel(model, folder: Path, method: str, config: LlamaRunConfig, rotation: RotationInfo | None) -> None:
    """Write ``<folder>/<method>.safetensors`` (tensors shared by tied weights stored once) and ``settings.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    atomic_write(folder / f"{method}.safetensors", lambda tmp: save_model(model, tmp, metadata={"method": method}))
    atomic_write_json(folder / "settings.json", {
        "settings": dataclasses.asdict(config),
        "rotation": dataclasses.asdict(rotation) if rotation else None,
    })


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
    with timer("load and rotate"):
        model, tokenizer, rotation = build_quantizable_model(config)
    if saved is not None:
        check_saved_models(saved, methods, model)
    with timer("data"):
        calibration, eval_sets = load_data(tokenizer, config, calibrate=calibrate)
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
        if config.save_qmodel_path and METHODS[method].quantized:
            save_qmodel(model, Path(config.save_qmodel_path), method, config, rotation)
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
