"""GPTQ/GPTAQ on vision transformers: ``python -m vit_quant.main --config vit_quant/configs/<x>.yaml``.

One run quantizes the same model with RTN, GPTQ and GPTAQ (same calibration images) and evaluates it in
full precision and quantized, writing ``results/<name>.csv`` (per method: top-1, test cross-entropy, KL
divergence from the FP model's predictions, each with its paired interval against GPTQ, and the number of
images whose top-1 class differs from GPTQ's; see :mod:`vit_quant.predictions`) and a sidecar JSON. With
``model: embedded`` the model is the ViT shipped in ``vit_quant/weights/`` (or ``--checkpoint``, a file written by
:mod:`vit_quant.train_embedded`) on its Fashion-MNIST task; otherwise a timm model with pretrained weights (or
``--checkpoint``) on an ImageNet folder (``--data_path``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common.cli import run_cli
from common.config import ConfigError, parse_config
from common.methods import BASELINE
from common.pipeline import compare_methods, quantize
from common.profile import evaluation_flops_of
from common.results.intervals import outcome_string
from common.results.runs import COUNT_PREFIX, MetricRow
from common.run import start_run, write_results
from vit_quant.adapter import block_linear_input_sizes, prepare_vit
from vit_quant.data import (
    LabeledImages,
    calibration_images,
    check_fashion_mnist,
    check_imagenet,
    imagenet_loaders,
    load_fashion_mnist,
)
from vit_quant.embedded_model import EmbeddedRecipe
from vit_quant.embedded_weights import (
    SHIPPED_WEIGHTS,
    EmbeddedWeightsError,
    checked_record,
    fashion_mnist_identity,
    load_embedded,
    read_record,
)
from vit_quant.predictions import Predictions, disagreements, predict, rounded
from vit_quant.settings import EMBEDDED, VitRunConfig

logger = logging.getLogger("vit_quant")

DISAGREEMENTS = f"{COUNT_PREFIX}disagreeing_with_{BASELINE}"
"""The CSV row counting, per method, the test images whose top-1 class differs from the baseline's."""

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ModelNotFoundError(ValueError):
    """The requested model name is not a timm model."""


def load_model_and_source(config: VitRunConfig) -> tuple[torch.nn.Module, dict]:
    """The full-precision model (eval mode, CPU) and a description of where it came from (the result JSON's
    ``model_source``)."""
    if config.model == EMBEDDED:
        weights = embedded_weights_path(config)
        model, record = load_embedded(weights)
        return model, {"source": "embedded", "weights": str(weights), "weights_sha256": record["weights_sha256"],
                       "fp_test_top1_at_training": record["test_top1"], "recipe": record["recipe"]}
    import timm

    pretrained = config.checkpoint is None
    model = timm.create_model(config.model, pretrained=pretrained,
                              **({"checkpoint_path": config.checkpoint} if config.checkpoint else {}))
    return model.eval(), {"source": config.checkpoint or "timm pretrained"}


def embedded_weights_path(config: VitRunConfig) -> Path:
    """The embedded model's weights file: ``checkpoint`` when given, else the shipped one."""
    return Path(config.checkpoint) if config.checkpoint else SHIPPED_WEIGHTS


def embedded_recipe(config: VitRunConfig, *, verify: bool = False) -> EmbeddedRecipe:
    """The recipe recorded beside the embedded model's weights (its task and shape); with ``verify``, once the
    weights file's SHA-256 matches the record."""
    weights = embedded_weights_path(config)
    return EmbeddedRecipe(**(checked_record(weights) if verify else read_record(weights))["recipe"])


def embedded_split(config: VitRunConfig, split: str) -> LabeledImages:
    """A Fashion-MNIST split as the embedded model's task shows it (:meth:`EmbeddedRecipe.split_images`)."""
    return embedded_recipe(config).split_images(load_fashion_mnist(split, config.data_path), split)


def load_data(config: VitRunConfig, model: torch.nn.Module):
    """Calibration images [n, C, H, W] and the evaluation data (a dataset or a loader); the embedded model's
    from its task (:func:`embedded_split`)."""
    if config.model == EMBEDDED:
        calibration = calibration_images(embedded_split(config, "train"), config.nsamples, config.seed)
        test = embedded_split(config, "test")
        if config.eval_max_images is not None:
            test = torch.utils.data.Subset(test, range(min(config.eval_max_images, len(test))))
        return calibration, test
    data = imagenet_loaders(config.data_path, model, calib_size=config.nsamples, batch_size=config.eval_batch_size,
                            workers=config.workers, seed=config.seed)
    return data.calibration, data.val_loader


def data_identity(config: VitRunConfig) -> dict[str, str]:
    """SHA-256 of each Fashion-MNIST file (embedded default); the folder path for ImageNet (too large)."""
    if config.model != EMBEDDED:
        return {"imagenet": str(config.data_path)}
    return fashion_mnist_identity(config.data_path)


