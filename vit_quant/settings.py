"""Settings of a vit_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from common.config import ConfigError
from common.rules import check_positive
from common.run_settings import RunSettings, describe

EMBEDDED = "embedded"


@dataclass
class VitRunConfig(RunSettings):
    """One run: a vision transformer, the quantization settings and the evaluation data.

    Defaults follow the paper's ViT settings: act_order on, percdamp 0.1, no activation clipping.
    """

    TREE: ClassVar[str] = "vit_quant"

    model: str = field(default=EMBEDDED, metadata=describe(
        "timm model name, or 'embedded' (Fashion-MNIST ViT)", kind="model"))
    checkpoint: str | None = field(default=None, metadata=describe(
        "local weights file instead of timm's (embedded: a vit_quant.train_embedded file)", path=True,
        kind="existing"))
    data_path: str | None = field(default=None, metadata=describe(
        "Fashion-MNIST IDX folder, or ImageNet root", path=True, kind="existing"))
    eval_batch_size: int = field(default=500, metadata=describe("images per evaluation forward", low=1))
    eval_max_images: int | None = field(default=None, metadata=describe("evaluate the first k images only", low=1))
    workers: int = field(default=4, metadata=describe("ImageNet data-loader workers", low=0))
    a_clip_ratio: float = field(default=1.0, metadata=describe("activation range shrink, (0, 1]", above=0, high=1))
    percdamp: float = field(default=0.1, metadata=describe("Hessian damping, fraction of its mean diagonal", low=0))
    act_order: bool = field(default=True, metadata=describe("quantize columns by decreasing Hessian diagonal"))
    calib_batch_size: int = field(default=32, metadata=describe("images per block forward during calibration", low=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("eval_batch_size", self.eval_batch_size)
        check_positive("eval_max_images", self.eval_max_images, optional=True)
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (load in the main process) or a positive integer, got {self.workers}")
        if not self.model:
            raise ConfigError("model must be 'embedded' or a timm model name, got ''")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        model = "fmnist-vit" if self.model == EMBEDDED else self.model.split(".")[0].lower()
        return f"{self.TREE}-{model}-{self.setting.lower()}"
