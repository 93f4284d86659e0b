"""What one calibration is asked to do (:class:`CalibrationSettings`) and what it measured
(:class:`CalibrationReport`, one :class:`LayerRecord` per linear)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from common.methods import METHODS, Method, get_method
from common.rules import check_positive
from common.solvers.column_loop import SolverConfig


@dataclass(frozen=True)
class CalibrationSettings:
    """How to quantize the weights of the adapter's linears.

    Attributes:
        method: the name of a quantizing method of :data:`common.methods.METHODS` (``rtn`` or calibrated).
        solver: solver settings (bits, groups, damping, ...); the method's own overrides are applied.
        act_quant_during_calibration: ``None`` for the method's protocol; ``True``/``False`` for any method.
        batch_size: samples per block forward.
        device: where each block is computed.
        offload_device: where the streams and the full-precision input cache are kept (default ``device``).
        stats_dtype: accumulation dtype of ``H`` and ``D``.
        linear_solvers: solver settings for particular linears, by name within a block (e.g. QEP's
            excluded linears with ``qep_alpha = 0``).
        reuse_outputs: keep each solved linear's outputs for the block's later passes instead of computing
            them again (memory: one block's linear outputs for every sample, on ``offload_device``).
    """

    method: str
    solver: SolverConfig
    act_quant_during_calibration: bool | None = None
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_device: torch.device | None = None
    stats_dtype: torch.dtype = torch.float32
    linear_solvers: Mapping[str, SolverConfig] = field(default_factory=dict)
    reuse_outputs: bool = True

    def __post_init__(self) -> None:
        if not get_method(self.method).quantized:
            raise ValueError(f"method must be a quantizing method, one of "
                             f"{tuple(n for n, m in METHODS.items() if m.quantized)}, got {self.method!r}")
        check_positive("batch_size", self.batch_size)

    @property
    def spec(self) -> Method:
        """The method's registry entry."""
        return METHODS[self.method]

    @property
    def quantize_activations(self) -> bool:
        """Whether the quantized stream quantizes activations while calibrating."""
        if self.act_quant_during_calibration is not None:
            return self.act_quant_during_calibration
        return self.spec.act_quant_during_calibration

    def solver_for(self, linear: str) -> SolverConfig:
        """The solver settings of ``linear`` (a name within a block), the method's overrides applied."""
        return self.spec.solver_config(self.linear_solvers.get(linear, self.solver))


@dataclass(frozen=True)
class LayerRecord:
    """Per-linear outcome: the solver's proxy loss and the relative output error on the calibration data."""

    block: int
    name: str
    method: str
    rows: int
    columns: int
    loss: float
    output_error: float
    percdamp: float
    seconds: float


@dataclass
class CalibrationReport:
    """Everything calibration measured, in block order."""

    method: str
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    parts: dict[str, list[float]] = field(default_factory=dict)
    """``{"forwards" | "statistics" | "solves": [seconds, flops]}``: where calibration spent its time."""

    def add_part(self, part: str, seconds: float, flops: float) -> None:
        totals = self.parts.setdefault(part, [0.0, 0.0])
        totals[0] += seconds
        totals[1] += flops

    def mean_output_error(self) -> float:
        errors = [layer.output_error for layer in self.layers if layer.output_error == layer.output_error]
        return sum(errors) / len(errors) if errors else float("nan")
