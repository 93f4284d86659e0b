"""Settings every Llama-family run shares (model, data, evaluation, KV cache), see :mod:`common.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.cache import CACHE_ENV_VAR
from common.config import ConfigError
from common.llama.loading import EMBEDDED, embedded_cache_folder, embedded_is_converted
from common.lm.corpora import CORPORA
from common.quant.quantizers import check_bits, check_clip_ratio
from common.rules import check_one_of, check_positive
from common.run_settings import RunSettings, describe

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LlamaSettings(RunSettings):
    """A Llama model, the quantization settings and what to evaluate; trees add their rotation's fields."""

    TREE: ClassVar[str] = "llama"
    """Prefix of the default run name (the tree's folder name)."""

    model: str = field(default="embedded", metadata=describe(
        "hub id, local folder, or 'embedded' (SmolLM2-135M)", path=True, kind="model"))
    dtype: str = field(default="float32", metadata=describe(f"model dtype, one of {DTYPES}", choices=DTYPES))
    offload: bool = field(default=False, metadata=describe("keep layers on CPU while calibrating; one on device"))
    calib_dataset: str = field(default="wiki_embedded", metadata=describe(
        "corpus of the calibration windows", choices=tuple(sorted(CORPORA))))
    nsamples: int = field(default=32, metadata=describe("number of calibration windows", low=1))
    seqlen: int = field(default=512, metadata=describe("tokens per calibration and evaluation window", low=2))
    eval_datasets: list[str] = field(default_factory=lambda: ["wiki_embedded"],
                                     metadata=describe("corpora for perplexity", choices=tuple(sorted(CORPORA))))
    eval_max_windows: int | None = field(default=None, metadata=describe("evaluate the first k windows only", low=1))
    eval_batch_size: int = field(default=4, metadata=describe("windows per perplexity forward", low=1))
    tasks: list[str] = field(default_factory=list, metadata=describe(
        "lm-eval zero-shot tasks (comma separated)", kind="task"))
    tasks_include_path: str | None = field(default=None, metadata=describe(
        "folder of extra lm-eval task YAMLs", path=True, kind="existing"))
    tasks_limit: int | None = field(default=None, metadata=describe("lm-eval examples per task (None = all)", low=1))
    tasks_batch_size: int = field(default=8, metadata=describe("lm-eval requests per forward", low=1))
    k_bits: int = field(default=16, metadata=describe("K-cache bits, 1..16 (16 = off)", low=1, high=16))
    v_bits: int = field(default=16, metadata=describe("V-cache bits, 1..16 (16 = off)", low=1, high=16))
    kv_clip_ratio: float = field(default=1.0, metadata=describe("KV range shrink, (0, 1]", above=0, high=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_bits(self.k_bits, "k_bits")
            check_bits(self.v_bits, "v_bits")
            check_clip_ratio(self.kv_clip_ratio, "kv_clip_ratio")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        check_one_of("dtype", self.dtype, DTYPES)
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be at least 2, got {self.seqlen}")
        check_positive("eval_batch_size", self.eval_batch_size)
        check_positive("eval_max_windows", self.eval_max_windows, optional=True)
        check_positive("tasks_limit", self.tasks_limit, optional=True)
        check_positive("tasks_batch_size", self.tasks_batch_size)
        check_one_of("calib_dataset", self.calib_dataset, tuple(sorted(CORPORA)))
        for corpus in self.eval_datasets:
            check_one_of("eval_datasets", corpus, tuple(sorted(CORPORA)))
        if not self.eval_datasets and not self.tasks:
            raise ConfigError("eval_datasets and tasks are both empty: name at least one corpus or task to evaluate")
        if not self.model:
            raise ConfigError("model must be 'embedded', a Hugging Face Hub id or a local folder, got ''")

    def output_folders(self) -> dict[str, Path]:
        """The run's folders, and the cache when the embedded model has not been converted yet."""
        folders = super().output_folders()
        if self.model == EMBEDDED and not embedded_is_converted():
            folders[f"{CACHE_ENV_VAR} (the model cache)"] = embedded_cache_folder().parent
        return folders

    def evaluation_settings(self) -> tuple[str, ...]:
        """The settings of what and how to evaluate (a saved model is evaluated with the current ones)."""
        return ("name", "device", "eval_datasets", "eval_max_windows", "eval_batch_size", "tasks", "tasks_limit",
                "tasks_batch_size", "tasks_include_path", "results_dir")

    def window_settings(self) -> tuple[str, ...]:
        """The settings that are token counts per window (each must fit the model's positions)."""
        return ("seqlen",)

    @property
    def precision(self) -> str:
        """``W4A4``, or ``W4A4K4V4`` when the KV cache is quantized."""
        kv = f"K{self.k_bits}V{self.v_bits}" if self.k_bits < 16 or self.v_bits < 16 else ""
        return super().precision + kv

    @property
    def model_label(self) -> str:
        """A short file-name-safe name of the model: ``smollm2-135m`` or the hub id's / folder's last part."""
        return "smollm2-135m" if self.model == "embedded" else self.model.rstrip("/").split("/")[-1].lower()

    @property
    def run_name(self) -> str:
        return self.name or f"{self.TREE}-{self.model_label}-{self.setting.lower()}"
