"""The provenance every run records (git commit, package versions), and where results live."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_SOLVER_CSV = "bench_solver.csv"
"""The solver benchmark's table in a results folder: not a run, so the report passes over it."""
BENCH_GPTQMODEL_CSV = "bench_gptqmodel.csv"
"""The side-by-side benchmark against GPTQModel (``make bench-gptqmodel``): not a run either."""
BENCH_OFFICIAL_CSV = "bench_official.csv"
"""Our solvers beside the official GPTQ and GPTAQ code (``make bench-official``): not a run either."""
BENCH_REVISION_CSV = "bench_revision.csv"
"""This checkout's solver beside another git revision's (``make bench-revision``): not a run either."""
BENCH_CSVS = (BENCH_SOLVER_CSV, BENCH_GPTQMODEL_CSV, BENCH_OFFICIAL_CSV, BENCH_REVISION_CSV)


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
