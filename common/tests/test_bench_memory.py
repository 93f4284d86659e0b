"""The memory benchmark's bookkeeping (not the measurement): appended rows keep the earlier ones, and each
measured row is written before anything else can fail."""

from __future__ import annotations

import csv

import pytest

from common.bench import memory


def _row(shape: str) -> dict:
    return {"device": "cpu", "shape": shape, "layers": 2, "model_loading": "blockwise", "tokens": 512,
            "checkpoint_gib": 1.5, "peak_rss_gib": 2.25, "peak_anon_gib": 2.0, "peak_file_gib": 0.5,
            "seconds": 10.0, "wiki_embedded_ppl": 1234.5}


def test_appended_rows_keep_the_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "bench_shape", lambda shape, **_: _row(shape))
    assert memory.main(["--shapes", "toy", "--results-dir", str(tmp_path)]) == 0
    assert memory.main(["--shapes", "tinyllama-1.1b", "--results-dir", str(tmp_path), "--append"]) == 0
    with open(tmp_path / memory.BENCH_MEMORY_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["shape"] for row in rows] == ["toy", "tinyllama-1.1b"]


def test_a_measured_row_is_kept_when_printing_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "bench_shape", lambda shape, **_: _row(shape))

    def broken(*_):
        raise ValueError("printing failed")

    monkeypatch.setattr(memory, "format_table", broken)
    with pytest.raises(ValueError, match="printing failed"):
        memory.main(["--shapes", "toy", "--results-dir", str(tmp_path)])
    with open(tmp_path / memory.BENCH_MEMORY_CSV, newline="") as handle:
        assert [row["shape"] for row in csv.DictReader(handle)] == ["toy"]
