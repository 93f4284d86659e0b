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
from safetensors.torch import load_file, save_file

from common.cli import run_cli
from common.config import ConfigError
from common.device import pick_device
from common.llama.experiment import (
    add_quantizers,
    compare_rotated,
    load_data,
    load_model,
    preflight_tasks,
    quantizing,
    write_llama_run,
)
from common.llama.loading import ModelLoadError
from common.results import atomic_write, atomic_write_json
from common.runs import StageTimer
from common.text_data import CorpusUnavailableError
from common.zeroshot import ZeroShotUnavailableError
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
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / f"{method}.safetensors", lambda tmp: save_file(state, tmp, metadata={"method": method}))
    atomic_write_json(folder / "settings.json", {
        "settings": dataclasses.asdict(config),
        "rotation": dataclasses.asdict(rotation) if rotation else None,
    })


def load_saved_settings(config: LlamaRunConfig) -> tuple[LlamaRunConfig, list[str]]:
    """The saved run's model/rotation/quantization settings with this run's evaluation settings."""
    folder = Path(config.load_qmodel_path)
    settings_file = folder / "settings.json"
    if not settings_file.is_file():
        raise ConfigError(f"load_qmodel_path {folder} holds no settings.json (save one with --save_qmodel_path)")
    saved = json.loads(settings_file.read_text())["settings"]
    evaluation = {k: getattr(config, k) for k in ("name", "device", "eval_datasets", "eval_max_windows",
                                                  "eval_batch_size", "tasks", "tasks_limit", "tasks_include_path",
                                                  "results_dir")}
    merged = LlamaRunConfig(**{**saved, **evaluation, "save_qmodel_path": None,
                               "load_qmodel_path": config.load_qmodel_path})
    methods = [m for m in merged.methods if m == "fp" or (folder / f"{m}.safetensors").is_file()]
    return merged, methods


def run(config: LlamaRunConfig) -> tuple[Path, Path]:
    """Run every method of ``config`` and write the result files; returns their paths."""
    methods = list(config.methods)
    if config.load_qmodel_path:
        config, methods = load_saved_settings(config)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    timer = StageTimer()
    preflight_tasks(config, timer)
    with timer("load and rotate"):
        model, tokenizer, rotation = build_quantizable_model(config)
    with timer("data"):
        calibrate = any(m not in ("fp", "rtn") for m in methods) and not config.load_qmodel_path
        calibration, eval_sets = load_data(tokenizer, config, calibrate=calibrate)
    saved = Path(config.load_qmodel_path) if config.load_qmodel_path else None
    quantize_method = quantizing(model, config, calibration, device)

    def prepare(method: str):
        if saved is not None:
            if method != "fp":
                model.load_state_dict(load_file(str(saved / f"{method}.safetensors")))
            return None
        report = quantize_method(method)
        if config.save_qmodel_path and method != "fp":
            save_qmodel(model, Path(config.save_qmodel_path), method, config, rotation)
        return report

    rows, layers = compare_rotated(model, tokenizer, config, methods, prepare=prepare, eval_sets=eval_sets,
                                   device=device, timer=timer)
    return write_llama_run(config, rows, settings=dataclasses.asdict(config), layers=layers, timer=timer,
                           device=device, metadata={"rotation": dataclasses.asdict(rotation) if rotation else None})


def main(argv: list[str] | None = None) -> int:
    expected = (ModelLoadError, CorpusUnavailableError, ZeroShotUnavailableError)
    return run_cli(LlamaRunConfig, run, argv, __doc__.splitlines()[0], expected)


if __name__ == "__main__":
    sys.exit(main())
