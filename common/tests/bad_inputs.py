"""Table-driven tests of an entry point's bad inputs: exit status 2, one ``error:`` line naming the setting,
and no long work started (a pytest plugin, see the repository's ``conftest.py``).

A tree's test module lists :class:`BadInput` cases and runs each with :func:`expect_refusal`; the fixture
:func:`unwritable_dir` gives a folder this process cannot write to, even as root, and :func:`watched_llama`
the tiny Llama setup with every model load recorded and evaluation and calibration forbidden.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class BadInput:
    """One bad input: extra command-line arguments (``setup(folder)`` may create files and return more).

    ``names``: text the error line must contain (the setting or file it is about).
    """

    case: str
    argv: list[str]
    names: str
    setup: Callable[[Path], list[str]] | None = field(default=None, compare=False)


def expect_refusal(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``; assert exit status 2 and one ``error:`` (or argparse) line; return that line."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown flag, missing value)
        code = exit_.code
    assert code == 2, f"exit status {code} for {argv}"
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    line = err[-1]
    assert line.startswith("error: ") or ": error: " in line, line
    assert "Traceback" not in "\n".join(err)
    return line


def _unwritable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Path:
    """A folder that refuses new files: a read-only temporary folder, or (for root) a read-only system one."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    candidates = [locked, Path("/sys/kernel"), Path("/proc/sys")]
    try:
        found = next((c for c in candidates if c.is_dir() and _unwritable(c)), None)
        if found is None:
            pytest.skip(f"no unwritable folder on this machine (uid {os.getuid()}); tried {candidates}")
        yield found
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.fixture
def watched_llama(tiny_setup: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """``(folder, events)``: the tiny Llama setup; ``events`` gets ``"load"`` whenever a model's weights are
    loaded, and starting an evaluation or a calibration fails the test."""
    from common.llama import experiment

    events: list[str] = []
    load = experiment.load_llama_model

    def loading(*args, **kwargs):
        events.append("load")
        return load(*args, **kwargs)

    def forbidden(stage: str):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{stage} started before the bad input was refused")

        return refuse

    from common.llama.blockwise import BlockwiseLlama

    block_load = BlockwiseLlama.load

    def loading_block(*args, **kwargs):
        events.append("load")
        return block_load(*args, **kwargs)

    monkeypatch.setattr(experiment, "load_llama_model", loading)
    monkeypatch.setattr(BlockwiseLlama, "load", loading_block)
    monkeypatch.setattr(experiment, "window_nlls", forbidden("evaluation"))
    monkeypatch.setattr(experiment, "quantize", forbidden("calibration"))
    return tiny_setup, events
