"""Result files: atomic writes of text, CSV and JSON, and the provenance every run records."""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from common.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SOLVER_CSV = "bench_solver.csv"
"""The solver benchmark's table in a results folder: not a run, so the report passes over it."""


def write_text(tmp: str | Path, text: str) -> None:
    """Write ``text`` to ``tmp`` as UTF-8 with the line endings as given."""
    Path(tmp).write_text(text, encoding="utf-8", newline="")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`common.files.atomic_write`)."""
    return atomic_write(path, lambda tmp: write_text(tmp, text))


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> str:
    """``rows`` (dicts keyed by ``fieldnames``) as CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def json_text(payload: Any) -> str:
    """``payload`` as indented, key-sorted JSON text."""
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> Path:
    """Write ``rows`` (dicts keyed by ``fieldnames``) as CSV, atomically."""
    return atomic_write_text(path, csv_text(rows, fieldnames))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json_text(payload))


def git_commit() -> str:
    """The repository's HEAD commit (with ``+dirty`` when the tree has changes), or ``"unknown"``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def package_versions(names: Iterable[str] = ("torch", "transformers", "timm", "datasets", "lm-eval")) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` where absent)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
