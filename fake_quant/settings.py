"""Settings of a fake_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.config import ConfigError
from common.llama.settings import LlamaSettings
from common.run_settings import check_one_of, describe
from fake_quant.rotation import MODES


@dataclass
class LlamaRunConfig(LlamaSettings):
    """One run: a Llama model, QuaRot's rotation, the quantization settings and what to evaluate."""

    TREE: ClassVar[str] = "fake_quant"

    rotate: bool = field(default=True, metadata=describe("apply QuaRot's rotation"))
    rotate_mode: str = field(default="hadamard", metadata=describe(f"residual rotation, one of {MODES}"))
    save_qmodel_path: str | None = field(default=None, metadata=describe("folder to save quantized models into"))
    load_qmodel_path: str | None = field(default=None, metadata=describe("folder to evaluate saved models from"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_of("rotate_mode", self.rotate_mode, MODES)
        if self.save_qmodel_path and self.load_qmodel_path:
            raise ConfigError("save_qmodel_path and load_qmodel_path exclude each other: a loaded model is already "
                              "saved; give one of them")

    def output_folders(self) -> dict[str, Path]:
        folders = super().output_folders()
        if self.save_qmodel_path:
            folders["save_qmodel_path"] = Path(self.save_qmodel_path)
        return folders
