"""The rule of every kind of setting, each defined once.

The command line's settings (:class:`common.run_settings.RunSettings` and the trees' subclasses) and the
Python API's (:class:`common.solvers.column_loop.SolverConfig`, the method parameters of
:mod:`common.solvers.parameters`) check their values with these functions, passing the name the user
wrote, so both accept and refuse the same values with the same message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file is invalid."""


def check_one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value`` is one of ``allowed``; else ``ConfigError`` naming ``name``."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def check_positive(name: str, value: int | None, *, optional: bool = False) -> None:
    """``value`` is an integer >= 1 (or ``None`` when ``optional``); else ``ConfigError`` naming ``name``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or None (no limit)" if optional else "")
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_group_size(name: str, value: int) -> None:
    """``value`` is -1 (one group per row or token) or a positive integer; else ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != -1 and value < 1):
        raise ConfigError(f"{name} must be -1 or a positive integer, got {value!r}")


def check_finite(name: str, value: float) -> None:
    """``value`` is a finite real number; else ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def check_nonnegative(name: str, value: float, meaning: str) -> None:
    """``value`` is finite and >= 0; else ``ConfigError`` naming ``name`` and saying what it is (``meaning``)."""
    check_finite(name, value)
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 ({meaning}), got {value}")


VALUE_KINDS = ("name", "device", "model", "existing", "output", "task", "linear")
"""Free-form string settings, by what they must name: a plain file name, a device, a model, an existing file
or folder, a folder or file to write, an lm-eval task, a quantized linear of the model."""


@dataclass(frozen=True)
class Accepts:
    """The values a setting accepts, declared beside it (``describe(..., low=1, high=16)``); the tree's
    settings enforce them when they are made or in the run's preflight, and a test tries a value outside
    them for every setting of every tree.

    Attributes:
        low, high: inclusive bounds of a number.
        above, below: exclusive bounds of a number.
        choices: the allowed strings (of the value, or of each item of a list).
        kind: for a free-form string, one of :data:`VALUE_KINDS`.
    """

    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None:
            check_one_of("kind", self.kind, VALUE_KINDS)

    @property
    def declared(self) -> bool:
        """Whether it says anything about the values (a bound, the choices or a kind)."""
        return any(value is not None for value in (self.low, self.high, self.above, self.below, self.choices,
                                                    self.kind))
