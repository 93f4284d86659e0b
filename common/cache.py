"""Where converted models and trained checkpoints are cached: ``$GPTAQ_CACHE_DIR`` or ``<repo>/.cache``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "GPTAQ_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$GPTAQ_CACHE_DIR`` if set, else ``<repo root>/.cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else REPO_ROOT / ".cache"
