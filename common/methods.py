"""The methods a run compares, in one table: the one place a method is named.

Each :class:`Method` declares what the rest of the code derives from it: its name (the settings value and
the CSV column) and label, what kind of method it is, the calibration statistics it needs (and so whether
the engine runs the full-precision stream), whether activations are quantized while it calibrates by
default (the paper's protocol: on for the asymmetric methods, off for GPTQ), its layer solve function and
its solver-setting overrides, its colour in the figures and its FLOP model for the benchmark.

Adding a method is one entry in :data:`METHODS`, one module of :mod:`common.solvers` with its solve function
``solve(W, H, D, config, *, name, release_statistics=False)`` returning a
:class:`common.solvers.column_loop.SolveResult` (and the
declarations of its own parameters, :class:`common.solvers.parameters.MethodParameter`, which become settings
of every tree and entries of ``SolverConfig.parameters``), and its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from common.solvers import foem, gptaq, gptq, qep, qronos, rescomp
from common.solvers.column_loop import SolverConfig, SolveResult
from common.solvers.parameters import MethodParameter

Solve = Callable[..., SolveResult]
"""``solve(W [m, n], H [n, n], D [n, n] | None, config: SolverConfig, *, name, release_statistics=False) ->
SolveResult`` (``release_statistics``: ``H`` and ``D`` are handed over, see
:func:`common.solvers.column_loop.solve_layer`)."""

Flops = Callable[[int, int, int], float]
"""``flops(rows, columns, blocksize)``: floating-point operations of one solve (the benchmark's floor)."""

REFERENCE, DATA_FREE, CALIBRATED = "reference", "data-free", "calibrated"
KINDS = (REFERENCE, DATA_FREE, CALIBRATED)


def _gptq_flops(rows: int, columns: int, blocksize: int) -> float:
    """Inverse Cholesky factor (``2n³/3``) and error propagation (``2mn(n + b)/2`` multiply-adds ×2)."""
    n = columns
    return 2 * n**3 / 3 + rows * n * (n + blocksize)


def _gptaq_flops(rows: int, columns: int, blocksize: int) -> float:
    """GPTQ's, plus ``P`` (``2n³/3`` with the triangles) and the ``w·P`` propagation (GPTQ's again)."""
    return 2 * _gptq_flops(rows, columns, blocksize)


def _qep_flops(rows: int, columns: int, blocksize: int) -> float:
    """GPTQ's, plus the correction ``W D (H + λI)⁻¹`` (:mod:`common.qep`'s cheaper order)."""
    m, n = rows, columns
    return _gptq_flops(rows, columns, blocksize) + (2 * n**3 + 2 * m * n**2 if m > n else 4 * m * n**2)


@dataclass(frozen=True)
class Method:
    """One column of a run.

    Attributes:
        name: the settings value and CSV column, e.g. ``gptaq``.
        label: how reports and figures name it, e.g. ``GPTAQ``.
        summary: one line for the documentation and ``--help``.
        kind: ``reference`` (full precision, no quantization), ``data-free`` (RTN) or ``calibrated``.
        statistics: the calibration statistics the solve needs: ``("H",)`` or ``("H", "D")``.
        act_quant_during_calibration: the default protocol: quantize activations in the quantized stream
            while calibrating (``True``) or only afterwards (``False``).
        solve: the layer solve (calibrated methods only).
        solver_overrides: solver settings this method fixes (e.g. the official lazy update).
        parameters: the method's own settings (declared in its module), which the runs' settings expose.
        default: computed when a run does not name its methods.
        color: its colour in figures.
        flops: its FLOP model (calibrated methods only).
    """

    name: str
    label: str
    summary: str
    kind: str
    statistics: tuple[str, ...] = ()
    act_quant_during_calibration: bool = False
    solve: Solve | None = None
    solver_overrides: Mapping[str, Any] = field(default_factory=dict)
    parameters: tuple[MethodParameter, ...] = ()
    default: bool = False
    color: str = "#777777"
    flops: Flops | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == CALIBRATED) != (self.solve is not None):
            raise ValueError(f"{self.name}: a calibrated method needs a solve function, the others none")
        if self.kind == CALIBRATED and "H" not in self.statistics:
            raise ValueError(f"{self.name}: a calibrated method needs at least the statistic H")

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration data (and the layer-by-layer engine)."""
        return self.kind == CALIBRATED

    @property
    def quantized(self) -> bool:
        """Whether its model is quantized (everything but the full-precision reference)."""
        return self.kind != REFERENCE

    @property
    def needs_full_precision_stream(self) -> bool:
        """Whether the engine must also run the full-precision stream (for ``D``)."""
        return "D" in self.statistics

    def solver_config(self, base: SolverConfig) -> SolverConfig:
        """``base`` with this method's overrides applied."""
        return SolverConfig(**{**base.__dict__, **self.solver_overrides}) if self.solver_overrides else base


