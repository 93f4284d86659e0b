"""How the report shows numbers, table cells, hashes and figures."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from matplotlib.figure import Figure

from common.results.reading import MISSING

HASH = re.compile(r"([0-9a-f]{32,64})(\+dirty)?")


def short(value: str) -> str:
    """Hashes and commits cut to 12 hex digits (a ``+dirty`` mark kept); other values unchanged."""
    match = HASH.fullmatch(value)
    if match is None:
        return value if value != "" else "None"
    return match.group(1)[:12] + "…" + (match.group(2) or "")


def decimals_for(values: Iterable[float]) -> int:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 2 if finite and max(finite) >= 1 else 4


def number_text(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def png_writer(fig: Figure) -> Callable[[str], None]:
    """``write(path)`` saving ``fig`` as a PNG (no timestamp or software tag, so the bytes repeat): one file of a
    set written with :func:`common.files.atomic_write_set`."""
    return lambda path: fig.savefig(path, format="png", dpi=120, metadata={"Software": None})
