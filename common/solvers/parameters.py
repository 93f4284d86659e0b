"""A method's own settings (GPTAQ's ``α``, QEP's ``α_qep``), each declared once, in its method's module.

A declaration gives the setting's name, default, help text and rule. Registered with its method
(:data:`common.methods.METHODS`), it becomes a field of :class:`common.run_settings.RunSettings` (what the user
writes) and an entry of :attr:`SolverConfig.parameters <common.solvers.column_loop.SolverConfig>` (what the
solve reads, with :meth:`MethodParameter.value`); both check it by the same rule (:meth:`MethodParameter.check`)
when they are made, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.rules import check_nonnegative

if TYPE_CHECKING:
    from common.solvers.column_loop import SolverConfig


@dataclass(frozen=True)
class MethodParameter:
    """A non-negative, finite scale of a method.

    Attributes:
        name: the setting's name (a field of ``RunSettings``, a key of ``SolverConfig.parameters``).
        default: its default value.
        meaning: what it is, for ``--help`` and error messages, e.g. ``GPTAQ's drift-correction scale``.
    """

    name: str
    default: float
    meaning: str

    def check(self, value: float) -> float:
        """``value`` if it is finite and >= 0; else ``ConfigError`` naming the setting."""
        check_nonnegative(self.name, value, self.meaning)
        return value

    def value(self, config: SolverConfig) -> float:
        """Its value in ``config`` (the declared default when ``config`` does not set it)."""
        return config.parameters.get(self.name, self.default)
