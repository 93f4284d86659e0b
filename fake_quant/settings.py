"""Settings of a fake_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError
from common.gptaq import LAZY_UPDATES
from common.quant import check_bits, check_clip_ratio
from fake_quant.rotation import MODES

METHODS = ("fp", "rtn", "gptq", "gptaq", "gptaq_official")
DTYPES = ("float32", "float16", "bfloat16")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class LlamaRunConfig:
    """One run: a model, its rotation, the quantization settings and what to evaluate."""

    name: str | None = field(default=None, metadata=_help("results/<name>.csv; default: derived from the settings"))
    model: str = field(default="embedded", metadata=_help("hub id, local folder, or 'embedded' (SmolLM2-135M)"))
    dtype: str = field(default="float32", metadata=_help(f"model dtype, one of {DTYPES}"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:i"))
    offload: bool = field(default=False, metadata=_help("keep layers on CPU during calibration, one block on device"))
    seed: int = field(default=0, metadata=_help("seed of the rotation and of the calibration windows"))
    rotate: bool = field(default=True, metadata=_help("apply QuaRot's rotation"))
    rotate_mode: str = field(default="hadamard", metadata=_help(f"residual rotation, one of {MODES}"))
    calib_dataset: str = field(default="wiki_embedded", metadata=_help("corpus of the calibration windows"))
    nsamples: int = field(default=32, metadata=_help("number of calibration windows"))
    seqlen: int = field(default=512, metadata=_help("tokens per calibration and evaluation window"))
    eval_datasets: list[str] = field(default_factory=lambda: ["wiki_embedded"],
                                     metadata=_help("corpora for perplexity"))
    eval_max_windows: int | None = field(default=None, metadata=_help("evaluate the first k windows only"))
    eval_batch_size: int = field(default=4, metadata=_help("windows per perplexity forward"))
    tasks: list[str] = field(default_factory=list, metadata=_help("lm-eval zero-shot tasks (comma separated)"))
    tasks_limit: int | None = field(default=None, metadata=_help("lm-eval examples per task (None = all)"))
    w_bits: int = field(default=4, metadata=_help("weight bits, 1..16"))
    w_asym: bool = field(default=True, metadata=_help("asymmetric weight grid"))
    w_groupsize: int = field(default=-1, metadata=_help("-1 = per output channel, else columns per group"))
    w_clip: bool = field(default=True, metadata=_help("MSE clip search for the weight grid"))
    a_bits: int = field(default=4, metadata=_help("activation bits, 1..16 (16 = off)"))
    a_asym: bool = field(default=True, metadata=_help("asymmetric activation grid"))
    a_clip_ratio: float = field(default=0.9, metadata=_help("activation range shrink, (0, 1]"))
    a_groupsize: int = field(default=-1, metadata=_help("-1 = per token, else channels per group"))
    k_bits: int = field(default=16, metadata=_help("K-cache bits, 1..16 (16 = off)"))
    v_bits: int = field(default=16, metadata=_help("V-cache bits, 1..16 (16 = off)"))
    kv_clip_ratio: float = field(default=1.0, metadata=_help("KV range shrink, (0, 1]"))
    percdamp: float = field(default=0.01, metadata=_help("Hessian damping, fraction of its mean diagonal"))
    act_order: bool = field(default=False, metadata=_help("quantize columns by decreasing Hessian diagonal"))
    static_groups: bool = field(default=False, metadata=_help("group grids from the original weights"))
    blocksize: int = field(default=128, metadata=_help("solver lazy-update block size"))
    alpha: float = field(default=0.25, metadata=_help("GPTAQ drift-correction scale (official code: 0.25)"))
    lazy_update: str = field(default="exact", metadata=_help(f"GPTAQ lazy update form, one of {LAZY_UPDATES}"))
    methods: list[str] = field(default_factory=lambda: ["fp", "rtn", "gptq", "gptaq"],
                               metadata=_help(f"columns to compute, from {METHODS}"))
    act_quant_during_calibration: bool | None = field(
        default=None, metadata=_help("None = paper protocol (GPTAQ on, GPTQ off); true/false for both")
    )
    calib_batch_size: int = field(default=8, metadata=_help("windows per block forward during calibration"))
    results_dir: str = field(default="results", metadata=_help("folder of the result CSV/JSON"))
    save_qmodel_path: str | None = field(default=None, metadata=_help("folder to save quantized models into"))
    load_qmodel_path: str | None = field(default=None, metadata=_help("folder to evaluate saved models from"))

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
            check_bits(getattr(self, name), name)
        check_clip_ratio(self.a_clip_ratio, "a_clip_ratio")
        check_clip_ratio(self.kv_clip_ratio, "kv_clip_ratio")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("rotate_mode", self.rotate_mode, MODES)
        _one_of("lazy_update", self.lazy_update, LAZY_UPDATES)
        for method in self.methods:
            _one_of("methods", method, METHODS)
        if not self.methods:
            raise ConfigError(f"methods must name at least one of {METHODS}")
        for name in ("nsamples", "seqlen", "eval_batch_size", "calib_batch_size", "blocksize"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.w_groupsize != -1 and self.w_groupsize < 1:
            raise ConfigError(f"w_groupsize must be -1 or a positive integer, got {self.w_groupsize}")
        if self.percdamp < 0:
            raise ConfigError(f"percdamp must be >= 0, got {self.percdamp}")

    @property
    def setting(self) -> str:
        """A short label such as ``W4A4`` or ``W2A4KV4-g128``."""
        label = f"W{self.w_bits}A{self.a_bits}"
        if self.k_bits < 16 or self.v_bits < 16:
            label += f"K{self.k_bits}V{self.v_bits}"
        if self.w_groupsize > 0:
            label += f"-g{self.w_groupsize}"
        return label

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        model = "smollm2-135m" if self.model == "embedded" else self.model.rstrip("/").split("/")[-1].lower()
        return f"fake_quant-{model}-{self.setting.lower()}"


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
