"""A method's own settings (GPTAQ's ``α``, QEP's ``α_qep``), each declared once, in its method's module.

A declaration gives the setting's name, default, help text and rule. The setting is a field of
:class:`~common.solvers.column_loop.SolverConfig` (what the solve reads) and of
:class:`common.run_settings.RunSettings` (what the user writes); the method's ``solve`` checks it before any
work, and the runs' settings check every registered method's parameters when they are read, by the same
rule (:meth:`MethodParameter.check`).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.rules import check_nonnegative


@dataclass(frozen=True)
class MethodParameter:
    """A non-negative, finite scale of a method.

    Attributes:
        name: the setting's name (a field of ``SolverConfig`` and of ``RunSettings``).
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
