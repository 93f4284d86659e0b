"""The benchmarks' printed tables: a header, a rule and a row per result, each column right-aligned."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Column = tuple[str, int, Callable[[Mapping[str, Any]], str]]
"""``(header, width, cell)``: ``cell(row)`` is the column's text for one result row."""

SHAPE: Column = ("shape", 12, lambda row: f"{row['rows']:>5}x{row['columns']:<6}")
"""A layer's shape, ``ROWSxCOLUMNS``."""


def column(header: str, width: int, key: str, spec: str = "") -> Column:
    """The column showing ``row[key]`` formatted with ``spec`` (e.g. ``.3f``)."""
    return header, width, lambda row: format(row[key], spec) if spec else str(row[key])


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The rows as text: a header, a rule and one line per row."""
    header = " ".join(f"{title:>{width}}" for title, width, _ in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(f"{cell(row):>{width}}" for _, width, cell in columns) for row in rows]
    return "\n".join(lines)