METHODS: Mapping[str, Method] = MappingProxyType({method.name: method for method in (
    Method("fp", "FP", "the full-precision model (no weight or activation quantization)", REFERENCE,
           default=True, color="#000000"),
    Method("rtn", "RTN", "round-to-nearest weights on the same grid, no calibration data", DATA_FREE,
           default=True, color="#8C8C8C"),
    Method("gptq", "GPTQ", "GPTQ (Frantar et al., 2023): H of the quantized-stream input", CALIBRATED,
           statistics=("H",), solve=gptq.solve, default=True, color="#4C72B0", flops=_gptq_flops),
    Method("gptaq", "GPTAQ", "GPTAQ (Li et al., 2025): GPTQ plus the drift correction P, exact lazy update",
           CALIBRATED, statistics=("H", "D"), act_quant_during_calibration=True, solve=gptaq.solve,
           parameters=(gptaq.ALPHA,), default=True, color="#DD8452", flops=_gptaq_flops),
    Method("gptaq_official", "GPTAQ (official)", "GPTAQ with the official code's lazy update", CALIBRATED,
           statistics=("H", "D"), act_quant_during_calibration=True, solve=gptaq.solve,
           solver_overrides=MappingProxyType({"lazy_update": "official"}), parameters=(gptaq.ALPHA,),
           color="#55A868", flops=_gptaq_flops),
    Method("qep", "QEP", "QEP (Arai & Ichikawa, 2025): GPTQ from W + α_qep·W D (H + λI)⁻¹", CALIBRATED,
           statistics=("H", "D"), act_quant_during_calibration=True, solve=qep.solve,
           parameters=(qep.QEP_ALPHA,), color="#C44E52", flops=_qep_flops),
    Method("qronos", "Qronos", "Qronos (Zhang et al., 2026): least-squares drift correction, then GPTQ",
           CALIBRATED, statistics=("H", "D"), act_quant_during_calibration=True, solve=qronos.solve,
           color="#8172B3", flops=_qep_flops),
    Method("foem", "FOEM", "FOEM (Zheng et al., 2026): GPTQ with the first-order term β (w − w₀)", CALIBRATED,
           statistics=("H",), solve=foem.solve, parameters=(foem.FOEM_BETA,), color="#937860", flops=_gptq_flops),
    Method("foem_official", "FOEM (official)", "FOEM with its authors' code's lazy update (no pull at block "
           "starts, group grids from block-start values)", CALIBRATED, statistics=("H",), solve=foem.solve,
           solver_overrides=MappingProxyType({"lazy_update": "official"}), parameters=(foem.FOEM_BETA,),
           color="#CCB974", flops=_gptq_flops),
    Method("rescomp", "ResComp", "ResComp (Li et al., 2026): GPTAQ plus the compensation-aware term α₂", CALIBRATED,
           statistics=("H", "D"), act_quant_during_calibration=True, solve=rescomp.solve,
           parameters=(gptaq.ALPHA, rescomp.RESCOMP_ALPHA), color="#DA8BC3", flops=_gptaq_flops),
)})
"""Every method, in report order."""

METHOD_PARAMETERS: Mapping[str, MethodParameter] = MappingProxyType(
    {parameter.name: parameter for method in METHODS.values() for parameter in method.parameters})
"""Every method's own settings by name (a setting two methods share, GPTAQ's ``alpha``, appears once)."""

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.default)
BASELINE = "gptq"
"""The method every other is compared with in reports, unless another is chosen."""
GPTQ, GPTAQ, GPTAQ_OFFICIAL = METHODS["gptq"], METHODS["gptaq"], METHODS["gptaq_official"]
"""The methods the GPTAQ ablations (α sweep, lazy-update form) are about."""


def get_method(name: str, setting: str = "method") -> Method:
    """The method called ``name``; ``ValueError`` naming ``setting`` and the allowed names otherwise."""
    if name not in METHODS:
        raise ValueError(f"{setting} must be one of {METHOD_NAMES}, got {name!r}")
    return METHODS[name]
