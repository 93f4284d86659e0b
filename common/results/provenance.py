"""The provenance every run records (git commit, package versions), and where results live."""

from __future__ import annotations

import hashlib
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


def source_digest(folders: Iterable[str]) -> str:
    """SHA-256 of the Python sources under ``folders`` (relative to the repository root): the code that ran,
    committed or not."""
    digest = hashlib.sha256()
    for folder in sorted(folders):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def package_versions(names: Iterable[str] = ("torch", "transformers", "timm", "datasets", "lm-eval")) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` where absent)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
