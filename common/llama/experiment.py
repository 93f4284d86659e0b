"""The steps every Llama-family run shares: load, add quantizers, draw data, quantize and evaluate, write.

A tree's entry point loads the model (:func:`load_model`), applies its rotation (QuaRot, SpinQuant, ...),
adds activation quantizers (:func:`add_quantizers`), draws the data (:func:`load_data`) and calls
:func:`compare_rotated` (usually with :func:`quantizing`) once per rotated model; :func:`write_llama_run`
writes the result files. The run's start and its checks are :func:`common.run.start_run` with :func:`preflight`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from common.config import ConfigError
from common.engine.settings import CalibrationReport
from common.llama.adapter import LlamaAdapter, add_activation_quantizers
from common.llama.loading import checkpoint_folder, load_llama_config, load_llama_model, load_llama_tokenizer
from common.llama.rotation import LlamaShape
from common.llama.settings import LlamaSettings
from common.lm.corpora import calibration_windows, corpus_fingerprint, evaluation_windows, load_corpus
from common.lm.perplexity import perplexity_of, window_nlls
from common.pipeline import compare_methods, quantize
from common.profile import StageProfile, evaluation_flops_of
from common.quant.qlinear import QuantLinear
from common.results.runs import MetricRow
from common.run import Run, write_results

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PrepareMethod = Callable[[str], CalibrationReport | None]
"""``prepare(method)``: put ``method``'s weights into the model (quantize, or load them); its calibration report."""


def load_model(config: LlamaSettings) -> LlamaForCausalLM:
    """The full-precision model (eval mode, on CPU, in ``config.dtype``); its tokenizer: :func:`load_tokenizer`."""
    return load_llama_model(config.model, dtype=DTYPES[config.dtype])


def model_folder(config: LlamaSettings) -> Path:
    """The local folder of the model's checkpoint files (read one block at a time); the Hub's snapshot of a hub
    id, downloaded if needed."""
    return checkpoint_folder(config.model)


