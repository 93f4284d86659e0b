"""A model read one block at a time gives the in-memory run's numbers, and a killed run resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.methods import METHODS
from common.tests.llama_fixtures import tiny_llama
from fake_quant import main as fq_main
from fake_quant.settings import LlamaRunConfig

REPO = Path(__file__).resolve().parents[2]
ALL_METHODS = list(METHODS)
TINY = {"calib_dataset": "tiny_text", "eval_datasets": ["tiny_text"], "nsamples": 6, "seqlen": 32,
        "eval_max_windows": 3, "calib_batch_size": 2, "device": "cpu", "w_clip": False}

TINY_ARGV = ["--calib_dataset", "tiny_text", "--eval_datasets", "tiny_text", "--nsamples", "6", "--seqlen", "32",
             "--eval_max_windows", "3", "--calib_batch_size", "2", "--device", "cpu", "--no-w_clip"]


def _results(json_path: Path) -> tuple[str, dict]:
    """The CSV's metric columns and the JSON's records, without timings and the settings that name the run."""
    data = json.loads(json_path.read_text())
    for records in data["layers"].values():
        for record in records:
            record.pop("seconds")
    lines = json_path.with_suffix(".csv").read_text().splitlines()
    csv_rows = [line.split(",")[:4 + len(ALL_METHODS)] for line in lines]
    return json.dumps(csv_rows), {key: data[key] for key in ("layers", "per_example", "rotation", "data_sha256")}


@pytest.mark.parametrize("rotate", [True, False], ids=["quarot", "unrotated"])
def test_blockwise_equals_whole_model_for_every_method(tiny_setup, rotate) -> None:
    runs = {}
    for loading in ("blockwise", "whole"):
        config = LlamaRunConfig(name=loading, model_loading=loading, methods=ALL_METHODS, rotate=rotate,
                                k_bits=4 if rotate else 16, results_dir=str(tiny_setup / "results"), **TINY)
        _, json_path = fq_main.run(config)
        runs[loading] = _results(json_path)
    assert runs["blockwise"] == runs["whole"]
    assert not (tiny_setup / "results" / "blockwise.checkpoint").exists()  # removed after success


def _worker(args: list[str], *, model: Path, results: Path, kill: list[str] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "fake_quant.tests.blockwise_worker", "--tiny-data", *kill, "--model", str(model),
            "--results_dir", str(results), "--name", "run", *TINY_ARGV, *args]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-4-blocks"
    tiny_llama(layers=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(model_folder, tmp_path_factory) -> tuple[str, dict]:
    results = tmp_path_factory.mktemp("uninterrupted")
    done = _worker(["--methods", "fp,gptq,gptaq"], model=model_folder, results=results)
    assert done.returncode == 0, done.stderr[-2000:]
    return _results(results / "run.json")


@pytest.mark.parametrize("kill", [["--kill-after-block", "2"], ["--kill-writing-block", "1"]],
                         ids=["after-block", "during-write"])
def test_killed_run_resumes_to_the_same_bytes(model_folder, uninterrupted, tmp_path, kill) -> None:
    results = tmp_path / "results"
    killed = _worker(["--methods", "fp,gptq,gptaq"], model=model_folder, results=results, kill=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (results / "run.csv").exists()
    kept = results / "run.checkpoint"
    assert (kept / "gptq" / "progress.json").is_file() and (kept / "fp" / "metrics.json").is_file()
    resumed = _worker(["--methods", "fp,gptq,gptaq"], model=model_folder, results=results)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint" in resumed.stderr
    assert _results(results / "run.json") == uninterrupted
    assert not kept.exists()


def test_resume_refuses_a_different_run(model_folder, tmp_path) -> None:
    results = tmp_path / "results"
    killed = _worker(["--methods", "gptq"], model=model_folder, results=results, kill=["--kill-after-block", "1"])
    assert killed.returncode == -9
    other = _worker(["--methods", "gptq", "--w_bits", "3"], model=model_folder, results=results)
    assert other.returncode == 2
    assert "belongs to another run (settings.w_bits: 4 -> 3)" in other.stderr
    restarted = _worker(["--methods", "gptq", "--w_bits", "3", "--restart"], model=model_folder, results=results)
    assert restarted.returncode == 0, restarted.stderr[-2000:]


def test_resume_refuses_a_changed_model_file(model_folder, tmp_path) -> None:
    results = tmp_path / "results"
    killed = _worker(["--methods", "gptq"], model=model_folder, results=results, kill=["--kill-after-block", "1"])
    assert killed.returncode == -9
    weights = model_folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        again = _worker(["--methods", "gptq"], model=model_folder, results=results)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again.returncode == 2
    assert "belongs to another run (model_files" in again.stderr and "--restart" in again.stderr
