"""Zero-shot accuracy of an in-memory (e.g. fake-quantized) Hugging Face causal LM through lm-eval.

The model is wrapped as it is (no reload, no copy) with ``lm_eval.models.huggingface.HFLM`` and scored with
``lm_eval.simple_evaluate`` at zero few-shot. Following QuaRot, a task's accuracy is its length-normalised
``acc_norm`` when the task reports one and plain ``acc`` otherwise.

The embedded tasks of :mod:`common.lm.embedded_tasks` (``last_word_embedded``, ``cloze_embedded``) are
generated from the embedded corpora on first use and need no network. Other tasks' data come from the
Hugging Face Hub through ``datasets`` (cached under ``HF_HOME``). Without network,
set ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) before ``datasets`` is imported: cached data then
load from the cache and missing data fail at once with :class:`ZeroShotUnavailableError`. Without those
variables an unreachable Hub costs ``huggingface_hub``'s retries (about 20 s per task) before that error.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from common.lm.embedded_tasks import EMBEDDED_TASKS, embedded_task_folder, embedded_task_identity
from common.results.intervals import outcome_string

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

PAPER_TASKS: tuple[str, ...] = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq")
"""The six zero-shot tasks reported in the GPTAQ paper (the QuaRot set)."""

SEED = 0
"""Seed passed to every random generator lm-eval sets (python, numpy, torch, few-shot sampler)."""

BOOTSTRAP_ITERS = 1000
"""lm-eval's resamples for the standard error of metrics without a closed form (e.g. a task's perplexity);
accuracies use the closed form ``sqrt(p(1 - p) / (n - 1))`` whatever this is."""

AVERAGE = "average"
"""The task name under which :func:`zero_shot_metrics` reports the mean over tasks."""


class ZeroShotUnavailableError(RuntimeError):
    """A zero-shot task's data could not be loaded (typically: offline and not in the datasets cache)."""


@functools.cache
def _quiet_hflm() -> type:
    """``HFLM`` whose log-likelihood progress bar can be switched off (lm-eval is imported on first use: it
    and ``datasets`` cost a run that asks for no task 0.13 GB of memory)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def __init__(self, *args: object, progress: bool, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._progress = progress

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self._progress)

    return QuietHFLM


@functools.cache
def _task_manager(include_paths: tuple[str, ...]) -> TaskManager:
    """lm-eval's task index (built-in tasks plus ``include_paths``); indexing takes seconds, so it is cached."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


@contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Let only warnings and errors of lm-eval's loggers through, and without ``progress`` hide the
    ``datasets`` progress bars, while the block runs."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    hide_bars = not progress and not datasets.are_progress_bars_disabled()
    if hide_bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if hide_bars:
            datasets.enable_progress_bars()


def _load_zero_shot(manager: TaskManager, name: str) -> Task | Group:
    """Build one task or group, data included, set to zero few-shot.

    Raises :class:`ZeroShotUnavailableError` (one line: task and cause) if the build fails.
    """
    try:
        loaded = manager.load([name])
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ZeroShotUnavailableError(f"cannot load zero-shot task {name!r}: {cause}") from exc
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    return loaded["groups"].get(name) or loaded["tasks"][name]


def _check_tying(model: nn.Module) -> None:
    """Refuse a model whose config says "tied" while ``lm_head`` has its own weight: ``HFLM`` calls
    ``model.tie_weights()``, which would silently overwrite that weight with the input embedding."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        raise ValueError(
            "model.config.tie_word_embeddings is True but lm_head has its own weight; lm-eval would re-tie "
            "(overwrite) it: set config.tie_word_embeddings = False after untying"
        )


def _percent(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(f"{key},none")
    return None if value is None or isinstance(value, str) else 100.0 * float(value)


def task_metrics(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``{<name>_acc, <name>_acc_stderr, <name>_acc_norm, <name>_acc_norm_stderr}`` in percent from one task's
    lm-eval results; ``acc_norm`` only where the task reports it, a standard error only where lm-eval
    computed one."""
    out = {}
    for key in ("acc", "acc_norm"):
        value = _percent(metrics, key)
        if value is None:
            continue
        out[f"{name}_{key}"] = value
        stderr = _percent(metrics, f"{key}_stderr")
        if stderr is not None:
            out[f"{name}_{key}_stderr"] = stderr
    if f"{name}_acc" not in out and f"{name}_acc_norm" not in out:
        raise ValueError(f"task {name!r} reports neither acc_norm nor acc (metrics: {sorted(metrics)})")
    return out


def headline_accuracy(name: str, metrics: dict[str, float]) -> float:
    """QuaRot's convention for one task of :func:`task_metrics`: ``acc_norm`` when reported, else ``acc``."""
    return metrics.get(f"{name}_acc_norm", metrics.get(f"{name}_acc", math.nan))


def _include_paths(tasks: list[str], include_path: str | Path | None) -> tuple[str, ...]:
    paths = [] if include_path is None else [str(Path(include_path).resolve())]
    if any(name in EMBEDDED_TASKS for name in tasks):
        paths.append(str(embedded_task_folder().resolve()))
    return tuple(paths)


