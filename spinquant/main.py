"""SpinQuant + GPTQ/GPTAQ for Llama models: ``python -m spinquant.main --config spinquant/configs/<x>.yaml``.

One run learns (or loads) SpinQuant's rotations ``R1``/``R2`` on calibration text, fuses them with the online
Hadamards ``R3``/``R4``, then evaluates the rotated model in full precision and quantized with RTN, GPTQ and
GPTAQ. With ``quarot_baseline`` (default) it does the same for the untrained random-Hadamard rotation, so
the value of learning the rotation is visible. Results: ``results/<name>.csv`` (rows labelled
``<setting> SpinQuant`` and ``<setting> QuaRot``, a column per method) and a sidecar JSON with the settings,
the training loss curve, timings and per-layer errors.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from common.cache import CACHE_ENV_VAR, cache_root
from common.cli import run_cli
from common.config import ConfigError
from common.files import check_output_file
from common.llama.experiment import (
    PerExample,
    add_quantizers,
    compare_rotated,
    load_data,
    load_model,
    load_tokenizer,
    preflight,
    quantizing,
    write_llama_run,
)
from common.llama.loading import ModelLoadError
from common.llama.rotation import LlamaShape
from common.lm.corpora import CorpusUnavailableError, calibration_windows
from common.lm.zeroshot import ZeroShotUnavailableError
from common.results.runs import MetricRow
from common.run import start_run
from spinquant.rotation import (
    RotationFileError,
    SpinRotation,
    fuse_rotation,
    initial_rotation,
    load_rotation,
    prepare_model,
)
from spinquant.settings import SpinQuantConfig
from spinquant.train import RotationTrainer

logger = logging.getLogger("spinquant")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LABELS = {"learned": "SpinQuant", "initial": "QuaRot"}
"""Row labels: the learned rotation, and the untrained random-Hadamard one it starts from."""
MONITOR_WINDOWS = 8
"""Train windows (seeded apart from the training's) on which each rotation's quantized loss is reported."""


def rotation_file(config: SpinQuantConfig) -> Path:
    """``config.rotation_path``, else a cache file named after the model and the rotation settings."""
    if config.rotation_path:
        return Path(config.rotation_path)
    return cache_root() / "spinquant" / f"{config.model_label}-{config.rotation_key()}.safetensors"


def saved_rotation(config: SpinQuantConfig, shape: LlamaShape) -> tuple[SpinRotation, dict] | None:
    """The rotation file's rotation and the settings it was trained with, checked; ``None`` when absent.

    Raises ``ConfigError`` when the path is a folder and :class:`RotationFileError` when the file is not one
    for this model (sizes, finite orthogonal matrices) or is partial and was trained with other settings
    (it could not be resumed).
    """
    path = rotation_file(config)
    if path.is_dir():
        setting = "rotation_path" if config.rotation_path else f"rotation cache file ({CACHE_ENV_VAR})"
        raise ConfigError(f"{setting}: {path} is a folder; give the path of a rotation file (.safetensors)")
    if not path.is_file():
        return None
    rotation, saved_settings = load_rotation(path, shape)
    if rotation.step < config.rotation_steps and saved_settings != config.rotation_settings():
        raise RotationFileError(
            f"rotation file {path} holds {rotation.step} of {config.rotation_steps} steps trained with other "
            f"settings; to resume, use the settings it was made with: {saved_settings}"
        )
    return rotation, saved_settings


def check_rotation_file(config: SpinQuantConfig, shape: LlamaShape) -> None:
    """Before the model loads: the rotation file is usable (:func:`saved_rotation`) and, when it must be
    written (absent or partial), its folder is writable."""
    saved = saved_rotation(config, shape)
    if saved is None or saved[0].step < config.rotation_steps:
        setting = "rotation_path" if config.rotation_path else f"rotation cache file ({CACHE_ENV_VAR})"
        check_output_file(rotation_file(config), setting)


def learned_rotation(
    trainer: RotationTrainer,
    tokenizer: PreTrainedTokenizerBase,
    shape: LlamaShape,
    config: SpinQuantConfig,
    device: torch.device,
) -> tuple[SpinRotation, Path, dict]:
    """Load the rotation file if it is complete, else train (resuming a partial file); returns what was used.

    Also returns the file and the settings it was trained with.
    """
    path = rotation_file(config)
    settings = config.rotation_settings()
    rotation = initial_rotation(shape, config.seed)
    saved = saved_rotation(config, shape)
    if saved is not None:
        rotation, saved_settings = saved
        if rotation.step >= config.rotation_steps:
            logger.info("using the rotation in %s (%d steps)", path, rotation.step)
            return rotation, path, saved_settings
        logger.info("resuming rotation training from %s at step %d", path, rotation.step)
    windows = calibration_windows(tokenizer, config.calib_dataset, nsamples=config.rotation_nsamples,
                                  seqlen=config.rotation_seqlen, seed=config.seed)
    rotation = trainer.train(windows, rotation, device=device, checkpoint=path, checkpoint_settings=settings)
    return rotation, path, settings


def monitor_losses(
    trainer: RotationTrainer,
    tokenizer: PreTrainedTokenizerBase,
    config: SpinQuantConfig,
    rotations: dict[str, SpinRotation],
    device: torch.device,
) -> dict[str, float]:
    """Each rotation's fake-quantized loss on :data:`MONITOR_WINDOWS` train windows the training did not draw.

    The training loss of a step is too noisy to show progress; this fixed set shows what learning the
    rotation did to the quantity it optimises (the perplexity columns show what it did after GPTQ/GPTAQ).
    """
    windows = calibration_windows(tokenizer, config.calib_dataset, nsamples=MONITOR_WINDOWS,
                                  seqlen=config.rotation_seqlen, seed=config.seed + 1)
    losses = {LABELS[kind]: trainer.mean_loss(rotation, windows, device=device) for kind, rotation in rotations.items()}
    for label, value in losses.items():
        logger.info("%s rotation: fake-quantized loss %.4f on %d monitor windows", label, value, MONITOR_WINDOWS)
    return losses


def labelled(rows: list[MetricRow], setting: str) -> list[MetricRow]:
    return [dataclasses.replace(row, setting=setting) for row in rows]


def run(config: SpinQuantConfig) -> tuple[Path, Path]:
    """Learn or load the rotation, compare every method under it (and the baseline), write the results."""
    started, _ = start_run(config, lambda: check_rotation_file(config, preflight(config, calibrate=True)))
    timer, device = started.timer, started.device
    with timer("data"):
        tokenizer = load_tokenizer(config)
        calibration, eval_sets = load_data(tokenizer, config, calibrate=config.calibrates)
    with timer("load and prepare"):
        model = load_model(config)
        shape = prepare_model(model, seed=config.seed, k_bits=config.k_bits, v_bits=config.v_bits,
                              kv_clip_ratio=config.kv_clip_ratio)
        add_quantizers(model, config)
    trainer = RotationTrainer(model, shape, config.training_settings())
    with timer("rotation training"):
        learned, path, trained_with = learned_rotation(trainer, tokenizer, shape, config, device)
    rotations = {"learned": learned}
    if config.quarot_baseline:
        rotations["initial"] = initial_rotation(shape, config.seed)
    with timer("rotation monitor loss"):
        monitor = monitor_losses(trainer, tokenizer, config, rotations, device)
    model.to("cpu")
    unrotated = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    rows: list[MetricRow] = []
    layers: dict[str, list] = {}
    per_example: dict[str, PerExample] = {}
    for kind, rotation in rotations.items():
        label = LABELS[kind]
        model.load_state_dict(unrotated)
        fuse_rotation(model, rotation)
        per_example[f"{config.setting} {label}"] = found = {}
        method_rows, method_layers = compare_rotated(
            model, tokenizer, config, config.methods, prepare=quantizing(model, config, calibration, device),
            eval_sets=eval_sets, device=device, timer=timer, label=label, per_example=found,
        )
        rows += labelled(method_rows, f"{config.setting} {label}")
        layers.update({f"{label}/{method}": records for method, records in method_layers.items()})

    rotation_record = {
        "file": str(path),
        "trained_with": trained_with,
        "steps": learned.step,
        "losses": learned.losses,
        "monitor_loss": monitor,
        "shape": dataclasses.asdict(shape),
        "labels": {LABELS[k]: k for k in rotations},
    }
    return write_llama_run(started, rows, layers=layers, metadata={"rotation": rotation_record},
                           per_example=per_example)


def main(argv: list[str] | None = None) -> int:
    expected = (ModelLoadError, CorpusUnavailableError, ZeroShotUnavailableError)
    return run_cli(SpinQuantConfig, run, argv, __doc__.splitlines()[0], expected)


if __name__ == "__main__":
    sys.exit(main())
