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
from common.device import device_description, pick_device
from common.perplexity import perplexity
from common.pipeline import compare_methods, quantize
from common.results import atomic_write, atomic_write_json
from common.runs import StageTimer, write_run
from common.text_data import CorpusUnavailableError, calibration_windows, corpus_fingerprint, evaluation_windows
from common.zeroshot import ZeroShotUnavailableError, load_tasks, zero_shot_accuracy
from fake_quant.llama_adapter import LlamaAdapter, add_activation_quantizers
from fake_quant.model_loading import ModelLoadError, load_llama
from fake_quant.rotation import rotate_model
from fake_quant.settings import LlamaRunConfig

logger = logging.getLogger("fake_quant")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_quantizable_model(config: LlamaRunConfig):
    """Load, rotate and wrap the model: returns ``(model, tokenizer, rotation_info or None)``."""
    model, tokenizer = load_llama(config.model, dtype=DTYPES[config.dtype])
    model.eval()
    rotation = None
    if config.rotate:
        rotation = rotate_model(model, mode=config.rotate_mode, seed=config.seed, k_bits=config.k_bits,
                                v_bits=config.v_bits, kv_clip_ratio=config.kv_clip_ratio)
    linears = add_activation_quantizers(model, bits=config.a_bits, sym=not config.a_asym,
                                        clip_ratio=config.a_clip_ratio, groupsize=config.a_groupsize)
    for option, size in (("w_groupsize", config.w_groupsize), ("a_groupsize", config.a_groupsize)):
        for name, linear in linears.items():
            if size != -1 and linear.in_features % size != 0:
                raise ConfigError(f"{option} must be -1 or a positive divisor of every quantized linear's input "
                                  f"size; {size} does not divide {linear.in_features} ({name})")
    return model, tokenizer, rotation


def evaluate(model, tokenizer, config: LlamaRunConfig, method: str, eval_sets: dict[str, torch.Tensor],
             device: torch.device) -> dict[str, float]:
    model.to(device)
    metrics = {}
    for dataset, windows in eval_sets.items():
        metrics[f"{dataset}_ppl"] = perplexity(model, windows, batch_size=config.eval_batch_size, device=device,
                                               desc=f"{method} {dataset}")
        logger.info("%s %s perplexity %.3f", method, dataset, metrics[f"{dataset}_ppl"])
    if config.tasks:
        accuracies = zero_shot_accuracy(model, tokenizer, config.tasks, batch_size=config.eval_batch_size,
                                        device=device, limit=config.tasks_limit,
                                        include_path=config.tasks_include_path)
        metrics.update({f"{task}_acc": value for task, value in accuracies.items()})
    return metrics


def save_qmodel(model, folder: Path, method: str, config: LlamaRunConfig, rotation) -> None:
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
    if config.tasks:
        with timer("zero-shot task data"):
            load_tasks(config.tasks, include_path=config.tasks_include_path)  # fail before calibrating
    with timer("load and rotate"):
        model, tokenizer, rotation = build_quantizable_model(config)
    with timer("data"):
        calibration = None
        if any(m not in ("fp", "rtn") for m in methods) and not config.load_qmodel_path:
            calibration = calibration_windows(tokenizer, config.calib_dataset, nsamples=config.nsamples,
                                              seqlen=config.seqlen, seed=config.seed)
        eval_sets = {
            name: evaluation_windows(tokenizer, name, seqlen=config.seqlen, max_windows=config.eval_max_windows)
            for name in config.eval_datasets
        }
    adapter = LlamaAdapter()
    offload_device = torch.device("cpu") if config.offload else device
    saved = Path(config.load_qmodel_path) if config.load_qmodel_path else None

    def prepare(method: str):
        if saved is not None and method != "fp":
            model.load_state_dict(load_file(str(saved / f"{method}.safetensors")))
            return None
        if not config.offload:
            model.to(device)
        report = quantize(model, adapter, method, config, [calibration] if calibration is not None else [],
                          device=device, offload_device=offload_device)
        if config.save_qmodel_path and method != "fp":
            save_qmodel(model, Path(config.save_qmodel_path), method, config, rotation)
        return report

    def evaluate_method(method: str) -> dict[str, float]:
        metrics = evaluate(model, tokenizer, config, method, eval_sets, device)
        model.to("cpu")
        return metrics

    rows, layers = compare_methods(model, methods, prepare=prepare, evaluate=evaluate_method, timer=timer)
    data_identity = {
        name: corpus_fingerprint(name, split)
        for name, split in [(config.calib_dataset, "train"), *((d, "test") for d in config.eval_datasets)]
    }
    return write_run(
        config.results_dir,
        config.run_name,
        model=config.model,
        setting=config.setting,
        rows=rows,
        settings=dataclasses.asdict(config),
        metadata={
            "tree": "fake_quant",
            "seed": config.seed,
            "device": device_description(device),
            "rotation": dataclasses.asdict(rotation) if rotation else None,
            "data_sha256": data_identity,
            "seconds": timer.seconds,
            "layers": layers,
        },
    )


def main(argv: list[str] | None = None) -> int:
    expected = (ModelLoadError, CorpusUnavailableError, ZeroShotUnavailableError)
    return run_cli(LlamaRunConfig, run, argv, __doc__.splitlines()[0], expected)


if __name__ == "__main__":
    sys.exit(main())
