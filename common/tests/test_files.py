"""Atomic file sets, stale temporaries of killed processes, and the up-front output checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from common.files import (
    atomic_write_set,
    check_output_file,
    check_plain_name,
    check_writable_dir,
    json_text,
    sweep_stale_temporaries,
    temporary_dir,
)
from common.results.reading import load_runs
from common.results.runs import MetricRow, write_run

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_pair(folder: Path, name: str = "run") -> tuple[Path, Path]:
    return write_run(folder, name, model="m", setting="W4A4",
                     rows=[MetricRow("wiki_ppl", False, {"gptq": 10.0, "gptaq": 9.0})],
                     settings={"seed": 0}, metadata={"tree": "fake_quant"})


def test_a_failing_write_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_set([(tmp_path / "a.csv", lambda tmp: Path(tmp).write_text("a")), (tmp_path / "a.json", broken)])
    assert list(tmp_path.iterdir()) == []


def test_a_run_killed_while_writing_its_results_leaves_no_result_and_its_temporaries_are_swept(tmp_path):
    """A real process is killed (SIGKILL) in the middle of writing a run's CSV and JSON."""
    marker = tmp_path / "writing"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from common.files import atomic_write_set\n"
        "folder = Path(sys.argv[1])\n"
        "def slow(tmp):\n"
        "    Path(tmp).write_text('{')\n"
        "    (folder / 'writing').write_text('')\n"
        "    time.sleep(60)\n"
        "atomic_write_set([(folder / 'r.csv', lambda t: Path(t).write_text('x')), (folder / 'r.json', slow)])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never started writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    marker.unlink()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.json").exists()
    assert len(left) == 2 and all(name.endswith(".tmp") and f".{child.pid}." in name for name in left)
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == left and list(tmp_path.iterdir()) == []


def test_sweep_keeps_the_temporaries_of_live_processes_and_other_files(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".run.csv.{dead}.abc.tmp").write_text("")
    (tmp_path / f".run.csv.{os.getpid()}.abc.tmp").write_text("")  # this process: still writing
    (tmp_path / f".model.tmp-{dead}-xyz").mkdir()
    (tmp_path / f".model.tmp-{dead}-xyz" / "config.json").write_text("{}")
    (tmp_path / "run.csv").write_text("kept")
    (tmp_path / ".hidden.tmp").write_text("not ours")
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".run.csv.{dead}.abc.tmp", f".model.tmp-{dead}-xyz"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".run.csv.{os.getpid()}.abc.tmp", "run.csv",
                                                                 ".hidden.tmp"])
    assert sweep_stale_temporaries(tmp_path / "absent") == []


def test_temporary_dir_carries_the_pid(tmp_path: Path) -> None:
    folder = temporary_dir(tmp_path / "model")
    assert folder.is_dir() and folder.name.startswith(f".model.tmp-{os.getpid()}-")
    assert sweep_stale_temporaries(tmp_path) == []  # ours, alive


def test_written_run_is_a_vouched_pair(tmp_path: Path) -> None:
    _, json_path = _write_pair(tmp_path)
    assert json.loads(json_path.read_text())["csv_sha256"]
    (run,) = load_runs(tmp_path)
    assert run.meta is not None and run.notes == []


def test_json_of_other_csv_contents_is_not_used(tmp_path: Path) -> None:
    csv_path, _ = _write_pair(tmp_path)
    csv_path.write_text(csv_path.read_text().replace("9,", "8,"))
    (run,) = load_runs(tmp_path)
    assert run.meta is None
    assert "its JSON vouches for other CSV contents" in run.notes[0]


def test_a_csv_without_json_is_flagged(tmp_path: Path) -> None:
    _, json_path = _write_pair(tmp_path)
    json_path.unlink()
    (run,) = load_runs(tmp_path)
    assert run.meta is None and "no sidecar JSON (an interrupted run" in run.notes[0]


def test_a_rerun_archives_and_sweeps(tmp_path: Path) -> None:
    _write_pair(tmp_path)
    (tmp_path / f".run.csv.{_dead_pid()}.abc.tmp").write_text("")
    _write_pair(tmp_path)
    assert sorted(p.suffix for p in (tmp_path / "history").iterdir()) == [".csv", ".json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history", "run.csv", "run.json"]


def test_output_checks(tmp_path: Path, unwritable_dir: Path) -> None:
    assert check_writable_dir(tmp_path / "new" / "deeper", "results_dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"results_dir: .*file is a file"):
        check_writable_dir(tmp_path / "file" / "sub", "results_dir")
    with pytest.raises(ConfigError, match="results_dir: cannot write to folder"):
        check_writable_dir(unwritable_dir / "sub", "results_dir")
    with pytest.raises(ConfigError, match=r"rotation_path: .* is a folder"):
        check_output_file(tmp_path, "rotation_path")
    assert check_output_file(tmp_path / "R.safetensors", "rotation_path") == tmp_path / "R.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"]  # locked: the unwritable fixture


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "tab\there"])
def test_plain_names(name: str) -> None:
    with pytest.raises(ConfigError, match="name must be a plain file name"):
        check_plain_name(name, "name")
    assert check_plain_name("fake_quant-smollm2-135m-w4a4", "name") == "fake_quant-smollm2-135m-w4a4"


def test_json_text_keeps_lists_of_numbers_on_one_line_and_round_trips() -> None:
    payload = {"nll": [0.5, 1e-07, -2.25, 3], "nested": {"empty": [], "text": "[1, 2]", "mixed": [1, "a"]},
               "lists": [[1, 2], [3.5]], "big": [1e+20, -0.0]}
    text = json_text(payload)
    assert json.loads(text) == payload
    assert '"nll": [0.5, 1e-07, -2.25, 3]' in text and '"big": [1e+20, -0.0]' in text
    assert '"text": "[1, 2]"' in text and '"mixed": [\n' in text
