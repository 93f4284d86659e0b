"""How the report shows numbers, table cells, hashes and figures."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

from common.files import atomic_write
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


def save_png(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as a PNG (no timestamp or software tag, so the bytes repeat), atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}))
