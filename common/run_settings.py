"""Settings every tree's run shares: the methods, weight and activation grids, and the solver options.

Tree configurations subclass :class:`RunSettings` and add their own fields (model, data, rotation, ...);
a subclass may redeclare a field to change its default (e.g. ``percdamp`` 0.1 for ViTs).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from common.cache import CACHE_ENV_VAR, cache_root
from common.files import check_name_fits, check_plain_name, check_writable_dir, sweep_stale_temporaries
from common.methods import DEFAULT_METHODS, METHOD_NAMES, METHOD_PARAMETERS, METHODS
from common.quant.quantizers import GRIDS, check_clip_ratio, check_grid_bits
from common.rules import Accepts, ConfigError, check_group_size, check_nonnegative, check_one_of, check_positive
from common.solvers.column_loop import LAZY_UPDATES


def describe(text: str, *, path: bool = False, **accepts: Any) -> dict[str, Any]:
    """Field metadata holding the ``--help`` text and the values the setting accepts (keywords of
    :class:`~common.rules.Accepts`: ``low``, ``high``, ``above``, ``below``, ``choices``, ``kind``); ``path``: the
    value is a file or folder, and a leading ``~`` means the home folder, as in a shell
    (:meth:`RunSettings.__post_init__` expands it)."""
    return {"help": text, "path": path, "accepts": Accepts(**accepts)}


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str) -> None:
    if DEVICE_PATTERN.fullmatch(device) is None:
        raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:<index>; got {device!r}")


def with_method_parameters(cls: type) -> type:
    """``cls`` (before ``@dataclass``) with one float field per registered method parameter
    (:data:`common.methods.METHOD_PARAMETERS`: GPTAQ's ``alpha``, QEP's ``qep_alpha``, ...), its declared default
    and meaning, after the fields ``cls`` declares: a method's parameter is declared once, in its module."""
    for parameter in METHOD_PARAMETERS.values():
        cls.__annotations__[parameter.name] = "float"
        setattr(cls, parameter.name, field(default=parameter.default, metadata=describe(parameter.meaning, low=0)))
    return cls