def zero_shot_identity(tasks: list[str]) -> dict[str, Any]:
    """What a run's JSON records of its zero-shot data: for an embedded task its generated data's identity
    (:func:`common.lm.embedded_tasks.embedded_task_identity`), for any other the lm-eval version that
    defines it (its data come from the Hub)."""
    embedded = embedded_task_identity(tasks)
    return {name: embedded.get(name) or {"source": f"lm-eval {version('lm_eval')} task"} for name in tasks}


def load_tasks(
    tasks: list[str], *, include_path: str | Path | None = None, progress: bool = True
) -> tuple[TaskManager, list[Task | Group]]:
    """Check the names and load every task's data (zero few-shot); callers can run it as a preflight.

    The embedded tasks' files are generated first if any is named. Raises ``ValueError`` for an empty or
    repeated list or an unknown name, and :class:`ZeroShotUnavailableError` when a task's data cannot be
    loaded.
    """
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat a name, got {tasks}")
    if AVERAGE in tasks:
        raise ValueError(f"tasks: {AVERAGE!r} is the name of the mean over tasks, not a task")
    manager = _task_manager(_include_paths(tasks, include_path))
    known = set(manager.all_subtasks) | set(manager.all_groups)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) or group(s): {', '.join(unknown)} (offline embedded tasks: "
                         f"{', '.join(EMBEDDED_TASKS)})")
    with _quiet(progress):
        return manager, [_load_zero_shot(manager, name) for name in tasks]


@dataclass(frozen=True)
class ZeroShotResult:
    """What :func:`zero_shot_evaluation` measured.

    ``metrics``: see :func:`zero_shot_metrics`. ``per_example``: for each ``<task>_acc`` / ``<task>_acc_norm``
    of a task (not a group), the example-by-example outcome in lm-eval's document order as a string of
    ``"0"`` / ``"1"`` (the data a paired comparison of two models needs).
    """

    metrics: dict[str, float]
    per_example: dict[str, str] = field(default_factory=dict)


def _outcomes(samples: list[dict[str, Any]], key: str) -> str | None:
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    values = [sample.get(key) for sample in ordered]
    if not values or any(value not in (0, 1, True, False) for value in values):
        return None
    return outcome_string(values)


def zero_shot_evaluation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    limit: int | None = None,
    include_path: str | Path | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot accuracies in percent of ``model`` on each lm-eval task (or group) in ``tasks``, and the
    per-example outcomes behind them (:class:`ZeroShotResult`).

    ``device``, if given, moves ``model`` there in place; otherwise it is evaluated where it lies. ``limit``
    scores only the first ``limit`` documents of each task (for smoke tests; not comparable with full
    results). ``include_path`` adds a folder of task YAMLs to lm-eval's built-in ones and the embedded
    tasks. Seeds are fixed, so repeated calls agree.

    ``progress=False`` hides the ``datasets`` and log-likelihood progress bars (lm-eval's short per-task
    request-building bar stays). Warnings of lm-eval still show, its info messages do not.

    Raises ``ValueError`` for a name lm-eval does not know as a task or group or for a model whose config
    says tied embeddings while ``lm_head`` has its own weight (lm-eval would re-tie it), and
    :class:`ZeroShotUnavailableError` when a task's data cannot be loaded (checked before the model runs).
    """
    from lm_eval import simple_evaluate

    _check_tying(model)
    manager, built = load_tasks(tasks, include_path=include_path, progress=progress)
    with _quiet(progress):
        if device is not None:
            model.to(device)
        lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress)
        output = simple_evaluate(
            model=lm,
            tasks=built,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=True,
            task_manager=manager,
            random_seed=SEED,
            numpy_random_seed=SEED,
            torch_random_seed=SEED,
            fewshot_random_seed=SEED,
        )
    assert output is not None  # None only on non-zero ranks of a distributed run
    metrics: dict[str, float] = {}
    per_example: dict[str, str] = {}
    for name in tasks:
        metrics.update(task_metrics(name, output["results"][name]))
        for key in ("acc", "acc_norm"):
            outcomes = _outcomes(output["samples"].get(name, []), key)
            if outcomes is not None:
                per_example[f"{name}_{key}"] = outcomes
    if len(tasks) > 1:
        metrics[f"{AVERAGE}_acc"] = sum(headline_accuracy(name, metrics) for name in tasks) / len(tasks)
    return ZeroShotResult(metrics, per_example)


def zero_shot_metrics(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: list[str],
                      **options: Any) -> dict[str, float]:
    """The metrics of :func:`zero_shot_evaluation` (same arguments): for each task :func:`task_metrics`' keys
    (``<task>_acc`` and, where reported, ``<task>_acc_norm``, each with its standard error ``..._stderr`` in
    points), plus ``average_acc``, the unweighted mean over ``tasks`` of :func:`headline_accuracy`
    (QuaRot's convention: ``acc_norm`` when a task reports it, else ``acc``), when there is more than one."""
    return zero_shot_evaluation(model, tokenizer, tasks, **options).metrics