def load_tokenizer(config: LlamaSettings) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone: a run tokenizes its text (a transient of 0.3 GB for the embedded corpus)
    before the weights are loaded, so the two never add up."""
    return load_llama_tokenizer(config.model)


def preflight(config: LlamaSettings, *, calibrate: bool) -> LlamaShape:
    """Check everything that can be checked before the weights are read; returns the model's sizes.

    Loads the zero-shot tasks' data and the corpora's texts (a Hub corpus or task that is unreachable
    fails here, not after hours of calibration), reads the model's configuration alone and checks the
    settings against it (:func:`check_model_settings`).
    """
    if config.tasks_include_path and not Path(config.tasks_include_path).is_dir():
        raise ConfigError(f"tasks_include_path: {config.tasks_include_path} is not a folder")
    if config.tasks:
        from common.lm.zeroshot import load_tasks  # lm-eval and datasets cost 0.13 GB of memory: only if used

        load_tasks(config.tasks, include_path=config.tasks_include_path)
    corpora = [(config.calib_dataset, "train")] if calibrate else []
    for corpus, split in [*corpora, *((name, "test") for name in config.eval_datasets)]:
        load_corpus(corpus, split)
    model_config = load_llama_config(config.model)
    shape = LlamaShape.from_config(model_config)
    check_model_settings(config, shape, model_config)
    return shape


def check_model_settings(config: LlamaSettings, shape: LlamaShape, model_config: PretrainedConfig) -> None:
    """Settings that depend on the model: group sizes divide every quantized linear's input, windows fit.

    Raises ``ConfigError`` naming the setting.
    """
    config.check_model_linears(shape.linear_input_sizes())
    limit = getattr(model_config, "max_position_embeddings", None)
    for option in config.window_settings():
        if limit is not None and getattr(config, option) > limit:
            raise ConfigError(f"{option}={getattr(config, option)} is longer than the model's "
                              f"max_position_embeddings ({limit})")


def activation_quantizer_options(config: LlamaSettings) -> dict[str, object]:
    """The keyword arguments of :func:`add_activation_quantizers` (and of a layer's) from the run's settings."""
    return {"bits": config.a_bits, "sym": not config.a_asym, "clip_ratio": config.a_clip_ratio,
            "groupsize": config.a_groupsize}


def add_quantizers(model: LlamaForCausalLM, config: LlamaSettings) -> dict[str, QuantLinear]:
    """Give every decoder linear an activation quantizer (see :func:`add_activation_quantizers`)."""
    return add_activation_quantizers(model, **activation_quantizer_options(config))


def load_data(
    tokenizer: PreTrainedTokenizerBase, config: LlamaSettings, *, calibrate: bool
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Calibration windows [nsamples, seqlen] (``None`` unless ``calibrate``) and ``{corpus: test windows}``."""
    calibration = None
    if calibrate:
        calibration = calibration_windows(tokenizer, config.calib_dataset, nsamples=config.nsamples,
                                          seqlen=config.seqlen, seed=config.seed)
    eval_sets = {
        name: evaluation_windows(tokenizer, name, seqlen=config.seqlen, max_windows=config.eval_max_windows)
        for name in config.eval_datasets
    }
    return calibration, eval_sets


PerExample = dict[str, dict[str, Any]]
"""``{method: {metric: per-example data}}`` (see :func:`evaluate`). A run's JSON keeps one per row setting
under ``"per_example"``: ``{setting: {method: {metric: data}}}``."""


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: LlamaSettings,
    label: str,
    eval_sets: Mapping[str, torch.Tensor],
    device: torch.device,
    per_example: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``{<corpus>_ppl: perplexity}`` and the zero-shot metrics (see
    :func:`common.lm.zeroshot.zero_shot_metrics`: ``<task>_acc`` in %, its ``_stderr``, ...) of ``model``
    (moved to ``device``).

    ``per_example``, if given, receives the data behind each metric, for paired comparisons between
    methods: ``<corpus>_ppl`` → each window's mean next-token NLL in nats per token (the perplexity is
    ``exp`` of their mean);
    ``<task>_acc`` / ``_acc_norm`` → the outcome of each example as a ``"0"``/``"1"`` string.
    """
    model.to(device)
    metrics: dict[str, float] = {}
    found = per_example if per_example is not None else {}
    metrics.update(perplexity_metrics(label, eval_sets, found, lambda dataset, windows: window_nlls(
        model, windows, batch_size=config.eval_batch_size, device=device, desc=f"{label} {dataset}")))
    if config.tasks:
        from common.lm.zeroshot import zero_shot_evaluation

        result = zero_shot_evaluation(model, tokenizer, config.tasks, batch_size=config.tasks_batch_size,
                                      device=device, limit=config.tasks_limit,
                                      include_path=config.tasks_include_path)
        metrics.update(result.metrics)
        found.update(result.per_example)
    return metrics


def perplexity_metrics(label: str, eval_sets: Mapping[str, torch.Tensor], found: dict[str, Any],
                       nlls: Callable[[str, torch.Tensor], list[float]]) -> dict[str, float]:
    """``{<corpus>_ppl: perplexity}`` from ``nlls(corpus, windows)`` (each window's summed NLL); ``found``
    receives each window's mean NLL in nats per token (see :func:`evaluate`)."""
    metrics: dict[str, float] = {}
    for dataset, windows in eval_sets.items():
        sums = nlls(dataset, windows)
        metrics[f"{dataset}_ppl"] = perplexity_of(sums, windows.shape[1])
        found[f"{dataset}_ppl"] = [total / (windows.shape[1] - 1) for total in sums]
        logger.info("%s %s perplexity %.3f", label, dataset, metrics[f"{dataset}_ppl"])
    return metrics


def quantizing(
    model: LlamaForCausalLM, config: LlamaSettings, calibration: torch.Tensor | None, device: torch.device
) -> PrepareMethod:
    """The default ``prepare(method)``: quantize ``model`` in place with ``method`` on ``calibration``."""
    offload_device = torch.device("cpu") if config.offload else device
    adapter = LlamaAdapter()
    batches = [calibration] if calibration is not None else []

    def prepare(method: str) -> CalibrationReport | None:
        if not config.offload:
            model.to(device)
        return quantize(model, adapter, method, config, batches, device=device, offload_device=offload_device)

    return prepare


def compare_rotated(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: LlamaSettings,
    methods: Sequence[str],
    *,
    prepare: PrepareMethod,
    eval_sets: Mapping[str, torch.Tensor],
    device: torch.device,
    timer: StageProfile,
    label: str = "",
    per_example: PerExample | None = None,
) -> tuple[list[MetricRow], dict[str, list[dict[str, Any]]]]:
    """``prepare(method)`` then evaluate ``model`` (rotated, quantizers added) for each method.

    ``prepare`` is usually :func:`quantizing`; ``label`` prefixes stage names and progress bars when one
    run compares several rotated models. Returns the metric rows and the per-layer calibration records per
    method (see :func:`common.pipeline.compare_methods`); ``per_example``, if given, receives each method's
    per-example data (:data:`PerExample`).
    """

    def evaluate_method(method: str) -> dict[str, float]:
        found = per_example.setdefault(method, {}) if per_example is not None else None
        metrics = evaluate(model, tokenizer, config, f"{label} {method}".strip(), eval_sets, device, found)
        model.to("cpu")
        return metrics

    def evaluation_flops() -> float:
        """One window's forward, counted, times the windows of every perplexity corpus (zero-shot excluded)."""
        windows = sum(len(w) for w in eval_sets.values())
        if not windows:
            return 0.0
        first = next(w for w in eval_sets.values() if len(w))[:1].to(device)
        model.to(device)
        flops = evaluation_flops_of(lambda: model(input_ids=first, use_cache=False), windows)
        model.to("cpu")
        return flops

    return compare_methods(model, methods, prepare=prepare, evaluate=evaluate_method, timer=timer,
                           stage_prefix=label, evaluation_flops=evaluation_flops)


def _zero_shot_identity(tasks: list[str]) -> dict[str, Any]:
    if not tasks:
        return {}
    from common.lm.zeroshot import zero_shot_identity

    return zero_shot_identity(tasks)


def data_identity(config: LlamaSettings) -> dict[str, str]:
    """``{corpus: SHA-256 of its text}`` for the calibration corpus and every evaluation corpus."""
    return {
        name: corpus_fingerprint(name, split)
        for name, split in [(config.calib_dataset, "train"), *((d, "test") for d in config.eval_datasets)]
    }


def write_llama_run(
    run: Run,
    rows: Sequence[MetricRow],
    *,
    layers: Mapping[str, Any],
    metadata: Mapping[str, Any],
    per_example: Mapping[str, PerExample] | None = None,
) -> tuple[Path, Path]:
    """:func:`common.run.write_results` with a Llama run's data identity: the SHA-256 of each corpus and of
    the zero-shot tasks' data."""
    config = run.config
    return write_results(run, rows, layers=layers, data_identity=data_identity(config),
                         metadata={"zero_shot_data": _zero_shot_identity(config.tasks), **metadata},
                         per_example=per_example)
