"""Settings of a vit_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError
from common.run_settings import RunSettings, describe

EMBEDDED = "embedded"


@dataclass
class VitRunConfig(RunSettings):
    """One run: a vision transformer, the quantization settings and the evaluation data.

    Defaults follow the paper's ViT settings: act_order on, percdamp 0.1, no activation clipping.
    """

    model: str = field(default=EMBEDDED, metadata=describe("timm model name, or 'embedded' (Fashion-MNIST ViT)"))
    checkpoint: str | None = field(default=None, metadata=describe("local weights file instead of timm's"))
    data_path: str | None = field(default=None, metadata=describe("Fashion-MNIST IDX folder, or ImageNet root"))
    eval_batch_size: int = field(default=500, metadata=describe("images per evaluation forward"))
    eval_max_images: int | None = field(default=None, metadata=describe("evaluate the first k images only"))
    workers: int = field(default=4, metadata=describe("ImageNet data-loader workers"))
    a_clip_ratio: float = field(default=1.0, metadata=describe("activation range shrink, (0, 1]"))
    percdamp: float = field(default=0.1, metadata=describe("Hessian damping, fraction of its mean diagonal"))
    act_order: bool = field(default=True, metadata=describe("quantize columns by decreasing Hessian diagonal"))
    calib_batch_size: int = field(default=32, metadata=describe("images per block forward during calibration"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be a positive integer, got {self.eval_batch_size}")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        model = "fmnist-vit" if self.model == EMBEDDED else self.model.split(".")[0].lower()
        return f"vit_quant-{model}-{self.setting.lower()}"
