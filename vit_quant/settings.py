"""Settings of a vit_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError
from common.gptaq import LAZY_UPDATES
from common.pipeline import METHODS
from common.quant import check_bits, check_clip_ratio

EMBEDDED = "embedded"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class VitRunConfig:
    """One run: a vision transformer, the quantization settings and the evaluation data."""

    name: str | None = field(default=None, metadata=_help("results/<name>.csv; default: derived from the settings"))
    model: str = field(default=EMBEDDED, metadata=_help("timm model name, or 'embedded' (Fashion-MNIST ViT)"))
    checkpoint: str | None = field(default=None, metadata=_help("local weights file instead of timm's pretrained"))
    data_path: str | None = field(default=None, metadata=_help("Fashion-MNIST IDX folder, or ImageNet root"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:i"))
    seed: int = field(default=0, metadata=_help("seed of the calibration image draw"))
    nsamples: int = field(default=128, metadata=_help("calibration images"))
    eval_batch_size: int = field(default=500, metadata=_help("images per evaluation forward"))
    eval_max_images: int | None = field(default=None, metadata=_help("evaluate the first k images only"))
    workers: int = field(default=4, metadata=_help("ImageNet data-loader workers"))
    w_bits: int = field(default=4, metadata=_help("weight bits, 1..16"))
    w_asym: bool = field(default=True, metadata=_help("asymmetric weight grid"))
    w_groupsize: int = field(default=-1, metadata=_help("-1 = per output channel, else columns per group"))
    w_clip: bool = field(default=True, metadata=_help("MSE clip search for the weight grid"))
    a_bits: int = field(default=4, metadata=_help("activation bits, 1..16 (16 = off)"))
    a_asym: bool = field(default=True, metadata=_help("asymmetric activation grid"))
    a_clip_ratio: float = field(default=1.0, metadata=_help("activation range shrink, (0, 1]"))
    a_groupsize: int = field(default=-1, metadata=_help("-1 = per token, else channels per group"))
    percdamp: float = field(default=0.1, metadata=_help("Hessian damping, fraction of its mean diagonal"))
    act_order: bool = field(default=True, metadata=_help("quantize columns by decreasing Hessian diagonal"))
    static_groups: bool = field(default=False, metadata=_help("group grids from the original weights"))
    blocksize: int = field(default=128, metadata=_help("solver lazy-update block size"))
    alpha: float = field(default=0.25, metadata=_help("GPTAQ drift-correction scale (official code: 0.25)"))
    lazy_update: str = field(default="exact", metadata=_help(f"GPTAQ lazy update form, one of {LAZY_UPDATES}"))
    methods: list[str] = field(default_factory=lambda: ["fp", "rtn", "gptq", "gptaq"],
                               metadata=_help(f"columns to compute, from {METHODS}"))
    act_quant_during_calibration: bool | None = field(
        default=None, metadata=_help("None = paper protocol (GPTAQ on, GPTQ off); true/false for both")
    )
    calib_batch_size: int = field(default=32, metadata=_help("images per block forward during calibration"))
    results_dir: str = field(default="results", metadata=_help("folder of the result CSV/JSON"))

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            check_bits(getattr(self, name), name)
        check_clip_ratio(self.a_clip_ratio, "a_clip_ratio")
        if self.lazy_update not in LAZY_UPDATES:
            raise ConfigError(f"lazy_update must be one of {LAZY_UPDATES}, got {self.lazy_update!r}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ConfigError(f"methods must be one or more of {METHODS}, got {self.methods}")
        for name in ("nsamples", "eval_batch_size", "calib_batch_size", "blocksize"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.percdamp < 0:
            raise ConfigError(f"percdamp must be >= 0, got {self.percdamp}")

    @property
    def setting(self) -> str:
        label = f"W{self.w_bits}A{self.a_bits}"
        return label + (f"-g{self.w_groupsize}" if self.w_groupsize > 0 else "")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        model = "fmnist-vit" if self.model == EMBEDDED else self.model.split(".")[0].lower()
        return f"vit_quant-{model}-{self.setting.lower()}"
