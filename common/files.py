"""Writing files safely: atomic writes (one file or a set; text, CSV, JSON), stale temporaries, output checks.

Every temporary file or folder this project writes carries the writing process's id in its name
(``.<name>.<pid>.<random>.tmp`` for files, ``.<name>.tmp-<pid>-<random>`` for folders), so that one left
behind by a killed process can be recognised and removed later (:func:`sweep_stale_temporaries`) without
touching a temporary that a live process is still writing.

Output locations are checked before any long work starts (:func:`check_writable_dir`,
:func:`check_output_file`): a run that cannot write its results fails in its first second, naming the
setting, instead of after hours of calibration.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError

_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
_TEMP_DIR = re.compile(r"^\..+\.tmp-(\d+)-[^.]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def temporary_dir(folder: Path) -> Path:
    """A new empty sibling folder of ``folder`` named for this process (rename it onto ``folder`` when done)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    return tmp


HISTORY = "history"
"""The folder, beside what it keeps, that earlier result files, exports and saved models are moved into."""


def move_to_history(paths: Sequence[Path], history: Path) -> list[Path]:
    """Move the existing files or folders of ``paths`` into ``history`` as ``<stem>-<time><suffix>`` (the time
    of the newest one's last change; ``-<k>`` added if taken); returns where each went. Nothing is deleted."""
    existing = [path for path in paths if path.exists()]
    if not existing:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(path.stat().st_mtime for path in existing)))
    history.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in existing:
        target = history / f"{path.stem}-{stamp}{path.suffix}"
        counter = 1
        while target.exists():
            target = history / f"{path.stem}-{stamp}-{counter}{path.suffix}"
            counter += 1
        shutil.move(str(path), target)
        moved.append(target)
    return moved


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    A reader never sees a half-written file, and an interrupted write leaves the old file (if any) intact.
    """
    return atomic_write_set([(Path(path), write)])[0]


def atomic_write_set(files: Sequence[tuple[Path, Callable[[str], None]]]) -> list[Path]:
    """Write several files so that each is complete before any of them appears.

    Every ``write(tmp)`` runs first, on temporary files; only when all succeeded are they renamed into
    place, in the given order, so the last one can serve as the set's manifest (a reader that trusts a
    set only when its last file is present and vouches for the others never sees a partial set). Each file is
    flushed to the disk before its rename and each folder after, so a power loss leaves the old file or the
    new one. On any error, every temporary file is removed and no target is touched.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_file(path)
            staged.append((tmp, path))
            write(str(tmp))
            os.chmod(tmp, 0o666 & ~_umask())
            _sync(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for _, path in staged):
            _sync(folder)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def _sync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (a power loss keeps what was renamed)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text(tmp: str | Path, text: str) -> None:
    """Write ``text`` to ``tmp`` as UTF-8 with the line endings as given."""
    Path(tmp).write_text(text, encoding="utf-8", newline="")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: write_text(tmp, text))


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> str:
    """``rows`` (dicts keyed by ``fieldnames``) as CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


_NUMBER_LIST = re.compile(r"\[\s+(-?[0-9][-+0-9.eE]*(?:,\s+-?[0-9][-+0-9.eE]*)*)\s+\]")


def json_text(payload: Any) -> str:
    """``payload`` as indented, key-sorted JSON text; a list of numbers stays on one line (per-example data:
    ten thousand numbers are ten thousand lines otherwise)."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    return _NUMBER_LIST.sub(lambda match: "[" + re.sub(r",\s+", ", ", match.group(1)) + "]", text) + "\n"


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> Path:
    """Write ``rows`` (dicts keyed by ``fieldnames``) as CSV, atomically."""
    return atomic_write_text(path, csv_text(rows, fieldnames))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json_text(payload))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove this project's temporary files and folders in ``folder`` whose writing process has died.

    Returns what was removed. Unreadable folders and entries that vanish meanwhile are passed over.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_FILE.match(entry.name) if entry.is_file() else _TEMP_DIR.match(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def check_writable_dir(path: str | Path, setting: str) -> Path:
    """Prove that ``path`` can be written: it, or the nearest folder above it that exists, takes a probe file.

    Creates nothing that stays (the folder itself is made when the first file is written). Raises
    ``ConfigError`` naming ``setting`` when a part of the path is a file or the folder is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{setting}: {existing} is a file, so {path} cannot be a folder")
    try:
        _temporary_file(existing / "write-probe").unlink()
    except OSError as error:
        raise ConfigError(f"{setting}: cannot write to folder {existing} ({error.strerror or error})") from None
    return path


def check_output_file(path: str | Path, setting: str) -> Path:
    """``path`` can be (re)written: it is not a folder and its folder is writable; else ``ConfigError``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{setting}: {path} is a folder; give a file path")
    check_writable_dir(path.parent, setting)
    if path.exists() and not os.access(path, os.R_OK):
        raise ConfigError(f"{setting}: {path} exists but cannot be read")
    return path


NAME_DECORATION = 64
"""Bytes the longest file name made from a run's name adds to it: a temporary's prefix and process id, a
history time stamp, ``-from-<format>``, ``.checkpoint``."""


def check_name_fits(name: str, folder: str | Path, setting: str) -> str:
    """``name`` leaves room for :data:`NAME_DECORATION` bytes in a file name of ``folder``'s file system (the
    nearest existing folder above it is asked; 255 if it cannot say); else ``ConfigError`` naming ``setting``."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(name.encode("utf-8"))
    if size + NAME_DECORATION > limit:
        raise ConfigError(f"{setting}: the run's name {name[:40]!r}… is {size} bytes; the files named after it in "
                          f"{existing} allow at most {limit - NAME_DECORATION} (file names of at most {limit} "
                          f"bytes there)")
    return name


def check_plain_name(name: str, setting: str) -> str:
    """``name`` is a plain file name (no folder part, not hidden, printable); else ``ConfigError``."""
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or not name.isprintable()):
        raise ConfigError(
            f"{setting} must be a plain file name (letters, digits, '-', '_', no '/' and not starting with '.'), "
            f"got {name!r}"
        )
    return name
