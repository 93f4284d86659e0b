"""Settings of a fake_quant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.config import ConfigError
from common.export.formats import COMPRESSED_TENSORS, EXPORT_FORMATS, FORMAT_BITS
from common.llama.settings import LlamaSettings
from common.methods import METHODS
from common.quant.quantizers import FULL_PRECISION_BITS
from common.rules import check_one_of
from common.run_settings import describe
from fake_quant.rotation import MODES

MODEL_LOADING = ("blockwise", "whole")


@dataclass
class LlamaRunConfig(LlamaSettings):
    """One run: a Llama model, QuaRot's rotation, the quantization settings and what to evaluate."""

    TREE: ClassVar[str] = "fake_quant"

    rotate: bool = field(default=True, metadata=describe("apply QuaRot's rotation"))
    rotate_mode: str = field(default="hadamard", metadata=describe(f"residual rotation, one of {MODES}", choices=MODES))
    rotate_online: bool = field(default=True, metadata=describe(
        "QuaRot's online Hadamards (o_proj, down_proj inputs); false: only the rotations fused into weights"))
    save_qmodel_path: str | None = field(default=None, metadata=describe(
        "folder to save quantized models into", path=True, kind="output"))
    load_qmodel_path: str | None = field(default=None, metadata=describe(
        "folder to evaluate saved models from", path=True, kind="existing"))
    export_gptq: str | None = field(default=None, metadata=describe(
        "folder: a checkpoint <folder>/<method>/ in export_format per quantized method (weight-only runs)", path=True,
        kind="output"))
    export_format: str = field(default="gptq", metadata=describe(
        f"one of {EXPORT_FORMATS}: gptq (GPTQModel, transformers), gptq_v2 (zero points stored as they are, "
        f"for vLLM), compressed-tensors (pack-quantized: vLLM, llm-compressor)", choices=EXPORT_FORMATS))
    load_gptq: str | None = field(default=None, metadata=describe(
        "folder of --export_gptq checkpoints (any export_format) to evaluate with this repo's reader; writes "
        "results/<name>-from-<export_format>.csv", path=True, kind="existing"))
    model_loading: str = field(default="blockwise", metadata=describe(
        f"one of {MODEL_LOADING}: 'blockwise' holds one decoder block in memory at a time and resumes a killed "
        f"run; 'whole' loads the whole model (needed by zero-shot tasks and save/load_qmodel_path)",
        choices=MODEL_LOADING))
    checkpoint_dir: str | None = field(default=None, metadata=describe(
        "folder of a blockwise run's checkpoint (default <results_dir>/<name>.checkpoint)", path=True, kind="output"))
    restart: bool = field(default=False, metadata=describe("discard the run's checkpoint and start over"))
    keep_checkpoint: bool = field(default=False, metadata=describe(
        "keep the checkpoint (the quantized blocks) after the run succeeds"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_of("rotate_mode", self.rotate_mode, MODES)
        loads = [name for name in ("load_qmodel_path", "load_gptq") if getattr(self, name)]
        saves = [name for name in ("save_qmodel_path", "export_gptq") if getattr(self, name)]
        if len(loads) > 1 or (loads and saves):
            raise ConfigError(f"{' and '.join(saves + loads)} exclude each other: a loaded model is already saved; "
                              f"give one of them")
        check_one_of("export_format", self.export_format, EXPORT_FORMATS)
        if self.export_gptq:
            self.check_exportable()
        check_one_of("model_loading", self.model_loading, MODEL_LOADING)
        whole_only = [name for name in ("tasks", "save_qmodel_path", "load_qmodel_path") if getattr(self, name)]
        if self.model_loading == "blockwise" and whole_only:
            raise ConfigError(f"{', '.join(whole_only)} cannot run with model_loading: blockwise (one block in "
                              f"memory at a time): set model_loading: whole")

    @property
    def checkpoint_folder(self) -> Path:
        """Where a blockwise run keeps its finished work."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(self.results_dir) / f"{self.run_name}.checkpoint"

    def check_exportable(self) -> None:
        """``export_format`` holds integer weights on its grid and nothing else; ``ConfigError`` naming each
        setting it cannot hold otherwise."""
        problems = []
        if self.a_bits < FULL_PRECISION_BITS:
            problems.append(f"a_bits must be 16 (activations stay in full precision), got {self.a_bits}")
        if self.k_bits < FULL_PRECISION_BITS or self.v_bits < FULL_PRECISION_BITS:
            problems.append(f"k_bits and v_bits must be 16 (no KV-cache quantizer), got {self.k_bits}, {self.v_bits}")
        if self.rotate and self.rotate_online:
            problems.append("rotate_online must be false (the format has no online Hadamard; the rotation fused "
                            "into the weights is kept), or rotate false")
        if self.w_bits not in FORMAT_BITS[self.export_format]:
            problems.append(f"w_bits must be one of {FORMAT_BITS[self.export_format]}, got {self.w_bits}")
        if self.export_format == COMPRESSED_TENSORS:
            problems += self._compressed_tensors_problems()
        elif self.w_grid != "gptq":
            problems.append(f"w_grid must be 'gptq' (float16 scales, zero points 1..2^bits-1, which the "
                            f"checkpoint stores exactly), got {self.w_grid!r}")
        if not any(METHODS[name].quantized for name in self.methods):
            problems.append(f"methods must name a quantizing method, got {self.methods}")
        if problems:
            raise ConfigError(f"export_gptq writes weight-only {self.export_format} checkpoints: "
                              + "; ".join(problems))

    def _compressed_tensors_problems(self) -> list[str]:
        """What compressed-tensors cannot hold: scales that are not values of the model's dtype, columns
        grouped in act_order."""
        problems = []
        if self.dtype == "bfloat16":
            problems.append("dtype must be float32 or float16: compressed-tensors stores the scales in the "
                            "model's dtype, and no weight grid has bfloat16 scales")
        elif self.dtype == "float16" and self.w_grid != "gptq":
            problems.append(f"w_grid must be 'gptq' (float16 scales) for a float16 model: compressed-tensors "
                            f"stores the scales in the model's dtype, got {self.w_grid!r}")
        if self.act_order and self.w_groupsize > 0 and not self.static_groups:
            problems.append("static_groups must be true with act_order and groups: compressed-tensors keeps "
                            "no column permutation (g_idx), so each group must be a run of consecutive columns")
        return problems

    def output_folders(self) -> dict[str, Path]:
        folders = super().output_folders()
        for name in ("save_qmodel_path", "export_gptq"):
            if getattr(self, name):
                folders[name] = Path(getattr(self, name))
        if self.model_loading == "blockwise":
            folders["checkpoint_dir"] = self.checkpoint_folder
        return folders

    @property
    def run_name(self) -> str:
        """As :class:`LlamaSettings`, with ``-from-<export_format>`` when evaluating exported checkpoints (so
        that the run that exported them keeps its result files)."""
        return super().run_name + (f"-from-{self.export_format}" if self.load_gptq else "")
