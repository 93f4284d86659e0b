"""The stage profile: seconds, counted FLOPs, floors at a given rate, peak memory, and its printed table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.profile import StageProfile, counting_flops, format_profile, forward_flops, main, matmul_rate


def test_stages_accumulate_and_floors_use_the_rate() -> None:
    profile = StageProfile(rate=1e9)
    with profile("evaluate fp", count_flops=True):
        torch.randn(64, 32) @ torch.randn(32, 16)
    profile.add("quantize gptq: solves", 0.5, 2e9)
    profile.add("quantize gptq: solves", 0.5, 2e9)
    rows = {row["stage"]: row for row in profile.rows()}
    assert rows["evaluate fp"]["gflop"] == pytest.approx(2 * 64 * 32 * 16 / 1e9, abs=0.05)
    solves = rows["quantize gptq: solves"]
    assert (solves["seconds"], solves["gflop"], solves["floor_seconds"], solves["times_floor"]) == (1.0, 4.0, 4.0, 0.25)
    assert all(row["peak_rss_mb"] > 0 for row in rows.values())
    table = profile.table()
    assert "quantize gptq: solves" in table and "floors at the float32 matmul rate" in table
    assert table.splitlines()[-2].startswith("total (stages)")  # parts (": ") are not added to the total


def test_attention_flops_are_counted_on_cpu() -> None:
    q = torch.randn(1, 2, 8, 4)
    with counting_flops() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 8 * 8 * 4)  # Q·Kᵀ and A·V
    linear = torch.nn.Linear(8, 3)
    assert forward_flops(lambda: linear(torch.randn(5, 8))) == 2 * 5 * 8 * 3


def test_main_prints_a_recorded_profile_and_refuses_files_without_one(tmp_path: Path, capsys) -> None:
    profile = StageProfile(rate=2e9)
    profile.add("data", 1.25)
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"profile": profile.as_dict()}))
    assert main([str(run)]) == 0
    assert "data" in capsys.readouterr().out and format_profile(profile.as_dict()).startswith("stage")
    old = tmp_path / "old.json"
    old.write_text("{}")
    assert main([str(old)]) == 2
    assert "records no profile" in capsys.readouterr().err


def test_the_matmul_rate_is_timed_for_at_least_the_minimum(monkeypatch) -> None:
    clock = iter(range(1000))
    monkeypatch.setattr("common.profile.time.perf_counter", lambda: float(next(clock)))
    rate = matmul_rate(torch.device("cpu"), size=8, repeats=2, min_seconds=5.0)
    assert rate == 2 * 8**3  # every product "took" one second: five of them, the best one second
    assert next(clock) == 10  # five products, two clock reads each