@dataclasses.dataclass
class ProbeInputs:
    """What a probe of a ViT config works on: the config, its full-precision model, where the model came
    from, the calibration images [n, C, H, W] and the evaluation data (:func:`load_data`)."""

    config: VitRunConfig
    model: torch.nn.Module
    source: dict
    calibration: torch.Tensor
    evaluation: object


def load_probe(argv: list[str] | None, description: str) -> ProbeInputs | None:
    """A probe's start (``python -m vit_quant.<probe> --config ...``): the run's config from the command line,
    checked by :func:`preflight`, then its model and data; ``None`` after printing the error when the input
    is bad (the probe then exits with status 2)."""
    try:
        config = parse_config(VitRunConfig, argv, description)
        preflight(config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    model, source = load_model_and_source(config)
    calibration, evaluation = load_data(config, model)
    return ProbeInputs(config, model, source, calibration, evaluation)


def preflight(config: VitRunConfig) -> None:
    """What can be checked before the model is loaded (or trained): its name, its weights file, the data."""
    if config.model == EMBEDDED:
        check_fashion_mnist(config.data_path)
        try:
            recipe = embedded_recipe(config, verify=True)
        except EmbeddedWeightsError as error:
            raise ConfigError(f"checkpoint: {error}" if config.checkpoint else str(error)) from None
        with torch.device("meta"):
            config.check_model_linears(block_linear_input_sizes(recipe.build_model()))
        return
    import timm

    if not timm.is_model(config.model):
        raise ModelNotFoundError(
            f"unknown model {config.model!r}: use 'embedded' or a timm model name such as "
            "deit_small_patch16_224, deit_base_patch16_224, eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
        )
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise ConfigError(f"checkpoint: {config.checkpoint} is not a file")
    if config.data_path is None:
        raise ConfigError("data_path must point to an ImageNet root (train/ and val/) for timm models")
    check_imagenet(config.data_path)
    with torch.device("meta"):  # the architecture alone: no weights allocated or downloaded
        architecture = timm.create_model(config.model, pretrained=False)
    config.check_model_linears(block_linear_input_sizes(architecture))


def run(config: VitRunConfig) -> tuple[Path, Path]:
    """Run every method of ``config`` and write the result files; returns their paths."""
    started, _ = start_run(config, lambda: preflight(config))
    timer, device = started.timer, started.device
    with timer("load model"):
        model, source = load_model_and_source(config)
    with timer("data"):
        calibration, evaluation = load_data(config, model)
    adapter = prepare_vit(model, calibration[:2], bits=config.a_bits, sym=not config.a_asym,
                          clip_ratio=config.a_clip_ratio, groupsize=config.a_groupsize)

    def prepare(method: str):
        model.to(device)
        return quantize(model, adapter, method, config, [calibration], device=device)

    per_example: dict[str, dict[str, object]] = {}
    full_precision: list[Predictions] = []  # the FP model's, once evaluated: the reference of every KL
    predicted: dict[str, torch.Tensor] = {}

    def evaluate(method: str) -> dict[str, float]:
        found = predict(model, evaluation, batch_size=config.eval_batch_size, device=device)
        outcomes, nll = found.correct, rounded(found.nll())
        predicted[method] = found.predicted
        per_example[method] = {"top1": outcome_string(outcomes.tolist()), "test_nll": nll}
        result = {"top1": 100.0 * int(outcomes.sum()) / len(outcomes), "test_nll": sum(nll) / len(nll)}
        if method == "fp":
            full_precision.append(found)
        elif full_precision:
            kl = rounded(found.kl_from(full_precision[0]))
            per_example[method]["fp_kl"] = kl
            result["fp_kl"] = sum(kl) / len(kl)
        logger.info("%s top-1 %.2f%%, NLL %.4f", method, result["top1"], result["test_nll"])
        return result

    def evaluation_flops() -> float:
        """One image's forward (a calibration image: the evaluation's shape), counted, times the images."""
        images = len(evaluation.dataset) if isinstance(evaluation, DataLoader) else len(evaluation)
        return evaluation_flops_of(lambda: model.to(device)(calibration[:1].to(device)), images)

    fp_first = sorted(config.methods, key=lambda method: method != "fp")  # FP is every KL's reference
    rows, layers = compare_methods(model, fp_first, prepare=prepare, evaluate=evaluate, timer=timer,
                                   evaluation_flops=evaluation_flops)
    if BASELINE in predicted:
        rows.append(MetricRow(DISAGREEMENTS, False, {method: disagreements(classes, predicted[BASELINE])
                                                     for method, classes in predicted.items()}))
    return write_results(started, rows, layers=layers, data_identity=data_identity(config),
                         metadata={"model_source": source, "linear_groups": adapter.groups},
                         per_example={config.setting: per_example})


def main(argv: list[str] | None = None) -> int:
    return run_cli(VitRunConfig, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
