"""Settings of a spinquant run (YAML config + command-line overrides, see :mod:`common.config`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.config import ConfigError
from common.llama.settings import LlamaSettings
from common.quant.quantizers import check_grid_bits
from common.run_settings import describe
from spinquant.train import TrainingSettings

ROTATION_FIELDS = (
    "model", "dtype", "seed", "calib_dataset", "a_bits", "a_asym", "a_clip_ratio", "a_groupsize", "k_bits",
    "v_bits", "kv_clip_ratio", "rotation_steps", "rotation_lr", "rotation_momentum", "rotation_nsamples",
    "rotation_seqlen", "rotation_batch_size", "rotation_w_bits", "rotation_w_asym",
)
"""The settings a learned rotation depends on (its cache key); batch splitting and checkpointing do not count."""


@dataclass
class SpinQuantConfig(LlamaSettings):
    """One run: a Llama model, SpinQuant's learned rotation, the quantization settings and what to evaluate."""

    TREE: ClassVar[str] = "spinquant"

    rotation_path: str | None = field(default=None, metadata=describe(
        "rotation file (safetensors): used if complete, resumed if not, written if absent; "
        "default: <cache>/spinquant/<model>-<hash of the rotation settings>.safetensors", path=True, kind="output"))
    rotation_steps: int = field(default=100, metadata=describe("Cayley SGD steps (paper: 800)", low=1))
    rotation_lr: float = field(default=1.5, metadata=describe(
        "Cayley SGD step size, cosine-decayed (paper: 1.5)", above=0))
    rotation_momentum: float = field(default=0.0, metadata=describe("Cayley SGD momentum in [0, 1)", low=0, below=1))
    rotation_nsamples: int = field(default=128, metadata=describe("training windows of calib_dataset", low=1))
    rotation_seqlen: int = field(default=256, metadata=describe("tokens per training window (paper: 2048)", low=2))
    rotation_batch_size: int = field(default=2, metadata=describe("training windows per step", low=1))
    rotation_micro_batch_size: int = field(default=2, metadata=describe("windows per forward (memory only)", low=1))
    rotation_w_bits: int = field(default=16, metadata=describe(
        "RTN weight bits while training (16 = off)", low=1, high=16))
    rotation_w_asym: bool = field(default=True, metadata=describe("asymmetric RTN grid while training"))
    rotation_checkpoint_every: int = field(default=25, metadata=describe("steps between rotation checkpoints", low=1))
    quarot_baseline: bool = field(default=True, metadata=describe(
        "also evaluate the untrained random-Hadamard rotation (QuaRot-style) with the same methods"))

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_grid_bits(self.rotation_w_bits, not self.rotation_w_asym, "rotation_w_bits", "rotation_w_asym: false")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.rotation_seqlen < 2:
            raise ConfigError(f"rotation_seqlen must be at least 2, got {self.rotation_seqlen}")
        if not 0 <= self.rotation_momentum < 1:
            raise ConfigError(f"rotation_momentum must be in [0, 1), got {self.rotation_momentum}")
        if self.rotation_batch_size > self.rotation_nsamples:
            raise ConfigError(f"rotation_batch_size ({self.rotation_batch_size}) must not exceed rotation_nsamples "
                              f"({self.rotation_nsamples})")
        try:
            self.training_settings()
        except ValueError as error:
            raise ConfigError(f"rotation_{error}") from None

    def window_settings(self) -> tuple[str, ...]:
        return (*super().window_settings(), "rotation_seqlen")

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(
            steps=self.rotation_steps, lr=self.rotation_lr, momentum=self.rotation_momentum,
            batch_size=self.rotation_batch_size, micro_batch_size=self.rotation_micro_batch_size, seed=self.seed,
            w_bits=self.rotation_w_bits, w_asym=self.rotation_w_asym, checkpoint_every=self.rotation_checkpoint_every,
        )

    def rotation_settings(self) -> dict[str, Any]:
        """The settings the learned rotation depends on (stored in the rotation file)."""
        values = dataclasses.asdict(self)
        return {name: values[name] for name in ROTATION_FIELDS}

    def rotation_key(self) -> str:
        """16 hex digits of the SHA-256 of :meth:`rotation_settings`."""
        text = json.dumps(self.rotation_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