@dataclass
@with_method_parameters
class RunSettings:
    """Shared fields, and one per method parameter (:func:`with_method_parameters`); see ``--help`` of any tree's
    entry point for their meaning."""

    TREE: ClassVar[str] = "run"
    """The tree's name (``fake_quant``, ``spinquant``, ``vit_quant``): the result JSON's ``tree``."""

    name: str | None = field(default=None, metadata=describe(
        "results/<name>.csv; default: derived from settings", kind="name"))
    device: str = field(default="auto", metadata=describe("auto, cpu, cuda or cuda:i", kind="device"))
    seed: int = field(default=0, metadata=describe("seed of every random choice (rotation, calibration draw)", low=0))
    nsamples: int = field(default=128, metadata=describe("number of calibration samples", low=1))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata=describe(f"columns to compute, from {METHOD_NAMES}", choices=METHOD_NAMES))
    w_bits: int = field(default=4, metadata=describe("weight bits, 1..16", low=1, high=16))
    w_asym: bool = field(default=True, metadata=describe("asymmetric weight grid"))
    w_groupsize: int = field(default=-1, metadata=describe("-1 = per output channel, else columns per group", low=-1))
    w_clip: bool = field(default=True, metadata=describe("MSE clip search for the weight grid"))
    w_grid: str = field(default="float", metadata=describe(
        f"weight grid, one of {GRIDS} (gptq: float16 scales, zero points 1..2^bits-1, as checkpoints store them)",
        choices=GRIDS))
    a_bits: int = field(default=4, metadata=describe("activation bits, 1..16 (16 = off)", low=1, high=16))
    a_asym: bool = field(default=True, metadata=describe("asymmetric activation grid"))
    a_clip_ratio: float = field(default=0.9, metadata=describe("activation range shrink, (0, 1]", above=0, high=1))
    a_groupsize: int = field(default=-1, metadata=describe("-1 = per token, else channels per group", low=-1))
    percdamp: float = field(default=0.01, metadata=describe("Hessian damping, fraction of its mean diagonal", low=0))
    act_order: bool = field(default=False, metadata=describe("quantize columns by decreasing Hessian diagonal"))
    static_groups: bool = field(default=False, metadata=describe("group grids from the original weights"))
    blocksize: int = field(default=128, metadata=describe("solver lazy-update block size", low=1))
    lazy_update: str = field(default="exact", metadata=describe(
        f"GPTAQ lazy update form, one of {LAZY_UPDATES}", choices=LAZY_UPDATES))
    qep_exclude: list[str] = field(default_factory=list, metadata=describe(
        "linears QEP leaves uncorrected, by name within a block (e.g. mlp.down_proj)", kind="linear"))
    act_quant_during_calibration: bool | None = field(
        default=None, metadata=describe("None = each method's protocol (asymmetric ones on, GPTQ off); "
                                        "true/false for all")
    )
    calib_batch_size: int = field(default=8, metadata=describe("samples per block forward during calibration", low=1))
    results_dir: str = field(default="results", metadata=describe(
        "folder of the result CSV/JSON", path=True, kind="output"))

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if setting.metadata.get("path") and isinstance(value, str):
                setattr(self, setting.name, os.path.expanduser(value))
        try:
            check_grid_bits(self.w_bits, not self.w_asym, "w_bits", "w_asym: false")
            check_grid_bits(self.a_bits, not self.a_asym, "a_bits", "a_asym: false")
            check_clip_ratio(self.a_clip_ratio, "a_clip_ratio")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        check_one_of("lazy_update", self.lazy_update, LAZY_UPDATES)
        check_one_of("w_grid", self.w_grid, GRIDS)
        if not self.methods:
            raise ConfigError(f"methods must name at least one of {METHOD_NAMES}")
        for method in self.methods:
            check_one_of("methods", method, METHOD_NAMES)
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise ConfigError(f"methods must name each method once, got {repeated} more than once")
        for name in ("nsamples", "calib_batch_size", "blocksize"):
            check_positive(name, getattr(self, name))
        for name in ("w_groupsize", "a_groupsize"):
            check_group_size(name, getattr(self, name))
        check_nonnegative("percdamp", self.percdamp, "a fraction of the mean Hessian diagonal")
        for parameter in METHOD_PARAMETERS.values():
            parameter.check(getattr(self, parameter.name))
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        check_device(self.device)
        if self.name is not None:
            check_plain_name(self.name, "name")
        if not self.results_dir:
            raise ConfigError("results_dir must name a folder, got an empty string")

    def output_folders(self) -> dict[str, Path]:
        """``{setting: folder}`` of every folder this run will write into (checked before any work)."""
        return {"results_dir": Path(self.results_dir)}

    @property
    def calibrates(self) -> bool:
        """Whether any of the methods needs calibration data."""
        return any(METHODS[name].calibrated for name in self.methods)

    def check_model_linears(self, input_sizes: Mapping[str, int]) -> None:
        """Settings that name or divide the quantized linears (``{name within a block: in_features}``):
        both group sizes divide every input size; ``qep_exclude`` names existing linears."""
        unknown = [name for name in self.qep_exclude if name not in input_sizes]
        if unknown:
            raise ConfigError(f"qep_exclude names {unknown}, which are not quantized linears of this model; "
                              f"allowed: {sorted(input_sizes)}")
        for option in ("w_groupsize", "a_groupsize"):
            size = getattr(self, option)
            for name, features in input_sizes.items():
                if size != -1 and features % size != 0:
                    raise ConfigError(f"{option} must be -1 or a positive divisor of every quantized linear's input "
                                      f"size; {size} does not divide {features} ({name})")

    def check_outputs(self) -> None:
        """Check that the run's name fits the file names made from it, probe every output folder
        (``ConfigError`` naming the setting) and sweep stale temporaries; with several methods, also the cache
        folder of the weight snapshot they start from."""
        check_name_fits(self.run_name, self.results_dir, "name")
        folders = self.output_folders()
        if len(self.methods) > 1:
            folders[f"{CACHE_ENV_VAR} (the weight snapshot between methods)"] = cache_root() / "snapshots"
        for setting, folder in folders.items():
            check_writable_dir(folder, setting)
            sweep_stale_temporaries(folder)

    @property
    def run_name(self) -> str:
        """The stem of the result files: ``name``, or one made from the tree and the setting (trees add the
        model)."""
        return self.name or f"{self.TREE}-{self.setting.lower()}"

    @property
    def precision(self) -> str:
        """The bit widths, e.g. ``W4A4`` (trees may add theirs, e.g. the KV cache's)."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def setting(self) -> str:
        """A short label such as ``W4A4`` or ``W2A4-g128``."""
        return self.precision + (f"-g{self.w_groupsize}" if self.w_groupsize > 0 else "")
